"""The figure a sweep's grid calls for, and the gap between two settings.

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

``x``, ``hue`` and ``metric`` override the choice. :func:`plot` draws it; the same names are importable
from :mod:`workbench.report`, and ``plot`` from :mod:`workbench.sweeps`::

    result = wb.run_sweep("notebooks/sweeps/transfer_curve.yaml", workers=2)
    wb.sweeps.plot(result)                              # test_macro_f1 against label_fraction
    wb.sweeps.plot(result, x="label_fraction", hue="pretrained_checkpoint", metric="test_accuracy")

This module sits below :mod:`workbench.sweeps`, which draws ``comparison.png`` with it at the end of a
sweep, and below :mod:`workbench.report`, which embeds the same figure in ``report.html``.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .sweep_results import available_metrics, column_values, grid_keys_of, is_missing, load_result

__all__ = ["FigureChoice", "choose_figure", "plot", "transfer_gap", "save_figure", "grid_keys_of",
           "available_metrics"]

LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


# --------------------------------------------------------------------------------------------
# what to draw
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureChoice:
    """What :func:`~workbench.sweep_plots.plot` draws for a sweep.

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


def choose_figure(result, *, x: str | None = None, hue: str | None = None, metric: str | None = None) -> FigureChoice:
    """Pick the figure for a sweep from its grid (see the module docstring); arguments override the choice.

    Parameters
    ----------
    result
        A :class:`~workbench.sweeps.SweepResult` (from ``run_sweep``, ``collect`` or
        :func:`~workbench.sweep_results.load_result`).
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
    levels = column_values(frame, choice.hue)
    if choice.hue is None or len(levels) != 2 or "seed" not in frame.columns or frame["seed"].isna().any():
        return frame, 0
    keys = [k for k in (*choice.others, choice.x) if k is not None] + ["seed"]
    plain = frame[keys].astype(object).where(frame[keys].notna(), None)
    ids = [tuple(row) for row in plain.itertuples(index=False)]
    hues = frame[choice.hue].tolist()
    both = ({i for i, h in zip(ids, hues) if h == levels[0]} & {i for i, h in zip(ids, hues) if h == levels[1]})
    compared = ({i[:-1] for i, h in zip(ids, hues) if h == levels[0]}
                & {i[:-1] for i, h in zip(ids, hues) if h == levels[1]})  # points where both settings have runs
    keep = [i in both or i[:-1] not in compared or is_missing(h) for i, h in zip(ids, hues)]
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
        As in :func:`~workbench.sweep_plots.choose_figure` (defaults chosen the same way).

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
    levels = column_values(everything, choice.hue)
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
        A :class:`~workbench.sweeps.SweepResult`, or a sweep folder (read with
        :func:`~workbench.sweep_results.load_result`).
    x, hue, metric
        See :func:`~workbench.sweep_plots.choose_figure`.

    Returns
    -------
    matplotlib.figure.Figure
        A curve (with a gap panel when the hue has two values) or grouped points.
    """
    if isinstance(result, (str, os.PathLike)):
        result = load_result(result)
    choice = choose_figure(result, x=x, hue=hue, metric=metric)
    lines = _line_table(result, choice)
    levels = column_values(_ok_runs(result, choice.metric), choice.hue)
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
        combos = list(dict.fromkeys(tuple(None if is_missing(v) else v for v in row)
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
    categories = column_values(lines, x_col)
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
    """Draw :func:`~workbench.sweep_plots.plot` into ``path`` (PNG) and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    figure = plot(result, x=x, hue=hue, metric=metric)
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
