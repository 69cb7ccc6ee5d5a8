"""The heart-sound steps: NT-Xent pretraining (through the core's cache), fine-tuning, the baseline, evaluation.

Pretraining is :func:`workbench.protocol.pretrain` with this workflow's contrastive model and batches of two crops
per training recording (no labels). Fine-tuning follows the mode (:func:`strategy_of`); each epoch is scored per
recording on the validation patients and the best ``val_auroc`` epoch is restored. Model and baseline are scored by
one function (:func:`split_metrics`) on every split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ... import protocol
from ...devices import to_model, to_numpy
from ...metrics import Evaluation, MetricsTable, classification_metrics, confusion_matrix, roc_pr_curves
from ...metrics import sensitivity_specificity
from .data import CropBatches, HeartSoundData, WindowBatches
from .model import ContrastiveModel
from .predictor import save_predictor
from .settings import DEFAULTS, MODES, PRETRAIN_SETTINGS

__all__ = ["pretrain", "pretrained", "strategy_of", "train_batches", "predict_proba", "split_metrics", "finetune", "BANDS", "band_power_features", "baseline", "evaluate"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- steps


def _pretraining(data: HeartSoundData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto",
                 dtype=None, **overrides) -> dict:
    """The arguments of :func:`workbench.protocol.pretrain` for NT-Xent on ``data``'s training recordings."""
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS} | {"window": data.window, "sample_rate": data.sample_rate}
    signals = [data.recordings[i].signal for i in data.train_idx]

    def model():
        return ContrastiveModel(sample_rate=data.sample_rate, widths=tuple(cfg["widths"]),
                                temperature=cfg["temperature"])

    def batches():  # called by the build only, so the log line says that pretraining runs
        log.info("pretraining (NT-Xent) on %d recordings, %d epochs", len(signals), cfg["pretrain_epochs"])
        return CropBatches(signals, np.zeros(len(signals)), size=data.window, crops=cfg["pretrain_crops"],
                           batch_size=cfg["pretrain_batch_size"], views=2, seed=seed)

    return dict(workflow="heart_sound", objective="nt_xent", reads=(data.content_hash, data.train_idx),
                settings=settings, model=model, batches=batches, epochs=cfg["pretrain_epochs"],
                learning_rate=cfg["pretrain_lr"], seed=seed, weight_decay=cfg["weight_decay"],
                lr_scheduler_type="cosine", warmup_ratio=0.05, code=__package__,
                metadata={"recordings": len(signals)},
                describe={"data": data.source, "data_hash": data.content_hash, "train_recordings": len(data.train_idx)},
                fit_options={"seed": seed}, device=device, dtype=dtype,
                progress=progress, cache_root=cache_root)


def pretrain(data: HeartSoundData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto",
             dtype=None, **overrides) -> Path:
    """NT-Xent pretraining on the training patients' recordings (no labels); returns the checkpoint.

    Cached by :func:`workbench.protocol.pretrain`: the key covers the data's content, the training recordings, the
    window length and sample rate, ``seed``, every setting in :data:`PRETRAIN_SETTINGS` (``overrides`` replace
    ``DEFAULTS``), the placement and the source of this package and of the core.
    """
    return protocol.pretrain(**_pretraining(data, seed=seed, progress=progress, cache_root=cache_root,
                                            device=device, dtype=dtype, **overrides))


