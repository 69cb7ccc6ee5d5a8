import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.checkpoints import read_state_dict

from .helpers import TinyNet, toy_loader

WORKER = Path(__file__).with_name("resume_worker.py")


def _worker(run_dir, out, *, epochs, freeze_epochs, kill_after=-1, resume=False):
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(WORKER), str(run_dir), str(out), str(epochs), str(freeze_epochs), str(kill_after), "1" if resume else "0"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("freeze_epochs, kill_after", [(0, 1), (2, 1)], ids=["plain", "across-unfreeze"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, freeze_epochs, kill_after):
    epochs = 4
    ref = _worker(tmp_path / "ref_run", tmp_path / "ref", epochs=epochs, freeze_epochs=freeze_epochs)
    assert ref.returncode == 0, ref.stderr
    killed = _worker(tmp_path / "run", tmp_path / "killed", epochs=epochs, freeze_epochs=freeze_epochs, kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = _worker(tmp_path / "run", tmp_path / "resumed", epochs=epochs, freeze_epochs=freeze_epochs, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a = read_state_dict(tmp_path / "ref" / "final.safetensors")
    b = read_state_dict(tmp_path / "resumed" / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    trace_a = json.loads((tmp_path / "ref" / "lr_trace.json").read_text())
    trace_b = json.loads((tmp_path / "resumed" / "lr_trace.json").read_text())
    assert trace_a == trace_b and len(trace_a) == epochs * 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epochs))


def test_a_resume_that_diverges_would_be_caught(tmp_path):
    """The bitwise check is sharp: a different seed gives different weights."""
    torch.manual_seed(0)
    a = TinyNet()
    wb.fit(a, toy_loader(seed=0), epochs=1, lr=0.05, progress=False)
    torch.manual_seed(0)
    b = TinyNet()
    wb.fit(b, toy_loader(seed=1), epochs=1, lr=0.05, progress=False)
    assert not torch.equal(a.head.weight, b.head.weight)


def test_nan_loss_stops_with_message_and_keeps_best_checkpoint(tmp_path):
    run = wb.Run(tmp_path)
    model = TinyNet()

    class PoisonAfterFirstEpoch(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    with pytest.warns(UserWarning, match="loss became nan"):
        history = wb.fit(model, toy_loader(), epochs=5, lr=0.01, run=run, callbacks=[PoisonAfterFirstEpoch()], progress=False, log_every=2)
    assert len(history.rows) == 1 and "best checkpoint" in history.stop_reason and "grad_clip" in history.stop_reason
    best = read_state_dict(run.checkpoints / "best.safetensors")
    assert torch.isfinite(best["head.weight"]).all()


def test_early_stopping_top_k_every_n_and_history_faces(tmp_path):
    run = wb.Run(tmp_path, params={"lr": 0.01})
    history = wb.fit(
        TinyNet(), toy_loader(), val_data=toy_loader(64, seed=3), epochs=30, lr=0.5, optimizer="sgd", patience=2,
        min_delta=10.0, save_top_k=2, save_every=1, run=run, progress=False,
    )
    assert len(history.rows) == 3 and history.stop_reason.startswith("early stopping on val_loss")
    names = sorted(p.name for p in run.checkpoints.glob("*.safetensors"))
    assert names.count("best.safetensors") == 1 and len([n for n in names if n.startswith("top-")]) == 2
    assert {"epoch000.safetensors", "epoch001.safetensors", "epoch002.safetensors"} <= set(names)
    frame = history.to_frame()
    assert {"epoch", "train_loss", "val_loss", "lr_head", "lr_backbone"} <= set(frame.columns)
    assert history.to_dict()["best_epoch"] == frame.attrs["best_epoch"]
    assert "best val_loss" in history._repr_html_()
    logged = run.metrics()
    assert [r["epoch"] for r in logged] == [0, 1, 2]


def test_evaluate_metrics_monitor_and_unknown_monitor_message():
    def evaluate(model, data):
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data)
        return {"val_accuracy": correct / 64}

    history = wb.fit(TinyNet(), toy_loader(), val_data=toy_loader(64, seed=2), evaluate=evaluate, epochs=2, lr=0.05,
                     monitor="val_accuracy", mode="max", patience=5, progress=False)
    assert 0 <= history.rows[-1]["val_accuracy"] <= 1
    with pytest.raises(KeyError, match="val_f1.*not among"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, lr=0.05, monitor="val_f1", patience=1, progress=False)


def test_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    history = wb.fit(TinyNet(), toy_loader(), epochs=3, lr=0.05, amp="bf16", progress=False)
    assert history.rows[-1]["train_loss"] < history.rows[0]["train_loss"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, lr=0.05, amp="fp16", device="cpu", progress=False)


def test_dict_batches_and_loss_fn():
    x = torch.randn(64, 10)
    batches = [{"x": x[i:i + 16], "y": (x[i:i + 16, 0] > 0).long()} for i in range(0, 64, 16)]
    loss_fn = lambda model, b: torch.nn.functional.cross_entropy(model(b["x"]), b["y"])  # noqa: E731
    history = wb.fit(TinyNet(), batches, epochs=2, lr=0.05, loss_fn=loss_fn, progress=False)
    assert history.rows[-1]["step"] == 8
    with pytest.raises(TypeError, match="loss_fn=lambda model, batch"):
        wb.fit(torch.nn.Linear(10, 2), batches, epochs=1, lr=0.1, progress=False)
