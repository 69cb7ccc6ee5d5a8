"""Cells and their labels: reading an AnnData, choosing its expression matrix, splitting, streaming batches.

:func:`load` reads an ``.h5ad`` (scanpy's bundled pbmc68k_reduced when no path is given), takes ``adata.raw.X`` when
present (else ``adata.X``), log-normalises integer counts with a warning, checks the labels and the values, and splits
the cells from ``obs`` alone (stratified holdout, the labelled share, the validation share), so X is never subset and
a backed file never has X in memory. :class:`CellData` holds the result and draws the batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import splits
from ...cache import fingerprint
from ...params import Real
from ...anndata_io import bundled_pbmc68k_reduced, expression
from ...anndata_io import read_adata as _read_adata
from ...streaming import StreamingBatches, read_rows, scan

__all__ = ["CellData", "ExpressionBatches", "load", "read_adata", "expression_matrix", "normalise_counts",
           "bundled_pbmc68k_reduced", "use_backed", "BACKED_AUTO_BYTES", "BACKED_CHOICES", "VAL_FRACTION"]

#: ``backed="auto"`` streams X from files larger than this; smaller ones are read into memory.
BACKED_AUTO_BYTES = 1 << 30
#: What the ``backed`` parameter accepts.
BACKED_CHOICES = ("auto", "true", "false")
#: What ``val_fraction`` accepts (the declaration's constraint and :func:`load`'s check).
VAL_FRACTION = Real(ge=0, le=0.5)
#: Integer counts are scaled to this many counts per cell before log1p (scanpy's usual target_sum).
COUNTS_TARGET_SUM = 1e4
#: Rows of a backed input read to tell integer counts from log-normalised expression.
COUNTS_PROBE_ROWS = 2048


#: The cell-type loader: mini-batches ``(x, y)`` streamed from the expression matrix, densified per batch (it has a
#: ``generator``, so :func:`workbench.fit` restores the data order on resume). See :mod:`workbench.streaming`.
ExpressionBatches = StreamingBatches


@dataclass
class CellData:
    """Features, labels and the split of one annotation task."""

    X: object  # cells x genes: scipy.sparse.csr_matrix / np.ndarray (float32) in memory, or a backed AnnData matrix
    labels: np.ndarray
    classes: list[str]
    genes: list[str]
    train_idx: np.ndarray
    test_idx: np.ndarray
    labelled_idx: np.ndarray
    val_idx: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    source: str = ""
    label_key: str = ""
    features: str = ""
    backed: bool = False
    adata: object = field(default=None, repr=False)  # the AnnData, kept open while X is read from its file
    obs_names: np.ndarray | None = field(default=None, repr=False)  # cell names (obs_names), for predictions
    y: np.ndarray = field(init=False)
    _content_hash: str | None = field(default=None, repr=False)

    def __post_init__(self):
        index = {c: i for i, c in enumerate(self.classes)}
        self.y = np.array([index[c] for c in self.labels], dtype=np.int64)

    @property
    def content_hash(self) -> str:
        """SHA-256 of the expression values and the gene names (read in chunks, once; equal backed or not)."""
        if self._content_hash is None:
            self._content_hash = fingerprint(scan(self.X).content_hash, self.genes)
        return self._content_hash

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    def batches(self, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0) -> ExpressionBatches:
        """Batches ``(x, y)`` of the cells ``idx``, streamed from X; unshuffled, they come in sorted order."""
        return ExpressionBatches(self.X, idx, labels=self.y, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def rows(self, idx):
        """Rows ``idx`` of X (in the order given) as a CSR matrix or an array; only these rows are read."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        rows = read_rows(self.X, idx[order])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return rows[back]

    def dense(self, idx) -> np.ndarray:
        rows = self.rows(idx)
        return rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)

    def to_frame(self):
        import pandas as pd

        parts = {"fit (labelled)": self.labelled_idx, "validation": self.val_idx, "train (all)": self.train_idx,
                 "test": self.test_idx}
        frame = pd.DataFrame({name: pd.Series(self.labels[idx]).value_counts() for name, idx in parts.items()})
        frame = frame.reindex(self.classes).fillna(0).astype(int)
        frame.loc["total"] = frame.sum()
        return frame.rename_axis(self.label_key or "class")

    def to_dict(self) -> dict:
        return {
            "source": self.source, "label_key": self.label_key, "features": self.features,
            "cells": int(self.X.shape[0]), "genes": self.n_genes, "classes": list(self.classes), "backed": self.backed,
            "train": len(self.train_idx), "labelled": len(self.labelled_idx), "val": len(self.val_idx),
            "test": len(self.test_idx),
        }

    def summary(self) -> str:
        kind = ("sparse" if hasattr(self.X, "toarray") or getattr(self.X, "format", None) == "csr" else "dense") + \
            (", streamed from the file" if self.backed else ", in memory")
        return (
            f"{self.source}: {self.X.shape[0]} cells x {self.n_genes} genes ({kind}, {self.features}), "
            f"{len(self.classes)} classes in obs[{self.label_key!r}]; train {len(self.train_idx)} "
            f"({len(self.labelled_idx)} labelled for fitting, {len(self.val_idx)} for validation), "
            f"test {len(self.test_idx)}"
        )

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string()

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html()


