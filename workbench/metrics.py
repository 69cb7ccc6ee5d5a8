"""Classification and regression metrics, and a table to compare models.

All functions take plain arrays (numpy, lists, pandas) of true and predicted values and return
a flat ``{name: float}`` dictionary, ready for ``final_metrics.json`` or a :class:`MetricsTable`.

=====================  =========================================================================
classification         accuracy, balanced_accuracy, macro/weighted F1, macro precision/recall;
                       with scores also auroc and auprc; for two classes sensitivity/specificity
regression             mse, mae, r2, pearson (all values pooled), mean_pearson (per target)
cross-validation       fold_summary: mean ± std over folds of each metric
=====================  =========================================================================

scikit-learn and scipy are imported inside the functions, so ``import workbench.metrics`` is cheap.

Why this module is long: it is a catalogue of short, independent scores (classification, regression, the confusion
matrix, per-group and per-fold summaries, a classifier beside its baseline) that share the input checks at the top,
so that every score a workflow reports has one import path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["classification_metrics", "regression_metrics", "grouped_regression_metrics", "confusion_matrix", "MetricsTable",
           "sensitivity_specificity", "roc_pr_curves", "fold_summary", "project_2d",
           "Evaluation"]


# --------------------------------------------------------------------------------------------
# input checks shared by the functions below
# --------------------------------------------------------------------------------------------


def _as_1d(values, *, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be one value per sample (1-D), got an array of shape {array.shape}. "
            f"For class probabilities pass them as y_score and the predicted classes as y_pred "
            f"(e.g. y_pred = y_score.argmax(axis=1))."
        )
    return array


def _check_no_missing(array: np.ndarray, *, name: str) -> None:
    missing = int(pd.isna(pd.Series(array.ravel(), dtype=object)).sum()) if array.size else 0
    if missing:
        raise ValueError(
            f"{name} contains {missing} missing value(s) (NaN/None) out of {array.size}. "
            f"Drop those samples before computing metrics, e.g. keep = ~np.isnan(y_true)."
        )


def _check_same_length(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(
            f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}; "
            f"pass true and predicted values for the same samples, in the same order."
        )
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty; metrics need at least one sample.")


def _with_prefix(values: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": float(value) for name, value in values.items()}


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def _score_columns(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray, labels) -> np.ndarray:
    """The class name of each column of ``y_score``."""
    n_columns = y_score.shape[1]
    if labels is not None:
        if len(labels) != n_columns:
            raise ValueError(
                f"labels has {len(labels)} classes but y_score has {n_columns} columns; "
                f"labels must name the class of each y_score column, in column order."
            )
        return np.asarray(labels)
    present = np.unique(np.concatenate([y_true, y_pred]))
    if np.issubdtype(present.dtype, np.integer) and present.min() >= 0 and present.max() < n_columns:
        # integer-coded classes 0..n_classes-1: column j holds class j
        return np.arange(n_columns)
    if len(present) == n_columns:
        return present
    raise ValueError(
        f"Cannot tell which class each of the {n_columns} y_score columns belongs to: the data "
        f"hold {len(present)} classes ({', '.join(map(str, present[:10]))}). "
        f"Pass labels=[...] naming the class of each column, in column order."
    )


def _one_vs_rest(y_true: np.ndarray, y_score: np.ndarray, columns: np.ndarray) -> tuple[float, float]:
    """Macro one-vs-rest AUROC and AUPRC over the classes present in ``y_true``.

    A class that is absent from ``y_true`` (common in small test folds) has no positives and
    is skipped instead of breaking the average. With a single class present both are NaN.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    present = set(np.unique(y_true).tolist())
    if len(present) < 2:
        return math.nan, math.nan
    aurocs, auprcs = [], []
    for j, cls in enumerate(columns):
        if cls not in present:
            continue
        is_cls = y_true == cls
        aurocs.append(roc_auc_score(is_cls, y_score[:, j]))
        auprcs.append(average_precision_score(is_cls, y_score[:, j]))
    if not aurocs:
        return math.nan, math.nan
    return float(np.mean(aurocs)), float(np.mean(auprcs))


