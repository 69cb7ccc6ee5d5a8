"""The workflow's steps: CoLES pretraining (through the core's cached protocol), fine-tuning, scoring, the baseline.

Pretraining
    CoLES (ptls's ``CoLESModule`` as a plain ``nn.Module``; sub-sequences cut by ptls's ``SampleSlices``) over every
    training client without labels, trained by :func:`workbench.fit` (never by Lightning) and cached by
    :func:`workbench.protocol.pretrain` (key: the data's content, the clients, every setting, every module of this
    package: :func:`workbench.cache.code_version` hashes a package's folder).
    Its checkpoint has ptls's layout (``_seq_encoder.*``), so it loads like a checkpoint that ptls wrote: through
    :func:`workbench.load_pretrained`, whose prefix detection maps ``_seq_encoder.`` to ``encoder.``.
Fine-tuning
    The encoder frozen for ``freeze_epochs`` epochs (head only), then everything; the best epoch by validation
    macro-F1 restored.
Baseline
    Logistic regression (:func:`workbench.protocol.fit_baseline`) on bag-of-event-types (fraction of each type, log
    event count) plus statistics of each given numeric field, not ``time_gap`` (mean, std, min, 10/50/90th
    percentiles, max of ``sign(x) log1p|x|``), on exactly the labelled clients the model is fit on (not its
    validation clients); model and baseline scored by :func:`workbench.protocol.evaluate`. :func:`linear_probe`
    scores an encoder as it is: logistic regression on its embeddings of those clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from ... import protocol
from ...metrics import Evaluation, classification_metrics, validation_accuracy_and_macro_f1
from .data import TIME, TIME_GAP, EventBatches, EventData, coles_loader
from .model import DEFAULTS, SequenceClassifier, build_coles, build_encoder, coles_loss, get_embeddings, predict_proba

__all__ = ["PRETRAIN_SETTINGS", "pretrain", "pretrained", "load_checkpoint", "finetune", "lr_frame", "save_embeddings",
           "baseline_features", "baseline", "linear_probe", "evaluate"]

#: The :data:`DEFAULTS` that shape the pretrained encoder (part of its cache key and its checkpoint's metadata).
PRETRAIN_SETTINGS = ("embedding_dim", "transformer_heads", "transformer_layers", "weight_decay", "pretrain_epochs",
                     "pretrain_lr", "pretrain_batch_size", "split_count", "cnt_min", "cnt_max", "margin", "neg_count")


# --------------------------------------------------------------------------- pretraining


def pretrain(data: EventData, *, encoder_type: str = "gru", hidden_size: int = 64, seed: int = 0,
             progress: bool = True, cache_root=None, run_callbacks=(), device="auto", dtype=None,
             **overrides) -> Path:
    """CoLES over the training clients (no labels); ``pretrained.safetensors`` in ptls's layout (cached by fingerprint)."""
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS} | {"encoder_type": encoder_type, "hidden_size": hidden_size}

    def model():
        np.random.seed(seed)  # ptls's SampleSlices draws from numpy's global RNG
        return build_coles(build_encoder(data, encoder_type=encoder_type, hidden_size=hidden_size, **cfg),
                           margin=cfg["margin"], neg_count=cfg["neg_count"])

    def batches():
        return coles_loader(data, data.train_idx, batch_size=cfg["pretrain_batch_size"],
                            split_count=cfg["split_count"], cnt_min=cfg["cnt_min"], cnt_max=cfg["cnt_max"], seed=seed)

    return protocol.pretrain(
        "event_sequence", "coles", reads=(data.content_hash, data.train_idx), settings=settings, model=model,
        batches=batches, epochs=cfg["pretrain_epochs"], learning_rate=cfg["pretrain_lr"], seed=seed,
        weight_decay=cfg["weight_decay"], lr_scheduler_type="cosine", warmup_ratio=0.05, code=__package__,
        metadata={"vocab": data.vocab, "clients": len(data.train_idx)},
        describe={"data": data.source, "data_hash": data.content_hash, "train_clients": len(data.train_idx)},
        fit_options={"loss_fn": coles_loss, "optimizer": "adam", "callbacks": run_callbacks}, device=device,
        dtype=dtype, progress=progress, cache_root=cache_root)


