"""Transfer learning: load what fits, say what did not, freeze what should not train.

``load_pretrained`` returns a :class:`LoadReport` instead of logging: loaded keys, shape
mismatches with both shapes, missing and unexpected keys, the prefix remapping it applied, and
the fraction of the model's parameters that came from the checkpoint. When no ``key_map`` is
given and the names do not line up, it tries common prefix rewrites and keeps the one under
which most checkpoint tensors fit the model by name *and* shape; when none fits anything, or
two fit equally well but load different tensors, it raises :class:`LoadError` and asks for
``key_map=`` instead of guessing.

Training wrappers are looked through (see :func:`unwrap`): ``nn.DataParallel``,
``DistributedDataParallel``, ``torch.compile`` and peft's ``PeftModel``. Every function here names
parameters as the user's own module names them (``encoder.0.weight``, not
``module.encoder.0.weight``).

The model's head is the one it declares: ``model.head_prefixes``, else the module returned by a
timm-style ``model.get_classifier()``, else a child named ``head``, ``classifier`` or ``fc``
(else, for ``frozen_backbone`` and :func:`param_groups` only, the last child module).

Freezing strategies name the modules to freeze:

``full``
    train everything;
``frozen_backbone``
    freeze everything outside the head;
``linear_probe``
    freeze everything except the last ``nn.Linear`` inside the head (the head itself when it is
    an ``nn.Linear``); a model without a recognisable head is refused;
a list of prefixes
    freeze exactly those modules (or parameters);
a model's own names
    a model may define ``strategies = {"frozen_decoder": ["decoder"]}``.

Normalisation layers with running statistics (BatchNorm, InstanceNorm) are frozen with the
part of the model they belong to, whether or not they have weights of their own.

A named strategy never freezes a tensor that :func:`load_pretrained` left at its initialisation
(skipped for its shape, missing from the checkpoint, or filled only in part): frozen, it would stay
random for the whole run. Such tensors stay trainable and the :class:`FreezeReport` lists them
(``kept_trainable``). A list of prefixes freezes exactly what it names; the report lists the
tensors it froze at initialisation (``frozen_not_loaded``).

Inputs that have names (genes) meet the checkpoint's by name, not by position, when
``load_pretrained(..., feature_names=FeatureNames(...))`` is given the data's names and the
checkpoint's JSON sidecar lists its own: the tensors along that axis are reordered, and names
on one side only are counted in the report.

Why this module is long: loading, freezing and per-group learning rates share rules that must agree: the same
unwrapping of training wrappers, the same idea of the model's head, and the load report that tells a strategy which
tensors it must not freeze. Split apart, each part would need the others' private helpers; together, each rule is
written once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import read_metadata, read_state_dict

__all__ = [
    "unwrap",
    "LoadError",
    "LoadReport",
    "FeatureNames",
    "load_pretrained",
    "not_loaded",
    "FreezeReport",
    "apply_strategy",
    "available_strategies",
    "head_prefixes",
    "param_groups",
    "layer_prefixes",
    "lr_ratios",
]

#: Prefixes that wrappers commonly add (DataParallel/DDP, Lightning, torch.compile, encoders, ptls's ABSModule).
KNOWN_PREFIXES = ("module.", "model.", "_orig_mod.", "encoder.", "backbone.", "net.", "_seq_encoder.")
BUILTIN_STRATEGIES = ("full", "frozen_backbone", "linear_probe")
_NORM_WITH_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class LoadError(RuntimeError):
    """A checkpoint did not load as asked: unexpected keys left unfilled, or an unclear key prefix."""


# --------------------------------------------------------------------------- wrappers


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module directly inside a known training wrapper, or None when ``model`` is no wrapper.

    Wrappers are recognised by their class, not by attribute names, so a model of your own
    that happens to have a child called ``module`` is left alone. torch.compile and peft are
    only looked up when already imported (a model cannot be wrapped by them otherwise).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return model._orig_mod
    peft_model = sys.modules.get("peft.peft_model")
    if peft_model is not None and isinstance(model, peft_model.PeftModel):
        return model.base_model  # a tuner such as LoraModel (unwrapped next), or the model itself
    peft_tuners = sys.modules.get("peft.tuners.tuners_utils")
    if peft_tuners is not None and isinstance(model, peft_tuners.BaseTuner):
        return model.model
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside training wrappers.

    Peels, as many times as they are nested (e.g. a compiled ``DataParallel``):

    - ``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``),
    - ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``),
    - peft's ``PeftModel`` and its tuner, e.g. ``LoraModel`` (``.base_model.model``).

    The wrappers share their parameters with the module inside, so freezing or loading the
    unwrapped module changes the wrapped one too. A model that is no wrapper is returned as is.

    Parameters
    ----------
    model
        A model, wrapped or not.

    Returns
    -------
    The innermost module.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> unwrap(nn.DataParallel(net)) is net
    True
    """
    inner = _wrapped(model)
    while inner is not None:
        model = inner
        inner = _wrapped(model)
    return model


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
    metadata
        The checkpoint's JSON sidecar (``save_weights(..., metadata=...)``), e.g. the
        fingerprint of a cached pretrained encoder; long lists (gene names) are left out.
    partial
        ``{model_key: why}``: filled in part (inputs met by name, some names only in the data);
        the rest of the tensor keeps the model's initialisation.
    alignment
        How named inputs met the checkpoint's (see :class:`FeatureNames`): ``by`` (the sidecar
        list, or ``"position"`` when the checkpoint names none), ``matched``, ``only_in_data``,
        ``only_in_checkpoint``, ``reordered`` and the first few names on one side only. Empty
        when no ``feature_names`` were given.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    prefix_map: dict[str, str] = field(default_factory=dict)
    loaded_fraction: float = 0.0
    metadata: dict = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    alignment: dict = field(default_factory=dict)

    @property
    def not_loaded(self) -> dict[str, str]:
        """``{model_key: why}`` for every tensor left (wholly or in part) at the model's initialisation."""
        out = {k: f"shape {tuple(a)} in the checkpoint, {tuple(b)} here" for k, (a, b) in self.mismatched.items()}
        out |= {k: "not in the checkpoint" for k in self.missing}
        return out | dict(self.partial)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "mismatched": {k: {"checkpoint": list(a), "model": list(b)} for k, (a, b) in self.mismatched.items()},
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "partial": dict(self.partial),
            "alignment": dict(self.alignment),
            "prefix_map": dict(self.prefix_map),
            "loaded_fraction": self.loaded_fraction,
            "metadata": dict(self.metadata),
        }

    def to_frame(self):
        import pandas as pd

        rows = [{"key": k, "status": "loaded", "checkpoint_shape": "", "model_shape": ""} for k in self.loaded]
        rows += [{"key": k, "status": f"partial ({why})", "checkpoint_shape": "", "model_shape": ""}
                 for k, why in self.partial.items()]
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
        partial = f"{len(self.partial)} partly loaded, " if self.partial else ""
        text = (
            f"LoadReport({self.source}): {len(self.loaded)} loaded, {partial}{len(self.mismatched)} shape-mismatched, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected; prefix remap: {remap}; "
            f"{self.loaded_fraction:.1%} of model parameters loaded"
        )
        return text + (f"; {self.alignment['summary']}" if self.alignment else "")

    def __repr__(self) -> str:
        lines = [self.summary()]
        lines += [f"  partial    {k}: {why}" for k, why in self.partial.items()]
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


