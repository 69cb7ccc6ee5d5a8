"""Event-sequence classification: a CoLES encoder from pytorch-lifestream, fine-tuned with an MLP head.

Data (``data.py``, ``simulate.py``)
    A long-format event table (one row per event: ``client_id``, ``event_time``, categorical and numeric fields) as
    CSV or parquet, plus a labels table (``client_id``, ``target``); :func:`load` checks, cleans and splits it by
    client, each client keeping its last ``max_seq_len`` events. ``data_path=""`` simulates one (:func:`simulate`,
    whose module documents the ground truth: the class shapes the event-type mix, its order, amounts and timing).
Model (``model.py``)
    :class:`SequenceClassifier`: a ptls ``TrxEncoder`` + GRU/LSTM/transformer encoder under an MLP head; class
    weights and label smoothing in the loss. Batches are ptls ``PaddedBatch`` es (:class:`EventBatches`), sharded
    across ranks under ``--nproc`` like the core's.
Pretraining (``steps.py``)
    CoLES (ptls's ``CoLESModule`` as a plain ``nn.Module``) over every training client without labels, by
    :func:`workbench.fit` and cached by :func:`workbench.protocol.pretrain`. The checkpoint has ptls's layout
    (``_seq_encoder.*``); a ptls checkpoint of the user's loads the same way, the model built to its widths.
Baseline (``steps.py``)
    Logistic regression on bag-of-event-types plus amount statistics, fit on exactly the model's labelled clients
    and scored by the same code as the model (:func:`workbench.protocol.evaluate`). Prediction on new clients from a
    run folder: :class:`EventSequencePredictor` (``predictor.py``).
"""

from __future__ import annotations

from pathlib import Path

from ...params import Choice, Flag, Integer, Real, Text
from ...schedules import SCHEDULES
from ...workflow import Param, Workflow
from ...workflow import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from .data import EventBatches, EventData, coles_loader, load, read_table
from .layout import CLIENT, PAD, TARGET, TIME, TIME_GAP, UNKNOWN
from .model import (
    ACTIVATIONS, CLASS_WEIGHTS, DEFAULTS, ENCODER_TYPES, SequenceClassifier, build_coles, build_encoder, build_model,
    checkpoint_widths, coles_loss, embedding_sizes, get_embeddings, predict_proba,
)
from .predictor import ARCHITECTURE, EventSequencePredictor, save_predictor
from .simulate import simulate, write_tables
from .steps import (
    PRETRAIN_SETTINGS, baseline, baseline_features, evaluate, finetune, linear_probe, load_checkpoint, lr_frame,
    pretrain, pretrained, save_embeddings,
)

__all__ = [
    "WORKFLOW", "DEFAULTS", "EventData", "EventBatches", "coles_loader", "SequenceClassifier", "simulate",
    "write_tables", "read_table", "load", "build_encoder", "build_model", "build_coles", "coles_loss",
    "checkpoint_widths", "embedding_sizes", "pretrain",
    "pretrained", "load_checkpoint", "finetune", "lr_frame", "predict_proba", "get_embeddings", "linear_probe",
    "save_embeddings", "baseline", "baseline_features", "evaluate", "save_predictor", "EventSequencePredictor",
    "ENCODER_TYPES", "ACTIVATIONS", "CLASS_WEIGHTS", "CLIENT", "TIME", "TARGET", "TIME_GAP", "PAD", "UNKNOWN",
    "PRETRAIN_SETTINGS", "ARCHITECTURE", "set_threads",
]

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "event_sequence_classification.ipynb"
HEADLINE_METRICS = ("test_accuracy", "test_macro_f1", "baseline_test_accuracy", "baseline_test_macro_f1")
PACKAGES = ("ptls", "pyarrow", "scipy")

WORKFLOW = Workflow(
    "event_sequence", NOTEBOOK, title="Event-sequence classification", predictor=EventSequencePredictor,
    headline_metrics=HEADLINE_METRICS, packages=PACKAGES, parameters=dict(
        data_path=Param("", "long-format event table (.csv/.parquet); empty means simulated clients", Text()),
        labels_path=Param("", "labels table (client_id, target); empty: <data stem>.labels.csv beside data_path",
                          Text()),
        categorical_fields=Param("event_type,channel", "comma-separated categorical columns", Text(nonempty=True)),
        numeric_fields=Param("amount", "comma-separated numeric columns (time_gap is derived from event_time)", Text()),
        max_seq_len=Param(1000, "events kept per client: the last max_seq_len in time order", Integer(ge=1)),
        impute_numeric=Param(False, "NaN in a numeric field: False is an error, True fills the training median",
                             Flag()),
        pretrained_checkpoint=Param("pretrain", "pretrain (CoLES here) | none (from scratch) | a ptls/state-dict "
                                                "checkpoint path"),
        trust_pickle=Param(False),
        encoder_type=Param("gru", "gru | lstm | transformer", Choice(*ENCODER_TYPES)),
        hidden_size=Param(64, "width of the sequence encoder (the client embedding)", Integer(ge=1)),
        pretrain_epochs=Param(DEFAULTS["pretrain_epochs"], "CoLES epochs (pretrained_checkpoint pretrain)"),
        head_hidden=Param("256,128", "MLP head widths, comma-separated; empty for a linear head", Text()),
        head_dropout=Param(0.1, "dropout after each hidden head layer", Real(ge=0, lt=1)),
        head_activation=Param("relu", " | ".join(ACTIVATIONS), Choice(*ACTIVATIONS)),
        epochs=Param(60),
        freeze_epochs=Param(5, "epochs with the encoder frozen (head only) before everything trains"),
        learning_rate=Param(1.0e-3),
        backbone_lr_ratio=Param(1.0, "the encoder learns at learning_rate * backbone_lr_ratio once unfrozen",
                                Real(gt=0)),
        batch_size=Param(32, "clients per batch"),
        optimizer=Param("adamw", "adam | adamw", Choice("adam", "adamw")),
        lr_scheduler_type=Param("cosine", accepts=Choice(*SCHEDULES)),
        warmup_ratio=Param(0.1),
        class_weights=Param("none", "none | balanced (weights the loss by inverse class frequency)",
                            Choice(*CLASS_WEIGHTS)),
        label_smoothing=Param(0.1),
        grad_clip=Param(1.0),
        amp=Param("none", "none | bf16 (autocast, also on the CPU)", Choice("none", "bf16")),
        save_top_k=Param(3, "checkpoints kept (best epochs by validation macro-F1)"),
        label_fraction=Param(0.1, "share of the training clients whose labels are used"),
        seed=Param(0, "split, pretraining, initialisation and data order"),
    ),
)
