"""The training loop, its callbacks and its history.

``fit`` trains any ``nn.Module`` on any iterable of batches (dicts of tensors, padded
sequences, graph batches): the model or the caller supplies how a batch becomes a loss
(``loss_fn(model, batch)``, default ``model.loss(batch)``). The loop itself adds almost
nothing to a hand-written PyTorch loop: the running loss stays on the device and is read back
only every ``log_every`` steps and at the end of an epoch (see ``benchmarks/loop_parity.py``).

At the end of every epoch, when a run folder is given, the loop writes ``checkpoints/last.pt``
(model, optimizer, scheduler, RNG states, epoch, step, callback states, history, whether the run
stopped, and the settings that shape training) atomically, so a run killed at any moment resumes
with ``resume=True`` to the same final weights, bit for bit on the CPU. A resume with other
settings (more epochs, another schedule, batch size, ...) is refused with the list of what
differs: the schedule was planned for the saved settings, and continuing it under new ones
would train at the wrong learning rates. A run that finished or stopped early returns its
history without training again.

The epoch's ``train_loss`` and ``val_loss`` are means over samples: each batch's (mean) loss
is weighted by its number of samples, read from the first dimension of the batch's first
tensor. Where a batch holds no tensor to read it from, every batch counts once.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import load_state, save_state, save_weights
from .schedules import build_scheduler, describe
from .transfer import apply_strategy, param_groups, unwrap

__all__ = [
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "GradualUnfreeze",
    "LiveCurves",
    "History",
    "fit",
    "move_to",
    "early_stop_decision",
    "extra_callbacks",
    "SETTINGS",
]

OPTIMIZERS = ("adamw", "adam", "sgd")

#: The settings that shape training; ``last.pt`` records them and a resume must match them all.
SETTINGS = ("epochs", "schedule", "warmup_ratio", "min_lr_ratio", "optimizer", "lr", "weight_decay", "batch_size",
            "steps_per_epoch", "strategy", "freeze_epochs", "backbone_lr_ratio", "grad_clip", "amp", "seed",
            "world_size")

_EXTRA_CALLBACKS: contextvars.ContextVar[tuple] = contextvars.ContextVar("workbench_extra_callbacks", default=())


@contextlib.contextmanager
def extra_callbacks(callbacks: Sequence[Callback]):
    """Within the block, every :func:`fit` call also runs ``callbacks``.

    This is how a caller that does not write the training code (the widget panel running a
    notebook's cells) draws live curves for it::

        with extra_callbacks([OutputCurves(out)]):
            run_workflow(params)
    """
    token = _EXTRA_CALLBACKS.set(tuple(_EXTRA_CALLBACKS.get()) + tuple(callbacks))
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """What happened during :func:`fit`: one row per epoch plus the per-step LR trace."""

    rows: list[dict] = field(default_factory=list)
    lr_trace: list[list[float]] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    monitor: str = "train_loss"
    mode: str = "min"
    stop_reason: str = ""

    @property
    def best_epoch(self) -> int | None:
        scored = [r for r in self.rows if _finite(r.get(self.monitor))]
        if not scored:
            return None
        sign = 1 if self.mode == "min" else -1
        best = min(sign * r[self.monitor] for r in scored)
        return [r for r in scored if sign * r[self.monitor] == best][-1]["epoch"]  # a tie goes to the later epoch

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame.attrs["best_epoch"] = self.best_epoch
        frame.attrs["monitor"] = self.monitor
        return frame

    def lr_frame(self):
        import pandas as pd

        return pd.DataFrame(self.lr_trace, columns=self.group_names).rename_axis("step")

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "best_epoch": self.best_epoch,
            "monitor": self.monitor,
            "stop_reason": self.stop_reason,
        }

    def summary(self) -> str:
        best = self.best_epoch
        line = f"{len(self.rows)} epochs"
        if best is not None:
            value = next(r[self.monitor] for r in self.rows if r["epoch"] == best)
            line += f"; best {self.monitor}={value:.4g} at epoch {best}"
        return line + (f"; stopped: {self.stop_reason}" if self.stop_reason else "")

    def __repr__(self) -> str:
        return f"History({self.summary()})"

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html(index=False, float_format="{:.4g}".format)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "lr_trace": self.lr_trace, "stop_reason": self.stop_reason}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------- callbacks


class Callback:
    """Hooks named for when they run. Override the ones you need.

    A callback that keeps state implements ``state_dict`` / ``load_state_dict`` with plain
    Python values; the resume state stores it.
    """

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer) -> None: ...

    def on_validation_end(self, trainer: Trainer, logs: dict) -> None:
        """After the epoch's metrics are known, before ``last`` is saved: make decisions here."""

    def on_epoch_end(self, trainer: Trainer, logs: dict) -> None:
        """After the epoch's resume state is on disk."""

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _improved(value: float, best: float | None, *, mode: str, min_delta: float = 0.0) -> bool:
    if not _finite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def early_stop_decision(wait: int, *, patience: int) -> tuple[bool, str]:
    """``(stop, reason)`` after ``wait`` epochs without improvement."""
    if wait >= patience:
        return True, f"no improvement for {wait} epochs (patience={patience})"
    return False, ""


def _check_monitor(monitor: str, logs: dict) -> float:
    if monitor not in logs:
        raise KeyError(
            f"monitor={monitor!r} is not among this epoch's metrics {sorted(logs)}. "
            "Monitor one of those, or pass val_data / evaluate= so that it gets computed."
        )
    return logs[monitor]


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, *, monitor: str = "val_loss", mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0

    def on_validation_end(self, trainer, logs):
        value = _check_monitor(self.monitor, logs)
        if _improved(value, self.best, mode=self.mode, min_delta=self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        stop, reason = early_stop_decision(self.wait, patience=self.patience)
        if stop:
            trainer.stop(f"early stopping on {self.monitor}: {reason}")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]


class ModelCheckpoint(Callback):
    """Keep the best weights by ``monitor`` (``best.safetensors``), the top-k and every N epochs.

    On a tie the later epoch becomes the best one (as in :attr:`History.best_epoch`).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
    ):
        self.directory = Path(directory)
        self.monitor, self.mode = monitor, mode
        self.save_top_k, self.every_n_epochs = save_top_k, every_n_epochs
        self.best: float | None = None
        self.top: list[list] = []  # [score, filename]

    def on_validation_end(self, trainer, logs):
        value = _check_monitor(self.monitor, logs)
        meta = {"epoch": trainer.epoch, "step": trainer.global_step, self.monitor: value}
        # a tie goes to the later epoch: it trained longer, and a small validation set ties often
        if _improved(value, self.best, mode=self.mode) or (_finite(value) and value == self.best):
            self.best = value
            save_weights(trainer.model, self.directory / "best.safetensors", metadata=meta)
        if self.save_top_k > 1 and _finite(value):
            name = f"top-epoch{trainer.epoch:03d}.safetensors"
            save_weights(trainer.model, self.directory / name, metadata=meta)
            self.top.append([value, name])
            self.top.sort(key=lambda t: t[0], reverse=self.mode == "max")
            for _, stale in self.top[self.save_top_k:]:
                (self.directory / stale).unlink(missing_ok=True)
                (self.directory / stale).with_suffix(".json").unlink(missing_ok=True)
            self.top = self.top[: self.save_top_k]
        if self.every_n_epochs and (trainer.epoch + 1) % self.every_n_epochs == 0:
            save_weights(trainer.model, self.directory / f"epoch{trainer.epoch:03d}.safetensors", metadata=meta)

    def state_dict(self):
        return {"best": self.best, "top": self.top}

    def load_state_dict(self, state):
        self.best, self.top = state["best"], [list(t) for t in state["top"]]


class GradualUnfreeze(Callback):
    """Train with ``frozen`` for the first ``epochs`` epochs, then with ``then``.

    ``then`` is any strategy :func:`workbench.apply_strategy` accepts, a list of prefixes
    included. The strategy follows from the epoch number alone, so a resumed run picks the right one.
    """

    def __init__(self, *, epochs: int, frozen="frozen_backbone", then="full"):
        self.epochs, self.frozen, self.then = epochs, frozen, then
        self.current = None

    def on_epoch_start(self, trainer):
        wanted = self.frozen if trainer.epoch < self.epochs else self.then
        if wanted != self.current:
            trainer.freeze_report = apply_strategy(trainer.model, wanted)
            if self.current is not None:
                trainer.log_line(f"epoch {trainer.epoch}: unfroze -> {trainer.freeze_report.summary()}")
            self.current = wanted


class LiveCurves(Callback):
    """Redraw the training curves in the notebook after every epoch; one figure per cell.

    Parameters
    ----------
    enabled
        False makes it inert (headless runs), so a notebook can always pass it.

    The cell ends with ``curves.final(fig)``: the live figure is replaced by the final one (the
    best epoch marked), and nothing is shown twice; when nothing was drawn live, ``final``
    returns ``fig`` for the cell to show.
    """

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled
        self.handle = None

    def on_epoch_end(self, trainer, logs):
        if not self.enabled:
            return
        from .plots import plot_history

        self._show(plot_history(trainer.history))

    def _show(self, fig) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)

    def final(self, fig):
        """Show ``fig`` in place of the live curves; return it when there were none."""
        if self.handle is None:
            return fig
        self.handle.update(fig)
        return None


# --------------------------------------------------------------------------- loop


def move_to(batch, device: torch.device):
    """Move tensors inside nested dicts / lists / tuples (or objects with ``.to``) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def _default_loss(model, batch):
    if not hasattr(model, "loss"):
        raise TypeError(
            f"fit() does not know how {type(model).__name__} turns a batch into a loss. Pass "
            "loss_fn=lambda model, batch: ..., or give the model a `loss(batch)` method."
        )
    return model.loss(batch)


def _rng_state(loader) -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [int(v) for v in keys],
        "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), pos, has_gauss, gauss))
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


class Trainer:
    """The state one :func:`fit` call works on; callbacks receive it."""

    def __init__(self, model, optimizer, scheduler, history, *, device, run, quiet):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.history, self.device, self.run = history, device, run
        self.epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.freeze_report = None
        self._quiet = quiet

    def stop(self, reason: str) -> None:
        self.should_stop = True
        self.history.stop_reason = reason

    def log_line(self, text: str) -> None:
        if not self._quiet:
            from tqdm.auto import tqdm

            tqdm.write(text)


def _build_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9):
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer={name!r} is not one of {OPTIMIZERS}.")


