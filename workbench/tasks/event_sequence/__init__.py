"""Event-sequence classification: a CoLES encoder from pytorch-lifestream, fine-tuned with an MLP head.

Data
    A long-format event table (one row per event: ``client_id``, ``event_time``, categorical
    and numeric fields) as CSV or parquet, plus a labels table (``client_id``, ``target``).
    ``data_path=""`` simulates one (:func:`simulate`). :func:`load` checks and cleans it:
    events out of time order are sorted (a warning counts the clients), clients of the labels
    table without events are left out (counted), a client with events but no label is an error
    naming the first 5, NaN in a numeric field is an error naming the field (or imputed with the
    training median when ``impute_numeric=True``), and a category not seen in the training
    clients maps to the "unknown" index (counted). Each client keeps its last ``max_seq_len``
    events (truncation policy: the most recent events matter most for a label about the client
    now; the count of truncated clients is in the summary). ``time_gap`` (log1p of the days
    since the previous event, 0 for the first) is derived from ``event_time`` and joins the
    numeric fields.
Simulated ground truth (:func:`simulate`)
    Each client has a latent class ``c`` (4 classes, balanced) and a length drawn log-uniformly
    from 20 to 500 events. The class shapes three things, each blurred per client:

    event-type mix
        20 event types; client logits ``mu[c] + N(0, 1)`` per type, ``mu[c] ~ 0.6 * N(0, 1)``,
        and a class-dependent "stickiness" (the next event repeats the previous type with
        probability 0.05, 0.05, 0.35, 0.35 for classes 0-3). Repeats leave the expected mix as
        it is, so only the order shows them.
    amount
        ``log(amount) = base[type] + 0.25 * (c - 1.5) + N(0, 0.3)`` per client ``+ N(0, 0.8)``
        per event, ``base[type] ~ N(3, 1)``.
    timing
        gaps between events ``~ Exponential(mean)`` days, ``mean = 1.0`` for classes 0 and 3 and
        ``0.5`` for classes 1 and 2, times a per-client factor ``exp(N(0, 0.3))``.

    ``channel`` (3 values) follows the event type (type mod 3, 20% random) and carries no
    class information. A bag-of-event-types + amount-statistics model sees the mix and amounts
    but neither the order nor the timing.
Model
    :class:`SequenceClassifier`: ``encoder`` is a ptls ``RnnSeqEncoder`` (GRU/LSTM) or
    ``TransformerSeqEncoder`` over a ptls ``TrxEncoder`` (an embedding per categorical field,
    scaled numeric fields with batch norm); ``head`` is an MLP (``head_hidden``,
    ``head_dropout``, ``head_activation``). Batches are ptls ``PaddedBatch`` es built by
    ptls's collate. Class weights and label smoothing are part of the loss.
Pretraining
    CoLES (ptls's ``CoLESModule`` as a plain ``nn.Module``: its encoder, its L2-normalising head
    and ``ContrastiveLoss`` with hard-negative pairs; sub-sequences cut by ptls's ``SampleSlices``)
    over every training client without labels, trained by :func:`workbench.fit` (never by
    Lightning). Cached by fingerprint (data content, the clients, every setting). Its
    checkpoint has ptls's layout (``_seq_encoder.*``), so it loads like a checkpoint that ptls
    wrote: through :func:`workbench.load_pretrained`, whose prefix detection maps
    ``_seq_encoder.`` to ``encoder.``.
Baseline
    Logistic regression on bag-of-event-types (fraction of each type, log event count) plus
    statistics of each given numeric field, not ``time_gap`` (mean, std, min, 10/50/90th
    percentiles, max of ``sign(x) log1p|x|``), on the same labelled clients the model is fit on
    (not its validation clients). :func:`linear_probe` scores an encoder as it is: logistic
    regression on its embeddings of those clients.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .. import splits
from . import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from ..cache import cached, code_version, fingerprint
from ..checkpoints import resolve_pretrained, save_weights
from ..metrics import Evaluation, classification_metrics, evaluate_classifier, validation_accuracy_and_macro_f1
from ..params import Choice, Flag, Integer, Real, Spec, Text
from ..workflow import Param, Workflow
from ..predict import (
    MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names, class_predictions,
)
from ..predict import save_predictor as _save_predictor
from ..tracking import TRACKERS
from ..devices import NOTEBOOK_DTYPES, DeviceName, placement_key, to_model, to_numpy

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "EventData", "EventBatches", "coles_loader", "SequenceClassifier", "simulate", "write_tables",
    "read_table", "load", "build_encoder", "build_model", "build_coles", "pretrain", "pretrained", "load_checkpoint",
    "finetune", "predict_proba", "get_embeddings", "linear_probe", "save_embeddings", "baseline", "baseline_features", "evaluate", "HEADLINE_METRICS", "PACKAGES", "NOTEBOOK", "ENCODER_TYPES", "ACTIVATIONS",
]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "event_sequence_classification.ipynb"
HEADLINE_METRICS = ("test_accuracy", "test_macro_f1", "baseline_test_accuracy", "baseline_test_macro_f1")
PACKAGES = ("ptls", "pyarrow", "scipy")

CLIENT, TIME, TARGET = "client_id", "event_time", "target"
TIME_GAP = "time_gap"  # derived numeric field: log1p(days since the previous event)
PAD, UNKNOWN = 0, 1  # category indices: 0 pads (ptls embeddings use padding_idx=0), 1 is "unknown"
ENCODER_TYPES = ("gru", "lstm", "transformer")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
SCHEDULES = ("cosine", "plateau", "constant")

#: Architecture and training settings the notebook does not expose.
DEFAULTS = {
    "embedding_dim": 16,
    "transformer_heads": 2,
    "transformer_layers": 2,
    "weight_decay": 0.0,
    "test_size": 0.2,
    "val_fraction": 0.1,
    "pretrain_epochs": 30,  # 10 left full fine-tuning below the baseline at 10% labels (docs/workflows/parts/event_sequence.md)
    "pretrain_lr": 1e-3,
    "pretrain_batch_size": 64,
    "split_count": 5,
    "cnt_min": 15,
    "cnt_max": 150,
    "margin": 0.5,
    "neg_count": 5,
    "eval_tokens": 65536,  # padded events per batch when evaluating or embedding (EventBatches max_tokens)
}
#: What each parameter of the notebook accepts (checked by ``workbench run``/``sweep`` and the notebook's first cell).
WORKFLOW = Workflow(
    name='event_sequence',
    title='Event-sequence classification',
    notebook=NOTEBOOK,
    headline_metrics=HEADLINE_METRICS,
    packages=PACKAGES,
    predictor="workbench.tasks.event_sequence:EventSequencePredictor",
    parameters=dict(
        data_path=Param("", "long-format event table (.csv/.parquet); empty means simulated clients", Text()),
        labels_path=Param("", "labels table (client_id, target); empty: <data stem>.labels.csv beside data_path", Text()),
        categorical_fields=Param("event_type,channel", "comma-separated categorical columns", Text(nonempty=True)),
        numeric_fields=Param("amount", "comma-separated numeric columns (time_gap is derived from event_time)", Text()),
        max_seq_len=Param(1000, "events kept per client: the last max_seq_len in time order", Integer(ge=1)),
        impute_numeric=Param(False, "NaN in a numeric field: False is an error, True fills the training median", Flag()),
        pretrained_checkpoint=Param("pretrain", "pretrain (CoLES here) | none (from scratch) | a ptls/state-dict checkpoint path", Choice("pretrain", "none", or_path=True)),
        trust_pickle=Param(False, "allow a pickle checkpoint with Python objects (only for files you trust)", Flag()),
        encoder_type=Param("gru", "gru | lstm | transformer", Choice(*ENCODER_TYPES)),
        hidden_size=Param(64, "width of the sequence encoder (the client embedding)", Integer(ge=1)),
        pretrain_epochs=Param(30, "CoLES epochs (pretrained_checkpoint pretrain)", Integer(ge=1)),
        head_hidden=Param("256,128", "MLP head widths, comma-separated; empty for a linear head", Text()),
        head_dropout=Param(0.1, "dropout after each hidden head layer", Real(ge=0, lt=1)),
        head_activation=Param("relu", "relu | gelu | tanh", Choice(*ACTIVATIONS)),
        epochs=Param(60, "fine-tuning epochs", Integer(ge=1)),
        freeze_epochs=Param(5, "epochs with the encoder frozen (head only) before everything trains", Integer(ge=0)),
        learning_rate=Param(1.0e-3, "peak learning rate (of the head)", Real(gt=0)),
        backbone_lr_ratio=Param(1.0, "the encoder learns at learning_rate * backbone_lr_ratio once unfrozen", Real(gt=0)),
        batch_size=Param(32, "clients per batch", Integer(ge=1)),
        optimizer=Param("adamw", "adam | adamw", Choice("adam", "adamw")),
        lr_scheduler_type=Param("cosine", "cosine | plateau | constant", Choice(*SCHEDULES)),
        class_weights=Param("none", "none | balanced (weights the loss by inverse class frequency)", Choice("none", "balanced")),
        label_smoothing=Param(0.1, "label smoothing of the cross-entropy loss", Real(ge=0, lt=1)),
        grad_clip=Param(1.0, "clip the gradient norm (0: no clipping)", Real(ge=0)),
        amp=Param("none", "none | bf16 (autocast, also on the CPU)", Choice("none", "bf16")),
        save_top_k=Param(3, "checkpoints kept (best epochs by validation macro-F1)", Integer(ge=1)),
        label_fraction=Param(0.1, "share of the training clients whose labels are used", Real(gt=0, le=1)),
        seed=Param(0, "split, pretraining, initialisation and data order", Integer(ge=0)),
        output_dir=Param("", "run folder; empty: a new dated folder under runs/event_sequence/", Text()),
        tracker=Param("none", "none | wandb (offline unless WANDB_MODE is set)", Choice(*TRACKERS)),
        device=Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", DeviceName()),
        dtype=Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device path)", Choice(*NOTEBOOK_DTYPES)),
        interactive=Param(True, "show the widget panel and live curves (papermill runs set it False)", Flag()),
    ),
)

PRETRAIN_SETTINGS = ("embedding_dim", "transformer_heads", "transformer_layers", "weight_decay", "pretrain_epochs",
                     "pretrain_lr", "pretrain_batch_size", "split_count", "cnt_min", "cnt_max", "margin", "neg_count")


def _ptls():
    """Import ptls (optional extra ``sequences``) with a message that names the fix."""
    try:
        import ptls  # noqa: F401
    except ImportError as err:
        raise ImportError("The event-sequence workflow needs pytorch-lifestream: pip install 'workbench[sequences]' "
                          "(pytorch-lifestream==0.6.0).") from err


# --------------------------------------------------------------------------- simulation


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


# --------------------------------------------------------------------------- reading


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
         impute_numeric: bool = False, test_size: float | None = None, val_fraction: float | None = None,
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
    test_size = DEFAULTS["test_size"] if test_size is None else test_size
    val_fraction = DEFAULTS["val_fraction"] if val_fraction is None else val_fraction
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


class EventBatches:
    """``(PaddedBatch, labels)`` mini-batches of whole clients (ptls's collate).

    ``max_tokens`` (optional) bounds the padded size ``batch * longest``: clients are then
    grouped by length (longest first) so that a batch of long clients holds few of them. This is
    how a batch with lengths from 1 to 5,000 stays within memory. Has a length and a
    ``generator``, so :func:`workbench.fit` can restore the data order on resume.
    """

    def __init__(self, data: EventData, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0,
                 max_tokens: int | None = None):
        self.data, self.idx = data, np.asarray(idx, dtype=np.int64)
        self.batch_size, self.shuffle, self.max_tokens = batch_size, shuffle, max_tokens
        self.generator = torch.Generator().manual_seed(seed)
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
        return len(self._plan) if self._plan is not None else math.ceil(len(self.idx) / self.batch_size)

    def positions(self):
        """Positions into ``idx`` of each batch, in the order of iteration."""
        if self._plan is not None:
            return list(self._plan)
        n = len(self.idx)
        order = torch.randperm(n, generator=self.generator).numpy() if self.shuffle else np.arange(n)
        return [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]

    def __iter__(self):
        for pos in self.positions():
            rows = self.idx[pos]
            yield _collate([self.data.sequences[i] for i in rows]), torch.from_numpy(self.data.y[rows])


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


# --------------------------------------------------------------------------- models


@functools.cache
def _numeric_scalers():
    """ptls's ``identity`` and ``log`` scalers, keeping a floating field's dtype.

    ptls casts every numeric field to float32; these leave float32 fields as they are (the same
    numbers) and let a float64 batch reach a float64 model (``fit(dtype="float64")``, the CPU
    check that every batch takes the device path).
    """
    from ptls.nn.trx_encoder.scalers import IdentityScaler

    class Identity(IdentityScaler):
        def forward(self, x):
            x = x.unsqueeze(2)
            return x if x.is_floating_point() else x.float()

    class Log(Identity):
        def forward(self, x):
            x = super().forward(x)
            return x.abs().log1p() * x.sign()

    return Identity, Log


def build_encoder(data: EventData, *, encoder_type: str = "gru", hidden_size: int = 64, **overrides):
    """A ptls sequence encoder: ``TrxEncoder`` + ``RnnSeqEncoder`` (gru | lstm) or ``TransformerSeqEncoder``."""
    _ptls()
    from ptls.nn import RnnSeqEncoder, TransformerSeqEncoder, TrxEncoder

    if encoder_type not in ENCODER_TYPES:
        raise ValueError(f"encoder_type={encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}.")
    cfg = {**DEFAULTS, **overrides}
    dim = cfg["embedding_dim"]
    embeddings = {c: {"in": len(data.vocab[c]), "out": min(dim, len(data.vocab[c]))} for c in data.categorical}
    identity, log = _numeric_scalers()
    numeric = {c: (identity() if c == TIME_GAP else log()) for c in data.numeric}
    if encoder_type == "transformer":
        trx = TrxEncoder(embeddings=embeddings, numeric_values=numeric, linear_projection_size=hidden_size)
        return TransformerSeqEncoder(trx_encoder=trx, n_heads=cfg["transformer_heads"],
                                     n_layers=cfg["transformer_layers"], dim_hidden=2 * hidden_size, dropout=0.1,
                                     max_seq_len=max(5000, data.max_seq_len + 1), is_reduce_sequence=True)
    trx = TrxEncoder(embeddings=embeddings, numeric_values=numeric)
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden_size, type=encoder_type, is_reduce_sequence=True)


def _hidden(head_hidden) -> tuple[int, ...]:
    if isinstance(head_hidden, str):
        try:
            return tuple(int(h) for h in head_hidden.replace(" ", "").split(",") if h)
        except ValueError:
            raise ValueError(f"head_hidden={head_hidden!r} must be comma-separated layer widths, e.g. '256,128', or "
                             "'' for a linear head.") from None
    return tuple(int(h) for h in head_hidden)


class SequenceClassifier(nn.Module):
    """``encoder`` (a ptls seq encoder: PaddedBatch -> one vector per client) + ``head`` (an MLP)."""

    head_prefixes = ("head",)

    def __init__(self, encoder: nn.Module, n_classes: int, *, head_hidden="256,128", head_dropout: float = 0.1,
                 head_activation: str = "relu", class_weights=None, label_smoothing: float = 0.0):
        super().__init__()
        if head_activation not in ACTIVATIONS:
            raise ValueError(f"head_activation={head_activation!r} is not one of {', '.join(ACTIVATIONS)}.")
        self.encoder = encoder
        layers, width = [], encoder.embedding_size
        for h in _hidden(head_hidden):
            layers += [nn.Linear(width, h), ACTIVATIONS[head_activation](), nn.Dropout(head_dropout)]
            width = h
        self.head = nn.Sequential(*layers, nn.Linear(width, n_classes))
        # a plain attribute, not a buffer: the loss's settings are not weights
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.label_smoothing = label_smoothing

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        logits = self(x).float()
        if self.class_weights is not None and self.class_weights.device != logits.device:
            self.class_weights = self.class_weights.to(logits.device)  # once, not a host-to-device copy per step
        return F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.label_smoothing)


def build_model(data: EventData, *, encoder_type: str = "gru", hidden_size: int = 64, head_hidden="256,128",
                head_dropout: float = 0.1, head_activation: str = "relu", class_weights: str = "none",
                label_smoothing: float = 0.0, **overrides) -> SequenceClassifier:
    """The classifier for ``data``; ``class_weights``: ``none`` | ``balanced`` (from the labelled clients)."""
    if class_weights not in ("none", "balanced"):
        raise ValueError(f"class_weights={class_weights!r} is not one of none, balanced.")
    encoder = build_encoder(data, encoder_type=encoder_type, hidden_size=hidden_size, **overrides)
    weights = data.class_weights() if class_weights == "balanced" else None
    return SequenceClassifier(encoder, len(data.classes), head_hidden=head_hidden, head_dropout=head_dropout,
                              head_activation=head_activation, class_weights=weights, label_smoothing=label_smoothing)


def build_coles(encoder: nn.Module, *, margin: float = 0.5, neg_count: int = 5, head=None):
    """ptls's ``CoLESModule`` around ``encoder`` (used as a plain nn.Module; its Lightning hooks stay unused)."""
    from ptls.frames.coles import CoLESModule
    from ptls.frames.coles.losses import ContrastiveLoss
    from ptls.frames.coles.sampling_strategies import HardNegativePairSelector

    return CoLESModule(seq_encoder=encoder, head=head,
                       loss=ContrastiveLoss(margin=margin, sampling_strategy=HardNegativePairSelector(neg_count=neg_count)))


def coles_loss(module, batch):
    """The CoLES loss of ptls's module on one ``(PaddedBatch, client labels)`` batch (what its training_step computes)."""
    x, y = batch
    embeddings, y = module.shared_step(x, y)
    return module._loss(embeddings.float(), y)


# --------------------------------------------------------------------------- pretraining


def pretrain(data: EventData, *, encoder_type: str = "gru", hidden_size: int = 64, seed: int = 0,
             progress: bool = True, cache_root=None, run_callbacks=(), device="auto", dtype=None,
             **overrides) -> Path:
    """CoLES over the training clients (no labels); ``pretrained.safetensors`` in ptls's layout (cached by fingerprint)."""
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS} | {"encoder_type": encoder_type, "hidden_size": hidden_size,
                                                          "seed": seed, "objective": "coles"}
    settings.update(placement_key(device, dtype))
    key = fingerprint(data.content_hash, data.train_idx, settings, code_version(__name__))

    def build(folder: Path) -> None:
        from ..tracking import Run
        from ..training import fit

        torch.manual_seed(seed)
        np.random.seed(seed)  # ptls's SampleSlices draws from numpy's global RNG
        module = build_coles(build_encoder(data, encoder_type=encoder_type, hidden_size=hidden_size, **cfg),
                             margin=cfg["margin"], neg_count=cfg["neg_count"])
        run = Run(folder / "run", params=settings, resume=True)
        batches = coles_loader(data, data.train_idx, batch_size=cfg["pretrain_batch_size"],
                               split_count=cfg["split_count"], cnt_min=cfg["cnt_min"], cnt_max=cfg["cnt_max"], seed=seed)
        fit(module, batches, loss_fn=coles_loss, epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"],
            optimizer="adam", weight_decay=cfg["weight_decay"], schedule="cosine", warmup_ratio=0.05, run=run,
            resume=True, progress=progress, log_every=20, callbacks=run_callbacks, device=device, dtype=dtype)
        meta = {"task": "event_sequence", "objective": "coles", "fingerprint": key, "vocab": data.vocab,
                "clients": len(data.train_idx), **settings}
        save_weights(module, folder / "pretrained.safetensors", metadata=meta)

    describe = {"data": data.source, "data_hash": data.content_hash, "train_clients": len(data.train_idx), **settings}
    return cached("pretrain", key, build, root=cache_root, describe=describe) / "pretrained.safetensors"


