"""Training on several processes: what :func:`workbench.fit` does under ``torchrun``.

The engine is torch.distributed (DistributedDataParallel), with gloo on the CPU and nccl on
GPUs. A script that calls ``wb.fit`` runs unchanged under::

    torchrun --nproc_per_node 2 train.py                          # one machine
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id job1 train.py  # several machines (run on each)

What changes when ``fit`` finds a process group (see :func:`context`):

* Each process trains on ``cuda:LOCAL_RANK`` when CUDA is available, else on the CPU (also
  ``fit(device="cuda:0")``: every rank on its own GPU). The backend is nccl with CUDA, gloo
  without; ``WORKBENCH_DDP_BACKEND=gloo`` (``workbench run --nproc N --backend gloo``) runs CPU
  processes on a GPU machine.
* The model is wrapped in DistributedDataParallel, so gradients are averaged across ranks.
* ``train_data``: a ``DataLoader`` over a map-style dataset is rebuilt with a
  ``DistributedSampler`` (same batch size *per process*, so the global batch is
  ``batch_size * world_size``; shuffling follows the original loader; seed ``fit(seed=...)``
  or 0; ``set_epoch`` every epoch). A loader that already has a ``DistributedSampler`` is used
  as it is. A batch iterable of one's own shards itself when it has a method
  ``shard(rank, world_size)`` returning this rank's batches (:func:`shard_indices` gives the
  indices; the workflows' batch classes do this). Anything else cannot be sharded by ``fit``
  and raises :class:`ShardingError`, unless it is wrapped in :class:`PerRank`, which says that
  each rank already yields its own shard (every rank must then yield the same number of batches).
* ``val_data`` (a map-style ``DataLoader``) is split across ranks without padding.
* Logged losses and metrics are averaged across ranks (weighted by samples) at the end of an
  epoch and at ``log_every`` steps; never per step. Validation runs rank 0's model (its
  BatchNorm buffers are broadcast first), and a metric returned as
  :class:`workbench.training.PerSample` is scored on the outputs gathered from every rank.
* Only rank 0 writes the run folder; other ranks never touch it. Rank 0 reads ``last.pt`` on
  resume and sends it to the others, so the run folder need not be on a shared disk.
* A rank that dies makes the others stop with :class:`RankFailedError`, naming the dead rank.
* Inside :func:`single_process` (what :func:`workbench.cache.cached` builds in: one rank builds a
  cache entry while the others wait for its lock), ``fit`` trains in this process alone.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

__all__ = ["DistContext", "context", "PerRank", "ShardingError", "RankFailedError", "TORCHRUN_VARS",
           "single_process", "shard_indices"]

#: The environment variables torchrun sets for every process.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective (and a barrier while rank 0 writes a checkpoint) may wait before it fails;
#: ``WORKBENCH_DDP_TIMEOUT_S`` overrides it when ``fit`` starts the process group itself.
DEFAULT_TIMEOUT_S = 600.0
#: Environment variable choosing the backend (``nccl`` | ``gloo``); ``workbench run --backend`` sets it.
BACKEND_VAR = "WORKBENCH_DDP_BACKEND"
#: Seconds the surviving ranks wait for each other after a collective failed, to name the missing ranks.
ROLL_CALL_S = 2.0


_SINGLE = contextvars.ContextVar("workbench_single_process", default=False)


@contextlib.contextmanager
def single_process():
    """Within the block, ``fit`` (with ``distributed=None``) trains in this process alone, even under torchrun.

    For work one rank does while the others wait (building a cache entry): a collective there
    would wait forever for ranks that are not training.
    """
    token = _SINGLE.set(True)
    try:
        yield
    finally:
        _SINGLE.reset(token)


def shard_indices(order, rank: int, world_size: int):
    """This rank's share of an epoch's sample ``order``: ``order[rank::world_size]`` after padding.

    As ``DistributedSampler`` does without ``drop_last``: the order is padded by repeating its
    start to a multiple of ``world_size``, so every rank gets the same number of samples (and
    batches); with one process it is ``order`` itself.
    """
    if world_size == 1:
        return order
    n = len(order)
    total = -(-n // world_size) * world_size
    if total > n:
        order = np.concatenate([np.asarray(order), np.resize(np.asarray(order), total - n)])
    return order[rank:total:world_size]


class ShardingError(ValueError):
    """``train_data`` cannot be split across ranks by ``fit``; the message says what to pass instead."""


class RankFailedError(RuntimeError):
    """Another rank died or stopped answering; the message names it and how to resume."""


class LauncherStopped(RuntimeError):
    """This process got SIGTERM from its launcher (torchrun stops every worker when one of them fails)."""


class PerRank:
    """Batches that each rank already shards itself (``fit`` uses them as they are under DDP).

    Every rank must yield the same number of batches per epoch; ``fit`` checks ``len`` on
    every rank before training.

    Parameters
    ----------
    batches
        Any iterable of batches with a length (this rank's shard).
    """

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name):  # batch_size, sampler, generator of the wrapped loader
        if name == "batches":
            raise AttributeError(name)
        return getattr(self.batches, name)


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size, its device."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the rank that writes the run folder (rank 0)."""
        return self.rank == 0

    def device(self, wanted=None) -> torch.device:
        """``wanted`` (see :func:`workbench.devices.resolve_device`; None: ``auto``); distributed, every CUDA
        device becomes ``cuda:LOCAL_RANK``: each rank trains on its own GPU, whatever index was asked for."""
        from .devices import resolve_device

        device = resolve_device(wanted)
        if self.enabled and device.type == "cuda" and device.index != self.local_rank:
            device = torch.device("cuda", self.local_rank)
        return device

    # ---- collectives (no-ops in one process)
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over ranks of a few numbers (one all_reduce)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        if self.enabled:
            for tensor in module.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into ``module`` on every rank.

        Under DDP the parameters stay equal, but each rank's running statistics follow its own
        batches; validation and the returned model use rank 0's.
        """
        if self.enabled:
            for tensor in module.buffers():
                torch.distributed.broadcast(tensor, src=0)

    # ---- data
    def shard_train(self, data, *, seed: int | None):
        """``data`` split across ranks (see the module docstring); ``data`` itself in one process."""
        if not self.enabled or isinstance(data, PerRank):
            return data
        if callable(getattr(data, "shard", None)):
            return data.shard(self.rank, self.world_size)
        loader = data
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise ShardingError(
                f"train_data is a {type(data).__name__}; under DDP (world size {self.world_size}) fit can split only "
                "a torch DataLoader over a map-style dataset (it rebuilds it with a DistributedSampler). Pass "
                "DataLoader(dataset, batch_size=...), or, when each rank already yields its own shard, wrap it: "
                "workbench.distributed.PerRank(train_data)."
            )
        from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

        sampler = loader.sampler if loader.batch_size is not None else loader.batch_sampler.sampler
        if isinstance(sampler, DistributedSampler):
            return loader
        if isinstance(loader.dataset, torch.utils.data.IterableDataset) or loader.batch_size is None or not \
                isinstance(sampler, (RandomSampler, SequentialSampler)):
            kind = ("an IterableDataset" if isinstance(loader.dataset, torch.utils.data.IterableDataset)
                    else "a custom batch_sampler" if loader.batch_size is None else f"a {type(sampler).__name__}")
            raise ShardingError(
                f"train_data is a DataLoader with {kind}; under DDP fit can split only a DataLoader with batch_size= "
                "and shuffle=True/False over a map-style dataset. Give the loader a DistributedSampler yourself, "
                "or wrap it in workbench.distributed.PerRank(...) when each rank already yields its own shard."
            )
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=isinstance(sampler, RandomSampler), seed=seed or 0,
                                     drop_last=loader.drop_last)
        return _rebuild(loader, sampler)

    def shard_eval(self, data):
        """A map-style validation ``DataLoader`` split across ranks without padding; other data as given."""
        if not self.enabled or not isinstance(data, torch.utils.data.DataLoader) or data.batch_size is None \
                or isinstance(data.dataset, torch.utils.data.IterableDataset):
            return data
        return _rebuild(data, _Shard(len(data.dataset), self.rank, self.world_size))

    # ---- failures
    @contextlib.contextmanager
    def watch(self, where):
        """Within the block, a failed collective or the launcher's SIGTERM becomes :class:`RankFailedError`.

        ``where()`` says where training was (``"epoch 2, step 19"``) for the message.
        """
        old = None
        if self.enabled:
            with contextlib.suppress(ValueError):  # ValueError: not the main thread, keep the handler
                old = signal.signal(signal.SIGTERM, _raise_launcher_stopped)
        try:
            yield
        except Exception as err:
            self.check_peers(err, where())
            raise
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    def check_peers(self, err: BaseException, where: str) -> None:
        """Raise :class:`RankFailedError` naming the missing ranks when ``err`` is a failed collective."""
        if not self.enabled or not _is_comm_error(err):
            return
        missing = _roll_call(self.rank, self.world_size)
        if missing is None:
            who = "rank 0 stopped answering (it hosts the rendezvous store, which no longer answers)"
        elif missing:
            who = ", ".join(f"rank {r}" for r in missing) + " stopped answering"
        elif isinstance(err, LauncherStopped):
            who = "no rank is missing, but the launcher stopped this process (Ctrl-C, or a failure it saw first)"
        else:
            who = "no rank is missing (every rank answered the roll call), so a collective timed out or was mismatched"
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise RankFailedError(
            f"rank {self.rank} of {self.world_size} stops at {where}: {who} ({first}). "
            "The last complete state is the run's checkpoints/last.pt (written at the end of every epoch): "
            "relaunch the same torchrun command, with the same number of processes, and resume=True."
        ) from err


def context(distributed: bool | None = None) -> DistContext:
    """This process's :class:`DistContext`, starting the process group from torchrun's variables if needed.

    Parameters
    ----------
    distributed
        None: distributed when a process group is initialised, or when torchrun's variables say
        ``WORLD_SIZE`` > 1. True: the same, but one process is an error. False: one process,
        even inside a process group (each rank then trains on its own).
    """
    import torch.distributed as dist

    if distributed is None and _SINGLE.get():
        return DistContext()
    if distributed is False or not dist.is_available():
        if distributed:
            raise RuntimeError("distributed=True, but this torch build has no torch.distributed.")
        return DistContext()
    if not dist.is_initialized():
        launched = all(name in os.environ for name in TORCHRUN_VARS)
        if not launched or (int(os.environ["WORLD_SIZE"]) == 1 and distributed is None):
            if distributed:
                missing = [name for name in TORCHRUN_VARS if name not in os.environ]
                raise RuntimeError(
                    f"distributed=True, but no process group is initialised and torchrun's variables {missing} are "
                    "not set. Launch the script with `torchrun --nproc_per_node N script.py`, call "
                    "torch.distributed.init_process_group() first, or pass distributed=None."
                )
            return DistContext()
        _init_from_env()
    if dist.get_world_size() == 1 and distributed is None:
        return DistContext()
    return DistContext(enabled=True, rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _init_from_env() -> None:
    import torch.distributed as dist

    timeout = float(os.environ.get("WORKBENCH_DDP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    backend = choose_backend()
    if backend == "nccl":
        local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: {count} GPU(s) are visible on this machine and nccl needs one "
                f"per process. Start at most {count} processes per machine (--nproc {count}), or run CPU "
                f"processes with gloo ({BACKEND_VAR}=gloo; `workbench run --backend gloo`).")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    atexit.register(_destroy)


def choose_backend(environ=None) -> str:
    """The process group's backend: ``$WORKBENCH_DDP_BACKEND`` (``nccl`` | ``gloo``), else nccl with CUDA, gloo without.

    gloo on a GPU machine means CPU processes: ``device="auto"`` is then the CPU (see :mod:`workbench.devices`).
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get(BACKEND_VAR, "").strip().lower()
    if wanted:
        if wanted not in ("nccl", "gloo"):
            raise ValueError(f"{BACKEND_VAR}={wanted!r} is not one of nccl, gloo.")
        if wanted == "nccl" and not torch.cuda.is_available():
            raise ValueError(f"{BACKEND_VAR}=nccl needs CUDA, which is not available here; use gloo.")
        return wanted
    return "nccl" if torch.cuda.is_available() else "gloo"


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class _Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once across ranks (no padding)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _rebuild(loader, sampler):
    """``loader`` with another sampler; every other setting kept."""
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        persistent_workers=loader.persistent_workers, **extra,
    )


