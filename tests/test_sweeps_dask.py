"""A Dask sweep whose worker process is SIGKILLed mid-run: retried or recorded as failed, never lost.

Real LocalCluster, real papermill kernels. The notebook is tests/notebooks/tiny.ipynb with one more
parameter, ``hang_first_start_of``: the run whose seed it names appends its worker's pid to a log
and, on its first start only, hangs until the test kills that worker. Every run logs each start,
so the test can tell which runs were executed again.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import dask
import distributed  # noqa: F401 - loads its config defaults, which a dask.config.set block would otherwise drop on exit
import nbformat
import pandas as pd
import yaml

from workbench.sweeps import run_sweep

from .test_execute import TINY

START_CELL = '''# log this start: the pid of the Dask worker that runs the kernel
import os, pathlib, time
log = pathlib.Path(marker_dir) / f"{seed}.log"
first = not log.exists()
with open(log, "a") as fh:
    fh.write(f"{os.getppid()}\\n")
if seed == hang_first_start_of and first:
    time.sleep(300)  # the test kills this worker long before
'''


def write_notebook(folder: Path) -> Path:
    nb = nbformat.read(TINY, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += '\nmarker_dir = ""  # folder for the start logs\nhang_first_start_of = -1  # seed whose first start hangs\n'
    nb.cells.insert(nb.cells.index(cell) + 1, nbformat.v4.new_code_cell(START_CELL))
    path = folder / "dying.ipynb"
    nbformat.write(nb, path)
    return path


def write_spec(folder: Path) -> Path:
    (folder / "starts").mkdir()
    spec = {"name": "dying", "notebook": str(write_notebook(folder)), "output_root": str(folder / "out"),
            "parameters": {"marker_dir": str(folder / "starts"), "hang_first_start_of": 0}, "seeds": [0, 1, 2]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def starts(folder: Path) -> dict[int, list[int]]:
    """Worker pid of each start, per seed."""
    return {int(p.stem): [int(line) for line in p.read_text().split()] for p in (folder / "starts").glob("*.log")}


class Killer(threading.Thread):
    """Waits for the hanging run's first start, then SIGKILLs the worker process that runs it."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.log, self.killed = folder / "starts" / "0.log", None

    def run(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.log.exists() and self.log.read_text().strip():
                self.killed = int(self.log.read_text().split()[0])
                os.kill(self.killed, signal.SIGKILL)
                return
            time.sleep(0.05)


def ok_mtimes(sweep: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/status.json") if json.loads(p.read_text())["ok"]}


def test_a_killed_worker_fails_only_its_run_and_a_rerun_completes_the_sweep(tmp_path):
    spec = write_spec(tmp_path)
    sweep = tmp_path / "out" / "dying"
    killer = Killer(tmp_path)
    killer.start()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # no retry: the failure path
        result = run_sweep(spec, workers=2, executor="dask", progress=False)
    killer.join(timeout=1)
    assert killer.killed, "the hanging run never started"
    # the sweep finished; only the run whose worker died failed, with the reason and the fix
    assert result.n_executed == 3 and result.n_failed == 1
    rows = pd.read_csv(sweep / "results.csv").set_index("seed")
    assert list(rows["status"]) == ["failed", "ok", "ok"]
    assert "Dask worker running this run died" in rows.loc[0, "error"]
    assert "Run the sweep again" in rows.loc[0, "error"]
    assert starts(tmp_path) == {0: [killer.killed], 1: starts(tmp_path)[1], 2: starts(tmp_path)[2]}
    assert all(len(v) == 1 for v in starts(tmp_path).values())
    done = ok_mtimes(sweep)
    assert len(done) == 2

    # a re-run executes the failed run only; the finished ones are neither lost nor run again
    again = run_sweep(spec, workers=2, executor="dask", progress=False)
    assert again.n_executed == 1 and again.n_failed == 0
    assert list(pd.read_csv(sweep / "results.csv")["status"]) == ["ok"] * 3
    logs = starts(tmp_path)
    assert len(logs[0]) == 2 and len(logs[1]) == len(logs[2]) == 1
    assert ok_mtimes(sweep).items() >= done.items()


def test_with_dasks_default_retries_the_run_of_a_killed_worker_runs_again_and_the_sweep_completes(tmp_path):
    spec = write_spec(tmp_path)
    killer = Killer(tmp_path)
    killer.start()
    result = run_sweep(spec, workers=2, executor="dask", progress=False)
    killer.join(timeout=1)
    assert killer.killed
    assert result.n_failed == 0 and list(result.results["status"]) == ["ok"] * 3
    logs = starts(tmp_path)
    assert len(logs[0]) == 2 and logs[0][1] != killer.killed  # retried, by another worker process
    assert len(logs[1]) == len(logs[2]) == 1
