"""Whole-slide batches: one slide per step, every spot through the graph model, the loss on the spots a mask keeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ...batches import IndexBatches
from ...devices import to_model, to_numpy
from .data import SpotData

__all__ = ["Scaler", "SlideBatch", "SlideBatches", "predict"]


@dataclass
class Scaler:
    """Feature and target standardisation, fitted on training spots only."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray

    @classmethod
    def fit(cls, data: SpotData, idx) -> "Scaler":
        f, t = data.features[idx], data.targets[idx]
        return cls(f.mean(0), np.maximum(f.std(0), 1e-6), t.mean(0), np.maximum(t.std(0), 1e-6))


class SlideBatch(NamedTuple):
    """One slide: every spot goes through the graph model, the loss counts the spots ``mask`` keeps.

    ``n_items`` (the number of those spots) weights the slide's mean loss in the epoch's
    ``train_loss`` / ``val_loss`` (see :mod:`workbench.training`), so they are means over spots.
    """

    x: torch.Tensor
    edges: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    n_items: int


class SlideBatches(IndexBatches):
    """One batch per slide: a :class:`SlideBatch` ``(features, edges, scaled targets, loss mask, n_items)``.

    An :class:`workbench.batches.IndexBatches` over slides (one slide per batch; in order, or shuffled by its seeded
    ``generator``), so under ``torchrun`` it shards by slide as the core's batches do: every rank draws the same
    slide order and keeps its share (padded by repeating the order's start, as ``DistributedSampler`` does), and
    ``n_items`` (the slide's supervised spots) keeps the logged losses means over spots across ranks.
    """

    def __init__(self, data: SpotData, scaler: Scaler, slides: Sequence[str], mask: np.ndarray, *,
                 shuffle: bool = False, seed: int = 0):
        self.slides = [s for s in slides if mask[data.positions(s)].any()]
        super().__init__(len(self.slides), batch_size=1, shuffle=shuffle, seed=seed)
        self.items = {}
        for s in self.slides:
            idx = data.positions(s)
            x = (data.features[idx] - scaler.feature_mean) / scaler.feature_std
            y = (data.targets[idx] - scaler.target_mean) / scaler.target_std
            self.items[s] = SlideBatch(torch.from_numpy(x.astype(np.float32)), data.graph(s),
                                       torch.from_numpy(y.astype(np.float32)), torch.from_numpy(mask[idx]),
                                       int(mask[idx].sum()))

    def take(self, idx: np.ndarray) -> SlideBatch:
        """The batch of the one slide at position ``idx[0]`` of ``slides``."""
        return self.items[self.slides[int(idx[0])]]


def predict(model, data: SpotData, scaler: Scaler, slides: Sequence[str]) -> np.ndarray:
    """Predicted targets (original units) of every spot; spots outside ``slides`` are NaN."""
    out = np.full(data.targets.shape, np.nan, dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for s in slides:
            idx = data.positions(s)
            x = torch.from_numpy(((data.features[idx] - scaler.feature_mean) / scaler.feature_std).astype(np.float32))
            pred = model(*to_model((x, data.graph(s)), model))
            out[idx] = to_numpy(pred) * scaler.target_std + scaler.target_mean
    return out
