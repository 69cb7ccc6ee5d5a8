"""Where tensors live: the one way batches reach the model's device (and dtype), and results come back.

Every workflow runs the same code on the CPU and on a GPU. Three rules keep it that way:

* A model is placed once (:func:`place`, or :func:`workbench.fit` with ``device=`` / ``dtype=``);
  everything after that follows the model: :func:`to_model` moves a batch to where the model's
  parameters are, and casts its floating tensors to the model's dtype.
* Results leave the device in one place: :func:`to_numpy` (detach, CPU, float32 for half types).
* Random numbers are drawn on the device of the tensors they mix with (a generator of that device).

The ``dtype`` option is also a CPU check of the first rule (``dtype="float64"`` in a workflow
notebook): the model is cast to float64 and every batch that takes the device path with it, so a
batch that skips the path reaches the model as float32 and the model raises (``mat1 and mat2 must
have the same dtype``), exactly where, on a GPU, a CPU tensor would meet a CUDA model.

Device names: ``"auto"`` (or None) is ``cuda`` when CUDA is available, else the CPU; ``"cuda"`` is
this process's GPU (``cuda:LOCAL_RANK`` under torchrun, also inside a cached build on one rank);
``"cuda:N"`` under a torchrun of several processes also becomes ``cuda:LOCAL_RANK`` (each rank on
its own device). With ``WORKBENCH_DDP_BACKEND=gloo`` (``workbench run --nproc N --backend gloo``)
``"auto"`` is the CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .params import Constraint

__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype", "place", "placement", "to_device", "to_model",
           "to_numpy", "map_tensors", "cuda_rng_states_for", "set_deterministic", "visible_gpus", "worker_gpus", "DeviceName",
           "NOTEBOOK_DTYPES", "placement_key"]

#: What a notebook's ``device`` parameter accepts besides ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda")
#: What a notebook's ``dtype`` parameter accepts (``float64``: the CPU check of the device path).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Environment variable naming the process group's backend (``nccl`` | ``gloo``); set by ``workbench run --backend``.
BACKEND_VAR = "WORKBENCH_DDP_BACKEND"


def _torchrun_world() -> tuple[int, int] | None:
    """``(local_rank, world_size)`` when torchrun started this process with several ranks, else None."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` a ``device`` value names (see the module docstring), checked.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if os.environ.get(BACKEND_VAR) == "gloo" or not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N ({err}).") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available here (torch {torch.__version__}, "
                         f"cuda build {torch.version.cuda}). Use device='auto' (the CPU here) or device='cpu'.")
    world = _torchrun_world()
    if world is not None:  # each rank on its own GPU, whatever index was asked for
        index = world[0]
    elif device.index is None:
        index = torch.cuda.current_device()
    else:
        index = device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device cuda:{index} does not exist: {count} GPU(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
                         + ("Start at most that many processes (--nproc), or use --backend gloo for CPU processes."
                            if world is not None else f"Use cuda:0 .. cuda:{count - 1}, or device='auto'."))
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The :class:`torch.dtype` a ``dtype`` value names (``"float32"``, ``"float64"``, ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def place(model: torch.nn.Module, *, device: str | torch.device | None = "auto",
          dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """Move ``model`` (in place) to ``device`` and, when given, cast its floating tensors to ``dtype``; return it."""
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` of the model's first floating parameter (or buffer); the CPU and float32 without one."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def to_device(batch, device: torch.device | str, dtype: torch.dtype | None = None, *, non_blocking: bool = True):
    """``batch`` with its tensors on ``device`` and its floating tensors in ``dtype`` (when given).

    Walks nested dicts, lists, tuples and named tuples; other objects with a ``.to`` method (a
    graph batch, a padded sequence batch) are moved with ``.to(device)``, and their floating
    tensors are cast when they expose them as ``payload`` (pytorch-lifestream's PaddedBatch). A
    tensor already in place is returned as it is, so moving twice costs nothing.
    """
    def move(tensor):
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return tensor.to(device, non_blocking=non_blocking)

    return map_tensors(batch, move, other=lambda obj: obj.to(device) if hasattr(obj, "to") else obj)


def map_tensors(batch, fn, *, other=None):
    """``batch`` with ``fn(tensor)`` in place of every tensor, in nested dicts, lists, tuples, named tuples and
    padded sequence batches (``payload`` and ``seq_lens``); any other object goes through ``other`` (default: kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn, other=other) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [map_tensors(v, fn, other=other) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if hasattr(batch, "payload") and hasattr(batch, "seq_lens") and isinstance(batch.payload, dict):
        return type(batch)(map_tensors(batch.payload, fn, other=other), fn(batch.seq_lens))
    return other(batch) if other is not None else batch


def to_model(batch, model: torch.nn.Module):
    """``batch`` on the model's device, its floating tensors in the model's dtype (see :func:`placement`)."""
    return to_device(batch, *placement(model))


def to_numpy(tensor):
    """A tensor as a numpy array on the host (detached; bfloat16/float16 become float32)."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


# --------------------------------------------------------------------------- resume, determinism


def cuda_rng_states_for(saved: list, present: int) -> tuple[list, str]:
    """Which saved CUDA RNG states to restore on ``present`` GPUs, and a note when the counts differ.

    ``last.pt`` holds one state per GPU visible when it was written. State ``i`` goes back to
    GPU ``i`` for the GPUs both runs have; states of GPUs that are gone are dropped, GPUs that are
    new keep their own seeds. A resume on as many GPUs restores them all (the note is empty).
    """
    saved = list(saved)
    kept = saved[:present]
    if len(saved) == present:
        return kept, ""
    if len(saved) > present:
        return kept, (f"last.pt holds CUDA RNG states of {len(saved)} GPUs, {present} are visible now: restored the "
                      f"first {present}, dropped the rest (GPU random numbers differ from an uninterrupted run).")
    return kept, (f"last.pt holds CUDA RNG states of {len(saved)} GPUs, {present} are visible now: restored "
                  f"{len(saved)}, the others keep their own seeds.")


def set_deterministic() -> None:
    """Ask torch for deterministic kernels: cuDNN, ``use_deterministic_algorithms`` and the cuBLAS workspace.

    On the CPU the loop is already bit for bit reproducible; on a GPU, scatter (graph
    attention), embedding backward and cuDNN convolutions are not unless asked. An operation
    without a deterministic implementation then raises instead of varying silently (torch's
    own error names it). ``CUBLAS_WORKSPACE_CONFIG`` must be set before the first cuBLAS call:
    set it in the environment when CUDA was used earlier in the process.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- GPUs for processes


def visible_gpus(environ=None) -> list[str]:
    """The GPUs this process may hand out, without importing CUDA: ``CUDA_VISIBLE_DEVICES``'s entries when it
    is set (empty: none), else one per ``/dev/nvidiaN`` device file."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted((n[len("nvidia"):] for n in names if n.startswith("nvidia") and n[len("nvidia"):].isdigit()), key=int)


def worker_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each of ``workers`` sweep workers: round-robin over ``gpus``.

    Worker ``k`` gets ``gpus[k % len(gpus)]`` alone, so with as many workers as GPUs each run has
    a GPU to itself, and with more workers than GPUs they share them evenly. Without GPUs every
    worker gets None (its environment is left as it is).

    >>> worker_gpus(3, ["0", "1"])
    ['0', '1', '0']
    """
    if not gpus:
        return [None] * workers
    return [gpus[k % len(gpus)] for k in range(workers)]


# --------------------------------------------------------------------------- notebook parameters


@dataclass(frozen=True)
class DeviceName(Constraint):
    """A notebook's ``device`` parameter: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked where CUDA is, at use)."""

    #: The usual values, which the widget panel offers (``cuda:N`` may be typed besides).
    suggestions = ("auto", "cpu", "cuda")

    def describe(self) -> str:
        return "one of auto, cpu, cuda, or cuda:N (N a GPU index)"

    def problem(self, name, value):
        if isinstance(value, str) and (value in DEVICES or re.fullmatch(r"cuda:\d+", value) or value == "mps"):
            return None
        return f"{name}={value!r} is not {self.describe()}."


#: The ``dtype`` values a notebook accepts: float32 (what models train in), float64 (the CPU check of the device path).
NOTEBOOK_DTYPES = ("float32", "float64")


def placement_key(device: str | torch.device | None, dtype: str | torch.dtype | None) -> dict:
    """What a cached build's fingerprint adds for where it ran: nothing on the CPU in float32 (the keys of
    earlier entries stay valid); else the device type and the dtype, so a GPU or float64 build is its own entry."""
    kind = resolve_device(device).type
    name = str(resolve_dtype(dtype) or torch.float32).removeprefix("torch.")
    return {} if kind == "cpu" and name == "float32" else {"device": kind, "dtype": name}
