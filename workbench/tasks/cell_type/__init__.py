"""Cell-type annotation: an expression encoder pretrained on unlabeled cells, fine-tuned on labels.

Data
    Any AnnData (``.h5ad``) with a categorical ``obs`` column of cell types; features are
    ``adata.raw.X`` when present, else ``adata.X``, and integer counts there are log-normalised
    (10,000 per cell, ``log1p``) with a warning. An empty
    ``data_path`` means scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs x 765 genes, 10 types
    in ``bulk_labels``; no download). Expression stays sparse until a batch is drawn.
    ``backed`` decides whether X is read into memory or streamed from the file
    (``read_h5ad(..., backed="r")``): ``"auto"`` streams files above :data:`BACKED_AUTO_BYTES`.
    Either way batches come through the same loader, :class:`workbench.streaming.StreamingBatches`
    (scdataset's block shuffling: seeded, resumable, one fetch in memory), and the splits and
    ``label_fraction`` use ``obs`` alone, so an atlas of millions of cells never has its X in memory.
Model
    :class:`ExpressionEncoder`: an MLP (Linear -> LayerNorm -> GELU -> Dropout per layer) over
    all genes, with a linear head. On a few hundred to a few thousand cells, an MLP on the
    expression vector is the strongest simple choice: gene order carries no meaning (so
    convolutions do not fit) and a gene-token transformer needs far more cells to pay off.
Pretraining
    Masked-expression reconstruction (:class:`MaskedExpressionModel`): a random subset of each
    cell's genes is zeroed and the encoder + a small decoder reconstruct the masked values. It
    only sees the training cells, without labels. The checkpoint it writes (its sidecar lists the
    genes) is loaded into the classifier through :func:`load_checkpoint`
    (:func:`workbench.load_pretrained`), the path a user's external checkpoint takes: genes are
    met by name, so a checkpoint over the same genes in another order loads correctly. It is cached by fingerprint (:mod:`workbench.cache`): the data's content,
    the exact training cells and every pretraining setting. A run reuses an encoder only when
    all of them are equal, so a sweep over fine-tuning settings pretrains once per split.
Baseline
    Logistic regression on the same features, split and labelled cells (the model behind
    CellTypist). It is fitted on at most :data:`BASELINE_MAX_CELLS` labelled cells (a seeded random
    subset above that: a row cap, not a streaming solver, so that small data sets keep the exact
    lbfgs fit) and predicts the test cells chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import splits
from . import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from ..cache import cached, code_version, fingerprint
from ..checkpoints import resolve_pretrained, save_weights
from ..devices import NOTEBOOK_DTYPES, DeviceName, placement_key, to_model, to_numpy
from ..metrics import Evaluation, classification_metrics, evaluate_classifier, validation_accuracy_and_macro_f1
from ..params import Choice, Flag, Integer, Real, Spec, Text
from ..workflow import Param, Workflow
from ..predict import (
    MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names, class_predictions,
)
from ..predict import save_predictor as _save_predictor
from ..schedules import SCHEDULES
from ..streaming import StreamingBatches, read_rows, scan
from ..tracking import TRACKERS
from ..transfer import BUILTIN_STRATEGIES

__all__ = [
    "WORKFLOW",
    "DEFAULTS",
    "CellData",
    "ExpressionBatches",
    "ExpressionEncoder",
    "CellTypeClassifier",
    "MaskedExpressionModel",
    "load",
    "build_model",
    "pretrain",
    "pretrained",
    "input_genes",
    "load_checkpoint",
    "finetune",
    "find_lr",
    "lr_finder",
    "baseline",
    "evaluate",
    "CellTypePredictor",
    "HEADLINE_METRICS",
    "PACKAGES",
]

#: The workflow's notebook (in a source checkout), for the widget panel and tests.
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "cell_type_annotation.ipynb"

#: Final metrics a terminal summary shows first (``workbench sweep`` / ``report``); the first is the primary one.
HEADLINE_METRICS = ("test_macro_f1", "test_accuracy", "baseline_test_macro_f1", "baseline_test_accuracy")

#: Packages whose versions each run records besides the core ones.
PACKAGES = ("anndata", "scanpy", "scipy")

#: Settings of the pretraining step: each is part of the pretrained encoder's fingerprint.
PRETRAIN_SETTINGS = ("hidden", "dropout", "weight_decay", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size",
                     "mask_ratio")

#: Architecture and training settings the notebook does not expose as parameters.
DEFAULTS = {
    "hidden": (512, 256),
    "dropout": 0.1,
    "input_dropout": 0.0,
    "label_smoothing": 0.1,
    "weight_decay": 0.01,
    "pretrain_epochs": 100,
    "pretrain_lr": 1e-3,
    "pretrain_batch_size": 64,
    "mask_ratio": 0.3,
}

#: ``backed="auto"`` streams X from files larger than this; smaller ones are read into memory.
BACKED_AUTO_BYTES = 1 << 30
#: What the ``backed`` parameter accepts.
BACKED_CHOICES = ("auto", "true", "false")
#: The baseline's logistic regression is fitted on at most this many labelled cells (a seeded random subset).
BASELINE_MAX_CELLS = 50_000
#: Rows per chunk when the baseline predicts the test cells.
PREDICT_CHUNK = 16_384
#: Integer counts are scaled to this many counts per cell before log1p (scanpy's usual target_sum).
COUNTS_TARGET_SUM = 1e4

#: Metrics that can pick the best epoch, and whether higher or lower is better.
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"}

#: What each notebook parameter accepts, checked before any work (``workbench run``/``sweep`` and the notebook).
WORKFLOW = Workflow(
    name='cell_type',
    title='Cell-type annotation',
    notebook=NOTEBOOK,
    headline_metrics=HEADLINE_METRICS,
    packages=PACKAGES,
    predictor="workbench.tasks.cell_type:CellTypePredictor",
    parameters=dict(
        data_path=Param("", ".h5ad file; empty means the bundled pbmc68k_reduced from scanpy", Text()),
        label_key=Param("bulk_labels", "obs column holding the cell types", Text(nonempty=True)),
        backed=Param("auto", "auto | true | false: stream X from the .h5ad instead of reading it (auto: files over 1 GiB)", Choice(*BACKED_CHOICES)),
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on unlabeled training cells) | none (from scratch) | a checkpoint path", Choice("pretrain", "none", or_path=True)),
        pretrain_epochs=Param(DEFAULTS["pretrain_epochs"], "masked-expression pretraining epochs (pretrained_checkpoint pretrain)", Integer(ge=1)),
        strategy=Param("full", "full | frozen_backbone | linear_probe", Choice(*BUILTIN_STRATEGIES)),
        lr_scheduler_type=Param("cosine", "constant | constant_with_warmup | cosine | linear | step", Choice(*SCHEDULES)),
        learning_rate=Param(1.0e-3, "head learning rate", Real(gt=0)),
        warmup_ratio=Param(0.1, "fraction of steps spent warming up", Real(ge=0, lt=1)),
        epochs=Param(100, "fine-tuning epochs", Integer(ge=1)),
        batch_size=Param(32, "cells per batch", Integer(ge=1)),
        freeze_epochs=Param(0, "epochs with the encoder frozen before full fine-tuning", Integer(ge=0)),
        backbone_lr_ratio=Param(1.0, "encoder learning rate as a multiple of learning_rate", Real(ge=0)),
        label_fraction=Param(1.0, "fraction of training cells whose labels are used", Real(gt=0, le=1)),
        test_size=Param(0.2, "held-out fraction (stratified)", Real(gt=0, lt=1)),
        val_fraction=Param(0.1, "share of the labelled training cells held out for validation (0: none)", Real(ge=0, le=0.5)),
        monitor=Param("val_macro_f1", "val_macro_f1 | val_accuracy | val_loss (picks the best epoch)", Choice(*MONITORS)),
        patience=Param(0, "stop after this many epochs without improvement (0: never)", Integer(ge=0)),
        seed=Param(0, "split, initialisation and data order", Integer(ge=0)),
        output_dir=Param("", "run folder; empty: a new dated folder under runs/cell_type/", Text()),
        tracker=Param("none", "none | wandb (offline unless WANDB_MODE is set)", Choice(*TRACKERS)),
        find_lr=Param(False, "run the LR range test first and train at its suggestion instead of learning_rate", Flag()),
        device=Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", DeviceName()),
        dtype=Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device path)", Choice(*NOTEBOOK_DTYPES)),
        interactive=Param(True, "show the widget panel (papermill runs set it False)", Flag()),
    ),
)


# --------------------------------------------------------------------------- data


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


def bundled_pbmc68k_reduced() -> Path:
    """Path of the pbmc68k_reduced file that ships inside scanpy (no download).

    Found without importing scanpy, which costs 2-3 s per run (see benchmarks/sweep_overhead.py);
    ``sc.datasets.pbmc68k_reduced()`` reads this very file.
    """
    import importlib.util

    spec = importlib.util.find_spec("scanpy")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "10x_pbmc68k_reduced.h5ad" if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError("scanpy's bundled pbmc68k_reduced was not found. Install scanpy (pip install scanpy), "
                                "or pass data_path= to an .h5ad file of your own.")
    return path


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

    With ``backed`` true (or ``"auto"`` and a large file) it is opened with ``backed="r"``: obs and
    var are read, X stays in the file.
    """
    import anndata

    if not data_path:
        path, source = bundled_pbmc68k_reduced(), "pbmc68k_reduced (scanpy, bundled)"
    else:
        path, source = Path(data_path), Path(data_path).name
        if not path.exists():
            raise FileNotFoundError(f"data_path={data_path!r} does not exist. Give an .h5ad file, or '' for the bundled pbmc68k_reduced.")
        if path.suffix != ".h5ad":
            raise ValueError(f"data_path={data_path!r} is not an .h5ad file. Convert it with anndata (adata.write_h5ad(...)).")
    mode = "r" if use_backed(backed, path) else None
    import warnings

    with warnings.catch_warnings():  # pbmc68k_reduced predates .obsp and encoding metadata; anndata says so on read
        if not data_path:
            warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
            warnings.filterwarnings("ignore", category=anndata.OldFormatWarning)
        return anndata.read_h5ad(path, backed=mode), source


