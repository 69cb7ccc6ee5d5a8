"""Plots: each returns a closed Figure with the expected axes, lines, bars and titles."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from workbench.metrics import MetricsTable, confusion_matrix  # noqa: E402
from workbench.plots import (  # noqa: E402
    plot_confusion_matrix,
    plot_history,
    plot_lr_schedule,
    plot_metric_comparison,
    plot_predictions,
    plot_sweep_comparison,
)


def _is_closed(fig):
    return fig.number not in plt.get_fignums()


def _dashed_vertical_lines(ax):
    return [
        line for line in ax.get_lines()
        if line.get_linestyle() == "--" and len(set(np.asarray(line.get_xdata(), dtype=float))) == 1
    ]


def test_lr_schedule_with_warmup():
    steps = pd.RangeIndex(100, name="step")
    base = np.where(steps < 10, (steps + 1) / 11, np.cos(np.linspace(0, np.pi / 2, 100)))
    curve = pd.DataFrame({"backbone": 1e-4 * base, "head": 1e-3 * base}, index=steps)
    curve.attrs.update(schedule="cosine", warmup_steps=10, total_steps=100)
    fig = plot_lr_schedule(curve)
    assert isinstance(fig, Figure) and _is_closed(fig)
    (ax,) = fig.axes
    title = ax.get_title()
    assert "cosine" in title and "10" in title and "100" in title
    assert len(ax.get_lines()) == 3  # two groups + the warmup marker
    (marker,) = _dashed_vertical_lines(ax)
    assert marker.get_xdata()[0] == 10


def test_lr_schedule_without_warmup_and_custom_title():
    curve = pd.DataFrame({"lr": np.full(20, 1e-3)}, index=pd.RangeIndex(20, name="step"))
    curve.attrs.update(schedule="constant", warmup_steps=0, total_steps=20)
    fig = plot_lr_schedule(curve, title="My plan")
    (ax,) = fig.axes
    assert ax.get_title() == "My plan"
    assert len(ax.get_lines()) == 1
    assert not _dashed_vertical_lines(ax)


def _history_frame():
    frame = pd.DataFrame({
        "epoch": [1, 2, 3, 4],
        "train_loss": [1.0, 0.7, 0.5, 0.4],
        "val_loss": [1.1, 0.8, 0.75, 0.8],
        "val_accuracy": [0.5, 0.7, 0.8, 0.78],
        "val_macro_f1": [0.4, 0.6, 0.7, 0.69],
        "lr_backbone": [1e-4] * 4,
        "lr_head": [1e-3] * 4,
        "epoch_time_s": [3.0, 3.1, 3.0, 2.9],
        "step": [10, 20, 30, 40],
    })
    frame.attrs["best_epoch"] = 3
    return frame


def test_history_panels_and_best_epoch():
    fig = plot_history(_history_frame())
    assert isinstance(fig, Figure) and _is_closed(fig)
    ax_loss, ax_metrics = fig.axes
    loss_labels = [line.get_label() for line in ax_loss.get_lines()]
    metric_labels = [line.get_label() for line in ax_metrics.get_lines()]
    assert {"train_loss", "val_loss"} <= set(loss_labels)
    assert {"val_accuracy", "val_macro_f1"} <= set(metric_labels)
    for excluded in ("lr_backbone", "lr_head", "epoch", "step", "epoch_time_s"):
        assert excluded not in loss_labels + metric_labels
    for ax in (ax_loss, ax_metrics):
        (marker,) = _dashed_vertical_lines(ax)
        assert marker.get_xdata()[0] == 3


def test_history_accepts_object_with_to_frame_and_explicit_metrics():
    class History:
        def to_frame(self):
            frame = _history_frame()
            frame.attrs.clear()
            return frame

    fig = plot_history(History(), metrics=["val_accuracy"])
    ax_loss, ax_metrics = fig.axes
    assert [line.get_label() for line in ax_metrics.get_lines()] == ["val_accuracy"]
    assert not _dashed_vertical_lines(ax_loss)
    with pytest.raises(ValueError, match="'val_auroc' not found. Available:.*val_accuracy"):
        plot_history(History(), metrics=["val_auroc"])


def test_history_losses_only_gives_one_axis():
    fig = plot_history(pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5]}))
    assert len(fig.axes) == 1


def test_confusion_matrix_plot():
    names = ["CD8+/CD45RA+ Naive Cytotoxic", "CD14+ Monocyte", "CD19+ B"]
    y_true = [names[i] for i in [0, 0, 0, 1, 1, 2]]
    y_pred = [names[i] for i in [0, 0, 1, 1, 1, 0]]
    cm = confusion_matrix(y_true, y_pred, labels=names)
    fig = plot_confusion_matrix(cm, title="Test set")
    assert isinstance(fig, Figure) and _is_closed(fig)
    assert len(fig.axes) == 2  # heatmap + colorbar
    ax = fig.axes[0]
    assert ax.get_title() == "Test set"
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 9 and texts.count("2") == 2 and texts.count("0") == 5
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == names
    assert all(t.get_rotation() == 45 for t in ticks)
    colors = ax.get_images()[0].get_array()
    assert colors[0, 0] == pytest.approx(2 / 3)  # row-normalized
    raw = plot_confusion_matrix(cm, normalize=False).axes[0].get_images()[0].get_array()
    assert raw[0, 0] == 2


def test_sweep_comparison_bars_and_error_bars():
    summary = pd.DataFrame({
        "setting": ["frozen_backbone", "full", "lora"],
        "test_accuracy_mean": [0.8, 0.9, 0.85],
        "test_accuracy_std": [0.02, 0.01, 0.03],
        "test_macro_f1_mean": [0.7, 0.8, 0.75],
    })
    fig = plot_sweep_comparison(summary, "test_accuracy")
    assert isinstance(fig, Figure) and _is_closed(fig)
    (ax,) = fig.axes
    assert len(ax.patches) == 3
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.8, 0.9, 0.85])
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars.errorbar.lines[2][0].get_segments()) == 3  # one error bar per setting
    assert "test_accuracy" in ax.get_title()
    with pytest.raises(ValueError, match="Available metrics: test_accuracy, test_macro_f1"):
        plot_sweep_comparison(summary, "test_auroc")
    with pytest.raises(ValueError, match="setting_col='strategy'"):
        plot_sweep_comparison(summary, "test_accuracy", setting_col="strategy")


def test_predictions_scatter_identity_and_residuals():
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=(50, 3))
    y_pred = y_true + rng.normal(scale=0.1, size=(50, 3))
    fig = plot_predictions(y_true, y_pred, title="Held-out genes")
    assert isinstance(fig, Figure) and _is_closed(fig)
    ax_scatter, ax_resid = fig.axes
    assert fig._suptitle.get_text() == "Held-out genes"
    assert ax_scatter.collections[0].get_offsets().shape == (150, 2)
    (identity,) = ax_scatter.get_lines()
    x, y = identity.get_data()
    np.testing.assert_allclose(x, y)
    residual_y = ax_resid.collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(residual_y, (y_pred - y_true).ravel())
    with pytest.raises(ValueError, match="shape"):
        plot_predictions(np.zeros(3), np.zeros(4))


def test_metric_comparison_grouped_bars():
    table = MetricsTable({
        "fine-tuned": {"accuracy": 0.9, "macro_f1": 0.85, "auroc": 0.95},
        "baseline (logistic regression)": {"accuracy": 0.8, "macro_f1": 0.7, "auroc": 0.9},
    })
    fig = plot_metric_comparison(table)
    assert isinstance(fig, Figure) and _is_closed(fig)
    (ax,) = fig.axes
    assert len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fine-tuned", "baseline (logistic regression)"]
    fig = plot_metric_comparison(table.to_frame(), metrics=["macro_f1"])
    assert len(fig.axes[0].patches) == 2
    with pytest.raises(ValueError, match="'f1' not found"):
        plot_metric_comparison(table, metrics=["f1"])


def test_importance_bars_largest_on_top_with_error_bars():
    from workbench.plots import plot_importance

    frame = pd.DataFrame({"feature": ["medium", "od600", "drug"], "importance": [0.3, -0.01, 0.1],
                          "std": [0.02, 0.01, 0.03]})
    fig = plot_importance(frame, xlabel="drop in Pearson")
    assert isinstance(fig, Figure) and _is_closed(fig)
    (ax,) = fig.axes
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == [-0.01, 0.1, 0.3]  # barh draws bottom-up: the largest is on top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["od600", "drug", "medium"]
    assert ax.get_xlabel() == "drop in Pearson"
    with pytest.raises(ValueError, match="'importance' not found"):
        plot_importance(frame.rename(columns={"importance": "score"}))