def pretrained(data: EventData, pretrained_checkpoint: str, *, encoder_type: str = "gru", hidden_size: int = 64,
               seed: int = 0, progress: bool = True, cache_root=None, **overrides):
    """Resolve ``pretrained_checkpoint``: ``"pretrain"`` (:func:`pretrain`, cached) | ``"none"`` | a path (ptls
    checkpoint or state dict)."""
    from ...checkpoints import resolve_pretrained

    return resolve_pretrained(pretrained_checkpoint, lambda: pretrain(
        data, encoder_type=encoder_type, hidden_size=hidden_size, seed=seed, progress=progress, cache_root=cache_root,
        **overrides))


def load_checkpoint(model: nn.Module, source, *, trust_pickle: bool = False, run=None):
    """Load an encoder checkpoint into ``model`` (:func:`workbench.load_pretrained`); the LoadReport.

    A ptls ``CoLESModule`` checkpoint (Lightning's ``.ckpt``: weights under ``state_dict``, keys
    ``_seq_encoder.*``) loads as it is: ``_seq_encoder.`` is detected and mapped to ``encoder.``;
    its contrastive head (``_head.*``) is reported as unexpected and the classifier's head as missing.
    """
    from ...transfer import load_pretrained

    return load_pretrained(model, source, trust_pickle=trust_pickle, run=run)


# --------------------------------------------------------------------------- fine-tuning


def finetune(model: SequenceClassifier, data: EventData, *, epochs: int, learning_rate: float, batch_size: int = 32,
             optimizer: str = "adamw", lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.1,
             freeze_epochs: int = 0, backbone_lr_ratio: float = 1.0, grad_clip: float | None = None,
             amp: str = "none", save_top_k: int = 1, seed: int = 0, run=None, callbacks=(), progress: bool = True,
             device="auto", dtype=None):
    """Supervised fine-tuning on the labelled clients; the best epoch by ``val_macro_f1`` is kept.

    The backbone is frozen for ``freeze_epochs`` epochs (only the head trains), then everything
    trains. ``freeze_epochs >= epochs`` is a probe: the encoder never changes. Once it trains, the
    encoder learns at ``learning_rate * backbone_lr_ratio`` and the head at ``learning_rate``.
    ``lr_scheduler_type`` and ``warmup_ratio`` are :mod:`workbench.schedules`'s (checked there); ``amp``: ``"none"``
    or what :func:`workbench.fit` accepts (``"bf16"``; ``"fp16"`` on CUDA).
    """
    from ...training import fit

    has_val = len(data.val_idx) > 0
    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = EventBatches(data, data.val_idx, batch_size=256, max_tokens=DEFAULTS["eval_tokens"]) if has_val else None
    return fit(
        model, batches, epochs=epochs, learning_rate=learning_rate, optimizer=optimizer,
        weight_decay=DEFAULTS["weight_decay"],
        lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, strategy="full",
        freeze_epochs=freeze_epochs, backbone_lr_ratio=backbone_lr_ratio, grad_clip=grad_clip or None,
        amp=None if amp == "none" else amp,
        val_data=val, evaluate=validation_accuracy_and_macro_f1 if has_val else None,
        monitor="val_macro_f1" if has_val else "train_loss", mode="max" if has_val else "min",
        save_top_k=save_top_k, restore_best=True, run=run, callbacks=callbacks, progress=progress, seed=seed,
        log_every=50, device=device, dtype=dtype,
    )


def lr_frame(history, *, freeze_epochs: int, steps_per_epoch: int, schedule: str = ""):
    """The effective per-step learning rates of a fine-tuning run, for :func:`workbench.plots.plot_lr_schedule`.

    While the backbone is frozen its groups learn nothing, so their rate is shown as 0 for those
    steps; ``attrs["freeze_steps"]`` marks the frozen phase.
    """
    curve = history.lr_frame()
    freeze_steps = min(freeze_epochs, len(history.rows)) * steps_per_epoch
    frozen = [c for c in curve.columns if c.startswith("backbone")]
    curve.loc[curve.index < freeze_steps, frozen] = 0.0
    curve.attrs.update(schedule=schedule, total_steps=len(curve), freeze_steps=freeze_steps)
    return curve