def _features(adata, features: str):
    """Expression: ``adata.raw`` when present, else ``adata.X``; backed AnnData keeps it on disk.

    :func:`load` then checks it: integer counts are log-normalised there (:func:`_normalise_counts`).
    """
    import scipy.sparse as sp

    if features not in ("auto", "raw", "X"):
        raise ValueError(f"features={features!r} is not one of 'auto', 'raw', 'X'.")
    use_raw = features == "raw" or (features == "auto" and adata.raw is not None)
    if use_raw and adata.raw is None:
        raise ValueError("features='raw' but this AnnData has no .raw. Use features='X'.")
    matrix, genes = (adata.raw.X, adata.raw.var_names) if use_raw else (adata.X, adata.var_names)
    where = "adata.raw.X" if use_raw else "adata.X"
    if adata.isbacked:
        if getattr(matrix, "format", None) == "csc":
            raise ValueError(
                f"{where} is stored as CSC (by gene) in {adata.filename}; streaming reads cells, which needs CSR. "
                "Rewrite it once: adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(path) "
                "(likewise adata.raw), or pass backed='false' when it fits in memory.")
    else:
        matrix = sp.csr_matrix(matrix, dtype=np.float32) if sp.issparse(matrix) else np.asarray(matrix, dtype=np.float32)
    return matrix, [str(g) for g in genes], where


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
    X, genes, where = _features(adata, features)
    found = scan(X)
    if found.n_nonfinite:
        raise ValueError(
            f"{where} holds {found.n_nonfinite} NaN/inf values. Expression must be finite: fill them (e.g. "
            "np.nan_to_num) or drop the affected cells/genes before annotating."
        )
    content = fingerprint(found.content_hash, genes)
    if found.integer_counts:
        X, where = _normalise_counts(X, where, found, source=source, backed=adata.isbacked)
        content = fingerprint(content, where)
    train_idx, test_idx = splits.holdout(labels, test_size=test_size, seed=seed)
    labelled = train_idx[splits.few_shot(labels[train_idx], fraction=label_fraction, seed=seed)] if label_fraction < 1 else train_idx
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 0.5]: the share of labelled training cells "
                         "held out for validation, e.g. 0.1; 0 for none.")
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


