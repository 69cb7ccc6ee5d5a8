"""The workflow's steps: pretraining (masked expression, through the core's cache), loading a checkpoint by gene
name, fine-tuning, the LR range test, the logistic-regression baseline and the evaluation of both.

The protocol is the core's (:mod:`workbench.protocol`); these functions supply what is the cell type workflow's own:
the model, the batches, the settings and what the pretraining build reads, the baseline's features.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ... import protocol
from ...devices import to_model, to_numpy
from ...metrics import Evaluation, validation_accuracy_and_macro_f1
from .data import CellData
from .model import DEFAULTS, CellTypeClassifier, MaskedExpressionModel
from .predictor import save_predictor

__all__ = ["pretrain", "pretrained", "input_genes", "load_checkpoint", "finetune", "find_lr", "lr_finder",
           "baseline", "baseline_cells", "predict_proba", "evaluate", "PRETRAIN_SETTINGS", "MONITORS",
           "BASELINE_MAX_CELLS"]

#: Settings of the pretraining step: each is part of the pretrained encoder's fingerprint (and of its sidecar).
PRETRAIN_SETTINGS = ("hidden", "dropout", "weight_decay", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size",
                     "mask_ratio")
#: Metrics that can pick the best epoch, and whether higher or lower is better (``monitor`` accepts these).
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"}
#: The baseline's logistic regression is fitted on at most this many labelled cells (a seeded random subset).
BASELINE_MAX_CELLS = 50_000
#: Rows per chunk when the baseline predicts the test cells.
PREDICT_CHUNK = 16_384


def _pretraining(data: CellData, *, seed: int, progress: bool, cache_root, device, dtype, **overrides) -> dict:
    """The arguments of ``workbench.protocol.pretrain`` for masked-expression pretraining on ``data``."""
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS}
    return dict(
        workflow="cell_type", objective="masked_expression",
        reads=(data.content_hash, data.train_idx),  # the expression values and genes, and the exact cells
        settings=settings, seed=seed, epochs=cfg["pretrain_epochs"], learning_rate=cfg["pretrain_lr"],
        weight_decay=cfg["weight_decay"], lr_scheduler_type="cosine", warmup_ratio=0.05,
        model=lambda: MaskedExpressionModel(data.n_genes, hidden=tuple(cfg["hidden"]), dropout=cfg["dropout"],
                                            mask_ratio=cfg["mask_ratio"]),
        batches=lambda: data.batches(data.train_idx, batch_size=cfg["pretrain_batch_size"], shuffle=True, seed=seed),
        code=__package__,  # the whole package's source (workbench.cache.code_version hashes every module of it)
        metadata={"genes": data.genes, "cells": len(data.train_idx)},
        describe={"data": data.source, "data_hash": data.content_hash, "train_cells": len(data.train_idx)},
        progress=progress, cache_root=cache_root, device=device, dtype=dtype,
    )


def pretrain(data: CellData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto", dtype=None,
             **overrides) -> Path:
    """Masked-expression pretraining on the training cells (no labels); returns the checkpoint.

    ``workbench.protocol.pretrain`` with :class:`MaskedExpressionModel` on all training cells (labelled or
    not; never the test cells). Cached: the key covers the data's content, the exact training cells, ``seed``,
    every setting in :data:`PRETRAIN_SETTINGS` (``overrides`` of ``DEFAULTS``, e.g. ``pretrain_epochs``), the
    placement and the source of this package and of the core. An interrupted pretraining resumes from its own
    ``last.pt``.

    Returns
    -------
    pathlib.Path
        ``pretrained.safetensors``, with a JSON sidecar naming the genes and the fingerprint.
    """
    return protocol.pretrain(**_pretraining(data, seed=seed, progress=progress, cache_root=cache_root, device=device,
                                            dtype=dtype, **overrides))


def pretrained(data: CellData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, device="auto", dtype=None, **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (:func:`pretrain`, cached) | ``"none"`` | a
    path. ``overrides`` (e.g. ``pretrain_epochs``) reach :func:`pretrain`."""
    return protocol.pretrained(pretrained_checkpoint, **_pretraining(
        data, seed=seed, progress=progress, cache_root=cache_root, device=device, dtype=dtype, **overrides))

