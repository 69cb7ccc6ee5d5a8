"""Event tables in, clients out: reading CSV / parquet, the checks and cleaning rules, the split, the batches.

A long-format event table (one row per event: ``client_id``, ``event_time``, categorical and numeric fields) and a
labels table (``client_id``, ``target``), as CSV or parquet, become an :class:`EventData`: one feature dict of numpy
arrays per client (ptls's format). :func:`load` checks and cleans them: events out of time order are sorted (a warning
counts the clients), clients of the labels table without events are left out (counted), a client with events but no
label is an error naming the first 5, NaN in a numeric field is an error naming the field (or imputed with the
training median when ``impute_numeric=True``), and a category not seen in the training clients maps to the "unknown"
index (counted). Each client keeps its last ``max_seq_len`` events (truncation policy: the most recent events matter
most for a label about the client now; the count of truncated clients is in the summary). ``time_gap`` (log1p of the
days since the previous event, 0 for the first) is derived from ``event_time`` and joins the numeric fields.

:class:`EventBatches` (fine-tuning, evaluation) and :func:`coles_loader` (CoLES) turn clients into ptls
``PaddedBatch`` es.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ... import splits
from ...batches import IndexBatches
from ...cache import fingerprint
from ...distributed import shard_indices
from .layout import CLIENT, PAD, TARGET, TIME, TIME_GAP, UNKNOWN  # noqa: F401 - PAD: part of the layout
from .simulate import simulate

__all__ = ["CLIENT", "TIME", "TARGET", "TIME_GAP", "PAD", "UNKNOWN", "EventData", "EventBatches", "coles_loader",
           "read_table", "load"]



def read_table(path: str | os.PathLike, *, what: str = "data_path") -> pd.DataFrame:
    """A CSV or parquet table; ``client_id`` read as text."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}={str(path)!r} does not exist. Give a .csv or .parquet file"
                                f"{', or an empty data_path for simulated data' if what == 'data_path' else ''}.")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".csv", ".gz", ".txt"):
        frame = pd.read_csv(path, dtype={CLIENT: str}, keep_default_na=True)
    else:
        raise ValueError(f"{what}={str(path)!r}: unknown format {path.suffix!r}. Use .csv or .parquet.")
    if CLIENT in frame:
        frame[CLIENT] = frame[CLIENT].astype(str)
    return frame


def _labels_path(data_path: Path) -> Path:
    for suffix in (data_path.suffix, ".csv", ".parquet"):
        candidate = data_path.with_name(f"{data_path.stem}.labels{suffix}")
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"No labels file for {data_path.name}: give labels_path=, or put "
                            f"{data_path.stem}.labels.csv (columns {CLIENT}, {TARGET}) beside it.")


def _fields(value) -> list[str]:
    if isinstance(value, str):
        return [f.strip() for f in value.split(",") if f.strip()]
    return list(value)


def _check_columns(frame: pd.DataFrame, wanted: Sequence[str], source: str, hint: str) -> None:
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"{source} lacks the column(s) {missing}; it has {list(frame.columns)}. {hint}")


# --------------------------------------------------------------------------- data


