"""Heart-sound classification: a 1-D conv encoder pretrained contrastively on phonocardiograms (PCG).

Tasks
    ``circor_murmur`` (Absent / Present / Unknown, per patient), ``circor_outcome`` (Normal /
    Abnormal, per patient), ``physionet2016`` (normal / abnormal, per record) and ``pascal``
    (normal / murmur / extrasystole / artifact, per file).
Data
    Real layouts (:func:`read_folder`): CirCor DigiScope 2022 (``training_data.csv`` with
    ``Patient ID``, ``Recording locations:``, ``Murmur``, ``Outcome``; ``{patient}_{location}.wav``
    with an optional ``.tsv`` segmentation of rows ``start end state``, state 0-4 = unannotated,
    S1, systole, S2, diastole); PhysioNet/CinC 2016 (folders holding ``REFERENCE.csv`` rows
    ``record,-1|1`` and ``record.wav``, 2000 Hz); PASCAL (one folder per class of wav files).
    Each wav is read with scipy, mixed down to mono, resampled to ``sample_rate`` with
    ``scipy.signal.resample_poly``, band-passed to 25-400 Hz and scaled to unit standard
    deviation. Recordings shorter than :data:`MIN_SECONDS` are skipped and counted. Windows of
    ``segment_seconds`` overlap by ``overlap``; a recording's probabilities are the mean of its
    windows'. Splits are by patient (stratified by the patient's label): no patient is in two.
Synthetic ground truth (:func:`simulate`, used when ``data_path`` is empty)
    Revised once for issue 24 toward the CirCor DigiScope 2022 recordings, then frozen; where no source gives a
    number it is marked *assumed*. Sources: [C] the CirCor public training set (942 patients), counts of its
    ``training_data.csv`` columns (as tabulated in github.com/ash-neupane/heart-murmur, explore.ipynb; the same
    categories as [P]); [P] the PhysioNet Challenge 2022 page and its data description
    (physionetchallenges.org/2022, /2022/data), which follow Oliveira et al., "The CirCor DigiScope Dataset: From
    Murmur Detection to Murmur Classification", IEEE JBHI 26(6) 2022, doi:10.1109/JBHI.2021.3137048.
    Heart: each patient draws a heart rate U(60, 140) bpm; beat intervals vary by N(0, 4%) beat to beat.
    Systole lasts ``0.42 - 0.0015 * bpm`` s. S1 is a damped sine (decay 20 ms) at the patient's frequency
    U(35, 60) Hz, S2 one at U(50, 90) Hz (decay 15 ms, amplitude 0.7), each +-20% per beat. The auscultation
    location (AV, PV, TV, MV; two per CirCor patient) scales S1 by 0.6 / 0.6 / 0.9 / 1.0 and S2 by
    1.0 / 0.9 / 0.6 / 0.5 (all assumed, unchanged). Recordings last ``DEFAULTS["sim_seconds"]`` (CirCor's
    average 22.9 s [P], shortened for compute).
    Murmur: present in 179 / 874 = 20.5% of CirCor patients (Present 179, Absent 695 [C]; PhysioNet task: 20%).
    Systolic in 178 of 179, diastolic in 5 of 179, all early-diastolic decrescendo [C]; a diastolic murmur
    covers the first half of diastole. Systolic timing holosystolic / early / mid / late with counts
    101 / 59 / 17 / 1 [C], covering 0-1 / 0-0.5 / 0.25-0.75 / 0.5-1 of the S1-end-to-S2 interval (assumed);
    shape plateau / decrescendo / diamond / crescendo 111 / 34 / 31 / 2 [C] (timing and shape drawn
    independently: assumed, [C] gives only their counts); grade I / II / III of VI 104 / 28 / 46 [C] (III holds
    III-VI [P]; diastolic I / II / III of IV 3 / 1 / 1); pitch low / medium / high 87 / 49 / 42 [C], as
    band-limited Gaussian noise in 25-125 / 150-350 / 350-600 Hz (the usual auscultation bands; assumed, CirCor
    names the pitch only), each edge x U(0.9, 1.1) per patient. Quality (harsh 96 / blowing 78 / musical 4 [C])
    is not modelled. The murmur's peak amplitude is ``0.1 * grade`` (assumed, unchanged) at the most audible
    location, drawn PV / TV / MV / AV 62 / 56 / 42 / 19 [C], and half that elsewhere; following [P]'s grading
    rule a grade I murmur is not heard at every location (each other location hears it with p 0.5, assumed),
    grade II and up at all of them. The 25-400 Hz band-pass of ``preprocess`` keeps little of a high-pitch
    murmur, as it would of a real one.
    Noise (the kinds issue 24 names for CirCor: stethoscope rubbing, talking, crying, ambient; not found in [P],
    the paper itself was not at hand; every level and rate assumed): ambient pink (1/f) noise at the patient's signal-to-noise ratio, heart
    sounds (S1 + S2) over ambient power, N(``DEFAULTS["sim_snr_db"]``, 6 dB) per patient and x U(0.8, 1.25) in
    amplitude per recording. ``sim_snr_db`` is the one free difficulty knob: 10 dB, chosen before measuring and
    left there because the band-power baseline's murmur test AUROC over seeds 0-4 was already inside 0.70-0.90
    (0.761; benchmarks/heart_baseline_difficulty.py, issue 24). Each recording also carries, independently:
    stethoscope rubbing (p 0.5; 1-3 bursts of 0.1-0.5 s of 20-300..1000 Hz noise with a rough envelope),
    talking (p 0.3; 1-3 voiced utterances of 0.5-2 s, F0 90-220 Hz, 8 harmonics, syllables at 4-5 Hz) and
    crying (p 0.1; 1-3 cries of 0.5-1.5 s, F0 300-550 Hz with vibrato), each peaking at 1-4x (talking 0.5-2x)
    the heart sounds' RMS. Breathing is 25-150 Hz noise gated by ``sin^2`` at 12-24 breaths/min (amplitude
    U(0, 0.15)), which also modulates the heart sounds by 10%. An extrasystole (PhysioNet: 10%) makes each beat
    premature with p 0.12 (interval x0.6, then a compensatory x1.4 pause). An artifact (PASCAL) adds 3-6 bursts
    of 0.2-1 s broadband noise at 1-4x the S1 amplitude.
    Labels come from these latents: CirCor murmur is Unknown for the 68 / 942 = 7.2% of patients with the lowest
    SNR ([C]; the annotator could not tell, [P]), else Present / Absent by the murmur, even where a grade I
    murmur is not heard at the recorded locations; CirCor outcome is Abnormal with probability
    ``0.2 + 0.2 * grade`` (grade 0 without murmur), so it is noisy by design; PhysioNet is abnormal with a
    murmur or an extrasystole; PASCAL draws its class with p 0.4 / 0.25 / 0.15 / 0.2 and sets the latent to
    match. Every recording comes with its true S1/systole/S2/diastole segmentation.
Model
    :class:`ConvEncoder`: average-pooling to about 1 kHz, four ``Conv1d-BatchNorm-ReLU`` blocks
    of stride 2 (widths 8-16-32-64), then mean and max over time; a dropout + linear head.
Pretraining
    SimCLR-style NT-Xent (:func:`workbench.audio.nt_xent`) on the training patients'
    recordings, without labels: two views of one recording are random crops (so they are
    shifted in time) with a random circular shift, gain, noise and band-pass jitter
    (:func:`workbench.audio.augment_views`). The encoder weights are written as safetensors,
    cached by fingerprint (data content, training recordings, every setting, this module's
    source), and loaded into the classifier through :func:`workbench.load_pretrained`.
Fine-tuning modes
    ``linear_eval``: the encoder is frozen (its BatchNorm statistics locked), the head trains.
    ``few_shot``: a stratified ``label_fraction`` of the labelled training patients, everything
    trains. ``full``: every labelled patient, everything trains, the encoder at
    ``backbone_lr_ratio`` times the head's learning rate.
Baseline
    Logistic regression on per-recording band-power features (log relative Welch power in seven
    bands from 25 to 400 Hz), fitted on the same labelled recordings.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import audio, splits
from . import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from ..batches import IndexBatches
from ..cache import cached, code_version, content_hash, fingerprint
from ..checkpoints import resolve_pretrained, save_weights
from ..devices import NOTEBOOK_DTYPES, DeviceName, placement_key, to_model, to_numpy
from ..metrics import MetricsTable, classification_metrics, confusion_matrix, roc_pr_curves, sensitivity_specificity
from ..params import Choice, Flag, Integer, Real, Spec, Text
from ..workflow import Param, Workflow
from ..predict import AUDIO_SUFFIXES, AlignmentReport, Predictions, PredictError, Predictor, class_predictions
from ..predict import save_predictor as _save_predictor
from ..schedules import SCHEDULES
from ..tracking import TRACKERS
from ..training import Callback

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "TASKS", "MODES", "Recording", "HeartSoundData", "ConvEncoder", "HeartSoundClassifier",
    "ContrastiveModel", "simulate", "write_layout", "read_folder", "load", "build_model", "pretrain", "pretrained",
    "finetune", "train_batches", "strategy_of", "watch_gradients", "baseline", "band_power_features", "evaluate",
    "examples", "open_log",
    "HEADLINE_METRICS", "PACKAGES", "NOTEBOOK",
]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "heart_sound_classification.ipynb"
HEADLINE_METRICS = ("test_auroc", "test_auprc", "test_macro_f1", "baseline_test_auroc", "val_auroc")
PACKAGES = ("scipy",)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
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

#: What each notebook parameter accepts, checked before any work (``workbench run``/``sweep`` and the notebook).
WORKFLOW = Workflow(
    name='heart_sound',
    title='Heart-sound classification',
    notebook=NOTEBOOK,
    headline_metrics=HEADLINE_METRICS,
    packages=PACKAGES,
    predictor="workbench.tasks.heart_sound:HeartSoundPredictor",
    parameters=dict(
        data_path=Param("", "dataset folder in the task's layout; empty means synthetic recordings", Text()),
        task=Param("circor_murmur", "circor_murmur | circor_outcome | physionet2016 | pascal", Choice(*TASKS)),
        mode=Param("linear_eval", "linear_eval (frozen encoder) | few_shot (label_fraction of the labelled patients) | full", Choice(*MODES)),
        label_fraction=Param(0.1, "share of labelled training patients used in few_shot mode (stratified)", Real(gt=0, le=1)),
        pretrained_checkpoint=Param("pretrain", "pretrain (NT-Xent here, cached) | none (from scratch) | a checkpoint path", Choice("pretrain", "none", or_path=True)),
        pretrain_epochs=Param(20, "contrastive pretraining epochs", Integer(ge=1)),
        epochs=Param(20, "fine-tuning epochs", Integer(ge=1)),
        learning_rate=Param(1.0e-2, "head learning rate", Real(gt=0)),
        backbone_lr_ratio=Param(0.1, "encoder learning rate as a multiple of learning_rate (few_shot, full)", Real(ge=0)),
        lr_scheduler_type=Param("cosine", "constant | constant_with_warmup | cosine | linear | step", Choice(*SCHEDULES)),
        warmup_ratio=Param(0.1, "fraction of steps spent warming up", Real(ge=0, lt=1)),
        batch_size=Param(32, "windows per batch", Integer(ge=1)),
        segment_seconds=Param(2.0, "window length; windows overlap by half", Real(ge=0.5)),
        sample_rate=Param(4000, "Hz every recording is resampled to (CirCor's rate)", Integer(ge=1000)),
        save_every=Param(0, "also keep a checkpoint every N epochs (0: best and last only)", Integer(ge=0)),
        seed=Param(0, "data, split, initialisation and data order", Integer(ge=0)),
        output_dir=Param("", "run folder; empty: a new dated folder under runs/heart_sound/", Text()),
        tracker=Param("none", "none | wandb (offline, into the run folder)", Choice(*TRACKERS)),
        wandb_project=Param("workbench-heart-sound", "wandb project name", Text(nonempty=True)),
        watch=Param(False, "log gradient histograms to wandb", Flag()),
        device=Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", DeviceName()),
        dtype=Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device path)", Choice(*NOTEBOOK_DTYPES)),
        interactive=Param(True, "show the widget panel and live curves (papermill runs set it False)", Flag()),
    ),
)

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


# --------------------------------------------------------------------------- data


@dataclass
class Recording:
    """One preprocessed recording: mono, at the data's sample rate, band-passed, unit variance."""

    signal: np.ndarray
    patient: str
    label: str
    location: str = ""
    name: str = ""
    segmentation: np.ndarray | None = None  # rows (start s, end s, state 0-4)


