"""The region transformer with its condition encoder, built for a data set's layout and vocabularies."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import RegulatoryData
from .formats import NUMERIC

__all__ = ["DEFAULTS", "LEGACY_KEY_MAP", "ConditionEncoder", "Block", "RegulatoryModel", "build_model"]

#: Architecture and training settings the notebook does not expose.
DEFAULTS = {
    "width": 128,
    "layers": 3,
    "heads": 4,
    "ff_mult": 2,
    "condition_dim": 8,
    "fusion_hidden": 64,
    "dropout": 0.0,
    "weight_decay": 0.01,
    "pretrain_epochs": 15,
    "pretrain_lr": 1e-3,
    "pretrain_batch_size": 128,
    "unknown_rate": 0.05,
}
PRETRAIN_SETTINGS = ("width", "layers", "heads", "ff_mult", "condition_dim", "fusion_hidden", "dropout",
                     "weight_decay", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "unknown_rate")

#: How an older version of this model named its weights (``old prefix -> new prefix``).
LEGACY_KEY_MAP = {"blocks.": "encoder.", "cond.": "conditions.", "expr_head.": "head."}


class ConditionEncoder(nn.Module):
    """Condition features -> one vector: an embedding per categorical feature, normalised numerics.

    Index 0 of every embedding is "unknown". The numeric mean and standard deviation are
    buffers, so they travel in every checkpoint with the weights they were trained with.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], n_numeric: int, *, dim: int = 8, mean=None, std=None):
        super().__init__()
        self.embeddings = nn.ModuleDict({name: nn.Embedding(size, dim) for name, size in vocab_sizes.items()})
        self.register_buffer("numeric_mean", torch.as_tensor(mean if mean is not None else np.zeros(n_numeric),
                                                             dtype=torch.float32))
        self.register_buffer("numeric_std", torch.as_tensor(std if std is not None else np.ones(n_numeric),
                                                            dtype=torch.float32))
        self.out_features = dim * len(vocab_sizes) + n_numeric

    def forward(self, categorical, numeric):
        parts = [embedding(categorical[:, i]) for i, embedding in enumerate(self.embeddings.values())]
        parts.append((numeric - self.numeric_mean) / self.numeric_std)
        return torch.cat(parts, dim=1)


class Block(nn.Module):
    """Pre-norm transformer block with plain linear layers (``q``, ``k``, ``v``, ``o``, ``ff1``, ``ff2``)."""

    def __init__(self, width: int, heads: int, *, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(width, ff_mult * width), nn.Linear(ff_mult * width, width)
        self.dropout = dropout

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (layer(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for layer in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.o(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.ff2(F.dropout(F.gelu(self.ff1(self.norm2(x))), self.dropout, self.training))


class RegulatoryModel(nn.Module):
    """Regions + condition -> expression (see the module docstring)."""

    head_prefixes = ("head",)
    lora_targets = ("condition_token", "encoder", "head")
    lora_train_fully = ("conditions",)

    def __init__(self, n_regions: int, n_channels: int, vocab_sizes: Mapping[str, int], n_numeric: int, *,
                 width: int = 128, layers: int = 3, heads: int = 4, ff_mult: int = 2, condition_dim: int = 8,
                 fusion_hidden: int = 64, dropout: float = 0.0, mean=None, std=None, unknown_rate: float = 0.0):
        super().__init__()
        self.region_embed = nn.Linear(n_channels, width)
        self.position = nn.Parameter(torch.randn(n_regions, width) * 0.02)
        self.conditions = ConditionEncoder(vocab_sizes, n_numeric, dim=condition_dim, mean=mean, std=std)
        self.condition_token = nn.Linear(self.conditions.out_features, width)
        self.encoder = nn.ModuleList(Block(width, heads, ff_mult=ff_mult, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width + self.conditions.out_features, fusion_hidden), nn.GELU(),
                                  nn.Linear(fusion_hidden, 1))
        self.unknown_rate = unknown_rate

    def forward(self, regions, categorical, numeric):
        if self.training and self.unknown_rate > 0:  # teach the "unknown" embedding now and then
            keep = torch.rand(categorical.shape, device=categorical.device) >= self.unknown_rate
            categorical = categorical * keep
        condition = self.conditions(categorical, numeric)
        tokens = self.region_embed(regions) + self.position
        x = torch.cat([self.condition_token(condition).unsqueeze(1), tokens], dim=1)
        for block in self.encoder:
            x = block(x)
        return self.head(torch.cat([self.norm(x[:, 0]), condition], dim=1)).squeeze(1)

    def loss(self, batch):
        regions, categorical, numeric, y = batch
        return F.mse_loss(self(regions, categorical, numeric), y)


def build_model(data: RegulatoryData, *, numeric_rows=None, **overrides) -> RegulatoryModel:
    """The model for ``data``'s layout and vocabularies, numeric statistics from rows ``numeric_rows``.

    ``numeric_rows`` defaults to the labelled rows (source and fine-tuning train); pretraining
    passes the source rows, so that its cached checkpoint depends on nothing else of the split.
    """
    cfg = {**DEFAULTS, **overrides}
    mean, std = data.numeric_stats(numeric_rows)
    return RegulatoryModel(
        data.n_regions, data.n_channels, {c: len(v) for c, v in data.vocab.items()}, len(NUMERIC),
        width=cfg["width"], layers=cfg["layers"], heads=cfg["heads"], ff_mult=cfg["ff_mult"],
        condition_dim=cfg["condition_dim"], fusion_hidden=cfg["fusion_hidden"], dropout=cfg["dropout"],
        mean=mean, std=std, unknown_rate=cfg["unknown_rate"],
    )