@dataclass
class EventData:
    """Clients as feature dicts of numpy arrays (ptls's format), their labels and the split.

    ``sequences[i]`` maps ``event_time`` and every field to an array of client ``i``'s events
    (time order, the last ``max_seq_len`` kept); categorical fields hold indices (0 pads,
    1 is unknown), numeric fields float32.
    """

    sequences: list[dict]
    client_ids: np.ndarray
    labels: np.ndarray
    classes: list[str]
    categorical: list[str]
    numeric: list[str]
    vocab: dict[str, list[str]]
    train_idx: np.ndarray
    test_idx: np.ndarray
    labelled_idx: np.ndarray
    val_idx: np.ndarray
    max_seq_len: int
    source: str = ""
    notices: dict = field(default_factory=dict)
    content_hash: str = ""
    y: np.ndarray = field(init=False)

    def __post_init__(self):
        index = {c: i for i, c in enumerate(self.classes)}
        self.y = np.array([index[c] for c in self.labels], dtype=np.int64)

    @property
    def fields(self) -> list[str]:
        return self.categorical + self.numeric

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s[TIME]) for s in self.sequences])

    def batches(self, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0) -> "EventBatches":
        return EventBatches(self, idx, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def class_weights(self, idx=None) -> np.ndarray:
        """``n / (k * count)`` per class over ``idx`` (default: the labelled clients); scikit-learn's "balanced"."""
        y = self.y[self.labelled_idx if idx is None else idx]
        counts = np.bincount(y, minlength=len(self.classes)).astype(float)
        return np.where(counts > 0, len(y) / (len(self.classes) * np.maximum(counts, 1)), 0.0)

    def to_frame(self) -> pd.DataFrame:
        parts = {"fit (labelled)": self.labelled_idx, "validation": self.val_idx, "train (all, pretraining)":
                 self.train_idx, "test": self.test_idx}
        frame = pd.DataFrame({name: pd.Series(self.labels[idx]).value_counts() for name, idx in parts.items()})
        frame = frame.reindex(self.classes).fillna(0).astype(int)
        frame.loc["total"] = frame.sum()
        return frame.rename_axis(TARGET)

    def to_dict(self) -> dict:
        lengths = self.lengths
        return {"source": self.source, "clients": len(self.sequences), "events": int(lengths.sum()),
                "classes": list(self.classes), "categorical": self.categorical, "numeric": self.numeric,
                "vocab_sizes": {k: len(v) for k, v in self.vocab.items()}, "max_seq_len": self.max_seq_len,
                "train": len(self.train_idx), "labelled": len(self.labelled_idx), "val": len(self.val_idx),
                "test": len(self.test_idx), "notices": self.notices}

    def summary(self) -> str:
        lengths = self.lengths
        notes = "; ".join(f"{k}: {v}" for k, v in self.notices.items() if v)
        return (f"{self.source}: {len(self.sequences)} clients, {int(lengths.sum())} events (length {lengths.min()}-"
                f"{lengths.max()}, median {int(np.median(lengths))}, last {self.max_seq_len} kept), "
                f"{len(self.classes)} classes; categorical {self.categorical}, numeric {self.numeric}; "
                f"train {len(self.train_idx)} ({len(self.labelled_idx)} labelled for fitting, {len(self.val_idx)} "
                f"for validation), test {len(self.test_idx)}" + (f". Notices: {notes}" if notes else ""))

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string()

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html()


def _encode_categories(values: pd.Series, vocab: list[str]) -> np.ndarray:
    index = {v: i + 2 for i, v in enumerate(vocab[2:])}
    return values.map(index).fillna(UNKNOWN).to_numpy(np.int64)


def _days(values: pd.Series) -> pd.Series:
    """Event times as days: numbers as they are, dates (datetime columns or date strings) as days since 1970."""
    if values.dtype.kind not in "Mm" and values.dtype.kind != "O":
        return pd.to_numeric(values, errors="coerce")
    numbers = pd.to_numeric(values, errors="coerce") if values.dtype.kind == "O" else None
    if numbers is not None and numbers.notna().sum() >= values.notna().sum():
        return numbers
    dates = pd.to_datetime(values, errors="coerce")
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_convert(None)
    return (dates - pd.Timestamp(0)) / pd.Timedelta(days=1)


def load(data_path: str = "", labels_path: str = "", *, categorical_fields="event_type,channel",
         numeric_fields="amount", max_seq_len: int = 1000, label_fraction: float = 1.0, seed: int = 0,
         impute_numeric: bool = False, test_size: float = 0.2, val_fraction: float = 0.1,
         n_clients: int = 1500) -> EventData:
    """Read (or simulate), check and split event sequences; see the module docstring for the rules.

    Parameters
    ----------
    data_path, labels_path
        The event table (.csv / .parquet) and the labels table; ``labels_path=""`` looks for
        ``<stem>.labels.csv`` (or .parquet) beside the events. ``data_path=""``: simulated data.
    categorical_fields, numeric_fields
        Comma-separated column names (or lists).
    max_seq_len
        Events kept per client: the last ``max_seq_len`` in time order.
    label_fraction
        Share of the training clients whose labels fine-tuning may use (stratified, at least one
        per class); pretraining uses every training client without its label.
    impute_numeric
        NaN in a numeric field: ``False`` raises, naming the field; ``True`` fills the training median.
    """
    categorical, numeric = _fields(categorical_fields), _fields(numeric_fields)
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be >= 1: the number of latest events kept per client.")
    if not data_path:
        events, labels = simulate(n_clients=n_clients, seed=0)
        source = f"simulated ({n_clients} clients)"
    else:
        events = read_table(data_path)
        labels = read_table(labels_path or _labels_path(Path(data_path)), what="labels_path")
        source = Path(data_path).name
    hint = f"An event table needs {CLIENT}, {TIME} and the fields you name (categorical_fields / numeric_fields)."
    _check_columns(events, [CLIENT, TIME, *categorical, *numeric], source, hint)
    _check_columns(labels, [CLIENT, TARGET], "the labels table", f"It needs {CLIENT} and {TARGET}.")
    if TIME_GAP in numeric:
        raise ValueError(f"{TIME_GAP!r} is derived from {TIME}; leave it out of numeric_fields.")
    notices: dict = {}

    # labels: every client with events needs one; clients without events are left out
    labels = labels.dropna(subset=[TARGET])
    repeated = labels[labels.duplicated(CLIENT, keep=False)]
    if len(repeated):
        kinds = repeated.groupby(CLIENT, sort=True)[TARGET].agg(lambda t: list(dict.fromkeys(t.tolist())))
        conflicting = kinds[kinds.map(len) > 1]
        if len(conflicting):
            shown = "; ".join(f"{client!r}: {values}" for client, values in conflicting.head(5).items())
            raise ValueError(
                f"{len(conflicting)} client(s) have label rows that disagree (first 5: {shown}). A client has one "
                f"label: keep one row per {CLIENT} in the labels table (e.g. labels.drop_duplicates({CLIENT!r}, "
                "keep='last') if the last row is the right one), or drop those clients.")
        extra = int(labels.duplicated(CLIENT).sum())
        notices["repeated label rows (same label, dropped)"] = extra
        warnings.warn(f"{extra} label row(s) repeat a client's row with the same label and were dropped "
                      f"(first 5 clients: {kinds.index[:5].tolist()}).", stacklevel=2)
        labels = labels.drop_duplicates(CLIENT)
    have_events = set(events[CLIENT].unique())
    without_label = sorted(have_events - set(labels[CLIENT]))
    if without_label:
        raise ValueError(f"{len(without_label)} client(s) have events but no label (first 5: {without_label[:5]}). "
                         f"Add them to the labels table ({CLIENT}, {TARGET}), or drop their events.")
    no_events = labels[~labels[CLIENT].isin(have_events)]
    if len(no_events):
        notices["clients without events (excluded)"] = len(no_events)
        warnings.warn(f"{len(no_events)} labelled client(s) have zero events and are excluded "
                      f"(first 5: {no_events[CLIENT].head().tolist()}).", stacklevel=2)
    labels = labels[labels[CLIENT].isin(have_events)]

    # time order within each client
    events = events.copy()
    events[TIME] = _days(events[TIME])
    if events[TIME].isna().any():
        row = int(np.flatnonzero(events[TIME].isna().to_numpy())[0])
        raise ValueError(f"{source}: {TIME} of row {row} is empty or not a number/date. Every event needs a time.")
    out_of_order = events.groupby(CLIENT, sort=False)[TIME].apply(lambda t: bool((np.diff(t.to_numpy()) < 0).any()))
    if out_of_order.any():
        notices["clients with events out of time order (sorted)"] = int(out_of_order.sum())
        warnings.warn(f"{int(out_of_order.sum())} client(s) have events out of time order; they were sorted by "
                      f"{TIME} (first 5: {out_of_order[out_of_order].index[:5].tolist()}).", stacklevel=2)
    events = events.sort_values([CLIENT, TIME], kind="stable", ignore_index=True)
    gap = events.groupby(CLIENT, sort=False)[TIME].diff().fillna(0.0).clip(lower=0)
    events[TIME_GAP] = np.log1p(gap.to_numpy()).astype(np.float32)

    # split by client (stratified), labelled and validation clients
    labels = labels.sort_values(CLIENT, ignore_index=True)
    client_ids = labels[CLIENT].to_numpy()
    target = labels[TARGET].astype(str).to_numpy()
    train_idx, test_idx = splits.holdout(target, test_size=test_size, seed=seed)
    labelled = train_idx[splits.few_shot(target[train_idx], fraction=label_fraction, seed=seed)] \
        if label_fraction < 1 else train_idx
    val = np.array([], dtype=np.int64)
    if val_fraction > 0:
        val = labelled[splits.few_shot(target[labelled], fraction=val_fraction, seed=seed, min_per_class=0)]
    train_clients = set(client_ids[train_idx])
    in_train = events[CLIENT].isin(train_clients).to_numpy()

    # numeric fields: numbers, NaN an error or imputed with the training median
    for column in numeric:
        values = pd.to_numeric(events[column], errors="coerce")
        bad = values.isna() & events[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{source}: numeric field {column!r} holds {events[column].iloc[row]!r} ({int(bad.sum())} "
                             "such value(s)). Fix the values, or list the column in categorical_fields.")
        missing = int(values.isna().sum())
        if missing and not impute_numeric:
            raise ValueError(f"{source}: numeric field {column!r} has {missing} NaN value(s). Fill or drop them, or "
                             "pass impute_numeric=True to fill them with the training clients' median.")
        if missing:
            median = float(np.nanmedian(values[in_train])) if in_train.any() else 0.0
            notices[f"NaN in {column!r} (imputed with median {median:.4g})"] = missing
            warnings.warn(f"{missing} NaN value(s) in numeric field {column!r} were imputed with the training "
                          f"median {median:.4g}.", stacklevel=2)
            values = values.fillna(median)
        events[column] = values.astype(np.float32)

    # categories: vocabulary of the training clients; others map to "unknown"
    vocab = {}
    for column in categorical:
        text = events[column].astype(str).where(events[column].notna(), "<missing>")
        seen = sorted(text[in_train].unique())
        vocab[column] = ["<pad>", "<unknown>", *seen]
        codes = _encode_categories(text, vocab[column])
        unseen = int((codes == UNKNOWN).sum())
        if unseen:
            examples = sorted(text[codes == UNKNOWN].unique())[:5]
            notices[f"events with a {column!r} unseen in training (-> unknown)"] = unseen
            warnings.warn(f"{unseen} event(s) have a {column} not seen in the training clients ({examples}); they map "
                          "to the 'unknown' index.", stacklevel=2)
        events[column] = codes

    # one feature dict per client, the last max_seq_len events
    numeric_all = numeric + [TIME_GAP]
    grouped = events.groupby(CLIENT, sort=True)
    starts = grouped.indices
    sequences, truncated = [], 0
    columns = {c: events[c].to_numpy() for c in [TIME, *categorical, *numeric_all]}
    for client in client_ids:
        rows = starts[client][-max_seq_len:]
        truncated += len(starts[client]) > max_seq_len
        seq = {TIME: columns[TIME][rows].astype(np.float64)}
        seq |= {c: columns[c][rows].astype(np.int64) for c in categorical}
        seq |= {c: columns[c][rows].astype(np.float32) for c in numeric_all}
        sequences.append(seq)
    notices["clients truncated to their last max_seq_len events"] = int(truncated)
    digest = fingerprint(*[events[c].to_numpy() for c in [TIME, *categorical, *numeric_all]],
                         events[CLIENT].to_numpy().astype(str), client_ids.astype(str), target.astype(str), vocab,
                         max_seq_len)
    return EventData(
        sequences=sequences, client_ids=client_ids, labels=target, classes=sorted(set(target)),
        categorical=categorical, numeric=numeric_all, vocab=vocab, train_idx=train_idx, test_idx=test_idx,
        labelled_idx=np.sort(np.setdiff1d(labelled, val)), val_idx=np.sort(val), max_seq_len=max_seq_len,
        source=source, notices=notices, content_hash=digest,
    )


# --------------------------------------------------------------------------- batches


def _collate(items: list[dict]):
    """ptls's collate: feature dicts of arrays -> a PaddedBatch of (B, T) tensors."""
    from ptls.data_load.utils import collate_feature_dict

    return collate_feature_dict([{k: torch.from_numpy(v) for k, v in item.items()} for item in items])


class EventBatches(IndexBatches):
    """``(PaddedBatch, labels)`` mini-batches of whole clients (ptls's collate), sharded like the core's batches.

    An :class:`workbench.batches.IndexBatches` over the positions of ``idx``: a length and a ``generator``, so
    :func:`workbench.fit` can restore the data order on resume, and under ``--nproc`` (torchrun) ``shard(rank,
    world_size)`` gives each rank its share of every epoch's permutation (:func:`workbench.distributed.shard_indices`).

    ``max_tokens`` (optional, for evaluation) bounds the padded size ``batch * longest``: clients are then grouped by
    length (longest first) so that a batch of long clients holds few of them. This is how a batch with lengths from 1
    to 5,000 stays within memory. Sharded, each rank takes every ``world_size``-th of these batches (padded by
    repeating the first ones, so that every rank has as many).
    """

    def __init__(self, data: EventData, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0,
                 max_tokens: int | None = None):
        idx = np.asarray(idx, dtype=np.int64)
        super().__init__(len(idx), batch_size=batch_size, shuffle=shuffle, seed=seed)
        self.data, self.idx, self.max_tokens = data, idx, max_tokens
        self._plan = self._by_length() if max_tokens else None

    def _by_length(self) -> list[np.ndarray]:
        lengths = np.array([len(self.data.sequences[i][TIME]) for i in self.idx])
        order = np.argsort(-lengths, kind="stable")
        plan, current = [], []
        for pos in order:
            longest = lengths[current[0]] if current else lengths[pos]
            if current and (len(current) + 1) * longest > self.max_tokens or len(current) == self.batch_size:
                plan.append(np.array(current))
                current = []
            current.append(pos)
        if current:
            plan.append(np.array(current))
        return plan

    def __len__(self) -> int:
        if self._plan is not None:
            return len(shard_indices(np.arange(len(self._plan)), self.rank, self.world_size))
        return super().__len__()

    def take(self, pos):
        """The batch of the clients at positions ``pos`` of ``idx``: ``(PaddedBatch, labels)``."""
        rows = self.idx[pos]
        return _collate([self.data.sequences[i] for i in rows]), torch.from_numpy(self.data.y[rows])

    def positions(self) -> list[np.ndarray]:
        """Positions into ``idx`` of each of this rank's batches, in the order of iteration (one epoch's draw)."""
        if self._plan is not None:
            return [self._plan[b] for b in shard_indices(np.arange(len(self._plan)), self.rank, self.world_size)]
        n = len(self.idx)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)).numpy()
        order = shard_indices(order, self.rank, self.world_size)
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def __iter__(self):
        for pos in self.positions():
            yield self.take(pos)


def coles_loader(data: EventData, idx, *, batch_size: int, split_count: int, cnt_min: int, cnt_max: int,
                 seed: int = 0):
    """CoLES batches: ptls's ``ColesDataset`` (``SampleSlices``: ``split_count`` sub-sequences per client) in a DataLoader.

    Each batch is ``(PaddedBatch, client labels)`` from ptls's ``ColesDataset.collate_fn``. The
    slicing draws from numpy's global RNG (as ptls does); :func:`workbench.fit` saves and
    restores it, and the loader's ``generator``, on resume. The same loader feeds Lightning in
    ``benchmarks/coles_throughput.py``.
    """
    from ptls.frames.coles import ColesDataset
    from ptls.frames.coles.split_strategy import SampleSlices

    clients = [{k: torch.from_numpy(v) for k, v in data.sequences[i].items()} for i in np.asarray(idx)]
    dataset = ColesDataset(clients, splitter=SampleSlices(split_count=split_count, cnt_min=cnt_min, cnt_max=cnt_max))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                       collate_fn=ColesDataset.collate_fn)


