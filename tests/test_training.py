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


def _worker(run_dir, out, *, epochs, freeze_epochs, kill_after=-1, resume=False, accumulate=1, ema=None):
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(WORKER), str(run_dir), str(out), str(epochs), str(freeze_epochs), str(kill_after),
            "1" if resume else "0", str(accumulate), "none" if ema is None else str(ema)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("freeze_epochs, kill_after, accumulate, ema",
                         [(0, 1, 1, None), (2, 1, 1, None), (2, 1, 2, 0.9)],
                         ids=["plain", "across-unfreeze", "accumulate2-ema"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, freeze_epochs, kill_after, accumulate, ema):
    epochs = 4
    kw = dict(epochs=epochs, freeze_epochs=freeze_epochs, accumulate=accumulate, ema=ema)
    ref = _worker(tmp_path / "ref_run", tmp_path / "ref", **kw)
    assert ref.returncode == 0, ref.stderr
    killed = _worker(tmp_path / "run", tmp_path / "killed", kill_after=kill_after, **kw)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = _worker(tmp_path / "run", tmp_path / "resumed", resume=True, **kw)
    assert resumed.returncode == 0, resumed.stderr
    for name in ["final.safetensors"] + (["ema.safetensors"] if ema else []):
        a = read_state_dict(tmp_path / "ref" / name)
        b = read_state_dict(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    if ema:  # the exported EMA file is the shadow the run ended with
        exported = read_state_dict(tmp_path / "run" / "checkpoints" / "ema.safetensors")
        returned = read_state_dict(tmp_path / "resumed" / "ema.safetensors")
        assert all(torch.equal(exported[k], v) for k, v in returned.items())
    trace_a = json.loads((tmp_path / "ref" / "lr_trace.json").read_text())
    trace_b = json.loads((tmp_path / "resumed" / "lr_trace.json").read_text())
    assert trace_a == trace_b and len(trace_a) == epochs * 8 // accumulate
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epochs))


