"""Predicting from a run folder (:class:`RegulatoryPredictor`) and what a run writes for it (:func:`save_predictor`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...checkpoints import read_state_dict
from ...devices import to_model, to_numpy
from ...predict import MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names
from ...predict import save_predictor as _save_predictor
from ...transfer import unwrap
from .data import RegulatoryData
from .formats import CATEGORICAL, NUMERIC, TARGET, read_zarr
from .model import RegulatoryModel

__all__ = ["save_predictor", "RegulatoryPredictor"]

#: The package whose ``WORKFLOW`` names this predictor: what ``predictor.json`` records as the task.
TASK = __package__
#: Where a LoRA run keeps the base weights its adapters adapt (written once, by ``prepare``, before training).
BASE_WEIGHTS = "checkpoints/base.safetensors"

#: Columns of a table that name or score a sample rather than describe it: not counted as extra fields.
ID_COLUMNS = ("gene", "condition", "set", TARGET)


def _model_settings(model) -> dict:
    """The architecture of a (possibly peft-wrapped) :class:`RegulatoryModel`, read from its layers."""
    inner = unwrap(model)
    block = inner.encoder[0]
    width = inner.position.shape[1]
    return {"width": int(width), "layers": len(inner.encoder), "heads": int(block.heads),
            "ff_mult": int(block.ff1.out_features // width),
            "condition_dim": int((inner.condition_token.in_features - len(NUMERIC)) // len(CATEGORICAL)),
            "fusion_hidden": int(inner.head[0].out_features), "dropout": float(block.dropout)}


def save_predictor(run, model, data: RegulatoryData, *, test_predictions: np.ndarray | None = None):
    """Write what predicting on new samples needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the layout (regions, motifs), the vocabularies (index 0 is unknown) and the
    architecture; the numeric statistics are buffers of the weights. A LoRA model is kept as
    its adapters (``adapters/``, see :func:`workbench.lora.save_adapters`) and the base weights
    they were trained on, never only in the cache: those ``prepare`` kept for the checkpoints
    (``checkpoints/base.safetensors``, stored once), or beside the adapters when the run has none. A fully
    fine-tuned model as its weights. ``test_predictions`` (of ``data.test_idx``) go to ``test_predictions.csv``.
    """
    if run is None:
        return None
    is_lora = hasattr(model, "peft_config")
    weights, base = None, None
    if is_lora and getattr(run, "writes", True):
        from ...lora import save_adapters

        base = BASE_WEIGHTS if (run.path / BASE_WEIGHTS).is_file() else None
        save_adapters(model, run.path / "adapters", base=base is None)
        weights = "adapters"
    state = {"n_regions": data.n_regions, "n_motifs": data.n_channels - 1, "vocab": data.vocab,
             "categorical": list(CATEGORICAL), "numeric": list(NUMERIC), "finetune": "lora" if is_lora else "full",
             "source": data.source, **_model_settings(model), **({"base": base} if base else {})}
    test = None
    if test_predictions is not None:
        report = AlignmentReport(what="fields", n_model=len(_fields(data.n_regions, data.n_channels - 1)),
                                 n_samples=len(data.test_idx))
        report.n_data = report.matched = report.n_model
        test = _predictions(np.asarray(test_predictions), data.conditions.iloc[data.test_idx], data.test_idx, report,
                            genes=None)
    return _save_predictor(run, model, task=TASK, state=state, test_predictions=test, weights=weights)


def _fields(n_regions: int, n_motifs: int) -> list[str]:
    return [*CATEGORICAL, *NUMERIC, *(f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)),
            *(f"r{r}_access" for r in range(n_regions))]


def _predictions(values: np.ndarray, frame: pd.DataFrame, rows, report, *, genes=None) -> Predictions:
    out = pd.DataFrame({"predicted_expression": values}, index=pd.Index(np.asarray(rows), name="row"))
    if genes is not None:
        out.insert(0, "gene", np.asarray(genes))
    return Predictions(out, report=report, output="values", task=TASK)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return read_zarr(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], sep="\t" if suffix == ".tsv" else ",",
                       dtype={c: str for c in (*CATEGORICAL, "gene", "condition", "set")})


class RegulatoryPredictor(Predictor):
    """A regulatory run's model (merged from nothing: base + adapters for LoRA), its vocabularies and layout.

    Predicts expression for a table of samples in the CSV layout of :func:`read_csv` (the target
    column is not needed), a parquet file or a GET-style zarr store. Columns are matched by name:
    a missing motif or accessibility column is filled with 0, a missing categorical one is
    "unknown", a missing numeric one takes the training mean (refused above ``max_missing`` of
    all fields); a category never seen in training gets the unknown index, counted per column.
    """

    accepts = ("table", "zarr")
    outputs = ("values",)

    def setup(self, s: dict) -> None:
        self.vocab = {k: list(v) for k, v in s["vocab"].items()}
        self.fields = _fields(s["n_regions"], s["n_motifs"])
        model = RegulatoryModel(
            s["n_regions"], s["n_motifs"] + 1, {c: len(v) for c, v in self.vocab.items()}, len(NUMERIC),
            width=s["width"], layers=s["layers"], heads=s["heads"], ff_mult=s["ff_mult"],
            condition_dim=s["condition_dim"], fusion_hidden=s["fusion_hidden"], dropout=s["dropout"])
        if s.get("finetune") == "lora":
            from ...lora import load_adapters

            folder = self.path / self.record["weights"]
            base = self.path / s["base"] if s.get("base") else folder / "base.safetensors"  # older runs: beside
            if not base.is_file():
                raise PredictError(f"{base} does not exist: the adapters in {folder} cannot be applied without the "
                                   "base weights they were trained on. Run the notebook again into a new folder.")
            model.load_state_dict(read_state_dict(base))
            self.model = load_adapters(model, folder).eval()
        else:
            self.model = self.load_weights(model)

    def predict(self, data, *, output: str = "values", batch_size: int = 512,
                max_missing: float = MAX_MISSING) -> Predictions:
        """Predicted expression, one row per sample of ``data`` (a DataFrame, or a .csv/.parquet/.zarr path)."""
        self.check_output(output)
        self.check_input(data)
        if isinstance(data, (str, os.PathLike)):
            frame, where = _read_table(Path(data)), Path(data).name
        elif isinstance(data, pd.DataFrame):
            frame, where = data, "the table"
        else:
            raise PredictError(f"cannot predict on a {type(data).__name__}: give a DataFrame or the path of a "
                               ".csv, .parquet or .zarr table.")
        frame = frame.reset_index(drop=True)
        columns = [c for c in frame.columns if c not in ID_COLUMNS]
        _, report = align_names(columns, self.fields, what="fields", max_missing=max_missing, where=where)
        report.n_samples = len(frame)
        inner = unwrap(self.model)
        mean = inner.conditions.original_module.numeric_mean if hasattr(inner.conditions, "original_module") \
            else inner.conditions.numeric_mean
        filled = {}
        for i, column in enumerate(NUMERIC):
            if column not in frame:
                filled[column] = float(mean[i])
        if filled:
            report.notes.append("numeric fields missing, set to their training mean: "
                                + ", ".join(f"{k}={v:g}" for k, v in filled.items()))
        n = len(frame)
        numeric = np.empty((n, len(NUMERIC)), dtype=np.float32)
        for i, column in enumerate(NUMERIC):
            numeric[:, i] = filled[column] if column in filled else _numbers(frame, column, where)
        codes = np.zeros((n, len(CATEGORICAL)), dtype=np.int64)
        for i, column in enumerate(CATEGORICAL):
            if column not in frame:
                continue
            lookup = {value: k for k, value in enumerate(self.vocab[column])}
            values = frame[column].fillna("").astype(str).to_numpy()
            codes[:, i] = [lookup.get(v, 0) for v in values]
            unknown = int(sum(v not in lookup for v in values))
            if unknown:
                report.unknown[column] = unknown
        s = self.state
        regions = np.zeros((n, s["n_regions"], s["n_motifs"] + 1), dtype=np.float32)
        for r in range(s["n_regions"]):
            for m in range(s["n_motifs"]):
                if f"r{r}_m{m}" in frame:
                    regions[:, r, m] = _numbers(frame, f"r{r}_m{m}", where)
            if f"r{r}_access" in frame:
                regions[:, r, s["n_motifs"]] = _numbers(frame, f"r{r}_access", where)
        tensors = to_model((torch.from_numpy(regions), torch.from_numpy(codes), torch.from_numpy(numeric)), self.model)
        with torch.no_grad():
            parts = [self.model(*(t[a:a + batch_size] for t in tensors)) for a in range(0, n, batch_size)]
        values = to_numpy(torch.cat(parts)) if parts else np.zeros(0, np.float32)
        return _predictions(values, frame, np.arange(n), report,
                            genes=frame["gene"].to_numpy() if "gene" in frame else None)


def _numbers(frame: pd.DataFrame, column: str, where: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise PredictError(f"{where}: column {column!r} must be numeric, but row {row} holds "
                           f"{frame[column].iloc[row]!r} ({int(bad.sum())} such row(s)). Fix or drop those rows.")
    return values.to_numpy(np.float32)
