"""Predicting on new data from a run folder (issue 23): the core, and the cell-type workflow end to end.

A tiny cell-type run is trained in this process (the notebook's own cells); ``workbench predict`` then runs in a
new process on the run's own test cells and must give the run's own test predictions.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workbench import predict
from workbench.predict import AlignmentReport, PredictError, align_names, load_run

ROOT = Path(__file__).resolve().parents[1]
WORKBENCH = [sys.executable, "-m", "workbench.cli"]


def _workbench(*args):
    return subprocess.run([*WORKBENCH, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600)


# --------------------------------------------------------------------------- alignment


def test_align_names_matches_reorders_fills_and_counts():
    model = [f"g{i}" for i in range(20)]
    data = list(reversed(model[2:])) + ["extra1", "extra2"]  # 2 missing, reordered, 2 extra
    positions, report = align_names(data, model, what="genes")
    assert report.matched == 18 and report.missing == ["g0", "g1"] and report.extra == ["extra1", "extra2"]
    assert report.reordered and positions[0] == -1 and data[positions[5]] == "g5"
    assert "2 missing, filled with 0 (10.0%; refused above 50%)" in report.summary()
    assert set(report.to_frame()["count"]) == {18, 2}
    assert report.to_dict()["n_missing"] == 2 and "Input alignment" in report._repr_html_()
    same, plain = align_names(model, model)
    assert np.array_equal(same, np.arange(20)) and not plain.reordered and not plain.missing


def test_align_names_refuses_with_the_number_and_the_fix():
    model = [f"g{i}" for i in range(10)]
    with pytest.raises(PredictError, match=r"7 of the model's 10 genes \(70.0%\) are missing .* above the allowed "
                                           r"share of 50%.*--max-missing"):
        align_names(model[:3], model, what="genes")
    align_names(model[:3], model, what="genes", max_missing=0.8)  # accepted when asked
    with pytest.raises(PredictError, match=r"shares no genes with the model.*ENSG1.*g0.*same genes identifiers"):
        align_names(["ENSG1", "ENSG2"], model, what="genes")


def test_unknown_categories_and_notes_show_in_every_face():
    report = AlignmentReport(what="fields", n_model=3, n_data=3, matched=3, unknown={"mcc": 4},
                             notes=["resampled from 2000 Hz to 1000 Hz"])
    assert "4 unknown mcc mapped to the unknown index" in report.summary()
    assert "resampled" in report.summary() and report.to_dict()["unknown"] == {"mcc": 4}
    assert "unknown mcc" in " ".join(report.to_frame()["item"])


def test_data_kind_refuses_an_unsupported_format(tmp_path):
    (tmp_path / "cells.txt").write_text("x")
    with pytest.raises(PredictError, match=r"cells.txt is in an unsupported format \(.txt\).*AnnData \(.h5ad\)"):
        predict.data_kind(tmp_path / "cells.txt")
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "a.wav").write_bytes(b"")
    assert predict.data_kind(tmp_path / "rec") == "recordings"


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(PredictError, match="is not a run folder.*the notebook prints it"):
        load_run(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(PredictError, match="holds a run but no predictor.json.*-o NEW_DIR"):
        load_run(tmp_path)


# --------------------------------------------------------------------------- cell type, end to end


def _write_cells(path, *, n_cells=240, n_genes=60, n_classes=4, seed=0):
    """A small AnnData: dense X, genes GENE_000..., 4 types in obs['celltype']."""
    import anndata

    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_cells)
    centers = rng.normal(0, 1.5, (n_classes, n_genes))
    X = np.log1p(np.clip(centers[y] + rng.normal(0, 1, (n_cells, n_genes)), 0, None) * 3).astype(np.float32)
    obs = pd.DataFrame({"celltype": pd.Categorical([f"type_{chr(65 + k)}" for k in y])},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE_{i:03d}" for i in range(n_genes)])
    anndata.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory):
    """A tiny cell-type run (the notebook's cells, in this process), its data and the test cells as an .h5ad."""
    import anndata

    from workbench.execute import run_in_process
    from workbench.tasks import cell_type

    folder = tmp_path_factory.mktemp("cell_run")
    data_path = _write_cells(folder / "cells.h5ad")
    namespace = run_in_process(cell_type.WORKFLOW.notebook, parameters={
        "data_path": str(data_path), "label_key": "celltype", "epochs": 2, "batch_size": 64,
        "pretrained_checkpoint": "none", "output_dir": str(folder / "run"), "interactive": False})
    data = namespace["data"]
    adata = anndata.read_h5ad(data_path)
    test = adata[data.obs_names[data.test_idx]].copy()
    test.write_h5ad(folder / "test_cells.h5ad")
    return {"run": folder / "run", "test": folder / "test_cells.h5ad", "model": namespace["model"], "data": data,
            "folder": folder}


def test_run_folder_records_the_workflow_version_and_state(cell_run):
    record = json.loads((cell_run["run"] / "predictor.json").read_text())
    assert record["task"] == "workbench.tasks.cell_type" and record["workbench_version"]
    assert record["weights"] == "checkpoints/best.safetensors"
    assert record["state"]["genes"] == [f"GENE_{i:03d}" for i in range(60)]
    assert record["state"]["classes"] == ["type_A", "type_B", "type_C", "type_D"]
    assert record["state"]["features"] == "adata.X"


def test_predict_in_a_new_process_equals_the_runs_own_test_predictions(cell_run, tmp_path):
    from workbench.tasks import cell_type

    out = tmp_path / "pred.csv"
    proc = _workbench("predict", cell_run["run"], cell_run["test"], "-o", out, "-o", tmp_path / "pred.parquet",
                      "-o", tmp_path / "annotated.h5ad")
    assert proc.returncode == 0, proc.stderr
    assert "60 of 60 model genes found in the input" in proc.stdout
    ours = pd.read_csv(out, index_col=0)
    theirs = pd.read_csv(cell_run["run"] / "test_predictions.csv", index_col=0)
    data, model = cell_run["data"], cell_run["model"]
    in_process = cell_type.predict_proba(model, data, data.test_idx)  # the in-process model, computed here
    assert list(ours.index) == list(theirs.index) == list(data.obs_names[data.test_idx])
    proba = ours[[f"proba_{c}" for c in data.classes]].to_numpy()
    assert np.abs(proba - theirs[[f"proba_{c}" for c in data.classes]].to_numpy()).max() <= 1e-6
    assert np.abs(proba - in_process).max() <= 1e-6
    assert (ours["label"] == theirs["label"]).all()
    assert np.allclose(pd.read_parquet(tmp_path / "pred.parquet")[ours.columns[1:]].to_numpy(), ours.iloc[:, 1:],
                       atol=1e-6)
    import anndata

    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    assert list(annotated.obs["predicted_label"].astype(str)) == list(ours["label"])
    assert np.abs(annotated.obsm["predicted_probabilities"] - proba).max() <= 1e-6
    assert list(annotated.uns["predicted_classes"]) == data.classes


def test_permuted_genes_with_5_percent_removed_are_aligned_and_counted(cell_run, tmp_path):
    import anndata

    test = anndata.read_h5ad(cell_run["test"])
    rng = np.random.default_rng(1)
    keep = rng.permutation(test.n_vars)[:57]  # 3 of 60 genes (5%) removed, the rest shuffled
    removed = sorted(set(test.var_names) - set(test.var_names[keep]))
    shuffled = test[:, keep].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    proc = _workbench("predict", cell_run["run"], tmp_path / "shuffled.h5ad", "-o", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    assert "57 of 60 model genes found in the input (reordered to the model's order); 3 missing, filled with 0 " \
           "(5.0%; refused above 50%)" in proc.stdout
    result = load_run(cell_run["run"]).predict(shuffled)
    assert sorted(result.report.missing) == removed and result.report.extra == []
    # the stated result: the same cells with those genes set to 0, in the model's order, predict the same
    zeroed = test.copy()
    zeroed.X[:, zeroed.var_names.get_indexer(removed)] = 0
    expected = load_run(cell_run["run"]).predict(zeroed)
    assert np.abs(result.probabilities - expected.probabilities).max() <= 1e-6
    assert np.abs(pd.read_csv(tmp_path / "p.csv", index_col=0)["probability"] - result.frame["probability"]).max() <= 1e-6


def test_embedding_backed_input_and_too_many_missing_genes(cell_run, tmp_path):
    import anndata

    predictor = load_run(cell_run["run"])
    in_memory = predictor.predict(cell_run["test"], backed="false")
    streamed = predictor.predict(cell_run["test"], backed="true", batch_size=7)
    assert np.abs(in_memory.probabilities - streamed.probabilities).max() <= 1e-6
    streamed.write(tmp_path / "backed_copy.h5ad")  # copied file to file, X never read
    copy = anndata.read_h5ad(tmp_path / "backed_copy.h5ad")
    assert np.abs(copy.obsm["predicted_probabilities"] - in_memory.probabilities).max() <= 1e-6
    assert np.array_equal(copy.X, anndata.read_h5ad(cell_run["test"]).X)

    embedded = predictor.predict(cell_run["test"], output="embedding")
    assert embedded.embedding.shape == (len(in_memory), 256)
    embedded.write(tmp_path / "emb.h5ad")
    assert anndata.read_h5ad(tmp_path / "emb.h5ad").obsm["X_workbench"].shape == (len(in_memory), 256)

    test = anndata.read_h5ad(cell_run["test"])
    with pytest.raises(PredictError, match=r"40 of the model's 60 genes \(66.7%\) are missing"):
        predictor.predict(test[:, :20].copy())


def test_bad_inputs_are_one_line_errors_naming_the_fix(cell_run, tmp_path):
    (tmp_path / "recordings").mkdir()
    (tmp_path / "recordings" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "cells.txt").write_text("x")
    renamed = _write_cells(tmp_path / "ensembl.h5ad", n_cells=20)
    import anndata

    a = anndata.read_h5ad(renamed)
    a.var_names = [f"ENSG{i:05d}" for i in range(a.n_vars)]
    a.write_h5ad(renamed)
    cases = [
        (tmp_path, tmp_path / "cells.txt", "is not a run folder"),
        (cell_run["run"], tmp_path / "recordings", "is a folder of recordings (.wav), but run is a run of "
                                                   "workbench.tasks.cell_type, which predicts from AnnData"),
        (cell_run["run"], tmp_path / "cells.txt", "unsupported format (.txt)"),
        (cell_run["run"], renamed, "shares no genes with the model"),
        (cell_run["run"], tmp_path / "missing.h5ad", "does not exist"),
    ]
    for run_dir, data, expected in cases:
        proc = _workbench("predict", run_dir, data, "-o", tmp_path / "out.csv")
        message = proc.stderr.strip()
        assert proc.returncode == 2 and len(message.splitlines()) == 1 and expected in message, message
        assert "Traceback" not in proc.stderr


def test_a_run_from_another_version_says_what_differs(cell_run, tmp_path):
    import shutil

    copy = tmp_path / "old_run"
    shutil.copytree(cell_run["run"], copy)
    record = json.loads((copy / "predictor.json").read_text())
    record["versions"]["workbench"] = "0.0.1"
    (copy / "predictor.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"versions differ from those that made the run: workbench 0\.0\.1 -> "):
        predictor = load_run(copy)
    assert predictor.version_differences["workbench"][0] == "0.0.1" and "0.0.1" in predictor.summary()
    proc = _workbench("predict", copy, cell_run["test"], "-o", tmp_path / "p.csv")
    assert proc.returncode == 0 and "workbench 0.0.1 ->" in proc.stderr
    record["format"] = 99
    (copy / "predictor.json").write_text(json.dumps(record))
    with pytest.raises(PredictError, match="newer workbench.*upgrade"):
        load_run(copy)


# --------------------------------------------------------------------------- regulatory (LoRA), end to end


@pytest.fixture(scope="module")
def regulatory_run(tmp_path_factory):
    """A tiny LoRA run of the regulatory notebook (in this process), with a cache folder of its own."""
    import os

    pytest.importorskip("peft")
    from workbench.execute import run_in_process
    from workbench.tasks import regulatory

    folder = tmp_path_factory.mktemp("regulatory_run")
    frame = regulatory.simulate(n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2)
    regulatory.write_csv(frame, folder / "samples.csv")
    old = os.environ.get("WORKBENCH_CACHE")
    os.environ["WORKBENCH_CACHE"] = str(folder / "cache")
    try:
        namespace = run_in_process(regulatory.WORKFLOW.notebook, parameters={
            "data_path": str(folder / "samples.csv"), "epochs": 2, "pretrain_epochs": 1, "label_fraction": 0.5,
            "lora_rank": 2, "output_dir": str(folder / "run"), "interactive": False})
    finally:
        os.environ["WORKBENCH_CACHE"] = old
    data = namespace["data"]
    test = pd.read_csv(folder / "samples.csv").iloc[data.test_idx].drop(columns=["expression"])
    test.to_csv(folder / "test_samples.csv", index=False)
    return {"run": folder / "run", "test": folder / "test_samples.csv", "cache": folder / "cache", "data": data,
            "model": namespace["model"], "folder": folder}


def test_lora_run_predicts_in_a_new_process_equal_to_its_own_predictions_and_after_the_cache_is_gone(
        regulatory_run, tmp_path):
    import shutil

    from workbench.tasks import regulatory

    run = regulatory_run["run"]
    record = json.loads((run / "predictor.json").read_text())
    assert record["weights"] == "adapters" and (run / "adapters" / "base.safetensors").is_file()
    own = pd.read_csv(run / "predictions.csv")["predicted"].to_numpy()
    data, model = regulatory_run["data"], regulatory_run["model"]
    assert np.abs(regulatory.predict(model, data, data.test_idx) - own).max() <= 1e-6  # the in-process model

    def predicted(out):
        proc = _workbench("predict", run, regulatory_run["test"], "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert f"{len(own)} samples: 29 of 29 model fields found in the input" in proc.stdout
        return pd.read_csv(out)["predicted_expression"].to_numpy()

    before = predicted(tmp_path / "before.csv")
    assert np.abs(before - own).max() <= 1e-6
    assert list(regulatory_run["cache"].glob("pretrain/*/pretrained.safetensors"))
    shutil.rmtree(regulatory_run["cache"])  # the pretrained base lived here
    after = predicted(tmp_path / "after.csv")
    assert np.array_equal(after, before)


def test_unknown_categories_and_missing_fields_are_counted(regulatory_run, tmp_path):
    frame = pd.read_csv(regulatory_run["test"], keep_default_na=False, na_values=[""],
                        dtype={"medium": str, "drug": str, "carbon_source": str})
    frame.loc[:2, "medium"] = "never_seen_medium"
    frame = frame.drop(columns=["r2_m5", "od600"])
    result = load_run(regulatory_run["run"]).predict(frame)
    assert result.report.unknown == {"medium": 3}
    assert sorted(result.report.missing) == ["od600", "r2_m5"]
    assert "3 unknown medium mapped to the unknown index" in result.report.summary()
    assert "od600=" in result.report.summary()  # set to the training mean, and said so
    frame.to_parquet(tmp_path / "samples.parquet")
    again = load_run(regulatory_run["run"]).predict(tmp_path / "samples.parquet")
    assert np.array_equal(again.frame["predicted_expression"], result.frame["predicted_expression"])
    (tmp_path / "cells.h5ad").write_text("")
    with pytest.raises(PredictError, match=r"is AnnData \(.h5ad\), .*regulatory, which predicts from a table"):
        load_run(regulatory_run["run"]).predict(tmp_path / "cells.h5ad")


# --------------------------------------------------------------------------- heart sounds, end to end


def test_heart_sound_run_predicts_new_recordings_equal_to_its_own_test_predictions(tmp_path):
    """PhysioNet-layout recordings at 2000 Hz, a run at 4000 Hz: the copied test recordings are resampled (and
    the report says so) and give the run's own test probabilities."""
    import os
    import shutil

    from workbench.execute import run_in_process
    from workbench.tasks import heart_sound as hs

    physionet = hs.write_layout(tmp_path / "physionet", "physionet2016", n_patients=16, seconds=3, seed=0)
    old = os.environ.get("TORCH_NUM_THREADS")
    os.environ["TORCH_NUM_THREADS"] = "1"
    try:
        namespace = run_in_process(hs.WORKFLOW.notebook, parameters={
            "task": "physionet2016", "epochs": 1, "pretrain_epochs": 1, "batch_size": 16, "data_path": str(physionet),
            "output_dir": str(tmp_path / "run"), "interactive": False})
    finally:
        os.environ.pop("TORCH_NUM_THREADS") if old is None else os.environ.update(TORCH_NUM_THREADS=old)
    data = namespace["data"]
    (tmp_path / "new").mkdir()
    for i in data.test_idx:
        shutil.copy(physionet / "training-a" / data.recordings[i].name, tmp_path / "new")
    proc = _workbench("predict", tmp_path / "run", tmp_path / "new", "-o", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    n = len(data.test_idx)
    assert f"{n} samples\nresampled {n} recording(s) from 2000 Hz to 4000 Hz" in proc.stdout
    ours = pd.read_csv(tmp_path / "p.csv", index_col=0)
    theirs = pd.read_csv(tmp_path / "run" / "test_predictions.csv", index_col=0)
    columns = [f"proba_{c}" for c in data.classes]
    assert sorted(ours.index) == sorted(theirs.index)
    assert np.abs(ours.loc[theirs.index, columns].to_numpy() - theirs[columns].to_numpy()).max() <= 1e-6
    in_process = hs.predict_proba(namespace["model"], hs.WindowBatches(data, data.test_idx))
    assert np.abs(theirs[columns].to_numpy() - in_process).max() <= 1e-6
    embedded = load_run(tmp_path / "run").predict(tmp_path / "new", output="embedding")
    assert embedded.embedding.shape == (n, 128)


# --------------------------------------------------------------------------- event sequences, end to end


def test_event_sequence_run_predicts_new_clients_equal_to_its_own_test_predictions(tmp_path):
    """A tiny run on an event table; the test clients' events alone (shuffled rows, no labels) give the run's own
    test probabilities in a new process; an unseen category maps to the unknown index and is counted."""
    import os

    pytest.importorskip("ptls")
    from workbench.execute import run_in_process
    from workbench.tasks import event_sequence as es

    events, labels = es.simulate(n_clients=48, max_len=60, seed=0)
    data_path, _ = es.write_tables(events, labels, tmp_path / "events.csv")
    old = os.environ.get("TORCH_NUM_THREADS")
    os.environ["TORCH_NUM_THREADS"] = "1"
    try:
        namespace = run_in_process(es.WORKFLOW.notebook, parameters={
            "data_path": str(data_path), "pretrain_epochs": 1, "epochs": 2, "freeze_epochs": 1, "hidden_size": 8,
            "head_hidden": "8", "label_fraction": 0.5, "output_dir": str(tmp_path / "run"), "interactive": False})
    finally:
        os.environ.pop("TORCH_NUM_THREADS") if old is None else os.environ.update(TORCH_NUM_THREADS=old)
    data = namespace["data"]
    test_clients = set(data.client_ids[data.test_idx])
    new = events[events["client_id"].astype(str).isin(test_clients)].sample(frac=1.0, random_state=0)  # any order
    new.to_csv(tmp_path / "new_events.csv", index=False)
    proc = _workbench("predict", tmp_path / "run", tmp_path / "new_events.csv", "-o", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(test_clients)} samples: 3 of 3 model fields found in the input" in proc.stdout
    ours = pd.read_csv(tmp_path / "p.csv", index_col=0, dtype={"client_id": str})
    theirs = pd.read_csv(tmp_path / "run" / "test_predictions.csv", index_col=0, dtype={"client_id": str})
    columns = [f"proba_{c}" for c in data.classes]
    assert sorted(ours.index) == sorted(theirs.index)
    assert np.abs(ours.loc[theirs.index, columns].to_numpy() - theirs[columns].to_numpy()).max() <= 1e-6
    in_process = es.predict_proba(namespace["model"], data, data.test_idx)
    assert np.abs(theirs[columns].to_numpy() - in_process).max() <= 1e-6

    new = new.copy()
    new.iloc[:4, new.columns.get_loc("event_type")] = "never_seen_type"
    result = load_run(tmp_path / "run").predict(new)
    assert result.report.unknown == {"event_type (events)": 4}
    embedded = load_run(tmp_path / "run").predict(new, output="embedding")
    assert embedded.embedding.shape == (len(test_clients), 8)


# --------------------------------------------------------------------------- spatial, end to end


def test_spatial_run_predicts_a_visium_file_equal_to_each_folds_own_test_predictions(tmp_path):
    import os

    import anndata

    from workbench.execute import run_in_process
    from workbench.tasks import spatial_transfer as st

    old = os.environ.get("TORCH_NUM_THREADS")
    os.environ["TORCH_NUM_THREADS"] = "1"
    try:
        namespace = run_in_process(st.WORKFLOW.notebook, parameters={
            "n_bulk_slides": 3, "n_spatial_slides": 2, "epochs": 2, "pretrain_epochs": 1, "cv": "kfold", "folds": 2,
            "output_dir": str(tmp_path / "run"), "interactive": False})
    finally:
        os.environ.pop("TORCH_NUM_THREADS") if old is None else os.environ.update(TORCH_NUM_THREADS=old)
    spatial = namespace["study"].spatial
    visium = st.write_visium(spatial, tmp_path / "slides.h5ad")
    theirs = pd.read_csv(tmp_path / "run" / "test_predictions.csv", index_col=0)
    record = json.loads((tmp_path / "run" / "predictor.json").read_text())
    assert len(theirs) == len(spatial.spot_ids) and list(theirs.columns) == spatial.genes
    for fold in record["state"]["folds"]:
        out = tmp_path / f"{fold['name']}.csv"
        proc = _workbench("predict", tmp_path / "run", visium, "-o", out, "--fold", fold["name"])
        assert proc.returncode == 0, proc.stderr
        assert f"the model of fold {fold['name']}" in proc.stdout
        ours = pd.read_csv(out, index_col=0)
        spots = fold["test_spots"]
        assert np.abs(ours.loc[spots].to_numpy() - theirs.loc[spots].to_numpy()).max() <= 1e-6
        long = pd.read_csv(tmp_path / "run" / "folds" / fold["name"] / "predictions.csv")  # the fold's own file
        wide = long.pivot(index="spot_id", columns="gene", values="predicted").loc[spots, spatial.genes]
        assert np.abs(ours.loc[spots].to_numpy() - wide.to_numpy()).max() <= 1e-5  # written as CSV text
    mean = load_run(tmp_path / "run").predict(visium)
    assert "the mean of 2 fold models" in mean.report.summary()
    mean.write(tmp_path / "annotated.h5ad")
    assert anndata.read_h5ad(tmp_path / "annotated.h5ad").obsm["predicted_values"].shape == (len(spatial.spot_ids),
                                                                                             len(spatial.genes))
    a = anndata.read_h5ad(visium)
    a.obsm["X_features"] = a.obsm["X_features"][:, :5]
    with pytest.raises(PredictError, match=r"has 5 feature columns; the model reads 30"):
        load_run(tmp_path / "run").predict(a)


def test_a_restarted_run_does_not_keep_the_earlier_runs_predictor(tmp_path):
    """The predictor files are run artifacts: a run started again in its folder removes them with the rest."""
    import workbench as wb

    run = wb.Run(tmp_path / "run", params={"a": 1})
    for name in ("predictor.json", "test_predictions.csv", "predictor.safetensors"):
        (run.path / name).write_text("{}")
    again = wb.Run(tmp_path / "run", params={"a": 1})
    assert again.state == "restarted"
    assert not any((tmp_path / "run" / n).exists() for n in ("predictor.json", "test_predictions.csv",
                                                             "predictor.safetensors"))


def test_integer_counts_are_normalised_as_in_training_or_refused_when_streamed(cell_run, tmp_path):
    import anndata

    test = anndata.read_h5ad(cell_run["test"])
    counts = test.copy()
    counts.X = np.rint(np.expm1(counts.X) * 3).astype(np.float32)  # whole numbers, as a count matrix holds
    counts.write_h5ad(tmp_path / "counts.h5ad")
    predictor = load_run(cell_run["run"])
    result = predictor.predict(tmp_path / "counts.h5ad", backed="false")
    assert "counts, normalised here" in result.report.summary() and np.isfinite(result.probabilities).all()
    with pytest.raises(ValueError, match="holds integer counts .* streamed from the file"):
        predictor.predict(tmp_path / "counts.h5ad", backed="true")
