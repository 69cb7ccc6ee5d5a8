"""Run one parameterized notebook through papermill and keep a record of how it went.

:func:`run_notebook` is the single place where the workbench executes a notebook, for
``workbench run`` and for every run of a sweep::

    result = run_notebook("notebooks/cell_type_annotation.ipynb",
                          parameters={"learning_rate": "1e-3", "epochs": 2},
                          output_dir="runs/cell_type/try1")
    result.ok, result.error, result.final_metrics

The run folder then holds ``notebook.ipynb`` (the executed notebook), whatever the notebook
wrote itself (``params.json``, ``final_metrics.json``, figures, ...) and ``status.json``,
written last, which says whether the run completed. A run folder without ``status.json`` is a
run that was interrupted.

Parameter values are converted to the type the notebook's parameters cell declares
(``lr: float = 1.0e-3``) or, without an annotation, to the type of its default value, so
``"1e-3"`` from YAML or the command line reaches the notebook as the float ``0.001``.

A run folder holds one run (see :mod:`workbench.tracking`): before a kernel starts,
:func:`run_notebook` refuses a folder that holds a run with other parameters, unless
``overwrite=True``, so the earlier run's files (its executed notebook included) stay as they were.

:func:`run_in_process` runs the same notebook's code cells in this Python process, with the
same parameters: the widget panel's Train button and the tests use it, so the notebook is the
one definition of a workflow's steps.

Why this module is long: everything that decides how one notebook run goes is here, so that ``workbench run``, every
sweep run, the panel and the tests execute a notebook the same way: the parameters cell read and coerced, the run
folder checked, the kernel spec, papermill's failures (errors, timeouts, dead kernels) turned into ``status.json``,
and the in-process runner.
"""

from __future__ import annotations

import ast
import hashlib
import html
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernels import WarmKernels

__all__ = ["RunResult", "run_notebook", "run_in_process", "notebook_parameters", "notebook_defaults",
           "coerce_parameters", "ensure_kernel", "read_status", "notebook_sha256", "run_workflow"]

STATUS_FILE = "status.json"
METRICS_FILE = "final_metrics.json"
NOTEBOOK_FILE = "notebook.ipynb"

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


@dataclass
class RunResult:
    """What happened when a notebook ran.

    Attributes
    ----------
    ok
        True when every cell ran without an error.
    output_dir
        The run folder.
    notebook_path
        The executed notebook (``<output_dir>/notebook.ipynb``); it holds the outputs and the
        traceback of a failed cell.
    error
        One readable line for a failed run: the failing cell, its first source line, the exception
        type and message. None when the run succeeded.
    seconds
        Wall time of the run, kernel start included.
    final_metrics
        The notebook's ``final_metrics.json``, or an empty dict when it wrote none.
    failed_cell
        Position (1-based, counting every cell of the executed notebook) of the failing cell.
    parameters
        The parameters as injected, after type conversion.
    """

    ok: bool
    output_dir: Path
    notebook_path: Path
    error: str | None = None
    seconds: float = 0.0
    final_metrics: dict = field(default_factory=dict)
    failed_cell: int | None = None
    parameters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict of the result (paths as strings)."""
        return {
            "ok": self.ok,
            "output_dir": str(self.output_dir),
            "notebook_path": str(self.notebook_path),
            "error": self.error,
            "failed_cell": self.failed_cell,
            "seconds": round(self.seconds, 3),
            "parameters": dict(self.parameters),
            "final_metrics": dict(self.final_metrics),
        }

    def to_frame(self):
        """One-row DataFrame: status, seconds, error and each final metric as a column."""
        import pandas as pd

        row = {"status": "ok" if self.ok else "failed", "seconds": round(self.seconds, 3), "error": self.error}
        row.update(self.final_metrics)
        return pd.DataFrame([row], index=[str(self.output_dir)])

    def _repr_html_(self) -> str:
        status = "ok" if self.ok else "failed"
        lines = [f"<b>run {html.escape(status)}</b> in {self.seconds:.1f} s: <code>{html.escape(str(self.output_dir))}</code>"]
        if self.error:
            lines.append(f"<pre>{html.escape(self.error)}</pre>")
        if self.final_metrics:
            cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in self.final_metrics.items())
            lines.append(f"<table><tr><th>metric</th><th>value</th></tr>{cells}</table>")
        return "<br>".join(lines)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, dict]:
    """The parameters declared in the notebook's cell tagged ``parameters``.

    Parameters
    ----------
    notebook
        Path to the ``.ipynb`` file.

    Returns
    -------
    dict
        ``{name: {"type": "float" | "int" | "str" | "bool" | "list" | "dict" | None,
        "default": <source text>, "help": <trailing comment>}}``, in declaration order.
        ``type`` comes from the annotation (``lr: float = 1.0e-3``) or else from the default value;
        None when neither says.
    """
    import papermill

    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"notebook={str(notebook)!r} does not exist (looked in {Path.cwd()}).")
    found = papermill.inspect_notebook(str(path))
    return {
        name: {"type": _declared_type(info["inferred_type_name"], info["default"]),
               "default": info["default"], "help": info["help"]}
        for name, info in found.items()
    }


def notebook_defaults(notebook: str | os.PathLike, *, declared: dict[str, dict] | None = None) -> dict:
    """The default values of the notebook's parameters (those whose source is a plain literal)."""
    declared = notebook_parameters(notebook) if declared is None else declared
    out = {}
    for name, info in declared.items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            continue
    return out