@dataclass(frozen=True)
class FeatureNames:
    """The names along one axis of some model tensors, so that a checkpoint meets them by name.

    Attributes
    ----------
    names
        The data's names in the model's order, e.g. the genes of the expression matrix.
    tensors
        ``{model key: axis}`` of the tensors that these names index, e.g.
        ``{"encoder.layers.0.weight": 1}`` for the first ``nn.Linear`` over the genes.
    key
        The list in the checkpoint's JSON sidecar (``save_weights(..., metadata={key: [...]})``)
        that names the checkpoint's own order.
    """

    names: Sequence[str]
    tensors: Mapping[str, int]
    key: str = "genes"


def _first_repeats(names: Sequence[str], n: int = 5) -> list[str]:
    seen, repeats = set(), []
    for name in names:
        if name in seen and name not in repeats:
            repeats.append(name)
        seen.add(name)
    return repeats[:n]


def _align_by_name(state: dict, model_state: Mapping, spec: FeatureNames, checkpoint_names, source: str):
    """Reorder ``spec.tensors`` of the checkpoint ``state`` from its names to the data's.

    Returns ``(state, partial, alignment)``: the state with those tensors in the data's order
    (names only in the data keep the model's current values, names only in the checkpoint are
    dropped), ``{key: why}`` for tensors filled in part, and the counts for the report.

    Raises
    ------
    LoadError
        When no name is shared, when a side repeats a name, or when a tensor's length along its
        axis differs from the number of names the checkpoint lists.
    """
    data_names = [str(n) for n in spec.names]
    if checkpoint_names is None:
        summary = (f"inputs met by position: the checkpoint's sidecar lists no {spec.key!r}, so its "
                   f"{len(data_names)} inputs are assumed to be in the data's order")
        warnings.warn(f"{source}: {summary}. Save the checkpoint with save_weights(..., metadata="
                      f"{{{spec.key!r}: [...]}}) to have them met by name.", stacklevel=3)
        return state, {}, {"by": "position", "summary": summary}
    ckpt_names = [str(n) for n in checkpoint_names]
    if ckpt_names == data_names:
        summary = f"{len(data_names)} {spec.key} met by name, in the same order"
        return state, {}, {"by": spec.key, "matched": len(data_names), "only_in_data": 0, "only_in_checkpoint": 0,
                           "reordered": False, "summary": summary}
    for side, names in (("the data", data_names), ("the checkpoint", ckpt_names)):
        repeats = _first_repeats(names)
        if repeats:
            raise LoadError(
                f"{side} repeats {spec.key} {repeats}, so the checkpoint's inputs cannot be met by name. Make the "
                "names unique (e.g. adata.var_names_make_unique() before writing the data, or before pretraining).")
    where = {name: i for i, name in enumerate(ckpt_names)}
    common = [i for i, name in enumerate(data_names) if name in where]
    only_data = [name for name in data_names if name not in where]
    data_set = set(data_names)
    only_ckpt = [name for name in ckpt_names if name not in data_set]
    if not common:
        raise LoadError(
            f"None of the data's {len(data_names)} {spec.key} is among the checkpoint's {len(ckpt_names)} "
            f"(data: {data_names[:5]}, checkpoint: {ckpt_names[:5]}). Use data and a checkpoint with the same naming "
            "(e.g. both gene symbols, or both Ensembl ids), or pretrained_checkpoint='pretrain' / 'none'.")
    model_idx = torch.tensor(common, dtype=torch.long)
    ckpt_idx = torch.tensor([where[data_names[i]] for i in common], dtype=torch.long)
    state = dict(state)
    partial = {}
    for key, axis in spec.tensors.items():
        if key not in state or key not in model_state:
            continue
        tensor, current = state[key], model_state[key]
        if tensor.shape[axis] != len(ckpt_names) or current.shape[axis] != len(data_names):
            raise LoadError(
                f"{key} has {tensor.shape[axis]} entries along axis {axis} in the checkpoint and "
                f"{current.shape[axis]} in the model, but the checkpoint lists {len(ckpt_names)} {spec.key} and the "
                f"data {len(data_names)}. Name the tensor and axis that the {spec.key} index in FeatureNames.tensors.")
        other = [d for i, d in enumerate(tensor.shape) if i != axis]
        if other != [d for i, d in enumerate(current.shape) if i != axis]:
            continue  # another width: left to the shape check, which reports it as mismatched
        merged = current.detach().clone().to(tensor.dtype)
        merged.index_copy_(axis, model_idx, tensor.index_select(axis, ckpt_idx))
        state[key] = merged
        if only_data:
            partial[key] = (f"{len(only_data)} of {len(data_names)} {spec.key} are not in the checkpoint; "
                            "their entries keep the model's initialisation")
    reordered = [data_names[i] for i in common] != [n for n in ckpt_names if n in data_set]
    summary = (f"{len(common)} {spec.key} met by name{' and reordered' if reordered else ''}; "
               f"{len(only_data)} only in the data (kept at initialisation, trainable), "
               f"{len(only_ckpt)} only in the checkpoint (dropped)")
    alignment = {"by": spec.key, "matched": len(common), "only_in_data": len(only_data),
                 "only_in_checkpoint": len(only_ckpt), "reordered": reordered,
                 "first_only_in_data": only_data[:5], "first_only_in_checkpoint": only_ckpt[:5], "summary": summary}
    return state, partial, alignment


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


