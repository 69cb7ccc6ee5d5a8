"""The simulated world: both stages of spots made from single cells, as the package docstring's ground truth says."""

from __future__ import annotations

import numpy as np

from .data import SpotData, Study
from .defaults import DEFAULTS

__all__ = ["simulate"]


def _slide_names(n: int, kind: str) -> list[str]:
    if kind == "bulk":
        return [f"bulk{i + 1:02d}" for i in range(n)]
    return [f"{'ABCD'[i % 4]}{i // 4 + 1}" for i in range(n)]


def simulate(cells_path: str = "", *, cell_type_key: str = "bulk_labels", n_bulk_slides: int = 16,
             n_spatial_slides: int = 4, seed: int = 0, **overrides) -> Study:
    """Both stages, simulated from single cells as the module docstring says (``overrides``: ``DEFAULTS``)."""
    from scipy.ndimage import gaussian_filter
    from sklearn.decomposition import PCA

    from ...anndata_io import expression, read_adata

    cfg = {**DEFAULTS, **overrides}
    adata, source = read_adata(cells_path, parameter="cells_path")
    if cell_type_key not in adata.obs:
        raise KeyError(f"cell_type_key={cell_type_key!r} is not a column of adata.obs in {source}. Columns are: "
                       f"{list(adata.obs.columns)}.")
    matrix, gene_names, _ = expression(adata, "auto")
    E = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
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