def input_genes(model: CellTypeClassifier, data: CellData):
    """The data's genes along the encoder's first linear layer (:class:`workbench.transfer.FeatureNames`).

    With it, :func:`workbench.load_pretrained` meets a checkpoint's genes by name, in the order
    its sidecar lists them (``"genes"``, as :func:`pretrain` writes it), not by position.
    """
    from ...transfer import FeatureNames

    first = next(i for i, layer in enumerate(model.encoder.layers) if isinstance(layer, nn.Linear))
    return FeatureNames(data.genes, {f"encoder.layers.{first}.weight": 1}, key="genes")


def load_checkpoint(model: CellTypeClassifier, data: CellData, source, *, run=None):
    """Load an encoder checkpoint into the classifier; the :class:`workbench.LoadReport`.

    :func:`workbench.load_pretrained` with the head expected missing and the input weights met
    by gene name (:func:`input_genes`): a checkpoint pretrained on the same genes in another
    order loads as if they were in order; genes on one side only are counted in
    ``report.alignment`` (those only in the data keep their initialisation and stay trainable
    under every named strategy). A checkpoint whose sidecar lists no genes loads by position,
    with a warning.
    """
    from ...transfer import load_pretrained

    return load_pretrained(model, source, expect_missing=["head.*"], feature_names=input_genes(model, data), run=run)


def finetune(model, data: CellData, *, epochs: int, learning_rate: float, batch_size: int = 32,
             lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.1, strategy: str = "full",
             freeze_epochs: int = 0, backbone_lr_ratio: float = 1.0, monitor: str = "val_macro_f1", patience: int = 0,
             seed: int = 0, run=None, callbacks=(), progress: bool = True, device="auto", dtype=None):
    """Supervised fine-tuning on the labelled training cells; returns the History.

    Every epoch is scored on the validation cells (``val_loss``, ``val_accuracy``,
    ``val_macro_f1``); ``monitor`` picks the best epoch, whose weights the model holds at the
    end (and ``best.safetensors`` in the run folder). The default, ``val_macro_f1``, is the
    metric the workflow reports; ``val_loss`` (with label smoothing) bottoms out within the
    warmup here, long before accuracy does, and picked epochs 5-14 of 100 (see docs/workflows/parts/cell_type.md).
    On a tie the later epoch wins: a validation set of a few cells (10% labels) ties often. ``patience > 0`` stops after that many
    epochs without improvement. The test cells are not touched. Without validation cells the
    best epoch is the one with the lowest training loss.
    """
    from ...training import fit

    if monitor not in MONITORS:
        raise ValueError(f"monitor={monitor!r} is not one of {', '.join(MONITORS)}.")
    has_val = len(data.val_idx) > 0
    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.batches(data.val_idx, batch_size=256) if has_val else None
    return fit(
        model, batches, epochs=epochs, learning_rate=learning_rate, weight_decay=DEFAULTS["weight_decay"],
        lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, strategy=strategy, freeze_epochs=freeze_epochs,
        backbone_lr_ratio=backbone_lr_ratio, val_data=val, evaluate=validation_accuracy_and_macro_f1 if has_val else None,
        monitor=monitor if has_val else "train_loss", mode=MONITORS[monitor] if has_val else "min",
        patience=patience or None, restore_best=True, run=run, callbacks=callbacks, progress=progress, seed=seed,
        log_every=100, device=device, dtype=dtype,
    )


def find_lr(model, data: CellData, *, batch_size: int = 32, backbone_lr_ratio: float = 1.0, seed: int = 0,
            num_steps: int = 100):
    """The LR range test (:func:`workbench.lr_find`) on the labelled training cells; nothing it touches changes.

    The same batches and weight decay as :func:`finetune`; it trains what is trainable now (with
    ``freeze_epochs`` the notebook has frozen the encoder, so it tests the head alone). Returns
    the result, whose ``suggestion`` (steepest descent) the notebook trains with when ``find_lr`` is set.
    """
    from ...lr_range import lr_find

    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    return lr_find(model, batches, start_lr=1e-6, end_lr=1.0, num_steps=num_steps,
                   weight_decay=DEFAULTS["weight_decay"], backbone_lr_ratio=backbone_lr_ratio)


