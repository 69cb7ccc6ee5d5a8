"""The notebook's steps, in its order: pretraining (through :mod:`workbench.protocol`), loading a checkpoint,
LoRA or full fine-tuning, prediction, the ridge baseline on the model's rows, the evaluation, permutation importance."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ... import protocol
from ...checkpoints import save_weights
from ...devices import to_model, to_numpy
from ...metrics import Evaluation, grouped_regression_metrics
from .data import RegulatoryBatches, RegulatoryData
from .formats import CATEGORICAL, NUMERIC
from .model import DEFAULTS, LEGACY_KEY_MAP, PRETRAIN_SETTINGS, RegulatoryModel, build_model
from .predictor import BASE_WEIGHTS, save_predictor

__all__ = ["FINETUNE_METHODS", "pretrain", "pretrained", "load_checkpoint", "prepare", "finetune", "predict",
           "fit_rows", "baseline", "evaluate", "permutation_importance"]

#: What ``finetune`` (the notebook parameter) and :func:`prepare`'s ``method`` accept.
FINETUNE_METHODS = ("full", "lora")
#: The workflow's name in the pretraining cache's records (``workbench.tasks.regulatory.WORKFLOW.name``).
WORKFLOW_NAME = "regulatory"


# --------------------------------------------------------------------------- pretraining


def _check_source_rows(data: RegulatoryData) -> None:
    if len(data.source_idx) == 0:
        raise ValueError(f"{data.source} has no source rows (set=source) to pretrain on. Add them, or use "
                         "pretrained_checkpoint='none' (from scratch) or a checkpoint path.")


def _pretraining(data: RegulatoryData, *, seed: int, progress: bool, cache_root, device, dtype, overrides) -> dict:
    """The arguments of :func:`workbench.protocol.pretrain` for this workflow: its model, batches, settings, reads."""
    cfg = {**DEFAULTS, **overrides}
    return dict(
        workflow=WORKFLOW_NAME, objective="expression_on_source",
        reads=(data.content_hash, data.source_idx, data.vocab),  # the numeric statistics come from the source rows
        settings={k: cfg[k] for k in PRETRAIN_SETTINGS},
        model=lambda: build_model(data, numeric_rows=data.source_idx, **cfg),
        batches=lambda: data.batches(data.source_idx, batch_size=cfg["pretrain_batch_size"], shuffle=True, seed=seed),
        epochs=cfg["pretrain_epochs"], learning_rate=cfg["pretrain_lr"], weight_decay=cfg["weight_decay"],
        lr_scheduler_type="cosine", warmup_ratio=0.05, seed=seed, code=__package__,  # the whole package's source
        metadata={"vocab": data.vocab, "samples": len(data.source_idx)},
        describe={"data": data.source, "data_hash": data.content_hash, "source_rows": len(data.source_idx)},
        device=device, dtype=dtype, progress=progress, cache_root=cache_root)


def pretrain(data: RegulatoryData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto",
             dtype=None, **overrides) -> Path:
    """Train the model on the source conditions; return ``pretrained.safetensors`` (cached).

    Through :func:`workbench.protocol.pretrain`: the key covers the data's content, the exact source rows, the
    vocabularies, ``seed``, every setting in ``PRETRAIN_SETTINGS`` (``overrides`` over ``DEFAULTS``), the
    placement and the code of the core and of this whole package; an entry is reused only when all are equal. The
    build reads nothing else: the numeric statistics (buffers in the checkpoint) come from the source rows, not from
    the fine-tuning rows of the split that built it.
    """
    _check_source_rows(data)
    return protocol.pretrain(**_pretraining(data, seed=seed, progress=progress, cache_root=cache_root, device=device,
                                            dtype=dtype, overrides=overrides))


def pretrained(data: RegulatoryData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, device="auto", dtype=None, **overrides) -> Path | None:
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    if pretrained_checkpoint == "pretrain":
        _check_source_rows(data)
    return protocol.pretrained(pretrained_checkpoint, **_pretraining(
        data, seed=seed, progress=progress, cache_root=cache_root, device=device, dtype=dtype, overrides=overrides))


def load_checkpoint(model: nn.Module, source, *, trust_pickle: bool = False, key_map=None, run=None):
    """Load a pretrained checkpoint into ``model``; return the :class:`workbench.LoadReport`.

    Checkpoints that older code wrote: a pickle file loads only with ``trust_pickle=True``
    (and a warning names the risk); weights it named differently are renamed through
    ``key_map`` (default ``LEGACY_KEY_MAP`` when the names do not fit as they are), and the
    report's ``prefix_map`` shows what was renamed.
    """
    from ...checkpoints import PICKLE_SUFFIXES, read_state_dict
    from ...transfer import load_pretrained

    if trust_pickle and isinstance(source, (str, os.PathLike)) and Path(source).suffix in PICKLE_SUFFIXES:
        warnings.warn(f"trust_pickle=True: {str(source)!r} is unpickled in full, which can run any code it holds. "
                      "Do this only for a file whose origin you trust; re-save it with workbench.save_weights.",
                      stacklevel=2)
    state = read_state_dict(source, trust_pickle=trust_pickle)
    if key_map is None and any(k.startswith(tuple(LEGACY_KEY_MAP)) for k in state):
        key_map = LEGACY_KEY_MAP
    report = load_pretrained(model, source, key_map=key_map, trust_pickle=trust_pickle, run=run)
    return report


# --------------------------------------------------------------------------- fine-tuning


def prepare(model: RegulatoryModel, *, method: str = "lora", rank: int = 4, run=None):
    """``(model to train, report)``: the model itself for ``full``; peft-wrapped for ``lora``.

    With a ``run``, a LoRA run's folder keeps the base weights the adapters are trained on
    (``checkpoints/base.safetensors``, written before the adapters are put on): its checkpoints
    hold the trainable tensors only, and the cache that held the pretrained weights is not durable.
    """
    from ...transfer import apply_strategy

    if method not in FINETUNE_METHODS:
        raise ValueError(f"finetune={method!r} is not one of {FINETUNE_METHODS}.")
    if method == "full":
        return model, apply_strategy(model, "full")
    from ...lora import apply_lora

    if run is not None and run.writes:  # under torchrun, rank 0 alone writes the run folder
        save_weights(model, run.path / BASE_WEIGHTS,
                     metadata={"what": "the base weights the LoRA adapters of this run adapt", "rank": rank})
    return apply_lora(model, rank=rank)


def finetune(model, data: RegulatoryData, *, epochs: int, learning_rate: float, batch_size: int = 64,
             warmup_ratio: float = 0.1, save_every: int | None = None, seed: int = 0, run=None, callbacks=(),
             resume: bool = False, progress: bool = True, device="auto", dtype=None):
    """Fine-tune on the new-condition train rows, pick the epoch with the lowest ``val_loss``.

    ``model`` is what :func:`prepare` returned. A LoRA model (peft) keeps its own freezing and
    its checkpoints (``best.safetensors``, every ``save_every`` epochs, ``last.pt``) hold only
    the trainable tensors (:func:`workbench.lora.checkpoint_state`). ``resume=True`` continues
    from ``run``'s ``last.pt`` (open it with ``Run(..., resume=True)``), LoRA or not.
    """
    from ...training import fit

    is_lora = hasattr(model, "peft_config")
    has_val = len(data.val_idx) > 0
    batches = data.batches(data.train_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.batches(data.val_idx, batch_size=512) if has_val else None
    monitor = "val_loss" if has_val else "train_loss"
    state_fn = None
    if is_lora:
        from ...lora import checkpoint_state as state_fn
    return fit(model, batches, epochs=epochs, learning_rate=learning_rate, weight_decay=DEFAULTS["weight_decay"],
               lr_scheduler_type="cosine", warmup_ratio=warmup_ratio, val_data=val, monitor=monitor, progress=progress,
               seed=seed, log_every=100, strategy=None if is_lora else "full", restore_best=True, run=run,
               resume=resume, save_every=save_every, state_fn=state_fn, callbacks=callbacks, device=device, dtype=dtype)


# --------------------------------------------------------------------------- evaluation


def predict(model, data: RegulatoryData, idx, *, conditions: pd.DataFrame | None = None, batch_size: int = 512,
            warn: bool = True) -> np.ndarray:
    """Predicted expression of rows ``idx`` (optionally with other condition values)."""
    tensors = data.encode(idx, conditions=conditions, warn=warn)
    model.eval()
    with torch.no_grad():
        parts = [model(*to_model((r, c, n), model))
                 for r, c, n, _ in RegulatoryBatches(tensors, batch_size=batch_size, shuffle=False)]
    return to_numpy(torch.cat(parts).float()) if parts else np.zeros(0, np.float32)


def _baseline_features(data: RegulatoryData, idx) -> np.ndarray:
    conds = data.conditions.iloc[idx]
    onehot = [np.stack([(conds[c].to_numpy() == v) for v in data.vocab[c][1:]], axis=1) for c in CATEGORICAL]
    mean, std = data.numeric_stats()
    numeric = (conds[list(NUMERIC)].to_numpy(np.float32) - mean) / std
    return np.concatenate([data.regions[idx].reshape(len(idx), -1), *onehot, numeric], axis=1).astype(np.float32)


def fit_rows(data: RegulatoryData, *, pretrained_checkpoint: str = "pretrain") -> np.ndarray:
    """The rows whose expression the model learnt from, so the baseline fits the same ones.

    The fine-tuning train rows, and the source rows when the model was pretrained on them here
    (``pretrained_checkpoint="pretrain"``). From scratch, or from a checkpoint made elsewhere,
    the train rows alone.
    """
    if pretrained_checkpoint == "pretrain":
        return np.concatenate([data.source_idx, data.train_idx])
    return np.asarray(data.train_idx)


def baseline(data: RegulatoryData, *, rows=None) -> np.ndarray:
    """Ridge regression on the same features, fit on ``rows`` (default: source + train); test predictions.

    :func:`workbench.protocol.fit_baseline` (``kind="ridge"``: penalty by leave-one-out over ``10**[-2, 3]``), on the
    features as they are (``scale=False``: the numeric condition features are standardised with the training
    statistics already, motif hits and accessibility are on their own scales).
    """
    labelled = np.concatenate([data.source_idx, data.train_idx]) if rows is None else np.asarray(rows)
    ridge = protocol.fit_baseline(_baseline_features(data, labelled), data.y[labelled], kind="ridge", scale=False)
    return ridge.predict(_baseline_features(data, data.test_idx))


def permutation_importance(model, data: RegulatoryData, idx=None, *, repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Drop in test Pearson when one condition feature is shuffled across samples.

    Returns
    -------
    pandas.DataFrame
        ``feature``, ``importance`` (mean drop), ``std`` over ``repeats`` shuffles; largest first.
    """
    from ...metrics import regression_metrics

    idx = data.test_idx if idx is None else idx
    truth = data.y[idx]
    reference = regression_metrics(truth, predict(model, data, idx, warn=False))["pearson"]
    rng = np.random.default_rng(seed)
    rows = []
    for feature in CATEGORICAL + NUMERIC:
        drops = []
        for _ in range(repeats):
            shuffled = data.conditions.copy()
            values = shuffled[feature].to_numpy().copy()
            values[idx] = values[idx][rng.permutation(len(idx))]
            shuffled[feature] = values
            score = regression_metrics(truth, predict(model, data, idx, conditions=shuffled, warn=False))["pearson"]
            drops.append(reference - score)
        rows.append({"feature": feature, "importance": float(np.mean(drops)), "std": float(np.std(drops))})
    return pd.DataFrame(rows).sort_values("importance", ascending=False, ignore_index=True)




