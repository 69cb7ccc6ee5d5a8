"""Read a sweep at a glance: the figure its grid calls for, the gap between two settings, and a one-file HTML report.

The figure
    :func:`choose_figure` reads the grid and picks what to draw:

    - When a grid parameter is numeric (``label_fraction``, ``learning_rate``,
      ``lora_rank``), the metric is drawn against it: one line per value of the other grid
      parameters, the mean over seeds with a band of ± one standard deviation, and a log axis
      when the values span more than a decade. The first other grid parameter sets the colour
      (the *hue*), any further ones the line style. Runs that lack the numeric parameter (a
      full fine-tune next to LoRA ranks) are drawn as dashed horizontal lines.
    - When the hue has exactly two values (``pretrained_checkpoint: [pretrain, none]``), a
      second panel shows the gap between them, first minus second as the grid lists them, at
      each x: paired by seed where the runs have one, mean ± std of the per-seed differences.
      :func:`transfer_gap` gives the same numbers as a table. Both panels and every column of
      the table are then over the same runs: a run whose seed did not finish under the other
      setting (a failed run's partner) is left out, and the figure and table say how many were.
    - Otherwise: grouped points with error bars (mean ± std), one group per value of the first
      grid parameter.

    ``x``, ``hue`` and ``metric`` override the choice. :func:`plot` draws it; it is also
    ``workbench.sweeps.plot``::

        result = wb.run_sweep("notebooks/sweeps/transfer_curve.yaml", workers=2)
        wb.sweeps.plot(result)                              # test_macro_f1 against label_fraction
        wb.sweeps.plot(result, x="label_fraction", hue="pretrained_checkpoint", metric="test_accuracy")

The HTML report
    :func:`write_html` writes ``<sweep folder>/report.html``: one file with its figures embedded,
    that opens in a browser with no server. It holds the spec, the summary table (mean ± std),
    the figure and the gap table, one row per run (status, the parameters that differ from the
    notebook's defaults, its metrics, the error line of a failed run and a link to its executed
    notebook rendered as HTML by nbconvert, ``<run folder>/notebook.html``, linked by a relative
    path), the package versions and the date.
"""

from __future__ import annotations

import base64
import datetime
import difflib
import html
import io
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

__all__ = ["FigureChoice", "choose_figure", "plot", "transfer_gap", "load_result", "save_spec", "save_figure",
           "render_notebook", "write_html", "grid_keys_of", "SPEC_FILE", "REPORT_FILE"]

SPEC_FILE = "spec.json"
REPORT_FILE = "report.html"
#: Parameters a run folder records that say nothing about the experiment.
NOT_SETTINGS = ("output_dir", "interactive", "versions")
#: Columns of results.csv that are not parameters or metrics.
RUN_COLUMNS = ("run_id", "status", "error", "failed_cell", "seconds")
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


# --------------------------------------------------------------------------------------------
# what to draw
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureChoice:
    """What :func:`plot` draws for a sweep.

    Attributes
    ----------
    kind
        ``"curve"``: the metric against a numeric ``x``; ``"points"``: grouped points with error bars.
    metric
        Final metric on the y axis.
    x
        Grid parameter on the x axis (None when the grid has no parameter at all).
    hue
        Grid parameter that sets the colour (None when there is no other grid parameter).
    others
        The remaining grid parameters; each combination gets its own line style.
    log_x
        Log x axis (curves whose x values are all positive and span more than a decade).
    """

    kind: Literal["curve", "points"]
    metric: str
    x: str | None
    hue: str | None
    others: tuple[str, ...] = ()
    log_x: bool = False


def grid_keys_of(result) -> list[str]:
    """The grid parameters of a sweep (without the seed): the summary's columns between ``setting`` and ``n``."""
    columns = list(result.summary.columns)
    if "setting" not in columns or "n" not in columns:
        return []
    return columns[columns.index("setting") + 1: columns.index("n")]


def available_metrics(result) -> list[str]:
    """Numeric final metrics of the sweep, in the summary's order."""
    return [c[: -len("_mean")] for c in result.summary.columns if str(c).endswith("_mean")]


