"""Spatial expression transfer: a model trained on bulk-stage spots, moved to a spatial gene panel.

Data
    Two stages of spots, each spot with input features, a position on a slide and target
    expression. *bulk*: many slides, gene set A; *spatial*: few slides, gene set B (smaller,
    about half shared with A). ``spatial_path=""`` simulates both stages from single cells
    (:func:`simulate`; scanpy's bundled ``pbmc68k_reduced``, or ``cells_path``, an .h5ad of
    your own). Otherwise the spatial stage is read from a Visium-style .h5ad (:func:`read_visium`,
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
    early stopping), cached by fingerprint (:mod:`workbench.cache`). Loading it into the spatial
    model skips the output projection (shape) and leaves the third transformer layer unexpected.
Cross-validation
    ``cv="loo"``: each slide in ``held_out`` is the test set once, the other spatial slides train.
    ``cv="kfold"``: ``folds`` folds over spots, stratified by slide; a test spot stays in its
    slide's graph (its features are seen, its targets are not). A random ``val_fraction`` of the
    training spots picks the epoch (early stopping with ``patience`` / ``min_delta``).
Baseline
    Ridge regression (alpha by internal CV) per fold on the same spots the model is fit on (not
    its validation spots), with the same inputs the GNN sees at one hop: a spot's features and
    the mean features of its graph neighbours.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from . import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from ..cache import cached, code_version, content_hash, fingerprint
from ..checkpoints import resolve_pretrained, save_weights
from ..devices import NOTEBOOK_DTYPES, DeviceName, placement_key, to_model, to_numpy
from ..metrics import MetricsTable, fold_summary, regression_metrics
from ..params import Choice, Flag, Integer, Real, Spec, Text
from ..workflow import Param, Workflow
from ..predict import AlignmentReport, Predictions, PredictError, Predictor
from ..predict import save_predictor as _save_predictor
from ..tracking import TRACKERS

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "SpotData", "Study", "SpatialExpressionModel", "simulate", "read_visium", "write_visium",
    "spot_graph", "select_genes", "load", "build_model", "pretrain", "pretrained", "load_report", "strategy_table",
    "cv_splits", "cross_validate", "baseline", "evaluate", "HEADLINE_METRICS", "PACKAGES", "NOTEBOOK",
]

log = logging.getLogger(__name__)

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "spatial_transfer.ipynb"
HEADLINE_METRICS = ("test_mean_pearson", "test_pearson", "test_mse", "baseline_test_mean_pearson",
                    "test_mean_pearson_std")
PACKAGES = ("torch_geometric", "anndata", "scipy")

#: Simulation, architecture and training settings the notebook does not expose.
DEFAULTS = {
    "n_bulk_genes": 250, "n_spatial_genes": 100, "n_shared": 50, "n_pcs": 30, "grid": 12,
    "cells_per_spot": (5, 20), "smoothness": 2.0, "contrast": 1.5, "feature_noise": 0.5, "target_noise": 0.05,
    "neighbours": 6, "radius": 1.5,
    "hidden": 64, "gat_heads": 2, "d_model": 64, "heads": 4, "ff": 128, "dropout": 0.1,
    "bulk_layers": 3, "spatial_layers": 2,
    "weight_decay": 0.01, "pretrain_epochs": 40, "pretrain_lr": 1e-3, "pretrain_patience": 8,
    "val_fraction": 0.15,
}
PRETRAIN_SETTINGS = ("hidden", "gat_heads", "d_model", "heads", "ff", "dropout", "bulk_layers", "weight_decay",
                     "pretrain_epochs", "pretrain_lr", "pretrain_patience", "neighbours", "radius")
CV_KINDS = ("loo", "kfold")
STRATEGIES = ("full", "frozen_backbone", "frozen_decoder")

#: What each notebook parameter accepts, checked before any work (``workbench run``/``sweep`` and the notebook).
WORKFLOW = Workflow(
    name='spatial_transfer',
    title='Spatial expression transfer',
    notebook=NOTEBOOK,
    headline_metrics=HEADLINE_METRICS,
    packages=PACKAGES,
    predictor="workbench.tasks.spatial_transfer:SpatialPredictor",
    parameters=dict(
        cells_path=Param("", "single-cell .h5ad the slides are simulated from; empty means scanpy's pbmc68k_reduced", Text()),
        cell_type_key=Param("bulk_labels", "obs column with cell types (cells_path)", Text(nonempty=True)),
        spatial_path=Param("", "Visium-style .h5ad for the spatial stage; empty means simulated slides", Text()),
        features_key=Param("X_features", "obsm key holding the spot features (spatial_path)", Text(nonempty=True)),
        slide_key=Param("library_id", "obs column naming each spot's slide (spatial_path)", Text(nonempty=True)),
        genes=Param("", "comma-separated target genes of the spatial stage; empty means all (simulated: gene set B)", Text()),
        n_bulk_slides=Param(16, "simulated bulk-stage slides (pretraining)", Integer(ge=3)),
        n_spatial_slides=Param(4, "simulated spatial-stage slides", Integer(ge=2)),
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on the bulk stage) | none (from scratch) | a checkpoint path", Choice("pretrain", "none", or_path=True)),
        strategy=Param("frozen_backbone", "full | frozen_backbone | frozen_decoder", Choice(*STRATEGIES)),
        cv=Param("loo", "loo (leave one slide out) | kfold (folds over spots)", Choice(*CV_KINDS)),
        folds=Param(5, "number of folds (cv kfold)", Integer(ge=2)),
        held_out=Param("", "comma-separated slides to leave out in turn (cv loo); empty means every slide", Text()),
        epochs=Param(150, "most fine-tuning epochs per fold (one step per training slide)", Integer(ge=1)),
        learning_rate=Param(1.0e-3, "learning rate (constant)", Real(gt=0)),
        patience=Param(20, "early stopping: epochs without a val_loss improvement of min_delta", Integer(ge=0)),
        min_delta=Param(1.0e-3, "early stopping: smallest improvement that counts", Real(ge=0)),
        pretrain_epochs=Param(40, "most epochs of bulk pretraining", Integer(ge=1)),
        seed=Param(0, "pretraining, initialisation, validation spots and data order", Integer(ge=0)),
        sim_seed=Param(0, "the simulated world (genes, slides, cells)", Integer(ge=0)),
        output_dir=Param("", "run folder; empty: a new dated folder under runs/spatial_transfer/", Text()),
        tracker=Param("none", "none | wandb (offline unless WANDB_MODE is set)", Choice(*TRACKERS)),
        device=Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", DeviceName()),
        dtype=Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device path)", Choice(*NOTEBOOK_DTYPES)),
        interactive=Param(True, "show the widget panel (papermill runs set it False)", Flag()),
    ),
)


# --------------------------------------------------------------------------- data


def spot_graph(coords, *, neighbours: int = 6, radius: float | None = 1.5, spot_ids=None) -> torch.Tensor:
    """Edges ``(2, E)`` joining each spot to its ``neighbours`` nearest spots within ``radius``.

    The graph is symmetric and has no self-loops (``GATConv`` adds them). ``radius`` is in units
    of the median nearest-neighbour distance (1.5: a hexagonal or square lattice's first ring);
    None means no limit. A spot with no neighbour within it is logged (by id) and attends only to
    itself.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=float)
    n = len(coords)
    if n < 2:
        return torch.zeros((2, 0), dtype=torch.long)
    tree = cKDTree(coords)
    k = min(neighbours + 1, n)
    dist, idx = tree.query(coords, k=k)
    nearest = np.median(dist[:, 1]) if k > 1 else 0.0
    limit = np.inf if radius is None or nearest == 0 else radius * nearest
    src, dst = [], []
    for i in range(n):
        for d, j in zip(dist[i, 1:], idx[i, 1:]):
            if d <= limit and j != i:
                src += [i, j]
                dst += [j, i]
    edges = np.unique(np.array([src, dst], dtype=np.int64).reshape(2, -1), axis=1)
    degree = np.bincount(edges[0], minlength=n) if edges.size else np.zeros(n, int)
    isolated = np.flatnonzero(degree == 0)
    if len(isolated):
        names = [str(spot_ids[i]) for i in isolated[:5]] if spot_ids is not None else isolated[:5].tolist()
        log.warning("%d spot(s) have no neighbour within radius %.3g (%s x the median nearest-neighbour distance): "
                    "%s%s; each attends only to itself (self-loops).", len(isolated), limit, radius, names,
                    " ..." if len(isolated) > 5 else "")
    return torch.from_numpy(edges)