def _describe_map(prefix_map: Mapping[str, str]) -> str:
    """``'module.' -> ''`` for a one-entry prefix map, ``no rewrite`` for an empty one."""
    if not prefix_map:
        return "no rewrite"
    return ", ".join(f"{old!r} -> {new!r}" for old, new in prefix_map.items())


def _detect_prefix_map(
    ckpt_shapes: Mapping[str, tuple[int, ...]], model_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
    """Choose the prefix rewrite under which most checkpoint tensors fit the model.

    A checkpoint key counts for a rewrite only when its rewritten name is a model key *and*
    the two shapes agree: a rewrite that matches names but loads nothing is worth nothing.

    Parameters
    ----------
    ckpt_shapes
        ``{checkpoint key: shape}``.
    model_shapes
        ``{model key: shape}``.

    Returns
    -------
    ``{checkpoint_prefix: model_prefix}``, empty when the keys fit as they are.

    Raises
    ------
    LoadError
        When the checkpoint is not empty but the best rewrite loads nothing, or when two
        rewrites load equally many tensors but not the same ones. The message lists the
        candidates with their scores.
    """
    ckpt_keys = list(ckpt_shapes)

    def fitting(prefix_map: dict[str, str]) -> frozenset[str]:
        """Model keys that the checkpoint fills under ``prefix_map`` (name and shape agree)."""
        fitted = set()
        for old, new in _remap(ckpt_keys, prefix_map).items():
            if new in model_shapes and tuple(model_shapes[new]) == tuple(ckpt_shapes[old]):
                fitted.add(new)
        return frozenset(fitted)

    def name_matches(prefix_map: dict[str, str]) -> int:
        return sum(new in model_shapes for new in _remap(ckpt_keys, prefix_map).values())

    as_is = fitting({})
    if len(as_is) >= 0.9 * min(len(ckpt_keys), len(model_shapes)):
        return {}

    strip = {""} | {p for p in KNOWN_PREFIXES if any(k.startswith(p) for k in ckpt_keys)}
    firsts = {k.split(".", 1)[0] + "." for k in ckpt_keys if "." in k}
    strip |= {p for p in firsts if all(k.startswith(p) for k in ckpt_keys)}
    add = {""} | {k.split(".", 1)[0] + "." for k in model_shapes if "." in k}
    candidates = [({}, as_is)]
    for old in sorted(strip):
        for new in sorted(add):
            if old != new:
                candidates.append(({old: new}, fitting({old: new})))

    best_score = max(len(fitted) for _, fitted in candidates)
    best = [(pmap, fitted) for pmap, fitted in candidates if len(fitted) == best_score]
    if best_score > 0 and len({fitted for _, fitted in best}) == 1:
        return best[0][0]

    # No clear winner: list the candidates under which some names match, and ask for key_map=.
    ranked = sorted(candidates, key=lambda c: (len(c[1]), name_matches(c[0])), reverse=True)
    promising = [(pmap, fitted) for pmap, fitted in ranked if name_matches(pmap) > 0]
    if promising:
        listed = "; ".join(
            f"{_describe_map(pmap)} loads {len(fitted)} (names match for {name_matches(pmap)})"
            for pmap, fitted in promising[:6]
        )
        example = next((pmap for pmap, _ in promising if pmap), {"old_prefix.": "new_prefix."})
    else:
        listed = "none of the tried prefix rewrites makes any checkpoint name match a model name"
        example = {"old_prefix.": "new_prefix."}
    if best_score == 0:
        problem = (
            f"the best prefix rewrite loads nothing (none of the {len(ckpt_keys)} checkpoint tensors fits a "
            "model tensor by both name and shape)"
        )
    else:
        tied = " and ".join(_describe_map(pmap) for pmap, _ in best)
        problem = f"{tied} each load {best_score} tensors, but different ones"
    raise LoadError(
        f"Could not tell how the checkpoint's keys map to the model's: {problem}. Candidates: {listed}. "
        f"Checkpoint keys look like {ckpt_keys[:3]}, model keys like {list(model_shapes)[:3]}. "
        f"Pass key_map= explicitly as {{checkpoint_prefix: model_prefix}}, e.g. key_map={example!r}, "
        "or key_map={} to load the names as they are."
    )


def load_pretrained(
    model: nn.Module,
    source,
    *,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    expect_missing: Sequence[str] | None = None,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    feature_names: FeatureNames | None = None,
    trust_pickle: bool = False,
    run=None,
) -> LoadReport:
    """Load every checkpoint tensor that fits ``model`` and report the rest.

    Parameters
    ----------
    model
        The model to fill in place. Training wrappers (DataParallel, torch.compile, peft) are
        looked through (:func:`unwrap`); the report names keys as the inner module does.
    source
        A checkpoint path (.safetensors, .pt, .pth, .ckpt, .bin) or a (nested) state dict.
    key_map
        ``{checkpoint_prefix: model_prefix}`` or a function of the key. When not given, a common
        wrapper prefix (``module.``, ``model.``, ``encoder.`` ...) is detected automatically
        when the checkpoint's keys overlap the model's poorly: the rewrite under which most
        checkpoint tensors fit by name and shape wins. When no rewrite fits anything, or two
        fit equally well but load different tensors, :class:`LoadError` asks for ``key_map=``.
    expect_missing
        Glob patterns of model keys you expect the checkpoint not to fill (e.g. ``["head.*"]``).
        When given, any other missing or shape-mismatched key raises :class:`LoadError`.
    filter_fn
        ``filter_fn(state_dict, model) -> state_dict`` applied after remapping, to adapt
        tensors (e.g. average input channels) before shapes are compared. It receives the
        unwrapped model.
    feature_names
        The data's names along an input axis (:class:`FeatureNames`, e.g. genes): the named
        tensors are reordered from the order the checkpoint's sidecar lists to the data's
        (after ``key_map``, before ``filter_fn``). Names only in the data keep the model's
        initialisation (the tensor is reported ``partial`` and no named strategy freezes it);
        names only in the checkpoint are dropped; both are counted in ``report.alignment``.
        A checkpoint whose sidecar lists no names loads by position, with a warning.
    trust_pickle
        Allow arbitrary pickle checkpoints (see :func:`workbench.checkpoints.read_state_dict`).
    run
        A :class:`workbench.Run`; the report is saved there as ``load_report.json``.

    Returns
    -------
    What was loaded, mismatched, missing and unexpected.

    Raises
    ------
    LoadError
        When keys outside ``expect_missing`` stay unfilled, or when the key prefix cannot be
        detected unambiguously (see ``key_map``).

    Notes
    -----
    peft renames the layers it adapts (``encoder.0.weight`` becomes
    ``encoder.0.base_layer.weight``): load pretrained weights before ``get_peft_model``.
    """
    model = unwrap(model)  # load into the user's module, so keys read "encoder.0.weight", not "module.encoder..."
    state = read_state_dict(source, trust_pickle=trust_pickle)
    model_state = model.state_dict()
    model_keys = set(model_state)
    if callable(key_map):
        renamed = {k: key_map(k) for k in state}
        prefix_map = {"<function>": getattr(key_map, "__name__", "key_map")}
    elif key_map is not None:
        prefix_map = dict(key_map)
        renamed = _remap(list(state), prefix_map)
    else:
        ckpt_shapes = {k: tuple(v.shape) for k, v in state.items()}
        model_shapes = {k: tuple(v.shape) for k, v in model_state.items()}
        prefix_map = _detect_prefix_map(ckpt_shapes, model_shapes)
        renamed = _remap(list(state), prefix_map)
    state = {renamed[k]: v for k, v in state.items()}
    report = LoadReport(source=str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>")
    if feature_names is not None:
        listed = _sidecar(source, whole=True).get(feature_names.key)
        state, report.partial, report.alignment = _align_by_name(
            state, model_state, feature_names, listed if isinstance(listed, list) else None, report.source)
    if filter_fn is not None:
        state = filter_fn(state, model)

    report.prefix_map = prefix_map
    report.metadata = _sidecar(source)
    to_load = {}
    for key, tensor in state.items():
        if key not in model_keys:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(model_state[key].shape):
            report.mismatched[key] = (tuple(tensor.shape), tuple(model_state[key].shape))
        else:
            to_load[key] = tensor
    report.partial = {k: why for k, why in report.partial.items() if k in to_load}
    report.loaded = sorted(k for k in to_load if k not in report.partial)
    report.missing = sorted(k for k in model_keys if k not in state)
    report.unexpected.sort()
    model.load_state_dict(to_load, strict=False)
    _record_load(model, loaded=report.loaded, not_loaded=report.not_loaded, partial=report.partial)

    numel = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(numel.values())
    share = report.alignment.get("matched", 0) / len(feature_names.names) if report.partial else 1.0
    filled = sum(numel.get(k, 0) * (share if k in report.partial else 1.0) for k in to_load)
    report.loaded_fraction = filled / total if total else 0.0

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


def _sidecar(source, *, whole: bool = False) -> dict:
    """The metadata stored by ``save_weights(..., metadata=...)`` (:func:`~workbench.checkpoints.read_metadata`).

    Long lists (gene names) are left out unless ``whole``.
    """
    if not isinstance(source, (str, os.PathLike)):
        return {}
    meta = read_metadata(source)
    if whole:
        return meta
    return {k: v for k, v in meta.items() if not (isinstance(v, list) and len(v) > 20)}


#: Where :func:`load_pretrained` records, on the unwrapped model, what it loaded and what it left at initialisation.
_LOADED, _NOT_LOADED = "_workbench_loaded", "_workbench_not_loaded"


def _record_load(model: nn.Module, *, loaded, not_loaded: Mapping[str, str], partial) -> None:
    """Remember which tensors hold checkpoint values and which were left at initialisation.

    Over several loads, a tensor counts as loaded once a load filled it in full (a later load
    that skips it leaves those values in place); a later partial fill puts it back among the
    tensors at initialisation.
    """
    ever = (model.__dict__.get(_LOADED, set()) - set(partial)) | set(loaded)
    left = {**model.__dict__.get(_NOT_LOADED, {}), **not_loaded}
    model.__dict__[_LOADED] = ever
    model.__dict__[_NOT_LOADED] = {k: why for k, why in left.items() if k not in ever}


def not_loaded(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the tensors that :func:`load_pretrained` left at initialisation in ``model``.

    Empty for a model that no checkpoint was loaded into. Names are the unwrapped model's.
    """
    return dict(unwrap(model).__dict__.get(_NOT_LOADED, {}))


# --------------------------------------------------------------------------- freezing


def _declared_head(model: nn.Module) -> tuple[str, ...] | None:
    """The head the model declares, or None when it declares none.

    Looked for in this order: ``model.head_prefixes``; the module(s) returned by a timm-style
    ``model.get_classifier()``, named by finding them among the model's modules; a child named
    ``head``, ``classifier`` or ``fc``.
    """
    declared = getattr(model, "head_prefixes", None)
    if isinstance(declared, str):
        return (declared,)
    if declared:
        return tuple(declared)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        classifiers = classifier if isinstance(classifier, (tuple, list)) else [classifier]
        names = tuple(name for name, module in model.named_modules() if any(module is c for c in classifiers))
        if names:
            return names
    children = [name for name, _ in model.named_children()]
    for name in ("head", "classifier", "fc"):
        if name in children:
            return (name,)
    return None


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module prefixes that form the model's task head.

    The head the model declares (``model.head_prefixes``, else ``model.get_classifier()``, else
    a child named ``head``, ``classifier`` or ``fc``), else the last child module (a model
    without children is all head). Wrappers are looked through (:func:`unwrap`).

    Parameters
    ----------
    model
        The model, wrapped or not.

    Returns
    -------
    Module names as the unwrapped model names them, e.g. ``("head",)``.
    """
    model = unwrap(model)
    declared = _declared_head(model)
    if declared:
        return declared
    children = [name for name, _ in model.named_children()]
    if not children:
        return ("",)  # a single-layer model is all head
    return (children[-1],)


def available_strategies(model: nn.Module) -> list[str]:
    """Names accepted by :func:`apply_strategy` for this model (wrapped or not)."""
    return list(dict.fromkeys([*BUILTIN_STRATEGIES, *(getattr(unwrap(model), "strategies", {}) or {})]))  # a model may redefine one


def _under(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _parent(name: str) -> str:
    """``"encoder.0"`` for ``"encoder.0.weight"``; ``""`` (the model itself) for a top-level name."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _holds_state(module: nn.Module) -> bool:
    """Whether a module has parameters or buffers anywhere inside (a ReLU has neither)."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _prefixes_outside(model: nn.Module, keep: Sequence[str]) -> list[str]:
    """The fewest module (and parameter) names that cover everything outside ``keep``.

    A module that holds nothing of ``keep`` is named whole (``"encoder"``); a module that holds
    part of it is looked into (``"head.0"`` when only ``"head.2"`` is kept). Parameters held
    directly by such a module, e.g. a ``pos_embed`` on the model itself, are named one by one.
    Modules without parameters or buffers (activations, dropout) are left out.
    """
    named = [(name, module) for name, module in model.named_modules() if name and _holds_state(module)]
    named += list(model.named_parameters())
    prefixes = []
    for name, _ in named:
        if any(_under(name, k) or _under(k, name) for k in keep):
            continue  # inside the kept part, or holds some of it
        if any(_under(k, _parent(name)) for k in keep):
            prefixes.append(name)  # its parent holds some of the kept part: this is a whole frozen branch
    return prefixes


def _frozen_prefixes(model: nn.Module, strategy: str | Sequence[str]) -> list[str]:
    """Names of the modules (or single parameters) that ``strategy`` freezes in ``model``.

    Built-in strategies return module names (``["encoder"]``), so a module without parameters
    of its own, such as ``BatchNorm1d(affine=False)``, counts as frozen when it lies under one.
    """
    if not isinstance(strategy, str):
        return [str(p) for p in strategy]
    custom = getattr(model, "strategies", {}) or {}
    if strategy in custom:
        return list(custom[strategy])
    if strategy == "full":
        return []
    if strategy == "frozen_backbone":
        return _prefixes_outside(model, head_prefixes(model))
    if strategy == "linear_probe":
        return _prefixes_outside(model, (_probe_layer(model),))
    raise ValueError(
        f"strategy={strategy!r} is not one of {available_strategies(model)}. Use one of these names, or "
        "pass a list of module-name prefixes to freeze (e.g. strategy=['encoder'])."
    )


def _probe_layer(model: nn.Module) -> str:
    """Name of the layer ``linear_probe`` trains: the last ``nn.Linear`` inside the declared head."""
    heads = _declared_head(model)
    if heads is None:
        children = [name for name, _ in model.named_children()]
        example = children[-1] if children else "head"
        raise ValueError(
            f"strategy='linear_probe' could not find the head of {type(model).__name__}: it looked for a "
            "head_prefixes attribute, a get_classifier() method and a child named 'head', 'classifier' or "
            f"'fc', and found none (top-level modules: {children}). Declare the head on the model, e.g. "
            f"head_prefixes = ({example!r},) in its class, or pass a list of prefixes to freeze instead "
            f"(e.g. strategy={children[:1]})."
        )
    linears = []
    for name, module in model.named_modules():
        # peft's LoRA wraps an adapted nn.Linear in a layer with a .base_layer: that layer is the linear
        # layer here (base weights and adapters together), not the small nn.Linear adapters inside it.
        is_linear = isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)
        inside_another = any(_under(name, outer) for outer in linears)
        if is_linear and not inside_another and any(_under(name, h) for h in heads):
            linears.append(name)
    if not linears:
        raise ValueError(
            f"strategy='linear_probe' trains the last nn.Linear of the head, but the head {list(heads)} of "
            f"{type(model).__name__} holds no nn.Linear. Use strategy='frozen_backbone' to train the whole "
            "head, or pass a list of prefixes to freeze."
        )
    return linears[-1]


def _norm_stats_frozen(model: nn.Module, name: str, module: nn.Module, frozen: Sequence[str]) -> bool:
    """Whether a normalisation layer's running statistics must stay fixed.

    They do when the layer lies under a frozen prefix; or when it has parameters and all are
    frozen; or, for a layer without parameters (``affine=False``), when the nearest enclosing
    module that has parameters has all of them frozen.
    """
    if any(_under(name, prefix) for prefix in frozen):
        return True
    holder = module
    while not any(True for _ in holder.parameters()):
        if name == "":
            return False  # nothing in the whole model has parameters
        name = _parent(name)
        holder = model.get_submodule(name)
    return not any(p.requires_grad for p in holder.parameters())


def _force_eval(module: nn.Module, args) -> None:
    module.training = False


@dataclass
class FreezeReport:
    """Per-module parameter counts after :func:`apply_strategy`.

    Attributes
    ----------
    kept_trainable
        ``{parameter: why}``: the strategy would freeze it, but the checkpoint did not load it,
        so it stays trainable (a frozen tensor at initialisation would stay random all run).
    frozen_not_loaded
        ``{parameter: why}``: frozen although the checkpoint did not load it, because a list of
        prefixes named it explicitly.
    """

    strategy: str
    rows: list[dict]
    kept_trainable: dict[str, str] = field(default_factory=dict)
    frozen_not_loaded: dict[str, str] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r["params"] for r in self.rows)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["module", "params", "trainable", "frozen", "norm_stats_frozen",
                                                "kept_trainable"])

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "trainable": self.trainable, "total": self.total, "modules": self.rows,
                "kept_trainable": dict(self.kept_trainable), "frozen_not_loaded": dict(self.frozen_not_loaded)}

    def summary(self) -> str:
        frac = self.trainable / self.total if self.total else 0.0
        text = f"strategy={self.strategy}: {self.trainable:,} of {self.total:,} parameters trainable ({frac:.1%})"
        if self.kept_trainable:
            text += (f"; kept trainable, not loaded from the checkpoint (at initialisation): "
                     f"{_listed(self.kept_trainable)}")
        if self.frozen_not_loaded:
            text += (f"; frozen as listed though the checkpoint did not load them (they stay at initialisation): "
                     f"{_listed(self.frozen_not_loaded)}")
        return text

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string(index=False)

    def _repr_html_(self) -> str:
        import html

        return f"<p><b>{html.escape(self.summary())}</b></p>" + self.to_frame().to_html(index=False)