def choose_figure(result, *, x: str | None = None, hue: str | None = None, metric: str | None = None) -> FigureChoice:
    """Pick the figure for a sweep from its grid (see the module docstring); arguments override the choice.

    Parameters
    ----------
    result
        A :class:`~workbench.sweeps.SweepResult` (from ``run_sweep``, ``collect`` or :func:`load_result`).
    x
        Grid parameter for the x axis. Default: the numeric grid parameter with the most values.
    hue
        Grid parameter for the colour. Default: the first other grid parameter.
    metric
        Final metric. Default: the sweep's ``metric``, else the first numeric one.

    Raises
    ------
    ValueError
        When ``x``, ``hue`` or ``metric`` is not in the sweep; the message lists what is.
    """
    keys = grid_keys_of(result)
    metric = _pick_metric(result, metric)
    for name, value in (("x", x), ("hue", hue)):
        if value is not None and value not in keys:
            raise ValueError(f"{name}={value!r} is not a grid parameter of sweep {result.name}; "
                             f"its grid parameters are {', '.join(keys) or '(none)'}{_did_you_mean(value, keys)}.")
    if x is not None and x == hue:
        raise ValueError(f"x and hue are both {x!r}; give hue another grid parameter "
                         f"({', '.join(k for k in keys if k != x) or 'there is none'}) or leave it out.")
    numeric = [k for k in keys if _is_numeric(result.results, k) and k != hue]
    if x is None:
        counts = {k: result.results[k].dropna().nunique() for k in numeric}
        candidates = [k for k in numeric if counts[k] >= 2]
        if candidates:
            x = max(candidates, key=lambda k: (counts[k], -keys.index(k)))
        else:
            x = next((k for k in keys if k != hue), None)
    rest = [k for k in keys if k != x]
    if hue is None:
        hue = rest[0] if rest else None
    others = tuple(k for k in rest if k != hue)
    if x is not None and x in numeric:
        values = result.results[x].dropna().astype(float)
        log_x = bool(len(values) and values.min() > 0 and values.max() / values.min() > 10)
        return FigureChoice("curve", metric, x, hue, others, log_x)
    return FigureChoice("points", metric, x, hue, others)


def _pick_metric(result, metric: str | None) -> str:
    available = available_metrics(result)
    if not available:
        raise ValueError(f"sweep {result.name} has no numeric final metric yet (no run finished ok?); "
                         "nothing to plot.")
    if metric is None:
        wanted = getattr(result, "metric", None)
        return wanted if wanted in available else available[0]
    if metric not in available:
        raise ValueError(f"metric={metric!r} is not a numeric final metric of sweep {result.name}; "
                         f"available: {', '.join(available)}{_did_you_mean(metric, available)}.")
    return metric


def _did_you_mean(value: str, options) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_numeric(frame, column: str) -> bool:
    import pandas as pd

    if column not in frame:
        return False
    values = frame[column]
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


# --------------------------------------------------------------------------------------------
# the numbers behind the figure
# --------------------------------------------------------------------------------------------


def _ok_runs(result, metric: str):
    frame = result.results
    return frame[(frame["status"] == "ok") & frame[metric].notna()].copy()


def _levels(frame, column: str | None) -> list:
    """Values of ``column`` in order of first appearance (grid order); missing values left out."""
    if column is None or column not in frame:
        return []
    return list(dict.fromkeys(v for v in frame[column].tolist() if not _missing(v)))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _rows_where(frame, columns, values):
    """The rows of ``frame`` whose ``columns`` equal ``values`` (None matches a missing value)."""
    import numpy as np

    mask = np.ones(len(frame), dtype=bool)
    for column, value in zip(columns, values):
        mask &= (frame[column].isna() if value is None else frame[column] == value).to_numpy()
    return frame[mask]


