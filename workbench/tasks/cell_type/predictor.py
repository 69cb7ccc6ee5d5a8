"""Predicting from a cell-type run folder: what a run keeps (:func:`save_predictor`) and what reads it back
(:class:`CellTypePredictor`, found by ``workbench predict`` / :func:`workbench.load_run` through the declaration)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...devices import to_model, to_numpy
from ...predict import (
    MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names, class_predictions,
)
from ...predict import save_predictor as _save_predictor
from ...streaming import StreamingBatches, read_rows, scan
from .data import COUNTS_PROBE_ROWS, CellData, expression_matrix, normalise_counts, read_adata
from .model import CellTypeClassifier

__all__ = ["CellTypePredictor", "save_predictor"]

#: The module ``predictor.json`` names (the package, whose ``WORKFLOW`` names :class:`CellTypePredictor`).
TASK = __package__


def _model_settings(model: CellTypeClassifier) -> dict:
    """The architecture of a classifier, read from its layers (so overrides of build_model are kept)."""
    from ...transfer import unwrap

    model = unwrap(model)
    layers = list(model.encoder.layers)
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    drops = [m.p for m in layers if isinstance(m, nn.Dropout)]
    input_dropout = drops.pop(0) if layers and isinstance(layers[0], nn.Dropout) else 0.0
    return {"hidden": [m.out_features for m in linear], "dropout": drops[0] if drops else 0.0,
            "input_dropout": input_dropout}


def save_predictor(run, model, data: CellData, *, test_proba: np.ndarray | None = None):
    """Write what predicting on new cells needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the genes in the model's order, the class names, which matrix the expression came
    from (``adata.raw.X`` or ``adata.X``) and the architecture. With ``test_proba`` (the test
    cells' probabilities) they are written to ``test_predictions.csv`` as ``workbench predict`` writes them.
    """
    if run is None:
        return None
    state = {"genes": list(data.genes), "classes": list(data.classes), "features": data.features,
             "label_key": data.label_key, "source": data.source, **_model_settings(model)}
    test = None
    if test_proba is not None and data.obs_names is not None:
        report = AlignmentReport(what="genes", n_model=data.n_genes, n_data=data.n_genes, matched=data.n_genes,
                                 n_samples=len(data.test_idx))
        test = _predictions(np.asarray(test_proba), data.obs_names[data.test_idx], data.classes, report)
    return _save_predictor(run, model, task=TASK, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, names, classes, report, *, source=None) -> Predictions:
    return class_predictions(proba, np.asarray(names).astype(str), classes, report, index_name="cell", source=source,
                             task=TASK)


class CellTypePredictor(Predictor):
    """A cell-type run's model, its genes and classes: annotates new cells (AnnData or an .h5ad path).

    Genes are matched by name and put in the model's order; genes the model knows and the data
    lacks are filled with 0 (refused above ``max_missing`` of them), genes the model does not know
    are ignored; :class:`workbench.predict.AlignmentReport` counts each. Cells are streamed
    through :class:`workbench.streaming.StreamingBatches` (a backed .h5ad never has X in memory).
    """

    accepts = ("anndata",)
    outputs = ("probabilities", "embedding")

    def setup(self, s: dict) -> None:
        self.genes, self.classes = list(s["genes"]), list(s["classes"])
        self.model = self.load_weights(CellTypeClassifier(
            len(self.genes), len(self.classes), hidden=tuple(s["hidden"]), dropout=s["dropout"],
            input_dropout=s["input_dropout"]))

    def _matrix(self, adata, where_from: str):
        """The expression matrix the model reads, as :func:`load` prepares it (integer counts log-normalised)."""
        trained_on = self.state.get("features", "adata.X")
        has_raw = adata.raw is not None
        use = "raw" if (trained_on.startswith("adata.raw") and has_raw) else "X"
        matrix, genes, where = expression_matrix(adata, use)
        # integer counts are normalised as in training; a backed file is judged by its first rows (one pass less)
        rows = read_rows(matrix, np.arange(min(matrix.shape[0], COUNTS_PROBE_ROWS))) if adata.isbacked else matrix
        found = scan(rows)
        if found.n_nonfinite:
            raise PredictError(f"{where} of {where_from} holds NaN/inf values; expression must be finite (fill them, "
                               "e.g. np.nan_to_num, or drop those cells).")
        if found.integer_counts:
            import warnings

            with warnings.catch_warnings():  # said in the report instead
                warnings.simplefilter("ignore", UserWarning)
                matrix, where = normalise_counts(matrix, where, found, source=where_from, backed=adata.isbacked)
        same = where.split(" ")[0] == trained_on.split(" ")[0]
        note = f"expression read from {where}" + (", as in training" if same else (
            f"; the model was trained on {trained_on.split(' ')[0]}, which this input lacks: it must hold the same "
            "kind of values (log-normalised)"))
        return matrix, genes, note

    def predict(self, data, *, output: str = "probabilities", batch_size: int = 1024, backed: str | bool = "auto",
                max_missing: float = MAX_MISSING) -> Predictions:
        """Class probabilities and labels (``output="probabilities"``) or encoder embeddings (``"embedding"``).

        Parameters
        ----------
        data
            An AnnData, or the path of an ``.h5ad`` file (read backed above 1 GiB, see ``backed``).
        output
            ``"probabilities"`` or ``"embedding"``.
        batch_size
            Cells per forward pass.
        backed
            For a path: ``"true"`` streams X from the file, ``"false"`` reads it, ``"auto"`` streams above 1 GiB.
        max_missing
            Share of the model's genes that may be missing from the data (filled with 0).
        """
        self.check_output(output)
        self.check_input(data)
        if isinstance(data, (str, os.PathLike)):
            adata, where = read_adata(str(data), backed=backed)[0], Path(data).name
        elif hasattr(data, "obs") and hasattr(data, "var_names"):
            adata, where = data, "the AnnData"
        else:
            raise PredictError(f"cannot predict on a {type(data).__name__}: give an AnnData or the path of an "
                               ".h5ad file.")
        matrix, genes, note = self._matrix(adata, where)
        positions, report = align_names(genes, self.genes, what="genes", max_missing=max_missing, where=where)
        report.notes.append(note)
        report.n_samples = int(matrix.shape[0])
        take = None
        if not (len(genes) == len(self.genes) and np.array_equal(positions, np.arange(len(genes)))):
            present = np.flatnonzero(positions >= 0)
            take = (torch.from_numpy(present), torch.from_numpy(positions[present]))
        parts = []
        with torch.no_grad():
            for (x,) in StreamingBatches(matrix, batch_size=batch_size):
                if take is not None:
                    aligned = x.new_zeros((x.shape[0], len(self.genes)))
                    aligned[:, take[0]] = x[:, take[1]]
                    x = aligned
                x = to_model(x, self.model)
                if output == "embedding":
                    parts.append(self.model.encoder(x))
                else:
                    parts.append(F.softmax(self.model(x), dim=1))
        width = self.model.encoder.out_features if output == "embedding" else len(self.classes)
        values = to_numpy(torch.cat(parts)) if parts else np.zeros((0, width), dtype=np.float32)
        names = np.asarray(adata.obs_names.astype(str))
        if output == "embedding":
            import pandas as pd

            frame = pd.DataFrame(values, index=pd.Index(names, name="cell"),
                                 columns=[f"dim_{i}" for i in range(values.shape[1])])
            return Predictions(frame, report=report, output="embedding", embedding=values, source=adata,
                               task=TASK)
        return _predictions(values, names, self.classes, report, source=adata)
