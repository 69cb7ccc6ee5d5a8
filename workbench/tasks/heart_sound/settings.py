"""The heart-sound tasks, their classes and layouts, the fine-tuning modes, and the settings no parameter exposes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskSpec", "TASKS", "MODES", "LOCATIONS", "MIN_SECONDS", "PASCAL_ALIASES", "PRETRAIN_SETTINGS",
           "DEFAULTS", "check_task"]


@dataclass(frozen=True)
class TaskSpec:
    """A task's classes (in the order of the model's outputs), the folder layout it reads, its CirCor column."""

    classes: tuple[str, ...]
    layout: str
    column: str = ""


TASKS = {
    "circor_murmur": TaskSpec(("Absent", "Present", "Unknown"), "circor", "Murmur"),
    "circor_outcome": TaskSpec(("Normal", "Abnormal"), "circor", "Outcome"),
    "physionet2016": TaskSpec(("normal", "abnormal"), "physionet2016"),
    "pascal": TaskSpec(("normal", "murmur", "extrasystole", "artifact"), "pascal"),
}
MODES = ("linear_eval", "few_shot", "full")
LOCATIONS = ("AV", "PV", "TV", "MV")
#: Recordings shorter than this (seconds) hold less than a heart cycle and are skipped.
MIN_SECONDS = 1.0
#: PASCAL folder names that mean one of the task's classes.
PASCAL_ALIASES = {"extrastole": "extrasystole", "artefact": "artifact"}

#: Settings of the pretraining step: each is part of the pretrained encoder's fingerprint.
PRETRAIN_SETTINGS = ("widths", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "temperature",
                     "pretrain_crops", "weight_decay")

#: Architecture, generator and training settings the notebook does not expose as parameters.
DEFAULTS = {
    "widths": (8, 16, 32, 64),
    "dropout": 0.1,
    "weight_decay": 1e-4,
    "overlap": 0.5,
    "crops_per_recording": 3,
    "pretrain_epochs": 20,
    "pretrain_lr": 3e-3,
    "pretrain_batch_size": 64,
    "pretrain_crops": 1,
    "temperature": 0.2,
    "sim_patients": 160,
    "sim_seconds": 6.0,
    "sim_locations": 2,
    "sim_snr_db": 10.0,  # the generator's difficulty knob: median SNR of the ambient noise (issue 24)
    "test_size": 0.25,
    "val_fraction": 0.15,
}


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS` (the ``task`` parameter accepts the same list)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}.")
    return task
