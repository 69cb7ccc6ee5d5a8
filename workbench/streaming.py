"""Mini-batches streamed from a cells x genes matrix on disk (or in memory), never materialising it.

An atlas of millions of cells does not fit in memory. :class:`StreamingBatches` draws batches
from the rows of a matrix that stays where it is:

- an AnnData matrix read backed (``anndata.read_h5ad(path, backed="r")``: ``adata.X`` or
  ``adata.raw.X``, a CSR dataset in the HDF5 file, or a dense HDF5 dataset),
- or one in memory (``scipy.sparse`` CSR, ``numpy``), so that a small data set takes the same path.

How (the sampler is scdataset's, https://github.com/scDataset/scDataset)
    The cells are cut into blocks of ``block_size`` consecutive rows; the order of the blocks is
    shuffled, ``fetch_factor`` batches' worth of cells are read at once (sorted, so a fetch is
    a few contiguous reads of the file), shuffled within that buffer and cut into batches. A
    sparse matrix stays CSR until a batch is densified into a float32 tensor. Memory is one
    fetch (``batch_size * fetch_factor`` rows), whatever the number of cells.

Reproducible and resumable
    Each epoch's order comes from a seed drawn from ``generator`` (a ``torch.Generator`` seeded
    with ``seed``). :func:`workbench.fit` saves and restores a loader's ``generator`` in its
    resume state, so a resumed run sees the same order as an uninterrupted one.

:func:`scan` reads a matrix once in row chunks: a content hash (the same for a backed and an
in-memory read of one file) and the count of NaN/inf values.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .distributed import shard_indices

__all__ = ["StreamingBatches", "read_rows", "scan", "MatrixScan", "BLOCK_SIZE", "FETCH_FACTOR"]

#: Consecutive cells that stay together when the order is shuffled (anndata reads runs of more than 7 rows as slices).
BLOCK_SIZE = 64
#: Batches read from the file at once; their cells are shuffled together.
FETCH_FACTOR = 64
#: Rows per read when a whole matrix is scanned.
SCAN_ROWS = 32_768


def read_rows(matrix, idx: np.ndarray):
    """Rows ``idx`` (sorted, unique) of ``matrix`` as a CSR matrix or an ndarray, read as contiguous runs.

    A backed CSR dataset reads runs of consecutive rows as slices (anndata does this); a dense
    HDF5 dataset is read run by run here, since HDF5 point selection is slow.
    """
    import scipy.sparse as sp

    idx = np.asarray(idx, dtype=np.int64)
    if _is_h5_dataset(matrix):
        if len(idx) == 0:
            return np.empty((0, matrix.shape[1]), dtype=matrix.dtype)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        runs = zip(np.r_[0, breaks], np.r_[breaks, len(idx)])
        return np.concatenate([matrix[idx[a]:idx[b - 1] + 1] for a, b in runs])
    if getattr(matrix, "format", None) == "csr" and not sp.issparse(matrix):  # anndata's backed CSR dataset
        # a boolean mask makes anndata read each run of consecutive rows as one slice (an index array: row by row)
        mask = np.zeros(matrix.shape[0], dtype=bool)
        mask[idx] = True
        return matrix[mask]
    rows = matrix[idx]
    return rows.tocsr() if sp.issparse(rows) and rows.format != "csr" else rows


def _is_h5_dataset(matrix) -> bool:
    return type(matrix).__module__.startswith("h5py")


def densify(rows) -> torch.Tensor:
    """A CSR block or an array as a contiguous float32 tensor."""
    dense = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))


class StreamingBatches:
    """Shuffled (or ordered) mini-batches ``(x, y)`` from rows of a cells x genes matrix.

    Parameters
    ----------
    matrix
        Cells x genes: a backed AnnData matrix (``adata.X`` / ``adata.raw.X`` of
        ``read_h5ad(..., backed="r")``), a scipy CSR matrix or an ndarray.
    idx
        The cells (rows) to draw from; all rows when None. Taken in sorted order.
    labels
        One label per row of ``matrix`` (all rows, not only ``idx``); batches are ``(x, y)``
        with ``y`` a long tensor. Without labels a batch is ``(x,)``.
    batch_size
        Cells per batch.
    shuffle
        Block-shuffle each epoch (see the module docstring). Without it the cells come in
        sorted order (:attr:`cells`).
    seed
        Seeds :attr:`generator`, which draws each epoch's order.
    block_size, fetch_factor
        Consecutive cells kept together, and batches read at once (see the module docstring).
    drop_last
        Leave out the last, smaller batch of each fetch.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> X = sp.random(1000, 20, density=0.05, format="csr", dtype=np.float32, random_state=0)
    >>> batches = StreamingBatches(X, labels=np.arange(1000) % 3, batch_size=256, shuffle=True, seed=0)
    >>> len(batches), [tuple(x.shape) for x, y in batches]
    (4, [(256, 20), (256, 20), (256, 20), (232, 20)])
    """

    def __init__(self, matrix, idx=None, *, labels=None, batch_size: int, shuffle: bool = False, seed: int = 0,
                 block_size: int = BLOCK_SIZE, fetch_factor: int = FETCH_FACTOR, drop_last: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer, e.g. 256.")
        if block_size < 1 or fetch_factor < 1:
            raise ValueError(f"block_size={block_size!r} and fetch_factor={fetch_factor!r} must be positive integers.")
        n = matrix.shape[0]
        cells = np.arange(n, dtype=np.int64) if idx is None else np.unique(np.asarray(idx, dtype=np.int64))
        if len(cells) and (cells[0] < 0 or cells[-1] >= n):
            raise IndexError(f"idx holds rows outside 0..{n - 1} (the matrix has {n} rows).")
        if labels is not None and len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries; give one per row of the matrix ({n}).")
        self.matrix = matrix
        self.cells = cells
        self.labels = None if labels is None else torch.as_tensor(np.array(labels, dtype=np.int64))
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.block_size, self.fetch_factor = block_size, fetch_factor
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self._dataset(self.matrix, seed=0))

    def shard(self, rank: int, world_size: int) -> StreamingBatches:
        """This rank's batches under DDP (what :func:`workbench.fit` calls under torchrun).

        Each rank keeps every ``world_size``-th of the cells (padded to equal counts, as
        ``DistributedSampler`` does, so every rank yields the same number of batches) and
        block-shuffles them on its own; all ranks share :attr:`generator`, so their epochs stay in step.
        """
        out = copy.copy(self)
        out.cells = np.sort(shard_indices(self.cells, rank, world_size))
        return out

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def _dataset(self, collection, *, seed: int):
        try:
            from scdataset import scDataset
            from scdataset.strategy import BlockShuffling, Streaming
        except ImportError:
            raise ImportError("streaming batches need scdataset, a dependency of workbench: pip install -e . "
                              "(or pip install scdataset==0.3.0).") from None

        # self.cells is sorted: scdataset would sort (and warn about) unsorted indices
        strategy = BlockShuffling(block_size=self.block_size, indices=self.cells) if self.shuffle \
            else Streaming(indices=self.cells)
        return scDataset(collection, strategy, batch_size=self.batch_size, fetch_factor=self.fetch_factor,
                         drop_last=self.drop_last, fetch_callback=_fetch, batch_callback=_take, seed=seed,
                         rank=0, world_size=1)

    def _next_seed(self) -> int:
        """The seed of the next epoch's order, drawn from :attr:`generator`."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)) if self.shuffle else 0

    def epoch_order(self) -> np.ndarray:
        """The cells of the next epoch in the order they will come; reads no expression, leaves
        :attr:`generator` as it was."""
        state = self.generator.get_state()
        try:
            parts = [cells for _, cells in self._dataset(_IndexOnly(self.matrix.shape[0]), seed=self._next_seed())]
        finally:
            self.generator.set_state(state)
        return np.concatenate(parts) if parts else self.cells[:0]

    def __iter__(self):
        for rows, cells in self._dataset(self.matrix, seed=self._next_seed()):
            x = densify(rows)
            yield (x,) if self.labels is None else (x, self.labels[torch.from_numpy(cells)])