def classification_metrics(
    y_true,
    y_pred,
    *,
    y_score=None,
    labels: Sequence | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Standard classification metrics as plain floats.

    Parameters
    ----------
    y_true
        True class of each sample (integers or names).
    y_pred
        Predicted class of each sample.
    y_score
        Optional class probabilities (or any scores), shape ``(n_samples, n_classes)``; adds
        ``auroc`` and ``auprc``. For two classes a 1-D array of positive-class scores also works.
    labels
        All class names in the order of ``y_score``'s columns; the last of two classes is the
        positive class. Defaults to ``0..n_classes-1`` for integer classes, else the sorted
        class names. Macro averages run over the classes that occur in ``y_true`` or ``y_pred``,
        so a class missing from a small test split does not count as a zero.
    prefix
        Prepended to every key, e.g. ``"test_"`` gives ``"test_accuracy"``.

    Returns
    -------
    dict[str, float]
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``, ``macro_precision``,
        ``macro_recall``; with ``y_score`` also ``auroc`` and ``auprc`` (binary: of the positive
        class; multiclass: macro one-vs-rest over the classes present in ``y_true``); with two
        classes also ``sensitivity`` (recall of the positive class) and ``specificity``
        (recall of the negative class). Undefined values (e.g. AUROC with one class) are NaN.

    Examples
    --------
    >>> classification_metrics([0, 1, 1, 0], [0, 1, 0, 0])["accuracy"]
    0.75
    """
    from sklearn import metrics as skm

    y_true = _as_1d(y_true, name="y_true")
    y_pred = _as_1d(y_pred, name="y_pred")
    _check_same_length(y_true, y_pred)
    _check_no_missing(y_true, name="y_true")
    _check_no_missing(y_pred, name="y_pred")

    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
        "weighted_f1": skm.f1_score(y_true, y_pred, average="weighted", zero_division=0),
        "macro_precision": skm.precision_score(y_true, y_pred, average="macro", zero_division=0),
        "macro_recall": skm.recall_score(y_true, y_pred, average="macro", zero_division=0),
    }

    classes = None
    if y_score is not None:
        y_score = np.asarray(y_score, dtype=float)
        if y_score.ndim == 1:
            y_score = np.column_stack([1.0 - y_score, y_score])
        if y_score.ndim != 2 or len(y_score) != len(y_true):
            raise ValueError(
                f"y_score must have shape (n_samples, n_classes) = ({len(y_true)}, n_classes), "
                f"got {y_score.shape}. Pass the predicted probabilities, one column per class."
            )
        _check_no_missing(y_score, name="y_score")
        classes = _score_columns(y_true, y_pred, y_score, labels)
    elif labels is not None:
        classes = np.asarray(labels)

    if classes is None:
        classes = np.unique(np.concatenate([y_true, y_pred]))
    is_binary = len(classes) == 2

    if y_score is not None:
        if is_binary:
            is_positive = y_true == classes[1]
            if is_positive.all() or not is_positive.any():
                out["auroc"], out["auprc"] = math.nan, math.nan
            else:
                out["auroc"] = skm.roc_auc_score(is_positive, y_score[:, 1])
                out["auprc"] = skm.average_precision_score(is_positive, y_score[:, 1])
        else:
            out["auroc"], out["auprc"] = _one_vs_rest(y_true, y_score, classes)

    if is_binary:
        negative, positive = classes
        out["sensitivity"] = _recall_of(y_true, y_pred, positive)
        out["specificity"] = _recall_of(y_true, y_pred, negative)

    return _with_prefix(out, prefix)


def _recall_of(y_true: np.ndarray, y_pred: np.ndarray, cls) -> float:
    """Fraction of samples of class ``cls`` predicted as ``cls`` (NaN when there are none)."""
    is_cls = y_true == cls
    if not is_cls.any():
        return math.nan
    return float((y_pred[is_cls] == cls).mean())


def sensitivity_specificity(y_true, y_pred, *, labels: Sequence) -> dict[str, float]:
    """``sensitivity`` and ``specificity``; one-vs-rest macro averages for three or more classes.

    Two classes: the recall of ``labels[1]`` (the positive class) and of ``labels[0]``, as in
    :func:`classification_metrics`. More: for each class present in ``y_true``, TP / (TP + FN)
    and TN / (TN + FP) with that class as positive (scikit-learn's multilabel confusion
    matrix), averaged over those classes.
    """
    from sklearn.metrics import multilabel_confusion_matrix

    y_true = _as_1d(y_true, name="y_true")
    y_pred = _as_1d(y_pred, name="y_pred")
    _check_same_length(y_true, y_pred)
    labels = list(labels)
    if len(labels) == 2:
        return {"sensitivity": _recall_of(y_true, y_pred, labels[1]), "specificity": _recall_of(y_true, y_pred, labels[0])}
    present = [c for c in labels if (y_true == c).any()]
    if not present:
        return {"sensitivity": math.nan, "specificity": math.nan}
    cms = multilabel_confusion_matrix(y_true, y_pred, labels=present)  # per class [[tn, fp], [fn, tp]]
    tn, fp, fn, tp = cms[:, 0, 0], cms[:, 0, 1], cms[:, 1, 0], cms[:, 1, 1]
    spec = np.divide(tn, tn + fp, out=np.full(len(present), np.nan), where=(tn + fp) > 0)
    return {"sensitivity": float(np.mean(tp / (tp + fn))), "specificity": float(np.nanmean(spec)) if np.isfinite(spec).any() else math.nan}


def roc_pr_curves(y_true, y_score, *, labels: Sequence) -> pd.DataFrame:
    """ROC and precision-recall curves, one-vs-rest per class present (the positive class alone for two classes).

    Returns
    -------
    pandas.DataFrame
        Columns ``class``, ``curve`` (``"roc"`` | ``"pr"``), ``x`` (FPR | recall), ``y`` (TPR |
        precision) and ``area`` (AUROC | average precision); for
        :func:`workbench.plots.plot_roc_pr`.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y_true = _as_1d(y_true, name="y_true")
    y_score = np.asarray(y_score, dtype=float)
    labels = list(labels)
    if y_score.ndim != 2 or y_score.shape != (len(y_true), len(labels)):
        raise ValueError(f"y_score must have shape (n_samples, n_classes) = ({len(y_true)}, {len(labels)}), got {y_score.shape}.")
    columns = [1] if len(labels) == 2 else range(len(labels))
    parts = []
    for j in columns:
        positive = y_true == labels[j]
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, y_score[:, j])
        precision, recall, _ = precision_recall_curve(positive, y_score[:, j])
        parts.append(pd.DataFrame({"class": labels[j], "curve": "roc", "x": fpr, "y": tpr,
                                   "area": roc_auc_score(positive, y_score[:, j])}))
        parts.append(pd.DataFrame({"class": labels[j], "curve": "pr", "x": recall, "y": precision,
                                   "area": average_precision_score(positive, y_score[:, j])}))
    if not parts:
        raise ValueError("roc_pr_curves needs at least one class with both positives and negatives in y_true.")
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant."""
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator == 0.0:
        return math.nan
    return float((a * b).sum() / denominator)


def _pearson_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column; NaN for columns where either side is constant."""
    t = y_true - y_true.mean(axis=0)
    p = y_pred - y_pred.mean(axis=0)
    denominator = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (t * p).sum(axis=0) / denominator
    r[denominator == 0] = np.nan
    return r