def _autocast(amp, device: torch.device):
    if not amp:
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r} is not one of None, 'bf16', 'fp16'.")
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; on the CPU use amp='bf16'.")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def fit(
    model: nn.Module,
    train_data: Iterable,
    *,
    epochs: int,
    lr: float,
    val_data: Iterable | None = None,
    loss_fn: Callable | None = None,
    evaluate: Callable | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
    strategy: str | Sequence[str] | None = None,
    freeze_epochs: int = 0,
    backbone_lr_ratio: float = 1.0,
    grad_clip: float | None = None,
    amp: str | None = None,
    monitor: str | None = None,
    mode: str = "min",
    patience: int | None = None,
    min_delta: float = 0.0,
    save_top_k: int = 1,
    save_every: int | None = None,
    restore_best: bool = False,
    callbacks: Sequence[Callback] = (),
    run=None,
    resume: bool = False,
    log_every: int = 50,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` on ``train_data`` and return its :class:`History`.

    Parameters
    ----------
    model
        Any ``nn.Module``.
    train_data
        An iterable of batches with a length (a ``DataLoader``); any batch structure.
    epochs, lr
        Number of epochs; base (head) learning rate.
    val_data
        Batches for validation; ``val_loss`` is their mean loss.
    loss_fn
        ``loss_fn(model, batch) -> scalar tensor``; default ``model.loss(batch)``.
    evaluate
        ``evaluate(model, val_data) -> {name: number}``, run in eval mode without gradients
        after every epoch (e.g. ``val_accuracy``); merged with ``val_loss``.
    optimizer, weight_decay
        ``adamw`` | ``adam`` | ``sgd``. Biases, normalisation weights and frozen tensors get no
        weight decay.
    schedule, warmup_ratio, min_lr_ratio
        See :mod:`workbench.schedules`.
    strategy, freeze_epochs
        Freezing strategy (see :func:`workbench.apply_strategy`). None (the default) keeps
        ``requires_grad`` as the caller set it (by hand, or by peft for LoRA). With
        ``freeze_epochs=N`` the backbone is frozen for the first N epochs, then ``strategy``
        applies (None: the caller's freezing comes back).
    backbone_lr_ratio
        Backbone learning rate = ``lr * backbone_lr_ratio``.
    grad_clip
        Clip the global gradient norm to this value.
    amp
        ``None``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with gradient scaling).
    monitor, mode, patience, min_delta
        Metric that picks the best epoch (default ``val_loss`` with validation data, else
        ``train_loss``); ``patience`` enables early stopping.
    save_top_k, save_every, restore_best
        Checkpoints in ``run``'s folder: ``best.safetensors``, the top-k, every N epochs; load
        the best weights back at the end.
    callbacks
        Extra :class:`Callback` objects (besides those of an enclosing :func:`extra_callbacks`).
    run
        A :class:`workbench.Run`: metrics.jsonl per epoch, checkpoints, resume state.
    resume
        Continue from ``run``'s ``checkpoints/last.pt`` when it exists (open the run with
        ``Run(..., resume=True)``). Every setting in :data:`SETTINGS` must equal the saved one.
    log_every
        Steps between reads of the running loss (the only host syncs in the hot loop).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
    if resume and run is None:
        raise ValueError("resume=True needs run= (the run folder that holds checkpoints/last.pt).")
    if resume and not getattr(run, "resume", True):
        raise ValueError(f"resume=True, but {run!r} was opened without resume=True, which cleared what the earlier "
                         "run left. Open it with wb.Run(output_dir, params=..., resume=True).")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loss_fn = loss_fn or _default_loss
    monitor = monitor or ("val_loss" if val_data is not None else "train_loss")
    if seed is not None:
        torch.manual_seed(seed)
    model.to(device)

    # Freeze first, so the table is shown before training; every parameter goes into the optimizer.
    settings = _settings(
        epochs=epochs, schedule=schedule, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, optimizer=optimizer,
        lr=lr, weight_decay=weight_decay, batch_size=getattr(train_data, "batch_size", None),
        steps_per_epoch=len(train_data), strategy=strategy, freeze_epochs=freeze_epochs,
        backbone_lr_ratio=backbone_lr_ratio, grad_clip=grad_clip, amp=amp, seed=seed,
    )
    if strategy is None:  # keep the caller's freezing: name exactly the tensors that are frozen now
        strategy = [name for name, p in unwrap(model).named_parameters() if not p.requires_grad]
    unfreeze = GradualUnfreeze(epochs=freeze_epochs, then=strategy) if freeze_epochs > 0 else None
    freeze_report = apply_strategy(model, "frozen_backbone" if unfreeze else strategy)
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, backbone_lr_ratio=backbone_lr_ratio)
    opt = _build_optimizer(optimizer, groups, lr=lr)
    steps_per_epoch = len(train_data)
    scheduler = build_scheduler(
        opt, schedule, total_steps=max(1, epochs * steps_per_epoch), warmup_ratio=warmup_ratio,
        min_lr_ratio=min_lr_ratio, mode=mode,
    )
    per_step_schedule = schedule != "plateau"
    history = History(group_names=[g["name"] for g in groups], monitor=monitor, mode=mode)
    trainer = Trainer(model, opt, scheduler, history, device=device, run=run, quiet=not progress)
    trainer.freeze_report = freeze_report

    cbs: list[Callback] = [unfreeze] if unfreeze else []
    if patience is not None:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta))
    if run is not None:
        cbs.append(ModelCheckpoint(run.checkpoints, monitor=monitor, mode=mode, save_top_k=save_top_k, every_n_epochs=save_every))
    cbs += list(callbacks) + list(_EXTRA_CALLBACKS.get())

    start_epoch = 0
    last_path = run.checkpoints / "last.pt" if run is not None else None
    finished = False
    if resume and last_path.exists():
        state = load_state(last_path)
        _check_settings(state.get("settings"), settings, last_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved = state["callbacks"]
        for key, cb in _keyed(cbs).items():
            if key in saved:
                cb.load_state_dict(saved[key])
        history.rows, history.lr_trace = state["history"]["rows"], state["history"]["lr_trace"]
        history.stop_reason = state["history"].get("stop_reason", "")
        trainer.global_step = state["global_step"]
        start_epoch = state["epoch"] + 1
        run.rewrite_metrics(history.rows)  # drop rows logged after the state was saved
        _set_rng_state(state["rng"], train_data)
        finished = state["stopped"] or start_epoch >= epochs
        if finished:
            why = f"it stopped: {history.stop_reason}" if state["stopped"] else f"all {epochs} epochs are done"
            trainer.log_line(f"{last_path}: nothing to resume, {why}; returning its history without training")
        else:
            trainer.log_line(f"resumed from {last_path} at epoch {start_epoch}, step {trainer.global_step}")
    if finished:
        _restore_best(model, run, restore_best)
        return history

    trainer.log_line(f"{describe(scheduler)}; {freeze_report.summary()}; device={device}")
    autocast = _autocast(amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    params = [p for g in opt.param_groups for p in g["params"]]
    for cb in cbs:
        cb.on_fit_start(trainer)

    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * steps_per_epoch, initial=trainer.global_step, disable=not progress, desc="fit", leave=True)
    try:
        for epoch in range(start_epoch, epochs):
            trainer.epoch = epoch
            started = time.perf_counter()
            for cb in cbs:
                cb.on_epoch_start(trainer)
            model.train()
            running = torch.zeros((), device=device)
            seen = 0  # samples (or batches, where a batch does not say its size)
            bad_loss = None
            for batch in train_data:
                batch = move_to(batch, device)
                with autocast():
                    loss = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                history.lr_trace.append([g["lr"] for g in opt.param_groups])
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                if per_step_schedule:
                    scheduler.step()
                n = _batch_len(batch)
                running += loss.detach() * n
                seen += n
                trainer.global_step += 1
                bar.update(1)
                if trainer.global_step % log_every == 0:
                    value = running.item() / seen
                    if not math.isfinite(value):
                        bad_loss = value
                        break
                    bar.set_postfix(epoch=epoch, loss=f"{value:.4g}", refresh=False)
            train_loss = running.item() / max(1, seen)
            if bad_loss is not None or not math.isfinite(train_loss):
                where = run.checkpoints / "best.safetensors" if run is not None else "no run folder"
                trainer.stop(
                    f"loss became {train_loss} in epoch {epoch} (step {trainer.global_step}); training stopped. "
                    f"The best checkpoint so far is kept ({where}). Lower the learning rate, add grad_clip=1.0, "
                    "or check the inputs for NaN/inf."
                )
                warnings.warn(history.stop_reason, stacklevel=2)
                break

            logs = {"epoch": epoch, "step": trainer.global_step, "train_loss": train_loss}
            if val_data is not None or evaluate is not None:
                model.eval()
                with torch.no_grad(), autocast():
                    if val_data is not None:
                        logs["val_loss"] = _mean_loss(model, val_data, loss_fn, device)
                    if evaluate is not None:
                        logs.update({k: float(v) for k, v in evaluate(model, val_data).items()})
            logs.update({f"lr_{name}": g["lr"] for name, g in zip(history.group_names, opt.param_groups)})
            logs["time_s"] = time.perf_counter() - started
            if not per_step_schedule:
                scheduler.step(_check_monitor(monitor, logs))
            history.rows.append(logs)
            for cb in cbs:
                cb.on_validation_end(trainer, logs)
            if run is not None:
                run.log(logs)
            if last_path is not None:
                save_state(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "callbacks": {key: cb.state_dict() for key, cb in _keyed(cbs).items()},
                        "history": history.state_dict(),
                        "epoch": epoch,
                        "global_step": trainer.global_step,
                        "rng": _rng_state(train_data),
                        "stopped": trainer.should_stop,
                        "settings": settings,
                    },
                    last_path,
                )
            for cb in cbs:
                cb.on_epoch_end(trainer, logs)
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4g}", **{k: f"{v:.4g}" for k, v in logs.items() if k.startswith("val_")})
            if trainer.should_stop:
                trainer.log_line(history.stop_reason)
                break
    finally:
        bar.close()
    for cb in cbs:
        cb.on_fit_end(trainer)
    _restore_best(model, run, restore_best)
    return history


def _restore_best(model, run, restore_best: bool) -> None:
    best = run.checkpoints / "best.safetensors" if run is not None else None
    if restore_best and best is not None and best.exists():
        from .transfer import load_pretrained

        load_pretrained(model, best)


def _settings(**values) -> dict:
    """The training settings as plain values (what ``last.pt`` stores and a resume compares)."""
    import torch.distributed as dist

    strategy = values["strategy"]
    values["strategy"] = "as set by the caller" if strategy is None else (
        strategy if isinstance(strategy, str) else list(strategy))
    values["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {k: values[k] for k in SETTINGS}


def _check_settings(saved: dict | None, now: dict, path) -> None:
    if saved is None:
        raise ValueError(f"{path} records no training settings (it was written by an older workbench), so a resume "
                         "cannot check that it continues the same run. Start a new run (another output_dir).")
    differ = [f"{k}: {saved.get(k)!r} saved, {now[k]!r} now" for k in SETTINGS if saved.get(k) != now[k]]
    if differ:
        raise ValueError(
            f"Cannot resume {path} with other settings: {'; '.join(differ)}. The saved run's schedule and data order "
            "were planned for its own settings. Resume with the saved values, or start a new run in another "
            "output_dir."
        )


def _batch_len(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor; 1 when it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.ndim:
                return int(item.shape[0])
    return 1


def _keyed(callbacks: Sequence[Callback]) -> dict[str, Callback]:
    """Name callbacks by class (``EarlyStopping``, ``EarlyStopping#2``) so resume matches them by kind."""
    out: dict[str, Callback] = {}
    for cb in callbacks:
        name = type(cb).__name__
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = cb
    return out


def _mean_loss(model, batches, loss_fn, device) -> float:
    """Mean loss per sample over ``batches`` (batch means weighted by batch size)."""
    total = torch.zeros((), device=device)
    n = 0
    for batch in batches:
        size = _batch_len(batch)
        total += loss_fn(model, move_to(batch, device)).detach().float() * size
        n += size
    return total.item() / max(1, n)
