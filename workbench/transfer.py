"""Transfer learning: load what fits, say what did not, freeze what should not train.

``load_pretrained`` returns a :class:`LoadReport` instead of logging: loaded keys, shape
mismatches with both shapes, missing and unexpected keys, the prefix remapping it applied, and
the fraction of the model's parameters that came from the checkpoint.

Freezing strategies are named lists of module-name prefixes to freeze:

``full``
    train everything;
``frozen_backbone``
    freeze everything outside the head (``model.head_prefixes``, default ``("head",)``);
``linear_probe``
    freeze everything except the last ``nn.Linear`` of the model;
a list of prefixes
    freeze exactly those modules;
a model's own names
    a model may define ``strategies = {"frozen_decoder": ["decoder"]}``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import read_state_dict

__all__ = [
    "LoadError",
    "LoadReport",
    "load_pretrained",
    "FreezeReport",
    "apply_strategy",
    "available_strategies",
    "head_prefixes",
    "param_groups",
]

#: Prefixes that wrappers commonly add (DataParallel/DDP, Lightning, torch.compile, encoders).
KNOWN_PREFIXES = ("module.", "model.", "_orig_mod.", "encoder.", "backbone.", "net.")
BUILTIN_STRATEGIES = ("full", "frozen_backbone", "linear_probe")
_NORM_WITH_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class LoadError(RuntimeError):
    """Loading a checkpoint left keys missing that the caller did not expect."""


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, key by key.

    Attributes
    ----------
    loaded
        Model keys filled from the checkpoint.
    mismatched
        ``{model_key: (checkpoint_shape, model_shape)}``: present in both, shapes differ, kept
        at the model's initialisation.
    missing
        Model keys the checkpoint did not provide.
    unexpected
        Checkpoint keys (after remapping) that the model does not have.
    prefix_map
        ``{checkpoint_prefix: model_prefix}`` applied to checkpoint keys.
    loaded_fraction
        Loaded parameter elements / all parameter elements of the model.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    prefix_map: dict[str, str] = field(default_factory=dict)
    loaded_fraction: float = 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "mismatched": {k: {"checkpoint": list(a), "model": list(b)} for k, (a, b) in self.mismatched.items()},
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "prefix_map": dict(self.prefix_map),
            "loaded_fraction": self.loaded_fraction,
        }

    def to_frame(self):
        import pandas as pd

        rows = [{"key": k, "status": "loaded", "checkpoint_shape": "", "model_shape": ""} for k in self.loaded]
        rows += [
            {"key": k, "status": "mismatched", "checkpoint_shape": str(tuple(a)), "model_shape": str(tuple(b))}
            for k, (a, b) in self.mismatched.items()
        ]
        rows += [{"key": k, "status": "missing", "checkpoint_shape": "", "model_shape": ""} for k in self.missing]
        rows += [{"key": k, "status": "unexpected", "checkpoint_shape": "", "model_shape": ""} for k in self.unexpected]
        return pd.DataFrame(rows, columns=["key", "status", "checkpoint_shape", "model_shape"])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def summary(self) -> str:
        remap = ", ".join(f"{a!r}->{b!r}" for a, b in self.prefix_map.items()) or "none"
        return (
            f"LoadReport({self.source}): {len(self.loaded)} loaded, {len(self.mismatched)} shape-mismatched, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected; prefix remap: {remap}; "
            f"{self.loaded_fraction:.1%} of model parameters loaded"
        )

    def __repr__(self) -> str:
        lines = [self.summary()]
        for k, (a, b) in self.mismatched.items():
            lines.append(f"  mismatched {k}: checkpoint {tuple(a)} vs model {tuple(b)}")
        lines += [f"  missing    {k}" for k in self.missing]
        lines += [f"  unexpected {k}" for k in self.unexpected]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        problems = self.to_frame().query("status != 'loaded'")
        table = problems.to_html(index=False) if len(problems) else "<p>Every checkpoint key fitted the model.</p>"
        return (
            f"<p><b>{html.escape(self.summary())}</b></p>{table}"
            f"<details><summary>{len(self.loaded)} loaded keys</summary>"
            f"<pre>{html.escape(chr(10).join(self.loaded))}</pre></details>"
        )


def _remap(keys: Sequence[str], prefix_map: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key in keys:
        new = key
        for old, repl in prefix_map.items():
            if key.startswith(old):
                new = repl + key[len(old):]
                break
        out[key] = new
    return out


def _detect_prefix_map(ckpt_keys: Sequence[str], model_keys: set[str]) -> dict[str, str]:
    """Choose the prefix rewrite that makes most checkpoint keys match the model."""
    strip = {""} | {p for p in KNOWN_PREFIXES if any(k.startswith(p) for k in ckpt_keys)}
    firsts = {k.split(".", 1)[0] + "." for k in ckpt_keys if "." in k}
    strip |= {p for p in firsts if sum(k.startswith(p) for k in ckpt_keys) == len(ckpt_keys)}
    add = {""} | {k.split(".", 1)[0] + "." for k in model_keys if "." in k}

    def overlap(pmap: dict[str, str]) -> int:
        return sum(new in model_keys for new in _remap(ckpt_keys, pmap).values())

    best, best_score = {}, overlap({})
    if best_score >= 0.9 * min(len(ckpt_keys), len(model_keys)):
        return best
    for old in sorted(strip):
        for new in sorted(add):
            if old == new:
                continue
            pmap = {old: new}
            score = overlap(pmap)
            if score > best_score:
                best, best_score = pmap, score
    return best


def load_pretrained(
    model: nn.Module,
    source,
    *,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    expect_missing: Sequence[str] | None = None,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    trust_pickle: bool = False,
    run=None,
) -> LoadReport:
    """Load every checkpoint tensor that fits ``model`` and report the rest.

    Parameters
    ----------
    model
        The model to fill in place.
    source
        A checkpoint path (.safetensors, .pt, .pth, .ckpt, .bin) or a (nested) state dict.
    key_map
        ``{checkpoint_prefix: model_prefix}`` or a function of the key. When not given, a common
        wrapper prefix (``module.``, ``model.``, ``encoder.`` ...) is detected automatically
        when the checkpoint's keys overlap the model's poorly.
    expect_missing
        Glob patterns of model keys you expect the checkpoint not to fill (e.g. ``["head.*"]``).
        When given, any other missing or shape-mismatched key raises :class:`LoadError`.
    filter_fn
        ``filter_fn(state_dict, model) -> state_dict`` applied after remapping, to adapt
        tensors (e.g. average input channels) before shapes are compared.
    trust_pickle
        Allow arbitrary pickle checkpoints (see :func:`workbench.checkpoints.read_state_dict`).
    run
        A :class:`workbench.Run`; the report is saved there as ``load_report.json``.
    """
    state = read_state_dict(source, trust_pickle=trust_pickle)
    model_state = model.state_dict()
    model_keys = set(model_state)
    if callable(key_map):
        renamed = {k: key_map(k) for k in state}
        prefix_map = {"<function>": getattr(key_map, "__name__", "key_map")}
    else:
        prefix_map = dict(key_map) if key_map is not None else _detect_prefix_map(list(state), model_keys)
        renamed = _remap(list(state), prefix_map)
    state = {renamed[k]: v for k, v in state.items()}
    if filter_fn is not None:
        state = filter_fn(state, model)

    report = LoadReport(source=str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>")
    report.prefix_map = prefix_map
    to_load = {}
    for key, tensor in state.items():
        if key not in model_keys:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(model_state[key].shape):
            report.mismatched[key] = (tuple(tensor.shape), tuple(model_state[key].shape))
        else:
            to_load[key] = tensor
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in model_keys if k not in state)
    report.unexpected.sort()
    model.load_state_dict(to_load, strict=False)

    numel = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(numel.values())
    report.loaded_fraction = sum(numel.get(k, 0) for k in to_load) / total if total else 0.0

    if expect_missing is not None:
        not_filled = report.missing + list(report.mismatched)
        surprise = [k for k in not_filled if not any(fnmatch.fnmatchcase(k, p) for p in expect_missing)]
        if surprise:
            raise LoadError(
                f"{len(surprise)} model keys were not filled by {report.source} and do not match "
                f"expect_missing={list(expect_missing)}: {surprise[:8]}{' ...' if len(surprise) > 8 else ''}. "
                "If they are meant to start fresh, add a pattern (e.g. 'head.*') to expect_missing; if the "
                f"checkpoint names them differently, pass key_map= (prefix remap applied: {prefix_map or 'none'}; "
                f"unexpected checkpoint keys: {report.unexpected[:5]})."
            )
    if run is not None:
        run.save_load_report(report)
    return report


# --------------------------------------------------------------------------- freezing


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module prefixes that form the model's task head.

    ``model.head_prefixes`` when defined, else ``("head",)`` when the model has a ``head``
    child, else the last child module (a model without children is all head).
    """
    declared = getattr(model, "head_prefixes", None)
    if declared:
        return tuple(declared)
    children = [name for name, _ in model.named_children()]
    if "head" in children:
        return ("head",)
    if not children:
        return ("",)  # a single-layer model is all head
    return (children[-1],)


