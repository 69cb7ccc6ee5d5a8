"""Metrics on small hand-made examples, checked against numbers worked out by hand."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from workbench.metrics import MetricsTable, classification_metrics, confusion_matrix, regression_metrics

# --- binary ------------------------------------------------------------------------------
# true:  0 0 0 0 1 1 1 1
# pred:  0 0 0 1 1 1 0 0       -> TN=3 FP=1 TP=2 FN=2
# score: positive-class probabilities, ranked so that AUROC = 13/16 (see below)
BIN_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1])
BIN_PRED = np.array([0, 0, 0, 1, 1, 1, 0, 0])
BIN_POS = np.array([0.1, 0.2, 0.3, 0.6, 0.9, 0.8, 0.4, 0.25])
BIN_SCORE = np.column_stack([1 - BIN_POS, BIN_POS])


def test_binary_known_values():
    m = classification_metrics(BIN_TRUE, BIN_PRED, y_score=BIN_SCORE)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 4)  # TP / (TP + FN)
    assert m["specificity"] == pytest.approx(3 / 4)  # TN / (TN + FP)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    # precision: class 0 = 3/5, class 1 = 2/3; recall: class 0 = 3/4, class 1 = 2/4
    assert m["macro_precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert m["macro_recall"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    f1_0 = 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)
    f1_1 = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    assert m["weighted_f1"] == pytest.approx((f1_0 + f1_1) / 2)  # equal class sizes
    # AUROC = share of (positive, negative) pairs ranked correctly.
    # positives 0.9, 0.8, 0.4, 0.25 beat 4, 4, 3, 2 of the negatives 0.1, 0.2, 0.3, 0.6
    assert m["auroc"] == pytest.approx(13 / 16)
    # AUPRC (average precision): ranked 0.9+ 0.8+ 0.6- 0.4+ 0.3- 0.25+ -> (1 + 1 + 3/4 + 4/6) / 4
    assert m["auprc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert all(type(v) is float for v in m.values())
    json.dumps(m)


def test_binary_1d_score_and_prefix():
    m = classification_metrics(BIN_TRUE, BIN_PRED, y_score=BIN_POS, prefix="test_")
    assert set(m) == {
        "test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_weighted_f1",
        "test_macro_precision", "test_macro_recall", "test_auroc", "test_auprc",
        "test_sensitivity", "test_specificity",
    }
    assert m["test_auroc"] == pytest.approx(13 / 16)


def test_binary_string_labels_positive_is_second():
    names = np.array(["absent", "present"])
    m = classification_metrics(names[BIN_TRUE], names[BIN_PRED], y_score=BIN_SCORE, labels=list(names))
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(13 / 16)


def test_without_scores_there_is_no_auroc():
    m = classification_metrics(BIN_TRUE, BIN_PRED)
    assert "auroc" not in m and "auprc" not in m
    assert "sensitivity" in m


def test_multiclass_one_vs_rest_with_a_class_absent_from_y_true():
    # three classes in the model, class 2 never occurs in this test fold
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    y_score = np.array([
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.6, 0.3],
    ])
    m = classification_metrics(y_true, y_pred, y_score=y_score)
    # class 0 vs rest: scores for class-0 samples 0.7, 0.4 vs others 0.2, 0.1 -> AUROC 1
    # class 1 vs rest: 0.7, 0.6 vs 0.2, 0.5 -> AUROC 1; class 2 skipped (no positives)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["auprc"] == pytest.approx(1.0)
    assert "sensitivity" not in m  # three classes: not a binary task
    assert m["accuracy"] == pytest.approx(0.75)
    assert not math.isnan(m["auroc"])


def test_multiclass_auroc_not_perfect():
    y_true = np.array(["a", "b", "c", "a"])
    y_pred = np.array(["a", "b", "b", "a"])
    y_score = np.eye(3)[[0, 1, 1, 0]]
    m = classification_metrics(y_true, y_pred, y_score=y_score)
    # a: 1.0; b: positive score 1 vs negatives 0, 1, 0 -> (1 + 0.5 + 1) / 3; c: all scores 0 -> 0.5
    assert m["auroc"] == pytest.approx((1.0 + 2.5 / 3 + 0.5) / 3)


def test_score_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="y_score must have shape"):
        classification_metrics(BIN_TRUE, BIN_PRED, y_score=BIN_SCORE[:5])
    with pytest.raises(ValueError, match="labels has 3 classes but y_score has 2 columns"):
        classification_metrics(BIN_TRUE, BIN_PRED, y_score=BIN_SCORE, labels=[0, 1, 2])


def test_missing_values_are_refused():
    with pytest.raises(ValueError, match="y_true contains 1 missing"):
        classification_metrics(np.array([0.0, np.nan, 1.0]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="y_true has 3 samples but y_pred has 2"):
        classification_metrics([0, 1, 1], [0, 1])


def test_regression_known_values_1d():
    y_true = np.array([1.0, 2.0, 3.0, 4.0])
    y_pred = np.array([1.0, 2.0, 3.0, 6.0])
    m = regression_metrics(y_true, y_pred, prefix="val_")
    assert m["val_mse"] == pytest.approx(4 / 4)
    assert m["val_mae"] == pytest.approx(2 / 4)
    assert m["val_r2"] == pytest.approx(1 - 4 / 5)  # residual SS 4, total SS 5
    expected_r = np.corrcoef(y_true, y_pred)[0, 1]
    assert m["val_pearson"] == pytest.approx(expected_r)
    assert m["val_mean_pearson"] == m["val_pearson"]
    assert all(type(v) is float for v in m.values())


def test_regression_per_target_pearson_ignores_constant_targets():
    y_true = np.array([[1.0, 5.0, 0.0], [2.0, 5.0, 1.0], [3.0, 5.0, 2.0]])
    y_pred = np.array([[1.0, 4.0, 2.0], [2.0, 6.0, 1.0], [3.0, 5.0, 0.0]])
    m = regression_metrics(y_true, y_pred)
    # column 0: r = 1, column 1: true is constant (skipped), column 2: r = -1
    assert m["mean_pearson"] == pytest.approx(0.0)
    assert m["pearson"] == pytest.approx(np.corrcoef(y_true.ravel(), y_pred.ravel())[0, 1])


def test_regression_shape_mismatch():
    with pytest.raises(ValueError, match=r"y_true has shape \(3,\) but y_pred has shape \(3, 1\)"):
        regression_metrics(np.zeros(3), np.zeros((3, 1)))


def test_confusion_matrix_frame():
    cm = confusion_matrix(["T", "T", "B", "NK"], ["T", "B", "B", "T"], labels=["B", "T", "NK"])
    assert list(cm.index) == ["B", "T", "NK"] and list(cm.columns) == ["B", "T", "NK"]
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    assert cm.loc["T", "B"] == 1 and cm.loc["T", "T"] == 1 and cm.loc["NK", "T"] == 1 and cm.loc["B", "B"] == 1
    assert cm.to_numpy().sum() == 4


def test_confusion_matrix_unknown_class_is_named():
    with pytest.raises(ValueError, match="'Mono'"):
        confusion_matrix(["T", "Mono"], ["T", "T"], labels=["T", "B"])


def test_metrics_table_faces():
    table = MetricsTable({
        "fine-tuned": {"accuracy": 0.91234, "macro_f1": 0.88},
        "baseline (logistic regression)": {"accuracy": 0.85},
    })
    frame = table.to_frame()
    assert list(frame.index) == ["fine-tuned", "baseline (logistic regression)"]
    assert list(frame.columns) == ["accuracy", "macro_f1"]
    assert np.isnan(frame.loc["baseline (logistic regression)", "macro_f1"])
    assert table.to_dict() == {
        "fine-tuned": {"accuracy": 0.91234, "macro_f1": 0.88},
        "baseline (logistic regression)": {"accuracy": 0.85},
    }
    html = table._repr_html_()
    assert "<table" in html and "0.912" in html and "0.91234" not in html
    assert "fine-tuned" in repr(table) and "0.912" in repr(table)
    json.dumps(table.to_dict())


def test_metrics_table_rejects_non_mapping():
    with pytest.raises(TypeError, match="results must be a mapping"):
        MetricsTable([("a", 1.0)])


def test_import_does_not_pull_torch():
    code = "import sys, workbench.metrics, workbench.splits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_grouped_regression_metrics_overall_and_per_group():
    from scipy.stats import pearsonr, spearmanr

    from workbench.metrics import grouped_regression_metrics

    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    pred = truth + rng.normal(scale=0.5, size=40)
    groups = np.array(["b"] * 20 + ["a"] * 20)
    frame = grouped_regression_metrics(truth, pred, groups)
    assert list(frame.index) == ["overall", "a", "b"] and list(frame.columns) == ["n", "pearson", "spearman", "r2", "mse"]
    assert frame.loc["a", "n"] == 20
    assert frame.loc["overall", "pearson"] == pytest.approx(pearsonr(truth, pred).statistic)
    assert frame.loc["b", "spearman"] == pytest.approx(spearmanr(truth[:20], pred[:20]).statistic)
    assert frame.loc["a", "mse"] == pytest.approx(np.mean((truth[20:] - pred[20:]) ** 2))
    constant = grouped_regression_metrics([1.0, 1.0, 2.0], [0.5, 0.7, 2.0], ["x", "x", "y"])
    assert math.isnan(constant.loc["x", "pearson"]) and math.isnan(constant.loc["y", "r2"])
    with pytest.raises(ValueError, match="groups has 2 labels but y_true has 3"):
        grouped_regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], ["a", "b"])


def test_fold_summary_mean_and_sample_std_skip_nan_folds():
    from workbench.metrics import fold_summary

    frame = pd.DataFrame({"pearson": [0.5, 0.7, np.nan], "mse": [1.0, 2.0, 3.0], "note": ["a", "b", "c"]},
                         index=["A1", "B1", "C1"])
    summary = fold_summary(frame)
    assert list(summary.index) == ["pearson", "mse"]  # text columns are left out
    assert summary.loc["pearson", "mean"] == pytest.approx(0.6) and summary.loc["pearson", "folds"] == 2
    assert summary.loc["pearson", "std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary.loc["mse", "mean ± std"] == "2.0000 ± 1.0000"
    assert np.isnan(fold_summary(frame.iloc[:1], ["mse"]).loc["mse", "std"])  # one fold: no spread
    with pytest.raises(ValueError, match=r"\['r2'\] are not columns of per_fold"):
        fold_summary(frame, ["r2"])


def test_mean_pearson_counts_genes_with_constant_predictions_as_zero():
    """Issue 21 item 7: a model predicting a constant for 9 of 10 genes scored 0.680 against 0.703 for the
    honest model: the 9 genes it gave up on were skipped."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 10))
    honest = truth + rng.normal(scale=1.0, size=truth.shape)  # r about 0.7 on every gene
    lazy = np.zeros_like(truth)  # a constant for every gene ...
    lazy[:, 0] = truth[:, 0] + rng.normal(scale=0.9, size=200)  # ... but the first, predicted a little better
    good, gave_up = regression_metrics(truth, honest), regression_metrics(truth, lazy)
    r_first = np.corrcoef(truth[:, 0], lazy[:, 0])[0, 1]
    assert gave_up["mean_pearson"] == pytest.approx(r_first / 10)  # 9 genes at r = 0
    assert gave_up["constant_predictions"] == 9 and good["constant_predictions"] == 0
    assert gave_up["mean_pearson"] < good["mean_pearson"]
    # a gene whose true values are constant is left out for every prediction: model and baseline share the genes
    truth[:, 5] = 1.0
    assert regression_metrics(truth, lazy)["mean_pearson"] == pytest.approx(r_first / 9)
    assert regression_metrics(truth, lazy)["constant_predictions"] == 8
    # a constant prediction of one target (1-D) scores 0 too, and grouped metrics agree
    assert regression_metrics(truth[:, 1], lazy[:, 1])["mean_pearson"] == 0.0
    from workbench.metrics import grouped_regression_metrics

    frame = grouped_regression_metrics(truth[:, 1], lazy[:, 1], ["a"] * 200)
    assert frame.loc["a", "pearson"] == 0.0 and frame.loc["a", "spearman"] == 0.0