def pretrained(data: EventData, pretrained_checkpoint: str, *, encoder_type: str = "gru", hidden_size: int = 64,
               seed: int = 0, progress: bool = True, cache_root=None, **overrides):
    """Resolve ``pretrained_checkpoint``: ``"pretrain"`` | ``"none"`` | a path (ptls checkpoint or state dict)."""
    return resolve_pretrained(pretrained_checkpoint, lambda: pretrain(
        data, encoder_type=encoder_type, hidden_size=hidden_size, seed=seed, progress=progress, cache_root=cache_root,
        **overrides))


def load_checkpoint(model: nn.Module, source, *, trust_pickle: bool = False, run=None):
    """Load an encoder checkpoint into ``model`` (:func:`workbench.load_pretrained`); the LoadReport.

    A ptls ``CoLESModule`` checkpoint (Lightning's ``.ckpt``: weights under ``state_dict``, keys
    ``_seq_encoder.*``) loads as it is: ``_seq_encoder.`` is detected and mapped to ``encoder.``;
    its contrastive head (``_head.*``) is reported as unexpected and the classifier's head as missing.
    """
    from ..transfer import load_pretrained

    return load_pretrained(model, source, trust_pickle=trust_pickle, run=run)


# --------------------------------------------------------------------------- fine-tuning