def available_strategies(model: nn.Module) -> list[str]:
    """Names accepted by :func:`apply_strategy` for this model."""
    return list(BUILTIN_STRATEGIES) + list(getattr(model, "strategies", {}) or {})


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _frozen_prefixes(model: nn.Module, strategy: str | Sequence[str]) -> list[str]:
    if not isinstance(strategy, str):
        return [str(p) for p in strategy]
    custom = getattr(model, "strategies", {}) or {}
    if strategy in custom:
        return list(custom[strategy])
    if strategy == "full":
        return []
    if strategy == "frozen_backbone":
        heads = head_prefixes(model)
        return [name for name, _ in model.named_parameters() if not any(_under(name, h) for h in heads)]
    if strategy == "linear_probe":
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"strategy='linear_probe' needs an nn.Linear in {type(model).__name__}; found none.")
        keep = linears[-1]
        return [name for name, p in model.named_parameters() if not _under(name, keep)]
    raise ValueError(
        f"strategy={strategy!r} is not one of {available_strategies(model)}. Use one of these names, or "
        "pass a list of module-name prefixes to freeze (e.g. strategy=['encoder'])."
    )


def _force_eval(module: nn.Module, args) -> None:
    module.training = False


@dataclass
class FreezeReport:
    """Per-module parameter counts after :func:`apply_strategy`."""

    strategy: str
    rows: list[dict]

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r["params"] for r in self.rows)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["module", "params", "trainable", "frozen", "norm_stats_frozen"])

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "trainable": self.trainable, "total": self.total, "modules": self.rows}

    def summary(self) -> str:
        frac = self.trainable / self.total if self.total else 0.0
        return f"strategy={self.strategy}: {self.trainable:,} of {self.total:,} parameters trainable ({frac:.1%})"

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string(index=False)

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html(index=False)


