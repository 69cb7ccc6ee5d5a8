"""Spatial expression transfer: a model trained on bulk-stage spots, moved to a spatial gene panel.

Data
    Two stages of spots, each spot with input features, a position on a slide and target
    expression. *bulk*: many slides, gene set A; *spatial*: few slides, gene set B (smaller,
    about half shared with A). ``spatial_path=""`` simulates both stages from single cells
    (:func:`simulate`; scanpy's bundled ``pbmc68k_reduced``, or ``cells_path``, an .h5ad of
    your own, read by :mod:`workbench.anndata_io`). Otherwise the spatial stage is read from a Visium-style .h5ad (:func:`read_visium`,
    scanpy/squidpy conventions: ``obsm['spatial']`` coordinates, features in ``obsm[features_key]``,
    targets from ``X`` / ``var_names``, slides from ``obs[slide_key]``). Spots of one slide are
    joined by a k-nearest-neighbour graph (:func:`spot_graph`).
Simulated ground truth (:func:`simulate`, every number a parameter)
    1. ``E``: each cell's log-normalised expression (``adata.raw.X`` when present, else ``X``).
    2. Genes: the ``n_bulk_genes + n_spatial_genes - n_shared`` (250 + 100 - 50 = 300) genes of
       highest variance across cells, shuffled by ``seed``; set A is the first 250, set B the last
       100 (so the 50 in the middle are shared).
    3. Per-cell features: the first ``n_pcs`` (30) principal components of ``E``, each scaled to
       unit variance (image-patch features stand-in).
    4. Cells of each type are shuffled and dealt alternately to a bulk pool and a spatial pool
       (a type with one cell goes to both), so the spatial slides hold cells pretraining never saw.
    5. A slide is a ``grid x grid`` (12 x 12) lattice of spots, spacing 1. For each cell type t a
       field ``Z_t`` is white noise smoothed with a Gaussian filter (sigma ``smoothness`` = 2
       spots, reflecting edges) and scaled to unit variance; a spot's composition is
       ``p_t = f_t * exp(contrast * Z_t) / sum`` (``f_t``: the type's share of its pool,
       ``contrast`` = 1.5), so neighbouring spots hold similar cell types.
    6. A spot holds ``n ~ Uniform{5..20}`` cells: type counts ``~ Multinomial(n, p)``, each cell
       drawn with replacement from that type's pool.
    7. Spot features: the mean over its cells of (cell features + ``N(0, feature_noise^2)``,
       ``feature_noise`` = 0.5, fresh noise per placed cell).
    8. Spot targets: ``log1p(mean over its cells of expm1(E))`` per gene (pseudo-bulk: counts add,
       then log), plus ``N(0, target_noise^2)`` (``target_noise`` = 0.05).
    9. ``n_bulk_slides`` (16) bulk slides ``bulk01...`` (targets: set A) and ``n_spatial_slides``
       (4) spatial slides ``A1, B1, C1, D1, A2...`` (targets: set B).
Model
    :class:`SpatialExpressionModel`: a ``GATConv`` (torch_geometric, pure Python) with a linear
    skip over the spot graph -> a projection (Linear + LayerNorm) -> a pre-norm transformer
    encoder over the spots of a slide (3 layers bulk, 2 spatial) -> an output projection to the
    genes. Strategies on the model: ``full``, ``frozen_backbone`` (GNN and projection frozen),
    ``frozen_decoder`` (GNN and transformer frozen), besides the core ones.
Pretraining
    The bulk model (3 layers, gene set A), trained on the bulk slides (the last two validate,
    early stopping), cached by :func:`workbench.protocol.pretrain` (key: the bulk data's content,
    the settings, this package's source). Loading it into the spatial
    model skips the output projection (shape) and leaves the third transformer layer unexpected.
Cross-validation
    ``cv="loo"``: each slide in ``held_out`` is the test set once, the other spatial slides train.
    ``cv="kfold"``: ``folds`` folds over spots, stratified by slide; a test spot stays in its
    slide's graph (its features are seen, its targets are not). A random ``val_fraction`` of the
    training spots picks the epoch (early stopping with ``patience`` / ``min_delta``).
Baseline
    Ridge regression (:func:`workbench.protocol.fit_baseline`, alpha by leave-one-out) per fold on
    exactly the spots the model is fit on (not its validation spots), with the same inputs the GNN
    sees at one hop: a spot's features and the mean features of its graph neighbours. Model and
    ridge are scored by :func:`workbench.protocol.evaluate`.
Modules
    ``data`` (spots, graph, Visium-style .h5ad), ``simulate``, ``model``, ``batches`` (whole-slide
    batches; under ``torchrun`` they shard by slide), ``steps`` (pretraining, loading, cross-
    validation, evaluation), ``predictor`` (the run folder's :class:`SpatialPredictor`).
"""


