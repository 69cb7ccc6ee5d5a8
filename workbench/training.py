"""The training loop, its callbacks and its history.

``fit`` trains any ``nn.Module`` on any iterable of batches (dicts of tensors, padded
sequences, graph batches): the model or the caller supplies how a batch becomes a loss
(``loss_fn(model, batch)``, default ``model.loss(batch)``). The loop itself adds almost
nothing to a hand-written PyTorch loop: the running loss stays on the device and is read back
only every ``log_every`` steps and at the end of an epoch (see ``benchmarks/loop_parity.py``).

At the end of every epoch, when a run folder is given, the loop writes ``checkpoints/last.pt``
(model, optimizer, scheduler, RNG states, epoch, step, callback states, history, whether the run
stopped, and the settings that shape training) atomically, so a run killed at any moment resumes
with ``resume=True`` to the same final weights, bit for bit on the CPU (on a GPU only with
``deterministic=True``, and on as many GPUs). A resume with other
settings (more epochs, another schedule, batch size, ...) is refused with the list of what
differs: the schedule was planned for the saved settings, and continuing it under new ones
would train at the wrong learning rates. A run that finished or stopped early returns its
history without training again.

The epoch's ``train_loss`` and ``val_loss`` are means over the items the batches supervise:
each batch's (mean) loss is weighted by its number of items. A batch says that number itself
with an ``n_items`` entry (a dict key, or an attribute such as a NamedTuple field) holding a
Python int, set when the batch is built (e.g. the spots a whole-slide batch's loss mask keeps);
otherwise it is the first dimension of the batch's first tensor, and where a batch holds no
tensor to read it from, every batch counts once.

Validation metrics that are not means over samples (macro-F1, AUROC) are exact under DDP when
``evaluate`` returns :class:`PerSample` (per-sample outputs and the function that scores
them): the outputs of every rank's validation shard are gathered before scoring.

The loop is a few named pieces on :class:`Trainer` (restore, train, train_epoch, train_step,
validate, end_epoch, save_state); the same pieces run in one process and under ``torchrun``,
where ``fit`` trains with DistributedDataParallel (see :mod:`workbench.distributed`).

Techniques that compose with all of the above: gradient accumulation (``accumulate=k``: one
optimizer step per k batches; steps, schedule and logging count optimizer steps; under DDP the
gradients are synchronised on the last micro-batch only), layer-wise LR decay
(``layer_decay``, see :func:`workbench.transfer.param_groups`), an exponential moving average of
the weights (``ema``, ``ema_eval``; see :mod:`workbench.ema`) and the LR range test
(:func:`workbench.lr_find`).

Why this module is long: the loop, its settings (:class:`FitSettings`), its callbacks and the state it saves and
restores must agree on every setting (a resume is bitwise only if the saved state, the settings check and the loop read
the same fields), so they live and are tested together; the callbacks are small classes over the same hooks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import CheckpointError, load_state, save_state, save_weights
from .devices import cuda_rng_states_for, resolve_dtype, set_deterministic, to_device, to_numpy
from .distributed import DistContext, PerRank, set_epoch
from .distributed import context as dist_context
from .ema import ModelEMA
from .schedules import build_scheduler, describe
from .transfer import apply_strategy, param_groups, unwrap

__all__ = [
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "GradualUnfreeze",
    "History",
    "FitSettings",
    "fit",
    "move_to",
    "early_stop_decision",
    "extra_callbacks",
    "SETTINGS",
    "PerSample",
]

OPTIMIZERS = ("adamw", "adam", "sgd")


def _setting(default=None, *, help: str, resume: bool, required: bool = False):
    """A :class:`FitSettings` field: its default, a one-line help and whether a resume must match it."""
    meta = {"help": help, "resume": resume}
    return field(metadata=meta) if required else field(default=default, metadata=meta)


@dataclass(frozen=True)
class FitSettings:
    """The settings of one :func:`fit` call, declared once.

    ``fit(model, data, epochs=3, learning_rate=1e-3)`` builds one from its keywords;
    ``fit(model, data, settings)`` takes one, and keywords given beside it replace its fields
    (``dataclasses.replace``). Each field's metadata holds its one-line ``help`` and ``resume``:
    whether a resume (``fit(..., resume=True)``) must use the value ``last.pt`` saved. The
    resume check, the run's ``fit_settings.json`` and this page read the fields, so a setting
    is added in one place. The values are plain (JSON-able): ``to_dict`` / ``from_dict`` round-trip.

    The names are the notebooks' (``learning_rate``, ``lr_scheduler_type``); see :func:`fit` for
    what the settings do together.
    """

    epochs: int = _setting(help="Number of epochs (>= 1).", resume=True, required=True)
    learning_rate: float = _setting(help="Base (head) learning rate.", resume=True, required=True)
    optimizer: str = _setting("adamw", help="adamw | adam | sgd.", resume=True)
    weight_decay: float = _setting(0.0, help="Weight decay (none for biases, norms and frozen tensors).", resume=True)
    lr_scheduler_type: str = _setting("constant", help="LR schedule, one of workbench.schedules.SCHEDULES.",
                                      resume=True)
    warmup_ratio: float = _setting(0.0, help="Share of the steps spent warming up the LR.", resume=True)
    min_lr_ratio: float = _setting(0.0, help="Lowest LR of a decaying schedule, as a share of the base LR.",
                                   resume=True)
    strategy: str | tuple[str, ...] | None = _setting(
        None, help="Freezing strategy (workbench.apply_strategy); None keeps the caller's requires_grad.", resume=True)
    freeze_epochs: int = _setting(0, help="Epochs with the backbone frozen before strategy applies.", resume=True)
    backbone_lr_ratio: float = _setting(1.0, help="Backbone LR as a multiple of learning_rate.", resume=True)
    layer_decay: float | None = _setting(None, help="Layer-wise LR decay of the backbone (e.g. 0.75).", resume=True)
    grad_clip: float | None = _setting(None, help="Clip the global gradient norm to this value.", resume=True)
    amp: str | None = _setting(None, help="Mixed precision: None, 'bf16' or 'fp16' (CUDA).", resume=True)
    accumulate: int = _setting(1, help="Batches per optimizer step (gradient accumulation).", resume=True)
    ema: float | None = _setting(None, help="Decay of an exponential moving average of the weights (e.g. 0.999).",
                                 resume=True)
    ema_eval: bool = _setting(False, help="Validate, checkpoint and return the EMA weights.", resume=True)
    monitor: str | None = _setting(None, help="Metric that picks the best epoch (None: val_loss, else train_loss).",
                                   resume=True)
    mode: str = _setting("min", help="'min' or 'max': which way monitor improves.", resume=True)
    patience: int | None = _setting(None, help="Epochs without improvement before early stopping (None: never).",
                                    resume=True)
    min_delta: float = _setting(0.0, help="Smallest change of monitor that counts as an improvement.", resume=True)
    save_top_k: int = _setting(1, help="Checkpoints of the k best epochs kept in the run folder.", resume=True)
    save_every: int | None = _setting(None, help="Also checkpoint every N epochs.", resume=False)
    restore_best: bool = _setting(False, help="Load the best epoch's weights back at the end.", resume=False)
    log_every: int = _setting(50, help="Steps between reads of the running loss (the hot loop's only host syncs).",
                              resume=False)
    dtype: str | None = _setting(None, help="Cast the model and every batch's floating tensors to it ('float64').",
                                 resume=True)
    deterministic: bool = _setting(False, help="Ask torch for deterministic kernels (GPU reproducibility).",
                                   resume=False)
    seed: int | None = _setting(None, help="Seeds torch before training (and the DDP sampler).", resume=True)

    def __post_init__(self):
        if isinstance(self.strategy, (list, tuple)):  # plain and hashable: a list of prefixes becomes a tuple
            object.__setattr__(self, "strategy", tuple(self.strategy))
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        _check_args(epochs=self.epochs, optimizer=self.optimizer, accumulate=self.accumulate, ema=self.ema,
                    ema_eval=self.ema_eval)

    def to_dict(self) -> dict:
        """The fields as plain values (a strategy's prefixes as a list)."""
        out = asdict(self)
        if isinstance(out["strategy"], tuple):
            out["strategy"] = list(out["strategy"])
        return out

    @classmethod
    def from_dict(cls, values: dict) -> FitSettings:
        """The settings ``values`` holds (:meth:`to_dict`, or a run's ``fit_settings.json``: its derived
        ``batch_size``, ``steps_per_epoch``, ``world_size`` and ``device`` are left out)."""
        return cls(**{k: v for k, v in values.items() if k not in _DERIVED})

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: one-line help}``."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def resume_bound(cls) -> tuple[str, ...]:
        """The fields a resume must match."""
        return tuple(f.name for f in fields(cls) if f.metadata["resume"])


