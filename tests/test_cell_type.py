"""Cell-type workflow: the task module in-process, and the notebook under papermill."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.tasks import cell_type

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "cell_type_annotation.ipynb"
WORKBENCH = [sys.executable, "-m", "workbench.cli"]


def write_h5ad(path, *, n_cells=240, n_genes=60, n_classes=4, label_key="celltype", seed=0, nan_labels=0, tiny_class=False):
    """A small AnnData of our own: other gene names, another class count, dense X, no .raw."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_cells)
    centers = rng.normal(0, 1.5, (n_classes, n_genes))
    X = np.log1p(np.clip(centers[y] + rng.normal(0, 1, (n_cells, n_genes)), 0, None) * 3).astype(np.float32)
    labels = pd.Series([f"type_{chr(65 + k)}" for k in y], dtype=object)
    if nan_labels:
        labels.iloc[:nan_labels] = None
    if tiny_class:
        labels.iloc[0] = "singleton"
    obs = pd.DataFrame({label_key: pd.Categorical(labels), "batch": "b1"}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE_{i:03d}" for i in range(n_genes)])
    anndata.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


def test_load_pbmc_keeps_x_sparse_and_splits_stratified():
    data = cell_type.load("", "bulk_labels", test_size=0.2, seed=0)
    assert hasattr(data.X, "toarray") and data.X.shape == (700, 765)
    assert len(data.test_idx) == 140 and len(data.classes) == 10
    assert not set(data.train_idx) & set(data.test_idx)
    few = cell_type.load("", "bulk_labels", label_fraction=0.1, seed=0)
    assert set(few.labelled_idx) <= set(few.train_idx) and set(few.labels[few.labelled_idx]) == set(few.classes)
    assert len(few.labelled_idx) < 0.15 * len(few.train_idx)
    assert "cells" in data.to_dict() and "test" in data.to_frame().columns


def test_bad_inputs_name_the_fix(tmp_path):
    path = write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(KeyError, match=r"label_key='cell_type' is not a column.*\['celltype', 'batch'\]"):
        cell_type.load(str(path), "cell_type")
    nan_path = write_h5ad(tmp_path / "nan.h5ad", nan_labels=3)
    with pytest.raises(ValueError, match=r"3 missing labels.*notna\(\)"):
        cell_type.load(str(nan_path), "celltype")
    tiny = write_h5ad(tmp_path / "tiny.h5ad", tiny_class=True)
    with pytest.raises(ValueError, match=r"singleton"):
        cell_type.load(str(tiny), "celltype")
    with pytest.raises(FileNotFoundError, match="bundled pbmc68k_reduced"):
        cell_type.load(str(tmp_path / "missing.h5ad"), "celltype")


def test_nan_expression_is_refused(tmp_path):
    import anndata

    path = write_h5ad(tmp_path / "a.h5ad")
    adata = anndata.read_h5ad(path)
    adata.X[0, 0] = np.nan
    adata.write_h5ad(path)
    with pytest.raises(ValueError, match="NaN/inf values.*nan_to_num"):
        cell_type.load(str(path), "celltype")


def test_pretraining_checkpoint_loads_into_the_classifier_like_an_external_one(tmp_path):
    import workbench as wb

    data = cell_type.load(str(write_h5ad(tmp_path / "a.h5ad")), "celltype")
    ckpt = cell_type.pretrain(data, output_dir=tmp_path, pretrain_epochs=2, progress=False)
    assert json.loads(ckpt.with_suffix(".json").read_text())["genes"][:2] == ["GENE_000", "GENE_001"]
    model = cell_type.build_model(data)
    report = wb.load_pretrained(model, ckpt, expect_missing=["head.*"])
    assert report.missing == ["head.bias", "head.weight"]
    assert report.unexpected and all(k.startswith("decoder.") for k in report.unexpected)
    assert report.loaded_fraction > 0.9


def _run(args, cwd=ROOT):
    return subprocess.run(WORKBENCH + args, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_notebook_tiny_run_writes_the_run_folder_contract(tmp_path):
    """Headless papermill run on pbmc68k_reduced with 2 epochs and an external checkpoint path."""
    data = cell_type.load("", "bulk_labels", seed=0)
    ckpt = cell_type.pretrain(data, output_dir=tmp_path / "pre", pretrain_epochs=1, progress=False)
    out = tmp_path / "run"
    proc = _run(["run", str(NOTEBOOK), "-p", "epochs", "2", "-p", "pretrained_checkpoint", str(ckpt),
                 "-p", "lr_scheduler_type", "constant", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("test_accuracy", "test_macro_f1", "baseline_test_accuracy", "baseline_test_macro_f1"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["test_accuracy"] > 0.3  # 10 classes: far above chance after 2 epochs
    assert final["baseline_test_accuracy"] > 0.8
    params = json.loads((out / "params.json").read_text())
    assert params["epochs"] == 2 and params["interactive"] is False and "torch" in params["versions"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    report = json.loads((out / "load_report.json").read_text())
    assert report["missing"] == ["head.bias", "head.weight"] and report["loaded_fraction"] > 0.9
    assert (out / "checkpoints" / "best.safetensors").exists() and (out / "checkpoints" / "last.pt").exists()
    assert {p.name for p in (out / "figures").iterdir()} >= {"lr_schedule.png", "training_curves.png", "confusion_matrix.png"}
    assert (out / "notebook.ipynb").exists()


def test_bring_your_own_h5ad_through_the_cli(tmp_path):
    path = write_h5ad(tmp_path / "mine.h5ad", n_classes=4)
    out = tmp_path / "run"
    proc = _run(["run", str(NOTEBOOK), "-p", "data_path", str(path), "-p", "label_key", "celltype",
                 "-p", "epochs", "3", "-p", "batch_size", "64", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_accuracy"] > 0.5  # 4 separable types
    summary = json.loads((out / "params.json").read_text())
    assert summary["data_path"] == str(path)
    assert (out / "pretrained.safetensors").exists()


def test_cli_failure_is_one_readable_message(tmp_path):
    path = write_h5ad(tmp_path / "mine.h5ad")
    proc = _run(["run", str(NOTEBOOK), "-p", "data_path", str(path), "-p", "label_key", "nope",
                 "-p", "epochs", "1", "-o", str(tmp_path / "run")])
    assert proc.returncode != 0
    assert "label_key='nope' is not a column" in proc.stderr and "cell" in proc.stderr.lower()


def test_in_process_and_papermill_give_identical_final_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    from workbench.execute import notebook_parameters

    params = {name: eval(spec["default"]) for name, spec in notebook_parameters(NOTEBOOK).items()}  # noqa: S307
    params.update(epochs=3, pretrained_checkpoint="none", interactive=False, seed=1)
    in_process = cell_type.run_workflow({**params, "output_dir": str(tmp_path / "in_process")})
    proc = _run(["run", str(NOTEBOOK), "-p", "epochs", "3", "-p", "pretrained_checkpoint", "none", "-p", "seed", "1",
                 "-o", str(tmp_path / "papermill")])
    assert proc.returncode == 0, proc.stderr
    a = json.loads((tmp_path / "in_process" / "final_metrics.json").read_text())
    b = json.loads((tmp_path / "papermill" / "final_metrics.json").read_text())
    assert a == b == in_process.final