class StopAfter(wb.Callback):
    """Interrupt fit after an epoch, as a killed process would (last.pt of that epoch is on disk)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def _interrupted_run(path, *, epochs=4, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    run = wb.Run(path, params={"case": "resume"})
    with pytest.raises(KeyboardInterrupt):
        wb.fit(model, toy_loader(), epochs=epochs, learning_rate=0.05, lr_scheduler_type="cosine", run=run,
               callbacks=[StopAfter(1)],
               progress=False, **kwargs)
    return model


def test_a_resume_that_diverges_would_be_caught(tmp_path):
    """The bitwise check is sharp: a real resume on other data gives different weights than the reference."""
    torch.manual_seed(0)
    ref = TinyNet()
    wb.fit(ref, toy_loader(), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine", progress=False)
    _interrupted_run(tmp_path / "run")
    resumed = TinyNet()
    history = wb.fit(resumed, toy_loader(seed=1), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine",
                     run=wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True), resume=True, progress=False)
    assert [r["epoch"] for r in history.rows] == [0, 1, 2, 3]  # it did resume (epochs 0-1 came from last.pt)
    assert not torch.equal(ref.head.weight, resumed.head.weight)


def test_resume_with_changed_settings_is_refused_naming_each(tmp_path):
    """Issue 17 B3: resuming a cosine run with more epochs trained the new epochs at LR 0."""
    _interrupted_run(tmp_path / "run")
    run = wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True)
    with pytest.raises(ValueError) as info:
        wb.fit(TinyNet(), toy_loader(batch_size=16), epochs=8, learning_rate=0.05, lr_scheduler_type="cosine",
               run=run, resume=True,
               progress=False)
    text = str(info.value)
    assert "epochs: 4 saved, 8 now" in text and "batch_size: 32 saved, 16 now" in text
    assert "steps_per_epoch: 8 saved, 16 now" in text and "lr:" not in text


def test_resume_of_an_early_stopped_run_returns_its_history_without_training(tmp_path):
    """Issue 17 B4: should_stop was not saved, so a run stopped by patience trained again on resume."""
    kwargs = dict(val_data=toy_loader(64, seed=3), epochs=30, learning_rate=0.5, optimizer="sgd", patience=2,
                  min_delta=10.0,
                  progress=False)
    torch.manual_seed(0)
    model = TinyNet()
    first = wb.fit(model, toy_loader(), run=wb.Run(tmp_path / "r"), **kwargs)
    assert len(first.rows) == 3 and first.stop_reason
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = wb.fit(model, toy_loader(), run=wb.Run(tmp_path / "r", resume=True), resume=True, **kwargs)
    assert [r["epoch"] for r in again.rows] == [0, 1, 2] and again.stop_reason == first.stop_reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(wb.Run(tmp_path / "r", resume=True).metrics()) == 3


def test_resume_needs_a_run_opened_for_resume(tmp_path):
    _interrupted_run(tmp_path / "run")
    with pytest.raises(ValueError, match="resume=True"):
        wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine",
               run=wb.Run(tmp_path / "run", params={"case": "resume"}),
               resume=True, progress=False)


def test_fit_keeps_the_callers_freezing_by_default(tmp_path):
    """Issue 17 C6: fit always applied strategy='full', undoing freezing done by hand (or by peft)."""
    model = TinyNet()
    model.encoder[0].weight.requires_grad_(False)
    frozen = model.encoder[0].weight.detach().clone()
    wb.fit(model, toy_loader(), epochs=1, learning_rate=0.1, progress=False)
    assert not model.encoder[0].weight.requires_grad
    assert torch.equal(model.encoder[0].weight, frozen)
    assert not torch.equal(model.encoder[0].bias, TinyNet().encoder[0].bias)  # the rest trained
    # freeze_epochs then brings the caller's freezing back, not "full"
    wb.fit(model, toy_loader(), epochs=2, freeze_epochs=1, learning_rate=0.1, progress=False)
    assert not model.encoder[0].weight.requires_grad and model.encoder[0].bias.requires_grad
    # an explicit strategy still applies
    wb.fit(model, toy_loader(), epochs=1, learning_rate=0.1, strategy="full", progress=False)
    assert model.encoder[0].weight.requires_grad


def test_epoch_losses_are_means_over_samples_not_over_batches():
    """Issue 17 D12: a short last batch was weighted like a full one (val_loss 0.5 where the sample mean was 0.01)."""
    x = torch.zeros(33, 1)
    y = torch.zeros(33)
    y[32] = 1.0  # the one sample of the last batch is off by 1; the other 32 are exact
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    model.weight.requires_grad_(False)
    model.bias.requires_grad_(False)
    extra = torch.nn.Linear(1, 1)  # something to train, never used by the loss
    holder = torch.nn.ModuleDict({"net": model, "head": extra})

    def loss_fn(m, batch):
        xb, yb = batch
        return ((m["net"](xb).squeeze(1) - yb) ** 2).mean() + 0 * m["head"].weight.sum()

    history = wb.fit(holder, data, val_data=data, epochs=1, learning_rate=0.0, loss_fn=loss_fn, progress=False)
    assert history.rows[0]["val_loss"] == pytest.approx(1 / 33)
    assert history.rows[0]["train_loss"] == pytest.approx(1 / 33)


def test_nan_loss_stops_with_message_and_keeps_best_checkpoint(tmp_path):
    run = wb.Run(tmp_path)
    model = TinyNet()

    class PoisonAfterFirstEpoch(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    with pytest.warns(UserWarning, match="loss became nan"):
        history = wb.fit(model, toy_loader(), epochs=5, learning_rate=0.01, run=run,
                         callbacks=[PoisonAfterFirstEpoch()], progress=False, log_every=2)
    assert len(history.rows) == 1 and "best checkpoint" in history.stop_reason and "grad_clip" in history.stop_reason
    best = read_state_dict(run.checkpoints / "best.safetensors")
    assert torch.isfinite(best["head.weight"]).all()


def test_early_stopping_top_k_every_n_and_history_faces(tmp_path):
    run = wb.Run(tmp_path, params={"lr": 0.01})
    history = wb.fit(
        TinyNet(), toy_loader(), val_data=toy_loader(64, seed=3), epochs=30, learning_rate=0.5, optimizer="sgd",
        patience=2,
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

    history = wb.fit(TinyNet(), toy_loader(), val_data=toy_loader(64, seed=2), evaluate=evaluate, epochs=2,
                     learning_rate=0.05,
                     monitor="val_accuracy", mode="max", patience=5, progress=False)
    assert 0 <= history.rows[-1]["val_accuracy"] <= 1
    with pytest.raises(KeyError, match="val_f1.*not among"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, learning_rate=0.05, monitor="val_f1", patience=1, progress=False)


def test_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    history = wb.fit(TinyNet(), toy_loader(), epochs=3, learning_rate=0.05, amp="bf16", progress=False)
    assert history.rows[-1]["train_loss"] < history.rows[0]["train_loss"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, learning_rate=0.05, amp="fp16", device="cpu", progress=False)


def test_dict_batches_and_loss_fn():
    x = torch.randn(64, 10)
    batches = [{"x": x[i:i + 16], "y": (x[i:i + 16, 0] > 0).long()} for i in range(0, 64, 16)]
    loss_fn = lambda model, b: torch.nn.functional.cross_entropy(model(b["x"]), b["y"])  # noqa: E731
    history = wb.fit(TinyNet(), batches, epochs=2, learning_rate=0.05, loss_fn=loss_fn, progress=False)
    assert history.rows[-1]["step"] == 8
    with pytest.raises(TypeError, match="loss_fn=lambda model, batch"):
        wb.fit(torch.nn.Linear(10, 2), batches, epochs=1, learning_rate=0.1, progress=False)


def test_a_tie_in_the_monitored_metric_goes_to_the_later_epoch(tmp_path):
    """A small validation set ties often; the later epoch (trained longer) becomes best.safetensors."""
    scores = iter([0.5, 0.8, 0.8, 0.6])

    def evaluate(model, data):
        return {"val_score": next(scores)}

    run = wb.Run(tmp_path)
    history = wb.fit(TinyNet(), toy_loader(), evaluate=evaluate, epochs=4, learning_rate=0.05, monitor="val_score",
                     mode="max",
                     run=run, progress=False)
    assert history.best_epoch == 2
    assert json.loads((run.checkpoints / "best.json").read_text())["epoch"] == 2


def test_best_checkpoint_of_a_peft_model_restores(tmp_path):
    """best.safetensors holds the user's module names, so restore_best works on a peft-wrapped model."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(TinyNet(), peft.LoraConfig(r=2, target_modules=["0"], lora_alpha=2))
    history = wb.fit(model, toy_loader(), val_data=toy_loader(64, seed=3), epochs=3, learning_rate=0.05,
                     run=wb.Run(tmp_path),
                     restore_best=True, progress=False)
    saved = read_state_dict(tmp_path / "checkpoints" / "best.safetensors")
    assert not any(k.startswith("base_model.") for k in saved) and history.best_epoch is not None


