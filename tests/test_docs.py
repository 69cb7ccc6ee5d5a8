"""The docs site's sources and the README, checked without building anything.

- Every results table on the site is a ``results-table`` directive naming a file that exists, and every results
  file (``benchmarks/results/*.json``, ``*.csv``, ``docs/results/*.csv``) is shown by some page: a number on the
  site is read from the file the command wrote, never pasted.
- No docs page holds a markdown table of measured numbers (that would be a pasted results table).
- The README stays short and free of internal notes; the workflows' docs settings name real parameters.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^```\{results-table\}\s+(\S+)\s*$", re.M)
#: A table cell that is a measurement: a number, maybe bold, with ± spread, unit or percent.
NUMBER_CELL = re.compile(r"^\**[+\-−]?\d[\d,.]*(\s*(±|x|×|%|s|MB|GB)\s*[\d,.]*)*\**$")
INTERNAL_NOTE = re.compile(r"\bissues?\s+#?\d+|(?<![\w/&])#\d+\b|\bsession\b", re.I)


def docs_sources() -> list[Path]:
    """The hand-written MyST pages (generated notebooks and build output left out)."""
    skip = ("_build", "_executed", "generated")
    return sorted(p for p in DOCS.rglob("*.md") if not any(part in skip for part in p.relative_to(DOCS).parts))


def directives() -> dict[str, list[str]]:
    """results-table source path -> the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in docs_sources():
        for source in DIRECTIVE.findall(page.read_text()):
            found.setdefault(source, []).append(str(page.relative_to(ROOT)))
    return found


def results_files() -> list[str]:
    files = [*(ROOT / "benchmarks" / "results").glob("*.json"), *(ROOT / "benchmarks" / "results").glob("*.csv"),
             *(DOCS / "results").glob("*.csv")]
    return sorted(str(path.relative_to(ROOT)) for path in files)


def test_every_results_table_reads_a_file_that_exists():
    shown = directives()
    assert len(shown) >= 10, shown
    missing = {source: pages for source, pages in shown.items() if not (ROOT / source).is_file()}
    assert not missing, f"results-table sources that do not exist: {missing}"


def test_every_results_file_is_shown_by_a_page():
    shown = directives()
    unshown = [path for path in results_files() if path not in shown]
    assert not unshown, f"results files that no docs page includes with results-table: {unshown}"


def test_results_csvs_are_rectangular():
    for path in (DOCS / "results").glob("*.csv"):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert len(rows) >= 2, path.name
        assert {len(row) for row in rows} == {len(rows[0])}, f"{path.name}: rows of different lengths"


def pasted_tables(text: str) -> list[str]:
    """Lines of markdown tables in ``text`` that hold a measured number (outside code fences)."""
    found, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if any(NUMBER_CELL.match(cell) for cell in cells):
            found.append(line)
    return found


def test_no_docs_page_pastes_a_results_table():
    pasted = {str(page.relative_to(ROOT)): lines for page in docs_sources() if (lines := pasted_tables(page.read_text()))}
    assert not pasted, f"markdown tables of numbers; put them in a results file and use results-table: {pasted}"


def test_the_pasted_table_check_can_fail():
    assert pasted_tables("| setting | AUROC |\n|---|---|\n| linear_eval | 0.925 ± 0.055 |\n")
    assert pasted_tables("| a | b |\n|---|---|\n| x | **376,592** |\n")
    assert not pasted_tables("| mode | what trains |\n|---|---|\n| `full` | everything |\n")


def test_readme_is_short_and_has_no_internal_notes():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert not INTERNAL_NOTE.findall(text), INTERNAL_NOTE.findall(text)


def test_docs_pages_have_no_internal_notes():
    noted = {str(page.relative_to(ROOT)): INTERNAL_NOTE.findall(page.read_text()) for page in docs_sources()}
    noted = {page: hits for page, hits in noted.items() if hits}
    assert not noted, noted


def test_the_internal_note_check_can_fail():
    for text in ("Against issue 7's acceptance lines", "fixed in #12", "at the end of the second session"):
        assert INTERNAL_NOTE.search(text), text
    assert not INTERNAL_NOTE.search("see docs/results/x.csv and the #fragment-less link; `heart#3` stays")


def notebook_parameters(notebook: Path) -> set[str]:
    cells = json.loads(notebook.read_text())["cells"]
    source = next("".join(cell["source"]) for cell in cells if "parameters" in cell["metadata"].get("tags", []))
    return {line.split(":")[0].strip() for line in source.splitlines() if re.match(r"^\w+\s*:", line)}


@pytest.mark.parametrize("name", sorted(yaml.safe_load((DOCS / "notebooks.yaml").read_text())))
def test_each_executed_workflow_has_its_page_parts_and_real_parameters(name):
    entry = yaml.safe_load((DOCS / "notebooks.yaml").read_text())[name]
    notebook = ROOT / entry["notebook"]
    unknown = set(entry.get("parameters", {})) - notebook_parameters(notebook)
    assert not unknown, f"docs/notebooks.yaml sets parameters {unknown} that {notebook.name} does not declare"
    assert (DOCS / "workflows" / "parts" / f"{name}.md").is_file()
    assert f"workflows/{name}\n" in (DOCS / "index.md").read_text(), "the workflow is missing from the toctree"


def test_every_notebook_has_a_docs_page():
    executed = {entry["notebook"] for entry in yaml.safe_load((DOCS / "notebooks.yaml").read_text()).values()}
    notebooks = {str(path.relative_to(ROOT)) for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks == executed


def test_readme_links_lead_to_files_and_name_the_commands():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert links and all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]
    for command in ("make demo", "make test", "make docs"):
        assert command in text, command


def test_api_page_lists_every_top_level_name():
    """Each name of ``import workbench as wb`` is on the API page (``module.name``) and every module has a page."""
    import workbench

    text = (DOCS / "api.md").read_text()
    listed = set(re.findall(r"^   ([\w.]+)$", text, re.M))
    missing = [f"{module}.{name}" for name, module in workbench._EXPORTS.items() if f"{module}.{name}" not in listed]
    assert not missing, f"add to the `wb` namespace list of docs/api.md: {missing}"
    modules = {path.stem for path in (ROOT / "workbench").glob("*.py") if not path.stem.startswith("_")}
    tasks = ROOT / "workbench" / "tasks"  # a workflow is a module or a package (a folder with __init__.py)
    modules |= {f"tasks.{path.stem}" for path in tasks.glob("*.py") if path.stem != "__init__"}
    modules |= {f"tasks.{path.parent.name}" for path in tasks.glob("*/__init__.py")}
    assert not modules - listed, f"modules with no API page (add them to docs/api.md): {sorted(modules - listed)}"
