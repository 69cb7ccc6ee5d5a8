"""Splits: exact agreement with scikit-learn, determinism, and errors that name the problem."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GroupKFold, StratifiedKFold, train_test_split

from workbench.splits import few_shot, holdout, kfold, leave_one_group_out

LABELS = np.array(["B"] * 30 + ["T"] * 50 + ["NK"] * 20)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("stratify", [True, False])
def test_holdout_is_exactly_train_test_split(seed, stratify):
    train, test = holdout(LABELS, test_size=0.25, seed=seed, stratify=stratify)
    ref_train, ref_test = train_test_split(
        np.arange(len(LABELS)), test_size=0.25, stratify=LABELS if stratify else None, random_state=seed
    )
    np.testing.assert_array_equal(train, ref_train)
    np.testing.assert_array_equal(test, ref_test)
    assert np.issubdtype(train.dtype, np.integer)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(LABELS)))


def test_holdout_accepts_pandas_series():
    series = pd.Series(LABELS, dtype="category")
    train, test = holdout(series, seed=3)
    ref_train, ref_test = train_test_split(np.arange(100), test_size=0.2, stratify=series, random_state=3)
    np.testing.assert_array_equal(test, ref_test)


def test_holdout_stratifies():
    _, test = holdout(LABELS, test_size=0.2)
    counts = pd.Series(LABELS[test]).value_counts()
    assert counts.to_dict() == {"T": 10, "B": 6, "NK": 4}


def test_holdout_missing_labels_message():
    labels = pd.Series(["B", None, "T", np.nan, "T", "B"])
    with pytest.raises(ValueError, match="2 missing") as info:
        holdout(labels)
    assert "notna()" in str(info.value)


def test_holdout_too_small_class_is_named_with_count():
    labels = np.array(["B"] * 10 + ["T"] * 10 + ["Platelet"])
    with pytest.raises(ValueError) as info:
        holdout(labels)
    message = str(info.value)
    assert "'Platelet': 1" in message
    assert "'B'" not in message  # only the classes that are too small
    assert "stratify=False" in message
    # without stratification it works
    train, test = holdout(labels, stratify=False)
    assert len(train) + len(test) == 21


def test_holdout_test_set_too_small_for_all_classes():
    labels = np.repeat([f"c{i}" for i in range(6)], 3)  # 18 samples, 6 classes
    with pytest.raises(ValueError, match="6 classes") as info:
        holdout(labels, test_size=0.1)  # 2 test samples
    assert "test_size" in str(info.value)


def test_holdout_bad_test_size():
    with pytest.raises(ValueError, match="test_size=1.5"):
        holdout(LABELS, test_size=1.5)


def test_kfold_stratified_matches_sklearn_and_covers_everything():
    folds = kfold(LABELS, n_splits=5, seed=1)
    reference = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=1).split(np.arange(100), LABELS))
    assert len(folds) == 5
    for (train, test), (ref_train, ref_test) in zip(folds, reference):
        np.testing.assert_array_equal(train, ref_train)
        np.testing.assert_array_equal(test, ref_test)
    all_test = np.sort(np.concatenate([test for _, test in folds]))
    np.testing.assert_array_equal(all_test, np.arange(100))


def test_kfold_plain_is_seeded():
    a = kfold(LABELS, n_splits=4, stratify=False, seed=0)
    b = kfold(LABELS, n_splits=4, stratify=False, seed=0)
    c = kfold(LABELS, n_splits=4, stratify=False, seed=1)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_kfold_groups_never_shared_between_train_and_test():
    groups = np.repeat([f"patient{i}" for i in range(10)], 10)
    for labels in (None, LABELS):
        folds = kfold(labels, n_splits=5, groups=groups)
        assert len(folds) == 5
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])
    # groups only -> GroupKFold
    reference = list(GroupKFold(n_splits=5).split(np.arange(100), None, groups))
    for (_, test), (_, ref_test) in zip(kfold(groups=groups, n_splits=5), reference):
        np.testing.assert_array_equal(test, ref_test)


def test_kfold_errors_name_the_problem():
    with pytest.raises(ValueError, match="'NK': 20"):
        kfold(LABELS, n_splits=25)
    with pytest.raises(ValueError, match="only 3 distinct group"):
        kfold(groups=np.repeat(["a", "b", "c"], 5), n_splits=5)
    with pytest.raises(ValueError, match="n_splits must be an integer >= 2"):
        kfold(LABELS, n_splits=1)
    with pytest.raises(ValueError, match="kfold needs labels"):
        kfold()
    with pytest.raises(ValueError, match="labels has 100 samples but groups has 3"):
        kfold(LABELS, groups=["a", "b", "c"])


def test_leave_one_group_out():
    groups = np.array(["slide2", "slide1", "slide2", "slide3", "slide1"])
    splits = leave_one_group_out(groups)
    assert [name for name, _, _ in splits] == ["slide1", "slide2", "slide3"]
    name, train, test = splits[0]
    np.testing.assert_array_equal(test, [1, 4])
    np.testing.assert_array_equal(train, [0, 2, 3])
    with pytest.raises(ValueError, match="at least 2 groups"):
        leave_one_group_out(["only"] * 4)


def _reference_few_shot(labels, fraction, seed, min_per_class=1):
    rng = np.random.default_rng(seed)
    chosen = []
    for c in sorted(set(labels.tolist())):
        positions = np.flatnonzero(labels == c)
        k = min(len(positions), max(min_per_class, round(fraction * len(positions))))
        chosen.append(rng.choice(positions, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def test_few_shot_follows_the_documented_algorithm():
    for seed in (0, 1, 5):
        np.testing.assert_array_equal(few_shot(LABELS, fraction=0.1, seed=seed), _reference_few_shot(LABELS, 0.1, seed))


def test_few_shot_counts_determinism_and_seed_dependence():
    labels = np.array(["common"] * 95 + ["rare"] * 5)
    subset = few_shot(labels, fraction=0.1, seed=0)
    counts = pd.Series(labels[subset]).value_counts().to_dict()
    assert counts == {"common": 10, "rare": 1}  # round(0.5) = 0 -> min_per_class keeps one
    np.testing.assert_array_equal(subset, few_shot(labels, fraction=0.1, seed=0))
    assert not np.array_equal(subset, few_shot(labels, fraction=0.1, seed=1))
    assert np.all(np.diff(subset) > 0)  # sorted, no duplicates
    three = few_shot(labels, fraction=0.1, seed=0, min_per_class=3)
    assert (labels[three] == "rare").sum() == 3


def test_few_shot_full_fraction_and_bad_fraction():
    np.testing.assert_array_equal(few_shot(LABELS, fraction=1.0), np.arange(100))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            few_shot(LABELS, fraction=bad)
