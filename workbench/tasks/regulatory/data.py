"""The samples as the model reads them (:class:`RegulatoryData`) and the split (:func:`load`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...batches import TensorBatches
from ...cache import content_hash, fingerprint
from .formats import CATEGORICAL, NUMERIC, SET_VALUES, TARGET, UNKNOWN, _check_frame, read_csv, read_zarr
from .simulate import simulate

__all__ = ["RegulatoryBatches", "RegulatoryData", "load"]


class RegulatoryBatches(TensorBatches):
    """Mini-batches ``(regions, categorical, numeric, target)``; has a length and a ``generator``, shards under DDP."""


@dataclass
class RegulatoryData:
    """Samples, their condition features, the target and the split.

    ``vocab`` lists each categorical feature's values seen in the labelled rows (source and
    fine-tuning train); index 0 of every feature is ``<unknown>``.
    """

    regions: np.ndarray  # samples x regions x (motifs + 1); the last channel is accessibility
    conditions: pd.DataFrame  # CATEGORICAL + NUMERIC columns, one row per sample
    y: np.ndarray
    condition_names: np.ndarray
    source_idx: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    source: str = ""
    vocab: dict = field(default_factory=dict)
    _content_hash: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.vocab:
            labelled = np.concatenate([self.source_idx, self.train_idx])
            self.vocab = {c: [UNKNOWN] + sorted(set(self.conditions[c].iloc[labelled])) for c in CATEGORICAL}

    @property
    def content_hash(self) -> str:
        if self._content_hash is None:
            self._content_hash = fingerprint(content_hash(self.regions), content_hash(self.y),
                                             content_hash(self.conditions.astype(str).to_numpy().astype("U")))
        return self._content_hash

    @property
    def n_regions(self) -> int:
        return self.regions.shape[1]

    @property
    def n_channels(self) -> int:
        return self.regions.shape[2]

    def numeric_stats(self, idx=None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the numeric features over rows ``idx`` (default: the labelled rows)."""
        labelled = np.concatenate([self.source_idx, self.train_idx]) if idx is None else np.asarray(idx)
        values = self.conditions[list(NUMERIC)].iloc[labelled].to_numpy(dtype=np.float64)
        std = values.std(axis=0)
        return values.mean(axis=0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)

    def encode(self, idx, *, conditions: pd.DataFrame | None = None, warn: bool = True):
        """Tensors ``(regions, categorical indices, numeric, target)`` of rows ``idx``.

        A categorical value outside ``vocab`` (a medium never seen in training) gets index 0,
        the "unknown" embedding, and a warning with the count.
        """
        frame = (self.conditions if conditions is None else conditions).iloc[idx]
        codes = []
        for column in CATEGORICAL:
            lookup = {value: i for i, value in enumerate(self.vocab[column])}
            values = frame[column].to_numpy()
            index = np.array([lookup.get(v, 0) for v in values], dtype=np.int64)
            unseen = [str(v) for v in values if v not in lookup]
            if unseen and warn:
                warnings.warn(f"{len(unseen)} sample(s) have a {column} not seen in training ({sorted(set(unseen))[:5]}); "
                              "they get the 'unknown' embedding.", stacklevel=2)
            codes.append(index)
        return (torch.from_numpy(np.ascontiguousarray(self.regions[idx], dtype=np.float32)),
                torch.from_numpy(np.stack(codes, axis=1)),
                torch.from_numpy(frame[list(NUMERIC)].to_numpy(dtype=np.float32)),
                torch.from_numpy(self.y[idx].astype(np.float32)))

    def batches(self, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0) -> RegulatoryBatches:
        return RegulatoryBatches(self.encode(idx), batch_size=batch_size, shuffle=shuffle, seed=seed)

    def to_frame(self) -> pd.DataFrame:
        parts = {"pretraining (source)": self.source_idx, "fine-tuning train": self.train_idx,
                 "validation": self.val_idx, "test": self.test_idx}
        rows = []
        for name, idx in parts.items():
            conds = self.conditions.iloc[idx]
            rows.append({"part": name, "samples": len(idx), "conditions": len(set(self.condition_names[idx])),
                         "media": ", ".join(sorted(set(conds["medium"]))), "drugs": ", ".join(sorted(set(conds["drug"])))})
        return pd.DataFrame(rows).set_index("part")

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self.y), "regions": self.n_regions,
                "motifs": self.n_channels - 1, "pretrain": len(self.source_idx), "train": len(self.train_idx),
                "val": len(self.val_idx), "test": len(self.test_idx), "vocab": self.vocab}

    def summary(self) -> str:
        return (f"{self.source}: {len(self.y)} samples, {self.n_regions} regions x {self.n_channels - 1} motifs + "
                f"accessibility; {len(set(self.condition_names))} conditions")

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string()

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html()