def _fields_doc() -> str:
    lines = ["", "    Parameters", "    ----------"]
    for f in fields(FitSettings):
        default = "required" if f.default is MISSING else f"default ``{f.default!r}``"
        bound = "; a resume must match it" if f.metadata["resume"] else ""
        lines += [f"    {f.name}", f"        {f.metadata['help']} ({default}{bound})"]
    return "\n".join(lines) + "\n"


FitSettings.__doc__ += _fields_doc()

#: What fit's ``fit_settings.json`` and ``last.pt`` record beside the fields: they follow from the data and the run.
_DERIVED = ("batch_size", "steps_per_epoch", "world_size", "device")

#: The settings that shape training; ``last.pt`` records them and a resume must match them all: the
#: :class:`FitSettings` fields with ``resume`` in their metadata, plus what follows from the data and the
#: processes (batch size, steps per epoch, world size). Derived from the dataclass.
SETTINGS = FitSettings.resume_bound() + ("batch_size", "steps_per_epoch", "world_size")

#: What a setting added after a ``last.pt`` was written meant before it existed (so the old state still resumes).
#: ``monitor`` has no fixed default: before it was recorded it was ``val_loss`` when the run validated, else
#: ``train_loss`` (read from the saved history, see :func:`_saved_setting`).
_SETTING_DEFAULTS = {"accumulate": 1, "layer_decay": None, "ema": None, "ema_eval": False,
                     "mode": "min", "patience": None, "min_delta": 0.0, "save_top_k": 1, "dtype": None}

#: Settings renamed to the notebooks' names: ``fit`` still takes the old keywords (with a DeprecationWarning) and a
#: ``last.pt`` that stored the old name still resumes.
RENAMED = {"lr": "learning_rate", "schedule": "lr_scheduler_type"}

_EXTRA_CALLBACKS: contextvars.ContextVar[tuple] = contextvars.ContextVar("workbench_extra_callbacks", default=())


@contextlib.contextmanager
def extra_callbacks(callbacks: Sequence[Callback]):
    """Within the block, every :func:`fit` call also runs ``callbacks``.

    This is how a caller that does not write the training code (the widget panel running a
    notebook's cells) draws live curves for it::

        with extra_callbacks([OutputCurves(out)]):
            workflow.run(params)
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
    #: With ``fit(ema=...)``: the EMA (shadow) weights at the end, a state dict (also ``checkpoints/ema.safetensors``).
    ema_weights: dict | None = field(default=None, repr=False)

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
        if not trainer.is_main:  # under DDP, rank 0 alone writes the run folder
            return
        value = _check_monitor(self.monitor, logs)
        meta = {"epoch": trainer.epoch, "step": trainer.global_step, self.monitor: value}
        # a tie goes to the later epoch: it trained longer, and a small validation set ties often
        if _improved(value, self.best, mode=self.mode) or (_finite(value) and value == self.best):
            self.best = value
            save_weights(trainer.model_state(), self.directory / "best.safetensors", metadata=meta)
        if self.save_top_k > 1 and _finite(value):
            name = f"top-epoch{trainer.epoch:03d}.safetensors"
            save_weights(trainer.model_state(), self.directory / name, metadata=meta)
            self.top.append([value, name])
            self.top.sort(key=lambda t: t[0], reverse=self.mode == "max")
            for _, stale in self.top[self.save_top_k:]:
                (self.directory / stale).unlink(missing_ok=True)
                (self.directory / stale).with_suffix(".json").unlink(missing_ok=True)
            self.top = self.top[: self.save_top_k]
        if self.every_n_epochs and (trainer.epoch + 1) % self.every_n_epochs == 0:
            save_weights(trainer.model_state(), self.directory / f"epoch{trainer.epoch:03d}.safetensors", metadata=meta)

    def state_dict(self):
        return {"best": self.best, "top": self.top}

    def load_state_dict(self, state):
        self.best, self.top = state["best"], [list(t) for t in state["top"]]


class _BestInMemory(Callback):
    """``fit(restore_best=True)`` without a run folder: a CPU copy of the best epoch's weights.

    The same rule as :class:`ModelCheckpoint` and :attr:`History.best_epoch`: the copy is taken
    when ``monitor`` improves, and on a tie the later epoch wins.
    """

    def __init__(self, *, monitor: str, mode: str):
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.state: dict | None = None

    def on_validation_end(self, trainer, logs):
        value = _check_monitor(self.monitor, logs)
        if _improved(value, self.best, mode=self.mode) or (_finite(value) and value == self.best):
            self.best = value
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}


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


# --------------------------------------------------------------------------- loop


class PerSample:
    """What an ``evaluate`` callback returns for metrics that are not means over samples.

    ``evaluate(model, val_data)`` may return ``{name: number}``; under DDP those numbers are
    averaged over the ranks (weighted by their samples), which is exact for a mean (accuracy, a
    loss) but not for macro-F1 or AUROC. It may instead return ``PerSample(score, **arrays)``:
    per-sample outputs (arrays whose first dimension is the sample) and the function that turns
    them into metrics. :func:`fit` concatenates every rank's arrays (in rank order; the
    validation shards hold each sample once) and calls ``score(**arrays) -> {name: number}``, so a
    metric is computed on the whole validation set with 1 or N processes::

        def evaluate(model, batches):
            pred = torch.cat([model(x).argmax(1) for x, _ in batches])
            truth = torch.cat([y for _, y in batches])
            return PerSample(macro_f1_of, truth=truth.numpy(), pred=pred.numpy())

    Parameters
    ----------
    score
        ``score(**arrays) -> {name: number}``.
    **arrays
        Per-sample outputs of this process's validation batches (numpy arrays or tensors).
    """

    def __init__(self, score: Callable[..., dict], **arrays):
        self.score = score
        self.arrays = {k: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)
                       for k, v in arrays.items()}

    def scored(self, dist: DistContext | None = None, *, gather: bool = False) -> dict[str, float]:
        """The metrics, over every rank's samples when ``gather`` (under DDP with sharded validation data)."""
        arrays = self.arrays
        if gather and dist is not None and dist.enabled:
            every = dist.gather_objects(arrays)
            arrays = {k: np.concatenate([part[k] for part in every]) for k in arrays}
        return {k: float(v) for k, v in self.score(**arrays).items()}


