"""Grid sweeps over a parameterized notebook: parallel, resumable, failure-isolated.

A sweep is a YAML spec::

    name: lr_schedule
    notebook: notebooks/cell_type_annotation.ipynb   # relative to this file's folder or to the CWD
    parameters: {epochs: 5}                          # the same for every run
    grid: {lr_scheduler_type: [constant, cosine]}    # cartesian product
    seeds: [0, 1, 2]                                 # injected as the parameter `seed`
    metric: test_macro_f1                            # for the comparison figure
    output_root: runs/sweeps                         # default; relative to the CWD, or absolute

``grid`` may also be a list of such dicts (as in scikit-learn's ``ParameterGrid``): the runs are
the union of their products. ``seed`` may then be part of a grid instead of ``seeds``. ``name``
is one folder name (letters, digits and ``. _ - = , +``; not ``.`` or ``..``): the sweep folder
is ``<output_root>/<name>``.

Run folders
    Each run executes in its own folder ``<output_root>/<name>/<run_id>/``. The run id is a
    readable label plus a hash (``lr_scheduler_type=cosine,seed=0-1a2b3c4d``). The hash covers
    what defines the run: the sweep's name, the notebook's path relative to ``output_root``,
    and all the run's parameters (the fixed ones included). The same run always lands in the
    same folder, a different notebook or sweep name gives a different one, and moving the whole
    project (notebook and output folder together) keeps the ids.

Resuming
    A run counts as done once its ``status.json`` (written last, see :mod:`workbench.execute`)
    says ``ok``; running the sweep again executes only the runs that are missing or failed.

Notebook versions
    ``status.json`` records a hash of the notebook's code cells. When finished runs were made by
    an earlier version of the notebook (or by one that recorded no hash), the sweep keeps them,
    says how many (a :class:`StaleRunsWarning` and ``SweepResult.n_stale``), and runs them again
    only when asked: ``run_sweep(..., rerun_stale=True)`` or ``workbench sweep SPEC --rerun-stale``.

Failures
    A failed run never stops the others: a notebook error, a run that cannot start and a run
    whose ``status.json`` cannot be written (a full disk) all end up as ``failed`` rows with
    their error.

One driver per sweep folder
    While a sweep runs, its driver holds a lock on ``<sweep folder>/.sweep.lock`` (the file holds
    the driver's pid). A second driver started on the same folder stops at once with a
    :class:`SweepLockedError` that names that pid. The operating system drops the lock when the
    driver ends, however it ends, so a crashed driver never blocks the folder.

At the end the sweep folder holds ``results.csv`` (one row per run), ``summary.csv`` (mean and
std per setting, over seeds), ``spec.json`` (the spec it ran) and ``comparison.png``: the figure
the grid calls for (:mod:`workbench.sweep_plots`: the metric against a numeric grid parameter, else
grouped points). ``plot(result, x=..., hue=..., metric=...)`` draws it from Python.

Why this module is long: the spec, the run ids, the two executors (a local process pool and Dask) and the collection
of results must agree on one folder layout and on when a run counts as done, failed or stale; the longest parts, the
executors' signal handling (Ctrl-C, SIGTERM) and the one-driver lock, stay beside the loop they protect. The result
object and the folder reader are in :mod:`workbench.sweep_results`, the figure in :mod:`workbench.sweep_plots`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .sweep_plots import plot, save_figure
from .sweep_results import SweepResult, save_spec

__all__ = ["SweepSpec", "SweepResult", "SweepLockedError", "StaleRunsWarning", "load_spec", "run_sweep", "collect",
           "summarize", "run_id", "available_cpus", "plot", "THREAD_ENV_VARS"]

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")
SPEC_KEYS = ("name", "notebook", "parameters", "grid", "seeds", "metric", "output_root", "description")
EXECUTORS = ("local", "dask")
LOCK_FILE = ".sweep.lock"
NAME_CHARACTERS = "letters, digits and . _ - = , +"


class SweepLockedError(RuntimeError):
    """Another sweep driver is running on the same sweep folder; the message names its pid."""


class StaleRunsWarning(UserWarning):
    """Finished runs of a sweep were made by an earlier (or unknown) version of its notebook."""


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------


@dataclass
class SweepSpec:
    """A validated sweep specification (see the module docstring for the YAML form).

    Attributes
    ----------
    name
        Sweep name; also the folder under ``output_root``, so one folder name (see the module docstring).
    notebook
        Absolute path of the notebook.
    parameters
        Parameters shared by every run.
    grid
        List of ``{name: [values]}`` dicts; the runs are the union of their cartesian products.
    seeds
        Values of the ``seed`` parameter; empty when seeds are not swept separately.
    metric
        Final metric shown in the comparison figure; None picks the first numeric one.
    output_root
        Folder that holds the sweep folder.
    """

    name: str
    notebook: Path
    parameters: dict = field(default_factory=dict)
    grid: list[dict] = field(default_factory=list)
    seeds: list = field(default_factory=list)
    metric: str | None = None
    output_root: Path = Path("runs/sweeps")

    def __post_init__(self):
        _check_name(self.name)
        self.notebook = Path(self.notebook)
        self.output_root = Path(self.output_root)

    @property
    def path(self) -> Path:
        """The sweep folder ``<output_root>/<name>``."""
        return self.output_root / self.name

    @property
    def grid_keys(self) -> list[str]:
        """Names varied by the grid (without ``seed``), in order of first appearance."""
        keys: list[str] = []
        for block in self.grid:
            keys += [k for k in block if k != "seed" and k not in keys]
        return keys

    @property
    def notebook_key(self) -> str:
        """The notebook's path relative to ``output_root`` (both resolved), as it enters the run ids.

        Relative, so that moving the project (notebook and output folder together) keeps the ids.
        """
        notebook = Path(self.notebook).resolve()
        try:
            return Path(os.path.relpath(notebook, self.output_root.resolve())).as_posix()
        except ValueError:  # Windows: another drive has no relative path
            return notebook.as_posix()

    def runs(self) -> list[tuple[str, dict]]:
        """``[(run_id, params)]`` for every run of the sweep, duplicates removed, in grid order."""
        runs: dict[str, dict] = {}
        shown = [*self.grid_keys, "seed"]
        notebook = self.notebook_key
        for block in self.grid or [{}]:
            names = list(block)
            for values in itertools.product(*(block[n] for n in names)):
                for seed in self.seeds or [None]:
                    params = {**self.parameters, **dict(zip(names, values))}
                    if seed is not None:
                        params["seed"] = seed
                    runs.setdefault(run_id(params, shown=shown, sweep=self.name, notebook=notebook), params)
        return list(runs.items())


def load_spec(spec: str | os.PathLike | dict | SweepSpec, *, check_parameters: bool = True) -> SweepSpec:
    """Read and validate a sweep spec from a YAML file, a dict or a :class:`SweepSpec`.

    Parameters
    ----------
    spec
        Path of a YAML file, or its content as a dict.
    check_parameters
        Check every parameter name against the notebook's parameters cell and convert the values
        to the declared types (so ``1e-3`` read by YAML as a string becomes a float).

    Returns
    -------
    SweepSpec
    """
    if isinstance(spec, SweepSpec):
        return spec
    base = None
    if isinstance(spec, (str, os.PathLike)):
        import yaml

        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {str(spec)!r} does not exist (looked in {Path.cwd()}).")
        spec, base = yaml.safe_load(path.read_text()) or {}, path.resolve().parent
    if not isinstance(spec, dict):
        raise TypeError(f"a sweep spec is a mapping (YAML dict), got {type(spec).__name__}.")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"sweep spec has unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(SPEC_KEYS)}.")
    for key in ("name", "notebook"):
        if spec.get(key) is None or (key == "notebook" and not spec[key]):
            raise ValueError(f"sweep spec needs {key!r}; it has {', '.join(spec) or 'no keys'}.")
    name = str(spec["name"])
    _check_name(name)

    grid = spec.get("grid") or []
    grid = [grid] if isinstance(grid, dict) else grid
    if not isinstance(grid, list) or not all(isinstance(block, dict) for block in grid):
        raise ValueError("grid must be a dict of name -> list of values, or a list of such dicts; "
                         f"got {type(spec.get('grid')).__name__}.")
    for block in grid:
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}. "
                                 f"For one fixed value, use parameters: {{{key}: {values!r}}}.")
    seeds = spec.get("seeds") or []
    if not isinstance(seeds, list):
        seeds = [seeds]
    if seeds and any("seed" in block for block in grid):
        raise ValueError("'seed' is both in grid and in seeds: keep one of them.")
    parameters = dict(spec.get("parameters") or {})
    clash = [k for k in parameters if any(k in block for block in grid) or (k == "seed" and seeds)]
    if clash:
        raise ValueError(f"{', '.join(clash)} is set both in parameters and in grid/seeds: keep one of them.")

    result = SweepSpec(
        name=name,
        notebook=_find_notebook(spec["notebook"], base),
        parameters=parameters,
        grid=grid,
        seeds=seeds,
        metric=spec.get("metric"),
        output_root=Path(spec.get("output_root") or "runs/sweeps"),
    )
    if check_parameters:
        _check_parameters(result)
    return result


def _find_notebook(notebook: str, base: Path | None) -> Path:
    candidates = [Path(notebook)] if Path(notebook).is_absolute() else \
        [p for p in (base / notebook if base else None, Path.cwd() / notebook) if p is not None]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"notebook={notebook!r} not found; tried {tried}. Give a path relative to the "
                            "spec file's folder or to the folder you run the sweep from.")


def _check_parameters(spec: SweepSpec) -> None:
    """Check names and convert values against the notebook's parameters cell (raises ValueError)."""
    from .execute import coerce_parameters, notebook_parameters

    declared = notebook_parameters(spec.notebook)
    names = {**spec.parameters, **{k: None for block in spec.grid for k in block}}
    if spec.seeds:
        names["seed"] = None
    coerce_parameters(spec.notebook, dict.fromkeys(names), declared=declared)  # unknown names
    spec.parameters = coerce_parameters(spec.notebook, spec.parameters, declared=declared)
    spec.grid = [{k: [coerce_parameters(spec.notebook, {k: v}, declared=declared)[k] for v in values]
                  for k, values in block.items()} for block in spec.grid]
    spec.seeds = [coerce_parameters(spec.notebook, {"seed": s}, declared=declared)["seed"] for s in spec.seeds]
    _check_values(spec, declared)