def finetune(model: SequenceClassifier, data: EventData, *, epochs: int, learning_rate: float, batch_size: int = 32,
             optimizer: str = "adamw", lr_scheduler_type: str = "cosine", freeze_epochs: int = 0,
             backbone_lr_ratio: float = 1.0,
             grad_clip: float | None = None, amp: str = "none", save_top_k: int = 1, seed: int = 0, run=None,
             callbacks=(), progress: bool = True, device="auto", dtype=None):
    """Supervised fine-tuning on the labelled clients; the best epoch by ``val_macro_f1`` is kept.

    The backbone is frozen for ``freeze_epochs`` epochs (only the head trains), then everything
    trains. ``freeze_epochs >= epochs`` is a probe: the encoder never changes. Once it trains, the
    encoder learns at ``learning_rate * backbone_lr_ratio`` and the head at ``learning_rate``.
    """
    from ..training import fit

    if lr_scheduler_type not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type={lr_scheduler_type!r} is not one of {', '.join(SCHEDULES)}.")
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp={amp!r} is not one of none, bf16.")
    has_val = len(data.val_idx) > 0
    batches = data.batches(data.labelled_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = EventBatches(data, data.val_idx, batch_size=256, max_tokens=DEFAULTS["eval_tokens"]) if has_val else None
    return fit(
        model, batches, epochs=epochs, lr=learning_rate, optimizer=optimizer, weight_decay=DEFAULTS["weight_decay"],
        schedule=lr_scheduler_type, warmup_ratio=0.1 if lr_scheduler_type == "cosine" else 0.0, strategy="full",
        freeze_epochs=freeze_epochs, backbone_lr_ratio=backbone_lr_ratio, grad_clip=grad_clip or None,
        amp=None if amp == "none" else amp,
        val_data=val, evaluate=validation_accuracy_and_macro_f1 if has_val else None,
        monitor="val_macro_f1" if has_val else "train_loss", mode="max" if has_val else "min",
        save_top_k=save_top_k, restore_best=True, run=run, callbacks=callbacks, progress=progress, seed=seed,
        log_every=50, device=device, dtype=dtype,
    )


def lr_frame(history, *, freeze_epochs: int, steps_per_epoch: int, schedule: str = ""):
    """The effective per-step learning rates of a fine-tuning run, for :func:`workbench.plots.plot_lr_schedule`.

    While the backbone is frozen its groups learn nothing, so their rate is shown as 0 for those
    steps; ``attrs["freeze_steps"]`` marks the frozen phase.
    """
    curve = history.lr_frame()
    freeze_steps = min(freeze_epochs, len(history.rows)) * steps_per_epoch
    frozen = [c for c in curve.columns if c.startswith("backbone")]
    curve.loc[curve.index < freeze_steps, frozen] = 0.0
    curve.attrs.update(schedule=schedule, total_steps=len(curve), freeze_steps=freeze_steps)
    return curve


# --------------------------------------------------------------------------- evaluation


def _forward_batches(model, data: EventData, idx, *, max_tokens: int | None = None):
    """Yield ``(positions, output)`` over ``idx`` in length-bucketed batches (eval mode, no gradients)."""
    batches = EventBatches(data, idx, batch_size=512, max_tokens=max_tokens or DEFAULTS["eval_tokens"])
    model.eval()
    with torch.no_grad():
        for pos, (x, _) in zip(batches.positions(), batches):
            yield pos, model(to_model(x, model))


def predict_proba(model, data: EventData, idx=None) -> np.ndarray:
    idx = data.test_idx if idx is None else np.asarray(idx)
    out = np.zeros((len(idx), len(data.classes)), dtype=np.float32)
    for pos, logits in _forward_batches(model, data, idx):
        out[pos] = to_numpy(F.softmax(logits.float(), dim=1))
    return out


def get_embeddings(model, data: EventData, idx=None, *, max_tokens: int | None = None):
    """``(embeddings, client_ids, labels)`` of clients ``idx`` (default: all) from the encoder.

    ``model`` is a :class:`SequenceClassifier`, a ptls ``CoLESModule`` or a ptls seq encoder;
    batches hold at most ``max_tokens`` padded events, so long clients do not blow up memory.
    """
    idx = np.arange(len(data.sequences)) if idx is None else np.asarray(idx)
    encoder = getattr(model, "encoder", None) or getattr(model, "seq_encoder", None) or model
    out = None
    for pos, emb in _forward_batches(encoder, data, idx, max_tokens=max_tokens):
        if out is None:
            out = np.zeros((len(idx), emb.shape[1]), dtype=np.float32)
        out[pos] = to_numpy(emb.float())
    return out, data.client_ids[idx], data.labels[idx]


def save_embeddings(path, embeddings, client_ids, labels) -> Path:
    """``embeddings.npz`` with ``embeddings``, ``client_ids`` and ``labels``."""
    path = Path(path)
    np.savez_compressed(path, embeddings=embeddings, client_ids=np.asarray(client_ids, dtype=str),
                        labels=np.asarray(labels, dtype=str))
    return path


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def baseline_features(data: EventData, idx) -> np.ndarray:
    """Bag of event types (share of each category of the first categorical field, log count) + numeric statistics."""
    first = data.categorical[0]
    n_types = len(data.vocab[first])
    amount_fields = [c for c in data.numeric if c != TIME_GAP]
    rows = []
    for i in idx:
        seq = data.sequences[i]
        counts = np.bincount(seq[first], minlength=n_types)[1:].astype(np.float64)  # unknown..last, no padding
        row = [counts / counts.sum(), [np.log(len(seq[TIME]))]]
        for column in amount_fields:
            v = _signed_log(seq[column].astype(np.float64))
            row.append([v.mean(), v.std(), v.min(), *np.percentile(v, [10, 50, 90]), v.max()])
        rows.append(np.concatenate(row))
    return np.asarray(rows, dtype=np.float64)


def baseline(data: EventData, *, seed: int = 0) -> dict:
    """Logistic regression on :func:`baseline_features` of the labelled clients; test metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit_idx = data.labelled_idx  # the clients the model is fit on (not its validation clients)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(baseline_features(data, fit_idx), data.labels[fit_idx])
    pred = clf.predict(baseline_features(data, data.test_idx))
    return classification_metrics(data.labels[data.test_idx], pred, labels=data.classes)


def linear_probe(model, data: EventData, *, seed: int = 0) -> dict:
    """Logistic regression on the frozen encoder's embeddings of the labelled clients; test metrics.

    The CoLES paper's way of judging an encoder: nothing in the encoder trains. Call it before
    fine-tuning to score the pretrained (or random) encoder as it is.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit_idx = data.labelled_idx  # the clients the model is fit on (not its validation clients)
    embeddings, _, _ = get_embeddings(model, data, np.concatenate([fit_idx, data.test_idx]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    clf.fit(embeddings[: len(fit_idx)], data.labels[fit_idx])
    pred = clf.predict(embeddings[len(fit_idx):])
    return classification_metrics(data.labels[data.test_idx], pred, labels=data.classes)


def evaluate(model, data: EventData, *, run=None, seed: int = 0, extra: Mapping | None = None) -> Evaluation:
    """Score the test clients beside logistic regression; write final_metrics.json.

    With a ``run``, its folder also gets what predicting on new clients needs (``save_predictor``).
    ``n_train`` and ``baseline_n_train`` count the clients each was fit on (the labelled clients).
    """
    proba = predict_proba(model, data, data.test_idx)
    save_predictor(run, model, data, test_proba=proba)
    counts = {"n_train": len(data.labelled_idx), "baseline_n_train": len(data.labelled_idx)}
    return evaluate_classifier(data.labels[data.test_idx], proba, data.classes, baseline=baseline(data, seed=seed),
                               run=run, extra={**counts, **dict(extra or {})})



# --------------------------------------------------------------------------- prediction on new clients

#: Notebook parameters that shape the model (read from the run's parameters when the predictor is saved).
ARCHITECTURE = {"encoder_type": "gru", "hidden_size": 64, "head_hidden": "256,128", "head_dropout": 0.1,
                "head_activation": "relu"}


def save_predictor(run, model, data: EventData, *, test_proba: np.ndarray | None = None):
    """Write what predicting on new clients needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the fields, each categorical field's vocabulary (0 pads, 1 is unknown), the
    numeric fields, ``max_seq_len``, the class names and the architecture (the run's parameters).
    ``test_proba`` goes to ``test_predictions.csv``, indexed by client id.
    """
    if run is None:
        return None
    params = getattr(run, "params", {}) or {}
    architecture = {k: params.get(k, v) for k, v in ARCHITECTURE.items()}
    state = {"classes": list(data.classes), "categorical": list(data.categorical), "numeric": list(data.numeric),
             "vocab": data.vocab, "max_seq_len": int(data.max_seq_len), "source": data.source,
             "embedding_dim": DEFAULTS["embedding_dim"], "transformer_heads": DEFAULTS["transformer_heads"],
             "transformer_layers": DEFAULTS["transformer_layers"], **architecture}
    test = None
    if test_proba is not None:
        fields = [c for c in data.fields if c != TIME_GAP]
        report = AlignmentReport(what="fields", n_model=len(fields), n_data=len(fields), matched=len(fields),
                                 n_samples=len(data.test_idx))
        test = _predictions(np.asarray(test_proba), data.client_ids[data.test_idx], data.classes, report)
    return _save_predictor(run, model, task=__name__, state=state, test_predictions=test)


def _predictions(proba: np.ndarray, clients, classes, report) -> Predictions:
    return class_predictions(proba, np.asarray(clients).astype(str), classes, report, index_name=CLIENT,
                             task=__name__)


@dataclass
class _Clients:
    """New clients in the form the batches read (no labels)."""

    sequences: list[dict]
    client_ids: np.ndarray
    classes: list[str]
    y: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)

    def __post_init__(self):
        self.y = np.zeros(len(self.sequences), dtype=np.int64)
        self.labels = np.full(len(self.sequences), "", dtype=object)


class EventSequencePredictor(Predictor):
    """An event-sequence run's classifier with its vocabularies: classifies new clients from an event table.

    The table (.csv / .parquet, one row per event) needs ``client_id`` and ``event_time``; the
    run's fields are matched by name (a missing categorical field is all "unknown", a missing
    numeric one is 0; refused above ``max_missing`` of them). Events are put in time order,
    ``time_gap`` is derived and each client keeps its last ``max_seq_len`` events, as in
    training; a category never seen in training maps to the unknown index, counted per field.
    """

    accepts = ("table",)
    outputs = ("probabilities", "embedding")

    def __init__(self, path, record):
        super().__init__(path, record)
        s = self.state
        self.classes = list(s["classes"])
        shape = _Shape(vocab=s["vocab"], categorical=list(s["categorical"]), numeric=list(s["numeric"]),
                       max_seq_len=int(s["max_seq_len"]), classes=self.classes)
        model = build_model(shape, encoder_type=s["encoder_type"], hidden_size=s["hidden_size"],
                            head_hidden=s["head_hidden"], head_dropout=s["head_dropout"],
                            head_activation=s["head_activation"], embedding_dim=s["embedding_dim"],
                            transformer_heads=s["transformer_heads"], transformer_layers=s["transformer_layers"])
        self.model = self.load_weights(model)

    def _clients(self, events: pd.DataFrame, where: str, max_missing: float) -> tuple[_Clients, AlignmentReport]:
        s = self.state
        for column in (CLIENT, TIME):
            if column not in events:
                raise PredictError(f"{where} has no {column!r} column; an event table needs {CLIENT}, {TIME} and the "
                                   f"run's fields ({', '.join(s['categorical'] + s['numeric'][:-1])}).")
        given = [c for c in s["numeric"] if c != TIME_GAP]
        columns = [c for c in events.columns if c not in (CLIENT, TIME, TARGET)]
        _, report = align_names(columns, s["categorical"] + given, what="fields", max_missing=max_missing,
                                where=where)
        events = events.copy()
        events[CLIENT] = events[CLIENT].astype(str)
        events[TIME] = _days(events[TIME])
        if events[TIME].isna().any():
            row = int(np.flatnonzero(events[TIME].isna().to_numpy())[0])
            raise PredictError(f"{where}: {TIME} of row {row} is empty or not a number/date. Every event needs a time.")
        events = events.sort_values([CLIENT, TIME], kind="stable", ignore_index=True)
        gap = events.groupby(CLIENT, sort=False)[TIME].diff().fillna(0.0).clip(lower=0)
        events[TIME_GAP] = np.log1p(gap.to_numpy()).astype(np.float32)
        for column in given:
            if column not in events:
                events[column] = 0.0
                continue
            values = pd.to_numeric(events[column], errors="coerce")
            if values.isna().any():
                raise PredictError(f"{where}: numeric field {column!r} has {int(values.isna().sum())} empty or "
                                   "non-numeric value(s). Fill or drop them before predicting.")
            events[column] = values.astype(np.float32)
        for column in s["categorical"]:
            if column not in events:
                events[column] = UNKNOWN
                continue
            text = events[column].astype(str).where(events[column].notna(), "<missing>")
            codes = _encode_categories(text, s["vocab"][column])
            unknown = int((codes == UNKNOWN).sum())
            if unknown:
                report.unknown[f"{column} (events)"] = unknown
            events[column] = codes
        starts = events.groupby(CLIENT, sort=True).indices
        clients = np.array(sorted(starts), dtype=object)
        data = {c: events[c].to_numpy() for c in [TIME, *s["categorical"], *s["numeric"]]}
        sequences, truncated = [], 0
        for client in clients:
            rows = starts[client][-s["max_seq_len"]:]
            truncated += len(starts[client]) > s["max_seq_len"]
            seq = {TIME: data[TIME][rows].astype(np.float64)}
            seq |= {c: data[c][rows].astype(np.int64) for c in s["categorical"]}
            seq |= {c: data[c][rows].astype(np.float32) for c in s["numeric"]}
            sequences.append(seq)
        if truncated:
            report.notes.append(f"{truncated} client(s) truncated to their last {s['max_seq_len']} events")
        report.n_samples = len(clients)
        return _Clients(sequences, clients, self.classes), report

    def predict(self, data, *, output: str = "probabilities", max_missing: float = MAX_MISSING) -> Predictions:
        """Per-client class probabilities and label, or encoder embeddings (``output="embedding"``).

        ``data``: a DataFrame of events, or the path of a .csv / .parquet event table.
        """
        self.check_output(output)
        self.check_input(data)
        if isinstance(data, (str, os.PathLike)):
            events, where = read_table(data), Path(data).name
        elif isinstance(data, pd.DataFrame):
            events, where = data, "the event table"
        else:
            raise PredictError(f"cannot predict on a {type(data).__name__}: give a DataFrame of events or the path "
                               "of a .csv / .parquet event table.")
        clients, report = self._clients(events, where, max_missing)
        idx = np.arange(len(clients.sequences))
        if output == "embedding":
            embeddings, ids, _ = get_embeddings(self.model, clients, idx)
            frame = pd.DataFrame(embeddings, index=pd.Index(ids.astype(str), name=CLIENT),
                                 columns=[f"dim_{i}" for i in range(embeddings.shape[1])])
            return Predictions(frame, report=report, output="embedding", embedding=embeddings, task=__name__)
        return _predictions(predict_proba(self.model, clients, idx), clients.client_ids, self.classes, report)


@dataclass
class _Shape:
    """What :func:`build_model` reads from an :class:`EventData`, for a model rebuilt from a run folder."""

    vocab: dict
    categorical: list
    numeric: list
    max_seq_len: int
    classes: list
