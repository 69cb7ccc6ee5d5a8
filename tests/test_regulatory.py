"""Regulatory workflow: data, model, old checkpoints, LoRA checkpoints, and the notebook under papermill."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.checkpoints import load_state, read_state_dict
from workbench.tasks import regulatory
from workbench.execute import run_workflow

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "regulatory_lora.ipynb"
TINY = {"width": 16, "layers": 1, "heads": 2, "fusion_hidden": 8, "condition_dim": 4}


def write_csv(path, changes=None):
    """A small simulated data set in the CSV layout (3 regions x 6 motifs, 4 source + 2 new conditions)."""
    frame = regulatory.simulate(n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2)
    for (row, column), value in (changes or {}).items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    return regulatory.write_csv(frame, path)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("regulatory") / "tiny.csv")


def test_simulated_csv_loads_with_new_conditions_only_after_pretraining(tiny_csv):
    data = regulatory.load(str(tiny_csv), label_fraction=0.5, val_fraction=0.25, seed=0)
    assert data.regions.shape == (144, 3, 7) and len(data.source_idx) == 96
    assert len(data.train_idx) == 24 and len(data.val_idx) == 12 and len(data.test_idx) == 12
    parts = [data.source_idx, data.train_idx, data.val_idx, data.test_idx]
    assert len(np.unique(np.concatenate(parts))) == 144  # disjoint and complete
    source_media = set(data.conditions["medium"].iloc[data.source_idx])
    source_drugs = set(data.conditions["drug"].iloc[data.source_idx])
    new = data.conditions.iloc[data.test_idx]
    assert "minimal" not in source_media and "rapamycin" not in source_drugs
    assert set(new["medium"]) & {"minimal"} and set(new["drug"]) & {"rapamycin"}
    assert data.vocab["medium"][0] == "<unknown>" and "minimal" in data.vocab["medium"]  # seen in fine-tuning train
    assert data.to_frame().loc["test", "samples"] == 12 and "<table" in data._repr_html_()
    other = regulatory.load(str(tiny_csv), label_fraction=0.5, val_fraction=0.25, seed=1)
    assert not np.array_equal(other.test_idx, data.test_idx)


def test_missing_condition_column_is_named_with_the_expected_ones(tmp_path):
    frame = regulatory.simulate(n_genes=4, n_regions=2, n_motifs=6, n_source_conditions=2, n_new_conditions=2)
    frame.drop(columns="temperature").to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['temperature'\].*\['medium', 'drug', 'carbon_source', "
                                         r"'temperature', 'preculture_h', 'od600', 'drug_conc', 'drug_time_h'\]"):
        regulatory.load(str(tmp_path / "a.csv"))


def test_text_in_a_numeric_column_names_the_row_and_the_column(tmp_path):
    path = write_csv(tmp_path / "a.csv", {(3, "od600"): "high"})
    with pytest.raises(ValueError, match=r"column 'od600' must be numeric, but row 3 holds 'high'"):
        regulatory.load(str(path))


def test_a_missing_target_is_an_error(tmp_path):
    path = write_csv(tmp_path / "a.csv", {(5, "expression"): np.nan})
    with pytest.raises(ValueError, match=r"1 row\(s\) have no 'expression' value \(NaN\), e.g. row 5"):
        regulatory.load(str(path))


def test_the_set_column_ignores_case_and_spaces_and_refuses_other_values(tiny_csv, tmp_path):
    import pandas as pd

    frame = pd.read_csv(tiny_csv)
    frame["set"] = frame["set"].map({"source": " Source", "target": "TARGET "})
    frame.to_csv(tmp_path / "spaced.csv", index=False)
    data = regulatory.load(str(tmp_path / "spaced.csv"), label_fraction=0.5, val_fraction=0.25, seed=0)
    expected = regulatory.load(str(tiny_csv), label_fraction=0.5, val_fraction=0.25, seed=0)
    assert len(data.source_idx) == 96 and np.array_equal(data.source_idx, expected.source_idx)
    assert np.array_equal(data.test_idx, expected.test_idx)

    frame.loc[[2, 7], "set"] = "pretrain"
    frame.to_csv(tmp_path / "typo.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'set' holds 2 value\(s\) that are not one of source, target .*"
                                         r"'pretrain', first in row 2\. Mark the pretraining rows 'source'"):
        regulatory.load(str(tmp_path / "typo.csv"))


def test_unseen_medium_at_predict_time_gets_the_unknown_embedding_and_a_warning_with_a_count(tiny_csv):
    data = regulatory.load(str(tiny_csv), seed=0)
    torch.manual_seed(0)
    model = regulatory.build_model(data, **TINY)
    idx = data.test_idx[:5]
    changed = data.conditions.copy()
    changed.loc[idx[:3], "medium"] = "lb"  # a medium no training row has
    with pytest.warns(UserWarning, match=r"3 sample\(s\) have a medium not seen in training \(\['lb'\]\).*'unknown'"):
        pred = regulatory.predict(model, data, idx, conditions=changed)
    as_unknown = data.conditions.copy()
    as_unknown.loc[idx[:3], "medium"] = "<unknown>"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = regulatory.predict(model, data, idx, conditions=as_unknown)
    np.testing.assert_array_equal(pred, expected)


def test_numeric_statistics_travel_in_the_checkpoint(tiny_csv, tmp_path):
    import workbench as wb

    data = regulatory.load(str(tiny_csv), seed=0)
    model = regulatory.build_model(data, **TINY)
    mean, std = data.numeric_stats()
    assert torch.equal(model.conditions.numeric_mean, torch.from_numpy(mean)) and (std > 0).all()
    path = wb.save_weights(model, tmp_path / "m.safetensors")
    other = regulatory.build_model(regulatory.load(str(tiny_csv), seed=3, label_fraction=0.6), **TINY)
    assert not torch.equal(other.conditions.numeric_mean, model.conditions.numeric_mean)
    wb.load_pretrained(other, path)
    assert torch.equal(other.conditions.numeric_mean, model.conditions.numeric_mean)
    assert torch.equal(other.conditions.numeric_std, model.conditions.numeric_std)


def test_pretraining_is_cached_by_data_rows_and_settings(tiny_csv, tmp_path):
    data = regulatory.load(str(tiny_csv), seed=0)
    settings = {**TINY, "pretrain_epochs": 1}
    first = regulatory.pretrain(data, progress=False, cache_root=tmp_path, **settings)
    stamp = first.stat().st_mtime_ns
    same = regulatory.pretrain(regulatory.load(str(tiny_csv), seed=0), progress=False, cache_root=tmp_path, **settings)
    assert same == first and first.stat().st_mtime_ns == stamp
    assert regulatory.pretrain(data, seed=1, progress=False, cache_root=tmp_path, **settings) != first
    assert regulatory.pretrain(data, progress=False, cache_root=tmp_path, **{**settings, "pretrain_lr": 1e-2}) != first
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["vocab"]["medium"][0] == "<unknown>" and meta["fingerprint"] == first.parent.name


def test_old_pickle_checkpoint_needs_trust_and_its_renamed_keys_are_reported(tiny_csv, tmp_path):
    import argparse

    from workbench.checkpoints import CheckpointError

    data = regulatory.load(str(tiny_csv), seed=0)
    torch.manual_seed(0)
    old = regulatory.build_model(data, **TINY)
    renamed = {}
    for key, tensor in old.state_dict().items():  # how the older code named its weights
        for new, legacy in (("encoder.", "blocks."), ("conditions.", "cond."), ("head.", "expr_head.")):
            if key.startswith(new):
                key = legacy + key[len(new):]
        renamed[key] = tensor
    path = tmp_path / "old.pt"
    torch.save({"state_dict": renamed, "args": argparse.Namespace(width=16)}, path)  # a Python object: pickle
    model = regulatory.build_model(data, **TINY)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        regulatory.load_checkpoint(model, path)
    with pytest.warns(UserWarning, match="trust_pickle=True.*can run any code"):
        report = regulatory.load_checkpoint(model, path, trust_pickle=True)
    assert report.prefix_map == regulatory.LEGACY_KEY_MAP
    assert not report.missing and not report.unexpected and report.loaded_fraction == 1.0
    x = data.encode(data.test_idx, warn=False)[:3]
    model.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(model(*x), old(*x))


def test_lora_run_checkpoints_hold_only_the_trainable_tensors(tiny_csv, tmp_path):
    """Through fit's own checkpointing (best, every N epochs, last.pt), with the base weights kept once beside them."""
    import workbench as wb

    data = regulatory.load(str(tiny_csv), seed=0, label_fraction=0.5, val_fraction=0.25)
    torch.manual_seed(0)
    model = regulatory.build_model(data, **{**TINY, "width": 32})
    full_size = wb.save_weights(model, tmp_path / "full.safetensors").stat().st_size
    base = {k: v.clone() for k, v in model.state_dict().items()}
    run = wb.Run(tmp_path / "run", params={"test": 1})
    wrapped, report = regulatory.prepare(model, method="lora", rank=2, run=run)
    history = regulatory.finetune(wrapped, data, epochs=3, learning_rate=1e-2, save_every=1, run=run, progress=False)
    files = sorted(p.name for p in run.checkpoints.glob("*.safetensors"))
    assert files == ["base.safetensors", "best.safetensors", "epoch000.safetensors", "epoch001.safetensors",
                     "epoch002.safetensors"]
    saved_base = read_state_dict(run.checkpoints / "base.safetensors")
    assert saved_base.keys() == base.keys() and all(torch.equal(saved_base[k], base[k]) for k in base)
    for name in files[1:]:
        size = (run.checkpoints / name).stat().st_size
        assert size < 0.25 * full_size, (name, size, full_size)  # adapters + embeddings, not the frozen base
    resume_state = load_state(run.checkpoints / "last.pt")["model"]
    assert resume_state.keys() == read_state_dict(run.checkpoints / "best.safetensors").keys()
    assert len(run.metrics()) == 3
    # the best epoch's tensors are the model's at the end
    best = read_state_dict(run.checkpoints / "best.safetensors")
    current = dict(wb.unwrap(wrapped).named_parameters())
    assert {k for k, p in current.items() if p.requires_grad} <= set(best)
    assert all(torch.equal(best[k], current[k].detach()) for k in best if k in current)
    assert json.loads((run.checkpoints / "best.json").read_text())["epoch"] == history.best_epoch


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)