def load(data_path: str = "", *, label_fraction: float = 0.3, val_fraction: float = 0.1, seed: int = 0,
         simulation_seed: int = 0) -> RegulatoryData:
    """Read (or simulate) the samples and split the new-condition rows.

    Parameters
    ----------
    data_path
        A CSV (:func:`read_csv`), a GET-style ``.zarr`` store (:func:`read_zarr`, condition table
        beside it), or ``""`` to simulate (:func:`simulate`, world ``simulation_seed``).
    label_fraction, val_fraction
        Shares of the new-condition (non-source) rows used to fine-tune and to validate; the
        rest is the test set.
    seed
        The split.
    """
    for name, value in (("label_fraction", label_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be in [0, 1), e.g. 0.3.")
    if label_fraction <= 0 or label_fraction + val_fraction >= 1:
        raise ValueError(f"label_fraction={label_fraction} and val_fraction={val_fraction} must be > 0 and sum to "
                         "less than 1: the rest is the test set.")
    if data_path and Path(data_path).suffix == ".zarr":
        frame, source = read_zarr(data_path), Path(data_path).name
    elif data_path:
        frame, source = read_csv(data_path), Path(data_path).name
    else:
        frame, source = simulate(seed=simulation_seed), f"simulated (world {simulation_seed})"
    n_regions, n_motifs = _check_frame(frame, source)
    motif_cols = [f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]
    motifs = frame[motif_cols].to_numpy(np.float32).reshape(len(frame), n_regions, n_motifs)
    access = frame[[f"r{r}_access" for r in range(n_regions)]].to_numpy(np.float32)[:, :, None]
    conditions = frame[list(CATEGORICAL) + list(NUMERIC)].copy()
    for column in CATEGORICAL:
        conditions[column] = conditions[column].fillna("").astype(str)
    names = (frame["condition"].astype(str).to_numpy() if "condition" in frame
             else conditions.astype(str).agg("/".join, axis=1).to_numpy())
    is_source = _source_rows(frame, source)
    target = np.flatnonzero(~is_source)
    order = np.random.default_rng(seed).permutation(target)
    n_train = max(1, round(label_fraction * len(order)))
    n_val = round(val_fraction * len(order))
    return RegulatoryData(
        regions=np.concatenate([motifs, access], axis=2), conditions=conditions.reset_index(drop=True),
        y=frame[TARGET].to_numpy(np.float32), condition_names=names, source_idx=np.flatnonzero(is_source),
        train_idx=np.sort(order[:n_train]), val_idx=np.sort(order[n_train:n_train + n_val]),
        test_idx=np.sort(order[n_train + n_val:]), source=source,
    )


def _source_rows(frame: pd.DataFrame, source: str) -> np.ndarray:
    """Which rows the ``set`` column marks for pretraining (``source``); the others are ``target`` rows.

    Values are compared without regard to case and surrounding spaces (``Source``, `` source``);
    any other value, an empty cell included, is an error that names it: a misspelt ``source``
    would otherwise put every pretraining row into fine-tuning and test without a word.
    """
    if "set" not in frame:
        return np.zeros(len(frame), bool)
    values = frame["set"].astype("string").str.strip().str.lower()
    unknown = ~values.isin(SET_VALUES).fillna(False).to_numpy(bool)
    if unknown.any():
        raw = frame["set"][unknown]
        shown = list(dict.fromkeys(repr(v) if isinstance(v, str) else "an empty cell" for v in raw))
        raise ValueError(
            f"{source}: column 'set' holds {int(unknown.sum())} value(s) that are not one of {', '.join(SET_VALUES)} "
            f"(case and surrounding spaces aside): {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}, first in "
            f"row {int(np.flatnonzero(unknown)[0])}. Mark the pretraining rows 'source' and the new-condition rows "
            "'target', or drop the column (then every row is a new-condition row).")
    return (values == "source").fillna(False).to_numpy(bool)