@dataclass
class SpotData:
    """The spots of one stage: features, targets, positions, slides and the spot graph."""

    features: np.ndarray  # spots x features, float32
    targets: np.ndarray  # spots x genes, float32
    genes: list[str]
    coords: np.ndarray  # spots x 2
    slides: np.ndarray  # slide name of each spot
    spot_ids: np.ndarray
    stage: str = "spatial"
    source: str = ""
    cells_per_spot: np.ndarray | None = None
    neighbours: int = 6
    radius: float | None = 1.5
    _graphs: dict = field(default_factory=dict, init=False, repr=False)
    _hash: str | None = field(default=None, init=False, repr=False)

    @property
    def slide_names(self) -> list[str]:
        return list(dict.fromkeys(self.slides.tolist()))

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = fingerprint(content_hash(self.features), content_hash(self.targets), self.genes,
                                     content_hash(self.coords), self.slides.tolist())
        return self._hash

    def positions(self, slide: str) -> np.ndarray:
        return np.flatnonzero(self.slides == slide)

    def graph(self, slide: str) -> torch.Tensor:
        """The slide's spot graph (edges between its spots, numbered within the slide)."""
        if slide not in self._graphs:
            idx = self.positions(slide)
            self._graphs[slide] = spot_graph(self.coords[idx], neighbours=self.neighbours, radius=self.radius,
                                             spot_ids=self.spot_ids[idx])
        return self._graphs[slide]

    def neighbour_mean(self, features: np.ndarray | None = None) -> np.ndarray:
        """Mean features of each spot's graph neighbours (its own features when it has none)."""
        features = self.features if features is None else features
        out = features.copy()
        for slide in self.slide_names:
            idx = self.positions(slide)
            edges = self.graph(slide).numpy()
            sums = np.zeros((len(idx), features.shape[1]))
            np.add.at(sums, edges[1], features[idx][edges[0]])
            degree = np.bincount(edges[1], minlength=len(idx)) if edges.size else np.zeros(len(idx), int)
            has = degree > 0
            out[idx[has]] = sums[has] / degree[has, None]
        return out

    def to_frame(self) -> pd.DataFrame:
        rows = {}
        for slide in self.slide_names:
            idx = self.positions(slide)
            row = {"spots": len(idx), "edges": int(self.graph(slide).shape[1])}
            if self.cells_per_spot is not None:
                row["cells per spot (mean)"] = float(self.cells_per_spot[idx].mean())
            row["mean target"] = float(self.targets[idx].mean())
            rows[slide] = row
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("slide")

    def summary(self) -> str:
        return (f"{self.stage} ({self.source}): {len(self.spot_ids)} spots on {len(self.slide_names)} slides, "
                f"{self.n_features} features, {len(self.genes)} genes")

    def __repr__(self) -> str:
        return self.summary()


@dataclass
class Study:
    """The bulk stage (pretraining; None for a real spatial file with a checkpoint of its own) and the spatial stage."""

    bulk: SpotData | None
    spatial: SpotData

    @property
    def shared_genes(self) -> list[str]:
        return [g for g in self.spatial.genes if self.bulk is not None and g in set(self.bulk.genes)]

    def to_frame(self) -> pd.DataFrame:
        rows = {}
        for stage in (self.bulk, self.spatial):
            if stage is not None:
                rows[stage.stage] = {"slides": len(stage.slide_names), "spots": len(stage.spot_ids),
                                     "features": stage.n_features, "genes": len(stage.genes),
                                     "genes in both stages": len(self.shared_genes)}
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("stage")

    def to_dict(self) -> dict:
        return {"stages": self.to_frame().to_dict(orient="index"), "spatial_slides": self.spatial.slide_names}

    def _repr_html_(self) -> str:
        return (f"<p><b>{self.spatial.summary()}</b></p>" + self.to_frame().to_html()
                + "<p>Spatial slides</p>" + self.spatial.to_frame().to_html(float_format="{:.2f}".format))

    def __repr__(self) -> str:
        return self.to_frame().to_string() + "\n" + self.spatial.to_frame().to_string()