def pretrained(data: HeartSoundData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, run=None, **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path.

    With a ``run``, its ``train.log`` says which weights the encoder starts from (the pretraining's own epochs are
    in the cache entry's ``run/train.log``).
    """
    source = protocol.pretrained(pretrained_checkpoint, **_pretraining(data, seed=seed, progress=progress,
                                                                       cache_root=cache_root, **overrides))
    if run is not None:
        what = ("NT-Xent pretraining (cached) on the training recordings" if pretrained_checkpoint == "pretrain"
                else "a given checkpoint" if source else "random initialisation (pretrained_checkpoint none)")
        run.log_text(f"encoder from {what}" + (f": {source}" if source else ""))
    return source


def strategy_of(mode: str) -> str:
    """The freezing strategy of a fine-tuning mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}.")
    return "frozen_backbone" if mode == "linear_eval" else "full"


def train_batches(data: HeartSoundData, *, batch_size: int, seed: int = 0) -> CropBatches:
    """Random crops of the labelled recordings, ``DEFAULTS["crops_per_recording"]`` per recording per epoch."""
    labelled = data.labelled_idx
    return CropBatches([data.recordings[i].signal for i in labelled], data.y[labelled], size=data.window,
                       crops=DEFAULTS["crops_per_recording"], batch_size=batch_size, seed=seed)


def predict_proba(model, batches: WindowBatches) -> np.ndarray:
    """Per-recording class probabilities: the mean of its windows' softmax."""
    model.eval()
    with torch.no_grad():
        probs = to_numpy(torch.cat([F.softmax(model(to_model(x, model)), dim=1) for x, _ in batches]))
    out = np.zeros((len(batches.idx), probs.shape[1]))
    np.add.at(out, batches.owner, probs)
    return out / np.bincount(batches.owner, minlength=len(batches.idx))[:, None]


def split_metrics(y_true: np.ndarray, proba: np.ndarray, classes, *, prefix: str = "") -> dict:
    """loss, accuracy, macro-F1, precision, recall, AUROC, AUPRC, sensitivity, specificity of recording probabilities."""
    classes = list(classes)
    idx = np.asarray(y_true, dtype=np.int64)
    pred = proba.argmax(1)
    scores = classification_metrics(idx, pred, y_score=proba, labels=list(range(len(classes))))
    scores.update(sensitivity_specificity(idx, pred, labels=list(range(len(classes)))))
    scores["loss"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(idx)), idx], 1e-7, 1))))
    scores["precision"], scores["recall"] = scores.pop("macro_precision"), scores.pop("macro_recall")
    return {f"{prefix}{k}": float(v) for k, v in scores.items()}


def finetune(model, data: HeartSoundData, *, mode: str = "linear_eval", epochs: int = 20, learning_rate: float = 1e-2,
             backbone_lr_ratio: float = 0.1, lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.1,
             batch_size: int = 32, save_every: int | None = None, seed: int = 0, run=None, callbacks=(),
             progress: bool = True, device="auto", dtype=None):
    """Supervised fine-tuning on random crops of the labelled recordings; returns the History.

    ``mode``: ``linear_eval`` freezes the encoder (BatchNorm statistics locked) and trains the
    head; ``few_shot`` and ``full`` train everything, the encoder at ``backbone_lr_ratio`` x
    ``learning_rate`` (``few_shot`` differs only in the patients ``load(label_fraction=...)`` kept).
    Each epoch is scored on the validation recordings (window probabilities averaged per
    recording); the epoch with the best ``val_auroc`` is kept (``checkpoints/best.safetensors``).
    """
    from ...training import PerSample, fit

    strategy = strategy_of(mode)
    labelled = data.labelled_idx
    batches = train_batches(data, batch_size=batch_size, seed=seed)
    has_val = len(data.val_idx) > 0
    val = WindowBatches(data, data.val_idx) if has_val else None

    def evaluate(model, batches):  # per recording: under DDP AUROC is scored on every rank's recordings together
        return PerSample(score, truth=data.y[batches.idx], proba=predict_proba(model, batches))

    def score(*, truth, proba) -> dict:
        scores = split_metrics(truth, proba, data.classes)
        return {f"val_{k}": scores[k] for k in ("auroc", "macro_f1", "accuracy")}

    line = f"fine-tuning ({mode}) on {len(labelled)} recordings of {len(set(data.patients[labelled]))} patients"
    log.info(line)
    if run is not None:
        run.log_text(line)
    return fit(
        model, batches, epochs=epochs, learning_rate=learning_rate, weight_decay=DEFAULTS["weight_decay"],
        lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, strategy=strategy,
        backbone_lr_ratio=1.0 if mode == "linear_eval" else backbone_lr_ratio, val_data=val,
        evaluate=evaluate if has_val else None, monitor="val_auroc" if has_val else "train_loss",
        mode="max" if has_val else "min", restore_best=True, save_every=save_every, run=run,
        callbacks=callbacks, progress=progress, seed=seed, log_every=100,
        device=device, dtype=dtype,
    )