def _fetch(matrix, idx):
    """scdataset's fetch: the rows (sorted indices) and the indices themselves, to find the labels."""
    rows = read_rows(matrix, idx)
    if hasattr(rows, "toarray") and rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    return rows, np.asarray(idx, dtype=np.int64)


def _take(fetched, positions):
    rows, cells = fetched
    return rows[positions], cells[positions]


class _IndexOnly:
    """Stands in for a matrix when only the order of the cells is wanted."""

    def __init__(self, n: int):
        self.shape = (n, 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        return np.zeros((len(idx), 0), dtype=np.float32)


# --------------------------------------------------------------------------- one pass over a matrix


@dataclass
class MatrixScan:
    """What one pass over a matrix found.

    ``content_hash`` (SHA-256), ``n_nonfinite`` (NaN/inf values), ``whole_numbers`` (every stored
    value is a whole number >= 0, as in a count matrix) and ``max_value`` (the largest finite value).
    """

    content_hash: str
    n_nonfinite: int
    whole_numbers: bool = False
    max_value: float = 0.0

    @property
    def integer_counts(self) -> bool:
        """Whether the matrix looks like raw counts: whole numbers >= 0, some above 1 (0/1 data is not counts)."""
        return self.whole_numbers and self.max_value > 1


def scan(matrix, *, chunk_rows: int = SCAN_ROWS) -> MatrixScan:
    """Read ``matrix`` once in chunks of rows: its content hash, its NaN/inf values and whether it holds counts.

    The hash covers the shape and, per row, the non-zero positions and their float32 values, so a
    backed read and an in-memory read of the same file hash alike (as do CSR and dense layouts of the
    same values). Memory is one chunk.
    """
    import scipy.sparse as sp

    n_rows, n_cols = matrix.shape
    parts = {name: hashlib.sha256() for name in ("nnz per row", "gene indices", "values")}  # each streamed
    bad, whole, top = 0, True, 0.0
    for start in range(0, n_rows, chunk_rows):
        rows = matrix[start:min(start + chunk_rows, n_rows)]
        rows = sp.csr_matrix(rows, dtype=np.float32) if sp.issparse(rows) else \
            sp.csr_matrix(np.asarray(rows, dtype=np.float32))
        rows.sum_duplicates()
        rows.eliminate_zeros()
        finite = np.isfinite(rows.data)
        bad += int((~finite).sum())
        values = rows.data[finite]
        if len(values):
            whole = whole and bool((values >= 0).all() and (values == np.floor(values)).all())
            top = max(top, float(values.max()))
        for digest, part, dtype in zip(parts.values(), (np.diff(rows.indptr), rows.indices, rows.data),
                                       (np.int64, np.int64, np.float32)):
            digest.update(np.ascontiguousarray(part, dtype=dtype).tobytes())
    digest = hashlib.sha256(f"cells x genes:{n_rows}x{n_cols}".encode())
    for name, part in parts.items():
        digest.update(f"{name}:{part.hexdigest()}".encode())
    return MatrixScan(content_hash=digest.hexdigest(), n_nonfinite=bad, whole_numbers=whole, max_value=top)