def _check_targets(targets: np.ndarray, spot_ids, source: str) -> None:
    bad = ~np.isfinite(targets)
    if bad.any():
        spots = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{source}: the targets hold {int(bad.sum())} NaN/inf value(s) in {len(spots)} spot(s), e.g. "
                         f"{[str(spot_ids[i]) for i in spots[:5]]}. Every target must be finite: drop those spots "
                         "(adata = adata[np.isfinite(adata.X).all(axis=1)]) or fill the values.")


def select_genes(data: SpotData, genes: Sequence[str] | str | None) -> SpotData:
    """``data`` restricted to ``genes`` (a list or comma-separated names; empty keeps all)."""
    if isinstance(genes, str):
        genes = [g.strip() for g in genes.split(",") if g.strip()]
    if not genes:
        return data
    index = {g: i for i, g in enumerate(data.genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(genes)} requested gene(s) are not in {data.source}: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (first {min(5, len(missing))}). "
                         f"Available genes include {data.genes[:5]}; fix the names or drop them from genes=.")
    cols = [index[g] for g in genes]
    return SpotData(features=data.features, targets=data.targets[:, cols], genes=list(genes), coords=data.coords,
                    slides=data.slides, spot_ids=data.spot_ids, stage=data.stage, source=data.source,
                    cells_per_spot=data.cells_per_spot, neighbours=data.neighbours, radius=data.radius)


def _slide_names(n: int, kind: str) -> list[str]:
    if kind == "bulk":
        return [f"bulk{i + 1:02d}" for i in range(n)]
    return [f"{'ABCD'[i % 4]}{i // 4 + 1}" for i in range(n)]


def simulate(cells_path: str = "", *, cell_type_key: str = "bulk_labels", n_bulk_slides: int = 16,
             n_spatial_slides: int = 4, seed: int = 0, **overrides) -> Study:
    """Both stages, simulated from single cells as the module docstring says (``overrides``: :data:`DEFAULTS`)."""
    from scipy.ndimage import gaussian_filter
    from sklearn.decomposition import PCA

    from .cell_type import _features, read_adata

    cfg = {**DEFAULTS, **overrides}
    adata, source = read_adata(cells_path)
    if cell_type_key not in adata.obs:
        raise KeyError(f"cell_type_key={cell_type_key!r} is not a column of adata.obs in {source}. Columns are: "
                       f"{list(adata.obs.columns)}.")
    expression, gene_names, _ = _features(adata, "auto")
    E = expression.toarray() if hasattr(expression, "toarray") else np.asarray(expression)
    types = adata.obs[cell_type_key].astype(str).to_numpy()
    rng = np.random.default_rng(seed)

    n_a, n_b, shared = cfg["n_bulk_genes"], cfg["n_spatial_genes"], cfg["n_shared"]
    n_total = n_a + n_b - shared
    if n_total > E.shape[1]:
        raise ValueError(f"{source} has {E.shape[1]} genes; the simulation needs {n_total} "
                         f"(n_bulk_genes + n_spatial_genes - n_shared).")
    variance = E.var(axis=0)
    order = sorted(range(len(gene_names)), key=lambda g: (-variance[g], gene_names[g]))[:n_total]
    order = np.array(order)[rng.permutation(n_total)]
    genes_a, genes_b = order[:n_a], order[n_a - shared:]

    pcs = PCA(n_components=cfg["n_pcs"], random_state=seed).fit_transform(E - E.mean(axis=0))
    pcs = (pcs / pcs.std(axis=0)).astype(np.float32)

    pools = {"bulk": {}, "spatial": {}}
    for t in sorted(set(types)):
        members = rng.permutation(np.flatnonzero(types == t))
        pools["bulk"][t] = members[0::2]
        pools["spatial"][t] = members[1::2] if len(members) > 1 else members
    counts_E = np.expm1(E)
    grid = cfg["grid"]
    xy = np.array([(x, y) for y in range(grid) for x in range(grid)], dtype=float)

    def stage(kind: str, n_slides: int, gene_idx: np.ndarray) -> SpotData:
        names = sorted(pools[kind])
        share = np.array([len(pools[kind][t]) for t in names], float)
        share /= share.sum()
        feats, targets, coords, slides, ids, ncells = [], [], [], [], [], []
        for slide in _slide_names(n_slides, kind):
            fields = np.stack([gaussian_filter(rng.normal(size=(grid, grid)), cfg["smoothness"], mode="reflect")
                               for _ in names])
            fields = (fields / fields.reshape(len(names), -1).std(axis=1)[:, None, None]).reshape(len(names), -1)
            weights = share[:, None] * np.exp(cfg["contrast"] * fields)
            composition = (weights / weights.sum(axis=0)).T  # spots x types
            lo, hi = cfg["cells_per_spot"]
            for s, (x, y) in enumerate(xy):
                n = int(rng.integers(lo, hi + 1))
                per_type = rng.multinomial(n, composition[s])
                chosen = np.concatenate([rng.choice(pools[kind][t], size=c) for t, c in zip(names, per_type) if c])
                noisy = pcs[chosen] + rng.normal(0, cfg["feature_noise"], (len(chosen), pcs.shape[1]))
                feats.append(noisy.mean(axis=0))
                targets.append(np.log1p(counts_E[np.ix_(chosen, gene_idx)].mean(axis=0))
                               + rng.normal(0, cfg["target_noise"], len(gene_idx)))
                coords.append((x, y))
                slides.append(slide)
                ids.append(f"{slide}_x{int(x):02d}_y{int(y):02d}")
                ncells.append(n)
        return SpotData(features=np.array(feats, np.float32), targets=np.array(targets, np.float32),
                        genes=[gene_names[g] for g in gene_idx], coords=np.array(coords), slides=np.array(slides),
                        spot_ids=np.array(ids), stage=kind, source=f"simulated from {source}",
                        cells_per_spot=np.array(ncells), neighbours=cfg["neighbours"], radius=cfg["radius"])

    return Study(bulk=stage("bulk", n_bulk_slides, genes_a), spatial=stage("spatial", n_spatial_slides, genes_b))