def _listed(reasons: Mapping[str, str], n: int = 6) -> str:
    shown = ", ".join(f"{name} ({why})" for name, why in list(reasons.items())[:n])
    return shown + (f" and {len(reasons) - n} more" if len(reasons) > n else "")


def apply_strategy(model: nn.Module, strategy: str | Sequence[str] = "full") -> FreezeReport:
    """Freeze the modules a strategy names; unfreeze everything else.

    Frozen parameters get ``requires_grad=False``; their gradients stay ``None``, so optimizers
    skip them entirely (no update, no weight decay). Normalisation layers with running
    statistics (BatchNorm, InstanceNorm) are kept in eval mode even when a parent calls
    ``.train()``, so their statistics stay bitwise unchanged, when they lie inside a frozen
    module, or have parameters that are all frozen, or (``affine=False``, no parameters) sit in
    a module whose parameters are all frozen.

    Calling it again replaces the previous strategy (``apply_strategy(model, "full")`` unfreezes).

    A named strategy (built in, or the model's own) never freezes a tensor that
    :func:`load_pretrained` left at initialisation (shape-mismatched, missing, or partly
    filled): it stays trainable, with its normalisation statistics, and the report lists it
    in ``kept_trainable``. A list of prefixes freezes what it names; the report lists such
    tensors in ``frozen_not_loaded``.

    Parameters
    ----------
    model
        The model; training wrappers (DataParallel, torch.compile, peft) are looked through
        (:func:`unwrap`), and the report names modules as the inner model does.
    strategy
        ``"full"``, ``"frozen_backbone"``, ``"linear_probe"``, a name from the model's own
        ``strategies``, or a list of module (or parameter) name prefixes to freeze. See the
        module docstring.

    Returns
    -------
    Parameter counts per top-level module.
    """
    model = unwrap(model)
    frozen = _frozen_prefixes(model, strategy)
    params = dict(model.named_parameters())
    norms = {name: module for name, module in model.named_modules() if isinstance(module, _NORM_WITH_STATS)}
    for prefix in frozen:
        if not any(_under(n, prefix) for n in list(params) + list(norms)):
            top = [name for name, _ in model.named_children()]
            warnings.warn(
                f"Freezing {prefix!r} froze nothing: no parameter or normalisation statistics of "
                f"{type(model).__name__} live under it. Top-level modules are {top}.",
                stacklevel=2,
            )
    unloaded = model.__dict__.get(_NOT_LOADED, {})
    named = isinstance(strategy, str)  # a named strategy keeps tensors at initialisation trainable
    kept, frozen_unloaded = {}, {}
    for name, p in params.items():
        freeze = any(_under(name, prefix) for prefix in frozen)
        if freeze and name in unloaded:
            if named:
                kept[name], freeze = unloaded[name], False
            else:
                frozen_unloaded[name] = unloaded[name]
        p.requires_grad_(not freeze)
    for name, module in model.named_modules():
        hook = module.__dict__.pop("_workbench_eval_hook", None)
        if hook is not None:
            hook.remove()
    for name, module in norms.items():
        fresh = named and any((f"{name}.{key}" if name else key) in unloaded for key in module.state_dict())
        if not fresh and _norm_stats_frozen(model, name, module, frozen):
            module.__dict__["_workbench_eval_hook"] = module.register_forward_pre_hook(_force_eval)
            module.eval()

    label = strategy if isinstance(strategy, str) else f"custom{list(strategy)}"
    rows = []
    for child, module in model.named_children():
        named_ps = [(f"{child}.{n}", p) for n, p in module.named_parameters()]
        n = sum(p.numel() for _, p in named_ps)
        t = sum(p.numel() for _, p in named_ps if p.requires_grad)
        k = sum(p.numel() for full, p in named_ps if full in kept)
        stats = any("_workbench_eval_hook" in m.__dict__ for m in module.modules())
        rows.append({"module": child, "params": n, "trainable": t, "frozen": n - t, "norm_stats_frozen": stats,
                     "kept_trainable": k})
    own = list(model.named_parameters(recurse=False))  # parameters held by the model itself
    if own:
        n = sum(p.numel() for _, p in own)
        t = sum(p.numel() for _, p in own if p.requires_grad)
        k = sum(p.numel() for name, p in own if name in kept)
        rows.append({"module": "(own)", "params": n, "trainable": t, "frozen": n - t, "norm_stats_frozen": False,
                     "kept_trainable": k})
    report = FreezeReport(label, rows, kept_trainable=kept, frozen_not_loaded=frozen_unloaded)
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
    layer_decay: float | None = None,
    layers: Sequence[str | Sequence[str]] | None = None,
) -> list[dict]:
    """Optimizer parameter groups for every parameter, frozen ones included.

    Registering frozen parameters up front is what makes later unfreezing work (an optimizer
    built from trainable parameters only would never update them) and gives a resumed run the
    same groups. Groups are named ``head`` / ``backbone`` (the head as :func:`head_prefixes`
    finds it), each split into a decayed part and a ``*_no_decay`` part. No decay goes to
    biases and normalisation weights (1-D tensors) and to what the model's timm-style
    ``no_weight_decay()`` names (e.g. ``{"pos_embed", "cls_token"}``; a name matches a parameter
    exactly or as a module prefix: ``"pos"`` matches ``"pos.weight"``). The backbone learns at
    ``lr * backbone_lr_ratio`` (discriminative learning rates).

    With ``layer_decay`` (layer-wise LR decay, as in BEiT/ELECTRA fine-tuning and timm's
    ``layer_decay``) the backbone is split by depth into ``n`` layers (see :func:`layer_prefixes`)
    and layer ``i`` (0 = nearest the input) learns at
    ``lr * backbone_lr_ratio * layer_decay ** (n - i)``: the LR falls geometrically from the head
    down. Backbone parameters outside every layer (a stem or embedding before the stack) sit one
    below layer 0, at ``layer_decay ** (n + 1)`` (timm's layout). The two compose by multiplication:
    ``backbone_lr_ratio`` scales the whole backbone, ``layer_decay`` shapes it within. Freezing
    composes too: every layer keeps its group (and LR) while frozen, so a layer that is unfrozen
    later (``freeze_epochs``) trains at its own decayed rate. Groups are then named
    ``stem``, ``layer0`` ... ``layer{n-1}``, ``head`` (each with its ``*_no_decay`` part).

    Parameters
    ----------
    model
        The model; training wrappers are looked through (:func:`unwrap`).
    lr
        Learning rate of the head.
    weight_decay
        Weight decay of the decayed groups.
    backbone_lr_ratio
        The backbone's learning rate as a fraction of ``lr``; must be > 0.
    layer_decay
        None (off), or the factor in (0, 1] by which each layer's LR is below the next one's.
    layers
        The backbone's layers from the input to the head, each a module prefix or a list of
        prefixes; default :func:`layer_prefixes` (the model's ``layer_groups()``, else its
        largest ``Sequential`` / ``ModuleList`` stack).

    Returns
    -------
    Groups in the order backbone, backbone_no_decay, head, head_no_decay (empty ones left out;
    with ``layer_decay``: stem, layer0 ... head), each a dict with ``name``, ``params``, ``lr``
    and ``weight_decay``.
    """
    if backbone_lr_ratio <= 0:
        raise ValueError(f"backbone_lr_ratio must be > 0, got {backbone_lr_ratio}; use strategy= to freeze instead.")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.75), got {layer_decay}; None turns it off.")
    model = unwrap(model)
    heads = head_prefixes(model)
    no_decay_names = _no_weight_decay(model)
    depth = _depth_of(model, heads, layers) if layer_decay is not None else None
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        part, scale = "head", 1.0
        if not any(_under(name, h) for h in heads):
            part, scale = "backbone", backbone_lr_ratio
            if depth is not None:
                part, power = depth(name)
                scale *= layer_decay ** power
        decay = p.ndim > 1 and not any(_under(name, n) for n in no_decay_names)
        key = part if decay else f"{part}_no_decay"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    parts = ["backbone"] if depth is None else ["stem"] + [f"layer{i}" for i in range(depth.n)]
    order = [k for part in parts + ["head"] for k in (part, f"{part}_no_decay")]
    return [groups[k] for k in order if k in groups]


