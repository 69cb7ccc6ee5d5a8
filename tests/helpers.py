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


class MlpHeadNet(nn.Module):
    """TinyNet with a two-layer head, so frozen_backbone (whole head) and linear_probe (last Linear) differ."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(n_hidden, 16), nn.ReLU(), nn.Linear(16, n_classes))

    def forward(self, x):
        return self.head(self.encoder(x))


class NoAffineBatchNormNet(nn.Module):
    """A backbone whose BatchNorm has running statistics but no weight or bias (``affine=False``)."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden, affine=False), nn.ReLU())
        self.head = nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class HeadFirstNet(nn.Module):
    """Registers ``head`` before ``encoder``: the last nn.Linear by registration order is in the encoder."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.head = nn.Linear(n_hidden, n_classes)
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden))

    def forward(self, x):
        return self.head(self.encoder(x))


class ProjectorNet(nn.Module):
    """encoder -> head, plus a contrastive ``projector`` Linear registered after the head."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU())
        self.head = nn.Linear(n_hidden, n_classes)
        self.projector = nn.Linear(n_hidden, 8)

    def forward(self, x):
        return self.head(self.encoder(x))


class TimmStyleNet(nn.Module):
    """Names its classifier ``out`` and says so through ``get_classifier()``; ``aux`` comes last."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU())
        self.out = nn.Linear(n_hidden, n_classes)
        self.aux = nn.Linear(n_hidden, 2)

    def get_classifier(self):
        return self.out

    def forward(self, x):
        return self.out(self.features(x))


class ClassifierChildNet(nn.Module):
    """A ``classifier`` child (two Linears) followed by a ``proj`` Linear."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(n_hidden, 16), nn.ReLU(), nn.Linear(16, n_classes))
        self.proj = nn.Linear(n_hidden, 8)

    def forward(self, x):
        return self.classifier(self.features(x))


class AutoEncoder(nn.Module):
    """No head at all: ``encoder`` and ``decoder`` only."""

    def __init__(self, n_in: int = 10, n_hidden: int = 4):
        super().__init__()
        self.encoder = nn.Linear(n_in, n_hidden)
        self.decoder = nn.Linear(n_hidden, n_in)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class TwinEncoderNet(nn.Module):
    """Two same-named subtrees (``backbone.0`` and ``encoder.0``) that a prefixed checkpoint could fit."""

    def __init__(self, backbone_in: int = 4, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(backbone_in, n_hidden))
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden))
        self.head = nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class PosEmbedNet(nn.Module):
    """Token embedding + positional embedding (rank 3) that timm-style ``no_weight_decay()`` exempts."""

    def __init__(self, n_tokens: int = 20, length: int = 4, dim: int = 8, n_classes: int = 3):
        super().__init__()
        self.tok = nn.Embedding(n_tokens, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        self.mixer = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, n_classes)

    def no_weight_decay(self):
        return {"pos_embed", "tok"}

    def forward(self, x):
        return self.head(self.mixer(self.tok(x) + self.pos_embed).mean(1))
