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

__all__ = ["IndexBatches", "TensorBatches", "Prefetch"]


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


class Prefetch:
    """``batches``, built ``depth`` batches ahead by a background thread, in the same order (and pinned).

    What a DataLoader's workers and ``pin_memory`` give, for a batch iterable built in Python (the
    workflows' crops, padded sequences, sparse rows): the next batches are built while the model
    trains on this one, and with ``pin_memory`` their tensors are in page-locked memory, so that
    ``to(device, non_blocking=True)`` copies without blocking the host. One thread iterates
    ``batches`` as the loop would, so the batches, their order and the state of ``batches``'s own
    ``generator`` after an epoch are those of a plain pass: a resume restores the same data order.
    A batch iterable that draws from torch's *global* RNG would share it with the training thread:
    give it its own generator (the workflows' batches have one). Every other attribute (``generator``,
    ``batch_size``, ``shard``, ...) is that of ``batches``.

    Parameters
    ----------
    batches
        Any iterable of batches with a length.
    depth
        Batches built ahead (at least 1).
    pin_memory
        Put every tensor in pinned memory (only where CUDA is available; elsewhere ignored).
    """

    def __init__(self, batches, *, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth={depth!r} must be >= 1 (batches built ahead).")
        self.batches, self.depth = batches, depth
        self.pin_memory = pin_memory and torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name):
        if name == "batches":
            raise AttributeError(name)
        return getattr(self.batches, name)

    def shard(self, rank: int, world_size: int) -> Prefetch:
        return Prefetch(self.batches.shard(rank, world_size), depth=self.depth, pin_memory=self.pin_memory)

    def __iter__(self):
        import queue
        import threading

        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def offer(item) -> bool:
            """Put ``item`` in the queue unless the consumer stopped; False when it did."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.batches:
                    if not offer((_pinned(batch) if self.pin_memory else batch, None)):
                        return
                offer((done, None))
            except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
                offer((done, err))

        thread = threading.Thread(target=produce, name="workbench-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                batch, err = ready.get()
                if batch is done:
                    if err is not None:
                        raise err
                    return
                yield batch
        finally:
            stop.set()  # the loop stopped early (or finished): let the thread end
            thread.join()


def _pinned(batch):
    """``batch`` with every CPU tensor in pinned memory (see :func:`workbench.devices.map_tensors`)."""
    from .devices import map_tensors

    return map_tensors(batch, lambda t: t.pin_memory() if t.device.type == "cpu" else t)
