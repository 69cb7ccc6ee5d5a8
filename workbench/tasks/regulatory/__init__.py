"""Regulatory expression: a region transformer pretrained on many conditions, fine-tuned on new ones.

Data
    One sample is one gene under one experimental condition: a region x motif matrix (motif
    hits in each of the gene's regulatory regions, as in GET), the accessibility of each
    region, the condition's features and the expression (the target). Condition features:
    ``medium``, ``drug`` and ``carbon_source`` (categorical; ``""`` means not given) and
    ``temperature`` (degrees C), ``preculture_h``, ``od600``, ``drug_conc`` (mol/L) and
    ``drug_time_h`` (numeric). Rows marked ``set=source`` are for pretraining; ``set=target`` rows hold
    the new conditions and are split into train / validation / test by ``seed``.
    ``data_path=""`` simulates a data set (:func:`simulate`); otherwise a CSV (:func:`read_csv`) or
    a zarr store in the layout of GET's region-motif datasets (:func:`read_zarr`). Modules: ``formats``
    (the CSV and zarr layouts), ``simulate``, ``data`` (:class:`RegulatoryData`, the split).
Simulated ground truth (:func:`simulate`)
    Each motif ``m`` has a weight ``w[m] ~ N(0, 1)``; region ``r`` counts ``exp(-r / 3)``. A
    condition sets each motif's activity ``1 + a[m]``, where ``a`` adds up: the medium's
    effect (4 random motifs, N(0, 0.8) each); heat, ``1.2 * sigmoid((T - 37) / 2)`` on motifs
    0-1, and cold, ``-0.5 * sigmoid((25 - T) / 2)`` on motifs 2-3; the drug's effect (3 random
    motifs, N(0, 1)) times ``log10(1 + conc / 1e-6) / 3 * (1 - exp(-time_h))``; ``-0.3 * od600``
    on motifs 2-3 (stationary pre-cultures grow slower) and ``0.1 * (preculture_h - 3.5)``
    on all motifs; galactose ``+1.5`` and glucose ``-0.5`` on motif 4. Expression is
    ``sum_r exp(-r/3) * access[r] * sum_m motifs[r, m] * w[m] * (1 + a[m])`` plus N(0, 0.3)
    noise. Source conditions draw media from sc, ypd, ypgal, sd and drugs from none, caffeine,
    tunicamycin; the new conditions use a medium (``minimal``) or a drug (``rapamycin``) that
    pretraining never saw.
Model
    :class:`RegulatoryModel`: each region's motifs + accessibility are embedded (a linear
    layer plus a position embedding), a condition token is prepended, and a pre-norm
    transformer encoder (plain q/k/v/o linear layers) reads them. The condition encoder
    (:class:`ConditionEncoder`) embeds each categorical feature, index 0 being "unknown", and
    normalises numeric features with training statistics kept as buffers (so they are in every
    checkpoint). The head fuses the condition token's output with the condition vector by
    concatenation and a 2-layer MLP. Module ``model``.
Pretraining
    Supervised, on the source conditions, through :func:`workbench.protocol.pretrain` (cached by
    fingerprint: data content, source rows, vocabularies, every setting, the code of the core and of
    this whole package). It reads nothing else of the split: the numeric features' statistics come
    from the source rows alone. Module ``steps`` (with fine-tuning, the baseline and the evaluation).
Fine-tuning
    ``full`` (every weight) or ``lora`` (peft adapters on the encoder's and head's linear
    layers, the condition embeddings trained in full), see :mod:`workbench.lora`. A LoRA run's
    checkpoints (``best.safetensors``, ``last.pt``, through :func:`workbench.fit`'s own checkpointing with
    ``state_fn=workbench.lora.checkpoint_state``) hold the trainable tensors only, beside the base
    weights they adapt (``checkpoints/base.safetensors``).
Baseline
    Ridge regression (:func:`workbench.protocol.fit_baseline`, ``kind="ridge"``) on the same features
    (flattened motifs and accessibility, one-hot categoricals, numeric features) and the rows whose
    expression the model learnt from: the new-condition train rows, and the source rows when the model
    was pretrained on them here. Model and baseline are scored by :func:`workbench.protocol.evaluate`
    (overall) and per condition by the same function. Predicting from a run folder: module ``predictor``.
"""

from __future__ import annotations

from pathlib import Path

from ...params import Choice, Integer, Real
from ...workflow import Param, Workflow
from .data import RegulatoryBatches, RegulatoryData, load
from .formats import CATEGORICAL, NUMERIC, SET_VALUES, TARGET, UNKNOWN, read_csv, read_zarr, write_csv, write_zarr
from .model import DEFAULTS, LEGACY_KEY_MAP, PRETRAIN_SETTINGS, ConditionEncoder, RegulatoryModel, build_model
from .predictor import RegulatoryPredictor, save_predictor
from .simulate import simulate
from .steps import (FINETUNE_METHODS, baseline, evaluate, finetune, fit_rows, load_checkpoint, permutation_importance,
                    predict, prepare, pretrain, pretrained)

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "CATEGORICAL", "NUMERIC", "TARGET", "RegulatoryData", "ConditionEncoder", "RegulatoryModel",
    "simulate", "read_csv", "write_csv", "read_zarr", "write_zarr", "load", "build_model", "pretrain", "pretrained",
    "load_checkpoint", "prepare", "finetune", "fit_rows", "predict", "baseline", "evaluate", "permutation_importance",
    "LEGACY_KEY_MAP", "save_predictor", "RegulatoryPredictor", "RegulatoryBatches", "SET_VALUES", "UNKNOWN",
    "PRETRAIN_SETTINGS", "FINETUNE_METHODS",
]

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "regulatory_lora.ipynb"
HEADLINE_METRICS = ("test_pearson", "test_spearman", "test_r2", "test_mse", "baseline_test_pearson", "trainable_fraction")
PACKAGES = ("peft", "scipy")

#: The workflow, declared once: its notebook's parameters (help and constraints), headline metrics and predictor.
WORKFLOW = Workflow(
    "regulatory", NOTEBOOK, title="Regulatory expression with LoRA", predictor=RegulatoryPredictor,
    headline_metrics=HEADLINE_METRICS, packages=PACKAGES, parameters=dict(
        data_path=Param("", "CSV file (one row per sample) or GET-style .zarr store; empty means simulated data"),
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on the source conditions) | none (from scratch) | "
                                                "a checkpoint path"),
        trust_pickle=Param(False, "allow a pickle checkpoint from older code (only for files you trust)"),
        finetune=Param("lora", "lora (adapters) | full (every weight)", Choice(*FINETUNE_METHODS)),
        lora_rank=Param(2, "LoRA rank (finetune lora only)", Integer(ge=1)),
        learning_rate=Param(1.0e-3, "peak learning rate (cosine schedule)"),
        epochs=Param(30),
        batch_size=Param(64),
        label_fraction=Param(0.3, "share of the new-condition samples used for fine-tuning", Real(gt=0, lt=1)),
        val_fraction=Param(0.1, "share of the new-condition samples used for validation (picks the best epoch)"),
        pretrain_epochs=Param(15, "epochs of pretraining on the source conditions"),
        seed=Param(0, "split, pretraining, initialisation and data order"),
    ),
)