@dataclass
class HeartSoundData:
    """Recordings of one task, their labels and the patient-level split."""

    recordings: list[Recording]
    task: str
    sample_rate: int
    segment_seconds: float
    overlap: float
    train_idx: np.ndarray
    labelled_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    source: str = ""
    notes: list[str] = field(default_factory=list)
    _hash: str | None = field(default=None, init=False, repr=False)

    @property
    def classes(self) -> list[str]:
        return list(TASKS[self.task].classes)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.recordings])

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in self.recordings], dtype=np.int64)

    @property
    def patients(self) -> np.ndarray:
        return np.array([r.patient for r in self.recordings])

    @property
    def window(self) -> int:
        return int(round(self.segment_seconds * self.sample_rate))

    @property
    def hop(self) -> int:
        return max(1, int(round(self.window * (1 - self.overlap))))

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = fingerprint([content_hash(r.signal) for r in self.recordings],
                                     [[r.patient, r.label, r.location] for r in self.recordings], self.sample_rate)
        return self._hash

    def windows(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """``(windows, owner)``: every window of the recordings ``idx``, and the position in ``idx`` of each."""
        parts, owner = [], []
        for k, i in enumerate(idx):
            w = audio.frame(self.recordings[i].signal, size=self.window, hop=self.hop)
            parts.append(w)
            owner.append(np.full(len(w), k))
        return np.concatenate(parts), np.concatenate(owner)

    def to_frame(self):
        import pandas as pd

        labels, patients = self.labels, self.patients
        parts = {"fit (labelled)": self.labelled_idx, "validation": self.val_idx, "train (all)": self.train_idx,
                 "test": self.test_idx}
        frame = pd.DataFrame({name: pd.Series(labels[idx]).value_counts() for name, idx in parts.items()})
        frame = frame.reindex(self.classes).fillna(0).astype(int)
        frame.loc["recordings"] = frame.sum()
        frame.loc["patients"] = [len(set(patients[idx])) for idx in parts.values()]
        return frame.rename_axis(self.task)

    def to_dict(self) -> dict:
        return {"source": self.source, "task": self.task, "recordings": len(self.recordings),
                "patients": len(set(self.patients)), "classes": self.classes, "sample_rate": self.sample_rate,
                "train": len(self.train_idx), "labelled": len(self.labelled_idx), "val": len(self.val_idx),
                "test": len(self.test_idx), "notes": list(self.notes)}

    def summary(self) -> str:
        seconds = sum(len(r.signal) for r in self.recordings) / self.sample_rate
        return (f"{self.source}: {len(self.recordings)} recordings of {len(set(self.patients))} patients "
                f"({seconds / 60:.1f} min at {self.sample_rate} Hz), task {self.task} ({', '.join(self.classes)}); "
                f"windows of {self.segment_seconds:g} s, {self.overlap:.0%} overlap")

    def __repr__(self) -> str:
        return "\n".join([self.summary(), *self.notes, self.to_frame().to_string()])

    def _repr_html_(self) -> str:
        import html

        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return f"<p><b>{html.escape(self.summary())}</b></p>" + (f"<ul>{notes}</ul>" if notes else "") + self.to_frame().to_html()


# --------------------------------------------------------------------------- synthetic generator

# Murmur properties of the CirCor DigiScope 2022 public training set (942 patients; the counts of its
# training_data.csv). The module docstring says where each number comes from.
#: Share of patients with a murmur, among those whose murmur status is known (Present 179, Absent 695).
MURMUR_SHARE = 179 / (179 + 695)
#: Share of patients whose murmur status is Unknown (68 of 942): the patients with the lowest SNR.
UNKNOWN_SHARE = 68 / 942
#: Systolic murmurs: 178 of the 179 murmur patients; diastolic (all early-diastolic decrescendo): 5 of 179.
SYSTOLIC_SHARE, DIASTOLIC_SHARE = 178 / 179, 5 / 179
SYSTOLIC_TIMING = {"holosystolic": 101, "early": 59, "mid": 17, "late": 1}
SYSTOLIC_SHAPE = {"plateau": 111, "decrescendo": 34, "diamond": 31, "crescendo": 2}
SYSTOLIC_GRADE = {1: 104, 2: 28, 3: 46}  # I/VI, II/VI, III/VI (III/VI holds III-VI)
DIASTOLIC_GRADE = {1: 3, 2: 1, 3: 1}  # I/IV, II/IV, III/IV
PITCH = {"low": 87, "medium": 49, "high": 42}
MOST_AUDIBLE = {"PV": 62, "TV": 56, "MV": 42, "AV": 19}
# Assumed (CirCor names these categories but gives no numbers for them):
#: Pitch bands (Hz) of the usual auscultation convention.
PITCH_BANDS = {"low": (25.0, 125.0), "medium": (150.0, 350.0), "high": (350.0, 600.0)}
#: Part of systole (0 = end of S1, 1 = start of S2) each timing covers.
TIMING_SPAN = {"holosystolic": (0.0, 1.0), "early": (0.0, 0.5), "mid": (0.25, 0.75), "late": (0.5, 1.0)}
#: Spread (dB) of the patients' SNR around ``DEFAULTS["sim_snr_db"]``.
SNR_SPREAD_DB = 6.0
#: Noise events per recording: (probability that the kind occurs, events when it does, amplitude range relative to
#: the RMS of the recording's heart sounds, duration range in s).
NOISE_EVENTS = {"rubbing": (0.5, (1, 3), (1.0, 4.0), (0.1, 0.5)),
                "talking": (0.3, (1, 3), (0.5, 2.0), (0.5, 2.0)),
                "crying": (0.1, (1, 3), (1.0, 4.0), (0.5, 1.5))}


def _draw(rng, counts: Mapping):
    """One key of ``counts``, drawn with probability proportional to its count."""
    keys = list(counts)
    weights = np.array([counts[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _unknown_below(snr_db: float) -> float:
    """The SNR (dB) under which a CirCor patient's murmur status is Unknown: the ``UNKNOWN_SHARE`` quantile."""
    from scipy.stats import norm

    return snr_db + SNR_SPREAD_DB * float(norm.ppf(UNKNOWN_SHARE))


def _damped(rate: int, freq: float, decay: float, seconds: float = 0.12) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.exp(-t / decay) * np.sin(2 * np.pi * freq * t) * (1 - np.exp(-t / 0.003))


def _band_noise(rng, n: int, rate: int, low: float, high: float) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    high = min(high, 0.45 * rate)
    sos = butter(4, [low, high], btype="bandpass", fs=rate, output="sos")
    x = sosfilt(sos, rng.normal(size=n))
    return x / (x.std() + 1e-12)


def _add(x: np.ndarray, start: int, piece: np.ndarray) -> None:
    if start >= len(x):
        return
    end = min(len(x), start + len(piece))
    x[start:end] += piece[:end - start]


def _pink_noise(rng, n: int, rate: int) -> np.ndarray:
    """Unit-variance noise with power falling as 1/f above 20 Hz (room ambience)."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spectrum /= np.sqrt(np.maximum(f, 20.0))
    x = np.fft.irfft(spectrum, n)
    return x / (x.std() + 1e-12)


def _harmonic(rng, n: int, rate: int, f0: float, harmonics: int, *, vibrato: float) -> np.ndarray:
    """A voiced sound: harmonics of a slowly gliding ``f0`` with amplitudes 1/k, peak-normalised."""
    t = np.arange(n) / rate
    glide = f0 * (1 + 0.15 * np.sin(np.pi * t / t[-1]) + vibrato * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(glide) / rate
    x = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, harmonics + 1))
    return x / np.abs(x).max()


def _noise_event(rng, kind: str, n: int, rate: int) -> np.ndarray:
    """One noise event of ``kind`` (rubbing, talking, crying), peak about 1."""
    if kind == "rubbing":  # stethoscope friction: broadband bursts, rough envelope
        rough = np.abs(_band_noise(rng, n, rate, 2.0, 30.0))
        return _band_noise(rng, n, rate, 20.0, rng.uniform(300, 1000)) * rough / 3 * np.hanning(n)
    if kind == "talking":  # voiced speech of an adult nearby: F0 90-220 Hz, syllables at 4-5 Hz
        syllables = np.sin(np.pi * rng.uniform(4, 5) * np.arange(n) / rate + rng.uniform(0, np.pi)) ** 2
        return _harmonic(rng, n, rate, rng.uniform(90, 220), 8, vibrato=0.02) * syllables * np.hanning(n)
    # crying: a child's cry, F0 300-550 Hz with vibrato
    return _harmonic(rng, n, rate, rng.uniform(300, 550), 4, vibrato=0.04) * np.hanning(n)


def _shape(shape: str, n: int) -> np.ndarray:
    """A murmur's intensity over its ``n`` samples: plateau, crescendo, decrescendo or diamond; peak 1."""
    u = np.linspace(0, 1, n)
    if shape == "crescendo":
        return u
    if shape == "decrescendo":
        return 1 - u
    if shape == "diamond":
        return 1 - np.abs(2 * u - 1)
    return np.minimum(1, np.minimum(u, 1 - u) / 0.1)  # plateau, 10% ramps at each end


def _patient(rng, task: str, snr_db: float) -> dict:
    """A patient's latent state (see the module docstring)."""
    p = {"bpm": rng.uniform(60, 140), "f1": rng.uniform(35, 60), "f2": rng.uniform(50, 90),
         "snr_db": float(rng.normal(snr_db, SNR_SPREAD_DB)), "unknown": False, "murmur": "", "grade": 0,
         "timing": "", "shape": "", "pitch": "", "heard": (), "extrasystole": False, "artifact": False,
         "loudest": _draw(rng, MOST_AUDIBLE), "breath_rate": rng.uniform(12, 24) / 60,
         "breath_amp": rng.uniform(0, 0.15)}
    p["unknown"] = task.startswith("circor") and p["snr_db"] < _unknown_below(snr_db)
    if task == "pascal":
        p["pascal"] = str(rng.choice(TASKS["pascal"].classes, p=[0.4, 0.25, 0.15, 0.2]))
        has_murmur, p["extrasystole"], p["artifact"] = p["pascal"] == "murmur", p["pascal"] == "extrasystole", p["pascal"] == "artifact"
    else:
        has_murmur = rng.random() < (MURMUR_SHARE if task.startswith("circor") else 0.2)
        p["extrasystole"] = task == "physionet2016" and rng.random() < 0.1
    if has_murmur:
        diastolic = rng.random() < DIASTOLIC_SHARE
        systolic = rng.random() < SYSTOLIC_SHARE or not diastolic
        p["murmur"] = "both" if systolic and diastolic else ("systolic" if systolic else "diastolic")
        p["grade"] = _draw(rng, SYSTOLIC_GRADE if systolic else DIASTOLIC_GRADE)
        p["timing"], p["shape"] = _draw(rng, SYSTOLIC_TIMING), _draw(rng, SYSTOLIC_SHAPE)
        p["pitch"] = _draw(rng, PITCH)
        lo, hi = PITCH_BANDS[p["pitch"]]
        p["band"] = (lo * rng.uniform(0.9, 1.1), hi * rng.uniform(0.9, 1.1))
        # grade I: not heard at every location; grade II and up: at every location
        p["heard"] = tuple(loc for loc in LOCATIONS if loc == p["loudest"] or p["grade"] > 1 or rng.random() < 0.5)
    p["abnormal"] = bool(rng.random() < 0.2 + 0.2 * p["grade"])
    return p


def _label(p: dict, task: str) -> str:
    if task == "circor_murmur":
        return "Unknown" if p["unknown"] else ("Present" if p["murmur"] else "Absent")
    if task == "circor_outcome":
        return "Abnormal" if p["abnormal"] else "Normal"
    if task == "physionet2016":
        return "abnormal" if p["murmur"] or p["extrasystole"] else "normal"
    return p["pascal"]


def _recording(rng, p: dict, location: str, *, seconds: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """One raw recording of patient ``p`` at ``location`` and its true segmentation."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    heart, envelope = np.zeros(n), np.zeros(n)
    rr_mean = 60.0 / p["bpm"]
    systole = 0.42 - 0.0015 * p["bpm"]
    s1_gain = {"AV": 0.6, "PV": 0.6, "TV": 0.9, "MV": 1.0}[location]
    s2_gain = {"AV": 1.0, "PV": 0.9, "TV": 0.6, "MV": 0.5}[location]
    breath = np.sin(2 * np.pi * p["breath_rate"] * t + rng.uniform(0, 2 * np.pi)) ** 2
    seg, beat, pause = [], rng.uniform(0, rr_mean), False
    span = TIMING_SPAN.get(p["timing"], (0.0, 1.0))
    while beat < seconds:
        rr = rr_mean * (1 + 0.04 * rng.normal())
        if pause:
            rr, pause = rr * 1.4, False
        elif p["extrasystole"] and rng.random() < 0.12:
            rr, pause = rr * 0.6, True
        i = int(beat * rate)
        mod = 1 + 0.1 * breath[min(i, n - 1)]
        _add(heart, i, s1_gain * mod * rng.uniform(0.8, 1.2) * _damped(rate, p["f1"] * rng.uniform(0.8, 1.2), 0.02))
        s2 = beat + min(systole, 0.8 * rr)
        _add(heart, int(s2 * rate), 0.7 * s2_gain * mod * rng.uniform(0.8, 1.2)
             * _damped(rate, p["f2"] * rng.uniform(0.8, 1.2), 0.015))
        end = beat + rr
        seg += [(beat, beat + 0.1, 1), (beat + 0.1, s2, 2), (s2, s2 + 0.08, 3), (s2 + 0.08, end, 4)]
        if p["murmur"] in ("systolic", "both"):
            start, stop = beat + 0.1, s2 - 0.01
            a, b = (int((start + f * (stop - start)) * rate) for f in span)
            if b > a:
                _add(envelope, a, _shape(p["shape"], b - a))
        if p["murmur"] in ("diastolic", "both"):  # early-diastolic decrescendo over the first half of diastole
            a, b = int((s2 + 0.08) * rate), int((s2 + 0.08 + 0.5 * (end - s2 - 0.08)) * rate)
            if b > a:
                _add(envelope, a, np.exp(-np.linspace(0, 3, b - a)))
        beat = end
    heart_rms = float(np.sqrt(np.mean(heart ** 2))) + 1e-12
    x = heart
    if p["murmur"] and location in p["heard"]:
        gain = 1.0 if location == p["loudest"] else 0.5
        x = x + 0.1 * p["grade"] * gain * envelope * _band_noise(rng, n, rate, *p["band"])
    x = x + p["breath_amp"] * breath * _band_noise(rng, n, rate, 25, 150)
    x = x + heart_rms * 10 ** (-p["snr_db"] / 20) * rng.uniform(0.8, 1.25) * _pink_noise(rng, n, rate)
    for kind, (chance, count, amplitude, duration) in NOISE_EVENTS.items():
        if rng.random() < chance:
            for _ in range(rng.integers(count[0], count[1] + 1)):
                length = max(2, int(rng.uniform(*duration) * rate))
                _add(x, int(rng.uniform(0, seconds) * rate),
                     heart_rms * rng.uniform(*amplitude) * _noise_event(rng, kind, length, rate))
    if p["artifact"]:
        for _ in range(rng.integers(3, 7)):
            length = int(rng.uniform(0.2, 1.0) * rate)
            _add(x, int(rng.uniform(0, seconds) * rate), rng.uniform(1, 4) * s1_gain * rng.normal(size=length)
                 * np.hanning(length))
    seg = np.array([s for s in seg if s[0] < seconds], dtype=np.float64).reshape(-1, 3)
    seg[:, 1] = np.minimum(seg[:, 1], seconds)
    return x.astype(np.float32), seg


def simulate(task: str, *, n_patients: int = 200, seconds: float = 8.0, sample_rate: int = 4000,
             locations: int = 2, seed: int = 0) -> list[dict]:
    """Raw synthetic recordings for ``task``: dicts with patient, location, label, signal, segmentation, latent.

    CirCor tasks give each patient ``locations`` of AV/PV/TV/MV; the other tasks one recording
    per patient. The ground truth is in the module docstring; the median SNR is ``DEFAULTS["sim_snr_db"]``.
    The same seed gives the same data.
    """
    _check_task(task)
    rng = np.random.default_rng([seed, 7])
    out = []
    for k in range(n_patients):
        p = _patient(rng, task, DEFAULTS["sim_snr_db"])
        locs = rng.choice(LOCATIONS, size=locations, replace=False) if task.startswith("circor") else [rng.choice(LOCATIONS)]
        label = _label(p, task)
        for loc in locs:
            signal, seg = _recording(rng, p, str(loc), seconds=seconds, rate=sample_rate)
            out.append({"patient": f"{50000 + k}", "location": str(loc), "label": label, "signal": signal,
                        "segmentation": seg, "latent": p})
    return out


def write_layout(folder, task: str, *, n_patients: int = 6, seconds: float = 4.0, sample_rate: int = 4000,
                 seed: int = 0) -> Path:
    """Write simulated recordings in the real layout of ``task`` (CirCor, PhysioNet 2016 or PASCAL) under ``folder``.

    PhysioNet files are written at 2000 Hz, as the challenge's are. Used for ``data/heart_sound/``
    and by the tests; :func:`read_folder` reads them back.
    """
    folder = Path(folder)
    layout = TASKS[_check_task(task)].layout
    rate = 2000 if layout == "physionet2016" else sample_rate
    items = simulate(task, n_patients=n_patients, seconds=seconds, sample_rate=rate, seed=seed)
    if layout == "circor":
        wav_dir = folder / "training_data"
        rows = {}
        for item in items:
            pid = item["patient"]
            stem = wav_dir / f"{pid}_{item['location']}"
            audio.write_wav(stem.with_suffix(".wav"), item["signal"], rate)
            with open(stem.with_suffix(".tsv"), "w") as fh:
                fh.writelines(f"{a:.3f}\t{b:.3f}\t{int(s)}\n" for a, b, s in item["segmentation"])
            labels = {"Murmur": _label(item["latent"], "circor_murmur"), "Outcome": _label(item["latent"], "circor_outcome")}
            row = rows.setdefault(pid, {"Patient ID": pid, "Recording locations:": [], **labels})
            row["Recording locations:"].append(item["location"])
        with open(folder / "training_data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["Patient ID", "Recording locations:", "Murmur", "Outcome"])
            writer.writeheader()
            for row in rows.values():
                writer.writerow({**row, "Recording locations:": "+".join(row["Recording locations:"])})
    elif layout == "physionet2016":
        sub = folder / "training-a"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / "REFERENCE.csv", "w") as fh:
            for k, item in enumerate(items):
                record = f"a{k + 1:04d}"
                audio.write_wav(sub / f"{record}.wav", item["signal"], rate)
                fh.write(f"{record},{1 if item['label'] == 'abnormal' else -1}\n")
    else:
        for k, item in enumerate(items):
            audio.write_wav(folder / item["label"] / f"{item['label']}__{k:03d}.wav", item["signal"], rate)
    return folder


# --------------------------------------------------------------------------- reading real layouts


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}.")
    return task


class _Reader:
    """Reads wav files into preprocessed signals and counts what it did to them."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.resampled: dict[int, int] = {}
        self.mixed = 0
        self.skipped: list[str] = []
        self.read = 0
        self.other_notes: list[str] = []  # what a layout's reader dropped, e.g. duplicate records

    def __call__(self, path: Path) -> np.ndarray | None:
        samples, rate = audio.read_wav(path)
        signal, mixed = audio.to_mono(samples)
        if mixed:
            self.mixed += 1
            log.info("%s: %d channels mixed down to mono", path.name, samples.shape[1])
        if len(signal) < MIN_SECONDS * rate:
            self.skipped.append(path.name)
            log.info("%s: skipped, %.2f s is shorter than %.1f s", path.name, len(signal) / rate, MIN_SECONDS)
            return None
        if rate != self.sample_rate:
            self.resampled[rate] = self.resampled.get(rate, 0) + 1
            log.info("%s: resampled from %d Hz to %d Hz", path.name, rate, self.sample_rate)
            signal = audio.resample(signal, rate, self.sample_rate)
        self.read += 1
        return preprocess(signal, self.sample_rate)

    def notes(self) -> list[str]:
        notes = [f"resampled {n} recording(s) from {r} Hz to {self.sample_rate} Hz" for r, n in sorted(self.resampled.items())]
        if self.mixed:
            notes.append(f"mixed {self.mixed} multichannel recording(s) down to mono")
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            notes.append(f"skipped {len(self.skipped)} recording(s) shorter than {MIN_SECONDS:g} s ({shown})")
        notes += self.other_notes
        for note in notes:
            log.warning(note)
        return notes


def preprocess(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    """Band-pass to 25-400 Hz and scale to unit standard deviation."""
    x = audio.bandpass(signal, sample_rate, low=25.0, high=400.0)
    return (x / (x.std() + 1e-8)).astype(np.float32)


def _bad_label(value, *, task: str, where: str) -> ValueError:
    classes = ", ".join(TASKS[task].classes)
    return ValueError(f"{where}: label {value!r} is not one of the {task} classes ({classes}). "
                      "Fix or drop that entry, or pick the task that matches these labels.")


def _read_segmentation(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    rows = np.loadtxt(path, delimiter="\t", ndmin=2)
    return rows[:, :3] if rows.size else None


def _read_circor(root: Path, task: str, reader: _Reader) -> list[Recording]:
    table = root / "training_data.csv"
    if not table.exists():
        raise FileNotFoundError(f"{root}: no training_data.csv. The CirCor layout is training_data.csv plus "
                                "{patient}_{location}.wav files (in training_data/ or beside the csv).")
    wav_dir = root / "training_data" if (root / "training_data").is_dir() else root
    column = TASKS[task].column
    out = []
    with open(table, newline="") as fh:
        for row_number, row in enumerate(csv.DictReader(fh), start=2):
            missing = [c for c in ("Patient ID", column) if c not in row]
            if missing:
                raise KeyError(f"{table}: no column {missing[0]!r}; columns are {list(row)}.")
            pid, label = str(row["Patient ID"]).strip(), str(row[column]).strip()
            if label not in TASKS[task].classes:
                raise _bad_label(label, task=task, where=f"{table} row {row_number} (patient {pid})")
            files = sorted(wav_dir.glob(f"{pid}_*.wav"))
            if not files:
                raise FileNotFoundError(f"{table} row {row_number}: patient {pid} has no recording in {wav_dir} "
                                        f"(expected {pid}_<location>.wav). Add the files or drop the row.")
            for path in files:
                signal = reader(path)
                if signal is not None:
                    location = path.stem.split("_")[1] if "_" in path.stem else ""
                    out.append(Recording(signal, pid, label, location, path.name, _read_segmentation(path.with_suffix(".tsv"))))
    return out


def _read_physionet(root: Path, task: str, reader: _Reader) -> list[Recording]:
    """Every ``REFERENCE.csv`` under ``root``; a record name is read once.

    The challenge's ``validation/`` folder holds copies of training recordings under the same
    record names (``validation/a0001`` is ``training-a/a0001``): read as patients of their own,
    the same recording would land in training and test. Folders named ``validation`` are read
    last, and a record whose name was read already is dropped and counted in the notes.
    """
    references = sorted(root.rglob("REFERENCE.csv"), key=lambda p: (p.parent.name.lower() == "validation", p))
    if not references:
        raise FileNotFoundError(f"{root}: no REFERENCE.csv. The PhysioNet 2016 layout is folders holding "
                                "REFERENCE.csv (record,-1|1) and record.wav.")
    names = {"-1": "normal", "1": "abnormal"}
    out = []
    first_seen: dict[str, str] = {}  # record -> the folder it was read from
    dropped: list[str] = []
    for ref in references:
        with open(ref, newline="") as fh:
            for row_number, row in enumerate(csv.reader(fh), start=1):
                if not row:
                    continue
                record, value = row[0].strip(), (row[1].strip() if len(row) > 1 else "")
                if value not in names:
                    raise ValueError(f"{ref} row {row_number} (record {record}): label {value!r} is not -1 (normal) "
                                     "or 1 (abnormal). Fix or drop that row.")
                path = ref.parent / f"{record}.wav"
                if not path.exists():
                    raise FileNotFoundError(f"{ref} row {row_number}: {path.name} does not exist.")
                if record in first_seen:
                    dropped.append(f"{ref.parent.name}/{record} (read from {first_seen[record]}/)")
                    continue
                first_seen[record] = ref.parent.name
                signal = reader(path)
                if signal is not None:
                    out.append(Recording(signal, f"{ref.parent.name}/{record}", names[value], "", path.name))
    if dropped:
        shown = ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
        reader.other_notes.append(
            f"dropped {len(dropped)} duplicate record(s) whose name was already read ({shown}); PhysioNet 2016's "
            "validation/ folder copies training recordings")
    return out


def _read_pascal(root: Path, task: str, reader: _Reader) -> list[Recording]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.wav")))
    if not folders:
        raise FileNotFoundError(f"{root}: no class folders with wav files. The PASCAL layout is one folder per class "
                                f"({', '.join(TASKS['pascal'].classes)}).")
    out = []
    for folder in folders:
        label = PASCAL_ALIASES.get(folder.name.lower(), folder.name.lower())
        if label not in TASKS[task].classes:
            first = next(folder.glob("*.wav")).name
            raise _bad_label(folder.name, task=task, where=f"{folder} (e.g. {first})")
        for path in sorted(folder.glob("*.wav")):
            signal = reader(path)
            if signal is not None:
                out.append(Recording(signal, path.stem, label, "", path.name))
    return out


def read_folder(data_path, task: str, *, sample_rate: int = 4000) -> tuple[list[Recording], list[str]]:
    """Read the real layout ``task`` expects under ``data_path``; returns recordings and notes on what was done."""
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path={str(data_path)!r} is not a folder. Give the dataset's folder, or '' for "
                                "synthetic recordings.")
    reader = _Reader(sample_rate)
    layout = TASKS[_check_task(task)].layout
    read = {"circor": _read_circor, "physionet2016": _read_physionet, "pascal": _read_pascal}[layout]
    recordings = read(root, task, reader)
    notes = reader.notes()
    if not recordings:
        raise ValueError(f"{root}: every recording was skipped ({len(reader.skipped)} shorter than {MIN_SECONDS:g} s or "
                         "empty); nothing is left to train on. Check that the files hold audio of at least "
                         f"{MIN_SECONDS:g} s each, or point data_path at the folder that does.")
    return recordings, notes


def load(data_path: str = "", task: str = "circor_murmur", *, sample_rate: int = 4000, segment_seconds: float = 2.0,
         overlap: float | None = None, label_fraction: float = 1.0, test_size: float | None = None,
         val_fraction: float | None = None, seed: int = 0, n_patients: int | None = None,
         seconds: float | None = None) -> HeartSoundData:
    """Read (or simulate) recordings and split them by patient.

    Parameters
    ----------
    data_path
        A folder in the layout of ``task`` (see :func:`read_folder`); ``""`` simulates one.
    task
        ``circor_murmur`` | ``circor_outcome`` | ``physionet2016`` | ``pascal``.
    sample_rate, segment_seconds, overlap
        Target rate; window length and overlap (default ``DEFAULTS["overlap"]``).
    label_fraction
        Share of the labelled training patients that fine-tuning uses (stratified, at least one per
        class); ``1.0`` for all. The others stay unlabeled (pretraining sees all training patients).
    test_size, val_fraction
        Shares of patients held out for test, and of the training patients for validation.
    n_patients, seconds
        Size of a simulated data set (default ``DEFAULTS["sim_patients"]``, ``DEFAULTS["sim_seconds"]``).
    """
    _check_task(task)
    overlap = DEFAULTS["overlap"] if overlap is None else overlap
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r} must be in [0, 1).")
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction={label_fraction!r} must be in (0, 1]: the share of labelled training patients used.")
    if data_path:
        recordings, notes = read_folder(data_path, task, sample_rate=sample_rate)
        source = Path(data_path).name
    else:
        n_patients = n_patients or DEFAULTS["sim_patients"]
        items = simulate(task, n_patients=n_patients, seconds=seconds or DEFAULTS["sim_seconds"],
                         sample_rate=sample_rate, locations=DEFAULTS["sim_locations"], seed=seed)
        recordings = [Recording(preprocess(i["signal"], sample_rate), i["patient"], i["label"], i["location"],
                                f"{i['patient']}_{i['location']}", i["segmentation"]) for i in items]
        notes, source = [], f"synthetic PCG (seed {seed})"
    patients, first = np.unique([r.patient for r in recordings], return_index=True)
    patient_label = np.array([recordings[i].label for i in first])
    test_size = DEFAULTS["test_size"] if test_size is None else test_size
    val_fraction = DEFAULTS["val_fraction"] if val_fraction is None else val_fraction
    _, counts = np.unique(patient_label, return_counts=True)
    stratify = counts.min() >= 2
    if not stratify:
        notes.append("a class has fewer than 2 patients: the split is not stratified")
    train_p, test_p = splits.holdout(patient_label, test_size=test_size, seed=seed, stratify=stratify)
    val_p = train_p[splits.few_shot(patient_label[train_p], fraction=val_fraction, seed=seed, min_per_class=0)] \
        if val_fraction > 0 else np.array([], dtype=np.int64)
    fit_p = np.setdiff1d(train_p, val_p)
    if label_fraction < 1:
        fit_p = fit_p[splits.few_shot(patient_label[fit_p], fraction=label_fraction, seed=seed)]

    rec_patient = np.array([r.patient for r in recordings])

    def of(ps):
        return np.flatnonzero(np.isin(rec_patient, patients[ps]))

    return HeartSoundData(recordings, task, sample_rate, segment_seconds, overlap, train_idx=of(train_p),
                          labelled_idx=of(fit_p), val_idx=of(val_p), test_idx=of(test_p), source=source, notes=notes)


# --------------------------------------------------------------------------- batches


class CropBatches(IndexBatches):
    """Random crops of ``size`` samples, ``crops`` per recording per epoch; ``views=2`` gives two crops of each.

    Has a length and a ``generator`` (its RNG, for the order and the crops), so :func:`workbench.fit` can
    restore the order on resume; shards itself under DDP (:class:`workbench.batches.IndexBatches`).
    """

    def __init__(self, signals, y, *, size: int, crops: int, batch_size: int, views: int = 1, seed: int = 0):
        super().__init__(len(signals) * crops, batch_size=batch_size, shuffle=True, seed=seed)
        self.signals = [s if len(s) >= size else np.pad(s, (0, size - len(s))) for s in signals]
        self.y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self.size, self.crops, self.views = size, crops, views

    def _crop(self, i: int) -> np.ndarray:
        s = self.signals[i]
        start = int(torch.randint(0, len(s) - self.size + 1, (1,), generator=self.generator))
        return s[start:start + self.size]

    def take(self, idx):
        idx = (np.asarray(idx) // self.crops).tolist()
        views = [torch.from_numpy(np.stack([self._crop(i) for i in idx])) for _ in range(self.views)]
        return (*views, self.y[idx])


class WindowBatches:
    """Every window of some recordings, in order, with the recording each came from (``owner``)."""

    def __init__(self, data: HeartSoundData, idx, *, batch_size: int = 256):
        self.X, self.owner = data.windows(idx)
        self.y = torch.as_tensor(data.y[np.asarray(idx, dtype=np.int64)][self.owner], dtype=torch.long)
        self.idx, self.batch_size = np.asarray(idx), batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self):
        for k in range(0, len(self.X), self.batch_size):
            yield torch.from_numpy(self.X[k:k + self.batch_size]), self.y[k:k + self.batch_size]


# --------------------------------------------------------------------------- models


def _block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False),
                         nn.BatchNorm1d(cout), nn.ReLU())


class ConvEncoder(nn.Module):
    """Waveform (batch x samples) -> embedding: pool to ~1 kHz, four strided conv blocks, mean+max over time."""

    def __init__(self, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), kernels=(9, 7, 7, 5)):
        super().__init__()
        pool = max(1, sample_rate // 1000)
        self.stem = nn.AvgPool1d(pool) if pool > 1 else nn.Identity()
        layers, cin = [], 1
        for width, kernel in zip(widths, kernels):
            layers.append(_block(cin, width, kernel))
            cin = width
        self.blocks = nn.Sequential(*layers)
        self.out_features = 2 * cin

    def forward(self, x):
        h = self.blocks(self.stem(x.unsqueeze(1)))
        return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)


class HeartSoundClassifier(nn.Module):
    """``encoder`` (pretrainable) + ``head`` (dropout and a linear layer)."""

    head_prefixes = ("head",)

    def __init__(self, n_classes: int, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), dropout: float = 0.1):
        super().__init__()
        self.encoder = ConvEncoder(sample_rate=sample_rate, widths=widths)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_features, n_classes))

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class ContrastiveModel(nn.Module):
    """Encoder + projection head trained with NT-Xent on two augmented views of each recording."""

    def __init__(self, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), temperature: float = 0.2):
        super().__init__()
        self.encoder = ConvEncoder(sample_rate=sample_rate, widths=widths)
        width = self.encoder.out_features
        self.projector = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))
        self.sample_rate, self.temperature = sample_rate, temperature

    def loss(self, batch):
        v1, v2 = batch[0], batch[1]
        v1 = audio.augment_views(v1, rate=self.sample_rate)
        v2 = audio.augment_views(v2, rate=self.sample_rate)
        return audio.nt_xent(self.projector(self.encoder(v1)), self.projector(self.encoder(v2)),
                             temperature=self.temperature)


