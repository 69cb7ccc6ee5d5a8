"""Heart-sound data: recordings read from the real layouts (or simulated), split by patient, cut into windows.

Real layouts (:func:`read_folder`): CirCor DigiScope 2022 (``training_data.csv`` with ``Patient ID``,
``Recording locations:``, ``Murmur``, ``Outcome``; ``{patient}_{location}.wav`` with an optional ``.tsv``
segmentation of rows ``start end state``, state 0-4 = unannotated, S1, systole, S2, diastole); PhysioNet/CinC 2016
(folders holding ``REFERENCE.csv`` rows ``record,-1|1`` and ``record.wav``, 2000 Hz); PASCAL (one folder per class
of wav files). Each wav is read with scipy, mixed down to mono, resampled to ``sample_rate`` with
``scipy.signal.resample_poly``, band-passed to 25-400 Hz and scaled to unit standard deviation (:func:`preprocess`).
Recordings shorter than :data:`MIN_SECONDS` are skipped and counted. Windows of ``segment_seconds`` overlap by
``overlap``; a recording's probabilities are the mean of its windows'. Splits are by patient (stratified by the
patient's label): no patient is in two (:func:`load`).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ... import audio, splits
from ...batches import IndexBatches
from ...cache import content_hash, fingerprint
from ...params import Spec
from ...workflow import SHARED
from .settings import DEFAULTS, MIN_SECONDS, PASCAL_ALIASES, TASKS, check_task
from .synthetic import simulate

__all__ = ["Recording", "HeartSoundData", "preprocess", "read_folder", "load", "CropBatches", "WindowBatches",
           "examples"]

log = logging.getLogger(__name__)


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
    layout = TASKS[check_task(task)].layout
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
    check_task(task)
    overlap = DEFAULTS["overlap"] if overlap is None else overlap
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r} must be in [0, 1).")
    Spec(label_fraction=SHARED["label_fraction"].accepts).check({"label_fraction": label_fraction},
                                                                where="heart_sound.load")  # the parameter's own check
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
