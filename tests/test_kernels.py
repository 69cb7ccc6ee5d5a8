"""Warm kernels (workbench.kernels): a fresh kernel per run, imports done ahead, results as from a cold start."""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from workbench.execute import run_notebook
from workbench.kernels import WarmKernels, notebook_imports

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPE = ROOT / "notebooks" / "cell_type_annotation.ipynb"

PARAMETERS = 'output_dir = "runs/x"  # run folder\n'
# `wave`: a standard module the kernel does not import by itself; the first cell sees whether the kernel had it
PROBE = "import sys\npreloaded = 'wave' in sys.modules\nleftover = globals().get('set_by_a_run')"
BODY = """\
import json, os, pathlib
import wave

set_by_a_run = os.getpid()
pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
record = {"preloaded": preloaded, "leftover": leftover, "pid": os.getpid(), "names": sorted(k for k in globals() if not k.startswith("_"))}
(pathlib.Path(output_dir) / "final_metrics.json").write_text(json.dumps(record))
"""


def write_probe_notebook(path: Path) -> Path:
    nb = new_notebook(cells=[new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}), new_code_cell(PROBE),
                             new_code_cell(BODY)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_runs_in_one_warm_worker_share_no_state_and_the_second_starts_warm(tmp_path):
    notebook = write_probe_notebook(tmp_path / "probe.ipynb")
    assert "wave" in notebook_imports(notebook)
    with WarmKernels() as kernels:
        first = run_notebook(notebook, output_dir=tmp_path / "first", kernels=kernels)
        second = run_notebook(notebook, output_dir=tmp_path / "second", kernels=kernels)
    assert first.ok and second.ok, (first.error, second.error)
    a, b = first.final_metrics, second.final_metrics
    assert a["preloaded"] is False  # the first run's kernel started cold
    assert b["preloaded"] is True  # the second found its imports done
    assert a["leftover"] is None and b["leftover"] is None  # the first run's global never reached the second
    assert a["names"] == b["names"]  # the warm-up left no names behind
    assert a["pid"] != b["pid"]  # a kernel of its own
    assert not alive(a["pid"]) and not alive(b["pid"])  # each run's kernel is shut down with its run
    executed = nbformat.read(second.notebook_path, as_version=4)
    assert [c.execution_count for c in executed.cells if c.cell_type == "code"] == [1, 2, 3, 4]  # parameters injected


def test_a_warm_kernel_gives_the_final_metrics_of_a_cold_start(tmp_path, monkeypatch):
    """The cell-type workflow: the first run of a pool starts cold, the second warm (with the first run's imports)."""
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    params = {"epochs": 2, "pretrained_checkpoint": "none", "seed": 1}
    with WarmKernels() as kernels:
        cold = run_notebook(CELL_TYPE, parameters=params, output_dir=tmp_path / "cold", kernels=kernels)
        learned = kernels.modules(CELL_TYPE)
        warm = run_notebook(CELL_TYPE, parameters=params, output_dir=tmp_path / "warm", kernels=kernels)
    assert cold.ok and warm.ok, (cold.error, warm.error)
    # the warm kernel had imported what the cold run imported inside its functions too
    assert {"torch._dynamo", "sklearn.linear_model", "anndata"} <= set(learned)
    assert warm.final_metrics == cold.final_metrics
    assert json.loads((tmp_path / "warm" / "final_metrics.json").read_text()) == cold.final_metrics


def test_a_spare_started_under_another_environment_is_not_used(tmp_path, monkeypatch):
    notebook = write_probe_notebook(tmp_path / "probe.ipynb")
    with WarmKernels() as kernels:
        run_notebook(notebook, output_dir=tmp_path / "first", kernels=kernels)
        monkeypatch.setenv("TORCH_NUM_THREADS", "7")  # what a sweep worker sets before its runs
        second = run_notebook(notebook, output_dir=tmp_path / "second", kernels=kernels)
    assert second.ok and second.final_metrics["preloaded"] is False  # a new kernel, with the new environment


@pytest.mark.parametrize("source, expected", [
    ("import torch\nimport workbench as wb\nfrom workbench.tasks import cell_type",
     ["torch", "workbench", "workbench.tasks", "workbench.tasks.cell_type"]),
    ("if x:\n    import peft\nfrom . import local\n%matplotlib inline", []),
])
def test_notebook_imports_reads_top_level_imports(tmp_path, source, expected):
    nb = new_notebook(cells=[new_code_cell(source)])
    nbformat.write(nb, tmp_path / "n.ipynb")
    assert notebook_imports(tmp_path / "n.ipynb") == expected