def read_visium(path: str | os.PathLike, *, features_key: str = "X_features", slide_key: str = "library_id",
                genes=None, neighbours: int = 6, radius: float | None = 1.5) -> SpotData:
    """Spots from a Visium-style .h5ad (scanpy / squidpy conventions).

    ``obsm['spatial']``: spot coordinates (pixels or microns; the graph radius is relative to the
    median spot spacing); ``obsm[features_key]``: input features per spot (e.g. image-patch
    embeddings); ``X`` / ``var_names``: target expression (log-normalised); ``obs[slide_key]``:
    the slide of each spot (absent: the whole file is one slide, named after its single
    ``uns['spatial']`` library, else the file). ``genes`` picks target genes (all when empty).
    """
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spatial_path={str(path)!r} does not exist. Give a Visium-style .h5ad, or '' to "
                                "simulate the slides.")
    adata = anndata.read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise KeyError(f"{path.name} has no obsm['spatial'] (spot coordinates); obsm keys: {list(adata.obsm)}. "
                       "scanpy.read_visium and squidpy store them there.")
    if features_key not in adata.obsm:
        raise KeyError(f"features_key={features_key!r} is not in obsm of {path.name}; obsm keys: {list(adata.obsm)}.")
    coords = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2]
    if slide_key in adata.obs:
        slides = adata.obs[slide_key].astype(str).to_numpy()
    else:
        libraries = list(adata.uns.get("spatial", {}))
        slides = np.full(adata.n_obs, libraries[0] if len(libraries) == 1 else path.stem, dtype=object).astype(str)
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    spot_ids = adata.obs_names.to_numpy().astype(str)
    data = SpotData(features=np.asarray(adata.obsm[features_key], np.float32), targets=np.asarray(X, np.float32),
                    genes=[str(g) for g in adata.var_names], coords=coords, slides=slides, spot_ids=spot_ids,
                    stage="spatial", source=path.name, neighbours=neighbours, radius=radius)
    data = select_genes(data, genes)
    _check_targets(data.targets, spot_ids, path.name)
    if not np.isfinite(data.features).all():
        raise ValueError(f"{path.name}: obsm[{features_key!r}] holds NaN/inf values; features must be finite.")
    return data


def write_visium(data: SpotData, path: str | os.PathLike, *, features_key: str = "X_features",
                 slide_key: str = "library_id") -> Path:
    """Write spots in the layout :func:`read_visium` reads (to try the loader on simulated slides)."""
    import anndata

    adata = anndata.AnnData(X=data.targets.copy(), obs=pd.DataFrame({slide_key: data.slides}, index=data.spot_ids),
                            var=pd.DataFrame(index=data.genes))
    adata.obsm["spatial"] = np.asarray(data.coords, float)
    adata.obsm[features_key] = data.features
    adata.write_h5ad(path)
    return Path(path)


def load(spatial_path: str = "", *, cells_path: str = "", cell_type_key: str = "bulk_labels",
         features_key: str = "X_features", slide_key: str = "library_id", genes="", n_bulk_slides: int = 16,
         n_spatial_slides: int = 4, sim_seed: int = 0, **overrides) -> Study:
    """The study: simulated stages, or the simulated bulk stage and a Visium-style spatial file."""
    study = simulate(cells_path, cell_type_key=cell_type_key, n_bulk_slides=n_bulk_slides,
                     n_spatial_slides=n_spatial_slides, seed=sim_seed, **overrides)
    if spatial_path:
        cfg = {**DEFAULTS, **overrides}
        study.spatial = read_visium(spatial_path, features_key=features_key, slide_key=slide_key, genes=genes,
                                    neighbours=cfg["neighbours"], radius=cfg["radius"])
    else:
        study.spatial = select_genes(study.spatial, genes)
    return study


# --------------------------------------------------------------------------- model


