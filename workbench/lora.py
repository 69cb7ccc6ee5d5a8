"""LoRA through peft, with a report of what it adapted.

A model says which parts LoRA may adapt (``lora_targets``, module-name prefixes) and which small
parts must train in full (``lora_train_fully``, e.g. the embedding of a condition never seen in
pretraining). :func:`apply_lora` adapts every ``nn.Linear`` under the targets and returns the
peft model together with a :class:`LoraReport`: the modules matched, the modules rejected and
why, and the trainable parameters and their fraction::

    peft_model, report = apply_lora(model, rank=4)
    report                      # html table in a notebook; report.to_frame(), report.to_dict()
    fit(peft_model, batches, ..., run=run, state_fn=checkpoint_state)   # checkpoints: adapters, not the base
    save_adapters(peft_model, run.path / "adapters")       # the adapters + the base weights they adapt
    merged = merge(peft_model)                             # a plain module for export
    again = load_adapters(build_model(...), run.path / "adapters")   # base weights put back, then the adapters

The adapters alone are a few kB, but they mean nothing without the exact base weights they were
trained on, and those usually live in a cache (``runs/.cache``) that may be deleted. So
:func:`save_adapters` also writes the base weights (``base.safetensors``) into the folder, and
:func:`load_adapters` loads them into the model it is given before it applies the adapters: the
model may be freshly built (randomly initialised), and ``again`` gives the fine-tuned outputs.

peft costs about 2 s to import (it pulls transformers), so it is imported inside the functions.
peft renames the layers it adapts (``encoder.0.q.weight`` -> ``encoder.0.q.base_layer.weight``):
load pretrained weights *before* :func:`apply_lora`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .transfer import unwrap

__all__ = ["LoraReport", "apply_lora", "trainable_state", "checkpoint_state", "base_state", "save_adapters",
           "load_adapters", "merge"]

#: The base weights beside the adapters in a folder :func:`save_adapters` writes.
BASE_FILE = "base.safetensors"


@dataclass
class LoraReport:
    """What :func:`apply_lora` adapted, what it left alone and why, and what trains.

    Attributes
    ----------
    rank, alpha
        LoRA rank and scaling numerator (the update is ``alpha / rank * B @ A``).
    matched
        One row per adapted layer: ``module``, ``type``, ``shape`` (out x in) and ``lora_params``.
    rejected
        One row per other module that holds parameters: ``module``, ``type`` and ``reason``.
    trainable, total
        Parameter counts after adapting (adapters and fully trained parts; all parameters).
    """

    rank: int
    alpha: float
    matched: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        """Trainable parameters / all parameters."""
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        return (f"LoRA rank {self.rank} (alpha {self.alpha:g}): {len(self.matched)} layers adapted, "
                f"{len(self.rejected)} modules left out; {self.trainable:,} of {self.total:,} parameters "
                f"trainable ({self.fraction:.2%})")

    def to_frame(self):
        import pandas as pd

        rows = [{"module": r["module"], "type": r["type"], "status": "adapted",
                 "detail": f"{r['shape']}, +{r['lora_params']:,} parameters"} for r in self.matched]
        rows += [{"module": r["module"], "type": r["type"], "status": "left out", "detail": r["reason"]}
                 for r in self.rejected]
        return pd.DataFrame(rows, columns=["module", "type", "status", "detail"])

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "matched": list(self.matched), "rejected": list(self.rejected),
                "trainable": self.trainable, "total": self.total, "fraction": self.fraction}

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string(index=False)

    def _repr_html_(self) -> str:
        import html

        return f"<p><b>{html.escape(self.summary())}</b></p>" + self.to_frame().to_html(index=False)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _plan(model: nn.Module, targets: Sequence[str], train_fully: Sequence[str]) -> tuple[list, list, list]:
    """(layers to adapt, modules trained in full, rejected rows) for ``model``."""
    adapt, fully, rejected = [], [], []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not name or not own:
            continue
        kind = type(module).__name__
        if any(_under(name, p) for p in train_fully):
            fully.append(name)
            rejected.append({"module": name, "type": kind, "reason": "trained in full (lora_train_fully): "
                             "small, and new in the fine-tuning data"})
        elif not any(_under(name, p) for p in targets):
            rejected.append({"module": name, "type": kind,
                             "reason": f"outside the LoRA targets {list(targets)}: frozen"})
        elif type(module) is not nn.Linear:
            rejected.append({"module": name, "type": kind,
                             "reason": "LoRA adapts nn.Linear layers only here: frozen"})
        else:
            adapt.append(name)
    return adapt, fully, rejected


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    train_fully: Sequence[str] | None = None,
):
    """Wrap ``model`` with peft LoRA adapters on every ``nn.Linear`` under ``targets``.

    Parameters
    ----------
    model
        The (pretrained) model; it is changed in place (peft swaps adapted layers for its own).
    rank
        LoRA rank ``r`` (1 or more).
    alpha
        Scaling numerator; default ``2 * rank``.
    dropout
        Dropout on the adapter input.
    targets
        Module-name prefixes whose linear layers get adapters; default ``model.lora_targets``.
    train_fully
        Module-name prefixes trained in full besides the adapters (peft's ``modules_to_save``);
        default ``model.lora_train_fully`` (none when the model declares none).

    Returns
    -------
    (peft.PeftModel, LoraReport)
        The wrapped model, and what was adapted, left out and trained.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a whole number >= 1 (LoRA ranks 2-16 are usual), e.g. rank=4.")
    targets = tuple(targets if targets is not None else getattr(model, "lora_targets", ()))
    train_fully = tuple(train_fully if train_fully is not None else getattr(model, "lora_train_fully", ()))
    if not targets:
        raise ValueError(f"No LoRA targets: {type(model).__name__} declares no lora_targets and none were given. "
                         "Pass targets= as module-name prefixes, e.g. targets=['encoder', 'head'].")
    adapt, fully, rejected = _plan(model, targets, train_fully)
    if not adapt:
        tops = [name for name, _ in model.named_children()]
        raise ValueError(f"targets={list(targets)} match no nn.Linear layer of {type(model).__name__} "
                         f"(top-level modules: {tops}). Name prefixes that hold linear layers.")
    import peft

    alpha = float(alpha if alpha is not None else 2 * rank)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=adapt,
                             modules_to_save=fully or None)
    wrapped = peft.get_peft_model(model, config)
    inner = unwrap(wrapped)
    matched = []
    for name in adapt:
        layer = inner.get_submodule(name)
        base = layer.base_layer
        extra = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
        matched.append({"module": name, "type": type(base).__name__,
                        "shape": f"{base.out_features} x {base.in_features}", "lora_params": extra})
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    # peft keeps a frozen copy of each fully trained module besides the trained one; count the model once
    total = sum(p.numel() for n, p in inner.named_parameters() if "original_module" not in n and "lora_" not in n)
    report = LoraReport(rank=rank, alpha=alpha, matched=matched, rejected=rejected, trainable=trainable, total=total)
    return wrapped, report


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (adapters, fully trained parts), named as the user's module names them.

    This is what a checkpoint of a LoRA run needs besides the frozen base model, which is
    saved once (or is the pretrained checkpoint itself).
    """
    return {name: p.detach().cpu().clone() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def base_state(model) -> dict[str, torch.Tensor]:
    """The base weights under a peft model's adapters, named as the plain (unadapted) model names them.

    Adapter tensors are left out; an adapted layer's ``base_layer`` and a fully trained module's
    frozen ``original_module`` give the base values.
    """
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[name] = tensor.detach().cpu().clone()
    return state


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run's checkpoints hold: the trainable tensors and the buffers (``fit(state_fn=...)``).

    :func:`workbench.fit` writes this, not the whole model, into ``best.safetensors``,
    ``epochNNN.safetensors`` and ``last.pt`` when given ``state_fn=checkpoint_state``; a resume
    loads it over the model rebuilt on the same base. Buffers travel along because some change in
    training without a gradient (BatchNorm's running statistics), and they are small.
    """
    inner = unwrap(model)
    buffers = {name for name, _ in inner.named_buffers()}
    state = trainable_state(model)
    state.update({name: t.detach().cpu().clone() for name, t in inner.state_dict().items() if name in buffers})
    return state