def regression_metrics(y_true, y_pred, *, prefix: str = "") -> dict[str, float]:
    """Error and correlation metrics for one or several regression targets.

    Parameters
    ----------
    y_true
        True values, shape ``(n_samples,)`` or ``(n_samples, n_targets)`` (e.g. cells x genes).
    y_pred
        Predicted values, same shape as ``y_true``.
    prefix
        Prepended to every key, e.g. ``"test_"``.

    Returns
    -------
    dict[str, float]
        ``mse`` and ``mae`` over all values; ``r2`` (averaged over targets); ``pearson``: the
        correlation of all values pooled together (NaN when either side is constant);
        ``mean_pearson``: the mean of the per-target correlations over the targets whose true
        values vary (the same targets for any two predictions of the same truth, so a model
        and a baseline are averaged over the same genes). A target whose prediction is
        constant counts as r = 0 (a model that gives up on a gene never scores higher for it),
        and ``constant_predictions`` says how many there were. 1-D input is one target.

    Examples
    --------
    >>> regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])["mae"]
    0.3333333333333333
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}; "
            f"they must match (samples x targets)."
        )
    if y_true.ndim not in (1, 2):
        raise ValueError(f"y_true must be 1-D or 2-D (samples x targets), got shape {y_true.shape}.")
    _check_same_length(y_true, y_pred)
    _check_no_missing(y_true, name="y_true")
    _check_no_missing(y_pred, name="y_pred")

    pearson = _pearson(y_true.ravel(), y_pred.ravel())
    columns_true = y_true.reshape(len(y_true), -1)
    columns_pred = y_pred.reshape(len(y_pred), -1)
    varies = np.ptp(columns_true, axis=0) > 0 if len(y_true) else np.zeros(columns_true.shape[1], bool)
    gave_up = varies & (np.ptp(columns_pred, axis=0) == 0) if len(y_true) else varies
    per_target = np.where(gave_up, 0.0, _pearson_per_column(columns_true, columns_pred))[varies]
    mean_pearson = float(per_target.mean()) if per_target.size else math.nan

    if len(y_true) < 2:
        r2 = math.nan  # undefined for a single sample
    else:
        r2 = skm.r2_score(y_true, y_pred)

    out = {
        "mse": skm.mean_squared_error(y_true, y_pred),
        "mae": skm.mean_absolute_error(y_true, y_pred),
        "r2": r2,
        "pearson": pearson,
        "mean_pearson": mean_pearson,
        "constant_predictions": float(gave_up.sum()),
    }
    return _with_prefix(out, prefix)


# --------------------------------------------------------------------------------------------
# confusion matrix
# --------------------------------------------------------------------------------------------


def confusion_matrix(y_true, y_pred, *, labels: Sequence) -> pd.DataFrame:
    """Counts of true (rows) versus predicted (columns) classes.

    Parameters
    ----------
    y_true
        True class of each sample.
    y_pred
        Predicted class of each sample.
    labels
        All classes, in the order of rows and columns. Values of ``y_true`` or ``y_pred`` that
        are not in ``labels`` raise an error instead of being dropped silently.

    Returns
    -------
    pandas.DataFrame
        Index named ``"true"``, columns named ``"predicted"``, both labelled by ``labels``;
        pass it to :func:`workbench.plots.plot_confusion_matrix`.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    y_true = _as_1d(y_true, name="y_true")
    y_pred = _as_1d(y_pred, name="y_pred")
    _check_same_length(y_true, y_pred)
    labels = list(labels)
    if len(labels) == 0:
        raise ValueError("labels is empty; pass the list of all class names, e.g. labels=data.classes.")
    known = set(labels)
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        unknown = sorted({v for v in values.tolist() if v not in known}, key=str)
        if unknown:
            raise ValueError(
                f"{name} contains classes not in labels: {', '.join(map(repr, unknown[:10]))}. "
                f"labels has {len(labels)} classes ({', '.join(map(repr, labels[:10]))}). "
                f"Add the missing classes to labels, or map integer predictions to names first."
            )
    counts = sk_confusion_matrix(y_true, y_pred, labels=labels)
    return pd.DataFrame(
        counts,
        index=pd.Index(labels, name="true"),
        columns=pd.Index(labels, name="predicted"),
    )