def apply_strategy(model: nn.Module, strategy: str | Sequence[str] = "full") -> FreezeReport:
    """Freeze the modules a strategy names; unfreeze everything else.

    Frozen parameters get ``requires_grad=False``; their gradients stay ``None``, so optimizers
    skip them entirely (no update, no weight decay). Normalisation layers with running
    statistics (BatchNorm, InstanceNorm) inside a frozen module are kept in eval mode even when
    a parent calls ``.train()``, so their statistics stay bitwise unchanged.

    Calling it again replaces the previous strategy (``apply_strategy(model, "full")`` unfreezes).
    """
    frozen = _frozen_prefixes(model, strategy)
    params = dict(model.named_parameters())
    for prefix in frozen:
        if not any(_under(n, prefix) for n in params):
            top = [name for name, _ in model.named_children()]
            warnings.warn(
                f"Freezing {prefix!r} froze nothing: no parameter of {type(model).__name__} lives under it. "
                f"Top-level modules are {top}.",
                stacklevel=2,
            )
    for name, p in params.items():
        p.requires_grad_(not any(_under(name, prefix) for prefix in frozen))
    for name, module in model.named_modules():
        hook = module.__dict__.pop("_workbench_eval_hook", None)
        if hook is not None:
            hook.remove()
        inside = list(module.parameters())
        is_frozen = any(_under(name, prefix) for prefix in frozen) or (inside and not any(p.requires_grad for p in inside))
        if isinstance(module, _NORM_WITH_STATS) and is_frozen:
            module.__dict__["_workbench_eval_hook"] = module.register_forward_pre_hook(_force_eval)
            module.eval()

    label = strategy if isinstance(strategy, str) else f"custom{list(strategy)}"
    rows = []
    for child, module in model.named_children():
        ps = list(module.parameters())
        n = sum(p.numel() for p in ps)
        t = sum(p.numel() for p in ps if p.requires_grad)
        stats = any("_workbench_eval_hook" in m.__dict__ for m in module.modules())
        rows.append({"module": child, "params": n, "trainable": t, "frozen": n - t, "norm_stats_frozen": stats})
    own = [p for _, p in model.named_parameters(recurse=False)]  # parameters held by the model itself
    if own:
        n = sum(p.numel() for p in own)
        t = sum(p.numel() for p in own if p.requires_grad)
        rows.append({"module": "(own)", "params": n, "trainable": t, "frozen": n - t, "norm_stats_frozen": False})
    report = FreezeReport(label, rows)
    if report.trainable == 0:
        raise ValueError(
            f"No trainable parameters: strategy {label!r} froze every module of {type(model).__name__} "
            f"({report.total:,} parameters). Choose a strategy that leaves the head trainable "
            f"(one of {available_strategies(model)}), or freeze fewer prefixes."
        )
    return report


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    backbone_lr_ratio: float = 1.0,
) -> list[dict]:
    """Optimizer parameter groups for every parameter, frozen ones included.

    Registering frozen parameters up front is what makes later unfreezing work (an optimizer
    built from trainable parameters only would never update them) and gives a resumed run the
    same groups. Groups are named ``head`` / ``backbone``, each split into a decayed part and a
    ``*_no_decay`` part (biases and normalisation weights, 1-D tensors). The backbone learns at
    ``lr * backbone_lr_ratio`` (discriminative learning rates).
    """
    if backbone_lr_ratio <= 0:
        raise ValueError(f"backbone_lr_ratio must be > 0, got {backbone_lr_ratio}; use strategy= to freeze instead.")
    heads = head_prefixes(model)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        part = "head" if any(_under(name, h) for h in heads) else "backbone"
        decay = p.ndim > 1
        key = part if decay else f"{part}_no_decay"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": lr * (1.0 if part == "head" else backbone_lr_ratio),
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    order = ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    return [groups[k] for k in order if k in groups]