def save_adapters(model, folder: str | os.PathLike, *, base: bool = True) -> Path:
    """Write the adapters (peft's ``adapter_model.safetensors`` + ``adapter_config.json``) and their base.

    The base weights go to ``base.safetensors`` in the same folder, so that the folder is
    enough to rebuild the fine-tuned model (:func:`load_adapters`) after the cache that held
    the pretrained weights is gone.

    Parameters
    ----------
    model
        A model from :func:`apply_lora`.
    folder
        Created when missing. Under torchrun, rank 0 alone writes it (every rank holds the same adapters).
    base
        Also write the base weights (default). ``False`` where they are kept elsewhere already (a run that saved
        them before training, for its checkpoints), so that they are not stored twice; :func:`load_adapters` then
        needs a model that holds them.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError(f"save_adapters needs the peft model that apply_lora returned, got {type(model).__name__}. "
                        "Use workbench.save_weights for a plain model.")
    from .checkpoints import save_weights
    from .tracking import process_rank

    folder = Path(folder)
    if process_rank() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if base:
        save_weights(base_state(model), folder / BASE_FILE)
    return folder


def load_adapters(model: nn.Module, folder: str | os.PathLike):
    """Put adapters saved by :func:`save_adapters` onto ``model`` for inference.

    When the folder holds the base weights (``base.safetensors``, which :func:`save_adapters`
    writes), they are loaded into ``model`` first, every key of them fitting; ``model`` may then
    be freshly built. A folder without them needs ``model`` to hold the very base weights the
    adapters were trained on already.

    Returns
    -------
    peft.PeftModel
        In eval mode, adapters not trainable.
    """
    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{str(folder)!r} holds no adapter_config.json. Give the folder that "
                                "save_adapters(model, folder) wrote.")
    if (folder / BASE_FILE).is_file():
        from .checkpoints import read_state_dict

        unwrap(model).load_state_dict(read_state_dict(folder / BASE_FILE))
    import peft

    loaded = peft.PeftModel.from_pretrained(model, str(folder))
    return loaded.eval()


def merge(model, *, copy_first: bool = True) -> nn.Module:
    """The model with its adapters merged into the base weights: a plain module for export.

    Parameters
    ----------
    model
        A model from :func:`apply_lora` or :func:`load_adapters`.
    copy_first
        Merge a copy (default), leaving ``model`` and its adapters as they are.
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge needs a peft model (from apply_lora or load_adapters), got {type(model).__name__}.")
    target = copy.deepcopy(model) if copy_first else model
    return target.merge_and_unload()