def _val_loss(model, loader) -> float:
    """Mean cross-entropy over the samples of ``loader``, recomputed outside fit."""
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in loader]
    return float(sum(losses)) / len(loader.dataset)


def test_restore_best_without_a_run_returns_the_best_epochs_weights():
    """Issue 21 item 1: without a run folder restore_best did nothing: the last epoch's weights came back
    (spatial cross_validate tested every fold that way, while reporting best_epoch)."""
    train = toy_loader(32, seed=5)
    train.dataset.tensors[1][:] = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))  # noise
    val = toy_loader(128, seed=6, shuffle=False)
    torch.manual_seed(0)
    model = TinyNet(n_hidden=64)
    history = wb.fit(model, train, val_data=val, epochs=8, learning_rate=0.05, restore_best=True, progress=False)
    best = history.best_epoch
    assert best < len(history.rows) - 1  # the memorised noise makes later epochs worse: the case that matters
    values = [r["val_loss"] for r in history.rows]
    assert _val_loss(model, val) == pytest.approx(values[best], rel=1e-5)
    assert _val_loss(model, val) != pytest.approx(values[-1], rel=1e-3)


def test_restore_best_in_memory_breaks_a_tie_like_the_history(tmp_path):
    """A tie goes to the later epoch, as in History.best_epoch and ModelCheckpoint."""
    scores = iter([0.5, 0.8, 0.8, 0.3])
    seen = []

    class Keep(wb.Callback):
        def on_validation_end(self, trainer, logs):
            seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    torch.manual_seed(0)
    model = TinyNet()
    history = wb.fit(model, toy_loader(), epochs=4, learning_rate=0.05,
                     evaluate=lambda m, d: {"val_score": next(scores)},
                     monitor="val_score", mode="max", restore_best=True, callbacks=[Keep()], progress=False)
    assert history.best_epoch == 2
    assert all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())


