"""Warm kernels: the next run's Jupyter kernel is started and warmed while the current run executes.

A run of a workflow notebook pays, before its first cell does any work, for a kernel to start and
for the workflow's imports (torch, anndata, scikit-learn, ... several seconds together). A sweep
pays that for every run. :class:`WarmKernels` takes it off the runs' path: when a run takes its
kernel, the next one is started at once and imports the workflow's modules while the current run
executes, so the next run finds a kernel with its imports done.

Every run still gets its own, fresh kernel (nothing a run defines reaches another), and the used
kernel is shut down when its run ends. A warm kernel has imported modules and nothing else: the
warm-up defines no names in the kernel's namespace, adds no history and no execution count, so
the notebook runs as it would in a cold kernel and gives the same results.

Which modules
    Before any run: the modules the notebook's code cells import at their top level, and the
    workflow's task module (notebook metadata ``{"workbench": {"task": ...}}``). After a run
    that succeeded: every module that run's kernel had imported by its end (the imports a
    workflow makes inside its functions included, such as ``torch._dynamo`` behind the first
    optimizer step), kept only where every finished run imported it. A module that fails to
    import is skipped; the run then imports it (and fails) as it would cold.

Used by :func:`workbench.execute.run_notebook` (``kernels=``) and by every sweep worker
(:func:`worker_kernels`), in the local process pool and on Dask workers alike::

    kernels = WarmKernels()
    for folder in ("runs/a", "runs/b"):
        run_notebook(notebook, parameters=..., output_dir=folder, kernels=kernels)  # b starts warm
    kernels.close()
"""

from __future__ import annotations

import ast
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

__all__ = ["WarmKernels", "Kernel", "worker_kernels", "close_worker_kernels", "notebook_imports"]

#: nbclient starts kernels with an in-memory IPython history (no sqlite file per run); a warm kernel does too.
HISTORY_ARGUMENT = "--HistoryManager.hist_file=:memory:"
#: Seconds to wait for a spare's warm-up before giving up on it (the run then starts a kernel of its own).
WARM_UP_TIMEOUT = 300.0

# Runs in the kernel, silently: imports only, every name it makes is deleted again.
_WARM_UP = """\
def _workbench_warm_up(names):
    import importlib
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
_workbench_warm_up({names!r})
del _workbench_warm_up
"""
_MODULES_EXPRESSION = "__import__('json').dumps(list(__import__('sys').modules))"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class Kernel:
    """One started kernel: its manager (what nbclient and papermill take as ``km``) and its private sockets.

    Attributes
    ----------
    manager
        A ``jupyter_client.AsyncKernelManager`` whose kernel runs.
    warm
        True when the kernel had imported the workflow's modules before the run took it.
    """

    def __init__(self, kernel_name: str, *, cwd: str):
        from jupyter_core.utils import run_sync
        from traitlets.config import Config

        self._sockets = tempfile.TemporaryDirectory(prefix="wb-kernel-") if os.name == "posix" else None
        config = Config()
        if self._sockets is not None:  # private Unix sockets: parallel kernels cannot collide on a TCP port
            config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(self._sockets.name, "k")}})
        self.manager = _ClientTrackingKernelManager(kernel_name=kernel_name, config=config)
        self.warm = False
        self._warm_up_id: str | None = None
        self._warm_client = None
        self.warmed_with: list[str] = []
        try:
            run_sync(self.manager.start_kernel)(extra_arguments=[HISTORY_ARGUMENT], cwd=cwd)
        except BaseException:
            self._remove_sockets()
            raise

    # warm-up ---------------------------------------------------------------------------------

    def start_warm_up(self, modules: list[str]) -> None:
        """Send the import of ``modules`` to the kernel and return at once; :meth:`wait_warm` collects it.

        The kernel runs requests in order, so waiting for this one waits for any sent before it too.
        """
        if self._warm_client is not None:
            self._warm_client.stop_channels()
        self._warm_client = self._client()
        self._warm_up_id = self._warm_client.execute(_WARM_UP.format(names=list(modules)), silent=True,
                                                     store_history=False, allow_stdin=False)
        self.warmed_with += [m for m in modules if m not in self.warmed_with]

    def wait_warm(self, timeout: float = WARM_UP_TIMEOUT) -> bool:
        """Wait until the warm-up ran; True when it did, False when the kernel died or ``timeout`` passed."""
        from queue import Empty

        if self._warm_client is None:
            return self.warm
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive():
                    return False
                try:
                    reply = self._warm_client.get_shell_msg(timeout=min(left, 1.0))
                except Empty:
                    continue
                if reply["parent_header"].get("msg_id") == self._warm_up_id:
                    self.warm = True
                    return True
        finally:
            self._warm_client.stop_channels()
            self._warm_client = None

    # after the run -----------------------------------------------------------------------------

    def imported_modules(self, timeout: float = 10.0) -> list[str]:
        """The names in the kernel's ``sys.modules``, in import order (asked without touching its namespace)."""
        from queue import Empty

        client = self._client()
        try:
            request = client.execute("", silent=True, store_history=False, allow_stdin=False,
                                     user_expressions={"modules": _MODULES_EXPRESSION})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    reply = client.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
                except Empty:
                    break
                if reply["parent_header"].get("msg_id") != request:
                    continue
                value = reply["content"].get("user_expressions", {}).get("modules", {})
                if value.get("status") != "ok":
                    return []
                return json.loads(ast.literal_eval(value["data"]["text/plain"]))
            return []
        finally:
            client.stop_channels()

    def alive(self) -> bool:
        from jupyter_core.utils import run_sync

        try:
            return bool(run_sync(self.manager.is_alive)())
        except Exception:  # noqa: BLE001 - a manager that cannot tell has no usable kernel
            return False

    def shutdown(self) -> None:
        """Stop the clients that talked to the kernel, kill the kernel, remove its sockets."""
        from jupyter_core.utils import run_sync

        if self._warm_client is not None:
            self._warm_client.stop_channels()
            self._warm_client = None
        for client in self.manager.clients:
            try:
                client.stop_channels()
            except Exception:  # noqa: BLE001 - closing what is already closed
                pass
        self.manager.clients.clear()
        try:
            if self.manager.has_kernel:
                run_sync(self.manager.shutdown_kernel)(now=True)
        except RuntimeError as err:
            if "No kernel is running" not in str(err):
                raise
        finally:
            self._remove_sockets()

    def _client(self):
        from jupyter_client.blocking import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_info(self.manager.get_connection_info())
        client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        return client

    def _remove_sockets(self) -> None:
        if self._sockets is not None:
            self._sockets.cleanup()
            self._sockets = None


