"""Train/test splits: holdout, k-fold, leave-one-group-out and few-shot subsets.

Every function returns **positions** (numpy integer arrays ``0..n-1``), not labels or data, so
the same split indexes an AnnData (``adata[train]``), a DataFrame (``df.iloc[train]``) or a
tensor. Every split is seeded and deterministic: the same inputs and seed give the same split.

=============================  ==================================================================
:func:`holdout`                one train/test split, stratified by class by default
:func:`kfold`                  k train/test splits: stratified, grouped (e.g. by patient) or plain
:func:`leave_one_group_out`    one split per group (e.g. per slide or donor)
:func:`few_shot`               a stratified fraction of the training set, at least one per class
=============================  ==================================================================

scikit-learn is imported inside the functions, so ``import workbench.splits`` is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["holdout", "kfold", "leave_one_group_out", "few_shot"]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _values(values, *, name: str) -> np.ndarray:
    """``values`` as a 1-D array, refusing missing values with a message that says how to drop them."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per sample (1-D), got an array of shape {array.shape}.")
    if len(array) == 0:
        raise ValueError(f"{name} is empty; a split needs at least two samples.")
    missing = int(pd.isna(pd.Series(array, dtype=object)).sum())
    if missing:
        raise ValueError(
            f"{name} contains {missing} missing value(s) (NaN/None) out of {len(array)}. "
            f"Drop those samples before splitting, e.g. adata = adata[adata.obs[key].notna()] "
            f"or df = df[df[key].notna()]."
        )
    return array


def _class_counts(labels: np.ndarray) -> dict:
    names, counts = np.unique(labels, return_counts=True)
    return dict(zip(names.tolist(), counts.tolist()))


def _describe_counts(counts: dict) -> str:
    return ", ".join(f"{name!r}: {count}" for name, count in counts.items())