def _declared_type(annotation: str, default: str) -> str | None:
    """'float' for ``lr: float = ...``, 'int' for ``epochs = 3``, None when unknown."""
    text = annotation.strip()
    if text and text != "None":
        text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
        text = re.sub(r"\s*\|\s*None$|^None\s*\|\s*", "", text)
        base = text.split("[", 1)[0].strip().lower()
        return {"list": "list", "tuple": "list", "dict": "dict"}.get(base, base if base in
                                                                       ("float", "int", "str", "bool") else None)
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return None
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"),
                       (tuple, "list"), (dict, "dict")):
        if isinstance(value, kind):
            return name
    return None


def prepare_run_folder(notebook: str | os.PathLike, parameters: dict, output_dir: str | os.PathLike, *,
                       overwrite: bool = False) -> tuple[dict, Path]:
    """Check ``parameters`` and the run folder before any work; return the converted values and the folder.

    Names, types (:func:`coerce_parameters`) and the workflow's constraints (:func:`check_values`)
    are checked; a folder holding a run with other parameters is refused unless ``overwrite``
    (then cleared); the folder is created, without the status and metrics an earlier attempt left.
    ``interactive`` is False unless given (a headless run shows no widget panel).
    """
    from .tracking import RunFolderError, check_run_folder, clear_run_folder

    declared = notebook_parameters(notebook)
    values = coerce_parameters(notebook, parameters, declared=declared)
    if "interactive" in declared:  # headless: no widget panel, no live plots, unless asked for
        values.setdefault("interactive", False)
    check_values(notebook, values, declared=declared)
    out = Path(output_dir).resolve()
    try:
        check_run_folder(out, {**notebook_defaults(notebook, declared=declared), **values})
    except RunFolderError:
        if not overwrite:
            raise
        clear_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (STATUS_FILE, METRICS_FILE):  # a folder describes one run: drop what an earlier attempt left
        (out / stale).unlink(missing_ok=True)
    return values, out


def check_values(notebook: str | os.PathLike, values: dict, *, declared: dict[str, dict] | None = None,
                 where: str | None = None) -> None:
    """Check ``values`` (over the notebook's defaults) against its workflow's declared constraints.

    The workflow's task module declares them as data (``PARAMETERS``, a :class:`workbench.params.Spec`);
    a notebook that names no workflow is checked for names and types only. Raises
    :class:`workbench.params.ParameterError` listing every value not accepted, before any work.
    """
    from .workflow import spec_of

    spec = spec_of(notebook)
    if spec is None:
        return
    merged = {**notebook_defaults(notebook, declared=declared), **values}
    spec.check(merged, where=where or Path(notebook).name)


