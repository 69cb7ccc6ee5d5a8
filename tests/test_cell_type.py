"""Cell-type workflow: the task module in-process, and the notebook under papermill."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.tasks import cell_type
from workbench.execute import run_workflow

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
    # validation cells: labelled training cells, apart from those fitted on, stratified, test untouched
    assert len(data.val_idx) > 0 and not set(data.val_idx) & set(data.labelled_idx)
    assert set(data.val_idx) <= set(data.train_idx) and not set(data.val_idx) & set(data.test_idx)
    assert abs(len(data.val_idx) - 0.1 * 560) <= 6
    counts = data.to_frame()
    assert (counts["fit (labelled)"].drop("total") >= 1).all()
    none = cell_type.load("", "bulk_labels", val_fraction=0.0)
    assert len(none.val_idx) == 0 and len(none.labelled_idx) == 560
    assert "cells" in data.to_dict() and "test" in data.to_frame().columns


def write_counts_h5ad(path, *, counts_in="raw", n_cells=240, n_genes=60, n_classes=4, seed=0):
    """Integer counts in ``.raw`` with log-normalised X (the common layout), or counts in X and no ``.raw``.

    Returns the path and the log-normalised matrix (normalize_total to 1e4 + log1p) of the counts.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_cells)
    rates = np.exp(rng.normal(0, 1, (n_classes, n_genes)))
    counts = rng.poisson(rates[y] * 3).astype(np.float32)
    counts[:, 0] += 1  # every cell has counts
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"celltype": pd.Categorical([f"type_{k}" for k in y])}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE_{i:03d}" for i in range(n_genes)])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    if counts_in == "raw":
        adata.raw = adata
        adata.X = lognorm
    adata.write_h5ad(path)
    return path, lognorm


@pytest.mark.parametrize("counts_in", ["raw", "X"])
def test_integer_counts_are_log_normalised_with_a_warning_never_used_as_they_are(tmp_path, counts_in):
    """Issue 21 item 17: features='auto' took .raw whenever it existed, counts or not, and X of counts silently."""
    path, lognorm = write_counts_h5ad(tmp_path / "counts.h5ad", counts_in=counts_in)
    where = "adata.raw.X" if counts_in == "raw" else "adata.X"
    with pytest.warns(UserWarning, match=rf"{where} holds integer counts \(whole numbers up to \d+\): normalised here "
                                         r"to 10,000 counts per cell, then log1p"):
        data = cell_type.load(str(path), "celltype", backed="false")
    np.testing.assert_allclose(data.dense(np.arange(240)), lognorm, rtol=1e-5, atol=1e-5)
    assert "normalised here" in data.features and "normalised here" in data.summary()
    with pytest.raises(ValueError, match=r"holds integer counts .* pass backed='false'"):
        cell_type.load(str(path), "celltype", backed="true")
    if counts_in == "raw":  # X is log-normalised already: features='X' takes it without a word
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data_x = cell_type.load(str(path), "celltype", features="X", backed="false")
        np.testing.assert_allclose(data_x.dense(np.arange(240)), lognorm, rtol=1e-6)


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
    ckpt = cell_type.pretrain(data, pretrain_epochs=2, progress=False, cache_root=tmp_path / "cache")
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["genes"][:2] == ["GENE_000", "GENE_001"] and meta["fingerprint"] == ckpt.parent.name
    model = cell_type.build_model(data)
    report = wb.load_pretrained(model, ckpt, expect_missing=["head.*"])
    assert report.missing == ["head.bias", "head.weight"]
    assert report.unexpected and all(k.startswith("decoder.") for k in report.unexpected)
    assert report.loaded_fraction > 0.9


def _with_genes(source, path, order):
    """The same cells as the file at ``source`` with the genes (columns and names) in ``order``."""
    import anndata

    adata = anndata.read_h5ad(source)
    adata[:, order].copy().write_h5ad(path)
    return path