BANDS = ((25, 50), (50, 75), (75, 100), (100, 150), (150, 200), (200, 300), (300, 400))


def band_power_features(signals, sample_rate: int) -> np.ndarray:
    """Log relative Welch power in :data:`BANDS` of each signal (recordings x bands)."""
    from scipy.signal import welch

    rows = []
    for s in signals:
        f, p = welch(s, fs=sample_rate, nperseg=min(len(s), 1024))
        total = p[(f >= 25) & (f <= 400)].sum() + 1e-12
        rows.append([np.log(p[(f >= lo) & (f < hi)].sum() / total + 1e-12) for lo, hi in BANDS])
    return np.asarray(rows)


def baseline(data: HeartSoundData, *, seed: int = 0) -> dict:
    """The protocol's logistic regression (:func:`workbench.protocol.fit_baseline`) on band-power features of the
    recordings the model is fit on (``labelled_idx``): ``val_`` and ``test_`` metrics, ``val_proba`` and
    ``test_proba``, and ``n_train`` (the recordings it was fit on)."""

    def features(idx):
        return band_power_features([data.recordings[i].signal for i in idx], data.sample_rate)

    y = data.y
    clf = protocol.fit_baseline(features(data.labelled_idx), y[data.labelled_idx], kind="logistic", seed=seed)
    out = {"n_train": len(data.labelled_idx)}
    for split, idx in (("val", data.val_idx), ("test", data.test_idx)):
        if len(idx):
            proba = np.zeros((len(idx), len(data.classes)))
            proba[:, clf.classes_] = clf.predict_proba(features(idx))
            out.update(split_metrics(y[idx], proba, data.classes, prefix=f"{split}_"))
            out[f"{split}_proba"] = proba
    return out


def evaluate(model, data: HeartSoundData, *, run=None, seed: int = 0) -> Evaluation:
    """Recording-level metrics on train (labelled) / val / test, the baseline's on val / test; final_metrics.json.

    Model and baseline are scored by the same function (:func:`split_metrics`: loss, accuracy, macro-F1, precision,
    recall, AUROC, AUPRC, sensitivity, specificity); the result (:class:`workbench.metrics.Evaluation`) has a row
    per predictor and split, the model's test confusion matrix, and its test ROC/PR ``curves``.
    """
    final, rows = {}, {}
    for split, idx in (("train", data.labelled_idx), ("val", data.val_idx), ("test", data.test_idx)):
        if len(idx):
            proba = predict_proba(model, WindowBatches(data, idx))
            scores = split_metrics(data.y[idx], proba, data.classes)
            final.update({f"{split}_{k}": v for k, v in scores.items()})
            rows[f"model, {split}"] = scores
            if split == "test":
                test_proba = proba
    base = baseline(data, seed=seed)
    for split in ("val", "test"):
        scores = {k[len(split) + 1:]: v for k, v in base.items() if k.startswith(f"{split}_") and k != f"{split}_proba"}
        if scores:
            rows[f"baseline, {split}"] = scores
            final.update({f"baseline_{split}_{k}": v for k, v in scores.items()})
    save_predictor(run, model, data, test_proba=test_proba)
    final.update(n_train=len(data.labelled_idx), baseline_n_train=base["n_train"])  # recordings each was fit on
    truth = np.array(data.classes)[data.y[data.test_idx]]
    pred = np.array(data.classes)[test_proba.argmax(1)]
    curves = roc_pr_curves(truth, test_proba, labels=data.classes)
    test = {k: round(v, 4) for k, v in final.items() if k.startswith(("test_", "baseline_test_"))}
    log.info("test: %s", test)
    if run is not None:
        run.log_text(f"test: {test}")
        final = run.finish(final)
    return Evaluation(MetricsTable(rows), confusion_matrix(truth, pred, labels=data.classes), final, curves=curves)