def coerce_parameters(notebook: str | os.PathLike, parameters: dict | None, *,
                      declared: dict[str, dict] | None = None) -> dict:
    """Check parameter names against the notebook and convert values to the declared types.

    Parameters
    ----------
    notebook
        Path to the notebook (used for the declared parameters and in messages).
    parameters
        ``{name: value}``; values may be strings (from YAML or the command line).
    declared
        The result of :func:`notebook_parameters`, when the caller already has it.

    Returns
    -------
    dict
        The same names with converted values: ``"1e-3"`` becomes ``0.001`` for a float parameter,
        ``"3"`` becomes ``3`` for an int, ``"true"`` becomes True for a bool, a JSON string becomes a
        list or dict. Values of parameters whose type is unknown are passed unchanged.

    Raises
    ------
    ValueError
        For a name the notebook does not declare, or a value that does not convert.
    """
    declared = notebook_parameters(notebook) if declared is None else declared
    parameters = dict(parameters or {})
    unknown = [name for name in parameters if name not in declared]
    if unknown:
        listing = ", ".join(f"{n} ({d['type'] or 'any'}, default {d['default']})" for n, d in declared.items())
        raise ValueError(
            f"{', '.join(map(repr, unknown))} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'} "
            f"of {Path(notebook).name}. Its parameters cell declares: {listing or '(nothing: no cell tagged parameters)'}. "
            f"Check the spelling, or add the parameter to the notebook's cell tagged 'parameters'."
        )
    return {name: _coerce(name, value, declared[name]["type"], notebook) for name, value in parameters.items()}


def _coerce(name: str, value: Any, kind: str | None, notebook) -> Any:
    if value is None or kind is None:
        return value
    try:
        if kind == "str":
            return value if isinstance(value, str) else str(value)
        if kind == "bool":
            return _to_bool(value)
        if kind == "int":
            return _to_int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("a bool is not a number")
            return float(value)
        if kind in ("list", "dict"):
            if isinstance(value, str):
                value = json.loads(value)
            wanted = list if kind == "list" else dict
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, wanted):
                raise ValueError(f"got a {type(value).__name__}")
            return value
    except (ValueError, TypeError) as err:
        example = {"float": "1.0e-3", "int": "3", "bool": "true", "list": "'[1, 2]' (JSON)",
                   "dict": "'{\"a\": 1}' (JSON)"}.get(kind, "")
        raise ValueError(
            f"parameter {name}={value!r} ({type(value).__name__}) cannot be converted to {kind}, the type "
            f"{Path(notebook).name} declares for it ({err}). Pass a {kind} value such as {example}."
        ) from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"accepted: {', '.join(sorted(_TRUE | _FALSE))}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a bool is not an integer")
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError("not a whole number")
    return int(number)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