def _check_values(spec: SweepSpec, declared: dict) -> None:
    """Check every run of the grid against the workflow's declared constraints, before any run begins."""
    from .execute import check_values
    from .params import ParameterError
    from .workflow import workflow_of

    workflow = workflow_of(spec.notebook)
    of = f" ({workflow.name} workflow)" if workflow is not None else ""
    runs = spec.runs()
    bad = []
    for rid, params in runs:
        try:
            check_values(spec.notebook, params, declared=declared, where=f"sweep {spec.name!r}, run {rid}{of}")
        except ParameterError as err:
            bad.append(err)
    if bad:
        more = f" ({len(bad)} of {len(runs)} runs have values that are not accepted; no run was started.)"
        raise ParameterError(bad[0].problems, where=bad[0].where + more)


def run_id(params: dict, *, shown: list[str] | None = None, sweep: str | None = None,
           notebook: str | None = None) -> str:
    """Stable, filesystem-safe folder name for a run: ``<readable part>-<hash>``.

    The hash covers ``params``, ``sweep`` and ``notebook``, so runs with equal parameters in
    different sweeps, or of different notebooks, get different ids.

    Parameters
    ----------
    params
        All parameters of the run: the sweep's fixed parameters and the run's own.
    shown
        Names whose values make up the readable part (those present in ``params``).
    sweep
        The sweep's name.
    notebook
        The notebook's path as the sweep knows it (:attr:`SweepSpec.notebook_key`: relative to
        ``output_root``).

    Examples
    --------
    >>> run_id({"lr": 0.1, "seed": 0}, shown=["seed"], sweep="lr_schedule",
    ...        notebook="../../notebooks/cell_type_annotation.ipynb")
    'seed=0-644659ed'
    """
    defines_the_run = {"sweep": sweep, "notebook": notebook, "parameters": params}
    digest = hashlib.sha1(json.dumps(defines_the_run, sort_keys=True, default=str).encode()).hexdigest()[:8]
    readable = ",".join(f"{k}={params[k]}" for k in (shown or []) if k in params)
    readable = _safe(readable)[:80]
    return f"{readable}-{digest}" if readable else digest


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _check_name(name: str) -> None:
    """A sweep name must be one folder name, so that the sweep folder stays inside ``output_root``."""
    if not isinstance(name, str) or name in ("", ".", "..") or _safe(name) != name:
        raise ValueError(
            f"name={name!r} cannot be a sweep name: the sweep's runs go into the folder <output_root>/<name>, "
            f"so the name must be one folder name. Accepted: {NAME_CHARACTERS} (not empty, not '.' or '..', "
            "no path separators), e.g. name: lr_schedule. To put the sweep elsewhere, set output_root.")


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


