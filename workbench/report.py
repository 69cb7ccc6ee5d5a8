"""Read a sweep at a glance: a one-file HTML report of a sweep folder.

:func:`write_html` writes ``<sweep folder>/report.html``: one file with its figures embedded,
that opens in a browser with no server. It holds the spec, the summary table (mean ± std),
the figure and the gap table, one row per run (status, the parameters that differ from the
notebook's defaults, its metrics, the error line of a failed run and a link to its executed
notebook rendered as HTML by nbconvert, ``<run folder>/notebook.html``, linked by a relative
path), the package versions and the date.

The figure and the gap table come from :mod:`workbench.sweep_plots` (:func:`choose_figure`,
:func:`plot`, :func:`transfer_gap`), and a sweep folder is read by
:func:`workbench.sweep_results.load_result`; those names are importable from here too.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import platform
from pathlib import Path
from urllib.parse import quote

from .sweep_plots import FigureChoice, choose_figure, plot, save_figure, transfer_gap
from .sweep_results import (
    SPEC_FILE,
    available_metrics,
    column_values,
    grid_keys_of,
    is_missing,
    load_result,
    notebook_of,
    read_spec,
    save_spec,
)

__all__ = ["FigureChoice", "choose_figure", "plot", "transfer_gap", "load_result", "save_spec", "save_figure",
           "render_notebook", "write_html", "grid_keys_of", "SPEC_FILE", "REPORT_FILE"]

REPORT_FILE = "report.html"
#: Parameters a run folder records that say nothing about the experiment.
NOT_SETTINGS = ("output_dir", "interactive", "versions")
#: Columns of results.csv that are not parameters or metrics.
RUN_COLUMNS = ("run_id", "status", "error", "failed_cell", "seconds")


#: nbconvert's lab template without the two scripts it would fetch from a CDN (require.js, MathJax):
#: the page needs neither (no widgets under papermill) and must open offline.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def html_exporter():
    """nbconvert's HTMLExporter with the lab look, figures embedded, and nothing fetched from the network."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(extra_loaders=[DictLoader({"workbench_offline.html.j2": OFFLINE_TEMPLATE})],
                        template_file="workbench_offline.html.j2")


def render_notebook(notebook: str | os.PathLike, *, exporter=None) -> Path:
    """Render an executed notebook to HTML next to it (``notebook.html``), unless that is newer already.

    Figures are embedded in the page; it opens with no server and fetches nothing.
    """
    notebook = Path(notebook)
    target = notebook.with_suffix(".html")
    if target.is_file() and target.stat().st_mtime >= notebook.stat().st_mtime:
        return target
    import nbformat

    exporter = exporter or html_exporter()
    title = f"{notebook.parent.name}/{notebook.name}"
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4),
                                          resources={"metadata": {"name": title}})
    partial = target.with_name(target.name + ".partial")
    partial.write_text(body, encoding="utf-8")
    partial.replace(target)
    return target