def _compared_runs(result, choice: FigureChoice):
    """The finished runs the figure and the gap use, and how many finished runs were left out.

    When the hue compares two settings over seeds, at a point (x and other parameters) where
    both settings have finished runs a run counts only if the run with the same seed finished
    under the other setting too: then every mean there (each curve's, the gap's) is over the
    same pairs. Points that only one setting has, and runs without a hue value, are kept.
    """
    frame = _ok_runs(result, choice.metric)
    levels = _levels(frame, choice.hue)
    if choice.hue is None or len(levels) != 2 or "seed" not in frame.columns or frame["seed"].isna().any():
        return frame, 0
    keys = [k for k in (*choice.others, choice.x) if k is not None] + ["seed"]
    plain = frame[keys].astype(object).where(frame[keys].notna(), None)
    ids = [tuple(row) for row in plain.itertuples(index=False)]
    hues = frame[choice.hue].tolist()
    both = ({i for i, h in zip(ids, hues) if h == levels[0]} & {i for i, h in zip(ids, hues) if h == levels[1]})
    compared = ({i[:-1] for i, h in zip(ids, hues) if h == levels[0]}
                & {i[:-1] for i, h in zip(ids, hues) if h == levels[1]})  # points where both settings have runs
    keep = [i in both or i[:-1] not in compared or _missing(h) for i, h in zip(ids, hues)]
    return frame[keep].copy(), len(keep) - sum(keep)


def _line_table(result, choice: FigureChoice):
    """Mean, std and n of the metric per (hue, others, x): one row per point of the figure (over paired runs)."""
    frame, left_out = _compared_runs(result, choice)
    by = [k for k in (choice.hue, *choice.others, choice.x) if k is not None]
    if not by:
        frame["_all"] = "all"
        by = ["_all"]
    frame[by] = frame[by].astype(object).where(frame[by].notna(), None)
    grouped = frame.groupby(by, sort=False, dropna=False)[choice.metric]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table.attrs["unpaired"] = left_out
    return table


def transfer_gap(result, *, x: str | None = None, hue: str | None = None, metric: str | None = None):
    """The gap between the two values of the hue parameter, at each x: ``first - second`` as the grid lists them.

    Where the runs have a ``seed``, the runs of the two settings with the same seed (and the same
    other parameters) are paired and the gap is the mean ± std of the per-seed differences; the
    two means are over the same pairs (so ``gap_mean = <a>_mean - <b>_mean``), and a run whose
    partner did not finish is left out of every column (``n_unpaired`` counts them).
    Without seeds it is the difference of the means, with ``sqrt(std_a**2 + std_b**2)`` as spread.

    Parameters
    ----------
    result
        A :class:`~workbench.sweeps.SweepResult`.
    x, hue, metric
        As in :func:`choose_figure` (defaults chosen the same way).

    Returns
    -------
    pandas.DataFrame or None
        One row per x value (and combination of the other grid parameters): the x and other
        columns, ``<a>_mean``, ``<b>_mean``, ``gap_mean``, ``gap_std``, ``n_pairs``,
        ``n_unpaired``; the frame's ``attrs`` hold ``hue``, ``a``, ``b``, ``metric``, ``paired``
        and ``unpaired`` (runs left out in all). None when the hue does not have exactly two values.
    """
    import numpy as np
    import pandas as pd

    choice = choose_figure(result, x=x, hue=hue, metric=metric)
    everything = _ok_runs(result, choice.metric)
    levels = _levels(everything, choice.hue)
    if choice.hue is None or len(levels) != 2:
        return None
    a, b = levels
    frame, left_out = _compared_runs(result, choice)
    keys = [k for k in (*choice.others, choice.x) if k is not None]
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), None)
    everything[keys] = everything[keys].astype(object).where(everything[keys].notna(), None)
    side_a, side_b = frame[frame[choice.hue] == a], frame[frame[choice.hue] == b]
    paired = "seed" in frame.columns and frame["seed"].notna().all()
    rows = []
    groups = side_a.groupby(keys, sort=False, dropna=False) if keys else [((), side_a)]
    for values, group_a in groups:
        values = values if isinstance(values, tuple) else (values,)
        group_b = _rows_where(side_b, keys, values)
        if group_b.empty:
            continue
        row = dict(zip(keys, values))
        finished = _rows_where(everything[everything[choice.hue].isin(levels)], keys, values)
        row["n_unpaired"] = len(finished) - len(group_a) - len(group_b)
        row[f"{a}_mean"], row[f"{b}_mean"] = group_a[choice.metric].mean(), group_b[choice.metric].mean()
        if paired:
            both = group_a[["seed", choice.metric]].merge(group_b[["seed", choice.metric]], on="seed")
            diff = both[f"{choice.metric}_x"] - both[f"{choice.metric}_y"]
            row.update(gap_mean=diff.mean(), gap_std=diff.std(), n_pairs=len(diff))
        else:
            spread = math.sqrt(np.nan_to_num(group_a[choice.metric].var()) + np.nan_to_num(group_b[choice.metric].var()))
            row.update(gap_mean=row[f"{a}_mean"] - row[f"{b}_mean"], gap_std=spread, n_pairs=0)
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*keys, f"{a}_mean", f"{b}_mean", "gap_mean", "gap_std", "n_pairs",
                                        "n_unpaired"])
    if choice.x in keys and choice.kind == "curve":
        table = table.sort_values([*choice.others, choice.x], kind="stable").reset_index(drop=True)
    table.attrs.update(hue=choice.hue, a=a, b=b, metric=choice.metric, paired=paired, unpaired=left_out)
    return table


