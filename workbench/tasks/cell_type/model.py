"""The models: an MLP expression encoder, the classifier over it, and the masked-expression pretraining model.

On a few hundred to a few thousand cells an MLP on the expression vector is the strongest simple choice: gene order
carries no meaning (so convolutions do not fit) and a gene-token transformer needs far more cells to pay off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DEFAULTS", "ExpressionEncoder", "CellTypeClassifier", "MaskedExpressionModel", "build_model"]

#: Architecture and training settings the notebook does not expose as parameters (``pretrain_epochs`` is one, and
#: this is its default when :func:`workbench.tasks.cell_type.pretrain` is called without it).
DEFAULTS = {
    "hidden": (512, 256),
    "dropout": 0.1,
    "input_dropout": 0.0,
    "label_smoothing": 0.1,
    "weight_decay": 0.01,
    "pretrain_epochs": 100,
    "pretrain_lr": 1e-3,
    "pretrain_batch_size": 64,
    "mask_ratio": 0.3,
}


class ExpressionEncoder(nn.Module):
    """Genes -> cell embedding: ``[Linear, LayerNorm, GELU, Dropout]`` per hidden layer."""

    def __init__(self, n_genes: int, *, hidden=(512, 256), dropout: float = 0.1, input_dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
        width = n_genes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.layers(x)


class CellTypeClassifier(nn.Module):
    """``encoder`` (pretrainable) + ``head`` (a linear layer over the embedding)."""

    head_prefixes = ("head",)

    def __init__(self, n_genes: int, n_classes: int, *, hidden=(512, 256), dropout: float = 0.1,
                 input_dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder = ExpressionEncoder(n_genes, hidden=hidden, dropout=dropout, input_dropout=input_dropout)
        self.head = nn.Linear(self.encoder.out_features, n_classes)
        self.label_smoothing = label_smoothing

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)


class MaskedExpressionModel(nn.Module):
    """Self-supervised pretraining: reconstruct the values of randomly masked genes."""

    def __init__(self, n_genes: int, *, hidden=(512, 256), dropout: float = 0.1, mask_ratio: float = 0.3):
        super().__init__()
        self.encoder = ExpressionEncoder(n_genes, hidden=hidden, dropout=dropout)
        width = self.encoder.out_features
        self.decoder = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, n_genes))
        self.mask_ratio = mask_ratio

    def loss(self, batch):
        x = batch[0]
        mask = (torch.rand_like(x) < self.mask_ratio).to(x.dtype)
        recon = self.decoder(self.encoder(x * (1 - mask)))
        return ((recon - x) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def build_model(data, **overrides) -> CellTypeClassifier:
    """The classifier for ``data`` (its genes and classes), with ``DEFAULTS`` updated by ``overrides``."""
    cfg = {**DEFAULTS, **overrides}
    return CellTypeClassifier(
        data.n_genes, len(data.classes), hidden=tuple(cfg["hidden"]), dropout=cfg["dropout"],
        input_dropout=cfg["input_dropout"], label_smoothing=cfg["label_smoothing"],
    )
