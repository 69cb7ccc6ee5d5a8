"""Conventions across the project: setup files agree, notebooks are clean, the API reads the same way."""

import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CELL_TYPE_PARAMETERS = [
    "data_path", "label_key", "pretrained_checkpoint", "strategy", "lr_scheduler_type", "learning_rate",
    "warmup_ratio", "epochs", "batch_size", "freeze_epochs", "backbone_lr_ratio", "label_fraction", "test_size",
    "val_fraction", "monitor", "patience", "seed", "output_dir", "tracker",
]


def test_environment_yml_installs_the_package_with_the_python_pyproject_allows():
    env = (ROOT / "environment.yml").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^EXTRAS\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"-e .[{extras}]" in env, "environment.yml must install this package with the Makefile's extras"
    python = re.search(r"python=(\d+\.\d+)", env).group(1)
    assert python == "3.11" and ">=3.11" in project["requires-python"]
    assert "torch==2.13.0" in project["dependencies"]
    pins = [d for d in project["dependencies"] if "==" not in d]
    assert not pins, f"unpinned runtime dependencies: {pins}"
    for extra in ("test", "lab"):
        assert extra in project["optional-dependencies"]


def test_ci_calls_make_test_and_makefile_bootstraps_the_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-browser" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo:", "test:", "test-browser:", "lab:", "bench:", "sweep:"):
        assert re.search(rf"^{target} \$\(STAMP\)", makefile, re.M), target
    assert "-m venv" in makefile and "ipykernel install" in makefile and "ensure_kernel()" in makefile
    # issue 14: an exported MPLBACKEND reached every kernel under `make lab` and figures showed as text
    assert not re.search(r"^\s*export\s+MPLBACKEND", makefile, re.M)


def test_the_project_kernel_draws_figures_inline_whatever_the_shell_exports():
    """The kernel `make lab` and papermill start: its spec pins the inline backend."""
    from jupyter_client.kernelspec import KernelSpecManager

    from workbench.execute import INLINE_BACKEND, ensure_kernel

    spec = KernelSpecManager().get_kernel_spec(ensure_kernel("workbench"))
    assert spec.env.get("MPLBACKEND") == INLINE_BACKEND


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_clean_with_a_parameters_cell(notebook):
    nb = json.loads(notebook.read_text())
    assert not [c for c in nb["cells"] if c.get("outputs")], "strip outputs before committing"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1


def test_cell_type_notebook_uses_exactly_the_agreed_parameter_names():
    from workbench.execute import notebook_parameters

    names = list(notebook_parameters(ROOT / "notebooks" / "cell_type_annotation.ipynb"))
    assert [n for n in names if n in CELL_TYPE_PARAMETERS] == CELL_TYPE_PARAMETERS  # in the agreed order
    # added since: backed (streaming from .h5ad), find_lr (LR range test), device and dtype (the one device path),
    # pretrain_epochs (issue 22: every workflow that pretrains exposes the same pretraining settings)
    assert set(names) - set(CELL_TYPE_PARAMETERS) == {"interactive", "backed", "find_lr", "device", "dtype",
                                                      "pretrain_epochs"}


def _public_functions():
    import workbench

    for name in ["checkpoints", "transfer", "schedules", "training", "tracking", "metrics", "splits", "plots"]:
        module = getattr(workbench, name)
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not fname.startswith("_") and fname in getattr(module, "__all__", [fname]):
                yield f"{name}.{fname}", fn


def test_no_positional_booleans_in_the_public_api():
    """Everything after the main object is keyword-only, so no call reads `f(x, True, False)`."""
    offenders = []
    for qualname, fn in _public_functions():
        params = list(inspect.signature(fn).parameters.values())
        for p in params[1:]:
            if p.kind is p.POSITIONAL_OR_KEYWORD and (isinstance(p.default, bool) or p.annotation in ("bool", bool)):
                offenders.append(f"{qualname}({p.name})")
    assert not offenders, offenders


def test_import_workbench_is_light():
    code = "import sys, workbench, workbench.cli; print(sorted(m for m in ('torch', 'scanpy', 'papermill', 'wandb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