def _check_int(value, *, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _test_count(test_size, n: int) -> int:
    """How many samples scikit-learn puts in the test set (same rule as ``train_test_split``)."""
    if isinstance(test_size, (float, np.floating)):
        if not 0.0 < test_size < 1.0:
            raise ValueError(
                f"test_size={test_size!r} must be a fraction in (0, 1) (e.g. 0.2) or a number of samples."
            )
        return math.ceil(test_size * n)
    if isinstance(test_size, (int, np.integer)) and not isinstance(test_size, bool):
        if not 0 < test_size < n:
            raise ValueError(f"test_size={test_size!r} samples must be between 1 and {n - 1} for {n} samples.")
        return int(test_size)
    raise ValueError(
        f"test_size={test_size!r} must be a fraction in (0, 1) (e.g. 0.2) or a number of samples (e.g. 100)."
    )


# --------------------------------------------------------------------------------------------
# holdout
# --------------------------------------------------------------------------------------------


def holdout(
    labels: Sequence,
    *,
    test_size: float | int = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One seeded train/test split of the samples.

    This is exactly ``sklearn.model_selection.train_test_split(np.arange(n), test_size=test_size,
    stratify=labels if stratify else None, random_state=seed)``, with clearer errors first.

    Parameters
    ----------
    labels
        Class of each sample (e.g. ``adata.obs["cell_type"]``); its length sets ``n``.
    test_size
        Fraction of samples (e.g. ``0.2``) or number of samples in the test set.
    seed
        Random seed; the same seed gives the same split.
    stratify
        Keep the class proportions equal in train and test.

    Returns
    -------
    train, test
        Integer positions of the training and test samples (in shuffled order).

    Examples
    --------
    >>> train, test = holdout(["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"], test_size=0.4)
    >>> len(train), len(test)
    (6, 4)
    """
    from sklearn.model_selection import train_test_split

    array = _values(labels, name="labels")
    n = len(array)
    n_test = _test_count(test_size, n)
    n_train = n - n_test

    if stratify:
        counts = _class_counts(array)
        too_small = {name: count for name, count in counts.items() if count < 2}
        if too_small:
            raise ValueError(
                f"holdout(stratify=True) needs at least 2 samples of every class, but "
                f"{len(too_small)} class(es) have fewer: {_describe_counts(too_small)}. "
                f"Fix it by dropping those classes (e.g. adata = adata[~adata.obs[key].isin(small)]), "
                f"by passing stratify=False, or by giving more data."
            )
        if n_test < len(counts) or n_train < len(counts):
            raise ValueError(
                f"holdout(stratify=True) puts {n_test} samples in the test set and {n_train} in the "
                f"training set, but each must hold one of each of the {len(counts)} classes. "
                f"Smallest classes: {_describe_counts(dict(sorted(counts.items(), key=lambda kv: kv[1])[:5]))}. "
                f"Fix it by changing test_size (now {test_size!r}) so both sets hold at least "
                f"{len(counts)} samples, by passing stratify=False, by dropping rare classes, or by giving more data."
            )

    train, test = train_test_split(
        np.arange(n), test_size=test_size, stratify=labels if stratify else None, random_state=seed
    )
    return train, test


# --------------------------------------------------------------------------------------------
# k-fold
# --------------------------------------------------------------------------------------------


def kfold(
    labels: Sequence | None = None,
    *,
    n_splits: int = 5,
    groups: Sequence | None = None,
    stratify: bool = True,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded train/test splits in which every sample is tested exactly once.

    ==========================  =======================  ====================================
    labels (and stratify)       groups                   scikit-learn splitter
    ==========================  =======================  ====================================
    yes                         no                       ``StratifiedKFold(shuffle=True)``
    yes                         yes                      ``StratifiedGroupKFold(shuffle=True)``
    no (or ``stratify=False``)  yes                      ``GroupKFold``
    no (or ``stratify=False``)  no                       ``KFold(shuffle=True)``
    ==========================  =======================  ====================================

    Parameters
    ----------
    labels
        Class of each sample, used to stratify; may be omitted when ``groups`` is given.
    n_splits
        Number of folds (at least 2).
    groups
        Group of each sample (e.g. patient or donor). All samples of a group land in the same
        fold, so a model is never tested on a patient it was trained on.
    stratify
        Keep class proportions similar across folds (needs ``labels``).
    seed
        Random seed for the shuffled splitters.

    Returns
    -------
    list of (train, test)
        One pair of integer position arrays per fold.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    n_splits = _check_int(n_splits, name="n_splits", minimum=2)
    if labels is None and groups is None:
        raise ValueError(
            "kfold needs labels (class of each sample) or groups (group of each sample) to know the "
            "samples; pass e.g. kfold(adata.obs['cell_type']) or kfold(groups=adata.obs['donor'])."
        )
    label_array = None if labels is None else _values(labels, name="labels")
    group_array = None if groups is None else _values(groups, name="groups")
    if label_array is not None and group_array is not None and len(label_array) != len(group_array):
        raise ValueError(
            f"labels has {len(label_array)} samples but groups has {len(group_array)}; "
            f"pass one label and one group per sample."
        )
    n = len(label_array) if label_array is not None else len(group_array)
    use_labels = label_array is not None and stratify

    if n_splits > n:
        raise ValueError(f"n_splits={n_splits} is more than the {n} samples; use n_splits <= {n}.")

    if group_array is not None:
        n_groups = len(np.unique(group_array))
        if n_splits > n_groups:
            raise ValueError(
                f"n_splits={n_splits} but groups has only {n_groups} distinct group(s); every fold needs "
                f"its own groups. Use n_splits <= {n_groups}, or leave_one_group_out(groups)."
            )
        if use_labels:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        else:
            splitter = GroupKFold(n_splits=n_splits)
    elif use_labels:
        counts = _class_counts(label_array)
        too_small = {name: count for name, count in counts.items() if count < n_splits}
        if too_small:
            raise ValueError(
                f"kfold(n_splits={n_splits}, stratify=True) needs at least {n_splits} samples of every "
                f"class, but {len(too_small)} class(es) have fewer: {_describe_counts(too_small)}. "
                f"Fix it by lowering n_splits (the smallest class has {min(counts.values())}), "
                f"dropping those classes, or passing stratify=False."
            )
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)

    positions = np.arange(n)
    y = label_array if use_labels else None
    return [(train, test) for train, test in splitter.split(positions, y, group_array)]


# --------------------------------------------------------------------------------------------
# leave one group out
# --------------------------------------------------------------------------------------------


def leave_one_group_out(groups: Sequence) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One split per group: test on that group, train on all the others.

    Parameters
    ----------
    groups
        Group of each sample (e.g. slide, donor or batch).

    Returns
    -------
    list of (group, train, test)
        The group's name (as a string) and integer positions, sorted by group.

    Examples
    --------
    >>> [(name, test.tolist()) for name, train, test in leave_one_group_out(["s1", "s2", "s1"])]
    [('s1', [0, 2]), ('s2', [1])]
    """
    array = _values(groups, name="groups")
    names = np.unique(array)
    if len(names) < 2:
        raise ValueError(
            f"leave_one_group_out needs at least 2 groups, but groups holds only {len(names)} "
            f"({', '.join(map(repr, names.tolist()))}). Check the grouping column, or use kfold/holdout."
        )
    splits = []
    for name in names:
        in_group = array == name
        splits.append((str(name), np.flatnonzero(~in_group), np.flatnonzero(in_group)))
    return splits


# --------------------------------------------------------------------------------------------
# few-shot subsets
# --------------------------------------------------------------------------------------------


def few_shot(
    labels: Sequence,
    *,
    fraction: float,
    seed: int = 0,
    min_per_class: int = 1,
) -> np.ndarray:
    """A stratified random subset: about ``fraction`` of each class, never fewer than ``min_per_class``.

    For each class, in sorted order of class names, ``k = max(min_per_class, round(fraction * n_class))``
    samples (at most all of them) are drawn without replacement with one
    ``numpy.random.default_rng(seed)``. Subsets for a given seed are therefore reproducible.

    Parameters
    ----------
    labels
        Class of each sample in the pool to draw from (usually the training set's labels).
    fraction
        Share of each class to keep, in (0, 1]; ``1.0`` keeps everything.
    seed
        Random seed.
    min_per_class
        Smallest number kept per class (capped at the class's size).

    Returns
    -------
    numpy.ndarray
        Sorted integer positions into ``labels``. To subset a training split ``train``, index
        it: ``train[few_shot(labels[train], fraction=0.1)]``.

    Examples
    --------
    >>> few_shot(["a"] * 10 + ["b"] * 2, fraction=0.2, seed=0).size
    3
    """
    array = _values(labels, name="labels")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number in (0, 1], e.g. 0.1 for 10%, got {fraction!r}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"fraction={fraction!r} is outside (0, 1]; pass the share of each class to keep, e.g. 0.1 for 10%."
        )
    min_per_class = _check_int(min_per_class, name="min_per_class", minimum=0)

    rng = np.random.default_rng(seed)
    chosen = []
    for name in np.unique(array):
        positions = np.flatnonzero(array == name)
        k = max(min_per_class, round(fraction * len(positions)))
        k = min(k, len(positions))
        chosen.append(rng.choice(positions, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)