def _normalise_counts(X, where: str, found, *, source: str, backed: bool):
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


# --------------------------------------------------------------------------- models


class ExpressionEncoder(nn.Module):
    """Genes -> cell embedding: ``[Linear, LayerNorm, GELU, Dropout]`` per hidden layer."""

    def __init__(self, n_genes: int, *, hidden=(512, 256), dropout: float = 0.1, input_dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
        width = n_genes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.layers(x)


class CellTypeClassifier(nn.Module):
    """``encoder`` (pretrainable) + ``head`` (a linear layer over the embedding)."""

    head_prefixes = ("head",)

    def __init__(self, n_genes: int, n_classes: int, *, hidden=(512, 256), dropout: float = 0.1,
                 input_dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder = ExpressionEncoder(n_genes, hidden=hidden, dropout=dropout, input_dropout=input_dropout)
        self.head = nn.Linear(self.encoder.out_features, n_classes)
        self.label_smoothing = label_smoothing

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)


class MaskedExpressionModel(nn.Module):
    """Self-supervised pretraining: reconstruct the values of randomly masked genes."""

    def __init__(self, n_genes: int, *, hidden=(512, 256), dropout: float = 0.1, mask_ratio: float = 0.3):
        super().__init__()
        self.encoder = ExpressionEncoder(n_genes, hidden=hidden, dropout=dropout)
        width = self.encoder.out_features
        self.decoder = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, n_genes))
        self.mask_ratio = mask_ratio

    def loss(self, batch):
        x = batch[0]
        mask = (torch.rand_like(x) < self.mask_ratio).to(x.dtype)
        recon = self.decoder(self.encoder(x * (1 - mask)))
        return ((recon - x) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def build_model(data: CellData, **overrides) -> CellTypeClassifier:
    cfg = {**DEFAULTS, **overrides}
    return CellTypeClassifier(
        data.n_genes, len(data.classes), hidden=tuple(cfg["hidden"]), dropout=cfg["dropout"],
        input_dropout=cfg["input_dropout"], label_smoothing=cfg["label_smoothing"],
    )


# --------------------------------------------------------------------------- steps


def pretrain(data: CellData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto", dtype=None,
             **overrides) -> Path:
    """Masked-expression pretraining on the training cells (no labels); returns the checkpoint.

    The result is cached under ``<cache root>/pretrain/<fingerprint>/`` (see
    :mod:`workbench.cache`), where the fingerprint covers the data's content, the exact training
    cells, ``seed``, every setting in :data:`PRETRAIN_SETTINGS` and this module's source. An entry is reused only when
    all of them are equal; an interrupted pretraining resumes from its own ``last.pt``.

    Returns
    -------
    pathlib.Path
        ``pretrained.safetensors``, with a JSON sidecar naming the genes and the fingerprint.
    """
    cfg = {**DEFAULTS, **overrides}
    settings = {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in PRETRAIN_SETTINGS}
    settings.update(seed=seed, objective="masked_expression", **placement_key(device, dtype))
    key = fingerprint(data.content_hash, data.train_idx, settings, code_version(__name__))

    def build(folder: Path) -> None:
        from ..tracking import Run
        from ..training import fit

        torch.manual_seed(seed)
        model = MaskedExpressionModel(data.n_genes, hidden=tuple(cfg["hidden"]), dropout=cfg["dropout"],
                                      mask_ratio=cfg["mask_ratio"])
        run = Run(folder / "run", params=settings, resume=True)
        batches = data.batches(data.train_idx, batch_size=cfg["pretrain_batch_size"], shuffle=True, seed=seed)
        fit(model, batches, epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"], weight_decay=cfg["weight_decay"],
            schedule="cosine", warmup_ratio=0.05, run=run, resume=True, progress=progress, log_every=100,
            device=device, dtype=dtype)
        meta = {"task": "cell_type", "objective": "masked_expression", "genes": data.genes, "fingerprint": key,
                "cells": len(data.train_idx), **settings}
        save_weights(model, folder / "pretrained.safetensors", metadata=meta)

    describe = {"data": data.source, "data_hash": data.content_hash, "train_cells": len(data.train_idx), **settings}
    folder = cached("pretrain", key, build, root=cache_root, describe=describe)
    return folder / "pretrained.safetensors"


def pretrained(data: CellData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, device="auto", dtype=None, **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    return resolve_pretrained(pretrained_checkpoint,
                              lambda: pretrain(data, seed=seed, progress=progress, cache_root=cache_root,
                                               device=device, dtype=dtype, **overrides))


def input_genes(model: CellTypeClassifier, data: CellData):
    """The data's genes along the encoder's first linear layer (:class:`workbench.transfer.FeatureNames`).

    With it, :func:`workbench.load_pretrained` meets a checkpoint's genes by name, in the order
    its sidecar lists them (``"genes"``, as :func:`pretrain` writes it), not by position.
    """
    from ..transfer import FeatureNames

    first = next(i for i, layer in enumerate(model.encoder.layers) if isinstance(layer, nn.Linear))
    return FeatureNames(data.genes, {f"encoder.layers.{first}.weight": 1}, key="genes")


def load_checkpoint(model: CellTypeClassifier, data: CellData, source, *, run=None):
    """Load an encoder checkpoint into the classifier; the :class:`workbench.LoadReport`.

    :func:`workbench.load_pretrained` with the head expected missing and the input weights met
    by gene name (:func:`input_genes`): a checkpoint pretrained on the same genes in another
    order loads as if they were in order; genes on one side only are counted in
    ``report.alignment`` (those only in the data keep their initialisation and stay trainable
    under every named strategy). A checkpoint whose sidecar lists no genes loads by position,
    with a warning.
    """
    from ..transfer import load_pretrained

    return load_pretrained(model, source, expect_missing=["head.*"], feature_names=input_genes(model, data), run=run)


#: What ``finetune(monitor=...)`` accepts, and whether larger is better.


def finetune(model, data: CellData, *, epochs: int, learning_rate: float, batch_size: int = 32,
             lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.1, strategy: str = "full",
             freeze_epochs: int = 0, backbone_lr_ratio: float = 1.0, monitor: str = "val_macro_f1", patience: int = 0,
             seed: int = 0, run=None, callbacks=(), progress: bool = True, device="auto", dtype=None):
    """Supervised fine-tuning on the labelled training cells; returns the History.

    Every epoch is scored on the validation cells (``val_loss``, ``val_accuracy``,
    ``val_macro_f1``); ``monitor`` picks the best epoch, whose weights the model holds at the
    end (and ``best.safetensors`` in the run folder). The default, ``val_macro_f1``, is the
    metric the workflow reports; ``val_loss`` (with label smoothing) bottoms out within the
    warmup here, long before accuracy does, and picked epochs 5-14 of 100 (see docs/workflows/parts/cell_type.md).
    On a tie the later epoch wins: a validation set of a few cells (10% labels) ties often. ``patience > 0`` stops after that many
    epochs without improvement. The test cells are not touched. Without validation cells the
    best epoch is the one with the lowest training loss.
    """
    from ..training import fit

    if monitor not in MONITORS:
        raise ValueError(f"monitor={monitor!r} is not one of {', '.join(MONITORS)}.")
    has_val = len(data.val_idx) > 0
    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.batches(data.val_idx, batch_size=256) if has_val else None
    return fit(
        model, batches, epochs=epochs, lr=learning_rate, weight_decay=DEFAULTS["weight_decay"],
        schedule=lr_scheduler_type, warmup_ratio=warmup_ratio, strategy=strategy, freeze_epochs=freeze_epochs,
        backbone_lr_ratio=backbone_lr_ratio, val_data=val, evaluate=validation_accuracy_and_macro_f1 if has_val else None,
        monitor=monitor if has_val else "train_loss", mode=MONITORS[monitor] if has_val else "min",
        patience=patience or None, restore_best=True, run=run, callbacks=callbacks, progress=progress, seed=seed,
        log_every=100, device=device, dtype=dtype,
    )


def find_lr(model, data: CellData, *, batch_size: int = 32, backbone_lr_ratio: float = 1.0, seed: int = 0,
            num_steps: int = 100):
    """The LR range test (:func:`workbench.lr_find`) on the labelled training cells; nothing it touches changes.

    The same batches and weight decay as :func:`finetune`; it trains what is trainable now (with
    ``freeze_epochs`` the notebook has frozen the encoder, so it tests the head alone). Returns
    the result, whose ``suggestion`` (steepest descent) the notebook trains with when ``find_lr`` is set.
    """
    from ..lr_range import lr_find

    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    return lr_find(model, batches, start_lr=1e-6, end_lr=1.0, num_steps=num_steps,
                   weight_decay=DEFAULTS["weight_decay"], backbone_lr_ratio=backbone_lr_ratio)


def lr_finder(model, data: CellData):
    """``values -> find_lr(model, data, ...)`` for the widget panel's Find LR button (reads batch_size, ...)."""

    def run(values: Mapping):
        return find_lr(model, data, batch_size=values["batch_size"], backbone_lr_ratio=values["backbone_lr_ratio"],
                       seed=values["seed"])

    return run


def baseline(data: CellData, *, seed: int = 0, max_cells: int = BASELINE_MAX_CELLS) -> dict:
    """Logistic regression on the same features and labelled cells; test metrics.

    It is fitted on at most ``max_cells`` labelled cells (a seeded random subset when there are more;
    a row cap, so the fit stays the exact lbfgs one on small data) and predicts the test cells in
    chunks of :data:`PREDICT_CHUNK` rows, so memory stays bounded on an atlas.
    """
    from sklearn.linear_model import LogisticRegression

    fit_idx = _baseline_cells(data, seed=seed, max_cells=max_cells)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(data.rows(fit_idx), data.labels[fit_idx])
    test = data.test_idx
    pred = np.concatenate([clf.predict(data.rows(test[s:s + PREDICT_CHUNK]))
                           for s in range(0, len(test), PREDICT_CHUNK)]) if len(test) else np.array([], dtype=object)
    return classification_metrics(data.labels[test], pred, labels=data.classes)


def _baseline_cells(data: CellData, *, seed: int = 0, max_cells: int = BASELINE_MAX_CELLS) -> np.ndarray:
    """The labelled cells the baseline fits: all of them, or a seeded random ``max_cells`` when there are more."""
    fit_idx = data.labelled_idx
    if len(fit_idx) > max_cells:
        fit_idx = np.sort(np.random.default_rng(seed).choice(fit_idx, size=max_cells, replace=False))
    return fit_idx


def predict_proba(model, data: CellData, idx, *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of the cells ``idx``, one row per cell in the order given (streamed from X)."""
    idx = np.asarray(idx, dtype=np.int64)
    model.eval()
    with torch.no_grad():
        parts = [F.softmax(model(to_model(x, model)), dim=1).float()
                 for x, _ in data.batches(idx, batch_size=batch_size)]
    proba = to_numpy(torch.cat(parts)) if parts else np.zeros((0, len(data.classes)), dtype=np.float32)
    return proba[np.searchsorted(np.unique(idx), idx)]  # the batches came in sorted order


def evaluate(model, data: CellData, *, run=None, seed: int = 0) -> Evaluation:
    """Score on the test cells, beside logistic regression; write final_metrics.json.

    With a ``run``, its folder also gets what predicting on new cells needs (``predictor.json``,
    see ``save_predictor``) and the test cells' predictions (``test_predictions.csv``).
    ``n_train`` and ``baseline_n_train`` count the cells each was fit on (the labelled cells).
    """
    proba = predict_proba(model, data, data.test_idx)
    save_predictor(run, model, data, test_proba=proba)
    counts = {"n_train": len(data.labelled_idx), "baseline_n_train": len(_baseline_cells(data, seed=seed))}
    return evaluate_classifier(data.labels[data.test_idx], proba, data.classes, baseline=baseline(data, seed=seed),
                               run=run, extra=counts)



# --------------------------------------------------------------------------- prediction on new cells


def _model_settings(model: CellTypeClassifier) -> dict:
    """The architecture of a classifier, read from its layers (so overrides of build_model are kept)."""
    from ..transfer import unwrap

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
    return _save_predictor(run, model, task=__name__, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, names, classes, report, *, source=None) -> Predictions:
    return class_predictions(proba, np.asarray(names).astype(str), classes, report, index_name="cell", source=source,
                             task=__name__)


class CellTypePredictor(Predictor):
    """A cell-type run's model, its genes and classes: annotates new cells (AnnData or an .h5ad path).

    Genes are matched by name and put in the model's order; genes the model knows and the data
    lacks are filled with 0 (refused above ``max_missing`` of them), genes the model does not know
    are ignored; :class:`workbench.predict.AlignmentReport` counts each. Cells are streamed
    through :class:`workbench.streaming.StreamingBatches` (a backed .h5ad never has X in memory).
    """

    accepts = ("anndata",)
    outputs = ("probabilities", "embedding")

    def __init__(self, path, record):
        super().__init__(path, record)
        s = self.state
        self.genes, self.classes = list(s["genes"]), list(s["classes"])
        self.model = self.load_weights(CellTypeClassifier(
            len(self.genes), len(self.classes), hidden=tuple(s["hidden"]), dropout=s["dropout"],
            input_dropout=s["input_dropout"]))

    def _matrix(self, adata, where_from: str):
        """The expression matrix the model reads, as :func:`load` prepares it (integer counts log-normalised)."""
        trained_on = self.state.get("features", "adata.X")
        has_raw = adata.raw is not None
        use = "raw" if (trained_on.startswith("adata.raw") and has_raw) else "X"
        matrix, genes, where = _features(adata, use)
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
                matrix, where = _normalise_counts(matrix, where, found, source=where_from, backed=adata.isbacked)
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
                               task=__name__)
        return _predictions(values, names, self.classes, report, source=adata)


#: Rows of a backed input read to tell integer counts from log-normalised expression.
COUNTS_PROBE_ROWS = 2048
