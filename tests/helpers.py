"""Small models and data shared by the tests (real torch, no mocks)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """encoder (Linear + BatchNorm + ReLU) -> head: a backbone with running statistics."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def toy_loader(n: int = 256, *, n_in: int = 10, batch_size: int = 32, seed: int = 0, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