def run_sweep(
    spec: str | os.PathLike | dict | SweepSpec,
    *,
    workers: int = 1,
    executor: Literal["local", "dask"] = "local",
    scheduler: str | None = None,
    kernel_name: str = "workbench",
    timeout: float | None = None,
    progress: bool = True,
    rerun_stale: bool = False,
) -> SweepResult:
    """Run every not-yet-completed run of a sweep, then write ``results.csv``, ``summary.csv`` and the figure.

    Parameters
    ----------
    spec
        Path of the YAML spec, its content as a dict, or a :class:`SweepSpec`.
    workers
        Runs executed at the same time. Each run's kernel gets ``max(1, cpus // workers)`` threads
        through ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
        ``TORCH_NUM_THREADS`` (read the last one in a notebook with ``torch.set_num_threads``), where
        ``cpus`` is :func:`available_cpus` (the affinity mask, so taskset and Slurm limits count).
        ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` so idle threads do not spin.
    executor
        ``"local"``: a pool of ``workers`` spawned processes on this machine. ``"dask"``: tasks on a
        ``distributed`` cluster, the one at ``scheduler`` or a LocalCluster of ``workers``
        single-threaded processes that the sweep starts and stops.

        GPUs (local pool): worker ``k`` sees one GPU, ``CUDA_VISIBLE_DEVICES=gpus[k % len(gpus)]``,
        where ``gpus`` are the GPUs visible to the driver (its ``CUDA_VISIBLE_DEVICES``, else every
        ``/dev/nvidiaN``; see :func:`workbench.devices.worker_gpus`). With as many workers as GPUs each
        run has a GPU to itself; with more, the runs share them round-robin. Without GPUs nothing
        changes. A Dask cluster places its workers itself (dask-cuda's ``LocalCUDACluster`` gives each
        worker one GPU).
    scheduler
        Address of a running Dask scheduler (``tcp://host:8786``); only with ``executor="dask"``.
    kernel_name
        Jupyter kernel for the notebooks (installed for this Python when missing).
    timeout
        Seconds one cell may run before its run fails; None means no limit.
    progress
        Show a progress bar over runs.
    rerun_stale
        Also run again the finished runs that an earlier version of the notebook made (or a
        version that was not recorded). By default they are kept, and a
        :class:`StaleRunsWarning` says how many there are.

    Returns
    -------
    SweepResult
        A failed run never stops the others; it shows up in ``results`` with its error.

    Raises
    ------
    SweepLockedError
        When another sweep driver is running on the same sweep folder.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of {', '.join(EXECUTORS)}.")
    if scheduler is not None and executor != "dask":
        raise ValueError(f"scheduler={scheduler!r} needs executor='dask' (got executor={executor!r}).")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer, e.g. workers=2.")
    spec = load_spec(spec)
    from .execute import ensure_kernel, notebook_sha256, read_status

    with _sweep_lock(spec.path):
        ensure_kernel(kernel_name)  # once here, so that parallel workers never race to install it
        runs = spec.runs()
        notebook_version = notebook_sha256(spec.notebook)
        statuses = {rid: read_status(spec.path / rid) or {} for rid, _ in runs}
        stale = [rid for rid, _ in runs if _is_stale(statuses[rid], notebook_version)]
        if stale and not rerun_stale:
            warnings.warn(
                f"{len(stale)} finished run(s) of sweep {spec.name} were made by an earlier or unknown version of "
                f"{spec.notebook.name}; their results are kept. To run them again with the notebook as it is now, "
                "call run_sweep(..., rerun_stale=True) or `workbench sweep SPEC --rerun-stale`.",
                StaleRunsWarning, stacklevel=2)
        todo = [(rid, params) for rid, params in runs
                if not statuses[rid].get("ok") or (rerun_stale and rid in stale)]
        threads = max(1, available_cpus() // workers)
        # keep_warm: a worker keeps the next kernel warming while it runs this one, except for the last runs
        jobs = [dict(run_id=rid, notebook=str(spec.notebook), parameters=params,
                     output_dir=str((spec.path / rid).resolve()), kernel_name=kernel_name, timeout=timeout,
                     threads=threads, keep_warm=position < len(todo) - workers)
                for position, (rid, params) in enumerate(todo)]

        from tqdm.auto import tqdm

        outcomes: dict[str, dict] = {}
        with tqdm(total=len(runs), initial=len(runs) - len(todo), desc=spec.name, unit="run",
                  disable=not progress) as bar, _sigterm_as_interrupt():
            if jobs:
                run = _run_local if executor == "local" else _run_dask
                outcomes = run(jobs, workers=workers, scheduler=scheduler, on_done=lambda: bar.update(1))
        return collect(spec, n_executed=len(jobs), outcomes=outcomes)


def _is_stale(status: dict, notebook_version: str) -> bool:
    """A finished run whose status.json records another notebook version, or none."""
    return bool(status.get("ok")) and status.get("notebook_sha256") != notebook_version


@contextmanager
def _sweep_lock(folder: Path):
    """Hold ``<folder>/.sweep.lock`` for the block: one driver per sweep folder.

    ``flock`` locks belong to the open file, so the operating system releases them when the
    driver exits, however it exits: a dead driver never leaves a stale lock. The file holds the
    pid of the driver that holds the lock, for the message another driver gives. Without
    ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = handle.read().strip()
            holder = f"pid {pid}" if pid else "a process that has not written its pid yet"
            stop = f"stop it (kill {pid}; its completed runs are kept)" if pid else "stop it"
            raise SweepLockedError(
                f"the sweep folder {folder} is in use by another sweep driver ({holder}; lock file {path}). "
                f"Wait for that sweep to finish, or {stop}, then run this sweep again.") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.truncate(0)  # the pid of a driver that has ended would only mislead
    finally:
        handle.close()  # releases the lock


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, Slurm, containers), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _execute_job(job: dict) -> dict:
    """Run one sweep run (in a worker process): set the thread variables, then execute the notebook.

    A run that cannot execute (a bad value, a kernel that does not start) is recorded as failed
    in its ``status.json`` like a run whose notebook raised, so the sweep carries on. When even
    that record cannot be written (a full disk), the returned outcome carries the error.

    Returns
    -------
    dict
        ``{"ok": bool, "error": str | None}``. Only an interrupt (KeyboardInterrupt, SystemExit)
        raises; every failure of the run itself is an outcome.
    """
    from .execute import run_notebook
    from .kernels import worker_kernels

    for var in THREAD_ENV_VARS:
        os.environ[var] = str(job["threads"])  # the kernel inherits this environment
    # idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread that loses its core
    # makes every parallel region wait for a scheduler slice (measured: 128x128 matmul, 2 threads, busy
    # 2-core box: 13.5 ms ACTIVE vs 33 us PASSIVE). A value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        # overwrite: the sweep owns its run folders (a folder's name is the hash of what defines its run), so a
        # re-run replaces what a failed attempt, or an earlier notebook version with other defaults, left there
        # warm kernels: this run takes the kernel the worker warmed meanwhile (its own, fresh one), see workbench.kernels
        kernels = worker_kernels(job["kernel_name"])
        kernels.keep_next = job.get("keep_warm", True)
        result = run_notebook(job["notebook"], parameters=job["parameters"], output_dir=job["output_dir"],
                              kernel_name=job["kernel_name"], timeout=job["timeout"], overwrite=True,
                              kernels=kernels)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - recorded as the run's error; the sweep goes on
        error = f"the run could not execute or record its result: {type(err).__name__}: {err}"
    else:
        return {"ok": result.ok, "error": result.error}
    return _record_failure(job, error)