#: The kernel's matplotlib backend: inline, so figures are images in JupyterLab and in executed notebooks,
#: whatever MPLBACKEND the shell that started Jupyter or papermill exported (Agg there gave text-only figures).
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def ensure_kernel(kernel_name: str = "workbench") -> str:
    """Make sure a Jupyter kernelspec called ``kernel_name`` exists and draws figures inline.

    When it is missing, a kernelspec running this Python (``sys.executable``) is installed into
    ``sys.prefix``, so a fresh machine never fails with ``NoSuchKernel``. A kernelspec that runs
    this Python gets ``MPLBACKEND`` set to the inline backend in its ``env``: a kernel inherits
    the environment of whoever starts it, and a non-inline backend there (``MPLBACKEND=Agg``,
    common on servers and in CI) turns every figure into the text ``<Figure size ...>``.

    Returns
    -------
    str
        ``kernel_name``.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    specs = manager.find_kernel_specs()
    if kernel_name not in specs:
        from ipykernel.kernelspec import install

        install(kernel_name=kernel_name, display_name=f"Python ({kernel_name})", prefix=sys.prefix)
        specs = manager.find_kernel_specs()
    spec_file = Path(specs[kernel_name]) / "kernel.json"
    spec = json.loads(spec_file.read_text())
    ours = Path(spec.get("argv", [""])[0]).resolve() == Path(sys.executable).resolve()
    if ours and spec.get("env", {}).get("MPLBACKEND") != INLINE_BACKEND:
        spec.setdefault("env", {})["MPLBACKEND"] = INLINE_BACKEND
        try:
            spec_file.write_text(json.dumps(spec, indent=1))
        except OSError:  # a read-only system kernelspec: leave it, figures may then render as text
            pass
    return kernel_name


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


def run_notebook(
    notebook: str | os.PathLike,
    *,
    parameters: dict | None = None,
    output_dir: str | os.PathLike,
    kernel_name: str = "workbench",
    timeout: float | None = None,
    log_output: bool = False,
    raise_on_error: bool = False,
    overwrite: bool = False,
    kernels: WarmKernels | None = None,
) -> RunResult:
    """Execute ``notebook`` with ``parameters`` into the run folder ``output_dir``.

    Parameters
    ----------
    notebook
        Path to a notebook with a cell tagged ``parameters``.
    parameters
        ``{name: value}`` for the parameters cell. Names must be declared there; values are
        converted to the declared types (see :func:`coerce_parameters`). ``output_dir`` is
        injected as well (as an absolute path string) and should not be given here; so is
        ``interactive=False`` when the notebook declares ``interactive`` and it is not given.
    output_dir
        Run folder, created with its parents. Receives ``notebook.ipynb`` and ``status.json``.
    kernel_name
        Jupyter kernel to run on; installed for this Python when missing (:func:`ensure_kernel`).
    timeout
        Seconds one cell may run before the run fails; None means no limit.
    log_output
        Echo the notebook's printed output to the log while it runs.
    raise_on_error
        Raise a RuntimeError carrying the readable message when the notebook fails, instead of
        returning a failed result.
    overwrite
        Replace a run with other parameters that the folder already holds. Without it such a
        folder is refused (:class:`workbench.tracking.RunFolderError`) before anything is written.
    kernels
        A :class:`workbench.kernels.WarmKernels` pool: the run takes its kernel from it (warm, with the
        workflow's imports done, when the pool has one ready), the pool starts warming the next run's
        kernel meanwhile, and the run's kernel is shut down when it ends. Without it the run starts a
        kernel of its own.

    Returns
    -------
    RunResult
        ``ok``, ``error``, ``seconds``, ``final_metrics``, ... A failing cell, a cell timeout and a
        dead kernel all give ``ok=False`` with a readable ``error``.

    Raises
    ------
    ValueError
        Before anything runs, for an unknown parameter name or a value of the wrong type, or
        (as ``RunFolderError``) for a folder that holds another run.
    KeyboardInterrupt
        When the run is interrupted; no ``status.json`` is written then.
    """
    notebook = Path(notebook).resolve()
    parameters = dict(parameters or {})
    if kernels is not None and kernels.kernel_name != kernel_name:
        raise ValueError(f"kernels runs the kernel {kernels.kernel_name!r}, but kernel_name={kernel_name!r}: "
                         f"pass WarmKernels(kernel_name={kernel_name!r}), or kernel_name={kernels.kernel_name!r}.")
    if "output_dir" in parameters:
        raise ValueError("parameters must not contain 'output_dir': pass it as run_notebook(..., output_dir=...).")
    values, out = prepare_run_folder(notebook, parameters, output_dir, overwrite=overwrite)
    values["output_dir"] = str(out)
    executed = out / NOTEBOOK_FILE

    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    ensure_kernel(kernel_name)
    start = time.perf_counter()
    error, failed_cell = None, None
    kernel = kernels.take(notebook) if kernels is not None else None
    completed = False
    try:
        with _kernel_sockets() as config:
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=values, kernel_name=kernel_name,
                execution_timeout=timeout, log_output=log_output, progress_bar=False, config=config,
                shutdown_kernel="immediate", km=None if kernel is None else kernel.manager,
                engine_name=_engine(),
            )
        completed = True
    except papermill.PapermillExecutionError as err:
        if err.ename == "KeyboardInterrupt":
            raise KeyboardInterrupt(f"{notebook.name} was interrupted in cell {err.cell_index + 1}") from None
        failed_cell = err.cell_index + 1
        error = _describe_failure(failed_cell, err.source, f"{err.ename}: {err.evalue}")
    except CellTimeoutError:
        failed_cell, source = _last_started_cell(executed)
        error = _describe_failure(failed_cell, source, f"CellTimeoutError: the cell ran longer than timeout={timeout} s")
    except DeadKernelError as err:
        failed_cell, source = _last_started_cell(executed)
        error = _describe_failure(failed_cell, source, f"DeadKernelError: the kernel died ({_first_line(str(err))}); "
                                                       "it may have run out of memory")
    finally:
        if kernel is not None:  # interrupted or not, the run's kernel ends with the run
            kernels.release(kernel, notebook, ok=completed)
    seconds = time.perf_counter() - start

    metrics = _read_json(out / METRICS_FILE)
    result = RunResult(ok=error is None, output_dir=out, notebook_path=executed, error=error, seconds=seconds,
                       final_metrics=metrics, failed_cell=failed_cell, parameters=values)
    status = {"ok": result.ok, "error": error, "failed_cell": failed_cell, "seconds": round(seconds, 3),
              "notebook": str(notebook), "notebook_sha256": notebook_sha256(notebook)}
    (out / STATUS_FILE).write_text(json.dumps(status, indent=2))
    if error is not None and raise_on_error:
        raise RuntimeError(f"{notebook.name} failed: {error} (executed notebook: {executed})")
    return result


#: Seconds between two writes of the executed notebook while it runs (it is always written at the start and the end).
SAVE_EVERY_S = 5.0


def _engine() -> str:
    """papermill's nbclient engine, writing the executed notebook at most every :data:`SAVE_EVERY_S` while it runs.

    papermill writes the whole notebook (figures included) before and after every cell: for a
    workflow notebook about 45 writes of up to 0.5 MB each, 0.03-0.3 s apiece depending on the
    machine's load, more than the rest of a warm run's overhead together. The notebook is still
    written when the run starts and when it ends, however it ends (a failed cell, a timeout, a
    dead kernel, an interrupt), so the executed notebook and the failing cell it records are
    the same; a worker killed outright leaves a notebook at most SAVE_EVERY_S old.
    """
    global _ENGINE
    from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

    if _ENGINE is not None:
        return _ENGINE

    class FewerSaves(NotebookExecutionManager):
        _force = False

        def save(self, **kwargs):
            if self._force or (self.now() - self.last_save_time).total_seconds() >= SAVE_EVERY_S:
                super().save(**kwargs)

        def notebook_start(self, **kwargs):
            self._force = True
            try:
                super().notebook_start(**kwargs)
            finally:
                self._force = False

        def notebook_complete(self, **kwargs):
            self._force = True
            try:
                super().notebook_complete(**kwargs)
            finally:
                self._force = False

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=True, log_output=False,
                             autosave_cell_every=30, **kwargs):
            # papermill's Engine.execute_notebook, with the manager above
            nb_man = FewerSaves(nb, output_path=output_path, progress_bar=progress_bar, log_output=log_output,
                                autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

    papermill_engines.register("workbench", Engine)
    _ENGINE = "workbench"
    return _ENGINE


_ENGINE: str | None = None


@contextmanager
def _kernel_sockets():
    """Kernel-manager config that gives this run's kernel private Unix sockets.

    With the default TCP transport, kernels started at the same moment by parallel runs can pick
    the same free port; the loser dies and nbclient waits a full minute before it gives up. IPC
    sockets in a fresh temporary folder cannot collide (and the kernel stops warning about
    unencrypted TCP). Windows has no IPC transport and keeps TCP.
    """
    from traitlets.config import Config

    if os.name != "posix":
        yield Config()
        return
    with tempfile.TemporaryDirectory(prefix="wb-kernel-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "k")}})


def notebook_sha256(notebook: str | os.PathLike) -> str:
    """Content hash of a notebook's code cells (sources only: outputs and metadata do not count).

    A run's ``status.json`` records it, so a sweep can tell which finished runs an earlier version
    of the notebook made.
    """
    cells = json.loads(Path(notebook).read_text())["cells"]
    text = "\n\x00".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code")
    return hashlib.sha256(text.encode()).hexdigest()


def run_in_process(notebook: str | os.PathLike, *, parameters: dict | None = None) -> dict:
    """Run the notebook's code cells in this process with ``parameters``; return its namespace.

    The parameters cell runs first, then the given values (converted to the declared types, as
    for :func:`run_notebook`; ``interactive`` is False unless given) replace its defaults, then
    every other code cell runs in order, in one namespace, as a kernel would run them. Nothing is
    displayed: figures and tables reach the run folder through the notebook's own calls.

    Parameters
    ----------
    notebook
        Path to a notebook with a cell tagged ``parameters``.
    parameters
        ``{name: value}`` for the parameters cell; ``output_dir`` may be among them.

    Returns
    -------
    dict
        The notebook's global namespace after the last cell (e.g. ``ns["result"]``).
    """
    import nbformat

    notebook = Path(notebook)
    declared = notebook_parameters(notebook)
    values = coerce_parameters(notebook, parameters, declared=declared)
    if "interactive" in declared:
        values.setdefault("interactive", False)
    check_values(notebook, {k: v for k, v in values.items() if k != "output_dir"}, declared=declared)
    cells = nbformat.read(str(notebook), as_version=4).cells
    namespace: dict = {"__name__": "__main__"}
    for position, cell in enumerate(cells, start=1):
        if cell.cell_type != "code":
            continue
        source = cell.source
        magic = next((line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))), None)
        if magic is not None:
            raise ValueError(f"{notebook.name} cell {position} uses IPython syntax ({magic.strip()!r}), which only a "
                             "kernel runs. Write it as Python (e.g. subprocess.run instead of !cmd) or run the "
                             "notebook with run_notebook.")
        exec(compile(source, f"<{notebook.name} cell {position}>", "exec"), namespace)  # noqa: S102 - our notebook
        if "parameters" in cell.metadata.get("tags", []):
            namespace.update(values)
    return namespace


def read_status(output_dir: str | os.PathLike) -> dict | None:
    """The run folder's ``status.json``, or None when the run never finished."""
    return _read_json(Path(output_dir) / STATUS_FILE) or None


def _describe_failure(cell: int | None, source: str | None, what: str) -> str:
    where = f"cell {cell}" if cell else "an unknown cell"
    first = _first_line(source or "")
    if first:
        where += f" ({first})"
    return f"{where} failed: {_first_line(what, limit=400)}"


def _first_line(text: str, *, limit: int = 80) -> str:
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _last_started_cell(executed: Path) -> tuple[int | None, str | None]:
    """Position and source of the cell papermill was running when execution stopped."""
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None, None
    last = None
    for position, cell in enumerate(cells, start=1):
        if cell.get("metadata", {}).get("papermill", {}).get("start_time"):
            last = (position, "".join(cell.get("source", "")))
    return last or (None, None)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_workflow(workflow, params: dict, *, callbacks=()):
    """Run a workflow's notebook in this process for ``params``; return the notebook's ``result``.

    ``workflow`` is a :class:`workbench.workflow.Workflow`, a registered name, or a notebook's path. The notebook's
    own cells run (:func:`run_in_process`), so the widget panel's Train button and a papermill run follow the same
    steps. ``callbacks`` join every ``fit`` of the run (the panel's live curves).
    """
    from .training import extra_callbacks
    from .workflow import Workflow, get_workflow

    if isinstance(workflow, Workflow):
        notebook = workflow.notebook
    elif isinstance(workflow, str) and not workflow.endswith(".ipynb"):
        notebook = get_workflow(workflow).notebook
    else:
        notebook = Path(workflow)
    with extra_callbacks(callbacks):
        namespace = run_in_process(notebook, parameters=dict(params))
    return namespace.get("result")