# --------------------------------------------------------------------------------------------
# comparing models
# --------------------------------------------------------------------------------------------


class MetricsTable:
    """Metrics of several models side by side.

    Parameters
    ----------
    results
        ``{model name: {metric name: value}}``; models become rows and metrics columns.
        A metric a model lacks shows as NaN.

    Examples
    --------
    >>> table = MetricsTable({
    ...     "fine-tuned": {"accuracy": 0.91, "macro_f1": 0.88},
    ...     "baseline (logistic regression)": {"accuracy": 0.85, "macro_f1": 0.80},
    ... })
    >>> table.to_frame().loc["fine-tuned", "accuracy"]
    np.float64(0.91)
    """

    def __init__(self, results: Mapping[str, Mapping[str, float]]):
        if not isinstance(results, Mapping):
            raise TypeError(
                f"results must be a mapping {{model name: {{metric: value}}}}, got {type(results).__name__}. "
                f"Example: MetricsTable({{'fine-tuned': {{'accuracy': 0.9}}}})."
            )
        self.results: dict[str, dict[str, float]] = {}
        for model, values in results.items():
            if not isinstance(values, Mapping):
                raise TypeError(
                    f"results[{model!r}] must be a mapping {{metric: value}}, got {type(values).__name__}."
                )
            self.results[str(model)] = {str(k): float(v) for k, v in values.items()}

    def to_frame(self) -> pd.DataFrame:
        """Rows are models, columns are metrics (in order of first appearance)."""
        columns: list[str] = []
        for values in self.results.values():
            columns += [name for name in values if name not in columns]
        frame = pd.DataFrame.from_dict(self.results, orient="index", columns=columns, dtype=float)
        frame.index.name = "model"
        return frame

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{model: {metric: value}}`` with plain floats, for JSON."""
        return {model: dict(values) for model, values in self.results.items()}

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(float_format=lambda x: f"{x:.3f}", na_rep="-")

    def __repr__(self) -> str:
        if not self.results:
            return "MetricsTable(empty)"
        return "MetricsTable\n" + self.to_frame().to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")


# --------------------------------------------------------------------------------------------
# regression metrics per group (e.g. per experimental condition)
# --------------------------------------------------------------------------------------------


def grouped_regression_metrics(y_true, y_pred, groups) -> pd.DataFrame:
    """Pearson, Spearman, R² and MSE over all samples and within each group.

    Parameters
    ----------
    y_true, y_pred
        One value per sample (1-D), same length.
    groups
        A group label per sample (e.g. the experimental condition).

    Returns
    -------
    pandas.DataFrame
        One row ``overall`` then one per group (sorted), columns ``n``, ``pearson``,
        ``spearman``, ``r2``, ``mse``. Correlations of a group whose true values are constant,
        and R² of a group with one sample, are NaN; a constant prediction of varying values
        correlates 0 (as in :func:`regression_metrics`).
    """
    from scipy.stats import spearmanr
    from sklearn import metrics as skm

    y_true = _as_1d(y_true, name="y_true").astype(float)
    y_pred = _as_1d(y_pred, name="y_pred").astype(float)
    groups = _as_1d(groups, name="groups")
    _check_same_length(y_true, y_pred)
    if len(groups) != len(y_true):
        raise ValueError(f"groups has {len(groups)} labels but y_true has {len(y_true)} samples; give one per sample.")
    _check_no_missing(y_true, name="y_true")
    _check_no_missing(y_pred, name="y_pred")

    def scores(t: np.ndarray, p: np.ndarray) -> dict:
        undefined = len(t) < 2 or np.ptp(t) == 0  # nothing to correlate with, whatever the prediction
        gave_up = not undefined and np.ptp(p) == 0  # a constant prediction of varying values: r = 0
        return {
            "n": len(t),
            "pearson": math.nan if undefined else 0.0 if gave_up else _pearson(t, p),
            "spearman": math.nan if undefined else 0.0 if gave_up else float(spearmanr(t, p).statistic),
            "r2": math.nan if len(t) < 2 else float(skm.r2_score(t, p)),
            "mse": float(skm.mean_squared_error(t, p)),
        }

    rows = {"overall": scores(y_true, y_pred)}
    for group in sorted(set(groups.tolist()), key=str):
        mask = groups == group
        rows[str(group)] = scores(y_true[mask], y_pred[mask])
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("group")


# --------------------------------------------------------------------------------------------
# cross-validation summary
# --------------------------------------------------------------------------------------------


def fold_summary(per_fold: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over folds of each metric.

    Parameters
    ----------
    per_fold
        One row per fold, one column per metric.
    metrics
        Columns to summarise, in this order; default every numeric column.

    Returns
    -------
    pandas.DataFrame
        One row per metric; columns ``mean``, ``std`` (sample standard deviation, ``ddof=1``;
        NaN for a single fold), ``folds`` (folds with a value) and ``mean ± std`` (text).
        Folds where a metric is NaN are left out of its mean and std.

    Examples
    --------
    >>> frame = pd.DataFrame({"pearson": [0.5, 0.7]}, index=["A1", "B1"])
    >>> fold_summary(frame).loc["pearson", "mean ± std"]
    '0.6000 ± 0.1414'
    """
    if not isinstance(per_fold, pd.DataFrame) or per_fold.empty:
        raise ValueError("per_fold must be a non-empty DataFrame with one row per fold and one column per metric.")
    if metrics is None:
        metrics = [c for c in per_fold.columns if pd.api.types.is_numeric_dtype(per_fold[c])]
    missing = [m for m in metrics if m not in per_fold.columns]
    if missing:
        raise ValueError(f"metrics {missing} are not columns of per_fold; columns are {list(per_fold.columns)}.")
    rows = {}
    for metric in metrics:
        values = pd.to_numeric(per_fold[metric], errors="coerce").dropna()
        mean = float(values.mean()) if len(values) else math.nan
        std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows[metric] = {"mean": mean, "std": std, "folds": len(values), "mean ± std": f"{mean:.4f} ± {std:.4f}"}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("metric")