def lr_ratios(groups: Sequence[dict], *, lr: float) -> dict[str, float]:
    """``{group: lr multiplier}`` of :func:`param_groups`' groups, one entry per LR (``*_no_decay`` folded in).

    What :func:`workbench.lr_curve` takes as ``groups=``, so the LR preview draws one line per layer.
    """
    out: dict[str, float] = {}
    for group in groups:
        name = group["name"].removesuffix("_no_decay")
        out.setdefault(name, group["lr"] / lr)
    return out


def layer_prefixes(model: nn.Module) -> list[list[str]]:
    """The backbone's layers from the input to the head, each a list of module prefixes.

    The model's own ``layer_groups()`` when it has one (a list whose items are a prefix or a
    list of prefixes, input first), else the children that hold parameters of the largest
    ``nn.Sequential`` / ``nn.ModuleList`` outside the head (a transformer's block list, an MLP's
    layer stack; with a tie, the outermost).

    Raises
    ------
    ValueError
        When the model declares nothing and holds no stack of two or more layers.
    """
    model = unwrap(model)
    declared = getattr(model, "layer_groups", None)
    if callable(declared):
        return [[item] if isinstance(item, str) else list(item) for item in declared()]
    heads = head_prefixes(model)
    best: list[str] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        children = [f"{prefix}.{n}" if prefix else n for n, child in module.named_children()
                    if any(True for _ in child.parameters())]
        children = [c for c in children if not any(_under(c, h) for h in heads)]
        if len(children) > len(best):
            best = children
    if len(best) < 2:
        raise ValueError(
            f"layer_decay needs the layers of {type(model).__name__}'s backbone, and it has no nn.Sequential or "
            "nn.ModuleList stack of two or more layers. Give the model a layer_groups() method returning its layer "
            "prefixes from the input up (e.g. ['embed', 'blocks.0', 'blocks.1']), or pass layers=[...] to "
            "param_groups."
        )
    return [[c] for c in best]


