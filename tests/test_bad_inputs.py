"""The bad-input matrix: one row per (workflow, bad input), the exception (or warning) it gives and a phrase of
its message, which must name the fix. Every workflow adds its rows here as it lands; docs/own_data.md prints the count.

A row is ``Case(workflow, what, action, expected, phrase, fix)``: ``action(tmp_path)`` feeds the bad input to
the real code (real files, real torch); ``expected`` is an exception class, or a warning class when the input
is handled with a notice (an unknown category, out-of-order events), ``phrase`` must be in the message, and
``fix`` is the part of the message that tells the user what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from workbench.checkpoints import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPE_NB = ROOT / "notebooks" / "cell_type_annotation.ipynb"


@dataclass(frozen=True)
class Case:
    workflow: str
    what: str
    action: Callable[[Path], object]
    expected: type
    phrase: str
    fix: str

    @property
    def id(self) -> str:
        return f"{self.workflow}: {self.what}"


# --------------------------------------------------------------------------- core: checkpoints and sweeps


def _model():
    from .helpers import TinyNet

    return TinyNet()


def truncated_checkpoint(tmp):
    from workbench.checkpoints import save_weights
    from workbench.transfer import load_pretrained

    path = tmp / "weights.safetensors"
    save_weights(_model(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    load_pretrained(_model(), path)


def wrong_format_checkpoint(tmp):
    from workbench.transfer import load_pretrained

    path = tmp / "weights.pt"
    path.write_text("epoch,loss\n1,0.5\n")
    load_pretrained(_model(), path)


def missing_checkpoint(tmp):
    from workbench.transfer import load_pretrained

    load_pretrained(_model(), tmp / "nowhere.safetensors")


def _sweep(tmp, **spec):
    from workbench.sweeps import load_spec

    return load_spec({"name": "bad", "notebook": str(CELL_TYPE_NB), "output_root": str(tmp), **spec})


def sweep_undeclared_parameter(tmp):
    _sweep(tmp, grid={"lr": [1e-3, 1e-2]})


def sweep_value_of_wrong_type(tmp):
    _sweep(tmp, grid={"epochs": [2, "many"]})


def sweep_value_out_of_range(tmp):
    _sweep(tmp, grid={"label_fraction": [0.1, 0.0]})


def leave_one_group_out_with_one_group(tmp):
    from workbench.splits import leave_one_group_out

    leave_one_group_out(["slide1"] * 5)


# --------------------------------------------------------------------------- cell type


def _h5ad(tmp, **kw):
    from .test_cell_type import write_h5ad

    return write_h5ad(tmp / "cells.h5ad", **kw)


def cell_type_missing_label_key(tmp):
    from workbench.tasks import cell_type

    cell_type.load(str(_h5ad(tmp)), "cell_type_typo")


def cell_type_nan_labels(tmp):
    from workbench.tasks import cell_type

    cell_type.load(str(_h5ad(tmp, nan_labels=3)), "celltype")


def cell_type_nan_features(tmp):
    import anndata

    from workbench.tasks import cell_type

    path = _h5ad(tmp)
    adata = anndata.read_h5ad(path)
    adata.X[2, 3] = np.nan
    adata.write_h5ad(path)
    cell_type.load(str(path), "celltype")


def cell_type_counts_in_raw(tmp):
    from workbench.tasks import cell_type

    from .test_cell_type import write_counts_h5ad

    path, _ = write_counts_h5ad(tmp / "cells.h5ad", counts_in="raw")
    cell_type.load(str(path), "celltype", backed="false")


def cell_type_counts_streamed_from_the_file(tmp):
    from workbench.tasks import cell_type

    from .test_cell_type import write_counts_h5ad

    path, _ = write_counts_h5ad(tmp / "cells.h5ad", counts_in="X")
    cell_type.load(str(path), "celltype", backed="true")


def cell_type_not_h5ad(tmp):
    from workbench.tasks import cell_type

    path = tmp / "cells.csv"
    path.write_text("a,b\n1,2\n")
    cell_type.load(str(path), "celltype")


def cell_type_bad_parameter(tmp):
    from workbench.execute import run_in_process

    run_in_process(CELL_TYPE_NB, parameters={"lr_scheduler_type": "cosin", "output_dir": str(tmp / "run")})


# --------------------------------------------------------------------------- regulatory


def regulatory_unknown_category_at_predict_time(tmp):
    from workbench.tasks import regulatory

    data = regulatory.load("", seed=0)
    conditions = data.conditions.copy()
    conditions.loc[conditions.index[data.test_idx[0]], "medium"] = "medium_never_seen"
    data.encode(data.test_idx, conditions=conditions)


def regulatory_set_value_not_source_or_target(tmp):
    from workbench.tasks import regulatory

    frame = regulatory.simulate(n_genes=6, n_regions=2, n_motifs=6, n_source_conditions=2, n_new_conditions=2)
    frame["set"] = frame["set"].replace({"source": "pretraining"})
    regulatory.load(str(regulatory.write_csv(frame, tmp / "samples.csv")))


def regulatory_missing_file(tmp):
    from workbench.tasks import regulatory

    regulatory.load(str(tmp / "samples.csv"))


# --------------------------------------------------------------------------- heart sound


def heart_label_outside_the_task(tmp):
    from workbench.tasks import heart_sound as hs

    from .test_heart_sound import write_circor

    hs.read_folder(write_circor(tmp / "circor", [("101", "Absent"), ("102", "Maybe")]), "circor_murmur")


def heart_patient_without_a_wav(tmp):
    from workbench.tasks import heart_sound as hs

    from .test_heart_sound import write_circor

    hs.read_folder(write_circor(tmp / "circor", [("201", "Absent"), ("202", "Present")], wavs={"202": []}),
                   "circor_murmur")


def heart_every_recording_too_short(tmp):
    from workbench import audio
    from workbench.tasks import heart_sound as hs

    audio.write_wav(tmp / "pascal" / "normal" / "short.wav", np.zeros(800, dtype=np.float32), 4000)
    hs.read_folder(tmp / "pascal", "pascal")


# --------------------------------------------------------------------------- spatial transfer


def _spatial():
    pytest.importorskip("torch_geometric")
    from workbench.tasks import spatial_transfer as st

    return st, st.load(grid=5, n_bulk_slides=3, n_spatial_slides=3)


def spatial_held_out_slide_that_does_not_exist(tmp):
    st, study = _spatial()
    st.cv_splits(study.spatial, cv="loo", held_out="A1,Z9")


def spatial_loo_with_a_one_spot_slide(tmp):
    st, study = _spatial()
    s = study.spatial
    one = st.SpotData(features=s.features[:51], targets=s.targets[:51], genes=s.genes, coords=s.coords[:51],
                      slides=s.slides[:51], spot_ids=s.spot_ids[:51])
    st.cv_splits(one, cv="loo")


def spatial_genes_missing(tmp):
    st, study = _spatial()
    path = st.write_visium(study.spatial, tmp / "visium.h5ad", features_key="X_uni")
    st.read_visium(path, features_key="X_uni", genes="NOPE1,NOPE2")


def spatial_nan_targets(tmp):
    import anndata

    st, study = _spatial()
    path = st.write_visium(study.spatial, tmp / "visium.h5ad", features_key="X_uni")
    adata = anndata.read_h5ad(path)
    adata.X[4, 2] = np.nan
    adata.write_h5ad(path)
    st.read_visium(path, features_key="X_uni")


def pretrained_checkpoint_that_does_not_exist(tmp):
    from workbench.checkpoints import resolve_pretrained

    resolve_pretrained(str(tmp / "encoder.safetensors"), pretrain=lambda: tmp / "never")


# --------------------------------------------------------------------------- event sequences


def _events(tmp):
    pytest.importorskip("ptls")
    from workbench.tasks import event_sequence as es

    events, labels = es.simulate(n_clients=24, max_len=40, seed=0)
    return es, events.copy(), labels.copy()


def events_client_without_a_label(tmp):
    es, events, labels = _events(tmp)
    es.load(str(es.write_tables(events, labels.iloc[2:], tmp / "events.csv")[0]))


def events_nan_in_a_numeric_field(tmp):
    es, events, labels = _events(tmp)
    events.loc[[4, 10], "amount"] = np.nan
    es.load(str(es.write_tables(events, labels, tmp / "events.csv")[0]))


def events_out_of_time_order(tmp):
    es, events, labels = _events(tmp)
    es.load(str(es.write_tables(events.sample(frac=1.0, random_state=0), labels, tmp / "events.csv")[0]),
            label_fraction=0.5)


def events_conflicting_label_rows(tmp):
    import pandas as pd

    es, events, labels = _events(tmp)
    client = labels[es.CLIENT].iloc[0]
    other = "class1" if labels[es.TARGET].iloc[0] != "class1" else "class0"
    labels = pd.concat([labels, pd.DataFrame({es.CLIENT: [client], es.TARGET: [other]})])
    es.load(str(es.write_tables(events, labels, tmp / "events.csv")[0]), label_fraction=0.5)


CASES = [
    Case("core", "truncated checkpoint", truncated_checkpoint, CheckpointError, "truncated", "Re-create it"),
    Case("core", "checkpoint in a wrong format", wrong_format_checkpoint, CheckpointError, "weights.pt", "safetensors"),
    Case("core", "checkpoint that does not exist", missing_checkpoint, CheckpointError, "does not exist", "Check the path"),
    Case("core", "pretrained_checkpoint that is neither pretrain, none nor a file",
         pretrained_checkpoint_that_does_not_exist, FileNotFoundError, "is neither 'pretrain', 'none' nor an existing",
         "'none' to train from scratch"),
    Case("core", "sweep parameter the notebook does not declare", sweep_undeclared_parameter, ValueError,
         "'lr' is not a parameter of cell_type_annotation.ipynb", "learning_rate"),
    Case("core", "sweep value of the wrong type", sweep_value_of_wrong_type, ValueError, "'many'", "int"),
    Case("core", "sweep value out of range", sweep_value_out_of_range, ValueError,
         "label_fraction=0.0 is not a number > 0 and <= 1", "no run was started"),
    Case("core", "leave-one-out with a single group", leave_one_group_out_with_one_group, ValueError,
         "needs at least 2 groups", "use kfold/holdout"),
    Case("cell_type", "label key missing", cell_type_missing_label_key, KeyError, "cell_type_typo", "celltype"),
    Case("cell_type", "NaN labels", cell_type_nan_labels, ValueError, "3 missing labels", "Drop those cells"),
    Case("cell_type", "NaN features", cell_type_nan_features, ValueError, "NaN/inf", "np.nan_to_num"),
    Case("cell_type", "integer counts in .raw (X log-normalised)", cell_type_counts_in_raw, UserWarning,
         "adata.raw.X holds integer counts", "normalised here to 10,000 counts per cell, then log1p"),
    Case("cell_type", "integer counts in X, streamed from the file", cell_type_counts_streamed_from_the_file,
         ValueError, "adata.X of cells.h5ad holds integer counts", "sc.pp.normalize_total(adata, target_sum=1e4)"),
    Case("cell_type", "data file that is not .h5ad", cell_type_not_h5ad, ValueError, "is not an .h5ad file",
         "write_h5ad"),
    Case("cell_type", "parameter value with a typo", cell_type_bad_parameter, ValueError,
         "lr_scheduler_type='cosin' is not one of", "Did you mean 'cosine'?"),
    Case("regulatory", "unknown category at predict time", regulatory_unknown_category_at_predict_time, UserWarning,
         "1 sample(s) have a medium not seen in training", "'unknown' embedding"),
    Case("regulatory", "set column value that is neither source nor target", regulatory_set_value_not_source_or_target,
         ValueError, "column 'set' holds 12 value(s) that are not one of source, target", "Mark the pretraining rows 'source'"),
    Case("regulatory", "data file that does not exist", regulatory_missing_file, FileNotFoundError, "samples.csv",
         "or '' to simulate"),
    Case("heart_sound", "label that is not one of the task's classes", heart_label_outside_the_task, ValueError,
         "training_data.csv row 3 (patient 102): label 'Maybe' is not one of", "Fix or drop that entry"),
    Case("heart_sound", "CirCor patient with no wav", heart_patient_without_a_wav, FileNotFoundError,
         "patient 202 has no recording", "Add the files or drop the row"),
    Case("heart_sound", "every recording too short", heart_every_recording_too_short, ValueError,
         "every recording was skipped", "point data_path at"),
    Case("spatial_transfer", "held-out slide that does not exist", spatial_held_out_slide_that_does_not_exist,
         ValueError, "held_out names slide(s) ['Z9'] that do not exist", "the slides are ['A1', 'B1', 'C1']"),
    Case("spatial_transfer", "leave-one-out with a one-spot slide", spatial_loo_with_a_one_spot_slide, ValueError,
         "at least 2 spots on every slide", "use cv='kfold'"),
    Case("spatial_transfer", "target genes missing from the data", spatial_genes_missing, ValueError,
         "2 of the 2 requested gene(s) are not in visium.h5ad", "fix the names or drop them"),
    Case("event_sequence", "client with events but no label", events_client_without_a_label, ValueError,
         "client(s) have events but no label (first 5:", "Add them to the labels table"),
    Case("event_sequence", "NaN in a numeric field", events_nan_in_a_numeric_field, ValueError,
         "numeric field 'amount' has 2 NaN value(s)", "impute_numeric=True"),
    Case("event_sequence", "events out of time order", events_out_of_time_order, UserWarning,
         "have events out of time order", "they were sorted"),
    Case("event_sequence", "conflicting label rows for one client", events_conflicting_label_rows, ValueError,
         "1 client(s) have label rows that disagree", "keep one row per client_id"),
    Case("spatial_transfer", "NaN targets", spatial_nan_targets, ValueError, "NaN/inf value(s) in 1 spot(s)",
         "drop those spots"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gives_a_clear_message_that_names_the_fix(case, tmp_path):
    if issubclass(case.expected, Warning):
        with pytest.warns(case.expected) as record:
            case.action(tmp_path)
        message = " ".join(str(w.message) for w in record if issubclass(w.category, case.expected))
    else:
        with pytest.raises(case.expected) as err:
            case.action(tmp_path)
        message = str(err.value)
    assert case.phrase in message, message
    assert case.fix in message, f"the message does not name the fix ({case.fix!r}): {message}"


def test_the_matrix_covers_every_workflow():
    """A workflow that lands adds its rows (docs/own_data.md prints the count)."""
    from workbench.workflow import workflow_of

    workflows = {workflow_of(p).name for p in (ROOT / "notebooks").glob("*.ipynb") if workflow_of(p) is not None}
    covered = {c.workflow for c in CASES}
    assert workflows <= covered, f"workflows with no bad-input rows: {sorted(workflows - covered)}"
    assert len({c.id for c in CASES}) == len(CASES)


def test_docs_state_the_matrix_size():
    page = (ROOT / "docs" / "own_data.md").read_text()
    assert f"{len(CASES)} bad inputs" in page, f"docs/own_data.md must say '{len(CASES)} bad inputs'"
