"""Single cells as workflows read them: scanpy's bundled pbmc68k_reduced or an .h5ad, and its expression matrix.

Two workflows start from single cells (cell-type annotation trains on them; spatial transfer simulates slides from
them), so reading them lives here, once:

- :func:`bundled_pbmc68k_reduced`: the file inside the scanpy package (found without importing scanpy);
- :func:`read_adata`: the AnnData at a path (or the bundled one for ``""``), in memory or backed;
- :func:`expression`: its log-normalised expression, ``adata.raw.X`` when present, else ``adata.X``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["bundled_pbmc68k_reduced", "read_adata", "expression"]


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


def read_adata(path: str = "", *, backed: bool = False, parameter: str = "data_path"):
    """The AnnData at ``path`` (scanpy's bundled pbmc68k_reduced when empty), and its name.

    With ``backed`` it is opened with ``backed="r"``: obs and var are read, X stays in the file. ``parameter`` is the
    notebook parameter that gave ``path``, for the error messages.
    """
    import warnings

    import anndata

    if not path:
        file, source = bundled_pbmc68k_reduced(), "pbmc68k_reduced (scanpy, bundled)"
    else:
        file, source = Path(path), Path(path).name
        if not file.exists():
            raise FileNotFoundError(f"{parameter}={path!r} does not exist. Give an .h5ad file, or '' for the bundled "
                                    "pbmc68k_reduced.")
        if file.suffix != ".h5ad":
            raise ValueError(f"{parameter}={path!r} is not an .h5ad file. Convert it with anndata "
                             "(adata.write_h5ad(...)).")
    with warnings.catch_warnings():  # pbmc68k_reduced predates .obsp and encoding metadata; anndata says so on read
        if not path:
            warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
            warnings.filterwarnings("ignore", category=anndata.OldFormatWarning)
        return anndata.read_h5ad(file, backed="r" if backed else None), source


def expression(adata, features: str = "auto"):
    """Expression ``(matrix, genes, where)``: ``adata.raw`` when present (``"auto"``) or asked (``"raw"``), else ``X``.

    In memory the matrix is float32 (CSR when sparse); a backed AnnData's stays on disk (CSR needed: streaming
    reads cells). ``where`` names it (``"adata.raw.X"`` or ``"adata.X"``).
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