class _Depth:
    """Maps a backbone parameter name to ``(group name, decay power)``."""

    def __init__(self, layers: list[list[str]]):
        self.layers, self.n = layers, len(layers)

    def __call__(self, name: str) -> tuple[str, int]:
        for i in reversed(range(self.n)):  # the deepest match wins for nested prefixes
            if any(_under(name, prefix) for prefix in self.layers[i]):
                return f"layer{i}", self.n - i
        return "stem", self.n + 1


def _depth_of(model: nn.Module, heads, layers) -> _Depth:
    found = layer_prefixes(model) if layers is None else [[x] if isinstance(x, str) else list(x) for x in layers]
    names = [name for name, _ in model.named_parameters()]
    for prefixes in found:
        for prefix in prefixes:
            if not any(_under(name, prefix) for name in names):
                raise ValueError(f"layer prefix {prefix!r} matches no parameter of {type(model).__name__}; "
                                 f"parameters start with {sorted({n.split('.')[0] for n in names})}.")
    return _Depth(found)


def _no_weight_decay(model: nn.Module) -> list[str]:
    """Names the model exempts from weight decay through a timm-style ``no_weight_decay()``."""
    method = getattr(model, "no_weight_decay", None)
    if not callable(method):
        return []
    return [str(name) for name in method() if str(name)]  # an empty name would match every parameter