def set_epoch(data, epoch: int) -> None:
    """Call ``set_epoch`` on the DistributedSampler of ``data``, if it has one."""
    sampler = getattr(data, "sampler", None)
    if not hasattr(sampler, "set_epoch"):
        sampler = getattr(getattr(data, "batch_sampler", None), "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _raise_launcher_stopped(signum, frame):
    raise LauncherStopped("this process got SIGTERM from its launcher")


def _is_comm_error(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, (LauncherStopped, getattr(dist, "DistError", ()))):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("gloo", "Connection closed by peer", "Connection reset", "NCCL", "Timed out"))


def _roll_call(rank: int, world_size: int) -> list[int] | None:
    """Ranks that do not check in within :data:`ROLL_CALL_S` (None when the store is gone).

    A launcher's SIGTERM (torchrun stops the other workers when one dies) is held back for
    these seconds, so that the message naming the dead rank reaches the log.
    """
    import torch.distributed as dist

    held = _hold_sigterm()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"workbench/alive/{rank}", "1")
        missing = [r for r in range(world_size) if r != rank]
        deadline = time.monotonic() + ROLL_CALL_S
        while missing and time.monotonic() < deadline:
            time.sleep(0.1)
            missing = [r for r in missing if not store.check([f"workbench/alive/{r}"])]
        return missing
    except Exception:  # noqa: BLE001  (the store itself died with its host)
        return None
    finally:
        if held is not None:
            signal.signal(signal.SIGTERM, held)


def _hold_sigterm():
    try:
        return signal.signal(signal.SIGTERM, lambda *_: None)
    except ValueError:  # not the main thread
        return None