# --------------------------------------------------------------------------- evaluation


def save_embeddings(path, embeddings, client_ids, labels) -> Path:
    """``embeddings.npz`` with ``embeddings``, ``client_ids`` and ``labels``."""
    path = Path(path)
    np.savez_compressed(path, embeddings=embeddings, client_ids=np.asarray(client_ids, dtype=str),
                        labels=np.asarray(labels, dtype=str))
    return path


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def baseline_features(data: EventData, idx) -> np.ndarray:
    """Bag of event types (share of each category of the first categorical field, log count) + numeric statistics."""
    first = data.categorical[0]
    n_types = len(data.vocab[first])
    amount_fields = [c for c in data.numeric if c != TIME_GAP]
    rows = []
    for i in idx:
        seq = data.sequences[i]
        counts = np.bincount(seq[first], minlength=n_types)[1:].astype(np.float64)  # unknown..last, no padding
        row = [counts / counts.sum(), [np.log(len(seq[TIME]))]]
        for column in amount_fields:
            v = _signed_log(seq[column].astype(np.float64))
            row.append([v.mean(), v.std(), v.min(), *np.percentile(v, [10, 50, 90]), v.max()])
        rows.append(np.concatenate(row))
    return np.asarray(rows, dtype=np.float64)


def _baseline_proba(data: EventData, *, seed: int = 0) -> np.ndarray:
    """Class probabilities (test clients x ``data.classes``) of logistic regression fit on the labelled clients."""
    fit_idx = data.labelled_idx  # the clients the model is fit on (not its validation clients)
    clf = protocol.fit_baseline(baseline_features(data, fit_idx), data.labels[fit_idx], kind="logistic", seed=seed)
    proba = np.zeros((len(data.test_idx), len(data.classes)))
    columns = [data.classes.index(c) for c in clf.classes_]  # a class absent from the labelled clients stays 0
    proba[:, columns] = clf.predict_proba(baseline_features(data, data.test_idx))
    return proba


def baseline(data: EventData, *, seed: int = 0) -> dict:
    """Logistic regression on :func:`baseline_features` of the labelled clients; test metrics."""
    proba = _baseline_proba(data, seed=seed)
    pred = np.asarray(data.classes)[proba.argmax(1)]
    return classification_metrics(data.labels[data.test_idx], pred, y_score=proba, labels=data.classes)


def linear_probe(model, data: EventData, *, seed: int = 0) -> dict:
    """Logistic regression on the frozen encoder's embeddings of the labelled clients; test metrics.

    The CoLES paper's way of judging an encoder: nothing in the encoder trains. Call it before
    fine-tuning to score the pretrained (or random) encoder as it is.
    """
    fit_idx = data.labelled_idx  # the clients the model is fit on (not its validation clients)
    embeddings, _, _ = get_embeddings(model, data, np.concatenate([fit_idx, data.test_idx]))
    clf = protocol.fit_baseline(embeddings[: len(fit_idx)], data.labels[fit_idx], kind="logistic", seed=seed,
                                max_iter=3000)
    pred = clf.predict(embeddings[len(fit_idx):])
    return classification_metrics(data.labels[data.test_idx], pred, labels=data.classes)


def evaluate(model, data: EventData, *, run=None, seed: int = 0, extra: Mapping | None = None) -> Evaluation:
    """Score the test clients beside logistic regression (one scoring code for both); write final_metrics.json.

    With a ``run``, its folder also gets what predicting on new clients needs (``save_predictor``).
    ``n_train`` and ``baseline_n_train`` count the clients each was fit on (the same labelled clients).
    """
    from .predictor import save_predictor

    proba = predict_proba(model, data, data.test_idx)
    save_predictor(run, model, data, test_proba=proba)
    return protocol.evaluate(data.labels[data.test_idx], proba, _baseline_proba(data, seed=seed),
                             classes=data.classes, n_train=len(data.labelled_idx),
                             baseline_n_train=len(data.labelled_idx), run=run,
                             names=("fine-tuned encoder", "baseline (logistic regression)"),
                             extra={k: float(v) for k, v in dict(extra or {}).items()})
