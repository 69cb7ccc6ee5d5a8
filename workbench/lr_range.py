"""The learning-rate range test (fastai's ``lr_find``, Lightning's ``Tuner.lr_find``).

The model trains for ``num_steps`` batches while the learning rate rises exponentially from
``start_lr`` to ``end_lr``; the loss at each step, and its exponentially smoothed version, show
where training starts to bite and where it blows up. A suggested rate is read off the smoothed
curve by a named rule:

``steepest``
    where the smoothed loss falls fastest against ``log(lr)`` (fastai's ``steep``);
``minimum/10``
    a tenth of the rate at the smoothed loss's minimum (fastai's ``minimum``, the rule of thumb
    from Smith's paper);
``valley``
    halfway along the longest stretch over which the smoothed loss keeps falling (fastai's
    ``valley``, its default since 2.4): robust to a single steep blip, and further from the
    edge of divergence than ``steepest`` on a long, shallow descent.

The test stops early once the smoothed loss exceeds ``diverge`` times its best value. Everything
it touches is put back exactly: the weights and buffers, ``requires_grad`` and train/eval modes,
the gradients, the given optimizer's state, and the torch / numpy / Python (and CUDA and data
loader) random states, so a ``fit`` afterwards runs as if ``lr_find`` had never been called.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["lr_find", "LRFinderResult", "RULES"]

#: The suggestion rules :func:`lr_find` knows.
RULES = ("steepest", "minimum/10", "valley")


@dataclass
class LRFinderResult:
    """The LR/loss curve of a range test and its suggestion; html, frame and dict faces."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    suggestions: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame({"lr": self.lrs, "loss": self.losses, "smoothed": self.smoothed}).rename_axis("step")
        frame.attrs.update(suggestion=self.suggestion, rule=self.rule, suggestions=dict(self.suggestions))
        return frame

    def to_dict(self) -> dict:
        return {
            "suggestion": self.suggestion,
            "rule": self.rule,
            "suggestions": dict(self.suggestions),
            "stopped_early": self.stopped_early,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "smoothed": list(self.smoothed),
        }

    def summary(self) -> str:
        others = ", ".join(f"{k}: {v:.3g}" for k, v in self.suggestions.items() if k != self.rule)
        end = "; stopped early (the loss diverged)" if self.stopped_early else ""
        return (f"suggested learning rate {self.suggestion:.3g} ({self.rule}"
                + (f"; {others}" if others else "") + f") from {len(self.lrs)} steps{end}")

    def __repr__(self) -> str:
        return f"LRFinderResult({self.summary()})"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v:.3g}</td></tr>" for k, v in self.suggestions.items())
        return (f"<p><b>{self.summary()}</b></p><table><tr><th>rule</th><th>learning rate</th></tr>{rows}</table>")