# --------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------


def plot(result, *, x: str | None = None, hue: str | None = None, metric: str | None = None):
    """The figure a sweep's grid calls for (see the module docstring); ``x``, ``hue``, ``metric`` override.

    Parameters
    ----------
    result
        A :class:`~workbench.sweeps.SweepResult`, or a sweep folder (read with :func:`load_result`).
    x, hue, metric
        See :func:`choose_figure`.

    Returns
    -------
    matplotlib.figure.Figure
        A curve (with a gap panel when the hue has two values) or grouped points.
    """
    if isinstance(result, (str, os.PathLike)):
        result = load_result(result)
    choice = choose_figure(result, x=x, hue=hue, metric=metric)
    lines = _line_table(result, choice)
    levels = _levels(_ok_runs(result, choice.metric), choice.hue)
    if choice.kind == "curve":
        gap = transfer_gap(result, x=choice.x, hue=choice.hue, metric=choice.metric)
        return _draw_curves(lines, choice, gap=gap, levels=levels, name=result.name)
    return _draw_points(lines, choice, levels=levels, name=result.name)


def _styles(lines, choice: FigureChoice, levels: list):
    """Colour per hue value, line style and marker per combination of the other parameters."""
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {v: colours[i % len(colours)] for i, v in enumerate(levels)}
    combos = [()]
    if choice.others:  # (itertuples over no columns yields nothing)
        combos = list(dict.fromkeys(tuple(None if _missing(v) else v for v in row)
                                    for row in lines[list(choice.others)].itertuples(index=False)))
    style = {c: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]) for i, c in enumerate(combos)}
    return colour, style


def _label(choice: FigureChoice, hue_value, combo: tuple) -> str:
    parts = [f"{choice.hue}={hue_value}"] if choice.hue is not None else []
    parts += [f"{k}={v}" for k, v in zip(choice.others, combo) if v is not None]
    return ", ".join(parts) or choice.metric


def _draw_curves(lines, choice: FigureChoice, *, gap, levels: list, name: str):
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    panels = 2 if gap is not None and len(gap) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), layout="constrained", squeeze=False)
    ax = axes[0, 0]
    colour, style = _styles(lines, choice, levels)
    hues = levels or [None]
    n_max = int(lines["count"].max()) if len(lines) else 0
    for hue_value in hues:
        part = lines if choice.hue is None else lines[lines[choice.hue] == hue_value]
        for combo, (linestyle, marker) in style.items():
            line = _rows_where(part, choice.others, combo)
            if line.empty:
                continue
            label, c = _label(choice, hue_value, combo), colour.get(hue_value)
            on_axis = line[line[choice.x].notna()].sort_values(choice.x)
            if len(on_axis):
                xs = on_axis[choice.x].astype(float).to_numpy()
                mean, std = on_axis["mean"].to_numpy(float), np.nan_to_num(on_axis["std"].to_numpy(float))
                drawn = ax.plot(xs, mean, linestyle=linestyle, marker=marker, color=c, label=label)[0]
                ax.fill_between(xs, mean - std, mean + std, color=drawn.get_color(), alpha=0.18, linewidth=0)
            for row in line[line[choice.x].isna()].itertuples():  # no x: a reference level across the axis
                dashes = linestyle if linestyle != "-" else (0, (5, 3))  # never solid: it is no curve
                drawn = ax.axhline(row.mean, linestyle=dashes, color=c, label=f"{label} (no {choice.x})")
                if not math.isnan(row.std):
                    ax.axhspan(row.mean - row.std, row.mean + row.std, color=drawn.get_color(), alpha=0.08)
    ticks = sorted({float(v) for v in lines[choice.x].dropna()})
    for axis in axes[0]:
        if choice.log_x:
            axis.set_xscale("log")
        if 0 < len(ticks) <= 10:
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(choice.x + (" (log scale)" if choice.log_x else ""))
        axis.grid(alpha=0.3)
    ax.set_ylabel(choice.metric)
    left_out = lines.attrs.get("unpaired", 0)
    unpaired = f"; {left_out} run(s) whose seed did not finish under the other {choice.hue} left out" if left_out else ""
    ax.set_title(f"{name}: {choice.metric} vs {choice.x}\nmean ± std over seeds (up to {n_max} runs per point)"
                 f"{unpaired}", fontsize=10)
    ax.legend(fontsize=8)
    if panels == 2:
        _draw_gap(axes[0, 1], gap, choice, style)
    return fig


