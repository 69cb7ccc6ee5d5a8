"""Mini-batches drawn by index: the one batch iterable the workflows build theirs on.

A workflow's data is usually a few arrays indexed by sample. :class:`IndexBatches` turns them
into an iterable of batches that :func:`workbench.fit` knows how to handle:

* it has a length (batches per epoch) and a ``generator`` (its shuffling RNG), so ``fit``
  checkpoints and restores the data order, and a resumed run sees the batches it would have seen;
* under ``torchrun`` it shards itself (``shard(rank, world_size)``): every rank draws the same
  permutation and keeps its share (:func:`workbench.distributed.shard_indices`), so the ranks
  together see each sample once per epoch, as with ``DistributedSampler``.

A subclass says how a batch is made from sample indices (:meth:`IndexBatches.take`).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .distributed import shard_indices

__all__ = ["IndexBatches", "TensorBatches"]


class IndexBatches:
    """Batches of ``batch_size`` samples out of ``n``, in order or shuffled by a seeded generator.

    Parameters
    ----------
    n
        Number of samples.
    batch_size
        Samples per batch (the last batch may be smaller).
    shuffle
        Draw a new permutation every epoch from ``generator``.
    seed
        Seed of ``generator``.
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        self.n, self.batch_size, self.shuffle = int(n), int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world_size = 0, 1

    def take(self, idx: np.ndarray):  # pragma: no cover - interface
        """The batch holding samples ``idx``."""
        raise NotImplementedError

    def shard(self, rank: int, world_size: int) -> IndexBatches:
        """This rank's batches under DDP (the same generator: every rank draws the same permutation)."""
        out = copy.copy(self)
        out.rank, out.world_size = rank, world_size
        return out

    def _samples(self) -> int:
        return self.n if self.world_size == 1 else math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        return math.ceil(self._samples() / self.batch_size)

    def __iter__(self):
        order = (torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)).numpy()
        order = shard_indices(order, self.rank, self.world_size)
        for start in range(0, len(order), self.batch_size):
            yield self.take(order[start:start + self.batch_size])


class TensorBatches(IndexBatches):
    """Batches of a tuple of tensors that share their first dimension: ``tuple(t[idx] for t in tensors)``."""

    def __init__(self, tensors, *, batch_size: int, shuffle: bool, seed: int = 0):
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"tensors must share their first dimension, got lengths {sorted(lengths)}.")
        super().__init__(lengths.pop(), batch_size=batch_size, shuffle=shuffle, seed=seed)
        self.tensors = tuple(tensors)

    def take(self, idx):
        idx = torch.as_tensor(idx)
        return tuple(t[idx] for t in self.tensors)
