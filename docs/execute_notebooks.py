"""Execute the workflow notebooks for the docs site, at the small settings of docs/notebooks.yaml.

Each workflow notebook runs once through ``workbench run`` into ``docs/_executed/<name>/`` (a run folder like any
other), and its executed notebook is copied to ``docs/workflows/<name>.ipynb`` with one markdown cell appended that
states the command and includes ``docs/workflows/parts/<name>.md`` (results tables and the commands that made them).
Sphinx renders that copy as it is (myst-nb, ``nb_execution_mode = "off"``).

A notebook is executed again only when its inputs change: the notebook file, its settings in notebooks.yaml, or
the package's code (``workbench/**/*.py``, docstrings and comments aside). ``--force`` executes every notebook. Two notebooks run at a time,
with one torch thread each, so the step fits 2 cores.

    python docs/execute_notebooks.py            # what `make docs` runs first
    python docs/execute_notebooks.py --force cell_type
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import yaml

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
EXECUTED = DOCS / "_executed"
PAGES = DOCS / "workflows"


def load_settings() -> dict:
    """The workflows of docs/notebooks.yaml: name -> {notebook, title, parameters}."""
    return yaml.safe_load((DOCS / "notebooks.yaml").read_text())


def command(name: str, entry: dict) -> list[str]:
    """The ``workbench run`` arguments that execute one workflow notebook for the docs."""
    args = ["workbench", "run", entry["notebook"]]
    for key, value in entry.get("parameters", {}).items():
        args += ["-p", key, str(value)]
    return args + ["-o", f"docs/_executed/{name}", "--overwrite"]


def code_of(source: str) -> str:
    """A Python file's code without docstrings, comments or layout: editing a docstring executes nothing again."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def package_code() -> str:
    """A hash of the package's code (read once per build)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "workbench").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(code_of(path.read_text()).encode())
    return digest.hexdigest()


def input_key(entry: dict) -> str:
    """A hash of everything the executed notebook depends on (notebook, settings, the package's code)."""
    digest = hashlib.sha256()
    digest.update((ROOT / entry["notebook"]).read_bytes())
    digest.update(json.dumps(entry.get("parameters", {}), sort_keys=True).encode())
    digest.update(package_code().encode())
    return digest.hexdigest()


def page_cell(name: str, entry: dict) -> nbformat.NotebookNode:
    """The markdown cell appended to the executed notebook: how it was made, then the results part."""
    shown = " ".join(command(name, entry)[:-1])  # without --overwrite
    text = (f"## How this page was made\n\n"
            f"`make docs` executed this notebook with settings smaller than its defaults, so the site builds in "
            f"minutes; the figures above come from that run:\n\n"
            f"```bash\n{shown}\n```\n\n"
            f"Without the `-p` options the same command runs the notebook at its defaults, the settings of the "
            f"results below.\n\n"
            f"```{{include}} parts/{name}.md\n```\n")
    return nbformat.v4.new_markdown_cell(text)


def execute(name: str, entry: dict, *, force: bool) -> str:
    """Run one notebook unless its key is unchanged; write the page notebook. Returns a one-line status."""
    folder = EXECUTED / name
    key_file = folder / ".docs-key"
    key = input_key(entry)
    page = PAGES / f"{name}.ipynb"
    started = time.perf_counter()
    if force or not key_file.exists() or key_file.read_text() != key or not (folder / "notebook.ipynb").exists():
        env = {**os.environ, "TORCH_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "WORKBENCH_CACHE": str(EXECUTED / ".cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        args = [sys.executable, "-c", "import sys; from workbench.cli import main; sys.exit(main())",
                *command(name, entry)[1:]]
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: `{' '.join(command(name, entry))}` failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        key_file.write_text(key)
        status = f"executed in {time.perf_counter() - started:.0f} s"
    else:
        status = "unchanged, not executed"
    notebook = nbformat.read(folder / "notebook.ipynb", as_version=4)
    notebook.cells.append(page_cell(name, entry))
    text = nbformat.writes(notebook).replace(str(ROOT) + "/", "")  # paths as a reader's checkout has them
    if not page.exists() or page.read_text() != text:  # an unchanged page keeps its time stamp (no rebuild)
        page.write_text(text)
    return f"{name}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflows to execute (default: all of docs/notebooks.yaml)")
    parser.add_argument("--force", action="store_true", help="execute even when the inputs are unchanged")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at the same time (default: 2)")
    args = parser.parse_args(argv)
    settings = load_settings()
    unknown = set(args.names) - set(settings)
    if unknown:
        parser.error(f"unknown workflow(s) {sorted(unknown)}; docs/notebooks.yaml names {sorted(settings)}")
    names = args.names or list(settings)
    EXECUTED.mkdir(exist_ok=True)
    package_code()  # before the threads start
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(execute, name, settings[name], force=args.force) for name in names]
        failed = 0
        for future in futures:
            try:
                print(future.result(), flush=True)
            except RuntimeError as err:
                print(err, file=sys.stderr, flush=True)
                failed += 1
    print(f"notebooks for the docs: {len(names) - failed} ready, {failed} failed, "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