def _draw_gap(ax, gap, choice: FigureChoice, style: dict) -> None:
    import numpy as np

    a, b, paired = gap.attrs["a"], gap.attrs["b"], gap.attrs["paired"]
    ax.axhline(0.0, color="0.4", linewidth=1)
    for combo, (linestyle, marker) in style.items():
        part = _rows_where(gap, choice.others, combo)
        part = part[part[choice.x].notna()].sort_values(choice.x)
        if part.empty:
            continue
        xs = part[choice.x].astype(float).to_numpy()
        mean, std = part["gap_mean"].to_numpy(float), np.nan_to_num(part["gap_std"].to_numpy(float))
        label = ", ".join(f"{k}={v}" for k, v in zip(choice.others, combo) if v is not None) or f"{a} − {b}"
        drawn = ax.plot(xs, mean, linestyle=linestyle, marker=marker, color="k", label=label)[0]
        ax.fill_between(xs, mean - std, mean + std, color=drawn.get_color(), alpha=0.15, linewidth=0)
    ax.set_ylabel(f"Δ {choice.metric}")
    spread = "per-seed differences" if paired else "difference of means"
    ax.set_title(f"gap {choice.hue}: {a} − {b}\nmean ± std of the {spread}", fontsize=10)
    ax.legend(fontsize=8)