def build_model(data: HeartSoundData, **overrides) -> HeartSoundClassifier:
    cfg = {**DEFAULTS, **overrides}
    return HeartSoundClassifier(len(data.classes), sample_rate=data.sample_rate, widths=tuple(cfg["widths"]),
                                dropout=cfg["dropout"])


# --------------------------------------------------------------------------- logging


def open_log(run) -> Path:
    """Write this module's log (what loading did, every epoch) to ``train.log`` in the run folder.

    Under torchrun only rank 0 writes it (as every file of the run folder): other ranks log nowhere.
    """
    path = Path(run.path) / "train.log"
    for handler in [h for h in log.handlers if getattr(h, "_workbench_run_log", False)]:
        log.removeHandler(handler)
        handler.close()
    if not getattr(run, "writes", True):
        return path
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler._workbench_run_log = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("run %s: %s", run.path, {k: v for k, v in run.params.items() if k != "versions"})
    return path


class EpochLog(Callback):
    """One line per epoch in the module's log (``train.log``): losses, metrics and every group's LR."""

    def __init__(self, label: str):
        self.label = label

    def on_epoch_end(self, trainer, logs: dict) -> None:
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
        log.info("%s %s", self.label, text)


# --------------------------------------------------------------------------- steps


def pretrain(data: HeartSoundData, *, seed: int = 0, progress: bool = True, cache_root=None, run=None,
             device="auto", dtype=None, **overrides) -> Path:
    """NT-Xent pretraining on the training patients' recordings (no labels); returns the checkpoint.

    Cached under ``<cache root>/pretrain/<fingerprint>/`` (see :mod:`workbench.cache`): the
    fingerprint covers the data's content, the training recordings, the window length, ``seed``,
    every setting in :data:`PRETRAIN_SETTINGS` and this module's source.
    """
    cfg = {**DEFAULTS, **overrides}
    settings = {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in PRETRAIN_SETTINGS}
    settings.update(seed=seed, objective="nt_xent", window=data.window, sample_rate=data.sample_rate,
                    **placement_key(device, dtype))
    key = fingerprint(data.content_hash, data.train_idx, settings, code_version(__name__))

    def build(folder: Path) -> None:
        from ..tracking import Run
        from ..training import fit

        torch.manual_seed(seed)
        model = ContrastiveModel(sample_rate=data.sample_rate, widths=tuple(cfg["widths"]), temperature=cfg["temperature"])
        inner = Run(folder / "run", params=settings, resume=True)
        signals = [data.recordings[i].signal for i in data.train_idx]
        batches = CropBatches(signals, np.zeros(len(signals)), size=data.window, crops=cfg["pretrain_crops"],
                              batch_size=cfg["pretrain_batch_size"], views=2, seed=seed)
        log.info("pretraining (NT-Xent) on %d recordings, %d epochs", len(signals), cfg["pretrain_epochs"])
        fit(model, batches, epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"], weight_decay=cfg["weight_decay"],
            schedule="cosine", warmup_ratio=0.05, run=inner, resume=True, progress=progress, log_every=100, seed=seed,
            callbacks=[EpochLog("pretrain")], device=device, dtype=dtype)
        meta = {"task": "heart_sound", "objective": "nt_xent", "fingerprint": key, "recordings": len(signals), **settings}
        save_weights(model, folder / "pretrained.safetensors", metadata=meta)

    describe = {"data": data.source, "data_hash": data.content_hash, "train_recordings": len(data.train_idx), **settings}
    folder = cached("pretrain", key, build, root=cache_root, describe=describe)
    return folder / "pretrained.safetensors"