class SpotGNN(nn.Module):
    """One graph-attention layer over the spot graph, with a linear skip of the spot's own features."""

    def __init__(self, n_features: int, hidden: int, *, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        from torch_geometric.nn import GATConv

        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be a multiple of gat_heads={heads}.")
        self.conv = GATConv(n_features, hidden // heads, heads=heads, dropout=dropout, add_self_loops=True)
        self.skip = nn.Linear(n_features, hidden)

    def forward(self, x, edge_index):
        return F.elu(self.conv(x, edge_index) + self.skip(x))


class SpatialExpressionModel(nn.Module):
    """GNN -> projection -> transformer encoder (over a slide's spots) -> output projection."""

    head_prefixes = ("output",)
    #: Named strategies: which modules each one freezes (see :func:`workbench.apply_strategy`).
    strategies = {"frozen_backbone": ("gnn", "projection"), "frozen_decoder": ("gnn", "encoder")}

    def __init__(self, n_features: int, n_genes: int, *, layers: int = 2, hidden: int = 64, gat_heads: int = 2,
                 d_model: int = 64, heads: int = 4, ff: int = 128, dropout: float = 0.1):
        super().__init__()
        self.gnn = SpotGNN(n_features, hidden, heads=gat_heads, dropout=dropout)
        self.projection = nn.Sequential(nn.Linear(hidden, d_model), nn.LayerNorm(d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output = nn.Linear(d_model, n_genes)

    def forward(self, x, edge_index):
        h = self.projection(self.gnn(x, edge_index))
        return self.output(self.encoder(h.unsqueeze(0)).squeeze(0))

    def loss(self, batch):
        x, edges, y, mask = batch[:4]
        # the mean squared error over the spots in ``mask``, without boolean indexing (a host sync per step)
        err = torch.where(mask.unsqueeze(1), (self(x, edges) - y) ** 2, 0.0)
        return err.sum() / (mask.sum() * y.shape[1])


def build_model(data: SpotData, *, layers: int | None = None, **overrides) -> SpatialExpressionModel:
    """The model for ``data``'s features and genes (``layers``: spatial default, 2)."""
    cfg = {**DEFAULTS, **overrides}
    return SpatialExpressionModel(data.n_features, len(data.genes), layers=layers or cfg["spatial_layers"],
                                  hidden=cfg["hidden"], gat_heads=cfg["gat_heads"], d_model=cfg["d_model"],
                                  heads=cfg["heads"], ff=cfg["ff"], dropout=cfg["dropout"])


# --------------------------------------------------------------------------- batches


@dataclass
class Scaler:
    """Feature and target standardisation, fitted on training spots only."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray

    @classmethod
    def fit(cls, data: SpotData, idx) -> "Scaler":
        f, t = data.features[idx], data.targets[idx]
        return cls(f.mean(0), np.maximum(f.std(0), 1e-6), t.mean(0), np.maximum(t.std(0), 1e-6))


class SlideBatch(NamedTuple):
    """One slide: every spot goes through the graph model, the loss counts the spots ``mask`` keeps.

    ``n_items`` (the number of those spots) weights the slide's mean loss in the epoch's
    ``train_loss`` / ``val_loss`` (see :mod:`workbench.training`), so they are means over spots.
    """

    x: torch.Tensor
    edges: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    n_items: int


class SlideBatches:
    """One batch per slide: a :class:`SlideBatch` ``(features, edges, scaled targets, loss mask, n_items)``."""

    def __init__(self, data: SpotData, scaler: Scaler, slides: Sequence[str], mask: np.ndarray, *,
                 shuffle: bool = False, seed: int = 0):
        self.slides = [s for s in slides if mask[data.positions(s)].any()]
        self.items = {}
        for s in self.slides:
            idx = data.positions(s)
            x = (data.features[idx] - scaler.feature_mean) / scaler.feature_std
            y = (data.targets[idx] - scaler.target_mean) / scaler.target_std
            self.items[s] = SlideBatch(torch.from_numpy(x.astype(np.float32)), data.graph(s),
                                       torch.from_numpy(y.astype(np.float32)), torch.from_numpy(mask[idx]),
                                       int(mask[idx].sum()))
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.slides)

    def __iter__(self):
        order = torch.randperm(len(self.slides), generator=self.generator).tolist() if self.shuffle else range(len(self.slides))
        for i in order:
            yield self.items[self.slides[i]]


def predict(model, data: SpotData, scaler: Scaler, slides: Sequence[str]) -> np.ndarray:
    """Predicted targets (original units) of every spot; spots outside ``slides`` are NaN."""
    out = np.full(data.targets.shape, np.nan, dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for s in slides:
            idx = data.positions(s)
            x = torch.from_numpy(((data.features[idx] - scaler.feature_mean) / scaler.feature_std).astype(np.float32))
            pred = model(*to_model((x, data.graph(s)), model))
            out[idx] = to_numpy(pred) * scaler.target_std + scaler.target_mean
    return out


# --------------------------------------------------------------------------- pretraining


def _fit(model, data: SpotData, train_idx, val_idx, *, epochs, lr, patience, min_delta=0.0, strategy="full",
         seed=0, progress=False, callbacks=(), run=None, device="auto", dtype=None):
    from ..training import fit

    scaler = Scaler.fit(data, train_idx)
    train_mask = np.zeros(len(data.spot_ids), bool)
    train_mask[train_idx] = True
    val_mask = np.zeros(len(data.spot_ids), bool)
    val_mask[val_idx] = True
    slides = data.slide_names
    batches = SlideBatches(data, scaler, slides, train_mask, shuffle=True, seed=seed)
    val = SlideBatches(data, scaler, slides, val_mask) if val_mask.any() else None
    history = fit(model, batches, epochs=epochs, lr=lr, weight_decay=DEFAULTS["weight_decay"], schedule="constant",
                  strategy=strategy, val_data=val, monitor="val_loss" if val is not None else "train_loss",
                  patience=patience or None, min_delta=min_delta, restore_best=True, run=run, callbacks=callbacks,
                  progress=progress, seed=seed, log_every=1000, device=device, dtype=dtype)
    return history, scaler


def pretrain(study: Study, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto", dtype=None,
             **overrides) -> Path:
    """Train the bulk model (gene set A, ``bulk_layers`` layers); return ``pretrained.safetensors`` (cached).

    The last two bulk slides validate (early stopping). The fingerprint covers the bulk data's
    content, ``seed``, every setting in :data:`PRETRAIN_SETTINGS` and this module's source.
    """
    bulk = study.bulk
    if bulk is None or len(bulk.slide_names) < 3:
        raise ValueError("Pretraining needs a bulk stage of at least 3 slides (n_bulk_slides >= 3). Use "
                         "pretrained_checkpoint='none' (from scratch) or a checkpoint path.")
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS} | {"seed": seed, "objective": "bulk_expression"}
    settings.update(placement_key(device, dtype))
    key = fingerprint(bulk.content_hash, settings, code_version(__name__))

    def build(folder: Path) -> None:
        from ..tracking import Run

        torch.manual_seed(seed)
        model = build_model(bulk, layers=cfg["bulk_layers"], **cfg)
        val_slides = bulk.slide_names[-2:]
        val = np.flatnonzero(np.isin(bulk.slides, val_slides))
        train = np.flatnonzero(~np.isin(bulk.slides, val_slides))
        run = Run(folder / "run", params=settings)
        _fit(model, bulk, train, val, epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"],
             patience=cfg["pretrain_patience"], seed=seed, progress=progress, run=run, device=device, dtype=dtype)
        meta = {"task": "spatial_transfer", "stage": "bulk", "genes": bulk.genes, "fingerprint": key, **settings}
        save_weights(model, folder / "pretrained.safetensors", metadata=meta)

    describe = {"data": bulk.source, "data_hash": bulk.content_hash, "slides": len(bulk.slide_names), **settings}
    return cached("pretrain", key, build, root=cache_root, describe=describe) / "pretrained.safetensors"


def pretrained(study: Study, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True, cache_root=None,
               **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    return resolve_pretrained(pretrained_checkpoint,
                              lambda: pretrain(study, seed=seed, progress=progress, cache_root=cache_root, **overrides))


def load_report(model, source, *, run=None):
    """Load the bulk checkpoint into the spatial ``model``; the :class:`workbench.LoadReport`."""
    from ..transfer import load_pretrained

    return load_pretrained(model, source, run=run)


def report_table(report, source) -> pd.DataFrame:
    """What did not load, grouped by module: status, keys, parameter count and shapes (checkpoint and model).

    The core report lists unexpected keys without shapes; the shapes come from the checkpoint here.
    """
    from ..checkpoints import read_state_dict

    state = read_state_dict(source)
    rows = []
    for key, (ckpt, model_shape) in report.mismatched.items():
        rows.append({"status": "mismatched (skipped)", "key": key, "checkpoint_shape": tuple(ckpt),
                     "model_shape": tuple(model_shape), "params": math.prod(ckpt)})
    for key in report.unexpected:
        shape = tuple(state[key].shape)
        rows.append({"status": "unexpected", "key": key, "checkpoint_shape": shape, "model_shape": None,
                     "params": math.prod(shape)})
    for key in report.missing:
        rows.append({"status": "missing", "key": key, "checkpoint_shape": None, "model_shape": None, "params": 0})
    return pd.DataFrame(rows, columns=["status", "key", "checkpoint_shape", "model_shape", "params"])


def strategy_table(model) -> pd.DataFrame:
    """Trainable parameters per module under each named strategy of the model (it ends unfrozen).

    When the checkpoint left tensors at initialisation (e.g. the GNN's input weights, for spot
    features of another width), no strategy freezes them: the last row, ``kept trainable (not
    loaded)``, counts their parameters under each strategy.
    """
    from ..transfer import apply_strategy

    frames, kept = [], {}
    for name in ("full", "frozen_backbone", "frozen_decoder"):
        frame = apply_strategy(model, name).to_frame().set_index("module")
        frames.append(frame["trainable"].rename(name))
        kept[name] = int(frame["kept_trainable"].sum())
    apply_strategy(model, "full")
    table = pd.concat(frames, axis=1)
    table.loc["total"] = table.sum()
    if any(kept.values()):
        table.loc["kept trainable (not loaded)"] = pd.Series(kept)
    return table


# --------------------------------------------------------------------------- cross-validation


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in (value or [])]


def cv_splits(data: SpotData, *, cv: str = "loo", folds: int = 5, held_out="", seed: int = 0):
    """``[(fold name, train positions, test positions)]`` for ``cv="loo"`` (by slide) or ``"kfold"`` (by spot)."""
    from .. import splits

    if cv not in CV_KINDS:
        raise ValueError(f"cv={cv!r} is not one of {CV_KINDS}: 'loo' leaves one slide out, 'kfold' splits spots.")
    slides = data.slide_names
    if cv == "kfold":
        pairs = splits.kfold(data.slides, n_splits=folds, stratify=len(slides) > 1 and
                             min(np.unique(data.slides, return_counts=True)[1]) >= folds, seed=seed)
        return [(f"fold{i}", np.sort(train), np.sort(test)) for i, (train, test) in enumerate(pairs)]
    names = _names(held_out) or slides
    unknown = [n for n in names if n not in slides]
    if unknown:
        raise ValueError(f"held_out names slide(s) {unknown} that do not exist; the slides are {slides}.")
    counts = {s: len(data.positions(s)) for s in slides}
    single = [s for s, c in counts.items() if c < 2]
    if single:
        raise ValueError(f"cv='loo' needs at least 2 spots on every slide, but {single} hold(s) "
                         f"{[counts[s] for s in single]}: a slide of one spot is no test set and has no graph. "
                         "Drop it, merge it with another slide, or use cv='kfold'.")
    by_name = {name: (train, test) for name, train, test in splits.leave_one_group_out(data.slides)}
    return [(name, *by_name[name]) for name in names]


@dataclass
class CVResult:
    """Per-fold metrics of the model and of ridge regression, their summary, and each fold's predictions."""

    per_fold: pd.DataFrame
    summary: pd.DataFrame
    predictions: dict
    histories: dict
    strategy: str
    cv: str
    final: dict = field(default_factory=dict)

    def table(self) -> MetricsTable:
        metrics = ("mean_pearson", "pearson", "mse")
        model = {m: self.summary.loc[f"test_{m}", "mean"] for m in metrics}
        ridge = {m: self.summary.loc[f"baseline_test_{m}", "mean"] for m in metrics}
        return MetricsTable({f"model ({self.strategy})": model, "baseline (ridge regression)": ridge})

    def _repr_html_(self) -> str:
        return (f"<p><b>{self.cv}: {len(self.per_fold)} folds, mean ± std</b></p>"
                + self.summary.to_html(float_format="{:.4f}".format)
                + "<p>Per fold</p>" + self.per_fold.to_html(float_format="{:.4f}".format))

    def __repr__(self) -> str:
        return self.summary.to_string() + "\n" + self.per_fold.to_string()


def baseline(data: SpotData, train_idx, test_idx) -> np.ndarray:
    """Ridge regression on a spot's features and its neighbours' mean features; predictions for ``test_idx``."""
    from sklearn.linear_model import RidgeCV

    scaler = Scaler.fit(data, train_idx)
    x = (data.features - scaler.feature_mean) / scaler.feature_std
    inputs = np.concatenate([x, data.neighbour_mean(x)], axis=1)
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(inputs[train_idx], data.targets[train_idx])
    return ridge.predict(inputs[test_idx])


def _long_predictions(data: SpotData, idx, truth, pred) -> pd.DataFrame:
    n_genes = len(data.genes)
    return pd.DataFrame({"spot_id": np.repeat(data.spot_ids[idx], n_genes), "slide": np.repeat(data.slides[idx], n_genes),
                         "gene": np.tile(data.genes, len(idx)), "true": truth.ravel(), "predicted": pred.ravel()})


def cross_validate(study: Study, *, source=None, strategy: str = "frozen_backbone", cv: str = "loo", folds: int = 5,
                   held_out="", epochs: int = 150, learning_rate: float = 1e-3, patience: int = 20,
                   min_delta: float = 1e-3, seed: int = 0, run=None, callbacks=(), progress: bool = False,
                   device="auto", dtype=None, **overrides) -> CVResult:
    """Train and test the spatial model once per fold; per-fold files under ``<run>/folds/<fold>/``.

    Each fold: a fresh model (``spatial_layers`` layers, seeded), the checkpoint ``source``
    loaded (None: from scratch), ``strategy`` applied by :func:`workbench.fit`, early stopping on
    the validation spots, then test metrics (overall Pearson, mean per-gene Pearson, MSE) of the
    model and of :func:`baseline`. Writes ``metrics.json``, ``predictions.csv`` (spot ids) and
    ``curves.png`` per fold.
    """
    from ..plots import plot_history

    cfg = {**DEFAULTS, **overrides}
    data = study.spatial
    rows, predictions, histories, fold_models = {}, {}, {}, []
    for name, train, test in cv_splits(data, cv=cv, folds=folds, held_out=held_out, seed=seed):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # by name: a fold is the same in any run
        shuffled = rng.permutation(train)
        n_val = max(1, int(round(cfg["val_fraction"] * len(train))))
        val, fit_idx = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
        torch.manual_seed(seed)
        model = build_model(data, **cfg)
        if source is not None:
            load_report(model, source)
        history, scaler = _fit(model, data, fit_idx, val, epochs=epochs, lr=learning_rate, patience=patience,
                               min_delta=min_delta, strategy=strategy, seed=seed, progress=progress,
                               callbacks=callbacks, device=device, dtype=dtype)
        test_slides = list(dict.fromkeys(data.slides[test].tolist()))
        pred = predict(model, data, scaler, test_slides)[test]
        truth = data.targets[test]
        ours = regression_metrics(truth, pred, prefix="test_")
        base = regression_metrics(truth, baseline(data, fit_idx, test), prefix="baseline_test_")
        row = {"train_spots": len(fit_idx), "baseline_train_spots": len(fit_idx), "val_spots": len(val),
               "test_spots": len(test),
               "best_epoch": history.best_epoch, "epochs_run": len(history.rows)}
        row |= {k: ours[k] for k in ("test_pearson", "test_mean_pearson", "test_mse")}
        row |= {k: base[k] for k in ("baseline_test_pearson", "baseline_test_mean_pearson", "baseline_test_mse")}
        # genes predicted as a constant count as r = 0 in mean_pearson; how many there were
        row |= {"constant_genes": int(ours["test_constant_predictions"]),
                "baseline_constant_genes": int(base["baseline_test_constant_predictions"])}
        rows[name] = row
        predictions[name] = _long_predictions(data, test, truth, pred)
        histories[name] = history
        if run is not None and run.writes:  # under torchrun, rank 0 alone writes the run folder
            folder = run.path / "folds" / name
            folder.mkdir(parents=True, exist_ok=True)
            run.save_json(f"folds/{name}/metrics.json", {**row, "test_slides": test_slides,
                                                          "stop_reason": history.stop_reason})
            predictions[name].to_csv(folder / "predictions.csv", index=False)
            plot_history(history).savefig(folder / "curves.png", dpi=90, bbox_inches="tight")
            fold_models.append(_save_fold(run, name, model, scaler, test_slides, data.spot_ids[test], pred))
    if run is not None:
        save_predictor(run, data, fold_models, cfg)
    per_fold = pd.DataFrame.from_dict(rows, orient="index").rename_axis("fold")
    summary = fold_summary(per_fold, [c for c in per_fold.columns if c.startswith(("test_", "baseline_test_"))
                                      and c != "test_spots"])
    return CVResult(per_fold=per_fold, summary=summary, predictions=predictions, histories=histories,
                    strategy=strategy if source is not None else f"{strategy}, from scratch", cv=cv)


def evaluate(result: CVResult, *, run=None, extra: Mapping | None = None) -> CVResult:
    """Final metrics: each summary metric's mean over folds, and ``<metric>_std``; write final_metrics.json."""
    final = {}
    for metric, row in result.summary.iterrows():
        final[metric] = float(row["mean"])
        final[f"{metric}_std"] = float(row["std"])
    final["folds"] = len(result.per_fold)
    # spots the model and ridge regression were fit on, mean over folds
    final["n_train"] = float(result.per_fold["train_spots"].mean())
    final["baseline_n_train"] = float(result.per_fold["baseline_train_spots"].mean())
    final |= {k: float(v) for k, v in dict(extra or {}).items()}
    if run is not None:
        run.save_json("cv_summary.json", {"summary": result.summary.drop(columns="mean ± std").to_dict(orient="index"),
                                          "per_fold": result.per_fold.to_dict(orient="index")})
        final = run.finish(final)
    result.final = final
    return result



# --------------------------------------------------------------------------- prediction on new slides


def _save_fold(run, name: str, model, scaler: Scaler, test_slides, spot_ids, pred) -> dict:
    """One fold's model and scaler in ``folds/<name>/`` (for :class:`SpatialPredictor`), and its test predictions."""
    weights = f"folds/{name}/model.safetensors"
    if getattr(run, "writes", True):
        from ..transfer import unwrap

        save_weights(unwrap(model), run.path / weights)
    return {"name": name, "weights": weights, "test_slides": list(test_slides),
            "scaler": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in vars(scaler).items()},
            "test_spots": np.asarray(spot_ids).astype(str).tolist(), "_pred": pred}


def save_predictor(run, data: SpotData, folds: list[dict], cfg: Mapping):
    """Write what predicting on new slides needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the target genes, the number of spot features, the graph settings, the
    architecture, and per fold its weights (``folds/<fold>/model.safetensors``) and its scaler
    (feature and target means and standard deviations of its training spots). The test spots'
    predictions of every fold (each spot is tested once) go to ``test_predictions.csv``.
    """
    if run is None or not folds:
        return None
    settings = {k: cfg[k] for k in ("hidden", "gat_heads", "d_model", "heads", "ff", "dropout", "spatial_layers",
                                    "neighbours", "radius")}
    state = {"genes": list(data.genes), "n_features": int(data.n_features), "source": data.source, **settings,
             "folds": [{k: v for k, v in fold.items() if not k.startswith("_")} for fold in folds]}
    values = np.concatenate([fold["_pred"] for fold in folds])
    spots = [spot for fold in folds for spot in fold["test_spots"]]
    report = AlignmentReport(what="features", n_model=data.n_features, n_data=data.n_features,
                             matched=data.n_features, n_samples=len(spots))
    test = _predictions(values, spots, data.genes, report)
    return _save_predictor(run, None, task=__name__, state=state, test_predictions=test, weights="folds")


def _predictions(values: np.ndarray, spots, genes, report, *, source=None) -> Predictions:
    frame = pd.DataFrame(values, index=pd.Index(list(spots), name="spot"), columns=list(genes))
    return Predictions(frame, report=report, output="values", source=source, task=__name__)


class SpatialPredictor(Predictor):
    """A spatial run's fold models and scalers: predicts the target genes of the spots of new slides.

    Input: a Visium-style .h5ad (``obsm['spatial']`` coordinates, ``obsm[features_key]`` spot
    features with the run's number of columns, ``obs[slide_key]`` slides; ``X`` is not needed).
    Each slide's spots get their graph as in training. The prediction is the mean of the fold
    models' (each with its own scaler), or one fold's with ``fold=``.
    """

    accepts = ("anndata",)
    outputs = ("values",)

    def __init__(self, path, record):
        super().__init__(path, record)
        s = self.state
        self.genes, self.folds = list(s["genes"]), list(s["folds"])
        self.models = {}
        for fold in self.folds:
            model = SpatialExpressionModel(s["n_features"], len(self.genes), layers=s["spatial_layers"],
                                           hidden=s["hidden"], gat_heads=s["gat_heads"], d_model=s["d_model"],
                                           heads=s["heads"], ff=s["ff"], dropout=s["dropout"])
            from ..checkpoints import read_state_dict

            file = self.path / fold["weights"]
            if not file.is_file():
                raise PredictError(f"{self.path} names {fold['weights']} as the weights of fold {fold['name']}, but the "
                                   "file is gone. Run the notebook again into a new folder.")
            model.load_state_dict(read_state_dict(file))
            self.models[fold["name"]] = model.eval()

    def predict(self, data, *, output: str = "values", fold: str | None = None, features_key: str | None = None,
                slide_key: str | None = None) -> Predictions:
        """Predicted expression of the run's target genes for every spot of ``data`` (an AnnData or an .h5ad path)."""
        import anndata

        self.check_output(output)
        self.check_input(data)
        params = self._params()
        features_key = features_key or params.get("features_key", "X_features")
        slide_key = slide_key or params.get("slide_key", "library_id")
        adata = anndata.read_h5ad(data) if isinstance(data, (str, os.PathLike)) else data
        where = Path(data).name if isinstance(data, (str, os.PathLike)) else "the AnnData"
        if "spatial" not in adata.obsm:
            raise PredictError(f"{where} has no obsm['spatial'] (spot coordinates; obsm keys: {list(adata.obsm)}). "
                               "Give a Visium-style .h5ad (scanpy.read_visium / squidpy store them there).")
        if features_key not in adata.obsm:
            raise PredictError(f"{where} has no obsm[{features_key!r}], the spot features the model reads (obsm keys: "
                               f"{list(adata.obsm)}). Compute them as for training, or pass features_key=.")
        features = np.asarray(adata.obsm[features_key], np.float32)
        if features.shape[1] != self.state["n_features"]:
            raise PredictError(f"{where}: obsm[{features_key!r}] has {features.shape[1]} feature columns; the model "
                               f"reads {self.state['n_features']}. Compute the same features as for training.")
        chosen = list(self.models) if fold is None else [str(fold)]
        unknown = [f for f in chosen if f not in self.models]
        if unknown:
            raise PredictError(f"fold={fold!r} is not one of this run's folds ({', '.join(self.models)}).")
        slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key in adata.obs else \
            np.full(adata.n_obs, Path(where).stem, dtype=object).astype(str)
        spots = SpotData(features=features, targets=np.zeros((adata.n_obs, len(self.genes)), np.float32),
                         genes=self.genes, coords=np.asarray(adata.obsm["spatial"], float)[:, :2], slides=slides,
                         spot_ids=adata.obs_names.to_numpy().astype(str), source=where,
                         neighbours=self.state["neighbours"], radius=self.state["radius"])
        folds = {f["name"]: f for f in self.folds}
        values = np.zeros((adata.n_obs, len(self.genes)), dtype=np.float64)
        for name in chosen:
            scaler = Scaler(**{k: np.asarray(v, dtype=np.float32) if "mean" in k or "std" in k else v
                               for k, v in folds[name]["scaler"].items()})
            values += predict(self.models[name], spots, scaler, spots.slide_names)
        values = (values / len(chosen)).astype(np.float32)
        report = AlignmentReport(what="features", n_model=self.state["n_features"], n_data=features.shape[1],
                                 matched=features.shape[1], n_samples=adata.n_obs,
                                 notes=[f"{len(spots.slide_names)} slide(s); " + (
                                     f"the mean of {len(chosen)} fold models" if len(chosen) > 1
                                     else f"the model of fold {chosen[0]}")])
        return _predictions(values, spots.spot_ids, self.genes, report, source=adata)

    def _params(self) -> dict:
        import json

        file = self.path / "params.json"
        return json.loads(file.read_text()) if file.is_file() else {}