def use_backed(backed: str | bool, path: Path) -> bool:
    """Resolve the ``backed`` parameter for the file at ``path``: ``"auto"`` streams files above :data:`BACKED_AUTO_BYTES`."""
    value = {True: "true", False: "false"}.get(backed, backed) if isinstance(backed, bool) else str(backed).lower()
    if value not in BACKED_CHOICES:
        raise ValueError(f"backed={backed!r} is not one of {', '.join(BACKED_CHOICES)}: 'true' streams X from the "
                         "file, 'false' reads it into memory, 'auto' streams files above "
                         f"{BACKED_AUTO_BYTES / 2**30:g} GiB.")
    if value == "auto":
        return path.stat().st_size > BACKED_AUTO_BYTES
    return value == "true"


def read_adata(data_path: str = "", *, backed: str | bool = "false"):
    """The AnnData at ``data_path`` (scanpy's bundled pbmc68k_reduced when empty), and its name.

    :func:`workbench.anndata_io.read_adata` with the ``backed`` parameter resolved for the file (:func:`use_backed`):
    true (or ``"auto"`` and a large file) opens it with ``backed="r"``: obs and var are read, X stays in the file.
    """
    path = Path(data_path) if data_path else bundled_pbmc68k_reduced()
    return _read_adata(data_path, backed=path.exists() and use_backed(backed, path))


#: Expression ``(matrix, genes, where)``: ``adata.raw`` when present, else ``adata.X`` (backed stays on disk);
#: :func:`load` then checks it: integer counts are log-normalised there (:func:`normalise_counts`).
expression_matrix = expression


