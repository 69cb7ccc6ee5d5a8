"""``results-table``: a Sphinx directive that renders a results file (JSON or CSV) as a table.

The numbers on the site are read from the files that the commands wrote, so a page cannot disagree with its
measurement. In a MyST page::

    ```{results-table} benchmarks/results/lora_memory.json
    :path: results
    :columns: method=method; trainable=trainable; peak_training_mb=peak memory (MB)
    :caption: LoRA against full fine-tuning
    ```

The argument is a path from the repository root. Options:

``path``
    dotted key inside a JSON file (``summary``, ``references_100k.in_memory``) to the part shown.
``columns``
    ``key=Label`` pairs separated by ``;`` (a bare ``key`` is its own label); default: every column.
``rows``
    JSON objects of objects and key/value tables: the keys to show, separated by ``;`` (default: all).
``index``
    header of the first column when the rows are the keys of a JSON object (default: ``setting``).
``caption``
    the table's caption.

JSON shapes: a list of objects (a row each), an object of objects (a row per key), or an object of scalars (a
two-column key/value table). CSV: a row per line. Cells are parsed as inline markup, so a CSV cell may hold
```code``` or ``**bold**``; floats are shown with 4 significant digits, large numbers with thousands separators.
The file is a dependency of the page: a rebuild after it changes renders the new numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


def format_value(value) -> str:
    """A cell's text: floats to 4 significant digits, large numbers with separators, lists joined."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if abs(value) >= 10_000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {format_value(item)}" for key, item in value.items())
    return str(value)


def parse_pairs(text: str | None) -> list[tuple[str, str]] | None:
    """``"a=Label A; b"`` -> [("a", "Label A"), ("b", "b")]."""
    if not text:
        return None
    pairs = []
    for item in text.split(";"):
        item = " ".join(item.split())
        if item:
            key, _, label = item.partition("=")
            pairs.append((key.strip(), label.strip() or key.strip()))
    return pairs


def read_rows(path: Path, *, part: str | None, index: str) -> tuple[list[str], list[dict]]:
    """The columns and rows of a JSON or CSV results file."""
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    data = json.loads(path.read_text())
    for key in part.split(".") if part else []:
        if not isinstance(data, dict) or key not in data:
            found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path.name} has no key {key!r} at this level (it has: {found})")
        data = data[key]
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        columns = list(dict.fromkeys(key for row in data for key in row))
        return columns, data
    if isinstance(data, dict) and data and all(isinstance(row, dict) for row in data.values()):
        columns = [index, *dict.fromkeys(key for row in data.values() for key in row)]
        return columns, [{index: name, **row} for name, row in data.items()]
    if isinstance(data, dict):
        return ["measure", "value"], [{"measure": key, "value": value} for key, value in data.items()]
    raise ValueError(f"{path.name}: the part shown must be an object or a list of objects, not "
                     f"{type(data).__name__}; choose one with :path:")


class ResultsTable(SphinxDirective):
    """Render a JSON or CSV results file as a table (see the module docstring)."""

    required_arguments = 1
    has_content = False
    option_spec = {
        "path": directives.unchanged,
        "columns": directives.unchanged,
        "rows": directives.unchanged,
        "index": directives.unchanged,
        "caption": directives.unchanged,
    }

    def run(self):
        root = Path(self.env.srcdir).parent
        source = root / self.arguments[0]
        if not source.is_file():
            raise self.error(f"results-table: {self.arguments[0]} does not exist (paths are from the repository "
                             f"root, e.g. benchmarks/results/loop_parity.json)")
        self.env.note_dependency(str(source))
        try:
            columns, rows = read_rows(source, part=self.options.get("path"),
                                      index=self.options.get("index", "setting"))
        except ValueError as err:
            raise self.error(f"results-table: {err}") from err
        wanted = parse_pairs(self.options.get("columns")) or [(column, column) for column in columns]
        missing = [key for key, _ in wanted if key not in columns]
        if missing:
            raise self.error(f"results-table: {self.arguments[0]} has no column {missing}; it has {columns}")
        keep = parse_pairs(self.options.get("rows"))
        if keep:
            first = columns[0]
            by_name = {str(row.get(first)): row for row in rows}
            absent = [name for name, _ in keep if name not in by_name]
            if absent:
                raise self.error(f"results-table: {self.arguments[0]} has no row {absent}; it has {list(by_name)}")
            rows = [{**by_name[name], first: label} for name, label in keep]
        return [self.build_table(wanted, rows)]

    def build_table(self, wanted, rows):
        table = nodes.table(classes=["results-table"])
        table["source_file"] = self.arguments[0]
        caption = self.options.get("caption")
        if caption:
            table += nodes.title(caption, "", *self.inline(caption))
        group = nodes.tgroup(cols=len(wanted))
        table += group
        for _ in wanted:
            group += nodes.colspec(colwidth=1)
        head = nodes.thead()
        group += head
        head += self.row([label for _, label in wanted])
        body = nodes.tbody()
        group += body
        for row in rows:
            body += self.row([format_value(row.get(key)) for key, _ in wanted])
        return table

    def row(self, cells):
        row = nodes.row()
        for text in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *self.inline(text))
            row += entry
        return row

    def inline(self, text: str):
        parsed, messages = self.state.inline_text(text, self.lineno)
        return [*parsed, *messages]


def setup(app):
    app.add_directive("results-table", ResultsTable)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
