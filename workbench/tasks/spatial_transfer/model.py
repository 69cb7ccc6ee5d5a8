"""The spot model: a graph-attention layer over the spot graph, a projection, a transformer over a slide's spots."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .data import SpotData
from .defaults import DEFAULTS

__all__ = ["SpotGNN", "SpatialExpressionModel", "build_model"]


class SpotGNN(nn.Module):
    """One graph-attention layer over the spot graph, with a linear skip of the spot's own features."""

    def __init__(self, n_features: int, hidden: int, *, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        from torch_geometric.nn import GATConv

        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be a multiple of gat_heads={heads}.")
        self.conv = GATConv(n_features, hidden // heads, heads=heads, dropout=dropout, add_self_loops=True)
        self.skip = nn.Linear(n_features, hidden)

    def forward(self, x, edge_index):
        return F.elu(self.conv(x, edge_index) + self.skip(x))


class SpatialExpressionModel(nn.Module):
    """GNN -> projection -> transformer encoder (over a slide's spots) -> output projection."""

    head_prefixes = ("output",)
    #: Named strategies: which modules each one freezes (see :func:`workbench.apply_strategy`).
    strategies = {"frozen_backbone": ("gnn", "projection"), "frozen_decoder": ("gnn", "encoder")}

    def __init__(self, n_features: int, n_genes: int, *, layers: int = 2, hidden: int = 64, gat_heads: int = 2,
                 d_model: int = 64, heads: int = 4, ff: int = 128, dropout: float = 0.1):
        super().__init__()
        self.gnn = SpotGNN(n_features, hidden, heads=gat_heads, dropout=dropout)
        self.projection = nn.Sequential(nn.Linear(hidden, d_model), nn.LayerNorm(d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output = nn.Linear(d_model, n_genes)

    def forward(self, x, edge_index):
        h = self.projection(self.gnn(x, edge_index))
        return self.output(self.encoder(h.unsqueeze(0)).squeeze(0))

    def loss(self, batch):
        x, edges, y, mask = batch[:4]
        # the mean squared error over the spots in ``mask``, without boolean indexing (a host sync per step)
        err = torch.where(mask.unsqueeze(1), (self(x, edges) - y) ** 2, 0.0)
        return err.sum() / (mask.sum() * y.shape[1])


def build_model(data: SpotData, *, layers: int | None = None, **overrides) -> SpatialExpressionModel:
    """The model for ``data``'s features and genes (``layers``: spatial default, 2)."""
    cfg = {**DEFAULTS, **overrides}
    return SpatialExpressionModel(data.n_features, len(data.genes), layers=layers or cfg["spatial_layers"],
                                  hidden=cfg["hidden"], gat_heads=cfg["gat_heads"], d_model=cfg["d_model"],
                                  heads=cfg["heads"], ff=cfg["ff"], dropout=cfg["dropout"])