def smooth(losses: list[float], *, beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (fastai's), one value per loss."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest_rates(lrs: list[float], smoothed: list[float], *, skip_start: int | None = None) -> dict[str, float]:
    """Each rule's learning rate from a smoothed curve (see :data:`RULES`)."""
    n = len(lrs)
    if n < 3:
        raise ValueError(f"the range test recorded {n} finite losses; it needs at least 3. Raise num_steps, or lower "
                         "end_lr if the loss diverged at once.")
    skip = max(1, n // 10) if skip_start is None else skip_start
    skip = min(skip, n - 3)
    log_lr = np.log10(np.asarray(lrs[skip:]))
    loss = np.asarray(smoothed[skip:])
    steepest = int(np.argmin(np.gradient(loss, log_lr)))
    lowest = int(np.argmin(np.asarray(smoothed)))
    return {"steepest": float(lrs[skip + steepest]), "minimum/10": float(lrs[lowest]) / 10,
            "valley": float(lrs[_valley(smoothed)])}


def _valley(smoothed: list[float]) -> int:
    """The step halfway along the longest falling stretch of the curve.

    The stretch is the longest strictly decreasing subsequence of the smoothed loss (found by
    dynamic programming, O(n^2) for the ~100 steps of a range test); it starts at its first step
    and ends at its last, and small bumps inside it do not break it.
    """
    loss = np.asarray(smoothed, dtype=float)
    n = len(loss)
    length = np.ones(n, dtype=int)  # length of the longest decreasing subsequence ending at i
    first = np.arange(n)  # where that subsequence starts
    for i in range(1, n):
        for j in range(i):
            if loss[i] < loss[j] and length[j] + 1 > length[i]:
                length[i], first[i] = length[j] + 1, first[j]
    end = int(np.argmax(length))  # the first end of a longest one
    start = int(first[end])
    return start + (end - start) // 2


def lr_find(
    model: nn.Module,
    data: Iterable,
    *,
    loss_fn: Callable | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    optimizer: str | torch.optim.Optimizer = "adamw",
    weight_decay: float = 0.0,
    backbone_lr_ratio: float = 1.0,
    layer_decay: float | None = None,
    suggest: str = "steepest",
    beta: float = 0.98,
    diverge: float = 4.0,
    device: str | torch.device | None = None,
) -> LRFinderResult:
    """Run the LR range test on ``model`` and put everything back; return the curve and a suggestion.

    Parameters
    ----------
    model
        Any ``nn.Module``; trains what is trainable now (freeze first to test the head alone).
    data
        Batches, as for :func:`workbench.fit`; cycled when it has fewer than ``num_steps``.
    loss_fn
        ``loss_fn(model, batch)``; default ``model.loss(batch)``.
    start_lr, end_lr, num_steps
        The (head) learning rate rises exponentially from ``start_lr`` to ``end_lr`` over ``num_steps`` steps.
    optimizer
        ``adamw`` | ``adam`` | ``sgd``, built over :func:`workbench.param_groups` (with
        ``weight_decay``, ``backbone_lr_ratio`` and ``layer_decay``, so the groups keep their
        ratios to the head's rate), or an optimizer of your own: it is used, then its state and
        learning rates are restored.
    suggest
        Which rule gives ``.suggestion``: ``steepest``, ``minimum/10`` or ``valley`` (see
        :data:`RULES`); every rule's rate is in ``.suggestions`` and on the plot.
    beta
        Smoothing of the loss curve (exponential moving average, bias-corrected).
    diverge
        Stop once the smoothed loss exceeds this many times its lowest value.
    device
        Where to run; default: where the model's parameters are.

    Returns
    -------
    LRFinderResult
        Draw it with :func:`workbench.plots.plot_lr_find`.
    """
    from .training import _default_loss, _rng_state, _set_rng_state

    rule = suggest
    _check(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, rule=rule, beta=beta, diverge=diverge, data=data)
    loss_fn = loss_fn or _default_loss
    from .devices import placement

    dtype = None
    if device is None:  # where the model is, and its dtype (batches follow it: workbench.devices.to_model)
        device, dtype = placement(model)
    rng = _rng_state(data)
    with _restored(model, optimizer if isinstance(optimizer, torch.optim.Optimizer) else None):
        try:
            opt = _optimizer(model, optimizer, lr=start_lr, weight_decay=weight_decay,
                             backbone_lr_ratio=backbone_lr_ratio, layer_decay=layer_decay)
            lrs, losses, stopped = _sweep(model, data, opt, loss_fn=loss_fn, device=device, dtype=dtype,
                                          start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, beta=beta,
                                          diverge=diverge)
        finally:
            _set_rng_state(rng, data)
    smoothed = smooth(losses, beta=beta)
    suggestions = suggest_rates(lrs, smoothed)
    return LRFinderResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestions[rule], rule=rule,
                          suggestions=suggestions, stopped_early=stopped)


def _check(*, start_lr, end_lr, num_steps, rule, beta, diverge, data) -> None:
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}.")
    if num_steps < 3:
        raise ValueError(f"num_steps must be >= 3 (100 is usual), got {num_steps}.")
    if rule not in RULES:
        raise ValueError(f"suggest={rule!r} is not one of {', '.join(RULES)}.")
    if not 0 <= beta < 1:
        raise ValueError(f"beta (the loss smoothing) must be in [0, 1), got {beta}.")
    if diverge <= 1:
        raise ValueError(f"diverge must be > 1 (stop when the smoothed loss exceeds diverge x its best), "
                         f"got {diverge}.")
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of batches (a DataLoader), got {type(data).__name__}.")


def _optimizer(model, optimizer, *, lr, weight_decay, backbone_lr_ratio, layer_decay) -> torch.optim.Optimizer:
    """The caller's optimizer with every group's LR scaled to start at ``lr`` for the head, or a new one."""
    from .training import _build_optimizer
    from .transfer import param_groups

    if isinstance(optimizer, torch.optim.Optimizer):
        top = max(g["lr"] for g in optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_ratio"] = group["lr"] / top
            group["lr"] = lr * group["initial_ratio"]
        return optimizer
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, backbone_lr_ratio=backbone_lr_ratio,
                          layer_decay=layer_decay)
    for group in groups:
        group["initial_ratio"] = group["lr"] / lr
    return _build_optimizer(optimizer, groups, lr=lr)


def _sweep(model, data, opt, *, loss_fn, device, dtype, start_lr, end_lr, num_steps, beta, diverge):
    """Train at exponentially rising rates; the rates and losses until the end or divergence."""
    from .training import move_to

    lrs: list[float] = []
    losses: list[float] = []
    best, avg = math.inf, 0.0
    model.train()
    batches = itertools.cycle(data) if len(data) < num_steps else iter(data)  # type: ignore[arg-type]
    for step in range(num_steps):
        lr = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr * group["initial_ratio"]
        loss = loss_fn(model, move_to(next(batches), device, dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            return lrs, losses, True
        lrs.append(lr)
        losses.append(value)
        avg = beta * avg + (1 - beta) * value
        smoothed = avg / (1 - beta ** (step + 1))
        best = min(best, smoothed)
        if step > 0 and smoothed > diverge * best:
            return lrs, losses, True
    return lrs, losses, False


@contextlib.contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """Put back weights, buffers, grads, requires_grad, train/eval modes and the optimizer's state."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    opt_state = _clone(optimizer.state_dict()) if optimizer is not None else None
    try:
        yield
    finally:
        model.load_state_dict(weights)
        for p, grad in grads:
            p.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if optimizer is not None:
            optimizer.state.clear()
            optimizer.load_state_dict(opt_state)
            for group in optimizer.param_groups:
                group.pop("initial_ratio", None)


def _clone(obj):
    """A deep copy of an optimizer state dict (tensors cloned), so later steps cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj
