"""Prediction on new recordings from a heart-sound run folder (see :mod:`workbench.predict`).

:func:`save_predictor` writes what predicting needs (task, classes, sample rate, windows, architecture) into the run
folder; :class:`HeartSoundPredictor` reads it back and classifies any folder of wav files, or one file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ... import audio
from ...devices import to_model, to_numpy
from ...predict import AUDIO_SUFFIXES, AlignmentReport, Predictions, PredictError, Predictor, class_predictions
from ...predict import save_predictor as _save_predictor
from .data import HeartSoundData, _Reader
from .model import HeartSoundClassifier
from .settings import DEFAULTS, MIN_SECONDS

__all__ = ["save_predictor", "HeartSoundPredictor"]

#: The name a run's predictor.json records (:func:`workbench.predict.load_run` imports it to find the predictor):
#: the package, where ``WORKFLOW`` is declared, as before it was split into modules.
TASK = __package__


def save_predictor(run, model, data: HeartSoundData, *, test_proba: np.ndarray | None = None):
    """Write what predicting on new recordings needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the task and its classes, the sample rate every recording is resampled to, the
    window length and overlap, and the architecture. ``test_proba`` (per test recording) goes to
    ``test_predictions.csv``, indexed by the recordings' file names.
    """
    if run is None:
        return None
    from ...transfer import unwrap

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
    return _save_predictor(run, model, task=TASK, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, names, classes, report) -> Predictions:
    return class_predictions(proba, names, classes, report, index_name="recording", task=TASK)


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

    def setup(self, s: dict) -> None:
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
            return Predictions(frame, report=report, output="embedding", embedding=out, task=TASK)
        return _predictions(out, names, self.classes, report)