def _draw_points(lines, choice: FigureChoice, *, levels: list, name: str):
    import matplotlib.pyplot as plt

    x_col = choice.x if choice.x is not None else "_all"
    categories = _levels(lines, x_col)
    colour, style = _styles(lines, choice, levels)
    series = [(h, combo) for h in (levels or [None]) for combo in style]
    width = 0.7 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(categories) + 2.5), 4.2), layout="constrained")
    for i, (hue_value, combo) in enumerate(series):
        part = lines if choice.hue is None else lines[lines[choice.hue] == hue_value]
        part = _rows_where(part, choice.others, combo)
        if part.empty:
            continue
        positions = [categories.index(v) + (i - (len(series) - 1) / 2) * width for v in part[x_col]]
        ax.errorbar(positions, part["mean"], yerr=part["std"].fillna(0.0), fmt=style[combo][1], capsize=4,
                    color=colour.get(hue_value), label=_label(choice, hue_value, combo) if len(series) > 1 else None)
    ax.set_xticks(range(len(categories)), [str(c) for c in categories],
                  rotation=30 if max((len(str(c)) for c in categories), default=0) > 10 else 0, ha="right"
                  if max((len(str(c)) for c in categories), default=0) > 10 else "center")
    ax.set_xlabel(choice.x or "")
    ax.set_ylabel(choice.metric)
    ax.set_title(f"{name}: {choice.metric}, mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def save_figure(result, path: str | os.PathLike, *, x: str | None = None, hue: str | None = None,
                metric: str | None = None) -> Path:
    """Draw :func:`plot` into ``path`` (PNG) and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    figure = plot(result, x=x, hue=hue, metric=metric)
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------
# a sweep folder
# --------------------------------------------------------------------------------------------


def save_spec(spec) -> Path:
    """Write the spec a sweep ran (``<sweep folder>/spec.json``), so that a report of the folder alone can show it."""
    record = {"name": spec.name, "notebook": str(spec.notebook), "parameters": spec.parameters, "grid": spec.grid,
              "seeds": spec.seeds, "metric": spec.metric, "output_root": str(spec.output_root)}
    path = Path(spec.path) / SPEC_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def load_result(folder: str | os.PathLike):
    """A :class:`~workbench.sweeps.SweepResult` from what a sweep folder holds (``results.csv``, ``summary.csv``).

    The metric comes from ``spec.json`` where the sweep wrote one (older folders have none).
    """
    import pandas as pd

    from .sweeps import SweepResult

    folder = Path(folder)
    missing = [name for name in ("results.csv", "summary.csv") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no {' or '.join(missing)}: it is not a sweep folder. Pass the folder "
                                "`workbench sweep` wrote (<output_root>/<name>), e.g. runs/sweeps/lr_schedule.")
    results = pd.read_csv(folder / "results.csv")
    summary = pd.read_csv(folder / "summary.csv")
    spec = _read_spec(folder)
    result = SweepResult(name=spec.get("name", folder.name), path=folder, results=results, summary=summary,
                         n_failed=int((results["status"] == "failed").sum()), n_executed=0, metric=spec.get("metric"))
    if result.metric is None:  # a folder without spec.json: the workflow's first headline metric
        from .workflow import headline_metrics

        available = available_metrics(result)
        try:
            named = headline_metrics(_notebook_of(folder, results))
        except ImportError:
            named = ()
        result.metric = next((m for m in named if m in available), None)
    return result


def _read_spec(folder: Path) -> dict:
    try:
        return json.loads((folder / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _notebook_of(folder: Path, results) -> Path | None:
    """The notebook the sweep ran: from spec.json, else from a run's status.json; None when it is gone."""
    candidates = [_read_spec(folder).get("notebook")]
    for rid in results["run_id"]:
        try:
            candidates.append(json.loads((folder / rid / "status.json").read_text()).get("notebook"))
            break
        except (OSError, ValueError):
            continue
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


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
    notebook = _notebook_of(folder, results)
    spec = _read_spec(folder) or _spec_from_results(result, notebook)
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
    return html.escape("" if _missing(value) else str(value))


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
    if _missing(value):
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
            text = "" if _missing(mean) else _fmt(mean) + ("" if _missing(std) else f" ± {_fmt(std)}")
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
        if name in NOT_SETTINGS or _missing(value):
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
        others = {m: row.get(m) for m in available if m not in headline and not _missing(row.get(m))}
        if others and values:  # the other metrics fold out of the last metric's cell
            listed = "<br>".join(f"{_e(k)}: {_fmt(v)}" for k, v in others.items())
            values[-1] += f"<details><summary>all</summary>{listed}</details>"
        metric_cells = "".join(f'<td class="num">{value}</td>' for value in values)
        error = "" if _missing(row.get("error")) else str(row["error"]).strip().splitlines()[0]
        link = links.get(rid)
        run_folder = _relative_link(folder / rid, base) + "/"
        notebook_cell = (f'<a class="notebook" href="{_e(link)}">executed notebook</a>' if link else "(none)")
        rows.append(
            f'<tr class="run {_e(status)}" id="run-{_e(rid)}"><td><a class="folder" href="{_e(run_folder)}">'
            f"{_e(rid)}</a></td><td><span class=\"status-{_e(status)}\">{_e(status)}</span>"
            + (f"<br>{_fmt(row.get('seconds'), 1)} s" if not _missing(row.get("seconds")) else "")
            + f"</td><td>{_e(param_text)}</td>{metric_cells}<td class=\"error\">{_e(error)}</td>"
            f"<td>{notebook_cell}</td></tr>")
    return f'<div class="wide"><table id="runs">{head}{"".join(rows)}</table></div>'


def _spec_from_results(result, notebook: Path | None) -> dict:
    """The spec as far as the folder tells it, for sweeps written before spec.json existed."""
    results = result.results
    grid = {k: _levels(results, k) for k in grid_keys_of(result)}
    spec = {"name": result.name, "notebook": str(notebook) if notebook else "(unknown)", "grid": grid}
    if "seed" in results:
        spec["seeds"] = _levels(results, "seed")
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
