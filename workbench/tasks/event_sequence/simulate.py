"""Simulated clients with a documented ground truth (what ``data_path=""`` runs on).

Each client has a latent class ``c`` (4 classes, balanced) and a length drawn log-uniformly from 20 to 500 events.
The class shapes three things, each blurred per client:

event-type mix
    20 event types; client logits ``mu[c] + N(0, 1)`` per type, ``mu[c] ~ 0.6 * N(0, 1)``, and a class-dependent
    "stickiness" (the next event repeats the previous type with probability 0.05, 0.05, 0.35, 0.35 for classes
    0-3). Repeats leave the expected mix as it is, so only the order shows them.
amount
    ``log(amount) = base[type] + 0.25 * (c - 1.5) + N(0, 0.3)`` per client ``+ N(0, 0.8)`` per event,
    ``base[type] ~ N(3, 1)``.
timing
    gaps between events ``~ Exponential(mean)`` days, ``mean = 1.0`` for classes 0 and 3 and ``0.5`` for classes 1
    and 2, times a per-client factor ``exp(N(0, 0.3))``.

``channel`` (3 values) follows the event type (type mod 3, 20% random) and carries no class information. A
bag-of-event-types + amount-statistics model sees the mix and amounts but neither the order nor the timing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .layout import CLIENT, TARGET, TIME

__all__ = ["simulate", "write_tables"]


def simulate(*, n_clients: int = 1500, n_types: int = 20, min_len: int = 20, max_len: int = 500,
             seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Event and label tables with the ground truth of the module docstring.

    Returns
    -------
    events, labels
        ``events``: ``client_id, event_time`` (days), ``event_type``, ``channel``, ``amount``;
        ``labels``: ``client_id, target`` (``class0`` .. ``class3``).
    """
    rng = np.random.default_rng(seed)
    n_classes = 4
    mu = 0.6 * rng.normal(0, 1, (n_classes, n_types))
    base = rng.normal(3, 1, n_types)
    sticky = np.array([0.05, 0.05, 0.35, 0.35])
    gap_mean = np.array([1.0, 0.5, 0.5, 1.0])
    classes = np.arange(n_clients) % n_classes
    rng.shuffle(classes)
    lengths = np.exp(rng.uniform(np.log(min_len), np.log(max_len + 1), n_clients)).astype(int).clip(min_len, max_len)
    columns = {name: [] for name in ("type", "time", "channel", "amount")}
    for c, n in zip(classes, lengths):
        logits = mu[c] + rng.normal(0, 1, n_types)
        mix = np.exp(logits - logits.max())
        mix /= mix.sum()
        types = rng.choice(n_types, n, p=mix)
        repeat = rng.random(n) < sticky[c]
        for t in np.flatnonzero(repeat[1:]) + 1:  # a repeat copies the previous event's type
            types[t] = types[t - 1]
        columns["amount"].append(np.exp(base[types] + 0.25 * (c - 1.5) + rng.normal(0, 0.3) + rng.normal(0, 0.8, n)))
        columns["time"].append(np.cumsum(rng.exponential(gap_mean[c] * np.exp(rng.normal(0, 0.3)), n)))
        columns["channel"].append(np.where(rng.random(n) < 0.2, rng.integers(0, 3, n), types % 3))
        columns["type"].append(types)
    clients = np.array([f"c{i:05d}" for i in range(n_clients)])
    events = pd.DataFrame({
        CLIENT: np.repeat(clients, lengths), TIME: np.round(np.concatenate(columns["time"]), 4),
        "event_type": np.array([f"e{t:02d}" for t in range(n_types)])[np.concatenate(columns["type"])],
        "channel": np.array(["web", "pos", "atm"])[np.concatenate(columns["channel"])],
        "amount": np.round(np.concatenate(columns["amount"]), 2),
    })
    return events, pd.DataFrame({CLIENT: clients, TARGET: [f"class{c}" for c in classes]})


def write_tables(events: pd.DataFrame, labels: pd.DataFrame, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``events`` to ``path`` (.csv or .parquet) and ``labels`` beside it as ``<stem>.labels<suffix>``."""
    path = Path(path)
    labels_path = path.with_name(f"{path.stem}.labels{path.suffix}")
    for frame, target in ((events, path), (labels, labels_path)):
        if path.suffix == ".parquet":
            frame.to_parquet(target, index=False)
        else:
            frame.to_csv(target, index=False)
    return path, labels_path