# --------------------------------------------------------------------------------------------
# the HTML report
# --------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fff0f0; } tr.pending td { background: #f7f7f7; color: #777; }
span.status-ok { color: #17692b; font-weight: 600; } span.status-failed { color: #b00020; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.7em; overflow-x: auto; font-size: 0.85em; }
img.figure { max-width: 100%; border: 1px solid #eee; }
div.wide { overflow-x: auto; } td.num { white-space: nowrap; }
.error { color: #b00020; font-family: ui-monospace, monospace; font-size: 0.95em; }
details summary { cursor: pointer; color: #555; }
"""


def write_html(folder, *, x: str | None = None, hue: str | None = None, metric: str | None = None,
               render_notebooks: bool = True, path: str | os.PathLike | None = None) -> Path:
    """Write the sweep's one-file HTML report (see the module docstring); returns its path.

    Parameters
    ----------
    folder
        The sweep folder, or a :class:`~workbench.sweeps.SweepResult`.
    x, hue, metric
        Override the figure's choice (see :func:`choose_figure`).
    render_notebooks
        Render each run's executed notebook to ``notebook.html`` with nbconvert (skipped where
        that file is newer than the notebook already).
    path
        Where to write; default ``<folder>/report.html``. The links are relative to it.
    """
    result = folder if hasattr(folder, "results") else load_result(folder)
    folder = Path(result.path)
    target = Path(path) if path is not None else folder / REPORT_FILE
    results = result.results
    notebook = notebook_of(folder, results)
    spec = read_spec(folder) or _spec_from_results(result, notebook)
    choice = None
    figure_html, gap_html = "<p>No figure: no run has finished with a numeric metric yet.</p>", ""
    if available_metrics(result) and (results["status"] == "ok").any():
        choice = choose_figure(result, x=x, hue=hue, metric=metric)
        figure_html = _figure_html(result, choice)
        gap = transfer_gap(result, x=choice.x, hue=choice.hue, metric=choice.metric)
        if gap is not None and len(gap):
            gap_html = _gap_html(gap, choice)
    headline = _headline_metrics(notebook, result, choice)
    links = _render_all(folder, results, target.parent) if render_notebooks else {}
    defaults = _defaults(notebook)
    n_ok = int((results["status"] == "ok").sum())
    n_failed = int((results["status"] == "failed").sum())
    n_pending = len(results) - n_ok - n_failed
    n_stale = _count_stale(folder, results, notebook)
    stale = (f" {n_stale} finished run(s) were made by an earlier or unknown version of {notebook.name}; "
             "their results are shown (<code>workbench sweep SPEC --rerun-stale</code> runs them again)."
             if n_stale else "")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sweep {_e(result.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>sweep {_e(result.name)}</h1>",
        f'<p id="counts">{len(results)} runs: {n_ok} ok, {n_failed} failed'
        + (f", {n_pending} pending" if n_pending else "") + f". Report written {now}.{stale}</p>",
        "<h2>Figure</h2>", figure_html, gap_html,
        "<h2>Summary (mean ± std over seeds)</h2>", _summary_html(result, headline),
        "<h2>Runs</h2>", _runs_html(result, folder, target.parent, headline=headline, defaults=defaults, links=links),
        "<h2>Spec</h2>", f'<pre id="spec">{_e(_as_yaml(spec))}</pre>',
        "<h2>Environment</h2>", _environment_html(folder, results, now),
        "</body></html>",
    ]
    target.write_text("\n".join(parts), encoding="utf-8")
    return target


def _e(value) -> str:
    return html.escape("" if is_missing(value) else str(value))


def _figure_html(result, choice: FigureChoice) -> str:
    import matplotlib.pyplot as plt

    figure = plot(result, x=choice.x, hue=choice.hue, metric=choice.metric)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    what = (f"{choice.metric} against {choice.x}" + (" (log axis)" if choice.log_x else "")
            if choice.kind == "curve" else f"{choice.metric} per {choice.x or 'setting'}")
    colour = f"; colour: {choice.hue}" if choice.hue else ""
    style = f"; line style: {', '.join(choice.others)}" if choice.others else ""
    return (f'<p class="caption">{_e(what)}{_e(colour)}{_e(style)}.</p>'
            f'<img class="figure" id="figure" alt="{_e(what)}" src="data:image/png;base64,{data}">')


def _gap_html(gap, choice: FigureChoice) -> str:
    a, b, hue = gap.attrs["a"], gap.attrs["b"], gap.attrs["hue"]
    keys = [k for k in (*choice.others, choice.x) if k is not None and k in gap.columns]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    head += f"<th>{_e(hue)}={_e(a)}</th><th>{_e(hue)}={_e(b)}</th><th>gap ({_e(a)} − {_e(b)})</th><th>pairs</th>"
    rows = []
    for row in gap.to_dict(orient="records"):
        cells = "".join(f"<td>{_e(row[k])}</td>" for k in keys)
        cells += (f'<td class="num">{_fmt(row[f"{a}_mean"])}</td><td class="num">{_fmt(row[f"{b}_mean"])}</td>'
                  f'<td class="num">{_fmt(row["gap_mean"])} ± {_fmt(row["gap_std"])}</td>'
                  f'<td class="num">{row["n_pairs"]}</td>')
        rows.append(f"<tr>{cells}</tr>")
    how = "per-seed differences (runs paired by seed)" if gap.attrs["paired"] else "difference of the means"
    if gap.attrs.get("unpaired"):
        how += (f"; every column, and the figure, over the same pairs: {gap.attrs['unpaired']} finished run(s) whose "
                f"seed did not finish under the other {hue} are left out")
    return (f"<h3>Gap in {_e(choice.metric)}: {_e(hue)}={_e(a)} minus {_e(b)}</h3>"
            f"<p>mean ± std of the {_e(how)}.</p>"
            f'<table id="gap"><tr>{head}</tr>{"".join(rows)}</table>')


def _fmt(value, digits: int = 4) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _headline_metrics(notebook: Path | None, result, choice: FigureChoice | None) -> list[str]:
    """The metrics shown in the tables: the figure's, then the workflow's headline ones (all numeric ones without)."""
    from .workflow import headline_metrics

    available = available_metrics(result)
    try:
        named = list(headline_metrics(notebook))
    except ImportError:
        named = []
    wanted = [choice.metric] if choice else []
    wanted += [m for m in named if m in available] or available[:6]
    return list(dict.fromkeys(wanted))


def _summary_html(result, metrics: list[str]) -> str:
    summary = result.summary
    keys = grid_keys_of(result)
    labels = keys or ["setting"]  # the grid's columns say what the setting label says
    head = "".join(f"<th>{_e(c)}</th>" for c in [*labels, "n", "n_failed", *metrics])
    rows = []
    for row in summary.to_dict(orient="records"):
        cells = "".join(f"<td>{_e(row.get(c))}</td>" for c in labels)
        cells += f'<td class="num">{_e(row.get("n"))}</td><td class="num">{_e(row.get("n_failed"))}</td>'
        for m in metrics:
            mean, std = row.get(f"{m}_mean"), row.get(f"{m}_std")
            text = "" if is_missing(mean) else _fmt(mean) + ("" if is_missing(std) else f" ± {_fmt(std)}")
            cells += f'<td class="num">{text}</td>'
        rows.append(f"<tr>{cells}</tr>")
    return f'<div class="wide"><table id="summary"><tr>{head}</tr>{"".join(rows)}</table></div>'


def _count_stale(folder: Path, results, notebook: Path | None) -> int:
    """Finished runs whose status.json records another version of the notebook than the one there now."""
    if notebook is None:
        return 0
    from .execute import notebook_sha256

    version, stale = notebook_sha256(notebook), 0
    for rid in results.loc[results["status"] == "ok", "run_id"]:
        try:
            status = json.loads((folder / rid / "status.json").read_text())
        except (OSError, ValueError):
            continue
        stale += status.get("notebook_sha256") != version
    return stale


def _render_all(folder: Path, results, base: Path) -> dict[str, str]:
    """``{run_id: relative link}`` to each run's nbconvert HTML (runs without an executed notebook get none)."""
    exporter = None
    links = {}
    for rid in results["run_id"]:
        executed = folder / rid / "notebook.ipynb"
        if not executed.is_file():
            continue
        exporter = exporter or html_exporter()
        try:
            page = render_notebook(executed, exporter=exporter)
        except Exception:  # noqa: BLE001 - a notebook that cannot be rendered gets no link, the report goes on
            continue
        links[rid] = _relative_link(page, base)
    return links


def _relative_link(target: Path, base: Path) -> str:
    relative = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return "/".join(quote(part) for part in relative.split("/"))


def _defaults(notebook: Path | None) -> dict:
    if notebook is None:
        return {}
    from .execute import notebook_defaults

    try:
        return notebook_defaults(notebook)
    except Exception:  # noqa: BLE001 - without defaults the report shows the parameters the sweep set
        return {}


def _differs(value, default) -> bool:
    if isinstance(value, (int, float)) and isinstance(default, (int, float)) and not isinstance(value, bool):
        return not math.isclose(float(value), float(default))
    return value != default


def _run_parameters(result, folder: Path, rid: str, row: dict, defaults: dict) -> dict:
    """The run's parameters that differ from the notebook's defaults (its params.json; else the sweep's columns)."""
    try:
        params = json.loads((folder / rid / "params.json").read_text())
    except (OSError, ValueError):
        params = {k: row[k] for k in [*grid_keys_of(result), "seed"] if k in row}
    shown = {}
    for name, value in params.items():
        if name in NOT_SETTINGS or is_missing(value):
            continue
        if name in defaults and not _differs(value, defaults[name]):
            continue
        shown[name] = value
    return shown


def _runs_html(result, folder: Path, base: Path, *, headline: list[str], defaults: dict, links: dict) -> str:
    available = available_metrics(result)
    head = ("<tr><th>run</th><th>status</th><th>parameters (not the notebook's defaults)</th>"
            + "".join(f"<th>{_e(m)}</th>" for m in headline) + "<th>error</th><th>notebook</th></tr>")
    rows = []
    for row in result.results.to_dict(orient="records"):
        rid, status = row["run_id"], row["status"]
        params = _run_parameters(result, folder, rid, row, defaults)
        param_text = ", ".join(f"{k}={v}" for k, v in params.items())
        values = [_fmt(row.get(m)) for m in headline]
        others = {m: row.get(m) for m in available if m not in headline and not is_missing(row.get(m))}
        if others and values:  # the other metrics fold out of the last metric's cell
            listed = "<br>".join(f"{_e(k)}: {_fmt(v)}" for k, v in others.items())
            values[-1] += f"<details><summary>all</summary>{listed}</details>"
        metric_cells = "".join(f'<td class="num">{value}</td>' for value in values)
        error = "" if is_missing(row.get("error")) else str(row["error"]).strip().splitlines()[0]
        link = links.get(rid)
        run_folder = _relative_link(folder / rid, base) + "/"
        notebook_cell = (f'<a class="notebook" href="{_e(link)}">executed notebook</a>' if link else "(none)")
        rows.append(
            f'<tr class="run {_e(status)}" id="run-{_e(rid)}"><td><a class="folder" href="{_e(run_folder)}">'
            f"{_e(rid)}</a></td><td><span class=\"status-{_e(status)}\">{_e(status)}</span>"
            + (f"<br>{_fmt(row.get('seconds'), 1)} s" if not is_missing(row.get("seconds")) else "")
            + f"</td><td>{_e(param_text)}</td>{metric_cells}<td class=\"error\">{_e(error)}</td>"
            f"<td>{notebook_cell}</td></tr>")
    return f'<div class="wide"><table id="runs">{head}{"".join(rows)}</table></div>'


def _spec_from_results(result, notebook: Path | None) -> dict:
    """The spec as far as the folder tells it, for sweeps written before spec.json existed."""
    results = result.results
    grid = {k: column_values(results, k) for k in grid_keys_of(result)}
    spec = {"name": result.name, "notebook": str(notebook) if notebook else "(unknown)", "grid": grid}
    if "seed" in results:
        spec["seeds"] = column_values(results, "seed")
    spec["note"] = "reconstructed from results.csv (this sweep folder has no spec.json)"
    return spec


def _as_yaml(spec: dict) -> str:
    import yaml

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value.item() if hasattr(value, "item") else value

    return yaml.safe_dump(plain(spec), sort_keys=False, default_flow_style=None)


def _environment_html(folder: Path, results, now: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    runs_with = {}
    for rid in results["run_id"]:
        try:
            runs_with = json.loads((folder / rid / "params.json").read_text()).get("versions") or {}
        except (OSError, ValueError):
            continue
        if runs_with:
            break
    report_with = {"python": platform.python_version()}
    for package in ("workbench", "pandas", "matplotlib", "nbconvert", "papermill"):
        try:
            report_with[package] = version(package)
        except PackageNotFoundError:
            continue

    def table(versions: dict, table_id: str) -> str:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in versions.items())
        return f'<table id="{table_id}"><tr><th>package</th><th>version</th></tr>{rows}</table>'

    parts = [f'<p>Report written <span id="date">{_e(now)}</span> on {_e(platform.platform(terse=True))}.</p>']
    if runs_with:
        parts.append("<p>The runs recorded (params.json):</p>" + table(runs_with, "versions-runs"))
    parts.append("<p>The report was made with:</p>" + table(report_with, "versions-report"))
    return "".join(parts)