def lr_finder(model, data: CellData):
    """``values -> find_lr(model, data, ...)`` for the widget panel's Find LR button (reads batch_size, ...)."""

    def run(values: Mapping):
        return find_lr(model, data, batch_size=values["batch_size"], backbone_lr_ratio=values["backbone_lr_ratio"],
                       seed=values["seed"])

    return run


def baseline_cells(data: CellData, *, seed: int = 0, max_cells: int = BASELINE_MAX_CELLS) -> np.ndarray:
    """The labelled cells the baseline fits: all of them (the model's training cells), or a seeded random
    ``max_cells`` of them when there are more."""
    fit_idx = data.labelled_idx
    if len(fit_idx) > max_cells:
        fit_idx = np.sort(np.random.default_rng(seed).choice(fit_idx, size=max_cells, replace=False))
    return fit_idx


def baseline(data: CellData, *, seed: int = 0, max_cells: int = BASELINE_MAX_CELLS) -> np.ndarray:
    """Logistic regression on the same features and labelled cells; its class probabilities of the test cells.

    ``workbench.protocol.fit_baseline`` (lbfgs, ``scale=False``: the log-normalised expression
    the model reads, unscaled) on :func:`baseline_cells`: at most ``max_cells`` labelled cells (a row cap, so the
    fit stays the exact lbfgs one on small data). The test cells are predicted in chunks of :data:`PREDICT_CHUNK`
    rows, so memory stays bounded on an atlas. Columns follow ``data.classes`` (a class the fit did not see gets 0).
    """
    fit_idx = baseline_cells(data, seed=seed, max_cells=max_cells)
    clf = protocol.fit_baseline(data.rows(fit_idx), data.labels[fit_idx], kind="logistic", seed=seed, scale=False)
    test = data.test_idx
    proba = np.zeros((len(test), len(data.classes)))
    columns = [data.classes.index(c) for c in clf.classes_]
    for s in range(0, len(test), PREDICT_CHUNK):
        proba[s:s + PREDICT_CHUNK, columns] = clf.predict_proba(data.rows(test[s:s + PREDICT_CHUNK]))
    return proba


def predict_proba(model, data: CellData, idx, *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of the cells ``idx``, one row per cell in the order given (streamed from X)."""
    idx = np.asarray(idx, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        parts = [F.softmax(model(to_model(x, model)), dim=1).float()
                 for x, _ in data.batches(idx, batch_size=batch_size)]
    proba = to_numpy(torch.cat(parts)) if parts else np.zeros((0, len(data.classes)), dtype=np.float32)
    return proba[np.searchsorted(np.unique(idx), idx)]  # the batches came in sorted order


def evaluate(model, data: CellData, *, run=None, seed: int = 0) -> Evaluation:
    """Score the model and logistic regression on the test cells with one function; write final_metrics.json.

    ``workbench.protocol.evaluate`` on both sets of class probabilities. With a ``run``, its folder also gets
    what predicting on new cells needs (``predictor.json``, see :func:`save_predictor`) and the test cells'
    predictions (``test_predictions.csv``). ``n_train`` and ``baseline_n_train`` count the cells each was fit on:
    the labelled cells, unless there are more than :data:`BASELINE_MAX_CELLS` (then the baseline's random subset).
    """
    proba = predict_proba(model, data, data.test_idx)
    save_predictor(run, model, data, test_proba=proba)
    return protocol.evaluate(data.labels[data.test_idx], proba, baseline(data, seed=seed), classes=data.classes,
                             n_train=len(data.labelled_idx), baseline_n_train=len(baseline_cells(data, seed=seed)),
                             run=run, names=("fine-tuned encoder", "baseline (logistic regression)"))