def test_notebook_tiny_run_under_papermill_equals_the_in_process_run(tiny_csv, tmp_path, monkeypatch):
    """One papermill run with tiny parameters (the run folder's contract), then the same cells in-process."""
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    params = {"data_path": str(tiny_csv), "epochs": 2, "pretrain_epochs": 1, "label_fraction": 0.5, "lora_rank": 2}
    out = tmp_path / "papermill"
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache_papermill")}
    proc = _cli(["run", str(NOTEBOOK), *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(regulatory.WORKFLOW.headline_metrics) <= set(final) and 0 < final["trainable_fraction"] < 0.2
    predictions = (out / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "row,condition,true,predicted,residual" and len(predictions) == 1 + 19  # 48 new-condition rows: 24 train, 5 val
    per_condition = json.loads((out / "metrics.json").read_text())["per_condition"]
    assert len(per_condition) == 2 and {"pearson", "spearman", "r2", "mse"} <= set(next(iter(per_condition.values())))
    assert {p.name for p in (out / "figures").iterdir()} == {"training_curves.png", "predictions.png",
                                                             "permutation_importance.png"}
    assert (out / "adapters" / "adapter_model.safetensors").exists() and (out / "model_merged.safetensors").exists()
    assert json.loads((out / "trainable.json").read_text())["matched"]
    executed = json.loads((out / "notebook.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    merge_error = float(text.split("max |merged - adapters| = ")[1].split()[0])
    assert merge_error <= 1e-5

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache_in_process"))
    in_process = run_workflow(regulatory.WORKFLOW, {**params, "output_dir": str(tmp_path / "in_process")})
    assert in_process.final == final


def test_permutation_importance_is_zero_for_a_feature_the_model_ignores(tiny_csv):
    data = regulatory.load(str(tiny_csv), seed=0, label_fraction=0.3, val_fraction=0.1)
    torch.manual_seed(0)
    model = regulatory.build_model(data, **TINY)
    with torch.no_grad():
        model.conditions.embeddings["drug"].weight.zero_()  # every drug looks the same to the model
        model.conditions.embeddings["medium"].weight.mul_(50)  # the medium matters a lot (to this untrained model)
    importance = regulatory.permutation_importance(model, data, repeats=2, seed=0).set_index("feature")
    assert list(importance.index).count("drug") == 1 and len(importance) == 8
    assert importance.loc["drug", "importance"] == 0.0 and importance.loc["drug", "std"] == 0.0
    assert abs(importance.loc["medium", "importance"]) > 0.01  # untrained: shuffling it moves the score either way


def test_get_style_zarr_store_reads_back_to_the_same_samples(tmp_path):
    pytest.importorskip("zarr")
    frame = regulatory.simulate(n_genes=10, n_regions=8, n_motifs=6, n_source_conditions=2, n_new_conditions=2)
    store = regulatory.write_zarr(frame, tmp_path / "get.zarr")
    assert (tmp_path / "get.conditions.csv").exists()
    back = regulatory.read_zarr(store)  # windows of 8 peaks from each TSS
    assert sorted(back.columns) == sorted(frame.columns)
    back = back[frame.columns]
    np.testing.assert_allclose(back.drop(columns=["gene", "condition", *regulatory.CATEGORICAL, "set"]).to_numpy(float),
                               frame.drop(columns=["gene", "condition", *regulatory.CATEGORICAL, "set"]).to_numpy(float),
                               rtol=1e-6)
    assert (back[list(regulatory.CATEGORICAL)].fillna("") == frame[list(regulatory.CATEGORICAL)]).all().all()
    data = regulatory.load(str(store), seed=0)
    assert data.regions.shape == (40, 8, 7) and len(data.source_idx) == 20
    assert len(regulatory.read_zarr(store, n_regions=9)) == 4 * 9  # the last gene's window runs off the end
    (tmp_path / "get.conditions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"No condition table for get.zarr.*'celltype' column"):
        regulatory.read_zarr(store)


def test_on_a_rank_other_than_0_evaluation_and_lora_preparation_write_nothing(tiny_csv, tmp_path, monkeypatch):
    """Issue 21.10: under torchrun only rank 0 writes the run folder; predictions.csv was written by every rank."""
    import workbench as wb

    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    data = regulatory.load(str(tiny_csv), seed=0, label_fraction=0.5, val_fraction=0.25)
    torch.manual_seed(0)
    run = wb.Run(tmp_path / "run", params={"test": 1})
    model, _ = regulatory.prepare(regulatory.build_model(data, **TINY), method="lora", rank=2, run=run)
    result = regulatory.evaluate(model, data, run=run)
    assert len(result.predictions) == len(data.test_idx) and result.final["n_train"] == result.final["baseline_n_train"]
    assert not (tmp_path / "run").exists()