def move_to(batch, device: torch.device, dtype: torch.dtype | None = None):
    """Move tensors inside nested dicts / lists / tuples (or objects with ``.to``) to ``device``.

    The same as :func:`workbench.devices.to_device` (the one device path); floating tensors are cast to ``dtype``
    when it is given.
    """
    return to_device(batch, device, dtype)


class _OnDevice:
    """``data``'s batches moved to ``device`` (and ``dtype``) as they are drawn; other attributes are ``data``'s.

    What :func:`fit` hands to ``evaluate``, so a task's metrics run on the model's device.
    """

    def __init__(self, data, device, dtype):
        self.data, self.device, self.dtype = data, device, dtype

    def __iter__(self):
        for batch in self.data:
            yield to_device(batch, self.device, self.dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name):
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)


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
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per visible GPU
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
        states, note = cuda_rng_states_for(state["cuda"], torch.cuda.device_count())
        if note:
            warnings.warn(note, RuntimeWarning, stacklevel=3)
        for index, cuda_state in enumerate(states):
            torch.cuda.set_rng_state(cuda_state, index)
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module's forward, so that DDP's forward sees the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class Trainer:
    """The state one :func:`fit` call works on, and the named pieces of its loop; callbacks receive it.

    The pieces, in the order :func:`fit` calls them: :meth:`restore` (resume state),
    :meth:`train` (all epochs), :meth:`train_epoch`, :meth:`train_step`, :meth:`validate`,
    :meth:`end_epoch` (logs, callbacks, :meth:`save_state`). The same pieces serve one process
    and many: the collectives of :class:`workbench.distributed.DistContext` are no-ops in one process.

    Attributes
    ----------
    model
        The caller's module (never the DDP wrapper).
    epoch, global_step
        Where training is.
    is_main
        True on the process that writes the run folder (rank 0, or the only process).
    """

    def __init__(self, model, optimizer, scheduler, history, *, device, run, quiet, dist=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.history, self.device, self.run = history, device, run
        self.dist = dist or DistContext()
        self.epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.freeze_report = None
        self._quiet = quiet or not self.dist.is_main
        self.callbacks: list[Callback] = []
        self.settings: dict = {}
        self.loss_fn: Callable = _default_loss
        self.autocast = contextlib.nullcontext
        self.scaler = None
        self.dtype: torch.dtype | None = None  # batches' floating tensors are cast to it (fit(dtype=...))
        self.grad_clip: float | None = None
        self.log_every = 50
        self.last_path: Path | None = None
        self.forward_loss: Callable = None  # loss_fn on the model, or through its DDP wrapper
        self._params: list[torch.Tensor] = []  # what grad_clip clips
        self._per_step_schedule = True
        self._wrapped_for: tuple | None = None
        self._bar = None
        self.accumulate = 1  # batches per optimizer step
        self.ema: ModelEMA | None = None
        self.ema_eval = False
        self._ddp = None  # the DDP wrapper, for no_sync on the micro-batches that do not step
        self.val_sharded = False  # under DDP: each rank validates its own share (PerSample outputs are gathered)
        self.best_in_memory: _BestInMemory | None = None  # restore_best without a run folder (rank 0)
        self.state_fn: Callable | None = None  # what checkpoints hold of the model (fit's state_fn)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def stop(self, reason: str) -> None:
        self.should_stop = True
        self.history.stop_reason = reason

    def log_line(self, text: str) -> None:
        """A message of the loop: shown (unless quiet) and written to the run's ``train.log``."""
        if not self._quiet:
            from tqdm.auto import tqdm

            tqdm.write(text)
        if self.run is not None:
            self.run.log_text(text)

    def where(self) -> str:
        return f"epoch {self.epoch}, step {self.global_step}"

    # ---- state save and restore
    def model_state(self) -> dict:
        """What checkpoints hold of the model: every tensor, or ``state_fn(model)`` (a LoRA run's trainable ones)."""
        return unwrap(self.model).state_dict() if self.state_fn is None else self.state_fn(self.model)

    def state_dict(self, train_data) -> dict:
        """Everything a resume needs (rank 0's model, optimizer, ...; every rank's RNG states)."""
        rng = self.dist.gather_objects(_rng_state(train_data))
        return {
            "model": self.model.state_dict() if self.state_fn is None else self.state_fn(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": {key: cb.state_dict() for key, cb in _keyed(self.callbacks).items()},
            "history": self.history.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "rng": rng[0],
            **({"rng_ranks": rng} if self.dist.enabled else {}),
            "stopped": self.should_stop,
            "settings": self.settings,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def save_state(self, train_data) -> None:
        """Write ``last.pt`` on rank 0; every rank waits until it is on disk."""
        if self.last_path is None and not self.dist.enabled:
            return
        state = self.state_dict(train_data)
        if self.last_path is not None:
            save_state(state, self.last_path)
            if self.ema is not None:
                save_weights(self.ema.shadow, self.last_path.with_name("ema.safetensors"),
                             metadata={"epoch": self.epoch, "step": self.global_step, "ema_decay": self.ema.decay})
        self.dist.barrier()

    def restore(self, *, resume: bool, train_data, epochs: int) -> tuple[int, bool]:
        """Load ``last.pt`` (rank 0 reads it, every rank gets it); ``(first epoch, finished)``."""
        payload = None
        if self.is_main and resume and self.last_path is not None and self.last_path.exists():
            try:
                state = load_state(self.last_path)
                _check_settings(state.get("settings"), self.settings, self.last_path,
                                rows=state.get("history", {}).get("rows", []))
                payload = {"state": state}
            except (ValueError, CheckpointError) as err:
                payload = {"error": err}
        payload = self.dist.broadcast_object(payload)
        if payload is None:
            return 0, False
        if "error" in payload:
            raise payload["error"]
        state = payload["state"]
        self.load_state_dict(state, train_data)
        start_epoch = state["epoch"] + 1
        finished = state["stopped"] or start_epoch >= epochs
        if finished:
            why = f"it stopped: {self.history.stop_reason}" if state["stopped"] else f"all {epochs} epochs are done"
            self.log_line(f"{self.last_path}: nothing to resume, {why}; returning its history without training")
        else:
            self.log_line(f"resumed from {self.last_path} at epoch {start_epoch}, step {self.global_step}")
        return start_epoch, finished

    def load_state_dict(self, state: dict, train_data) -> None:
        if self.state_fn is None:
            self.model.load_state_dict(state["model"])
        else:
            _load_part(self.model, state["model"], self.state_fn, self.last_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved = state["callbacks"]
        for key, cb in _keyed(self.callbacks).items():
            if key in saved:
                cb.load_state_dict(saved[key])
        self.history.rows, self.history.lr_trace = state["history"]["rows"], state["history"]["lr_trace"]
        self.history.stop_reason = state["history"].get("stop_reason", "")
        self.global_step = state["global_step"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:  # fp16: the loss scale goes on where it was
            self.scaler.load_state_dict(state["scaler"])
        if self.run is not None:
            self.run.rewrite_metrics(self.history.rows)  # drop rows logged after the state was saved
        _set_rng_state(state["rng_ranks"][self.dist.rank] if "rng_ranks" in state else state["rng"], train_data)

    # ---- the loop
    def train(self, train_data, val_data, evaluate, *, start_epoch: int, epochs: int, progress: bool) -> None:
        """Epochs ``start_epoch .. epochs - 1``, until done or stopped."""
        from tqdm.auto import tqdm

        for cb in self.callbacks:
            cb.on_fit_start(self)
        self._bar = tqdm(total=epochs * self.settings["steps_per_epoch"], initial=self.global_step, desc="fit",
                         leave=True, disable=not progress or not self.is_main)
        try:
            for epoch in range(start_epoch, epochs):
                self.epoch = epoch
                started = time.perf_counter()
                train_loss = self.train_epoch(train_data)
                if train_loss is None:
                    break
                logs = {"epoch": epoch, "step": self.global_step, "train_loss": train_loss}
                with self.evaluated_weights():
                    logs.update(self.validate(val_data, evaluate))
                self.end_epoch(logs, started, train_data)
                if self.should_stop:
                    self.log_line(self.history.stop_reason)
                    break
        finally:
            self._bar.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)

    def evaluated_weights(self):
        """The weights that are validated and checkpointed: the EMA's with ``ema_eval``, else the model's own."""
        if self.ema is not None and self.ema_eval:
            return self.ema.swapped_in(self.model)
        return contextlib.nullcontext()

    def train_epoch(self, train_data) -> float | None:
        """One pass over ``train_data``; the epoch's mean loss per sample (None: it became NaN/inf)."""
        for cb in self.callbacks:
            cb.on_epoch_start(self)
        set_epoch(train_data, self.epoch)
        self._wrap()
        if self.ema is not None:
            self.ema.bind(self.model)
        self.model.train()
        running = torch.zeros((), device=self.device)
        seen = 0  # samples (or batches, where a batch does not say its size)
        for batches in _micro_batches(train_data, self.accumulate):
            summed, n = self.train_step(batches)
            running += summed
            seen += n
            self._bar.update(1)
            if self.global_step % self.log_every == 0:
                value = self._mean(running, seen)
                if not math.isfinite(value):
                    return self._bad_loss(value)
                self._bar.set_postfix(epoch=self.epoch, loss=f"{value:.4g}", refresh=False)
        value = self._mean(running, seen)
        return value if math.isfinite(value) else self._bad_loss(value)

    def train_step(self, batches: list) -> tuple[torch.Tensor, int]:
        """One optimizer step over ``batches`` (one batch, or ``accumulate`` micro-batches), as the data yields them.

        Each micro-batch's mean loss is weighted by its share of the step's samples before its
        backward pass, so the summed gradient is that of one batch holding them all. Under DDP
        the gradients are averaged over the ranks on the last micro-batch only (``no_sync``).
        Each micro-batch reaches the device (:func:`workbench.devices.to_device`) just before its forward pass.
        Returns the step's loss summed over samples (on the device) and its number of samples.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        self.history.lr_trace.append([g["lr"] for g in opt.param_groups])
        sizes = [_batch_len(batch) for batch in batches]
        total = sum(sizes)
        summed = None
        for i, (batch, n) in enumerate(zip(batches, sizes)):
            batch = to_device(batch, self.device, self.dtype)
            with self._no_sync(last=i == len(batches) - 1):
                with self.autocast():
                    loss = self.forward_loss(batch)
                self._backward(loss if len(batches) == 1 else loss * (n / total))
            part = loss.detach() * n
            summed = part if summed is None else summed + part
        self._optimizer_step()
        return summed, total

    def _no_sync(self, *, last: bool):
        if last or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        """(Unscale and) clip, step the optimizer, the EMA and the schedule; count the step."""
        opt = self.optimizer
        if self.scaler is not None:
            if self.grad_clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            opt.step()
        if self.ema is not None:
            self.ema.update()
        if self._per_step_schedule:
            self.scheduler.step()
        self.global_step += 1

    def validate(self, val_data, evaluate) -> dict:
        """``val_loss`` and ``evaluate``'s metrics over the whole validation set.

        Under DDP every rank validates rank 0's model (its BatchNorm buffers are broadcast first:
        each rank's own running statistics drifted with its own batches); ``val_loss`` and a
        dict's metrics are averaged over ranks (weighted by their items), a :class:`PerSample`
        result is gathered from every rank's shard and scored once.
        """
        if val_data is None and evaluate is None:
            return {}
        self.model.eval()
        self.dist.broadcast_buffers(self.model)
        total, n, metrics, exact = None, 1, {}, {}
        with torch.no_grad(), self.autocast():
            if val_data is not None:
                total, n = _sum_loss(self.model, val_data, self.loss_fn, self.device, self.dtype)
            if evaluate is not None:  # its batches arrive on the model's device
                result = evaluate(self.model, _OnDevice(val_data, self.device, self.dtype))
                if isinstance(result, PerSample):
                    exact = result.scored(self.dist, gather=self.val_sharded)
                else:
                    metrics = {k: float(v) for k, v in result.items()}
        if not self.dist.enabled:
            return ({} if total is None else {"val_loss": total / max(1, n)}) | metrics | exact
        names = ([] if total is None else ["val_loss"]) + sorted(metrics)
        values = ([] if total is None else [total]) + [metrics[k] * n for k in sorted(metrics)]
        *sums, count = self.dist.sum([*values, n], self.device)
        return {k: s / max(1, count) for k, s in zip(names, sums)} | exact

    def end_epoch(self, logs: dict, started: float, train_data) -> None:
        """Learning rates and time into ``logs``; callbacks, metrics.jsonl and ``last.pt``.

        The callbacks' decisions (best checkpoint, early stopping) see the evaluated weights
        (:meth:`evaluated_weights`); ``last.pt`` holds the trained ones.
        """
        history = self.history
        logs.update({f"lr_{name}": g["lr"] for name, g in zip(history.group_names, self.optimizer.param_groups)})
        logs["time_s"] = time.perf_counter() - started
        if not self._per_step_schedule:
            self.scheduler.step(_check_monitor(history.monitor, logs))
        history.rows.append(logs)
        with self.evaluated_weights():
            for cb in self.callbacks:
                cb.on_validation_end(self, logs)
        if self.run is not None:
            self.run.log(logs)
            self.run.log_text(_epoch_line(logs))
        self.save_state(train_data)
        for cb in self.callbacks:
            cb.on_epoch_end(self, logs)
        self._bar.set_postfix(epoch=self.epoch, loss=f"{logs['train_loss']:.4g}",
                              **{k: f"{v:.4g}" for k, v in logs.items() if k.startswith("val_")})

    def _mean(self, running: torch.Tensor, seen: int) -> float:
        """The running loss per sample, over every rank (the host sync of a logging point)."""
        if not self.dist.enabled:
            return running.item() / max(1, seen)
        total, count = self.dist.sum([running.item(), seen], self.device)
        return total / max(1, count)

    def _bad_loss(self, value: float) -> None:
        where = self.run.checkpoints / "best.safetensors" if self.run is not None else "no run folder"
        self.stop(
            f"loss became {value} in epoch {self.epoch} (step {self.global_step}); training stopped. "
            f"The best checkpoint so far is kept ({where}). Lower the learning rate, add grad_clip=1.0, "
            "or check the inputs for NaN/inf."
        )
        warnings.warn(self.history.stop_reason, stacklevel=5)
        return None

    def _wrap(self) -> None:
        """Wrap the model in DDP, again whenever the set of trainable tensors changed (unfreezing)."""
        if not self.dist.enabled:
            return
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable == self._wrapped_for:
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(_LossModule(self.model, self.loss_fn), device_ids=ids)
        self.forward_loss = self._ddp
        self._wrapped_for = trainable


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
    settings: FitSettings | None = None,
    *,
    val_data: Iterable | None = None,
    loss_fn: Callable | None = None,
    evaluate: Callable | None = None,
    state_fn: Callable[[nn.Module], dict] | None = None,
    callbacks: Sequence[Callback] = (),
    run=None,
    resume: bool = False,
    device: str | torch.device | None = None,
    prefetch: int | None = None,
    pin_memory: bool | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    **kwargs,
) -> History:
    """Train ``model`` on ``train_data`` and return its :class:`History`.

    ``fit(model, loader, epochs=10, learning_rate=1e-3, lr_scheduler_type="cosine", run=run)``: the
    training settings are the fields of :class:`FitSettings`, given as keywords or as one object
    (``fit(model, loader, settings)``; keywords beside it replace its fields).

    Parameters
    ----------
    model
        Any ``nn.Module``.
    train_data
        An iterable of batches with a length (a ``DataLoader``); any batch structure.
    settings
        A :class:`FitSettings`; None builds one from ``**kwargs``.
    val_data
        Batches for validation; ``val_loss`` is their mean loss.
    loss_fn
        ``loss_fn(model, batch) -> scalar tensor``; default ``model.loss(batch)``.
    evaluate
        ``evaluate(model, val_data) -> {name: number}``, run in eval mode without gradients
        after every epoch (e.g. ``val_accuracy``); merged with ``val_loss``. For a metric that is
        not a mean over samples (macro-F1, AUROC) return :class:`PerSample` instead: exact under DDP.
    state_fn
        What the checkpoints (best, top-k, every N epochs, ``last.pt``) hold of the model:
        ``state_fn(model) -> {name: tensor}``, named as in the unwrapped model; default every
        tensor. A LoRA run passes :func:`workbench.lora.checkpoint_state` (adapters, fully trained
        parts and buffers: a few kB) and keeps its frozen base apart; a resume loads the part
        over the model rebuilt on the same base.
    callbacks
        Extra :class:`Callback` objects (besides those of an enclosing :func:`extra_callbacks`).
    run
        A :class:`workbench.Run`: ``metrics.jsonl`` per epoch, checkpoints, resume state, ``train.log``
        (the settings, the schedule and freezing, one line per epoch with losses, metrics and every
        group's LR) and ``fit_settings.json`` (the last fit's settings: :meth:`FitSettings.to_dict` with
        ``monitor`` and ``dtype`` as resolved, plus the derived ``batch_size``, ``steps_per_epoch``,
        ``world_size`` and ``device``; :meth:`FitSettings.from_dict` reads it back).
    resume
        Continue from ``run``'s ``checkpoints/last.pt`` when it exists (open the run with
        ``Run(..., resume=True)``). Every setting in :data:`SETTINGS` (the :class:`FitSettings` fields
        whose metadata says ``resume``, and batch size, steps per epoch, world size) must equal the
        saved one (``monitor``, ``mode``, ``patience``, ``min_delta`` and ``save_top_k`` too: the
        callbacks' saved best value, wait and top-k were kept under them).
    device
        ``"auto"`` or None (default): ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when CUDA is available, else
        the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (under DDP every rank trains on ``cuda:LOCAL_RANK``).
        See :func:`workbench.devices.resolve_device`. The model is moved there, and every batch (training,
        validation, the batches ``evaluate`` receives) through :func:`workbench.devices.to_device`.
    prefetch, pin_memory
        Build the next ``prefetch`` training batches in a background thread while the model trains
        (:class:`workbench.batches.Prefetch`), in pinned memory with ``pin_memory``. None (default): 2 batches,
        pinned, on a CUDA device when ``train_data`` is not a ``DataLoader`` (a DataLoader has its own
        ``num_workers`` and ``pin_memory``); nothing on the CPU. 0 turns it off. The batches and their order
        are the same either way.
    progress
        Show a progress bar and the loop's messages.
    distributed
        None: train with DDP when a process group is initialised or torchrun started this
        process with ``WORLD_SIZE`` > 1 (see :mod:`workbench.distributed`); True: the same, but
        refuse to run in one process; False: train in this process alone. Under DDP ``batch_size``
        is per process, rank 0 alone writes ``run`` (the ``run`` and ``resume`` of other ranks are
        not used), and every rank returns the same history.
    **kwargs
        :class:`FitSettings` fields. ``lr`` and ``schedule`` are the old names of ``learning_rate`` and
        ``lr_scheduler_type`` (accepted with a DeprecationWarning); any other name raises TypeError.

    Notes
    -----
    What the settings do together:

    - ``optimizer``, ``weight_decay``: biases, normalisation weights and frozen tensors get no weight decay.
    - ``lr_scheduler_type``, ``warmup_ratio``, ``min_lr_ratio``: see :mod:`workbench.schedules`.
    - ``strategy``, ``freeze_epochs``: freezing strategy (see :func:`workbench.apply_strategy`). None
      keeps ``requires_grad`` as the caller set it (by hand, or by peft for LoRA). With
      ``freeze_epochs=N`` the backbone is frozen for the first N epochs, then ``strategy`` applies
      (None: the caller's freezing comes back).
    - ``backbone_lr_ratio``: backbone learning rate = ``learning_rate * backbone_lr_ratio``;
      ``layer_decay`` (see :func:`workbench.transfer.param_groups`) multiplies with it.
    - ``grad_clip`` clips the accumulated gradient with ``accumulate``. ``amp``: ``"bf16"`` (CPU or
      CUDA) or ``"fp16"`` (CUDA, with gradient scaling).
    - ``accumulate``: batches per optimizer step (as Lightning's ``accumulate_grad_batches``): the
      gradient is that of one batch ``accumulate`` times as large (micro-batch losses weighted by
      their samples). ``global_step``, the schedule, ``log_every`` and the LR trace count optimizer
      steps; an epoch's last step takes the batches that are left. Under DDP only the last
      micro-batch of a step synchronises.
    - ``ema``, ``ema_eval``: an exponential moving average of the weights (see :mod:`workbench.ema`),
      saved in ``last.pt`` (a resume continues it) and exported as ``checkpoints/ema.safetensors``
      every epoch; ``History.ema_weights`` holds it at the end. With ``ema_eval=True`` validation,
      the best/top-k checkpoints, early stopping and ``restore_best`` use the EMA weights, and the
      model holds them when ``fit`` returns.
    - ``monitor``, ``mode``, ``patience``, ``min_delta``: the metric that picks the best epoch
      (default ``val_loss`` with validation data, else ``train_loss``); ``patience`` enables early stopping.
    - ``save_top_k``, ``save_every``, ``restore_best``: checkpoints in ``run``'s folder
      (``best.safetensors``, the top-k, every N epochs). ``restore_best`` loads the best epoch's
      weights back at the end (from ``best.safetensors``, or, without ``run``, from a CPU copy taken
      whenever ``monitor`` improved; a tie goes to the later epoch, as in :attr:`History.best_epoch`).
    - ``dtype``: None keeps the model's dtype; ``"float64"`` on the CPU is the check that every tensor
      takes the device path (one that does not meets the model as float32).
    - ``deterministic``: :func:`workbench.devices.set_deterministic` (cuDNN flags,
      ``torch.use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG``); it stays on for the
      process. The CPU loop is bit for bit reproducible without it; on a GPU a resume equals an
      uninterrupted run only with it (and raises where an operation has no deterministic kernel).
    - ``seed``: also the seed of the DistributedSampler under DDP (default 0 there).
    """
    s = _resolve_settings(settings, kwargs)
    dist = dist_context(distributed)
    if dist.is_main:
        _check_resume(run, resume)
    device = dist.device(device)
    dtype = resolve_dtype(s.dtype)
    if s.deterministic:
        set_deterministic()
    train_data = _prefetched(dist.shard_train(train_data, seed=s.seed), device, prefetch=prefetch,
                             pin_memory=pin_memory)
    val_given, val_data = val_data, dist.shard_eval(val_data)
    if s.seed is not None:
        torch.manual_seed(s.seed)
    model.to(device=device, dtype=dtype)
    monitor = s.monitor or ("val_loss" if val_data is not None else "train_loss")
    settings = _settings(s, monitor=monitor, dtype=dtype, batch_size=getattr(train_data, "batch_size", None),
                         steps_per_epoch=math.ceil(len(train_data) / s.accumulate), world_size=dist.world_size)
    run = run if dist.is_main else None
    trainer = None
    with dist.watch(lambda: trainer.where() if trainer is not None else "setup"):
        _check_same_settings(dist, settings)
        trainer = _setup(model, s, dist=dist, settings=settings, monitor=monitor, callbacks=callbacks, run=run,
                         device=device, loss_fn=loss_fn or _default_loss, progress=progress)
        trainer.state_fn = state_fn
        trainer.dtype = dtype
        trainer.val_sharded = dist.enabled and (val_data is not val_given or isinstance(val_given, PerRank))
        if s.restore_best and run is None and dist.is_main:  # no best.safetensors to read back: keep it in memory
            trainer.best_in_memory = _BestInMemory(monitor=monitor, mode=s.mode)
            trainer.callbacks.append(trainer.best_in_memory)
        trainer.ema = ModelEMA(model, decay=s.ema) if s.ema is not None else None
        if run is not None:
            _record_settings(run, s, settings, device)
        start_epoch, finished = trainer.restore(resume=resume, train_data=train_data, epochs=s.epochs)
        if not finished:
            trainer.log_line(f"{describe(trainer.scheduler)}; {trainer.freeze_report.summary()}; device={device}"
                             + (f"; rank {dist.rank} of {dist.world_size}" if dist.enabled else ""))
            trainer.train(train_data, val_data, evaluate, start_epoch=start_epoch, epochs=s.epochs, progress=progress)
        _finish_ema(trainer)
        _restore_best(trainer, s.restore_best)
    return trainer.history


def _resolve_settings(settings: FitSettings | None = None, overrides: dict | None = None, *, stacklevel: int = 3
                 ) -> FitSettings:
    """``settings`` with ``overrides`` (fit's keywords) applied, or a new :class:`FitSettings` from them.

    The old keywords ``lr`` / ``schedule`` are read as ``learning_rate`` / ``lr_scheduler_type`` with a
    DeprecationWarning; an unknown keyword raises TypeError naming the closest setting.
    """
    values = dict(overrides or {})
    for old, new in RENAMED.items():
        if old in values:
            if new in values:
                raise TypeError(f"fit() got both {old}= and {new}=; {old} is the old name of {new}: pass {new} only.")
            warnings.warn(f"fit({old}=...) is deprecated: the setting is now called {new} (the notebooks' name). "
                          f"Pass {new}=...", DeprecationWarning, stacklevel=stacklevel)
            values[new] = values.pop(old)
    names = [f.name for f in fields(FitSettings)]
    unknown = [k for k in values if k not in names]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, names + list(RENAMED), n=1)
        hint = f" Did you mean {RENAMED.get(close[0], close[0])!r}?" if close else ""
        raise TypeError(f"fit() got an unexpected keyword argument {key!r}.{hint} Its settings are the fields of "
                        f"FitSettings: {', '.join(names)}.")
    if settings is None:
        missing = [k for k in ("epochs", "learning_rate") if k not in values]
        if missing:
            raise TypeError(f"fit() needs {' and '.join(f'{k}=' for k in missing)} (or settings=FitSettings(...)).")
        return FitSettings(**values)
    if not isinstance(settings, FitSettings):
        raise TypeError(f"settings must be a FitSettings, got {type(settings).__name__}. Pass the settings as "
                        "keywords (fit(model, data, epochs=..., learning_rate=...)) or as FitSettings(...).")
    return replace(settings, **values) if values else settings


def _record_settings(run, s: FitSettings, settings: dict, device) -> None:
    """The settings this fit trains with: ``fit_settings.json`` in the run folder and a line of ``train.log``."""
    record = s.to_dict() | {k: settings[k] for k in ("monitor", "dtype", "batch_size", "steps_per_epoch",
                                                    "world_size")} | {"device": str(device)}
    run.save_json("fit_settings.json", record)
    run.log_text("fit settings: " + json.dumps(record, default=str))


def _prefetched(train_data, device: torch.device, *, prefetch: int | None, pin_memory: bool | None):
    """``train_data`` built ahead by :class:`workbench.batches.Prefetch` when asked (or by default on CUDA)."""
    from .batches import Prefetch

    python_batches = not isinstance(train_data, (torch.utils.data.DataLoader, Prefetch))
    if prefetch is None:
        prefetch = 2 if device.type == "cuda" and python_batches else 0
    if not prefetch or not python_batches:
        return train_data
    return Prefetch(train_data, depth=prefetch, pin_memory=device.type == "cuda" if pin_memory is None else pin_memory)


def _check_args(*, epochs: int, optimizer: str, accumulate: int, ema: float | None, ema_eval: bool) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1 (batches per optimizer step), got {accumulate!r}.")
    if ema is not None and not 0 < ema < 1:
        raise ValueError(f"ema={ema!r}: the EMA decay must be in (0, 1), e.g. 0.999; None turns it off.")
    if ema_eval and ema is None:
        raise ValueError("ema_eval=True evaluates the EMA weights, but ema is None. Pass ema=0.999 (for example).")


def _check_resume(run, resume: bool) -> None:
    if resume and run is None:
        raise ValueError("resume=True needs run= (the run folder that holds checkpoints/last.pt).")
    if resume and not getattr(run, "resume", True):
        raise ValueError(f"resume=True, but {run!r} was opened without resume=True, which cleared what the earlier "
                         "run left. Open it with wb.Run(output_dir, params=..., resume=True).")


def _check_same_settings(dist: DistContext, settings: dict) -> None:
    """Under DDP every rank must train with the same settings (and as many steps per epoch)."""
    if not dist.enabled:
        return
    every = dist.gather_objects(settings)
    differ = [f"rank {r}: {k}={s[k]!r} (rank 0: {every[0][k]!r})" for r, s in enumerate(every) for k in SETTINGS
              if s[k] != every[0][k]]
    if differ:
        raise ValueError(f"The ranks were given different settings: {'; '.join(differ[:6])}. Every rank must call "
                         "fit with the same arguments and as many batches per epoch (a different count would hang "
                         "the gradient averaging).")


def _setup(model, s: FitSettings, *, dist, settings, monitor, callbacks, run, device, loss_fn, progress) -> Trainer:
    """Freezing, optimizer, schedule, callbacks: the :class:`Trainer` before its first epoch.

    Freezing comes first, so its table is shown before training; every parameter goes into the optimizer.
    """
    strategy = s.strategy
    if strategy is None:  # keep the caller's freezing: name exactly the tensors that are frozen now
        strategy = [name for name, p in unwrap(model).named_parameters() if not p.requires_grad]
    elif isinstance(strategy, tuple):
        strategy = list(strategy)
    unfreeze = GradualUnfreeze(epochs=s.freeze_epochs, then=strategy) if s.freeze_epochs > 0 else None
    freeze_report = apply_strategy(model, "frozen_backbone" if unfreeze else strategy)
    groups = param_groups(model, lr=s.learning_rate, weight_decay=s.weight_decay,
                          backbone_lr_ratio=s.backbone_lr_ratio, layer_decay=s.layer_decay)
    opt = _build_optimizer(s.optimizer, groups, lr=s.learning_rate)
    scheduler = build_scheduler(
        opt, s.lr_scheduler_type, total_steps=max(1, s.epochs * settings["steps_per_epoch"]),
        warmup_ratio=s.warmup_ratio, min_lr_ratio=s.min_lr_ratio, mode=s.mode,
    )
    history = History(group_names=[g["name"] for g in groups], monitor=monitor, mode=s.mode)
    trainer = Trainer(model, opt, scheduler, history, device=device, run=run, quiet=not progress, dist=dist)
    trainer.freeze_report = freeze_report
    trainer.settings, trainer.loss_fn, trainer.grad_clip, trainer.log_every = settings, loss_fn, s.grad_clip, s.log_every
    trainer.accumulate, trainer.ema_eval = s.accumulate, s.ema_eval
    trainer.forward_loss = functools.partial(loss_fn, model)
    trainer.autocast = _autocast(s.amp, device)
    trainer.scaler = torch.amp.GradScaler("cuda") if s.amp == "fp16" else None
    trainer._params = [p for g in opt.param_groups for p in g["params"]]
    trainer._per_step_schedule = s.lr_scheduler_type != "plateau"
    trainer.last_path = run.checkpoints / "last.pt" if run is not None else None

    cbs: list[Callback] = [unfreeze] if unfreeze else []
    if s.patience is not None:
        cbs.append(EarlyStopping(monitor=monitor, mode=s.mode, patience=s.patience, min_delta=s.min_delta))
    if run is not None:
        cbs.append(ModelCheckpoint(run.checkpoints, monitor=monitor, mode=s.mode, save_top_k=s.save_top_k,
                                   every_n_epochs=s.save_every))
    trainer.callbacks = cbs + list(callbacks) + list(_EXTRA_CALLBACKS.get())
    return trainer


def _finish_ema(trainer: Trainer) -> None:
    """The EMA weights into the history; into the model too when they are the evaluated ones."""
    if trainer.ema is None:
        return
    trainer.history.ema_weights = {k: v.detach().clone() for k, v in trainer.ema.shadow.items()}
    if trainer.ema_eval:
        trainer.ema.copy_to(trainer.model)


def _restore_best(trainer: Trainer, restore_best: bool) -> None:
    """Load the best epoch's weights back: ``best.safetensors`` of the run, else the copy kept in memory.

    Rank 0 loads them and sends them to the other ranks, so every rank ends with the same weights
    (BatchNorm buffers included, also without ``restore_best``).
    """
    if not restore_best:
        trainer.dist.broadcast_buffers(trainer.model)
        return
    best = trainer.run.checkpoints / "best.safetensors" if trainer.run is not None else None
    kept = trainer.best_in_memory
    found = kept.state is not None if kept is not None else best is not None and best.exists()
    found = trainer.dist.broadcast_object(found)
    if found and trainer.is_main:
        if kept is not None:
            trainer.model.load_state_dict(kept.state)
        else:
            from .transfer import load_pretrained

            load_pretrained(trainer.model, best)
    if found:
        trainer.dist.broadcast_module(trainer.model)
    else:
        trainer.dist.broadcast_buffers(trainer.model)


def _load_part(model: nn.Module, saved: dict, state_fn: Callable, where) -> None:
    """Load the part of ``model`` that ``state_fn`` saved; it must name exactly the tensors ``state_fn`` names now."""
    wanted = set(state_fn(model))
    if set(saved) != wanted:
        missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        raise CheckpointError(f"{where} holds other tensors than this run checkpoints (missing: {missing[:5]}; not "
                              f"checkpointed now: {extra[:5]}), so it was written by another model or another "
                              "state_fn. Start a new run in another output_dir.")
    unwrap(model).load_state_dict(saved, strict=False)


def _settings(s: FitSettings, *, monitor: str, dtype, batch_size, steps_per_epoch: int, world_size: int) -> dict:
    """The settings a resume must match (:data:`SETTINGS`) as plain values: what ``last.pt`` stores and compares.

    ``monitor`` and ``dtype`` as resolved (a default monitor names the metric it picked), the strategy as
    a string or a list, and what follows from the data and the processes.
    """
    values = s.to_dict() | {"monitor": monitor, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
                            "world_size": world_size, "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
    if s.strategy is None:
        values["strategy"] = "as set by the caller"
    return {k: values[k] for k in SETTINGS}


def _saved_setting(saved: dict, key: str, rows: list):
    """A saved setting; for one that an older ``last.pt`` does not record, what it meant then.

    A ``last.pt`` written before the rename to the notebooks' names stored ``lr`` and ``schedule``.
    """
    if key in saved:
        return saved[key]
    old = next((o for o, new in RENAMED.items() if new == key), None)
    if old is not None and old in saved:
        return saved[old]
    if key == "monitor":  # fit's default: val_loss when the run validated
        return "val_loss" if rows and "val_loss" in rows[0] else "train_loss"
    return _SETTING_DEFAULTS.get(key)


def _check_settings(saved: dict | None, now: dict, path, *, rows: list = ()) -> None:
    if saved is None:
        raise ValueError(f"{path} records no training settings (it was written by an older workbench), so a resume "
                         "cannot check that it continues the same run. Start a new run (another output_dir).")
    differ = [f"{k}: {_saved_setting(saved, k, rows)!r} saved, {now[k]!r} now" for k in SETTINGS
              if _saved_setting(saved, k, rows) != now[k]]
    if differ:
        raise ValueError(
            f"Cannot resume {path} with other settings: {'; '.join(differ)}. The saved run's schedule and data order "
            "were planned for its own settings. Resume with the saved values, or start a new run in another "
            "output_dir."
        )


def _epoch_line(logs: dict) -> str:
    """An epoch's ``train.log`` line: losses, metrics, every group's LR, time."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())


def _micro_batches(data: Iterable, k: int):
    """``data``'s batches in lists of ``k`` (the last list holds what is left)."""
    group = []
    for batch in data:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def _batch_len(batch) -> int:
    """Items a batch supervises: its ``n_items`` (a dict key or an attribute, a Python int set when the batch
    was built), else the first dimension of its first tensor; 1 when it holds none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    said = batch.get("n_items") if isinstance(batch, dict) else getattr(batch, "n_items", None)
    if isinstance(said, int) and not isinstance(said, bool):
        return said
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


def _sum_loss(model, batches, loss_fn, device, dtype=None) -> tuple[float, int]:
    """Summed loss over the samples of ``batches`` (batch means times batch sizes), and their number."""
    total = torch.zeros((), device=device)
    n = 0
    for batch in batches:
        size = _batch_len(batch)
        total += loss_fn(model, to_device(batch, device, dtype)).detach().float() * size
        n += size
    return total.item(), n