def test_resume_with_another_monitor_or_mode_is_refused_naming_them(tmp_path):
    """Issue 21 item 4: a resume with val_acc/max compared against the saved val_loss 'best' (best epoch 4 in the
    history, best.safetensors from epoch 1)."""
    val = toy_loader(64, seed=3, shuffle=False)

    def accuracy(model, data):
        return {"val_acc": float(sum((model(x).argmax(1) == y).sum() for x, y in data)) / len(data.dataset)}

    _interrupted_run(tmp_path / "run", epochs=6, val_data=val, evaluate=accuracy, patience=3)
    run = wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True)
    for changed, named in [(dict(monitor="val_acc", mode="max"), ["monitor: 'val_loss' saved, 'val_acc' now",
                                                                    "mode: 'min' saved, 'max' now"]),
                           (dict(patience=5, min_delta=0.1), ["patience: 3 saved, 5 now", "min_delta: 0.0 saved"]),
                           (dict(save_top_k=2), ["save_top_k: 1 saved, 2 now"])]:
        kwargs = dict(val_data=val, evaluate=accuracy, patience=3) | changed
        with pytest.raises(ValueError) as info:
            wb.fit(TinyNet(), toy_loader(), epochs=6, learning_rate=0.05, lr_scheduler_type="cosine", run=run,
                   resume=True,
                   progress=False, **kwargs)
        assert all(text in str(info.value) for text in named), str(info.value)


def test_a_last_pt_without_the_callback_settings_still_resumes(tmp_path):
    """A last.pt written before monitor/mode/patience/min_delta/save_top_k were recorded means fit's defaults."""
    from workbench.checkpoints import load_state, save_state

    val = toy_loader(64, seed=3, shuffle=False)
    _interrupted_run(tmp_path / "run", val_data=val)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_state(last)
    for key in ("monitor", "mode", "patience", "min_delta", "save_top_k"):
        del state["settings"][key]
    save_state(state, last)
    history = wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine", val_data=val,
                     run=wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True), resume=True, progress=False)
    assert [r["epoch"] for r in history.rows] == [0, 1, 2, 3]


def test_epoch_loss_is_weighted_by_the_items_a_batch_supervises():
    """Issue 21 item 6: a masked whole-slide batch was weighted by its first tensor's length (all spots), so
    val_loss was not the mean over the validation spots (2.0986 logged, 2.4036 true)."""
    g = torch.Generator().manual_seed(0)
    slides = []
    for n_spots, n_kept in [(50, 2), (10, 9), (30, 5)]:
        mask = torch.zeros(n_spots, dtype=torch.bool)
        mask[:n_kept] = True
        y = torch.randn(n_spots, generator=g) * (1 + n_kept)  # slides differ in their error
        slides.append({"x": torch.zeros(n_spots, 1), "y": y, "mask": mask, "n_items": int(mask.sum())})
    model = torch.nn.ModuleDict({"head": torch.nn.Linear(1, 1)})
    torch.nn.init.zeros_(model["head"].weight)
    torch.nn.init.zeros_(model["head"].bias)

    def loss_fn(m, batch):
        pred = m["head"](batch["x"]).squeeze(1)
        return ((pred - batch["y"])[batch["mask"]] ** 2).mean()

    history = wb.fit(model, slides, val_data=slides, epochs=1, learning_rate=0.0, loss_fn=loss_fn, progress=False)
    squared = torch.cat([(s["y"][s["mask"]]) ** 2 for s in slides])
    assert history.rows[0]["val_loss"] == pytest.approx(squared.mean().item(), rel=1e-6)
    assert history.rows[0]["train_loss"] == pytest.approx(squared.mean().item(), rel=1e-6)


# --------------------------------------------------------------------------- FitSettings (issue 22)