def _record_failure(job: dict, error: str) -> dict:
    """Write a failed ``status.json`` into the run's folder (the sweep then runs it again); returns the outcome."""
    from .execute import STATUS_FILE

    status = {"ok": False, "error": error, "failed_cell": None, "seconds": 0.0}
    try:
        out = Path(job["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / STATUS_FILE).write_text(json.dumps(status, indent=2))
    except Exception as err:  # noqa: BLE001 - the driver records it instead
        error += f"; could not write status.json: {type(err).__name__}: {err}"
    return {"ok": False, "error": error}


# local process pool ----------------------------------------------------------------------------

_BUSY = False


def _local_worker_init(gpu_slots=None) -> None:
    """Worker process setup: the driver decides about interrupts, SIGTERM ends the current run cleanly.

    ``gpu_slots``: a queue of ``CUDA_VISIBLE_DEVICES`` values, one per worker; this worker takes one
    (its kernels inherit it).
    """
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # a Ctrl-C reaches the driver too; it stops us
    signal.signal(signal.SIGTERM, _worker_sigterm)
    gpu = gpu_slots.get() if gpu_slots is not None else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _worker_sigterm(signum, frame):
    if _BUSY:
        raise KeyboardInterrupt  # unwinds papermill, which shuts the kernel down
    _close_warm_kernels()
    os._exit(128 + signum)


def _close_warm_kernels() -> None:
    from .kernels import close_worker_kernels

    close_worker_kernels()  # os._exit skips the exit handlers that would stop the spare kernel


def _local_job(job: dict) -> dict:
    global _BUSY
    _BUSY = True
    try:
        return _execute_job(job)
    except KeyboardInterrupt:
        _close_warm_kernels()
        os._exit(128 + signal.SIGTERM)  # leave the pool: never start another run after an interrupt
    finally:
        _BUSY = False


def _run_local(jobs: list[dict], *, workers: int, scheduler, on_done) -> dict[str, dict]:
    """Run the jobs in a pool of spawned processes; returns ``{run_id: outcome}`` (see :func:`_execute_job`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .devices import visible_gpus, worker_gpus

    context = multiprocessing.get_context("spawn")
    n_workers = min(workers, len(jobs))
    gpus = worker_gpus(n_workers, visible_gpus())
    gpu_slots = None
    if any(gpus):
        gpu_slots = context.Queue()
        for gpu in gpus:
            gpu_slots.put(gpu)
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=context, initializer=_local_worker_init,
                               initargs=(gpu_slots,))
    outcomes = {}
    try:
        futures = {pool.submit(_local_job, job): job["run_id"] for job in jobs}
        for future in as_completed(futures):
            outcomes[futures[future]] = future.result()
            on_done()
        return outcomes
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool) -> None:
    """Send SIGTERM to every worker (each shuts its kernel down), then kill those still alive."""
    processes = list((pool._processes or {}).values())  # no public API for this before Python 3.14
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=15)
        if process.is_alive():
            process.kill()


# dask ------------------------------------------------------------------------------------------


def _run_dask(jobs: list[dict], *, workers: int, scheduler: str | None, on_done) -> dict[str, dict]:
    """Run the jobs as Dask tasks; returns ``{run_id: outcome}`` (see :func:`_execute_job`).

    A worker process that dies (killed, out of memory) takes its run with it. The scheduler runs
    it again on another worker, up to ``distributed.scheduler.allowed-failures`` times (Dask's
    default: 3); after that the run is recorded as failed, with the reason, and the sweep goes on.
    Running the sweep again executes it once more; finished runs are kept and not run again.

    At most as many runs as the cluster has threads are submitted at a time, the next one when one
    ends. Dask would otherwise hand a worker a second run to queue behind the one it executes (a
    small group of tasks is not "root-ish", so it is not held back on the scheduler), and a worker's
    death would be charged to both.
    """
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(scheduler if scheduler is not None else cluster)
    futures = []
    outcomes = {}
    try:
        by_key = {_dask_key(job): job for job in jobs}
        waiting = iter(jobs)
        running = as_completed()

        def submit_next() -> None:
            job = next(waiting, None)
            if job is not None:
                future = client.submit(_execute_job, job, pure=False, key=_dask_key(job))
                futures.append(future)
                running.add(future)

        threads = sum(w.get("nthreads", 0) for w in client.scheduler_info().get("workers", {}).values())
        for _ in range(min(threads or len(jobs), len(jobs))):
            submit_next()
        for future in running:
            job = by_key[future.key]
            try:
                outcomes[job["run_id"]] = future.result()
            except Exception as err:  # noqa: BLE001 - KilledWorker and the like: the run is lost, the sweep goes on
                outcomes[job["run_id"]] = _record_failure(job, _lost_run_message(err))
            on_done()
            submit_next()
        return outcomes
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()


def _lost_run_message(err: Exception) -> str:
    if type(err).__name__ == "KilledWorker":
        return ("the Dask worker running this run died, on every try (killed, or out of memory): "
                f"{type(err).__name__}: {err}. Run the sweep again to retry it; the finished runs are kept. "
                "Raise distributed.scheduler.allowed-failures (dask config) for more retries within one sweep.")
    return f"the run's Dask task failed outside the notebook: {type(err).__name__}: {err}. Run the sweep again to retry it."


def _dask_key(job: dict) -> str:
    """Task key of a run: its id plus a hash of its folder, so that two sweeps sharing a cluster never share a task.

    Equal keys would make the scheduler hand one sweep the other's task: the run would execute only once.
    """
    folder_hash = hashlib.sha1(job["output_dir"].encode()).hexdigest()[:8]
    return f"workbench-run-{folder_hash}-{job['run_id']}"


class _sigterm_as_interrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only), so cleanup code runs."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def collect(spec: str | os.PathLike | dict | SweepSpec, *, n_executed: int = 0,
            outcomes: dict[str, dict] | None = None) -> SweepResult:
    """Read every run folder of the spec and write ``results.csv``, ``summary.csv`` and ``comparison.png``.

    Runs that have not finished are listed with status ``pending``. ``results.csv`` has one
    column per parameter and per final metric; a final metric whose name is taken by a parameter
    or a status column (spatial's ``folds``: the parameter asks for k folds, the metric counts
    those run) is kept as ``metric_<name>``.

    Parameters
    ----------
    spec
        Path of the YAML spec, its content as a dict, or a :class:`SweepSpec`.
    n_executed
        Runs executed by the caller, reported in the result.
    outcomes
        ``{run_id: {"ok": ..., "error": ...}}`` from the workers that ran them. Used for a run whose
        ``status.json`` could not be written or read, which is then ``failed`` with that error.
    """
    import pandas as pd

    from .execute import METRICS_FILE, STATUS_FILE, _read_json, notebook_sha256

    spec = load_spec(spec)
    outcomes = outcomes or {}
    notebook_version = notebook_sha256(spec.notebook)
    rows = []
    n_stale = 0
    param_names = list(dict.fromkeys(k for _, params in spec.runs() for k in params))
    for rid, params in spec.runs():
        folder = spec.path / rid
        status = _read_json(folder / STATUS_FILE)
        if not status and rid in outcomes:
            status = _status_from_outcome(outcomes[rid], folder / STATUS_FILE)
        if _is_stale(status, notebook_version):
            n_stale += 1
        row = {"run_id": rid, "status": ("ok" if status.get("ok") else "failed") if status else "pending",
               "error": status.get("error"), "failed_cell": status.get("failed_cell"), "seconds": status.get("seconds")}
        row.update({k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
                    for k, v in params.items()})
        metrics = _read_json(folder / METRICS_FILE) if status.get("ok") else {}
        # a final metric named like a parameter or a status column (spatial's `folds`) is kept as `metric_<name>`
        row.update({(f"metric_{k}" if k in row or k in param_names else k): v for k, v in metrics.items()})
        rows.append(row)
    results = pd.DataFrame(rows)
    results["failed_cell"] = results["failed_cell"].astype("Int64")
    metric_names = [c for c in results.columns if c not in param_names and c not in
                    ("run_id", "status", "error", "failed_cell", "seconds")]
    summary = summarize(results, by=spec.grid_keys, metrics=metric_names)

    spec.path.mkdir(parents=True, exist_ok=True)
    results.to_csv(spec.path / "results.csv", index=False)
    summary.to_csv(spec.path / "summary.csv", index=False)
    metric = _comparison_metric(spec.metric, summary)
    result = SweepResult(name=spec.name, path=spec.path, results=results, summary=summary,
                         n_failed=int((results["status"] == "failed").sum()), n_executed=n_executed, metric=metric,
                         n_stale=n_stale)
    save_spec(spec)  # so that `workbench report DIR` can show the spec from the folder alone
    if metric is not None and (results["status"] == "ok").any():
        try:
            save_figure(result, spec.path / "comparison.png")  # the figure the grid calls for (workbench.sweep_plots)
        except Exception as err:  # noqa: BLE001 - the tables are written; a figure must not cost the sweep
            warnings.warn(f"sweep {spec.name}: no comparison figure ({type(err).__name__}: {err}); "
                          f"results.csv and summary.csv are written. Try `workbench report {spec.path} --x NAME`.",
                          stacklevel=2)
    return result


def _status_from_outcome(outcome: dict, status_file: Path) -> dict:
    """The row of a run that has no readable status.json, from what its worker returned."""
    error = outcome.get("error")
    if outcome.get("ok"):  # the notebook ran, but its record is gone or unreadable
        error = f"the run finished, but {status_file} could not be read back"
    return {"ok": False, "error": error, "failed_cell": None, "seconds": None}


def summarize(results, *, by: list[str], metrics: list[str]):
    """Mean and std of each numeric metric per setting (the ``by`` columns), with run counts.

    Parameters
    ----------
    results
        Per-run table with a ``status`` column (ok / failed / pending).
    by
        Columns that define a setting; usually the grid parameters, everything but the seed.
    metrics
        Candidate metric columns; non-numeric ones are left out.

    Returns
    -------
    pandas.DataFrame
        ``setting``, the ``by`` columns, ``n``, ``n_failed``, ``<metric>_mean``, ``<metric>_std``.
    """
    import pandas as pd

    frame = results.copy()
    numeric = [m for m in metrics if m in frame and pd.api.types.is_numeric_dtype(frame[m])
               and not pd.api.types.is_bool_dtype(frame[m])]
    frame["_setting"] = frame.apply(lambda row: _setting_label(row, by), axis=1)
    rows = []
    for label, group in frame.groupby("_setting", sort=False):
        ok = group[group["status"] == "ok"]
        row = {"setting": label, **{k: group[k].iloc[0] for k in by}, "n": len(group),
               "n_failed": int((group["status"] == "failed").sum())}
        for m in numeric:
            row[f"{m}_mean"] = ok[m].mean()
            row[f"{m}_std"] = ok[m].std()
        rows.append(row)
    return pd.DataFrame(rows, columns=["setting", *by, "n", "n_failed",
                                       *[f"{m}_{s}" for m in numeric for s in ("mean", "std")]])


def _setting_label(row, by: list[str]) -> str:
    parts = [f"{k}={row[k]}" for k in by if k in row and not _is_missing(row[k])]
    return ",".join(parts) or "all"


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _comparison_metric(wanted: str | None, summary) -> str | None:
    available = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    if wanted is None:
        return available[0] if available else None
    if wanted in available:
        return wanted
    warnings.warn(f"metric={wanted!r} is not among the sweep's numeric final metrics "
                  f"({', '.join(available) or 'none yet'}); no comparison figure was drawn. "
                  "Set metric in the spec to one of them.", stacklevel=3)
    return None
