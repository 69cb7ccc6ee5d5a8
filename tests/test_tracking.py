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
    wb.fit(TinyNet(), toy_loader(), epochs=2, lr=0.05, backbone_lr_ratio=0.1, run=run, progress=False)
    run.finish({"final": 1.0})
    rows = run.metrics()
    assert rows[0]["lr_backbone"] == pytest.approx(0.1 * rows[0]["lr_head"])
    offline = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert offline, "wandb should have written an offline run into the run folder"