def test_fit_settings_round_trip_and_every_field_is_declared(tmp_path):
    """Each setting is one declared field (help, resume flag); to_dict/from_dict and fit_settings.json round-trip."""
    from dataclasses import fields

    from workbench.training import SETTINGS, FitSettings

    for f in fields(FitSettings):
        assert f.metadata["help"] and "\n" not in f.metadata["help"] and isinstance(f.metadata["resume"], bool), f.name
        assert f".. {f.name}" not in FitSettings.__doc__ and f"    {f.name}\n" in FitSettings.__doc__  # the docs list it
    assert SETTINGS == FitSettings.resume_bound() + ("batch_size", "steps_per_epoch", "world_size")
    assert "learning_rate" in SETTINGS and "lr_scheduler_type" in SETTINGS and "lr" not in SETTINGS
    assert "log_every" not in SETTINGS and "restore_best" not in SETTINGS
    s = FitSettings(epochs=3, learning_rate=0.05, lr_scheduler_type="cosine", strategy=["encoder.0"],
                    dtype=torch.float64, patience=2, ema=0.9)
    assert s.strategy == ("encoder.0",) and s.dtype == "float64"
    assert FitSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="optimizer='lion' is not one of"):
        FitSettings(epochs=1, learning_rate=0.1, optimizer="lion")
    run = wb.Run(tmp_path / "r")
    wb.fit(TinyNet(), toy_loader(), s, strategy="full", dtype=None, run=run, progress=False)
    recorded = json.loads((tmp_path / "r" / "fit_settings.json").read_text())
    # what the run trained with: the keywords beside the settings applied, the default monitor resolved
    assert FitSettings.from_dict(recorded) == FitSettings(**{**s.to_dict(), "strategy": "full", "dtype": None,
                                                             "monitor": "train_loss"})
    assert recorded["steps_per_epoch"] == 8 and recorded["batch_size"] == 32 and recorded["monitor"] == "train_loss"


def test_every_resume_bound_field_is_compared_and_named(tmp_path):
    """The resume check reads the dataclass: another value of any field marked ``resume`` is refused, naming it."""
    from workbench.training import FitSettings, _check_settings, _settings

    other = dict(epochs=5, learning_rate=0.1, optimizer="sgd", weight_decay=0.1, lr_scheduler_type="linear",
                 warmup_ratio=0.1, min_lr_ratio=0.1, strategy="full", freeze_epochs=1, backbone_lr_ratio=0.5,
                 layer_decay=0.5, grad_clip=1.0, amp="bf16", accumulate=2, ema=0.9, ema_eval=True, monitor="val_acc",
                 mode="max",
                 patience=3, min_delta=0.1, save_top_k=2, dtype="float64", seed=1)
    assert set(other) == set(FitSettings.resume_bound()), "give each resume-bound field another value here"
    base = FitSettings(epochs=4, learning_rate=0.05)

    def plain(s):
        return _settings(s, monitor=s.monitor or "train_loss", dtype=wb.devices.resolve_dtype(s.dtype), batch_size=32,
                         steps_per_epoch=8, world_size=1)

    saved = plain(base)
    for name, value in other.items():
        changed = FitSettings(**{**base.to_dict(), name: value, **({"ema": 0.9} if name == "ema_eval" else {})})
        with pytest.raises(ValueError, match=f"{name}: "):
            _check_settings(saved, plain(changed), "last.pt")
    _check_settings(saved, plain(FitSettings(epochs=4, learning_rate=0.05, log_every=2, save_every=1,
                                             restore_best=True, deterministic=True)), "last.pt")  # not bound


def test_a_resume_with_another_learning_rate_or_schedule_is_refused_naming_it(tmp_path):
    """A real resume: learning_rate 0.05 saved, 0.1 asked; lr_scheduler_type cosine saved, linear asked."""
    _interrupted_run(tmp_path / "run")
    run = wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True)
    with pytest.raises(ValueError) as info:
        wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.1, lr_scheduler_type="linear", run=run, resume=True,
               progress=False)
    text = str(info.value)
    assert "learning_rate: 0.05 saved, 0.1 now" in text and "lr_scheduler_type: 'cosine' saved, 'linear' now" in text
    history = wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine", log_every=3,
                     run=run, resume=True, progress=False)  # log_every is not resume-bound
    assert [r["epoch"] for r in history.rows] == [0, 1, 2, 3]


def test_a_last_pt_that_stored_the_old_names_lr_and_schedule_still_resumes(tmp_path):
    """last.pt files written before the rename hold ``lr`` and ``schedule``: they read as the new names."""
    from workbench.checkpoints import load_state, save_state

    _interrupted_run(tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_state(last)
    state["settings"]["lr"] = state["settings"].pop("learning_rate")
    state["settings"]["schedule"] = state["settings"].pop("lr_scheduler_type")
    save_state(state, last)
    run = wb.Run(tmp_path / "run", params={"case": "resume"}, resume=True)
    with pytest.raises(ValueError, match="learning_rate: 0.05 saved, 0.1 now"):
        wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.1, lr_scheduler_type="cosine", run=run, resume=True,
               progress=False)
    history = wb.fit(TinyNet(), toy_loader(), epochs=4, learning_rate=0.05, lr_scheduler_type="cosine", run=run,
                     resume=True, progress=False)
    assert [r["epoch"] for r in history.rows] == [0, 1, 2, 3]


