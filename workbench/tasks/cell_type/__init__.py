"""Cell-type annotation: an expression encoder pretrained on unlabeled cells, fine-tuned on labels.

Data (``data.py``)
    Any AnnData (``.h5ad``) with a categorical ``obs`` column of cell types; features are ``adata.raw.X`` when
    present, else ``adata.X``; integer counts there are log-normalised (10,000 per cell, ``log1p``) with a warning.
    An empty ``data_path`` means scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs x 765 genes, 10 types in
    ``bulk_labels``; no download). ``backed`` decides whether X is read into memory or streamed from the file
    (``"auto"``: files above :data:`BACKED_AUTO_BYTES`); either way batches come through
    :class:`workbench.streaming.StreamingBatches` and the splits use ``obs`` alone, so an atlas of millions of cells
    never has its X in memory.
Model (``model.py``)
    :class:`ExpressionEncoder`: an MLP (Linear -> LayerNorm -> GELU -> Dropout per layer) over all genes, with a
    linear head (:class:`CellTypeClassifier`).
Pretraining (``steps.py``)
    Masked-expression reconstruction (:class:`MaskedExpressionModel`): a random subset of each cell's genes is zeroed
    and the encoder + a small decoder reconstruct the masked values, on the training cells without labels, through
    the core's cached pretraining (``workbench.protocol.pretrain``; the key holds the data's content, the exact
    training cells, every setting and the source of this package). The checkpoint's sidecar lists the genes, and
    :func:`load_checkpoint` meets them by name, the path a user's own checkpoint takes.
Baseline (``steps.py``)
    Logistic regression (``workbench.protocol.fit_baseline``, unscaled) on the same features and labelled cells
    (the model behind CellTypist), scored by the same function as the model (``workbench.protocol.evaluate``).
    It is fitted on at most :data:`BASELINE_MAX_CELLS` labelled cells (a seeded random subset above that: a row cap,
    not a streaming solver, so small data sets keep the exact lbfgs fit); ``baseline_n_train`` then says how many.

Prediction from a run folder: :class:`CellTypePredictor` (``predictor.py``).
"""

from __future__ import annotations

from pathlib import Path

from ...params import Choice, Text
from ...schedules import SCHEDULES
from ...transfer import BUILTIN_STRATEGIES
from ...workflow import Param, Workflow
from .data import (
    BACKED_AUTO_BYTES, BACKED_CHOICES, VAL_FRACTION, CellData, ExpressionBatches, bundled_pbmc68k_reduced,
    load, read_adata, use_backed,
)
from .model import DEFAULTS, CellTypeClassifier, ExpressionEncoder, MaskedExpressionModel, build_model
from .predictor import CellTypePredictor, save_predictor
from .steps import (
    BASELINE_MAX_CELLS, MONITORS, PRETRAIN_SETTINGS, baseline, baseline_cells, evaluate, find_lr, finetune, input_genes,
    load_checkpoint, lr_finder, predict_proba, pretrain, pretrained,
)

__all__ = [
    "WORKFLOW",
    # data
    "CellData", "ExpressionBatches", "load", "read_adata", "bundled_pbmc68k_reduced", "use_backed",
    "BACKED_AUTO_BYTES", "BACKED_CHOICES",
    # models
    "DEFAULTS", "ExpressionEncoder", "CellTypeClassifier", "MaskedExpressionModel", "build_model",
    # steps
    "pretrain", "pretrained", "input_genes", "load_checkpoint", "finetune", "find_lr", "lr_finder", "baseline",
    "baseline_cells", "predict_proba", "evaluate", "PRETRAIN_SETTINGS", "MONITORS", "BASELINE_MAX_CELLS",
    # prediction from a run folder
    "CellTypePredictor", "save_predictor",
]

WORKFLOW = Workflow(
    "cell_type", Path(__file__).resolve().parents[3] / "notebooks" / "cell_type_annotation.ipynb",
    title="Cell-type annotation", predictor=f"{__name__}:CellTypePredictor", packages=("anndata", "scanpy", "scipy"),
    headline_metrics=("test_macro_f1", "test_accuracy", "baseline_test_macro_f1", "baseline_test_accuracy"),
    parameters=dict(
        # data and split (the shared names' constraints come from workbench.workflow.SHARED)
        data_path=Param("", ".h5ad file; empty means the bundled pbmc68k_reduced from scanpy"),
        label_key=Param("bulk_labels", "obs column holding the cell types", Text(nonempty=True)),
        backed=Param("auto", "auto | true | false: stream X from the .h5ad instead of reading it (auto: files over "
                             "1 GiB)", Choice(*BACKED_CHOICES)),
        # pretraining
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on unlabeled training cells) | none (from scratch) "
                                                "| a checkpoint path"),
        pretrain_epochs=Param(DEFAULTS["pretrain_epochs"], "masked-expression pretraining epochs "
                                                           "(pretrained_checkpoint pretrain)"),
        # fine-tuning
        strategy=Param("full", " | ".join(BUILTIN_STRATEGIES), Choice(*BUILTIN_STRATEGIES)),
        lr_scheduler_type=Param("cosine", " | ".join(SCHEDULES), Choice(*SCHEDULES)),
        learning_rate=Param(1.0e-3),
        warmup_ratio=Param(0.1),
        epochs=Param(100),
        batch_size=Param(32, "cells per batch"),
        freeze_epochs=Param(0),
        backbone_lr_ratio=Param(1.0),
        label_fraction=Param(1.0, "share of the training cells whose labels are used (pretraining sees them all, unlabelled)"),
        test_size=Param(0.2, "held-out test share (stratified by cell type)"),
        val_fraction=Param(0.1, "share of the labelled training cells held out for validation (0: none)",
                           VAL_FRACTION),
        monitor=Param("val_macro_f1", " | ".join(reversed(MONITORS)) + " (picks the best epoch)",
                      Choice(*MONITORS)),
        patience=Param(0),
        find_lr=Param(False),
    ),
)
