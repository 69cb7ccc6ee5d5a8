"""The heart-sound models: a 1-D conv encoder, the classifier that fine-tunes it, the contrastive pretraining model.

:class:`ConvEncoder`: average-pooling to about 1 kHz, four ``Conv1d-BatchNorm-ReLU`` blocks of stride 2 (widths
8-16-32-64), then mean and max over time. :class:`HeartSoundClassifier` adds a dropout + linear head;
:class:`ContrastiveModel` a projection head whose loss is SimCLR's NT-Xent on two augmented views.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ... import audio
from .settings import DEFAULTS

__all__ = ["ConvEncoder", "HeartSoundClassifier", "ContrastiveModel", "build_model"]



def _block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False),
                         nn.BatchNorm1d(cout), nn.ReLU())


class ConvEncoder(nn.Module):
    """Waveform (batch x samples) -> embedding: pool to ~1 kHz, four strided conv blocks, mean+max over time."""

    def __init__(self, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), kernels=(9, 7, 7, 5)):
        super().__init__()
        pool = max(1, sample_rate // 1000)
        self.stem = nn.AvgPool1d(pool) if pool > 1 else nn.Identity()
        layers, cin = [], 1
        for width, kernel in zip(widths, kernels):
            layers.append(_block(cin, width, kernel))
            cin = width
        self.blocks = nn.Sequential(*layers)
        self.out_features = 2 * cin

    def forward(self, x):
        h = self.blocks(self.stem(x.unsqueeze(1)))
        return torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)


class HeartSoundClassifier(nn.Module):
    """``encoder`` (pretrainable) + ``head`` (dropout and a linear layer)."""

    head_prefixes = ("head",)

    def __init__(self, n_classes: int, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), dropout: float = 0.1):
        super().__init__()
        self.encoder = ConvEncoder(sample_rate=sample_rate, widths=widths)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_features, n_classes))

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class ContrastiveModel(nn.Module):
    """Encoder + projection head trained with NT-Xent on two augmented views of each recording."""

    def __init__(self, *, sample_rate: int = 4000, widths=(8, 16, 32, 64), temperature: float = 0.2):
        super().__init__()
        self.encoder = ConvEncoder(sample_rate=sample_rate, widths=widths)
        width = self.encoder.out_features
        self.projector = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))
        self.sample_rate, self.temperature = sample_rate, temperature

    def loss(self, batch):
        v1, v2 = batch[0], batch[1]
        v1 = audio.augment_views(v1, rate=self.sample_rate)
        v2 = audio.augment_views(v2, rate=self.sample_rate)
        return audio.nt_xent(self.projector(self.encoder(v1)), self.projector(self.encoder(v2)),
                             temperature=self.temperature)


def build_model(data, **overrides) -> HeartSoundClassifier:
    """The classifier for ``data``'s classes and sample rate; ``overrides`` replace ``DEFAULTS`` (widths,
    dropout)."""
    cfg = {**DEFAULTS, **overrides}
    return HeartSoundClassifier(len(data.classes), sample_rate=data.sample_rate, widths=tuple(cfg["widths"]),
                                dropout=cfg["dropout"])

