"""Spots: the two stages' data objects, the spot graph, and the Visium-style .h5ad reader and writer."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...cache import content_hash, fingerprint

__all__ = ["spot_graph", "SpotData", "Study", "select_genes", "read_visium", "write_visium"]

log = logging.getLogger(__package__)


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
