"""Heart-sound classification: a 1-D conv encoder pretrained contrastively on phonocardiograms (PCG).

Tasks
    ``circor_murmur`` (Absent / Present / Unknown, per patient), ``circor_outcome`` (Normal / Abnormal, per patient),
    ``physionet2016`` (normal / abnormal, per record) and ``pascal`` (normal / murmur / extrasystole / artifact, per
    file); see ``settings.py``.
Data
    CirCor DigiScope 2022, PhysioNet/CinC 2016 and PASCAL folders in their real layouts, resampled, band-passed to
    25-400 Hz, cut into overlapping windows and split by patient (``data.py``); with an empty ``data_path``,
    synthetic recordings whose ground truth (heart rate, S1/S2, murmurs with CirCor's counts of grade, timing,
    shape and pitch, noise) is written in ``synthetic.py``.
Model
    :class:`ConvEncoder` (four strided ``Conv1d-BatchNorm-ReLU`` blocks, mean and max over time) with a dropout +
    linear head (``model.py``).
Pretraining
    SimCLR-style NT-Xent on two augmented crops of each training patient's recording, without labels, cached by
    :func:`workbench.protocol.pretrain` and loaded through :func:`workbench.load_pretrained` (``steps.py``).
Fine-tuning modes
    ``linear_eval``: the encoder is frozen (its BatchNorm statistics locked), the head trains. ``few_shot``: a
    stratified ``label_fraction`` of the labelled training patients, everything trains. ``full``: every labelled
    patient, everything trains. In both the encoder learns at ``backbone_lr_ratio`` times the head's rate.
Baseline
    Logistic regression (:func:`workbench.protocol.fit_baseline`) on per-recording band-power features (log
    relative Welch power in seven bands from 25 to 400 Hz), fit on the same labelled recordings as the model and
    scored by the same function.
"""

from __future__ import annotations

from pathlib import Path

from ...params import Choice, Integer, Real, Text
from ...schedules import SCHEDULES
from ...workflow import Param, Workflow
from .data import CropBatches, HeartSoundData, Recording, WindowBatches, examples, load, preprocess, read_folder
from .model import ContrastiveModel, ConvEncoder, HeartSoundClassifier, build_model
from .predictor import HeartSoundPredictor, save_predictor
from .settings import DEFAULTS, LOCATIONS, MIN_SECONDS, MODES, PRETRAIN_SETTINGS, TASKS
from .steps import (BANDS, band_power_features, baseline, evaluate, finetune, predict_proba, pretrain, pretrained,
                    split_metrics, strategy_of, train_batches)
from .synthetic import simulate, write_layout

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "TASKS", "MODES", "LOCATIONS", "MIN_SECONDS", "PRETRAIN_SETTINGS", "BANDS",
    "Recording", "HeartSoundData", "CropBatches", "WindowBatches", "simulate", "write_layout", "read_folder", "load",
    "preprocess", "examples",
    "ConvEncoder", "HeartSoundClassifier", "ContrastiveModel", "build_model",
    "pretrain", "pretrained", "strategy_of", "train_batches", "finetune", "predict_proba", "split_metrics",
    "baseline", "band_power_features", "evaluate",
    "save_predictor", "HeartSoundPredictor",
]

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "heart_sound_classification.ipynb"
HEADLINE_METRICS = ("test_auroc", "test_auprc", "test_macro_f1", "baseline_test_auroc", "val_auroc")
PACKAGES = ("scipy",)

#: The workflow, declared once: the notebook's parameters cell, the checks, the panel and the CLI help derive from it.
#: Names of workbench.workflow.SHARED take their constraint (and, where not worded here, their help) from there; the
#: run parameters output_dir, tracker, device, dtype and interactive are appended with the shared wording.
WORKFLOW = Workflow(
    "heart_sound", NOTEBOOK, title="Heart-sound classification", predictor=HeartSoundPredictor,
    headline_metrics=HEADLINE_METRICS, packages=PACKAGES, parameters=dict(
        data_path=Param("", "dataset folder in the task's layout; empty means synthetic recordings"),
        task=Param("circor_murmur", "circor_murmur | circor_outcome | physionet2016 | pascal", Choice(*TASKS)),
        mode=Param("linear_eval", "linear_eval (frozen encoder) | few_shot (label_fraction of the labelled "
                                  "patients) | full", Choice(*MODES)),
        label_fraction=Param(0.1, "share of labelled training patients used in few_shot mode (stratified; the other "
                                  "modes use all)"),
        pretrained_checkpoint=Param("pretrain", "pretrain (NT-Xent here, cached) | none (from scratch) | a "
                                                "checkpoint path"),
        pretrain_epochs=Param(20, "contrastive pretraining epochs"),
        epochs=Param(20),
        learning_rate=Param(1.0e-2),
        backbone_lr_ratio=Param(0.1, "encoder learning rate as a multiple of learning_rate (few_shot, full)"),
        lr_scheduler_type=Param("cosine", accepts=Choice(*SCHEDULES)),
        warmup_ratio=Param(0.1),
        batch_size=Param(32, "windows per batch"),
        segment_seconds=Param(2.0, "window length; windows overlap by half", Real(ge=0.5)),
        sample_rate=Param(4000, "Hz every recording is resampled to (CirCor's rate)", Integer(ge=1000)),
        save_every=Param(0, "also keep a checkpoint every N epochs (0: best and last only)", Integer(ge=0)),
        seed=Param(0, "simulated data, split, initialisation and data order"),
        wandb_project=Param("workbench-heart-sound", "wandb project name (tracker wandb)", Text(nonempty=True)),
        watch=Param(False),
    ),
)