class _ClientTrackingKernelManager(AsyncKernelManager):
    """An AsyncKernelManager that remembers the clients it made.

    nbclient makes its own client from the manager it is given and, when it does not own the
    manager, leaves that client's channels open; :meth:`Kernel.shutdown` closes them.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clients = []

    def client(self, **kwargs):
        made = super().client(**kwargs)
        self.clients.append(made)
        return made


# --------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------


class WarmKernels:
    """Keeps one started, warmed kernel ready for the next run of a notebook.

    :meth:`take` hands out the spare (waiting for its warm-up when it is still importing) or, when
    there is none for this notebook, kernel name, folder and environment, starts a kernel that is
    not warmed. With ``keep_next`` (the default) it then starts the next spare at once, which
    warms while the taken kernel's run executes. The caller shuts the taken kernel down after its
    run (:meth:`release`), which also learns which modules the run imported.

    Parameters
    ----------
    kernel_name
        The Jupyter kernel every kernel of this pool runs.
    keep_next
        Start the next spare whenever a kernel is taken. A sweep worker turns it off for the runs
        that no further run follows.
    """

    def __init__(self, *, kernel_name: str = "workbench", keep_next: bool = True):
        self.kernel_name = kernel_name
        self.keep_next = keep_next
        self._spare: Kernel | None = None
        self._spare_key: tuple | None = None
        self._learned: dict[str, list[str]] = {}  # notebook -> modules every finished run imported
        self._lock = threading.Lock()

    def take(self, notebook: str | os.PathLike) -> Kernel:
        """A started kernel for one run of ``notebook``: the warm spare when there is one, else a new one.

        With ``keep_next`` the next spare starts warming at once.
        """
        notebook = str(Path(notebook).resolve())
        key = self._key(notebook)
        with self._lock:
            spare, spare_key = self._spare, self._spare_key
            self._spare = self._spare_key = None
        kernel = None
        if spare is not None and spare_key == key and spare.wait_warm():
            missing = [m for m in self.modules(notebook) if m not in set(spare.warmed_with)]
            if missing:  # learned since the spare started: import them now, as the run would
                spare.start_warm_up(missing)
            if not missing or spare.wait_warm():
                kernel = spare
        if spare is not None and kernel is None:  # another notebook or environment, or a kernel that died
            spare.shutdown()
        if kernel is None:
            kernel = Kernel(self.kernel_name, cwd=os.getcwd())
        if self.keep_next:
            self.prepare(notebook)
        return kernel

    def prepare(self, notebook: str | os.PathLike) -> None:
        """Start (and begin warming) the spare for ``notebook`` unless one for it is already there."""
        notebook = str(Path(notebook).resolve())
        key = self._key(notebook)
        with self._lock:
            if self._spare is not None and self._spare_key == key:
                return
            old, self._spare, self._spare_key = self._spare, None, None
        if old is not None:
            old.shutdown()
        spare = Kernel(self.kernel_name, cwd=os.getcwd())
        spare.start_warm_up(self.modules(notebook))
        with self._lock:
            self._spare, self._spare_key = spare, key

    def release(self, kernel: Kernel, notebook: str | os.PathLike, *, ok: bool) -> None:
        """Shut down a taken kernel after its run; a run that succeeded teaches the pool its imports."""
        try:
            if ok:
                found = [m for m in kernel.imported_modules() if _MODULE_NAME.match(m) and m != "__main__"]
                if found:
                    self._learn(str(Path(notebook).resolve()), found)
                    self._top_up_spare(str(Path(notebook).resolve()))
        finally:
            kernel.shutdown()

    def modules(self, notebook: str | os.PathLike) -> list[str]:
        """The modules a spare for ``notebook`` imports: the notebook's own imports, then what runs imported."""
        notebook = str(Path(notebook).resolve())
        found = notebook_imports(notebook)
        return found + [m for m in self._learned.get(notebook, []) if m not in set(found)]

    def wait_ready(self, timeout: float = WARM_UP_TIMEOUT) -> bool:
        """Wait until the spare has finished warming (benchmarks use it); False when there is none."""
        spare = self._spare
        return spare is not None and spare.wait_warm(timeout)

    def close(self) -> None:
        """Shut the spare down."""
        with self._lock:
            spare, self._spare, self._spare_key = self._spare, None, None
        if spare is not None:
            spare.shutdown()

    def _top_up_spare(self, notebook: str) -> None:
        """Have the spare import, now, what was learned after it started (rather than when a run takes it)."""
        with self._lock:
            spare = self._spare if self._spare_key is not None and self._spare_key[0] == notebook else None
            if spare is not None:
                missing = [m for m in self.modules(notebook) if m not in set(spare.warmed_with)]
                if missing:
                    spare.start_warm_up(missing)

    def _learn(self, notebook: str, found: list[str]) -> None:
        before = self._learned.get(notebook)
        if before is None:
            self._learned[notebook] = found
        else:
            keep = set(before)
            self._learned[notebook] = [m for m in found if m in keep]

    def _key(self, notebook: str) -> tuple:
        # a kernel inherits the whole environment (thread counts, caches, ...): a spare started under another is not used
        return (notebook, self.kernel_name, os.getcwd(), hash(tuple(sorted(os.environ.items()))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def notebook_imports(notebook: str | os.PathLike) -> list[str]:
    """Modules the notebook imports at the top level of its code cells, and its workflow's task module."""
    try:
        content = json.loads(Path(notebook).read_text())
    except (OSError, ValueError):
        return []
    names: list[str] = []
    task = content.get("metadata", {}).get("workbench", {}).get("task")
    for cell in content.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", ""))
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
                names += [f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*"]
    if isinstance(task, str):
        names.append(task)
    return [n for n in dict.fromkeys(names) if _MODULE_NAME.match(n)]


# --------------------------------------------------------------------------------------------
# one pool per worker process
# --------------------------------------------------------------------------------------------

_WORKER_KERNELS: dict[str, WarmKernels] = {}


def worker_kernels(kernel_name: str = "workbench") -> WarmKernels:
    """This process's pool for ``kernel_name`` (a sweep worker keeps one for all its runs).

    Its spare is shut down when the process exits normally, and by :func:`close_worker_kernels`
    on the way out of an interrupted worker. A kernel whose worker is killed outright exits by
    itself: ipykernel watches its parent process.
    """
    pool = _WORKER_KERNELS.get(kernel_name)
    if pool is None:
        pool = _WORKER_KERNELS[kernel_name] = WarmKernels(kernel_name=kernel_name)
        if len(_WORKER_KERNELS) == 1:
            _close_at_exit()
    return pool


def close_worker_kernels() -> None:
    """Shut down the spare kernels of this process's pools."""
    for pool in list(_WORKER_KERNELS.values()):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - on the way out; the kernel exits with its parent anyway
            pass


def _close_at_exit() -> None:
    import atexit
    import multiprocessing.util

    atexit.register(close_worker_kernels)
    # a multiprocessing child leaves through os._exit, skipping atexit; its finalizers still run
    multiprocessing.util.Finalize(None, close_worker_kernels, exitpriority=10)

