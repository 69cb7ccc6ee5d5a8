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
    # pretrain_epochs (every workflow that pretrains exposes the same pretraining settings)
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


# --------------------------------------------------------------------------------------------
# the layers (pyproject.toml's [tool.importlinter]) and the length of modules
# --------------------------------------------------------------------------------------------


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under ``root``, with that copy first on the path (not the installed one)."""
    import os

    command = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(command), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _contracts() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def test_the_import_contracts_hold():
    """Layers (interfaces > running > workflows > presentation > core), workflows independent, no circles."""
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert set(_contracts()) == {"layers", "tasks-independent", "core-knows-no-front-end", "acyclic"}
    assert "0 broken" in done.stdout and " BROKEN" not in done.stdout


def test_make_test_runs_the_import_contracts_before_pytest():
    recipe = re.search(r"^test: \$\(STAMP\)\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    lines = recipe.splitlines()
    lint = next(i for i, line in enumerate(lines) if "lint-imports" in line)
    pytest_line = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert lint < pytest_line, "make test must stop at a broken import contract before the (long) test run"
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(dep.startswith("import-linter==") for dep in test_extra)


def test_the_import_contracts_can_fail(tmp_path):
    """A copy of the package with one forbidden import of each kind breaks each contract."""
    import shutil

    shutil.copytree(ROOT / "workbench", tmp_path / "workbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    package = tmp_path / "workbench"

    def add(path: str, line: str):
        (package / path).write_text((package / path).read_text() + f"\n\ndef _scratch():\n    {line}\n")

    add("checkpoints.py", "from . import widgets")                 # the core imports the panel: upward
    add("sweep_results.py", "from . import sweeps")                # a circle in the running layer
    first, second = sorted(p for p in (package / "tasks").iterdir() if p.stem not in ("__init__", "__pycache__"))[:2]
    first = first / "__init__.py" if first.is_dir() else first   # a task is a module or a package
    add(first.relative_to(package).as_posix(), f"from workbench.tasks import {second.stem}")  # one task, another
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    for contract in _contracts().values():
        assert f"{contract['name']} BROKEN" in done.stdout, (contract["name"], done.stdout[-3000:])
    assert "workbench.checkpoints is not allowed to import workbench.widgets" in done.stdout


def test_the_core_layer_and_the_forbidden_contract_name_the_same_modules():
    """The forbidden contract lists the core's modules by hand: a module added to the core must be added there too."""
    contracts = _contracts()
    core = contracts["layers"]["layers"][-1]
    present = set()
    for name in (part.strip() for part in core.split(":")):
        optional, name = name.startswith("("), name.strip("()")
        if not optional or (ROOT / "workbench" / f"{name}.py").exists() or (ROOT / "workbench" / name).is_dir():
            present.add(f"workbench.{name}")
    assert set(contracts["core-knows-no-front-end"]["source_modules"]) == present


LONG_MODULE = 500
WHY_LONG = "Why this module is long:"
#: Long modules whose owners are changing them now; each change adds the sentence (or splits the module), and the
#: lead drops its line at merge. A line whose module is gone or says why already fails the test below.
LONG_FOR_NOW: dict[str, str] = {}  # module -> the change that will split it or say why


def long_modules_without_a_reason(package: Path, *, limit: int = LONG_MODULE) -> list[str]:
    """Modules of ``package`` over ``limit`` lines whose docstring has no sentence starting ``Why this module is long:``.

    The sentence must say something: at least eight words after the marker.
    """
    import ast

    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) <= limit:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        reason = doc.split(WHY_LONG, 1)[1] if WHY_LONG in doc else ""
        if len(reason.split()) < 8:
            found.append(path.relative_to(package.parent).as_posix())
    return found


def test_every_long_module_says_why_in_its_docstring():
    found = set(long_modules_without_a_reason(ROOT / "workbench"))
    unexplained = sorted(found - set(LONG_FOR_NOW))
    assert not unexplained, (f"modules over {LONG_MODULE} lines: split them, or add a sentence starting "
                             f"{WHY_LONG!r} to the module docstring: {unexplained}")
    stale = sorted(set(LONG_FOR_NOW) - found)
    assert not stale, f"drop these from LONG_FOR_NOW (gone, or they say why now): {stale}"


def test_the_long_module_check_can_fail(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "x = 1\n" * LONG_MODULE
    (package / "short.py").write_text('"""Short."""\n' + "x = 1\n" * (LONG_MODULE - 1))
    (package / "long.py").write_text('"""Long, and silent about it."""\n' + body)
    (package / "terse.py").write_text(f'"""Long.\n\n{WHY_LONG} because.\n"""\n' + body)
    (package / "said.py").write_text(f'"""Long.\n\n{WHY_LONG} one loop and its guards must be read together.\n"""\n'
                                     + body)
    assert long_modules_without_a_reason(package) == ["pkg/long.py", "pkg/terse.py"]