def test_a_checkpoint_meets_the_data_genes_by_name_not_by_position(tmp_path):
    """Issue 21 item 16: an encoder pretrained on one gene order, data with the same genes in another order."""
    import warnings

    import torch

    import workbench as wb

    ordered = cell_type.load(str(write_h5ad(tmp_path / "a.h5ad")), "celltype")
    order = np.random.default_rng(1).permutation(60)
    shuffled = cell_type.load(str(_with_genes(tmp_path / "a.h5ad", tmp_path / "shuffled.h5ad", order)), "celltype")
    assert shuffled.genes != ordered.genes and sorted(shuffled.genes) == sorted(ordered.genes)
    assert np.array_equal(shuffled.test_idx, ordered.test_idx)  # the same cells, the same split

    torch.manual_seed(0)
    trained = cell_type.build_model(ordered, hidden=(16,))
    path = wb.save_weights(trained, tmp_path / "mine.safetensors", metadata={"genes": ordered.genes})
    model = cell_type.build_model(shuffled, hidden=(16,))
    report = cell_type.load_checkpoint(model, shuffled, path)
    expected = cell_type.predict_proba(trained, ordered, ordered.test_idx)
    np.testing.assert_allclose(cell_type.predict_proba(model, shuffled, shuffled.test_idx), expected, atol=1e-5)
    assert report.alignment["matched"] == 60 and report.alignment["reordered"]
    assert report.alignment["only_in_data"] == report.alignment["only_in_checkpoint"] == 0
    assert report.loaded_fraction == 1.0 and not report.partial and "60 genes met by name and reordered" in report.summary()

    # genes on one side only: counted; the data's new genes keep their initialisation and stay trainable
    fewer = cell_type.load(str(_with_genes(tmp_path / "a.h5ad", tmp_path / "fewer.h5ad", order[:57])), "celltype")
    trained_fewer = cell_type.build_model(fewer, hidden=(16,))
    path_fewer = wb.save_weights(trained_fewer, tmp_path / "fewer.safetensors", metadata={"genes": fewer.genes})
    torch.manual_seed(1)
    model = cell_type.build_model(ordered, hidden=(16,))
    init = model.encoder.layers[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sidecar names the genes: no warning
        report = cell_type.load_checkpoint(model, ordered, path_fewer)
    assert {k: report.alignment[k] for k in ("matched", "only_in_data", "only_in_checkpoint")} == \
        {"matched": 57, "only_in_data": 3, "only_in_checkpoint": 0}
    new = [ordered.genes.index(g) for g in report.alignment["first_only_in_data"]]
    assert sorted(new) == sorted(order[57:].tolist())
    weight = model.encoder.layers[0].weight.detach()
    assert torch.equal(weight[:, new], init[:, new])
    common = [ordered.genes.index(g) for g in fewer.genes]
    assert torch.equal(weight[:, common], trained_fewer.encoder.layers[0].weight.detach())
    assert set(report.partial) == {"encoder.layers.0.weight"} and report.loaded_fraction < 1.0
    freeze = wb.apply_strategy(model, "frozen_backbone")
    assert "encoder.layers.0.weight" in freeze.kept_trainable and not model.encoder.layers[0].bias.requires_grad

    # no shared gene: refused, naming both sides; a checkpoint that names no genes loads by position, with a warning
    other = wb.save_weights(trained, tmp_path / "other.safetensors", metadata={"genes": [f"X{i}" for i in range(60)]})
    with pytest.raises(wb.LoadError, match=r"None of the data's 60 genes is among the checkpoint's 60.*GENE_"):
        cell_type.load_checkpoint(cell_type.build_model(ordered, hidden=(16,)), ordered, other)
    bare = wb.save_weights(trained, tmp_path / "bare.safetensors")
    with pytest.warns(UserWarning, match="inputs met by position"):
        report = cell_type.load_checkpoint(cell_type.build_model(shuffled, hidden=(16,)), shuffled, bare)
    assert report.alignment["by"] == "position"


def test_pretraining_is_reused_only_when_data_cells_and_settings_are_equal(tmp_path):
    """Issue 17 A1: pretraining was reused by folder, so seed 1 fine-tuned on seed 0's encoder, which had seen
    most of seed 1's test cells."""
    path = write_h5ad(tmp_path / "a.h5ad")
    cache = tmp_path / "cache"

    def pretrain(data, **kw):
        return cell_type.pretrain(data, pretrain_epochs=1, progress=False, cache_root=cache, **kw)

    seed0 = cell_type.load(str(path), "celltype", seed=0)
    first = pretrain(seed0)
    stamp = first.stat().st_mtime_ns
    again = pretrain(cell_type.load(str(path), "celltype", seed=0, label_fraction=0.5))  # same cells: reused
    assert again == first and first.stat().st_mtime_ns == stamp
    seed1 = cell_type.load(str(path), "celltype", seed=1)
    assert set(seed1.test_idx) & set(seed0.train_idx)  # the leak this prevents
    assert pretrain(seed1) != first
    assert pretrain(seed0, mask_ratio=0.5) != first
    other = write_h5ad(tmp_path / "b.h5ad", seed=5)  # same shape, other values
    assert pretrain(cell_type.load(str(other), "celltype", seed=0)) != first
    assert len(list((cache / "pretrain").glob("*/pretrained.safetensors"))) == 4


def test_pretrain_epochs_reaches_pretraining_and_its_cache_key(tmp_path, monkeypatch):
    """Issue 22: cell type exposes pretrain_epochs like every workflow that pretrains; the notebook's value must be
    the number of epochs pretraining runs, and part of the key (another value never reuses the entry)."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    for n, pretrain_epochs in enumerate((1, 2)):
        namespace = cell_type_notebook(pretrained_checkpoint="pretrain", pretrain_epochs=pretrain_epochs,
                                       output_dir=str(tmp_path / f"run{n}"))
        source = Path(namespace["source"])
        assert json.loads(source.with_suffix(".json").read_text())["pretrain_epochs"] == pretrain_epochs
        epochs = [json.loads(line)["epoch"] for line in (source.parent / "run" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(pretrain_epochs))  # the pretraining run itself: that many epochs
    assert len(list((tmp_path / "cache" / "pretrain").glob("*/pretrained.safetensors"))) == 2


def executed_figures(path) -> tuple[int, int]:
    """(image/png outputs, figures shown only as text) in an executed notebook; no cell shows two figures."""
    cells = json.loads(Path(path).read_text())["cells"]
    per_cell = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in cells]
    assert max(per_cell) <= 1, f"one figure per cell, got {per_cell}"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    text_only = sum("image/png" not in o.get("data", {}) and "<Figure size" in "".join(o.get("data", {}).get("text/plain", ""))
                    for o in outputs)
    return images, text_only


def _run(args, cwd=ROOT, env=None):
    return subprocess.run(WORKBENCH + args, capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def test_two_seeds_into_one_folder_are_refused_and_the_first_run_stays_intact(tmp_path):
    """Issue 17 A: `workbench run` of seed 0, then seed 1 into the same folder."""
    out = tmp_path / "run"
    fast = ["-p", "epochs", "1", "-p", "pretrained_checkpoint", "none", "-o", str(out)]
    assert _run(["run", str(NOTEBOOK), *fast]).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = _run(["run", str(NOTEBOOK), "-p", "seed", "1", *fast])
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and str(out) in message and "seed: 0 there, 1 now" in message
    assert "--overwrite" in message or "overwrite" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same run again (make demo twice) works, and leaves one run's metrics
    assert _run(["run", str(NOTEBOOK), *fast]).returncode == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_notebook_tiny_run_writes_the_run_folder_contract(tmp_path):
    """Headless papermill run on pbmc68k_reduced with 2 epochs and an external checkpoint path."""
    data = cell_type.load("", "bulk_labels", seed=0)
    ckpt = cell_type.pretrain(data, pretrain_epochs=1, progress=False)
    out = tmp_path / "run"
    import os

    env = {**os.environ, "MPLBACKEND": "Agg"}  # as a server or CI shell may export: must not reach the kernel
    proc = _run(["run", str(NOTEBOOK), "-p", "epochs", "2", "-p", "pretrained_checkpoint", str(ckpt),
                 "-p", "lr_scheduler_type", "constant", "-o", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    figures, as_text = executed_figures(out / "notebook.ipynb")
    assert figures >= 3 and as_text == 0, (figures, as_text)  # issue 14: figures were "<Figure size ...>" text
    final = json.loads((out / "final_metrics.json").read_text())
    for key in ("test_accuracy", "test_macro_f1", "baseline_test_accuracy", "baseline_test_macro_f1"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["test_accuracy"] > 0.3  # 10 classes: far above chance after 2 epochs
    assert final["baseline_test_accuracy"] > 0.8
    params = json.loads((out / "params.json").read_text())
    assert params["epochs"] == 2 and params["interactive"] is False and "torch" in params["versions"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    # issue 14: validation cells score every epoch, and the best checkpoint is chosen on them
    assert all({"val_loss", "val_accuracy", "val_macro_f1"} <= set(r) for r in rows)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    top = max(r["val_macro_f1"] for r in rows)
    assert best["epoch"] == [r for r in rows if r["val_macro_f1"] == top][-1]["epoch"] and "val_macro_f1" in best
    report = json.loads((out / "load_report.json").read_text())
    assert report["missing"] == ["head.bias", "head.weight"] and report["loaded_fraction"] > 0.9
    assert (out / "checkpoints" / "best.safetensors").exists() and (out / "checkpoints" / "last.pt").exists()
    assert {p.name for p in (out / "figures").iterdir()} >= {"lr_schedule.png", "training_curves.png", "confusion_matrix.png"}
    assert (out / "notebook.ipynb").exists()


def test_bring_your_own_h5ad_through_the_cli(tmp_path):
    path = write_h5ad(tmp_path / "mine.h5ad", n_classes=4)
    out = tmp_path / "run"
    proc = _run(["run", str(NOTEBOOK), "-p", "data_path", str(path), "-p", "label_key", "celltype",
                 "-p", "epochs", "3", "-p", "batch_size", "64", "-p", "pretrain_epochs", "5", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_accuracy"] > 0.5  # 4 separable types
    summary = json.loads((out / "params.json").read_text())
    assert summary["data_path"] == str(path)
    report = json.loads((out / "load_report.json").read_text())
    source = Path(report["source"])
    assert source.is_file() and source.parent.parent.name == "pretrain"  # the fingerprinted cache entry
    assert report["metadata"]["fingerprint"] == source.parent.name and "genes" not in report["metadata"]


def test_cli_failure_is_one_readable_message(tmp_path):
    path = write_h5ad(tmp_path / "mine.h5ad")
    proc = _run(["run", str(NOTEBOOK), "-p", "data_path", str(path), "-p", "label_key", "nope",
                 "-p", "epochs", "1", "-o", str(tmp_path / "run")])
    assert proc.returncode != 0
    assert "label_key='nope' is not a column" in proc.stderr and "cell" in proc.stderr.lower()


@pytest.mark.parametrize("pretrained_checkpoint", ["none", "pretrain"])
def test_in_process_and_papermill_give_identical_final_metrics(tmp_path, monkeypatch, pretrained_checkpoint):
    """The same notebook cells run in-process (the panel's Train) and under papermill; pretraining included,
    each in a cache of its own so that both really pretrain."""
    import os

    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache_in_process"))
    params = {"epochs": 3, "pretrained_checkpoint": pretrained_checkpoint, "pretrain_epochs": 2, "seed": 1}
    in_process = run_workflow(cell_type.WORKFLOW, {**params, "output_dir": str(tmp_path / "in_process")})
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache_papermill")}
    proc = _run(["run", str(NOTEBOOK), *[x for k, v in params.items() for x in ("-p", k, str(v))],
                 "-o", str(tmp_path / "papermill")], env=env)
    assert proc.returncode == 0, proc.stderr
    a = json.loads((tmp_path / "in_process" / "final_metrics.json").read_text())
    b = json.loads((tmp_path / "papermill" / "final_metrics.json").read_text())
    assert a == b == in_process.final
    if pretrained_checkpoint == "pretrain":
        assert len(list((tmp_path / "cache_papermill" / "pretrain").glob("*/pretrained.safetensors"))) == 1
        assert len(list((tmp_path / "cache_in_process" / "pretrain").glob("*/pretrained.safetensors"))) == 1


def test_run_all_after_changing_the_seed_needs_no_new_output_dir(tmp_path, monkeypatch):
    """Issue 17: the notebook's default output_dir used to be one fixed folder that every run reused."""
    monkeypatch.chdir(tmp_path)
    folders = []
    for seed in (0, 1):
        namespace = cell_type_notebook(seed=seed)
        folders.append(namespace["run"].path)
        assert json.loads((folders[-1] / "params.json").read_text())["seed"] == seed
    assert folders[0] != folders[1] and folders[0].parent == folders[1].parent == Path("runs/cell_type")
    assert len((folders[0] / "metrics.jsonl").read_text().splitlines()) == 1


def cell_type_notebook(**params):
    """The notebook's cells, in this process, with tiny settings (as Run All in JupyterLab runs them)."""
    from workbench.execute import run_in_process

    return run_in_process(NOTEBOOK, parameters={"epochs": 1, "pretrained_checkpoint": "none", **params})