def evaluate(model, data: RegulatoryData, *, run=None, pretrained_checkpoint: str = "pretrain",
             extra: Mapping | None = None) -> Evaluation:
    """Score the test rows beside ridge regression (:func:`workbench.protocol.evaluate`); write the run's results.

    ``pretrained_checkpoint`` is the parameter the model was made with: ridge regression fits the rows the model
    learnt from (:func:`fit_rows`); ``n_train`` and ``baseline_n_train`` say how many. Model and baseline are scored
    by the same functions: overall by the protocol's, per condition (and Spearman) by
    :func:`workbench.metrics.grouped_regression_metrics`.

    Returns a :class:`workbench.metrics.Evaluation` (``table``, ``final``; ``per_condition`` and ``predictions`` as
    its extras). With a ``run``: ``predictions.csv``, ``metrics.json`` (overall, baseline, per condition),
    ``final_metrics.json`` and what predicting on new samples needs (:func:`save_predictor`).
    """
    pred = predict(model, data, data.test_idx)
    save_predictor(run, model, data, test_predictions=pred)
    truth = data.y[data.test_idx]
    groups = data.condition_names[data.test_idx]
    rows = fit_rows(data, pretrained_checkpoint=pretrained_checkpoint)
    baseline_pred = baseline(data, rows=rows)
    ours = grouped_regression_metrics(truth, pred, groups)
    theirs = grouped_regression_metrics(truth, baseline_pred, groups)
    keys = ["pearson", "spearman", "r2", "mse"]
    predictions = pd.DataFrame({"row": data.test_idx, "condition": groups, "true": truth, "predicted": pred,
                                "residual": pred - truth})
    if run is not None:
        if run.writes:  # under torchrun, rank 0 alone writes the run folder
            predictions.to_csv(run.path / "predictions.csv", index=False)
        run.save_json("metrics.json", {"overall": ours.loc["overall", keys].to_dict(),
                                       "baseline": theirs.loc["overall", keys].to_dict(),
                                       "per_condition": ours.drop(index="overall").to_dict(orient="index")})
    n_model = len(data.train_idx) + (len(data.source_idx) if pretrained_checkpoint == "pretrain" else 0)
    spearman = {"test_spearman": float(ours.loc["overall", "spearman"]),
                "baseline_test_spearman": float(theirs.loc["overall", "spearman"])}
    result = protocol.evaluate(truth, pred, baseline_pred, n_train=n_model, baseline_n_train=len(rows), run=run,
                               names=("fine-tuned model", "baseline (ridge regression)"),
                               extra=spearman | {k: float(v) for k, v in dict(extra or {}).items()})
    result.extra.update(per_condition=ours, predictions=predictions)
    return result
