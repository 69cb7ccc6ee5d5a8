"""Every matplotlib figure of the workbench.

Each function takes the result of a computation (a learning-rate curve, a fit history, a
confusion matrix, a sweep summary, predictions, a metrics table) and returns a
:class:`matplotlib.figure.Figure`. It computes nothing itself and neither shows nor saves::

    fig = plot_confusion_matrix(cm)                      # the cell's value: the notebook shows it once
    fig.savefig(run.path / "figures" / "confusion.png")  # saving is the caller's choice

The figure is closed in pyplot before it is returned, so it is displayed once (as the cell's
value) rather than twice, and loops that make many figures do not pile them up in memory.

Why this module is long: every figure of the workbench lives here by design, apart from the computing (like scanpy's
``pl``); each function is short and independent, and one module keeps their look (sizes, colours, closing the
figure) the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_lr_schedule",
    "plot_lr_find",
    "plot_history",
    "plot_confusion_matrix",
    "plot_sweep_comparison",
    "plot_predictions",
    "plot_metric_comparison",
    "plot_importance",
    "plot_roc_pr",
    "plot_recordings",
    "plot_embedding",
]


def _frame_of(obj, *, name: str) -> pd.DataFrame:
    """A DataFrame from a DataFrame or from any result object with ``to_frame()``."""
    if isinstance(obj, pd.DataFrame):
        return obj
    if hasattr(obj, "to_frame"):
        return obj.to_frame()
    raise TypeError(
        f"{name} must be a pandas DataFrame or an object with a to_frame() method, got {type(obj).__name__}."
    )


def _check_columns(frame: pd.DataFrame, wanted: Sequence[str], *, name: str) -> None:
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{name}: {', '.join(map(repr, missing))} not found. Available: {', '.join(map(str, frame.columns))}."
        )


# --------------------------------------------------------------------------------------------
# learning-rate schedule
# --------------------------------------------------------------------------------------------


def plot_lr_schedule(curve: pd.DataFrame, *, title: str | None = None) -> Figure:
    """The learning rate of each parameter group at every optimizer step.

    Parameters
    ----------
    curve
        Indexed by optimizer step, one column per parameter group, as returned by
        :func:`workbench.schedules.lr_curve`. ``curve.attrs`` may hold ``"schedule"``,
        ``"warmup_steps"`` and ``"total_steps"``; they go into the title, and the end of the
        warmup is marked with a dashed line.
    title
        Figure title; by default it describes the schedule.

    Returns
    -------
    matplotlib.figure.Figure
        One axis with one line per parameter group.
    """
    if isinstance(curve, pd.Series):
        curve = curve.to_frame(name=curve.name or "lr")
    curve = _frame_of(curve, name="curve")
    if curve.empty:
        raise ValueError("curve is empty; build it with workbench.schedules.lr_curve(..., total_steps=N), N > 0.")

    schedule = curve.attrs.get("schedule")
    warmup_steps = curve.attrs.get("warmup_steps") or 0
    total_steps = curve.attrs.get("total_steps")
    freeze_steps = curve.attrs.get("freeze_steps") or 0

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    styles = ["-", "--", ":", "-."]  # groups at the same rate overlap: a line style each keeps all visible
    for i, column in enumerate(curve.columns):
        ax.plot(curve.index, curve[column], label=str(column), linestyle=styles[i % len(styles)])
    if warmup_steps > 0:
        ax.axvline(warmup_steps, color="grey", linestyle="--", linewidth=1, label=f"end of warmup ({warmup_steps})")
    if freeze_steps > 0:
        ax.axvspan(0, freeze_steps, color="tab:blue", alpha=0.08, label=f"backbone frozen ({freeze_steps} steps)")

    if title is None:
        parts = [f"{schedule} schedule" if schedule else "Learning-rate schedule"]
        if warmup_steps:
            parts.append(f"warmup {warmup_steps} steps")
        if freeze_steps:
            parts.append(f"backbone frozen {freeze_steps}")
        if total_steps:
            parts.append(f"{total_steps} steps in total")
        title = ", ".join(parts)
    ax.set_title(title)
    ax.set_xlabel(curve.index.name or "step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(curve.columns) > 1 or warmup_steps > 0 or freeze_steps > 0:
        ax.legend(frameon=False)
    plt.close(fig)
    return fig


def plot_lr_find(result, *, title: str | None = None) -> Figure:
    """The loss against the learning rate of an LR range test, smoothed, with the suggestion marked.

    Parameters
    ----------
    result
        What :func:`workbench.lr_find` returns, or a frame with columns ``lr``, ``loss`` and
        ``smoothed`` whose ``attrs`` hold ``suggestion`` and ``rule`` (its ``to_frame()``).
    title
        Figure title; by default it names the suggestion and its rule.

    Returns
    -------
    matplotlib.figure.Figure
        One axis, log-scaled learning rate: the raw loss (faint), the smoothed loss, a dashed
        line at the suggested rate and a dotted one at each other rule's.
    """
    frame = _frame_of(result, name="result")
    _check_columns(frame, ["lr", "loss", "smoothed"], name="plot_lr_find")
    if frame.empty:
        raise ValueError("the LR range test recorded no step; run workbench.lr_find with num_steps >= 3.")
    suggestion, rule = frame.attrs.get("suggestion"), frame.attrs.get("rule")
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.plot(frame["lr"], frame["loss"], color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(frame["lr"], frame["smoothed"], color="tab:blue", label="smoothed loss")
    for name, value in (frame.attrs.get("suggestions") or {}).items():
        if name != rule:
            ax.axvline(value, color="grey", linestyle=":", linewidth=1, label=f"{name}: {value:.2g}")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested ({rule}): {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    # the end of a diverging run dwarfs the interesting part: cap the axis at a few times the start
    top = float(frame["smoothed"].iloc[: max(1, len(frame) // 10)].max())
    low = float(min(frame["loss"].min(), frame["smoothed"].min()))
    if np.isfinite(top) and np.isfinite(low) and top > low:
        ax.set_ylim(low - 0.05 * (top - low), top + 0.5 * (top - low))
    ax.set_title(title or (f"LR range test: suggested {suggestion:.2g} ({rule})" if suggestion else "LR range test"))
    ax.legend(frameon=False)
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# training history
# --------------------------------------------------------------------------------------------

_NOT_METRICS = {"epoch", "step", "global_step", "time", "seconds", "elapsed"}


def _is_metric_column(name: str) -> bool:
    """True for columns to draw in the metrics panel (not losses, lr, epoch, step or timing)."""
    lowered = name.lower()
    if "loss" in lowered or lowered.startswith("lr") or lowered in _NOT_METRICS:
        return False
    return not ("time" in lowered or lowered.endswith("_s") or lowered.endswith("_sec"))


def plot_history(history, *, metrics: Sequence[str] | None = None) -> Figure:
    """Losses and metrics per epoch of a training run.

    Parameters
    ----------
    history
        One row per epoch, with a column ``"epoch"``, loss columns (e.g. ``"train_loss"``,
        ``"val_loss"``) and metric columns (e.g. ``"val_accuracy"``); or any object whose
        ``to_frame()`` returns such a table (a fit history). When the frame's ``attrs`` (or the
        object) hold ``"best_epoch"``, that epoch is marked in every panel.
    metrics
        Metric columns for the right panel; by default every numeric column that is not a
        loss, a learning rate (``lr*``), the epoch/step counter or a timing.

    Returns
    -------
    matplotlib.figure.Figure
        Left axis: losses; right axis (when there are metrics): the other metrics.
    """
    frame = _frame_of(history, name="history")
    if frame.empty:
        raise ValueError("history has no rows yet; plot it after at least one epoch.")
    x = frame["epoch"] if "epoch" in frame.columns else pd.Series(np.arange(len(frame)), index=frame.index)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    losses = [c for c in numeric if "loss" in str(c).lower()]
    if metrics is None:
        metrics = [c for c in numeric if _is_metric_column(str(c))]
    else:
        metrics = list(metrics)
        _check_columns(frame, metrics, name="plot_history(metrics=...)")
    if not losses and not metrics:
        raise ValueError(
            f"history has no loss or metric columns to plot. Columns: {', '.join(map(str, frame.columns))}."
        )

    best_epoch = frame.attrs.get("best_epoch", getattr(history, "best_epoch", None))

    panels = [columns for columns in (losses, metrics) if columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False, layout="constrained")
    for ax, columns, ylabel in zip(axes[0], panels, ["loss" if losses else "metric", "metric"]):
        for column in columns:
            ax.plot(x, frame[column], marker="o", markersize=3, label=str(column))
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.legend(frameon=False, fontsize="small")
    axes[0][0].set_title("Loss" if losses else "Metrics")
    if len(panels) == 2:
        axes[0][1].set_title("Metrics")
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# confusion matrix
# --------------------------------------------------------------------------------------------


def plot_confusion_matrix(cm: pd.DataFrame, *, normalize: bool = True, title: str | None = None) -> Figure:
    """A confusion matrix as a heatmap with the counts written in each cell.

    Parameters
    ----------
    cm
        Counts with true classes as rows and predicted classes as columns, as returned by
        :func:`workbench.metrics.confusion_matrix`.
    normalize
        Color each row by its share of that true class (recall on the diagonal), so rare and
        common classes are equally readable; ``False`` colors by raw counts.
    title
        Figure title; default ``"Confusion matrix"``.

    Returns
    -------
    matplotlib.figure.Figure
        One heatmap axis plus its colorbar.
    """
    if not isinstance(cm, pd.DataFrame):
        cm = pd.DataFrame(np.asarray(cm))
    if cm.shape[0] != cm.shape[1] or cm.empty:
        raise ValueError(
            f"cm must be a square table (true classes x predicted classes), got shape {cm.shape}. "
            f"Build it with workbench.metrics.confusion_matrix(y_true, y_pred, labels=classes)."
        )
    counts = cm.to_numpy()
    if normalize:
        row_totals = counts.sum(axis=1, keepdims=True)
        colors = np.divide(counts, row_totals, out=np.zeros(counts.shape, dtype=float), where=row_totals > 0)
        color_label, vmax = "share of true class", 1.0
    else:
        colors = counts.astype(float)
        color_label, vmax = "count", max(float(colors.max()), 1.0)

    n = len(cm)
    longest = max(len(str(label)) for label in list(cm.index) + list(cm.columns))
    side = max(4.0, 0.5 * n + 0.07 * longest + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    image = ax.imshow(colors, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=color_label)

    fontsize = 9 if n <= 10 else max(5, 9 - (n - 10) // 4)
    for i in range(n):
        for j in range(n):
            dark = colors[i, j] > 0.6 * vmax
            ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")

    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    ax.set_xticklabels([str(c) for c in cm.columns], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels([str(c) for c in cm.index])
    ax.set_xlabel(cm.columns.name or "predicted")
    ax.set_ylabel(cm.index.name or "true")
    ax.set_title(title if title is not None else "Confusion matrix")
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------


def plot_sweep_comparison(summary: pd.DataFrame, metric: str, *, setting_col: str = "setting") -> Figure:
    """One bar per sweep setting: mean of ``metric`` with its standard deviation as error bar.

    Parameters
    ----------
    summary
        One row per setting, with columns ``setting_col``, ``{metric}_mean`` and (optionally)
        ``{metric}_std``, e.g. the summary of a sweep over seeds or folds.
    metric
        Metric name without suffix, e.g. ``"test_accuracy"``.
    setting_col
        Column (or index name) that labels each bar.

    Returns
    -------
    matplotlib.figure.Figure
        One axis with one bar per row.
    """
    summary = _frame_of(summary, name="summary")
    mean_col, std_col = f"{metric}_mean", f"{metric}_std"
    if mean_col not in summary.columns:
        available = [str(c)[: -len("_mean")] for c in summary.columns if str(c).endswith("_mean")]
        raise ValueError(
            f"metric={metric!r}: summary has no column {mean_col!r}. "
            f"Available metrics: {', '.join(available) if available else '(none: no *_mean columns)'}."
        )
    if setting_col in summary.columns:
        names = summary[setting_col].astype(str).tolist()
    elif summary.index.name == setting_col:
        names = summary.index.astype(str).tolist()
    else:
        raise ValueError(
            f"setting_col={setting_col!r} is neither a column nor the index of summary. "
            f"Columns: {', '.join(map(str, summary.columns))}. Pass setting_col=<the column naming each setting>."
        )
    means = summary[mean_col].to_numpy(dtype=float)
    stds = summary[std_col].to_numpy(dtype=float) if std_col in summary.columns else None

    longest = max(len(name) for name in names)
    figure_size = (max(4.0, 0.6 * len(names) + 2.0), 3.5 + 0.05 * min(longest, 60))
    fig, ax = plt.subplots(figsize=figure_size, layout="constrained")
    positions = np.arange(len(names))
    ax.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.85)
    ax.set_xticks(positions)
    if longest > 8 or len(names) > 6:
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(names)
    ax.set_xlabel(setting_col)
    ax.set_ylabel(metric + (" (mean ± std)" if stds is not None else " (mean)"))
    ax.set_title(f"{metric} by {setting_col}")
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# regression predictions
# --------------------------------------------------------------------------------------------


def plot_predictions(y_true, y_pred, *, title: str | None = None) -> Figure:
    """Predicted versus true values, and the residuals, for a regression model.

    Parameters
    ----------
    y_true
        True values; any shape (several targets are pooled).
    y_pred
        Predicted values, same shape as ``y_true``.
    title
        Figure title; default ``"Predicted vs true"``.

    Returns
    -------
    matplotlib.figure.Figure
        Left: predicted against true with the identity line (perfect predictions lie on it);
        right: residuals (predicted - true) against predicted, with a zero line.
    """
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}; they must match.")
    y_true, y_pred = y_true.ravel(), y_pred.ravel()
    if y_true.size == 0:
        raise ValueError("y_true and y_pred are empty; nothing to plot.")
    residuals = y_pred - y_true
    point_size = 12 if y_true.size < 1000 else 3
    alpha = 0.7 if y_true.size < 1000 else 0.3

    fig, (ax_scatter, ax_resid) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    ax_scatter.scatter(y_true, y_pred, s=point_size, alpha=alpha, rasterized=True)
    finite = np.isfinite(y_true) & np.isfinite(y_pred)
    low = float(min(y_true[finite].min(), y_pred[finite].min())) if finite.any() else 0.0
    high = float(max(y_true[finite].max(), y_pred[finite].max())) if finite.any() else 1.0
    ax_scatter.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="identity (y = x)")
    ax_scatter.set_xlabel("true")
    ax_scatter.set_ylabel("predicted")
    ax_scatter.set_title("Predicted vs true")
    ax_scatter.legend(frameon=False)

    ax_resid.scatter(y_pred, residuals, s=point_size, alpha=alpha, rasterized=True)
    ax_resid.axhline(0.0, color="black", linestyle="--", linewidth=1)
    ax_resid.set_xlabel("predicted")
    ax_resid.set_ylabel("residual (predicted - true)")
    ax_resid.set_title("Residuals")

    if title is not None:
        fig.suptitle(title)
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# comparing models
# --------------------------------------------------------------------------------------------


def plot_metric_comparison(table, *, metrics: Sequence[str] | None = None) -> Figure:
    """Grouped bars: one group per metric, one bar per model.

    Parameters
    ----------
    table
        A :class:`workbench.metrics.MetricsTable` or its frame (rows = models, columns = metrics).
    metrics
        Metrics to show, in this order; default all numeric columns.

    Returns
    -------
    matplotlib.figure.Figure
        One axis with ``n_models * n_metrics`` bars, each labelled with its value.
    """
    frame = _frame_of(table, name="table")
    if metrics is None:
        metrics = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    else:
        metrics = list(metrics)
        _check_columns(frame, metrics, name="plot_metric_comparison(metrics=...)")
    if frame.empty or not metrics:
        raise ValueError("table has no models or no numeric metrics to compare.")

    models = [str(m) for m in frame.index]
    n_models = len(models)
    width = 0.8 / n_models
    positions = np.arange(len(metrics))
    longest_model = max(len(m) for m in models)
    figure_width = max(4.0, 0.9 * len(metrics) * max(1.0, n_models / 2)) + 1.0 + 0.07 * longest_model
    fig, ax = plt.subplots(figsize=(figure_width, 4.0), layout="constrained")
    for i, model in enumerate(frame.index):
        values = frame.loc[model, metrics].to_numpy(dtype=float)
        bars = ax.bar(positions + (i - (n_models - 1) / 2) * width, values, width, label=str(model))
        labels = ["" if np.isnan(v) else f"{v:.3f}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize="x-small", padding=2)
    ax.set_xticks(positions)
    ax.set_xticklabels(metrics, rotation=30 if len(metrics) > 3 else 0, ha="right" if len(metrics) > 3 else "center")
    ax.set_ylabel("value")
    ax.set_title("Model comparison")
    ax.margins(y=0.15)
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# feature importance
# --------------------------------------------------------------------------------------------


def plot_importance(importance: pd.DataFrame, *, title: str | None = None, xlabel: str = "importance") -> Figure:
    """Horizontal bars of feature importance (e.g. permutation importance), largest on top.

    Parameters
    ----------
    importance
        Columns ``feature`` and ``importance``, optionally ``std`` (drawn as error bars).
    title
        Figure title; default ``"Feature importance"``.
    xlabel
        Label of the importance axis, e.g. ``"drop in test Pearson when shuffled"``.

    Returns
    -------
    matplotlib.figure.Figure
        One bar per feature, with a zero line.
    """
    frame = _frame_of(importance, name="importance")
    _check_columns(frame, ["feature", "importance"], name="plot_importance")
    if frame.empty:
        raise ValueError("importance has no rows; nothing to plot.")
    frame = frame.sort_values("importance")
    errors = frame["std"].to_numpy(dtype=float) if "std" in frame else None
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(frame) + 1.2), layout="constrained")
    ax.barh(frame["feature"].astype(str), frame["importance"].to_numpy(dtype=float), xerr=errors, color="tab:blue")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_title(title or "Feature importance")
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# signals and curves
# --------------------------------------------------------------------------------------------

#: Colors of segmentation states 1-4 (S1, systole, S2, diastole), as in CirCor's .tsv files.
_STATES = {1: ("S1", "tab:red"), 2: ("systole", "tab:orange"), 3: ("S2", "tab:blue"), 4: ("diastole", "tab:green")}


def plot_roc_pr(curves: pd.DataFrame, *, title: str | None = None) -> Figure:
    """ROC (left) and precision-recall (right) curves per class, as returned by :func:`workbench.metrics.roc_pr_curves`."""
    _check_columns(curves, ["class", "curve", "x", "y", "area"], name="curves")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, kind, xlabel, ylabel in ((axes[0], "roc", "false positive rate", "true positive rate"),
                                     (axes[1], "pr", "recall", "precision")):
        for cls, part in curves[curves["curve"] == kind].groupby("class", sort=False):
            name = "AUROC" if kind == "roc" else "AP"
            ax.plot(part["x"], part["y"], drawstyle="steps-post" if kind == "pr" else "default",
                    label=f"{cls} ({name} {part['area'].iloc[0]:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="lower right" if kind == "roc" else "lower left")
    axes[0].set_title("ROC (one vs rest)")
    axes[1].set_title("precision-recall")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_recordings(recordings: Sequence[dict]) -> Figure:
    """Waveform (with its S1 / systole / S2 / diastole segmentation, when given) and spectrogram per recording.

    Parameters
    ----------
    recordings
        Dicts with ``signal`` (1-D), ``sample_rate``, ``title`` and optionally ``segmentation``
        (rows ``start s, end s, state``; state 0 is not drawn).
    """
    if not recordings:
        raise ValueError("plot_recordings needs at least one recording.")
    fig, axes = plt.subplots(len(recordings), 2, figsize=(12, 2.2 * len(recordings)), squeeze=False)
    for (wave, spec), rec in zip(axes, recordings):
        signal, rate = np.asarray(rec["signal"]), rec["sample_rate"]
        t = np.arange(len(signal)) / rate
        wave.plot(t, signal, lw=0.5, color="black")
        seg = rec.get("segmentation")
        shown = set()
        if seg is not None:
            for start, end, state in np.asarray(seg):
                if int(state) in _STATES and start < t[-1]:
                    name, color = _STATES[int(state)]
                    wave.axvspan(start, min(end, t[-1]), color=color, alpha=0.18, lw=0,
                                 label=None if name in shown else name)
                    shown.add(name)
            if shown:
                wave.legend(fontsize=7, loc="upper right", ncol=4)
        wave.set_xlim(0, t[-1])
        wave.set_title(rec.get("title", ""), fontsize=9)
        wave.set_xlabel("s")
        spec.specgram(signal, Fs=rate, NFFT=256, noverlap=192, cmap="magma")
        spec.set_ylim(0, min(600, rate / 2))
        spec.set_ylabel("Hz")
        spec.set_xlabel("s")
    fig.tight_layout()
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------


def plot_embedding(coords, labels, *, title: str | None = None, axis_labels: Sequence[str] = ("PC 1", "PC 2")) -> Figure:
    """A 2-D projection of embeddings, one colour per class.

    Parameters
    ----------
    coords
        ``(n, 2)`` coordinates, e.g. from :func:`workbench.metrics.project_2d`.
    labels
        Class of each point (``n`` values); classes are coloured in sorted order.
    title
        Figure title; default ``"Embeddings (2-D projection)"``.
    axis_labels
        Names of the two axes.

    Returns
    -------
    matplotlib.figure.Figure
        One scatter axis with a legend of the classes.
    """
    coords = np.asarray(coords, dtype=float)
    labels = np.asarray(labels)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (n, 2), got {coords.shape}; project the embeddings to 2-D first "
                         "(workbench.metrics.project_2d).")
    if len(labels) != len(coords):
        raise ValueError(f"{len(coords)} points but {len(labels)} labels; give one label per point.")
    size = 12 if len(coords) < 2000 else 4
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout="constrained")
    for label in sorted(set(labels.tolist())):
        keep = labels == label
        ax.scatter(coords[keep, 0], coords[keep, 1], s=size, alpha=0.7, label=str(label), rasterized=True)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title or "Embeddings (2-D projection)")
    ax.legend(frameon=False, markerscale=1.5, fontsize="small")
    plt.close(fig)
    return fig
