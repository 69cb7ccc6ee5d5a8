"""The evaluation protocol of every workflow: a result depends only on its parameters and its data.

Each workflow's notebook runs in this process with tiny parameters: alone (a cache of its own), and
again after another run (another split or label fraction) that shares its cache. The two
final_metrics.json must be identical, and model and baseline must be fit on as many samples.
"""

import importlib
import json
import math

import pytest

from workbench.tasks import event_sequence, heart_sound, regulatory
from workbench.execute import run_workflow


def _cell_type(tmp):
    return {"epochs": 2, "pretrained_checkpoint": "pretrain", "pretrain_epochs": 2}, {"label_fraction": 0.5}


def _heart_sound(tmp):
    folder = heart_sound.write_layout(tmp / "physionet", "physionet2016", n_patients=16, seconds=3, seed=1)
    params = {"task": "physionet2016", "epochs": 1, "pretrain_epochs": 1, "batch_size": 16, "data_path": str(folder)}
    return params, {"mode": "few_shot", "label_fraction": 0.5}


def _event_sequence(tmp):
    csv = event_sequence.write_tables(*event_sequence.simulate(n_clients=48, max_len=60, seed=0), tmp / "events.csv")[0]
    params = {"data_path": str(csv), "pretrain_epochs": 1, "epochs": 2, "freeze_epochs": 1, "hidden_size": 8,
              "head_hidden": "8", "label_fraction": 0.5}
    return params, {"label_fraction": 0.25}


def _spatial_transfer(tmp):
    params = {"n_bulk_slides": 3, "n_spatial_slides": 2, "epochs": 2, "pretrain_epochs": 1, "cv": "kfold", "folds": 2}
    return params, {"folds": 3, "strategy": "full"}


def _regulatory(tmp):
    frame = regulatory.simulate(n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2)
    csv = regulatory.write_csv(frame, tmp / "tiny.csv")
    params = {"data_path": str(csv), "epochs": 2, "pretrain_epochs": 1, "label_fraction": 0.25, "lora_rank": 2}
    return params, {"label_fraction": 0.5}  # the same source rows and vocabularies: the same pretraining key


#: workflow -> (tiny parameters, what the other run sharing the cache changes)
WORKFLOWS = {"cell_type": _cell_type, "heart_sound": _heart_sound, "event_sequence": _event_sequence,
             "spatial_transfer": _spatial_transfer, "regulatory": _regulatory}


@pytest.fixture(scope="module", params=list(WORKFLOWS))
def runs(request, tmp_path_factory):
    """``(name, final metrics alone, final metrics after another run sharing the cache)``."""
    name = request.param
    module = importlib.import_module(f"workbench.tasks.{name}")
    tmp = tmp_path_factory.mktemp(name)
    params, other = WORKFLOWS[name](tmp)

    results = []

    def run(folder, cache, **changes):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WORKBENCH_CACHE", str(tmp / cache))
            patch.setenv("TORCH_NUM_THREADS", "1")
            results.append(run_workflow(module.WORKFLOW, {**params, **changes, "interactive": False,
                                                "output_dir": str(tmp / folder)}))
        return json.loads((tmp / folder / "final_metrics.json").read_text())

    alone = run("alone", "cache_alone")
    run("other", "cache_shared", **other)
    after = run("after", "cache_shared")
    return name, alone, after, results[0]


def _same(a, b) -> bool:
    """Equal, where NaN equals NaN (a tiny validation split with one class has no AUROC in either run)."""
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


def test_a_run_after_another_sharing_its_cache_gives_what_it_gives_alone(runs):
    """Issue 21.2: regulatory pretraining baked the split's statistics into an entry whose key left the split out."""
    name, alone, after, _ = runs
    differ = {k: (alone[k], after.get(k)) for k in alone if not _same(alone[k], after.get(k))}
    assert not differ and alone.keys() == after.keys(), (name, differ)


def test_model_and_baseline_are_fit_on_as_many_samples(runs):
    """Issue 21.3: event sequences' baseline and probe and spatial ridge also fit the model's validation samples."""
    name, alone, _, _ = runs
    assert alone["n_train"] > 0 and alone["n_train"] == alone["baseline_n_train"], name


def test_every_workflow_result_has_three_faces(runs):
    """Issue 22: the result a notebook ends with shows as a table, turns into a frame, and is the final metrics."""
    import pandas as pd

    name, alone, _, result = runs
    html = result._repr_html_()
    assert isinstance(html, str) and "<table" in html, name
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and not frame.empty, name
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict, default=float)).keys() <= alone.keys() | {"run"}, name
    assert all(_same(float(as_dict[k]), float(alone[k])) for k in alone if isinstance(alone[k], (int, float))
               and k in as_dict), name
