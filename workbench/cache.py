"""Results worth keeping between runs, reused only when everything that made them is equal.

A pretrained encoder is the typical case: a sweep over fine-tuning settings needs one per data
split, not one per run. Reuse by folder name alone once leaked one seed's pretraining (which had
seen most of another seed's test cells) into that other seed's run, so here an entry is found by
its **fingerprint**: a hash of everything that made it (the data's content, the exact training
indices, every parameter)::

    key = fingerprint(data_hash, train_idx, {"epochs": 100, "lr": 1e-3, "seed": 0})
    folder = cached("pretrain", key, build=lambda tmp: pretrain_into(tmp))

``cached`` returns ``<cache root>/pretrain/<key>/``. The first caller builds it in
``<key>.partial/`` (kept across interruptions, so ``build`` may resume from what it left there)
and renames it into place when ``build`` returns; a caller that finds the folder reuses it. A
file lock makes concurrent callers (sweep workers) wait for the one that builds instead of
building twice, and the rename keeps the entry whole even where locks do not reach (some
network filesystems). ``build`` runs with the random states kept: the caller's torch, numpy and
Python random numbers after ``cached`` are the same whether the entry was built or found.

The cache root is ``$WORKBENCH_CACHE`` when set, else ``runs/.cache`` under the working folder.
Deleting it is always safe: entries are built again when needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["cache_root", "fingerprint", "content_hash", "code_version", "cached", "file_lock"]

ENV_VAR = "WORKBENCH_CACHE"


def cache_root() -> Path:
    """``$WORKBENCH_CACHE``, else ``runs/.cache`` (relative to the working folder)."""
    return Path(os.environ.get(ENV_VAR) or Path("runs") / ".cache")


def content_hash(obj) -> str:
    """SHA-256 of an array's (or sparse matrix's) content, dtype and shape; of JSON for other values.

    Sparse CSR/CSC matrices hash their ``data``, ``indices`` and ``indptr``, so the result does not
    depend on how the matrix was read, only on its values and layout. Inside dicts, lists and
    tuples, arrays are hashed the same way (by content, never by numpy's ``str``, which elides
    all but the ends of an array over 1,000 elements) and numpy scalars keep their type
    (``np.int64(1)`` is not ``"1"``).
    """
    digest = hashlib.sha256()
    if hasattr(obj, "indptr") and hasattr(obj, "indices"):  # scipy.sparse compressed matrix
        digest.update(f"sparse:{obj.format}:{obj.shape}".encode())
        for part in (obj.data, obj.indices, obj.indptr):
            _update_array(digest, np.asarray(part))
    elif hasattr(obj, "__array__"):
        _update_array(digest, np.asarray(obj))
    else:
        digest.update(json.dumps(_plain(obj), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _plain(obj):
    """``obj`` as JSON holds it: arrays (at any depth) as their content hash, numpy scalars tagged with their dtype."""
    if isinstance(obj, np.generic):
        return {"numpy": obj.dtype.str, "value": _plain(obj.item())}
    if isinstance(obj, dict):
        return {key if isinstance(key, str) else f"{type(key).__name__}:{key!r}": _plain(value)
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    if (hasattr(obj, "indptr") and hasattr(obj, "indices")) or hasattr(obj, "__array__"):
        return {"array": content_hash(obj)}
    return obj


def _update_array(digest, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}:{array.shape}".encode())
    if array.dtype.hasobject:  # Python objects (strings, ...): by value, not by address
        digest.update(json.dumps(_plain(array.tolist()), sort_keys=True, default=str).encode())
    else:
        digest.update(memoryview(array).cast("B"))


def code_version(module_name: str) -> dict:
    """What version of the code made an entry: torch's version, a hash of the workbench core and of the module.

    The core is every module of the ``workbench`` package (``workbench/*.py``: the training
    loop, checkpoints, batches, ... that a build runs); the module is the task's own source
    file, or for a package (a task split into modules) every ``.py`` file under its folder.
    Put it into a fingerprint so that an edit to the pretraining code (a new objective, a
    fix in the training loop) builds the entry anew instead of reusing what the old code made.
    """
    import importlib

    import torch

    module = importlib.import_module(module_name)
    if hasattr(module, "__path__"):  # a package (a task split into modules): every module in its folder
        folder = Path(module.__file__).parent
        source = b"".join(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0"
                          for path in sorted(folder.rglob("*.py")))
    else:
        source = Path(module.__file__).read_bytes()
    package = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):  # the core a build runs: training, checkpoints, ...
        package.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"torch": torch.__version__, "workbench": package.hexdigest()[:16],
            module_name: hashlib.sha256(source).hexdigest()[:16]}


def fingerprint(*parts) -> str:
    """A short hex key of everything given: arrays by content, mappings and lists as JSON.

    Parameters
    ----------
    parts
        Whatever makes the cached result what it is, e.g. a data hash, the training indices and
        a dict of parameters. Dict order does not matter.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(content_hash(part).encode())
    return digest.hexdigest()[:20]


@contextmanager
def random_states_kept():
    """Leave torch's (CPU and current CUDA device), numpy's global and Python's random states as they were.

    A build seeds and draws random numbers; what the caller draws next must not depend on whether
    the entry was built now or found (a run alone and the same run after another must agree).
    """
    import random

    import torch

    numpy_state, python_state = np.random.get_state(), random.getstate()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (created if needed) for the duration of the block.

    The lock is ``fcntl.flock``: the system releases it when the holder dies, so a crashed
    worker never leaves a stale lock behind. Where fcntl does not exist (Windows), no lock is
    taken and the atomic rename in :func:`cached` alone keeps entries whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(
    kind: str,
    key: str,
    build: Callable[[Path], None],
    *,
    root: str | os.PathLike | None = None,
    describe: dict | None = None,
) -> Path:
    """The cache folder ``<root>/<kind>/<key>/``, built by ``build(folder)`` when it is missing.

    Parameters
    ----------
    kind
        A namespace, e.g. ``"pretrain"``.
    key
        The entry's fingerprint (see :func:`fingerprint`).
    build
        Called with the folder to fill (``<key>.partial``, which survives an interruption so that
        ``build`` can resume); renamed to ``<key>`` when it returns.
    root
        Cache root; default :func:`cache_root`.
    describe
        What made the entry, written to ``fingerprint.json`` in the folder for a person to read.

    Returns
    -------
    pathlib.Path
        The finished folder.
    """
    base = Path(root) if root is not None else cache_root()
    final = base / kind / key
    if final.is_dir():
        return final
    with file_lock(base / kind / f"{key}.lock"):
        if final.is_dir():  # another worker built it while this one waited
            return final
        partial = base / kind / f"{key}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        from .distributed import single_process

        with single_process(), random_states_kept():  # one process builds while the others wait on the lock
            build(partial)
        (partial / "fingerprint.json").write_text(json.dumps({"key": key, **(describe or {})}, indent=2, default=str))
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # built elsewhere meanwhile (no shared lock)
    return final
