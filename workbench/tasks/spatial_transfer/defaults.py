"""The spatial workflow's settings the notebook does not expose, and the names its parameters choose from."""

from __future__ import annotations

__all__ = ["DEFAULTS", "PRETRAIN_SETTINGS", "CV_KINDS", "STRATEGIES"]

#: Simulation, architecture and training settings the notebook does not expose.
DEFAULTS = {
    "n_bulk_genes": 250, "n_spatial_genes": 100, "n_shared": 50, "n_pcs": 30, "grid": 12,
    "cells_per_spot": (5, 20), "smoothness": 2.0, "contrast": 1.5, "feature_noise": 0.5, "target_noise": 0.05,
    "neighbours": 6, "radius": 1.5,
    "hidden": 64, "gat_heads": 2, "d_model": 64, "heads": 4, "ff": 128, "dropout": 0.1,
    "bulk_layers": 3, "spatial_layers": 2,
    "weight_decay": 0.01, "pretrain_epochs": 40, "pretrain_lr": 1e-3, "pretrain_patience": 8,
    "val_fraction": 0.15,
}
PRETRAIN_SETTINGS = ("hidden", "gat_heads", "d_model", "heads", "ff", "dropout", "bulk_layers", "weight_decay",
                     "pretrain_epochs", "pretrain_lr", "pretrain_patience", "neighbours", "radius")
CV_KINDS = ("loo", "kfold")
STRATEGIES = ("full", "frozen_backbone", "frozen_decoder")