def pretrained(data: HeartSoundData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    return resolve_pretrained(pretrained_checkpoint,
                              lambda: pretrain(data, seed=seed, progress=progress, cache_root=cache_root, **overrides))


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


def watch_gradients(run, model, *, log_freq: int = 50) -> bool:
    """Log gradient histograms of ``model`` to the run's wandb run (``watch`` parameter); False without wandb."""
    tracker = getattr(run, "_wandb", None)
    if tracker is None:
        log.info("watch=True but no wandb run is open (tracker='none' or wandb missing): no gradient histograms")
        return False
    tracker.watch(model, log="gradients", log_freq=log_freq)
    return True


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
    from ..training import PerSample, fit

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

    log.info("fine-tuning (%s) on %d recordings of %d patients", mode, len(labelled), len(set(data.patients[labelled])))
    return fit(
        model, batches, epochs=epochs, lr=learning_rate, weight_decay=DEFAULTS["weight_decay"],
        schedule=lr_scheduler_type, warmup_ratio=warmup_ratio, strategy=strategy,
        backbone_lr_ratio=1.0 if mode == "linear_eval" else backbone_lr_ratio, val_data=val,
        evaluate=evaluate if has_val else None, monitor="val_auroc" if has_val else "train_loss",
        mode="max" if has_val else "min", restore_best=True, save_every=save_every, run=run,
        callbacks=[*callbacks, EpochLog("finetune")], progress=progress, seed=seed, log_every=100,
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
    """Logistic regression on band-power features of the labelled recordings; ``val_`` and ``test_`` metrics and ``test_proba``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(idx):
        return band_power_features([data.recordings[i].signal for i in idx], data.sample_rate)

    y = data.y
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(features(data.labelled_idx), y[data.labelled_idx])
    out = {}
    for split, idx in (("val", data.val_idx), ("test", data.test_idx)):
        if len(idx):
            proba = np.zeros((len(idx), len(data.classes)))
            proba[:, clf.classes_] = clf.predict_proba(features(idx))
            out.update(split_metrics(y[idx], proba, data.classes, prefix=f"{split}_"))
            out[f"{split}_proba"] = proba
    return out


@dataclass
class Evaluation:
    """Metrics per split for the fine-tuned model beside the baseline; test confusion matrix and ROC/PR curves."""

    table: MetricsTable
    confusion: object
    curves: object
    final: dict

    def _repr_html_(self) -> str:
        return self.table._repr_html_()

    def __repr__(self) -> str:
        return repr(self.table)


def evaluate(model, data: HeartSoundData, *, run=None, seed: int = 0) -> Evaluation:
    """Recording-level metrics on train (labelled) / val / test, the baseline's on val / test; final_metrics.json."""
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
    final.update(n_train=len(data.labelled_idx), baseline_n_train=len(data.labelled_idx))  # recordings each fit on
    truth = np.array(data.classes)[data.y[data.test_idx]]
    pred = np.array(data.classes)[test_proba.argmax(1)]
    curves = roc_pr_curves(truth, test_proba, labels=data.classes)
    log.info("test: %s", {k: round(v, 4) for k, v in final.items() if k.startswith(("test_", "baseline_test_"))})
    if run is not None:
        final = run.finish(final)
    return Evaluation(table=MetricsTable(rows), confusion=confusion_matrix(truth, pred, labels=data.classes),
                      curves=curves, final=final)


def examples(data: HeartSoundData, *, seconds: float = 4.0) -> list[dict]:
    """The first test recording of each class (up to ``seconds``): signal, rate, segmentation, title."""
    out = []
    for cls in data.classes:
        hits = [i for i in data.test_idx if data.recordings[i].label == cls] or \
               [i for i in range(len(data.recordings)) if data.recordings[i].label == cls]
        if hits:
            r = data.recordings[hits[0]]
            n = int(seconds * data.sample_rate)
            out.append({"title": f"{cls}: {r.name}", "signal": r.signal[:n], "sample_rate": data.sample_rate,
                        "segmentation": r.segmentation})
    return out



# --------------------------------------------------------------------------- prediction on new recordings


def save_predictor(run, model, data: HeartSoundData, *, test_proba: np.ndarray | None = None):
    """Write what predicting on new recordings needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the task and its classes, the sample rate every recording is resampled to, the
    window length and overlap, and the architecture. ``test_proba`` (per test recording) goes to
    ``test_predictions.csv``, indexed by the recordings' file names.
    """
    if run is None:
        return None
    from ..transfer import unwrap

    inner = unwrap(model)
    widths = [m[0].out_channels for m in inner.encoder.blocks] if hasattr(inner.encoder, "blocks") else None
    state = {"task": data.task, "classes": data.classes, "sample_rate": data.sample_rate,
             "segment_seconds": data.segment_seconds, "overlap": data.overlap,
             "widths": widths or list(DEFAULTS["widths"]), "dropout": float(inner.head[0].p), "source": data.source}
    test = None
    if test_proba is not None:
        names = [data.recordings[i].name or data.recordings[i].patient for i in data.test_idx]
        test = _predictions(np.asarray(test_proba), names, data.classes,
                            AlignmentReport(what="recordings", n_samples=len(names)))
    return _save_predictor(run, model, task=__name__, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, names, classes, report) -> Predictions:
    return class_predictions(proba, names, classes, report, index_name="recording", task=__name__)


class HeartSoundPredictor(Predictor):
    """A heart-sound run's classifier with its sample rate and windows: classifies new recordings.

    Give a folder (every ``.wav`` under it, in any layout; labels are not needed) or one wav
    file. Each recording is read, mixed down to mono, resampled to the run's sample rate (the
    report says how many, from which rate), band-passed and scaled as in training, cut into the
    run's windows; its probabilities are the mean of its windows'. Recordings shorter than
    :data:`MIN_SECONDS` are skipped and counted.
    """

    accepts = ("recordings",)
    outputs = ("probabilities", "embedding")

    def __init__(self, path, record):
        super().__init__(path, record)
        s = self.state
        self.classes, self.sample_rate = list(s["classes"]), int(s["sample_rate"])
        self.window = int(round(s["segment_seconds"] * self.sample_rate))
        self.hop = max(1, int(round(self.window * (1 - s["overlap"]))))
        self.model = self.load_weights(HeartSoundClassifier(len(self.classes), sample_rate=self.sample_rate,
                                                            widths=tuple(s["widths"]), dropout=s["dropout"]))

    def predict(self, data, *, output: str = "probabilities", batch_size: int = 256) -> Predictions:
        """Per-recording class probabilities and label (or the mean window embedding, ``output="embedding"``)."""
        self.check_output(output)
        self.check_input(data)
        root = Path(data)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        reader = _Reader(self.sample_rate)
        names, signals = [], []
        for path in files:
            signal = reader(path)
            if signal is not None:
                names.append(path.name if root.is_file() else str(path.relative_to(root)))
                signals.append(signal)
        report = AlignmentReport(what="recordings", n_samples=len(names), notes=reader.notes())
        if not signals:
            raise PredictError(f"{root}: no recording could be read (all {len(files)} shorter than {MIN_SECONDS:g} s); "
                               "give recordings of at least that length.")
        windows = [audio.frame(s, size=self.window, hop=self.hop) for s in signals]
        owner = np.concatenate([np.full(len(w), k) for k, w in enumerate(windows)])
        X = to_model(torch.from_numpy(np.concatenate(windows)), self.model)
        counts = np.bincount(owner, minlength=len(signals))[:, None]
        with torch.no_grad():
            if output == "embedding":
                parts = [self.model.encoder(X[k:k + batch_size]) for k in range(0, len(X), batch_size)]
            else:
                parts = [F.softmax(self.model(X[k:k + batch_size]), dim=1) for k in range(0, len(X), batch_size)]
        values = to_numpy(torch.cat(parts))
        out = np.zeros((len(signals), values.shape[1]))
        np.add.at(out, owner, values)
        out = out / counts
        if output == "embedding":
            import pandas as pd

            frame = pd.DataFrame(out, index=pd.Index(names, name="recording"),
                                 columns=[f"dim_{i}" for i in range(out.shape[1])])
            return Predictions(frame, report=report, output="embedding", embedding=out, task=__name__)
        return _predictions(out, names, self.classes, report)
