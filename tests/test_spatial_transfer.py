"""Spatial transfer workflow: simulation, Visium-style loader, load report, strategies, CV, and the notebook."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

from workbench.tasks import spatial_transfer as st  # noqa: E402
from workbench.execute import run_workflow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "spatial_transfer.ipynb"
TINY = {"hidden": 8, "gat_heads": 2, "d_model": 8, "heads": 2, "ff": 16}
SIM = {"grid": 5, "n_bulk_slides": 3, "n_spatial_slides": 3}


@pytest.fixture(scope="module")
def study():
    return st.load(**SIM)


def test_simulation_follows_the_documented_recipe(study):
    bulk, spatial = study.bulk, study.spatial
    assert bulk.slide_names == ["bulk01", "bulk02", "bulk03"] and spatial.slide_names == ["A1", "B1", "C1"]
    assert bulk.features.shape == (75, 30) and bulk.targets.shape == (75, 250) and spatial.targets.shape == (75, 100)
    assert len(study.shared_genes) == 50 and len(set(bulk.genes) | set(spatial.genes)) == 300
    assert spatial.cells_per_spot.min() >= 5 and spatial.cells_per_spot.max() <= 20
    assert spatial.spot_ids[0] == "A1_x00_y00" and np.isfinite(spatial.targets).all()
    # spatially autocorrelated: neighbouring spots' features agree more than random pairs of the same slide
    idx = spatial.positions("A1")
    x = spatial.features[idx] - spatial.features[idx].mean(0)
    edges = spatial.graph("A1").numpy()
    near = np.mean(np.sum(x[edges[0]] * x[edges[1]], axis=1))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(idx), 500), rng.integers(0, len(idx), 500)
    assert near > 2 * np.mean(np.sum(x[a] * x[b], axis=1))
    # the same world for the same seed; another world for another
    again = st.load(**SIM)
    np.testing.assert_array_equal(again.spatial.targets, spatial.targets)
    assert again.spatial.content_hash == spatial.content_hash
    assert st.load(**SIM, sim_seed=1).spatial.content_hash != spatial.content_hash


def test_visium_h5ad_reads_back_and_bad_inputs_are_named(study, tmp_path, caplog):
    path = st.write_visium(study.spatial, tmp_path / "visium.h5ad", features_key="X_uni")
    data = st.read_visium(path, features_key="X_uni", genes=study.spatial.genes[:3])
    assert data.genes == study.spatial.genes[:3] and data.slide_names == ["A1", "B1", "C1"]
    np.testing.assert_array_equal(data.targets, study.spatial.targets[:, :3])
    np.testing.assert_array_equal(data.features, study.spatial.features)
    with pytest.raises(KeyError, match=r"features_key='X_features' is not in obsm.*\['X_uni', 'spatial'\]"):
        st.read_visium(path)
    with pytest.raises(ValueError, match=r"2 of the 3 requested gene\(s\) are not in visium.h5ad: \['NOPE1', 'NOPE2'\]"):
        st.read_visium(path, features_key="X_uni", genes=f"NOPE1,{study.spatial.genes[0]},NOPE2")

    import anndata

    adata = anndata.read_h5ad(path)
    adata.X[4, 2] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match=r"1 NaN/inf value\(s\) in 1 spot\(s\), e.g. \['A1_x04_y00'\]"):
        st.read_visium(tmp_path / "nan.h5ad", features_key="X_uni")

    adata = anndata.read_h5ad(path)
    adata.obsm["spatial"][0] = [40.0, 40.0]  # far from every other spot
    adata.write_h5ad(tmp_path / "lonely.h5ad")
    with caplog.at_level(logging.WARNING, logger=st.__name__):
        lonely = st.read_visium(tmp_path / "lonely.h5ad", features_key="X_uni")
        edges = lonely.graph("A1")
    assert "1 spot(s) have no neighbour" in caplog.text and "A1_x00_y00" in caplog.text and "self-loops" in caplog.text
    assert not (edges == 0).any()
    model = st.build_model(lonely, **TINY)
    out = model(torch.from_numpy(lonely.features[lonely.positions("A1")]), edges)  # the isolated spot still runs
    assert torch.isfinite(out).all() and out.shape == (25, 100)


def test_cv_splits_by_slide_and_by_spot_and_their_errors(study):
    spatial = study.spatial
    loo = st.cv_splits(spatial, cv="loo", held_out="C1, A1")
    assert [name for name, _, _ in loo] == ["C1", "A1"]
    name, train, test = loo[0]
    assert set(spatial.slides[test]) == {"C1"} and set(spatial.slides[train]) == {"A1", "B1"}
    with pytest.raises(ValueError, match=r"held_out names slide\(s\) \['Z9'\] that do not exist; the slides are "
                                         r"\['A1', 'B1', 'C1'\]"):
        st.cv_splits(spatial, cv="loo", held_out="A1,Z9")
    kfold = st.cv_splits(spatial, cv="kfold", folds=3)
    assert sorted(np.concatenate([t for _, _, t in kfold]).tolist()) == list(range(75))
    with pytest.raises(ValueError, match=r"cv='loco' is not one of \('loo', 'kfold'\)"):
        st.cv_splits(spatial, cv="loco")
    one = st.SpotData(features=spatial.features[:51], targets=spatial.targets[:51], genes=spatial.genes,
                      coords=spatial.coords[:51], slides=spatial.slides[:51], spot_ids=spatial.spot_ids[:51])
    assert one.slide_names == ["A1", "B1", "C1"] and len(one.positions("C1")) == 1
    with pytest.raises(ValueError, match=r"at least 2 spots on every slide, but \['C1'\] hold\(s\) \[1\]"):
        st.cv_splits(one, cv="loo")


def test_load_report_names_the_skipped_output_and_the_unexpected_third_layer(study, tmp_path):
    import workbench as wb

    torch.manual_seed(0)
    bulk = st.build_model(study.bulk, layers=3, **TINY)
    path = wb.save_weights(bulk, tmp_path / "bulk.safetensors")
    model = st.build_model(study.spatial, **TINY)
    report = st.load_report(model, path)
    assert report.mismatched == {"output.weight": ((250, 8), (100, 8)), "output.bias": ((250,), (100,))}
    layer = "encoder.layers.2."
    expected = {"self_attn.in_proj_weight": (24, 8), "self_attn.in_proj_bias": (24,),
                "self_attn.out_proj.weight": (8, 8), "self_attn.out_proj.bias": (8,), "linear1.weight": (16, 8),
                "linear1.bias": (16,), "linear2.weight": (8, 16), "linear2.bias": (8,), "norm1.weight": (8,),
                "norm1.bias": (8,), "norm2.weight": (8,), "norm2.bias": (8,)}
    assert report.unexpected == sorted(layer + k for k in expected) and report.missing == []
    table = st.report_table(report, path)
    unexpected = table[table.status == "unexpected"].set_index("key")["checkpoint_shape"].to_dict()
    assert unexpected == {layer + k: v for k, v in expected.items()}
    assert len(table) == 14 and table.loc[table.key == "output.weight", "params"].item() == 2000
    assert torch.equal(model.gnn.conv.lin.weight, bulk.gnn.conv.lin.weight)
    assert torch.equal(model.encoder.layers[1].linear1.weight, bulk.encoder.layers[1].linear1.weight)


def test_named_strategies_freeze_the_declared_modules_and_freezing_all_is_refused(study):
    import workbench as wb

    model = st.build_model(study.spatial, **TINY)
    assert {"frozen_backbone", "frozen_decoder"} <= set(wb.transfer.available_strategies(model))
    table = st.strategy_table(model)
    assert (table["full"] > 0).all()
    assert table.loc["gnn", "frozen_backbone"] == 0 and table.loc["projection", "frozen_backbone"] == 0
    assert table.loc["encoder", "frozen_backbone"] == table.loc["encoder", "full"] > 0
    assert table.loc["encoder", "frozen_decoder"] == 0 and table.loc["projection", "frozen_decoder"] > 0
    assert table.loc["output", "frozen_decoder"] == table.loc["output", "full"]
    assert all(p.requires_grad for p in model.parameters())  # the table leaves the model unfrozen
    with pytest.raises(ValueError, match="No trainable parameters"):
        wb.apply_strategy(model, ["gnn", "projection", "encoder", "output"])


def test_tensors_the_checkpoint_skipped_stay_trainable_under_every_strategy(study, tmp_path):
    """Issue 21 item 9: spot features 64 wide, the bulk model's 30: the GNN's input weights are skipped for
    their shape, and frozen_backbone must not freeze them at their random initialisation."""
    import dataclasses

    import workbench as wb

    torch.manual_seed(0)
    bulk = st.build_model(study.bulk, layers=3, **TINY)
    path = wb.save_weights(bulk, tmp_path / "bulk.safetensors")
    rng = np.random.default_rng(0)
    spatial = dataclasses.replace(study.spatial, features=rng.normal(size=(len(study.spatial.spot_ids), 64)).astype(np.float32))
    model = st.build_model(spatial, **TINY)
    report = st.load_report(model, path)
    skipped = {"gnn.conv.lin.weight", "gnn.skip.weight"}
    assert skipped <= set(report.mismatched)

    table = st.strategy_table(model)
    n_skipped = sum(p.numel() for n, p in model.named_parameters() if n in skipped)
    assert table.loc["gnn", "frozen_backbone"] == table.loc["gnn", "frozen_decoder"] == n_skipped
    assert table.loc["kept trainable (not loaded)", "frozen_backbone"] == n_skipped
    assert table.loc["kept trainable (not loaded)", "full"] == 0

    freeze = wb.apply_strategy(model, "frozen_backbone")
    assert set(freeze.kept_trainable) == skipped and "shape (8, 30) in the checkpoint, (8, 64) here" in freeze.summary()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(("gnn", "projection"))}
    assert trainable == skipped  # the loaded GNN and projection tensors stay frozen

    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = np.flatnonzero(spatial.slides != spatial.slide_names[-1])
    val = np.flatnonzero(spatial.slides == spatial.slide_names[-1])
    st._fit(model, spatial, train, val, epochs=2, lr=1e-2, patience=0, strategy="frozen_backbone")
    after = model.state_dict()
    assert not torch.equal(before["gnn.skip.weight"], after["gnn.skip.weight"])
    assert not torch.equal(before["gnn.conv.lin.weight"], after["gnn.conv.lin.weight"])
    assert torch.equal(before["gnn.skip.bias"], after["gnn.skip.bias"])
    assert torch.equal(before["projection.0.weight"], after["projection.0.weight"])


def test_pretraining_is_cached_and_cross_validation_writes_each_fold(study, tmp_path):
    import workbench as wb

    settings = {**TINY, "pretrain_epochs": 2}
    first = st.pretrain(study, progress=False, cache_root=tmp_path, **settings)
    stamp = first.stat().st_mtime_ns
    assert st.pretrain(st.load(**SIM), progress=False, cache_root=tmp_path, **settings) == first
    assert first.stat().st_mtime_ns == stamp
    assert st.pretrain(study, seed=1, progress=False, cache_root=tmp_path, **settings) != first
    assert json.loads(first.with_suffix(".json").read_text())["genes"] == study.bulk.genes

    run = wb.Run(tmp_path / "run", params={"test": 1})
    result = st.cross_validate(study, source=first, strategy="frozen_backbone", cv="loo", held_out="A1,B1",
                               epochs=30, patience=2, min_delta=10.0, learning_rate=1e-2, run=run, **TINY)
    assert list(result.per_fold.index) == ["A1", "B1"]
    assert (result.per_fold["epochs_run"] == 3).all()  # min_delta=10: no epoch improves enough, stop after patience
    for fold in ("A1", "B1"):
        folder = run.path / "folds" / fold
        assert (folder / "curves.png").stat().st_size > 0
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test_slides"] == [fold] and {"test_pearson", "test_mean_pearson", "test_mse"} <= set(metrics)
        predictions = (folder / "predictions.csv").read_text().splitlines()
        assert predictions[0] == "spot_id,slide,gene,true,predicted" and len(predictions) == 1 + 25 * 100
        assert predictions[1].startswith(f"{fold}_x00_y00,{fold},{study.spatial.genes[0]},")
    summary = result.summary
    assert summary.loc["test_mean_pearson", "mean"] == pytest.approx(result.per_fold["test_mean_pearson"].mean())
    assert summary.loc["test_mse", "std"] == pytest.approx(result.per_fold["test_mse"].std())
    final = st.evaluate(result, run=run).final
    assert set(st.WORKFLOW.headline_metrics) <= set(final) and final["folds"] == 2
    assert json.loads((run.path / "final_metrics.json").read_text()) == final
    # the three faces (issue 22): html, one row per fold, the final metrics
    assert result.to_dict() == final and result.to_frame().index.tolist() == ["A1", "B1"]
    assert "Per fold" in result._repr_html_() and final["n_train"] == final["baseline_n_train"]


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)


def test_notebook_tiny_run_under_papermill_equals_the_in_process_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    params = {"n_bulk_slides": 3, "n_spatial_slides": 2, "epochs": 2, "pretrain_epochs": 1, "cv": "kfold",
              "folds": 2}
    out = tmp_path / "papermill"
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache_papermill")}
    proc = _cli(["run", str(NOTEBOOK), *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(st.WORKFLOW.headline_metrics) <= set(final) and final["folds"] == 2
    report = json.loads((out / "load_report.json").read_text())
    assert set(report["mismatched"]) == {"output.weight", "output.bias"}
    assert len(report["unexpected"]) == 12 and all(k.startswith("encoder.layers.2.") for k in report["unexpected"])
    assert {p.name for p in (out / "folds").iterdir()} == {"fold0", "fold1"}
    assert {p.name for p in (out / "figures").iterdir()} == {"folds_mean_pearson.png", "cv_summary.png"}

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache_in_process"))
    in_process = run_workflow(st.WORKFLOW, {**params, "output_dir": str(tmp_path / "in_process")})
    assert in_process.final == final


def _masked_mean_error(model, data, scaler, idx) -> tuple[float, int]:
    """Mean squared error (scaled units) over the spots ``idx``, recomputed outside fit; and their number."""
    mask = np.zeros(len(data.spot_ids), bool)
    mask[idx] = True
    model.eval()
    with torch.no_grad():
        per_spot = torch.cat([((model(x, edges) - y)[m] ** 2).mean(1)
                              for x, edges, y, m, *_ in st.SlideBatches(data, scaler, data.slide_names, mask)])
    return per_spot.mean().item(), len(per_spot)


def test_val_loss_is_the_mean_over_validation_spots_and_folds_are_scored_on_the_best_epoch(study):
    """Issue 21 items 6 and 1: a slide batch was weighted by all its spots (val_loss 2.0986 logged, 2.4036 the
    mean over validation spots), and _fit (cross_validate's folds, no run) returned the last epoch's weights."""
    data = study.spatial
    perm = np.random.default_rng(0).permutation(len(data.spot_ids))
    val, train = np.sort(perm[:20]), np.sort(perm[20:])
    torch.manual_seed(0)
    model = st.build_model(data, **TINY)
    history, scaler = st._fit(model, data, train, val, epochs=7, lr=0.1, patience=0)
    best = history.best_epoch
    assert best < len(history.rows) - 1  # later epochs were worse: the weights returned must be the best ones
    error, n_spots = _masked_mean_error(model, data, scaler, val)
    assert n_spots == 20
    assert error == pytest.approx(history.rows[best]["val_loss"], rel=1e-5)


def test_on_a_rank_other_than_0_cross_validation_writes_no_fold_files(study, tmp_path, monkeypatch):
    """Issue 21.10: under torchrun only rank 0 writes the run folder; folds/* were written by every rank."""
    import workbench as wb

    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    run = wb.Run(tmp_path / "run", params={"test": 1})
    assert not run.writes
    result = st.cross_validate(study, strategy="full", cv="loo", held_out="A1", epochs=1, run=run, **TINY)
    assert list(result.per_fold.index) == ["A1"]
    assert not (tmp_path / "run").exists()


def test_slide_batches_shard_by_slide_under_ddp_with_each_slides_supervised_spots(study):
    """Issue 22: SlideBatches had no shard(), so fit under torchrun raised ShardingError for every spatial run."""
    from workbench.distributed import DistContext

    data = study.spatial
    mask = np.zeros(len(data.spot_ids), bool)
    mask[::3] = True  # a third of the spots supervised: n_items counts those, not the slide's spots
    scaler = st.Scaler.fit(data, np.flatnonzero(mask))
    batches = st.SlideBatches(data, scaler, data.slide_names, mask, shuffle=True, seed=3)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(3)).tolist()
    slide_of = {id(b.x): s for s, b in batches.items.items()}
    assert [slide_of[id(b.x)] for b in batches] == [batches.slides[i] for i in order]  # one process: as before

    ranks = [DistContext(enabled=True, rank=r, world_size=2).shard_train(batches, seed=0) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2] and ranks[0].generator is batches.generator
    seen = []
    for r in ranks:  # each rank draws the same order from the same generator state
        batches.generator.manual_seed(3)
        seen.append([slide_of[id(b.x)] for b in r])
    padded = [batches.slides[i] for i in order + order[:1]]
    assert seen == [padded[0::2], padded[1::2]]  # every slide on some rank; the order's start repeats to even out
    for r in ranks:
        for b in r:
            assert b.n_items == int(mask[data.positions(slide_of[id(b.x)])].sum()) < len(b.mask)


def test_workbench_run_nproc_2_trains_the_spatial_notebook_on_two_ranks(tmp_path):
    """Issue 22: `workbench run spatial_transfer.ipynb --nproc 2` stopped in fit with ShardingError (slide batches)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_NUM_THREADS": "1", "WORKBENCH_CACHE": str(tmp_path / "cache"),
           "WORKBENCH_DDP_TIMEOUT_S": "120"}
    params = {"n_bulk_slides": 3, "n_spatial_slides": 3, "epochs": 2, "pretrain_epochs": 1, "cv": "loo",
              "held_out": "A1,B1"}
    proc = _cli(["run", str(NOTEBOOK), "--nproc", "2", "--backend", "gloo",
                 *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["ok"] and status["world_size"] == 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["folds"] == 2 and all(np.isfinite(final[k]) for k in st.WORKFLOW.headline_metrics)
    assert {p.name for p in (out / "folds").iterdir()} == {"A1", "B1"}  # rank 0 alone wrote them
    assert len(list((tmp_path / "cache" / "pretrain").glob("*/pretrained.safetensors"))) == 1  # built once