def load(
    data_path: str = "",
    label_key: str = "bulk_labels",
    *,
    test_size: float = 0.2,
    label_fraction: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    features: str = "auto",
    backed: str | bool = "auto",
) -> CellData:
    """Read cells, check the labels, split stratified, and pick the labelled training cells.

    X is never split or subset here: the splits come from ``obs`` alone, and one pass over X in
    chunks of rows checks that it is finite and computes its content hash.

    Parameters
    ----------
    data_path
        An ``.h5ad`` file; ``""`` for scanpy's bundled ``pbmc68k_reduced``.
    label_key
        The ``obs`` column with cell types.
    test_size
        Fraction of cells held out (stratified by cell type).
    label_fraction
        Fraction of the training cells whose labels fine-tuning may use (at least one per
        type); the rest stay unlabeled for pretraining.
    val_fraction
        Fraction of the labelled training cells held out for validation (model selection and
        early stopping), stratified: ``round(val_fraction * n)`` cells of each type, so a type
        with few labelled cells keeps them all for fitting. ``0`` means no validation set.
    features
        ``"raw"`` (``adata.raw.X``), ``"X"`` or ``"auto"`` (raw when present). The model expects
        log-normalised expression: a matrix of integer counts (whole numbers >= 0, some above
        1), common in ``.raw``, is normalised to 10,000 counts per cell and ``log1p``-ed, with a
        warning saying so; streamed from its file (backed), it is refused with the commands that
        normalise the file.
    backed
        ``"true"``: X stays in the file (``read_h5ad(..., backed="r")``) and batches are streamed
        from it; ``"false"``: X is read into memory; ``"auto"``: backed above
        :data:`BACKED_AUTO_BYTES`. The batches take the same code path either way.
    """
    adata, source = read_adata(data_path, backed=backed)
    if label_key not in adata.obs:
        raise KeyError(
            f"label_key={label_key!r} is not a column of adata.obs in {source}. Columns are: "
            f"{list(adata.obs.columns)}. Pass the one that holds cell types, e.g. -p label_key cell_type."
        )
    column = adata.obs[label_key]
    missing = int(column.isna().sum())
    if missing:
        raise ValueError(
            f"obs[{label_key!r}] has {missing} missing labels (NaN). Drop those cells first: "
            f"adata = adata[adata.obs[{label_key!r}].notna()].copy(), then write it to .h5ad."
        )
    labels = column.astype(str).to_numpy()
    X, genes, where = expression_matrix(adata, features)
    found = scan(X)
    if found.n_nonfinite:
        raise ValueError(
            f"{where} holds {found.n_nonfinite} NaN/inf values. Expression must be finite: fill them (e.g. "
            "np.nan_to_num) or drop the affected cells/genes before annotating."
        )
    content = fingerprint(found.content_hash, genes)
    if found.integer_counts:
        X, where = normalise_counts(X, where, found, source=source, backed=adata.isbacked)
        content = fingerprint(content, where)
    train_idx, test_idx = splits.holdout(labels, test_size=test_size, seed=seed)
    labelled = train_idx[splits.few_shot(labels[train_idx], fraction=label_fraction, seed=seed)] if label_fraction < 1 else train_idx
    problem = VAL_FRACTION.problem("val_fraction", val_fraction)
    if problem:
        raise ValueError(f"{problem} It is the share of labelled training cells held out for validation, e.g. 0.1; "
                         "0 for none.")
    val = np.array([], dtype=np.int64)
    if val_fraction > 0:
        val = labelled[splits.few_shot(labels[labelled], fraction=val_fraction, seed=seed, min_per_class=0)]
    return CellData(
        X=X, labels=labels, classes=sorted(set(labels)), genes=genes, train_idx=np.sort(train_idx),
        test_idx=np.sort(test_idx), labelled_idx=np.sort(np.setdiff1d(labelled, val)), val_idx=np.sort(val),
        source=source, label_key=label_key, features=where, backed=bool(adata.isbacked),
        adata=adata if adata.isbacked else None, _content_hash=content,
        obs_names=np.asarray(adata.obs_names.astype(str)),
    )


def normalise_counts(X, where: str, found, *, source: str, backed: bool):
    """Integer counts -> log-normalised expression (scanpy's ``normalize_total(target_sum=1e4)`` + ``log1p``).

    Each cell is scaled to :data:`COUNTS_TARGET_SUM` total counts (a cell without counts stays
    zero), then ``log1p``. Said in one warning. A matrix streamed from its file (backed) is
    refused with the commands that normalise the file once.
    """
    import warnings

    import scipy.sparse as sp

    if backed:
        attr = "adata.raw.X" if where.startswith("adata.raw") else "adata.X"
        raise ValueError(
            f"{where} of {source} holds integer counts (whole numbers up to {found.max_value:g}), not log-normalised "
            "expression, and it is streamed from the file (backed), where it is not normalised here. Normalise the "
            "file once: adata = anndata.read_h5ad(path); sc.pp.normalize_total(adata, target_sum=1e4); "
            f"sc.pp.log1p(adata); adata.write_h5ad(path) (for {attr}: normalise a copy and set it back), or pass "
            "backed='false' to normalise it in memory.")
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(COUNTS_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    if sp.issparse(X):
        X = sp.csr_matrix(sp.diags(scale) @ X, dtype=np.float32)
        X.data = np.log1p(X.data)
    else:
        X = np.log1p(X * scale[:, None]).astype(np.float32)
    note = (f"{where} holds integer counts (whole numbers up to {found.max_value:g}): normalised here to "
            f"{COUNTS_TARGET_SUM:,.0f} counts per cell, then log1p (as sc.pp.normalize_total + sc.pp.log1p)")
    other = " To use adata.X instead, pass features='X'." if where.startswith("adata.raw") else ""
    warnings.warn(f"{source}: {note}.{other}", stacklevel=3)
    return X, f"{where} (counts, normalised here: normalize_total {COUNTS_TARGET_SUM:g} + log1p)"
