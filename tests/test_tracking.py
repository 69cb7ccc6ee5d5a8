import json

import pytest

import workbench as wb

from .helpers import TinyNet, toy_loader


def test_run_folder_params_versions_and_final_metrics(tmp_path):
    run = wb.Run(tmp_path / "r", params={"lr": 1e-3, "name": "x"})
    params = json.loads((tmp_path / "r" / "params.json").read_text())
    assert params["lr"] == 1e-3 and "torch" in params["versions"]
    assert run.finish({"acc": 0.5, "n": 3}) == {"acc": 0.5, "n": 3}
    with pytest.raises(TypeError, match="numbers only"):
        run.finish({"label": "cat"})


def test_params_of_keeps_plain_public_values():
    ns = {"lr": 0.1, "name": "a", "_hidden": 1, "In": [], "model": object(), "grid": (1, 2)}
    assert wb.params_of(ns) == {"lr": 0.1, "name": "a", "grid": [1, 2]}


def test_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tracker='tensorboard' is not one of"):
        wb.Run(tmp_path, tracker="tensorboard")


def test_wandb_offline_logs_every_group_lr_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = wb.Run(tmp_path / "w", params={"lr": 0.05}, tracker="wandb")
    model = TinyNet()
    assert run.watch(model, log_freq=1) is True  # gradient histograms go to the (offline) wandb run
    wb.fit(model, toy_loader(), epochs=2, learning_rate=0.05, backbone_lr_ratio=0.1, run=run, progress=False)
    run.finish({"final": 1.0})
    rows = run.metrics()
    assert rows[0]["lr_backbone"] == pytest.approx(0.1 * rows[0]["lr_head"])
    offline = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert offline, "wandb should have written an offline run into the run folder"


def test_a_folder_holding_another_run_is_refused_and_left_intact(tmp_path):
    """Issue 17 A2: a second run into a used folder appended to metrics.jsonl and kept stale files."""
    folder = tmp_path / "r"
    run = wb.Run(folder, params={"seed": 0, "epochs": 4})
    wb.fit(TinyNet(), toy_loader(), epochs=2, learning_rate=0.05, run=run, progress=False)
    run.finish({"acc": 0.5})
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(wb.tracking.RunFolderError) as info:
        wb.Run(folder, params={"seed": 1, "epochs": 4})
    text = str(info.value)
    assert str(folder) in text and "seed: 0 there, 1 now" in text and "overwrite=True" in text and "output_dir" in text
    assert "\n" not in text
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_the_same_run_again_starts_clean_and_overwrite_replaces(tmp_path):
    folder = tmp_path / "r"
    run = wb.Run(folder, params={"seed": 0})
    wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.05, run=run, save_every=1, progress=False)
    (folder / "figures" / "old.png").write_bytes(b"png")
    again = wb.Run(folder, params={"seed": 0})
    assert again.state == "restarted"
    wb.fit(TinyNet(), toy_loader(), epochs=2, learning_rate=0.05, run=again, progress=False)
    assert [r["epoch"] for r in again.metrics()] == [0, 1]
    assert not (folder / "figures" / "old.png").exists()
    assert not (folder / "checkpoints" / "epoch003.safetensors").exists()
    other = wb.Run(folder, params={"seed": 1}, overwrite=True)
    assert other.state == "overwritten" and other.metrics() == []
    assert json.loads((folder / "params.json").read_text())["seed"] == 1


def test_run_files_without_params_are_not_taken_for_a_new_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(wb.tracking.RunFolderError, match="no readable params.json"):
        wb.Run(tmp_path, params={"seed": 0})


def test_empty_output_dir_makes_a_new_dated_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = wb.Run("", params={"seed": 0}), wb.Run(None, params={"seed": 1})
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path.joinpath("runs").relative_to(tmp_path)
    assert (tmp_path / a.path / "params.json").is_file()


def test_versions_name_the_workflows_packages_not_a_fixed_list(tmp_path):
    """Issue 17 E: the core listed scanpy and anndata for every workflow."""
    core = json.loads((wb.Run(tmp_path / "a").path / "params.json").read_text())["versions"]
    assert "anndata" not in core and "torch" in core
    own = json.loads((wb.Run(tmp_path / "b", packages=["anndata"]).path / "params.json").read_text())["versions"]
    assert "anndata" in own


def test_only_rank_0_touches_the_run_folder(tmp_path, monkeypatch):
    """Under torchrun the same code runs on every rank: rank 1 must neither clear nor write rank 0's folder."""
    folder = tmp_path / "r"
    run0 = wb.Run(folder, params={"seed": 0})
    run0.log({"epoch": 0, "train_loss": 1.0})
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.setenv("RANK", "1")
    run1 = wb.Run(folder, params={"seed": 0})  # "same params" would clear the folder on rank 0
    run1.log({"epoch": 0, "train_loss": 2.0})
    run1.finish({"acc": 1.0})
    run1.save_json("x.json", {})
    other = wb.Run(tmp_path / "never", params={"seed": 1})
    assert run1.state == "not written on this rank" and not (tmp_path / "never").exists()
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert other.writes is False


def test_watch_without_wandb_says_so_once_and_returns_false(tmp_path):
    run = wb.Run(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="no tracker can watch"):
        assert run.watch(TinyNet()) is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.watch(TinyNet(), log_freq=10) is False  # said once
    assert (tmp_path / "r" / "train.log").read_text().count("no tracker can watch") == 1
    with pytest.raises(ValueError, match="log='grads' is not one of"):
        run.watch(TinyNet(), log="grads")