def project_2d(embeddings, *, seed: int = 0) -> np.ndarray:
    """The first two principal components of ``embeddings`` (``n x d``), for a 2-D plot.

    PCA (scikit-learn), after centring; deterministic for a given ``seed``. Returns an
    ``(n, 2)`` array (a zero second column when ``d == 1``).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"embeddings must be a 2-D array with at least 2 rows (n x d), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings hold {int((~np.isfinite(x)).sum())} NaN/inf values; a projection needs finite values.")
    k = min(2, x.shape[1], len(x))
    coords = PCA(n_components=k, random_state=seed).fit_transform(x)
    return np.pad(coords, ((0, 0), (0, 2 - k)))


# --------------------------------------------------------------------------------------------
# a classifier scored on its test samples beside a baseline
# --------------------------------------------------------------------------------------------


def validation_accuracy_and_macro_f1(model, batches):
    """``val_accuracy`` and ``val_macro_f1`` of a classifier on ``(x, y)`` validation batches (``fit(evaluate=...)``).

    Returned as per-sample outputs (:class:`workbench.training.PerSample`), so that under DDP macro-F1 is computed on
    the whole validation set, not averaged over the ranks' shares.
    """
    import torch

    from .devices import to_model
    from .training import PerSample

    preds, truth = [], []
    for x, y in batches:
        preds.append(model(to_model(x, model)).argmax(1))
        truth.append(y)
    return PerSample(_accuracy_and_macro_f1, truth=torch.cat(truth), pred=torch.cat(preds))


def _accuracy_and_macro_f1(*, truth, pred) -> dict:
    scores = classification_metrics(truth, pred)
    return {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}


class Evaluation:
    """The test metrics of the model beside its baseline, with three faces.

    ``table`` (a :class:`workbench.metrics.MetricsTable`: one row per predictor) shows in a notebook
    (``_repr_html_``) and as a frame (``to_frame()``); ``final`` (flat ``test_*``, ``baseline_test_*`` and the counts)
    is what ``final_metrics.json`` holds (``to_dict()``). ``confusion`` is the model's confusion matrix for a
    classification, None otherwise; ``extra`` holds a task's further outputs (predictions, per-gene scores).
    """

    def __init__(self, table, confusion=None, final: dict | None = None, **extra):
        self.table, self.confusion, self.final, self.extra = table, confusion, dict(final or {}), extra

    def to_frame(self):
        return self.table.to_frame()

    def to_dict(self) -> dict:
        return dict(self.final)

    def _repr_html_(self) -> str:
        return self.table._repr_html_()

    def __getattr__(self, name):
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return repr(self.table)

