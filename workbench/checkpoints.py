"""Read and write model weights safely.

Writing
    Weights are written as ``.safetensors`` (no code can hide in them); their metadata goes into
    the same file (the safetensors header's ``__metadata__``), with a JSON copy beside it
    (``<name>.json``) for people and older readers. Every write is atomic: the bytes go to a
    temporary file in the same folder, which is then renamed over the target, so an interrupted
    run never leaves a half-written checkpoint behind, nor new weights beside old metadata
    (:func:`read_metadata` reads the metadata back).

Reading
    ``.safetensors`` directly; ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` through
    ``torch.load(weights_only=True)``, which refuses arbitrary Python objects. Nested checkpoints
    (Lightning's ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``) are
    unwrapped. Arbitrary pickle is only read with an explicit ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "CheckpointError",
    "resolve_pretrained",
    "atomic_write",
    "read_state_dict",
    "save_weights",
    "read_metadata",
    "save_state",
    "load_state",
]

#: Keys under which checkpoints written by common tools nest the actual weights.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
#: The key of the safetensors header's ``__metadata__`` under which ``save_weights`` keeps its metadata (JSON).
METADATA_KEY = "workbench_metadata"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message says why and what to do."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` in one step.

    The temporary file lives in the target folder so that the final ``os.replace`` is atomic
    on POSIX: readers see either the old file or the new one, never a partial write. The new
    file is flushed to the disk before the rename, and the folder after it, so that after a
    power loss ``path`` also holds the old file or the new one. A process killed during the
    write leaves a hidden ``.<name>.<random>.tmp`` file next to ``path``, never a partial ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give a new file:
    ``0o666`` minus the user's umask (``-rw-r--r--`` with the usual umask 022).

    Parameters
    ----------
    path
        The file to create or replace; its folder is created when missing.
    write
        Writes the complete new content to the file named by its one argument.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates the file as 0600
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(path.parent)
    return path


def _current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (another thread could create a file in between)
    os.umask(mask)
    return mask


def _fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's content to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to the disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders; the rename itself happened
        pass
    finally:
        os.close(fd)


def _plain_state(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"save_weights: value for key {key!r} is a {type(value).__name__}, not a tensor. "
                "safetensors stores tensors only; put other values into `metadata=`."
            )
        tensor = value.detach().cpu()
        # safetensors refuses tensors that share storage; clone the second and later ones.
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor.contiguous()
    return out


def save_weights(
    state: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike,
    *,
    metadata: Mapping | None = None,
) -> Path:
    """Write weights and their metadata as one safetensors file (atomically), plus a JSON copy of the metadata.

    The metadata is stored inside the file (the header's ``__metadata__``), so the weights and
    their metadata are replaced together, by one rename. The sidecar ``<path without
    suffix>.json`` is a copy for people and older readers: the previous one is removed once the
    new file is complete, just before it takes the old one's place, and the new one is written
    after. A process killed at any point leaves either the old weights or the new ones, each
    with its own metadata in the file and a sidecar that is its own or absent, never new weights
    beside old metadata. Read it back with :func:`read_metadata`.

    Parameters
    ----------
    state
        A module or a ``state_dict``.
    path
        Target file; ``.safetensors`` is appended when missing.
    metadata
        Any JSON-serialisable mapping (model config, training step, metrics).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    tensors = _plain_state(state)
    text = json.dumps(dict(metadata or {}), indent=2, default=str)
    sidecar = path.with_suffix(".json")

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={METADATA_KEY: text})
        sidecar.unlink(missing_ok=True)  # the old copy goes before the new weights replace the old ones

    atomic_write(path, write)
    if metadata is not None:
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text))
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata :func:`save_weights` stored with the weights at ``path`` ({} when there is none).

    Read from the safetensors header; for a file written before the metadata went there (or by
    another tool), from its ``.json`` sidecar.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
        if METADATA_KEY in header:
            meta = json.loads(header[METADATA_KEY])
            return meta if isinstance(meta, dict) else {}
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _unnest(obj, source: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside common checkpoint layouts."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    found = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"No weights found in {source}: expected a mapping of parameter names to tensors, "
        f"possibly nested under one of {NESTED_KEYS}; found {found}. "
        "Pass the state dict itself, or remap it with `key_map=`."
    )


def read_state_dict(
    source: str | os.PathLike | Mapping, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` mapping on the CPU.

    Parameters
    ----------
    source
        A path to ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``, or an in-memory
        state dict (possibly nested).
    trust_pickle
        Allow full pickle loading for checkpoints that hold Python objects besides tensors.
        Only do this for files whose origin you trust: unpickling can run arbitrary code.
    """
    if isinstance(source, Mapping):
        return _unnest(source, "the given mapping")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. Check the path.")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types here
        text = str(err)
        if "Weights only load failed" in text or "UnpicklingError" in type(err).__name__:
            if not trust_pickle:
                raise CheckpointError(
                    f"Refused to load {str(path)!r}: it contains Python objects besides tensors, "
                    "and unpickling them could run arbitrary code. If you trust where this file "
                    "came from, pass trust_pickle=True (e.g. load_pretrained(model, path, "
                    "trust_pickle=True)); better, re-save it as safetensors with "
                    "workbench.checkpoints.save_weights."
                ) from None
            obj = _load_full_pickle(path)
        else:
            raise CheckpointError(_corrupt_message(path, err)) from err
    return _unnest(obj, repr(str(path)))


def _load_full_pickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(_corrupt_message(path, err)) from err


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return False
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike
        raise CheckpointError(_corrupt_message(path, err)) from err


def _corrupt_message(path: Path, err: Exception) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (
        f"Could not read checkpoint {str(path)!r} ({size} bytes): {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. The file looks corrupted or truncated "
        "(an interrupted download or copy). Re-create it (re-run pretraining, or copy it again "
        "and compare its size/checksum with the original); accepted formats are .safetensors "
        "and torch .pt/.pth/.ckpt/.bin state dicts."
    )


def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` a resume state of tensors and plain Python values."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict:
    """Load a resume state written by :func:`save_state` (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(_corrupt_message(Path(path), err)) from err


def resolve_pretrained(pretrained_checkpoint: str, pretrain: Callable[[], Path]) -> Path | None:
    """What a workflow's ``pretrained_checkpoint`` parameter names: ``"pretrain"`` | ``"none"`` | a path.

    ``"pretrain"`` calls ``pretrain()`` (the workflow's cached pretraining step) and returns its
    checkpoint; ``"none"`` returns None (train from scratch); anything else must be an existing
    file, returned as a path, which fine-tuning loads as it would load the pretraining's own.
    """
    if pretrained_checkpoint == "none":
        return None
    if pretrained_checkpoint == "pretrain":
        return Path(pretrain())
    if not Path(pretrained_checkpoint).expanduser().exists():
        raise FileNotFoundError(
            f"pretrained_checkpoint={pretrained_checkpoint!r} is neither 'pretrain', 'none' nor an existing file. "
            "Give a .safetensors/.pt path, 'pretrain' to pretrain here, or 'none' to train from scratch.")
    return Path(pretrained_checkpoint).expanduser()
