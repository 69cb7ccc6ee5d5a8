"""Prediction on new clients from a run folder: what a run saves (:func:`save_predictor`) and what reads it back
(:class:`EventSequencePredictor`, named by the workflow's declaration)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...predict import (
    MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names, class_predictions,
)
from ...predict import save_predictor as _save_predictor
from .data import CLIENT, TARGET, TIME, TIME_GAP, UNKNOWN, EventData, _days, _encode_categories, read_table
from .model import DEFAULTS, build_model, embedding_sizes, get_embeddings, predict_proba

__all__ = ["ARCHITECTURE", "EventSequencePredictor", "save_predictor"]

#: Notebook parameters that shape the model (read from the run's parameters when the predictor is saved).
ARCHITECTURE = ("encoder_type", "hidden_size", "head_hidden", "head_dropout", "head_activation")
#: The task recorded in predictor.json: the package, whose ``WORKFLOW`` names :class:`EventSequencePredictor`.
TASK = __package__


def save_predictor(run, model, data: EventData, *, test_proba: np.ndarray | None = None):
    """Write what predicting on new clients needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the fields, each categorical field's vocabulary (0 pads, 1 is unknown), the
    numeric fields, ``max_seq_len``, the class names and the architecture (the run's parameters).
    ``test_proba`` goes to ``test_predictions.csv``, indexed by client id.
    """
    if run is None:
        return None
    from . import WORKFLOW

    params = getattr(run, "params", {}) or {}
    architecture = {k: params.get(k, WORKFLOW.parameters[k].default) for k in ARCHITECTURE}
    state = {"classes": list(data.classes), "categorical": list(data.categorical), "numeric": list(data.numeric),
             "vocab": data.vocab, "max_seq_len": int(data.max_seq_len), "source": data.source,
             "embedding_dim": DEFAULTS["embedding_dim"], "transformer_heads": DEFAULTS["transformer_heads"],
             "transformer_layers": DEFAULTS["transformer_layers"], "embedding_sizes": embedding_sizes(model),
             **architecture}
    test = None
    if test_proba is not None:
        fields = [c for c in data.fields if c != TIME_GAP]
        report = AlignmentReport(what="fields", n_model=len(fields), n_data=len(fields), matched=len(fields),
                                 n_samples=len(data.test_idx))
        test = _predictions(np.asarray(test_proba), data.client_ids[data.test_idx], data.classes, report)
    return _save_predictor(run, model, task=TASK, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, clients, classes, report) -> Predictions:
    return class_predictions(proba, np.asarray(clients).astype(str), classes, report, index_name=CLIENT,
                             task=TASK)


@dataclass
class _Clients:
    """New clients in the form the batches read (no labels)."""

    sequences: list[dict]
    client_ids: np.ndarray
    classes: list[str]
    y: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)

    def __post_init__(self):
        self.y = np.zeros(len(self.sequences), dtype=np.int64)
        self.labels = np.full(len(self.sequences), "", dtype=object)


class EventSequencePredictor(Predictor):
    """An event-sequence run's classifier with its vocabularies: classifies new clients from an event table.

    The table (.csv / .parquet, one row per event) needs ``client_id`` and ``event_time``; the
    run's fields are matched by name (a missing categorical field is all "unknown", a missing
    numeric one is 0; refused above ``max_missing`` of them). Events are put in time order,
    ``time_gap`` is derived and each client keeps its last ``max_seq_len`` events, as in
    training; a category never seen in training maps to the unknown index, counted per field.
    """

    accepts = ("table",)
    outputs = ("probabilities", "embedding")

    def setup(self, s: dict) -> None:
        self.classes = list(s["classes"])
        shape = _Shape(vocab=s["vocab"], categorical=list(s["categorical"]), numeric=list(s["numeric"]),
                       max_seq_len=int(s["max_seq_len"]), classes=self.classes)
        model = build_model(shape, encoder_type=s["encoder_type"], hidden_size=s["hidden_size"],
                            head_hidden=s["head_hidden"], head_dropout=s["head_dropout"],
                            head_activation=s["head_activation"], embedding_dim=s["embedding_dim"],
                            transformer_heads=s["transformer_heads"], transformer_layers=s["transformer_layers"],
                            embedding_sizes=s.get("embedding_sizes"))  # runs saved before widths were saved: None
        self.model = self.load_weights(model)

    def _clients(self, events: pd.DataFrame, where: str, max_missing: float) -> tuple[_Clients, AlignmentReport]:
        s = self.state
        for column in (CLIENT, TIME):
            if column not in events:
                raise PredictError(f"{where} has no {column!r} column; an event table needs {CLIENT}, {TIME} and the "
                                   f"run's fields ({', '.join(s['categorical'] + s['numeric'][:-1])}).")
        given = [c for c in s["numeric"] if c != TIME_GAP]
        columns = [c for c in events.columns if c not in (CLIENT, TIME, TARGET)]
        _, report = align_names(columns, s["categorical"] + given, what="fields", max_missing=max_missing,
                                where=where)
        events = events.copy()
        events[CLIENT] = events[CLIENT].astype(str)
        events[TIME] = _days(events[TIME])
        if events[TIME].isna().any():
            row = int(np.flatnonzero(events[TIME].isna().to_numpy())[0])
            raise PredictError(f"{where}: {TIME} of row {row} is empty or not a number/date. Every event needs a time.")
        events = events.sort_values([CLIENT, TIME], kind="stable", ignore_index=True)
        gap = events.groupby(CLIENT, sort=False)[TIME].diff().fillna(0.0).clip(lower=0)
        events[TIME_GAP] = np.log1p(gap.to_numpy()).astype(np.float32)
        for column in given:
            if column not in events:
                events[column] = 0.0
                continue
            values = pd.to_numeric(events[column], errors="coerce")
            if values.isna().any():
                raise PredictError(f"{where}: numeric field {column!r} has {int(values.isna().sum())} empty or "
                                   "non-numeric value(s). Fill or drop them before predicting.")
            events[column] = values.astype(np.float32)
        for column in s["categorical"]:
            if column not in events:
                events[column] = UNKNOWN
                continue
            text = events[column].astype(str).where(events[column].notna(), "<missing>")
            codes = _encode_categories(text, s["vocab"][column])
            unknown = int((codes == UNKNOWN).sum())
            if unknown:
                report.unknown[f"{column} (events)"] = unknown
            events[column] = codes
        starts = events.groupby(CLIENT, sort=True).indices
        clients = np.array(sorted(starts), dtype=object)
        data = {c: events[c].to_numpy() for c in [TIME, *s["categorical"], *s["numeric"]]}
        sequences, truncated = [], 0
        for client in clients:
            rows = starts[client][-s["max_seq_len"]:]
            truncated += len(starts[client]) > s["max_seq_len"]
            seq = {TIME: data[TIME][rows].astype(np.float64)}
            seq |= {c: data[c][rows].astype(np.int64) for c in s["categorical"]}
            seq |= {c: data[c][rows].astype(np.float32) for c in s["numeric"]}
            sequences.append(seq)
        if truncated:
            report.notes.append(f"{truncated} client(s) truncated to their last {s['max_seq_len']} events")
        report.n_samples = len(clients)
        return _Clients(sequences, clients, self.classes), report

    def predict(self, data, *, output: str = "probabilities", max_missing: float = MAX_MISSING) -> Predictions:
        """Per-client class probabilities and label, or encoder embeddings (``output="embedding"``).

        ``data``: a DataFrame of events, or the path of a .csv / .parquet event table.
        """
        self.check_output(output)
        self.check_input(data)
        if isinstance(data, (str, os.PathLike)):
            events, where = read_table(data), Path(data).name
        elif isinstance(data, pd.DataFrame):
            events, where = data, "the event table"
        else:
            raise PredictError(f"cannot predict on a {type(data).__name__}: give a DataFrame of events or the path "
                               "of a .csv / .parquet event table.")
        clients, report = self._clients(events, where, max_missing)
        idx = np.arange(len(clients.sequences))
        if output == "embedding":
            embeddings, ids, _ = get_embeddings(self.model, clients, idx)
            frame = pd.DataFrame(embeddings, index=pd.Index(ids.astype(str), name=CLIENT),
                                 columns=[f"dim_{i}" for i in range(embeddings.shape[1])])
            return Predictions(frame, report=report, output="embedding", embedding=embeddings, task=TASK)
        return _predictions(predict_proba(self.model, clients, idx), clients.client_ids, self.classes, report)


@dataclass
class _Shape:
    """What :func:`build_model` reads from an :class:`EventData`, for a model rebuilt from a run folder."""

    vocab: dict
    categorical: list
    numeric: list
    max_seq_len: int
    classes: list
