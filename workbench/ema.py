"""An exponential moving average of a model's weights (``fit(..., ema=0.999)``).

After every optimizer step the shadow copy moves towards the live weights:
``shadow = decay * shadow + (1 - decay) * weight`` for every floating-point tensor of the
``state_dict`` (parameters and buffers such as BatchNorm's running statistics), while integer
buffers (``num_batches_tracked``) are copied. This is timm's ``ModelEmaV2`` / ``ModelEmaV3``
without the decay warmup, done with one fused ``torch._foreach_lerp_`` per step, as ``ModelEmaV3`` does.
The shadow lives on the model's device, holds plain tensors, and goes into ``last.pt`` so that a resumed
run continues it bit for bit on the CPU (on a GPU, with ``fit(deterministic=True)``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """The shadow weights of ``model``, updated by :meth:`update` after each optimizer step.

    Parameters
    ----------
    model
        The module whose ``state_dict`` is averaged (not a DDP wrapper).
    decay
        In (0, 1); 0.999 averages over about the last 1000 steps.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema={decay!r}: the EMA decay must be in (0, 1), e.g. 0.999 (None turns it off).")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Look up the live tensors again (after a resume or anything that may have replaced a buffer)."""
        live = model.state_dict()
        if live.keys() != self.shadow.keys():
            raise ValueError(f"the EMA shadow holds other tensors than the model: "
                             f"{sorted(set(live) ^ set(self.shadow))[:5]}")
        floats = [k for k, v in live.items() if v.is_floating_point()]
        others = [k for k in live if k not in set(floats)]  # integer buffers: copied, not averaged
        self._float_live = [live[k] for k in floats]
        self._float_shadow = [self.shadow[k] for k in floats]
        self._other_live = [live[k] for k in others]
        self._other_shadow = [self.shadow[k] for k in others]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the live weights."""
        if self._float_live:
            torch._foreach_lerp_(self._float_shadow, self._float_live, 1.0 - self.decay)
        for shadow, live in zip(self._other_shadow, self._other_live):
            shadow.copy_(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"the saved EMA decay is {state['decay']}, this run's is {self.decay}.")
        with torch.no_grad():
            for key, value in state["shadow"].items():
                self.shadow[key].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Within the block, ``model`` holds the shadow weights; afterwards its own again, bit for bit."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def copy_to(self, model: nn.Module) -> None:
        """Load the shadow weights into ``model`` (for good)."""
        model.load_state_dict(self.shadow)