def test_the_old_keywords_lr_and_schedule_warn_and_train_bitwise_the_same():
    def train(**kwargs):
        torch.manual_seed(0)
        model = TinyNet()
        history = wb.fit(model, toy_loader(), epochs=2, warmup_ratio=0.2, progress=False, **kwargs)
        return model, history

    new, new_history = train(learning_rate=0.05, lr_scheduler_type="cosine")
    with pytest.warns(DeprecationWarning) as caught:
        old, old_history = train(lr=0.05, schedule="cosine")
    said = " ".join(str(w.message) for w in caught)
    assert "now called learning_rate" in said and "now called lr_scheduler_type" in said
    assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's line
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())
    assert new_history.lr_trace == old_history.lr_trace
    from workbench.training import FitSettings

    settings = FitSettings(epochs=2, learning_rate=0.05, lr_scheduler_type="cosine", warmup_ratio=0.2)
    torch.manual_seed(0)
    given = TinyNet()
    wb.fit(given, toy_loader(), settings, progress=False)
    assert all(torch.equal(v, given.state_dict()[k]) for k, v in new.state_dict().items())


def test_fit_keyword_mistakes_raise_type_errors_naming_the_fix():
    with pytest.raises(TypeError, match="'learnin_rate'. Did you mean 'learning_rate'"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, learnin_rate=0.1, progress=False)
    with pytest.raises(TypeError, match="'schedul'. Did you mean 'lr_scheduler_type'"):
        wb.fit(TinyNet(), toy_loader(), epochs=1, learning_rate=0.1, schedul="cosine", progress=False)
    with pytest.raises(TypeError, match="both lr= and learning_rate="):
        wb.fit(TinyNet(), toy_loader(), epochs=1, lr=0.1, learning_rate=0.1, progress=False)
    with pytest.raises(TypeError, match="needs learning_rate="):
        wb.fit(TinyNet(), toy_loader(), epochs=1, progress=False)


def test_fit_with_a_run_writes_train_log_one_line_per_epoch(tmp_path):
    """Every workflow's run gets train.log (it was heart_sound's own): settings, schedule, epochs, task lines."""
    run = wb.Run(tmp_path / "r", params={"case": "log"})
    run.log_text("loaded encoder: 4 of 4 tensors")
    wb.fit(TinyNet(), toy_loader(), val_data=toy_loader(64, seed=3), epochs=3, learning_rate=0.05,
           backbone_lr_ratio=0.1, run=run, progress=False)
    lines = (tmp_path / "r" / "train.log").read_text().splitlines()
    assert "loaded encoder: 4 of 4 tensors" in lines[0]
    assert any("fit settings: " in line and '"learning_rate": 0.05' in line for line in lines)
    assert any("lr schedule: constant" in line for line in lines)
    epochs = [line for line in lines if " epoch=" in line]
    assert len(epochs) == 3 and all(f"epoch={i} " in line for i, line in enumerate(epochs))
    assert all("train_loss=" in line and "val_loss=" in line and "lr_head=0.05" in line and "lr_backbone=0.005" in line
               for line in epochs)


def test_the_loop_imports_no_live_plotting():
    """LiveCurves lives in workbench.live: training a model imports neither IPython nor matplotlib."""
    code = ("import sys, workbench as wb; from tests.helpers import TinyNet, toy_loader; "
            "wb.fit(TinyNet(), toy_loader(), epochs=1, learning_rate=0.1, progress=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'matplotlib') "
            "or m in ('workbench.live', 'workbench.plots')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    import ast

    import workbench.training

    tree = ast.parse(Path(workbench.training.__file__).read_text())
    imported = [node.module or "" if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names]
    assert not [m for m in imported if m.split(".")[0] in ("IPython", "matplotlib") or m in ("plots", "live")], imported
    import workbench.live

    assert wb.LiveCurves is workbench.live.LiveCurves