from __future__ import annotations

from pathlib import Path

from ...params import Choice, Integer, Text
from ...workflow import Param, Workflow
from .batches import Scaler, SlideBatch, SlideBatches, predict
from .data import SpotData, Study, read_visium, select_genes, spot_graph, write_visium
from .defaults import CV_KINDS, DEFAULTS, PRETRAIN_SETTINGS, STRATEGIES
from .model import SpatialExpressionModel, SpotGNN, build_model
from .predictor import SpatialPredictor, save_predictor
from .simulate import simulate
from .steps import (CVResult, _fit, baseline, load,  # noqa: F401 - _fit: the tests fit one model directly
                    cross_validate, cv_splits, evaluate, load_report, pretrain, pretrained,
                    report_table, strategy_table)

__all__ = [
    "WORKFLOW", "DEFAULTS", "SpotData", "Study", "SpatialExpressionModel", "SpotGNN", "simulate", "read_visium",
    "write_visium", "spot_graph", "select_genes", "load", "build_model", "Scaler", "SlideBatch", "SlideBatches",
    "predict", "pretrain", "pretrained", "load_report", "report_table", "strategy_table", "cv_splits", "CVResult",
    "cross_validate", "baseline", "evaluate", "SpatialPredictor", "save_predictor", "PRETRAIN_SETTINGS", "CV_KINDS",
    "STRATEGIES",
]

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "spatial_transfer.ipynb"
HEADLINE_METRICS = ("test_mean_pearson", "test_pearson", "test_mse", "baseline_test_mean_pearson",
                    "test_mean_pearson_std")
PACKAGES = ("torch_geometric", "anndata", "scipy")

#: The notebook's parameters: help and what each accepts, checked before any work (``workbench run``/``sweep`` and
#: the notebook). Shared names (workbench.workflow.SHARED) take their constraint from there; output_dir, tracker,
#: device, dtype and interactive are appended with the shared wording.
WORKFLOW = Workflow(
    "spatial_transfer", NOTEBOOK, title="Spatial expression transfer",
    predictor="workbench.tasks.spatial_transfer.predictor:SpatialPredictor",
    headline_metrics=HEADLINE_METRICS, packages=PACKAGES, parameters=dict(
        cells_path=Param("", "single-cell .h5ad the slides are simulated from; empty means scanpy's pbmc68k_reduced",
                         Text()),
        cell_type_key=Param("bulk_labels", "obs column with cell types (cells_path)", Text(nonempty=True)),
        spatial_path=Param("", "Visium-style .h5ad for the spatial stage; empty means simulated slides", Text()),
        features_key=Param("X_features", "obsm key holding the spot features (spatial_path)", Text(nonempty=True)),
        slide_key=Param("library_id", "obs column naming each spot's slide (spatial_path)", Text(nonempty=True)),
        genes=Param("", "comma-separated target genes of the spatial stage; empty means all (simulated: gene set B)",
                    Text()),
        n_bulk_slides=Param(16, "simulated bulk-stage slides (pretraining)", Integer(ge=3)),
        n_spatial_slides=Param(4, "simulated spatial-stage slides", Integer(ge=2)),
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on the bulk stage) | none (from scratch) | a "
                                                "checkpoint path"),
        strategy=Param("frozen_backbone", "full | frozen_backbone | frozen_decoder", Choice(*STRATEGIES)),
        cv=Param("loo", "loo (leave one slide out) | kfold (folds over spots)", Choice(*CV_KINDS)),
        folds=Param(5, "number of folds (cv kfold)", Integer(ge=2)),
        held_out=Param("", "comma-separated slides to leave out in turn (cv loo); empty means every slide", Text()),
        epochs=Param(150, "most fine-tuning epochs per fold (one step per training slide)"),
        learning_rate=Param(1.0e-3, "learning rate (constant)"),
        patience=Param(20, "early stopping: epochs without a val_loss improvement of min_delta"),
        min_delta=Param(1.0e-3, "early stopping: smallest improvement that counts"),
        pretrain_epochs=Param(40, "most epochs of bulk pretraining"),
        seed=Param(0, "pretraining, initialisation, validation spots and data order", Integer(ge=0)),
        sim_seed=Param(0, "the simulated world (genes, slides, cells)", Integer(ge=0)),
    ),
)
