"""Learning-rate schedules and their previews.

Every schedule except ``plateau`` is a pure function of the global optimizer step: the learning
rate of each parameter group is ``group_base_lr * factor(step)``. A resumed run therefore lands
on exactly the learning rate it would have had, and :func:`lr_curve` can draw the plan before
any training happens.

=========================  ==================================================================
``constant``               factor 1 (no warmup: ``warmup_ratio`` does not apply)
``constant_with_warmup``   linear warmup from 0 to 1, then 1
``cosine``                 linear warmup, then half-cosine down to ``min_lr_ratio``
``linear``                 linear warmup, then linear decay to ``min_lr_ratio``
``step``                   linear warmup, then multiply by ``gamma`` every ``step_every`` steps
``plateau``                ``ReduceLROnPlateau`` on the monitored metric, once per epoch
=========================  ==================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SCHEDULES", "ScheduleFactor", "build_scheduler", "lr_curve", "warmup_steps_for", "describe"]

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "step", "plateau")


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        import difflib

        close = difflib.get_close_matches(str(name), SCHEDULES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"lr_scheduler_type={name!r} is not one of {', '.join(SCHEDULES)}.{hint}")
    return name


def warmup_steps_for(total_steps: int, *, warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> int:
    """Warmup length in steps: explicit ``warmup_steps`` wins over ``warmup_ratio``."""
    if warmup_steps is not None:
        return int(warmup_steps)
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}. It is a fraction of total steps.")
    return int(round(warmup_ratio * total_steps))


@dataclass
class ScheduleFactor:
    """``factor(step)``: the multiplier applied to each group's base learning rate.

    A plain dataclass (not a closure) so that ``LambdaLR.state_dict()`` stores its fields and
    the whole schedule survives ``torch.load(weights_only=True)``.
    """

    name: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_every: int = 1
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name in ("constant_with_warmup", "plateau"):
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.name == "cosine":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "linear":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - progress)
        if self.name == "step":
            return self.gamma ** ((step - self.warmup_steps) // max(1, self.step_every))
        raise ValueError(check_schedule(self.name))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    *,
    total_steps: int,
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    step_every: int | None = None,
    gamma: float = 0.1,
    patience: int = 2,
    factor: float = 0.5,
    mode: str = "min",
):
    """Build the scheduler named ``name`` for ``optimizer``.

    Step-based schedules return a ``torch.optim.lr_scheduler.LambdaLR`` to be stepped once per
    optimizer step. ``plateau`` returns ``ReduceLROnPlateau``, stepped once per epoch with the
    monitored metric (``mode``, ``patience``, ``factor``).

    Parameters
    ----------
    total_steps
        Optimizer steps of the whole run (epochs x steps per epoch).
    warmup_ratio, warmup_steps
        Linear warmup length, as a fraction of ``total_steps`` or in steps.
    min_lr_ratio
        Floor of ``cosine`` / ``linear`` as a fraction of the base learning rate.
    step_every, gamma
        ``step``: multiply by ``gamma`` every ``step_every`` steps (default: a third of the run).
    """
    check_schedule(name)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, patience=patience, factor=factor)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}. Is the training set empty?")
    # ``constant`` has no warmup (use ``constant_with_warmup``); record 0 so that what is applied, described
    # and plotted agree.
    warm = 0 if name == "constant" else warmup_steps_for(total_steps, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
    fn = ScheduleFactor(
        name=name,
        total_steps=int(total_steps),
        warmup_steps=warm,
        min_lr_ratio=float(min_lr_ratio),
        step_every=int(step_every or max(1, total_steps // 3)),
        gamma=float(gamma),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))


def describe(scheduler) -> str:
    """One line naming the schedule, its warmup and its length."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        fn = scheduler.lr_lambdas[0]
        return f"lr schedule: {fn.name}, warmup_steps={fn.warmup_steps}, total_steps={fn.total_steps}"
    return f"lr schedule: {type(scheduler).__name__} (per epoch, on the monitored metric)"


def lr_curve(
    name: str = "constant",
    *,
    learning_rate: float | None = None,
    total_steps: int,
    groups: Sequence[str] | dict[str, float] | None = None,
    freeze_steps: int = 0,
    lr: float | None = None,
    **kwargs,
):
    """The planned learning rate at every step, per parameter group, before training.

    Parameters
    ----------
    name, total_steps, kwargs
        As for :func:`build_scheduler` (``name`` is fit's ``lr_scheduler_type``).
    learning_rate
        Base learning rate (fit's ``learning_rate``).
    groups
        Group names (all at ``learning_rate``) or ``{group: lr multiplier}``, e.g.
        ``{"backbone": 0.1, "head": 1.0}`` for a backbone at a tenth of the head's rate.
    freeze_steps
        Steps during which the backbone is frozen (``fit(freeze_epochs=...)``): groups whose
        name starts with ``backbone`` are NaN there (nothing is learned, whatever the schedule
        says), and ``attrs["freeze_steps"]`` records it for the plot.
    lr
        The old name of ``learning_rate`` (accepted with a DeprecationWarning).

    Returns
    -------
    pandas.DataFrame
        Index ``step``, one column per group; ``attrs`` holds schedule, warmup_steps,
        total_steps (read by :func:`workbench.plots.plot_lr_schedule`).
    """
    import pandas as pd

    if lr is not None:
        if learning_rate is not None:
            raise TypeError("lr_curve() got both lr= and learning_rate=; lr is the old name: pass learning_rate only.")
        warnings.warn("lr_curve(lr=...) is deprecated: the setting is now called learning_rate (fit's and the "
                      "notebooks' name). Pass learning_rate=...", DeprecationWarning, stacklevel=2)
        learning_rate = lr
    if learning_rate is None:
        raise TypeError("lr_curve() needs learning_rate= (the base learning rate).")
    lr = learning_rate
    if groups is None:
        groups = {"lr": 1.0}
    elif not isinstance(groups, dict):
        groups = {g: 1.0 for g in groups}
    dummy = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr * m} for m in groups.values()]
    optimizer = torch.optim.SGD(dummy, lr=lr)
    scheduler = build_scheduler(optimizer, name, total_steps=total_steps, **kwargs)
    rows = []
    for _ in range(total_steps):
        rows.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        if name != "plateau":
            scheduler.step()
    frame = pd.DataFrame(rows, columns=list(groups), index=pd.RangeIndex(total_steps, name="step"))
    freeze_steps = min(int(freeze_steps), total_steps)
    for column in frame.columns:
        if freeze_steps and str(column).startswith("backbone"):
            frame.loc[: freeze_steps - 1, column] = float("nan")
    warm = scheduler.lr_lambdas[0].warmup_steps if hasattr(scheduler, "lr_lambdas") else 0
    frame.attrs.update(schedule=name, warmup_steps=warm, total_steps=total_steps, freeze_steps=freeze_steps)
    return frame
