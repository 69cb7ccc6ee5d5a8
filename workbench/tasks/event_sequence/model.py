"""The model: a ptls sequence encoder under an MLP head, and ptls's CoLES module around the encoder.

:class:`SequenceClassifier`: ``encoder`` is a ptls ``RnnSeqEncoder`` (GRU/LSTM) or ``TransformerSeqEncoder`` over a
ptls ``TrxEncoder`` (an embedding per categorical field, scaled numeric fields with batch norm); ``head`` is an MLP
(``head_hidden``, ``head_dropout``, ``head_activation``). Class weights and label smoothing are part of the loss.
:func:`build_coles` wraps an encoder in ptls's ``CoLESModule`` (its L2-normalising head and ``ContrastiveLoss`` with
hard-negative pairs), used as a plain ``nn.Module``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...devices import to_model, to_numpy
from .data import TIME_GAP, EventBatches, EventData

__all__ = ["DEFAULTS", "ENCODER_TYPES", "ACTIVATIONS", "CLASS_WEIGHTS", "SequenceClassifier", "build_encoder",
           "build_model", "build_coles", "coles_loss", "checkpoint_widths", "embedding_sizes", "predict_proba",
           "get_embeddings"]

ENCODER_TYPES = ("gru", "lstm", "transformer")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
CLASS_WEIGHTS = ("none", "balanced")

#: Architecture and training settings the notebook does not expose.
DEFAULTS = {
    "embedding_dim": 16,
    "transformer_heads": 2,
    "transformer_layers": 2,
    "weight_decay": 0.0,
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


def _ptls():
    """Import ptls (optional extra ``sequences``) with a message that names the fix."""
    try:
        import ptls  # noqa: F401
    except ImportError as err:
        raise ImportError("The event-sequence workflow needs pytorch-lifestream: pip install 'workbench[sequences]' "
                          "(pytorch-lifestream==0.6.0).") from err


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


def build_encoder(data, *, encoder_type: str = "gru", hidden_size: int = 64, embedding_sizes: Mapping | None = None,
                  **overrides):
    """A ptls sequence encoder: ``TrxEncoder`` + ``RnnSeqEncoder`` (gru | lstm) or ``TransformerSeqEncoder``.

    Each categorical field gets an embedding ``min(embedding_dim, categories)`` wide, unless ``embedding_sizes``
    names its width (what a checkpoint fixes: :func:`checkpoint_widths`).
    """
    _ptls()
    from ptls.nn import RnnSeqEncoder, TransformerSeqEncoder, TrxEncoder

    if encoder_type not in ENCODER_TYPES:
        raise ValueError(f"encoder_type={encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}.")
    cfg = {**DEFAULTS, **overrides}
    dim = cfg["embedding_dim"]
    sizes = dict(embedding_sizes or {})
    embeddings = {c: {"in": len(data.vocab[c]), "out": int(sizes.get(c, min(dim, len(data.vocab[c]))))}
                  for c in data.categorical}
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


def build_model(data, *, encoder_type: str = "gru", hidden_size: int = 64, embedding_sizes: Mapping | None = None,
                head_hidden="256,128",
                head_dropout: float = 0.1, head_activation: str = "relu", class_weights: str = "none",
                label_smoothing: float = 0.0, **overrides) -> SequenceClassifier:
    """The classifier for ``data``; ``class_weights``: ``none`` | ``balanced`` (from the labelled clients).

    ``embedding_sizes`` (``{field: width}``) sets per-field embedding widths, e.g. those a checkpoint fixes
    (:func:`checkpoint_widths`); other fields get the default width.
    """
    if class_weights not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights={class_weights!r} is not one of {', '.join(CLASS_WEIGHTS)}.")
    encoder = build_encoder(data, encoder_type=encoder_type, hidden_size=hidden_size, embedding_sizes=embedding_sizes,
                            **overrides)
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


# --------------------------------------------------------------------------- inference


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


# --------------------------------------------------------------------------- what a checkpoint fixes

_EMBEDDING = re.compile(r"(?:^|\.)trx_encoder\.embeddings\.([^.]+)\.weight$")
_RNN_HH = re.compile(r"(?:^|\.)seq_encoder\.rnn\.weight_hh_l0$")
_PROJECTION = re.compile(r"(?:^|\.)trx_encoder\.linear_projection_head\.weight$")
_RNN_GATES = {3: "gru", 4: "lstm"}


def checkpoint_widths(source, data, *, encoder_type: str = "gru", hidden_size: int = 64,
                      trust_pickle: bool = False) -> dict[str, int]:
    """The per-field embedding widths a ptls checkpoint fixes, ``{field: width}``, for :func:`build_model`.

    A ptls encoder's embedding widths are not notebook parameters: the model takes them from the checkpoint
    (``trx_encoder.embeddings.<field>.weight`` is categories x width), for the fields of ``data``. What the
    notebook does set must agree with the checkpoint, or this raises a ``ValueError`` naming the parameter and the
    value to set: ``encoder_type`` (a GRU's recurrent weights have 3 gates, an LSTM's 4, a transformer none) and
    ``hidden_size`` (the recurrent width, or a transformer's projection width). ``source=None`` (no checkpoint):
    ``{}``. Reading follows :func:`workbench.checkpoints.read_state_dict` (``trust_pickle`` as there).
    """
    if source is None:
        return {}
    from ...checkpoints import read_state_dict

    state = read_state_dict(source, trust_pickle=trust_pickle)
    widths, rnn, projection = {}, None, None
    for key, tensor in state.items():
        if (found := _EMBEDDING.search(key)) and tensor.ndim == 2:
            widths[found.group(1)] = int(tensor.shape[1])
        elif _RNN_HH.search(key) and tensor.ndim == 2:
            rnn = tuple(tensor.shape)
        elif _PROJECTION.search(key) and tensor.ndim == 2:
            projection = int(tensor.shape[0])
    name = getattr(source, "name", None) or "the checkpoint"
    if rnn is not None:
        width, kind = rnn[1], _RNN_GATES.get(rnn[0] // max(rnn[1], 1))
        if kind is not None and encoder_type != kind:
            raise ValueError(f"{name} holds a {kind.upper()} encoder (its recurrent weights have "
                             f"{rnn[0] // width} gates); encoder_type={encoder_type!r} cannot load it. Set "
                             f"encoder_type={kind!r} (-p encoder_type {kind}).")
        if width != hidden_size:
            raise ValueError(f"{name} holds an encoder {width} wide; hidden_size={hidden_size} cannot load it. Set "
                             f"hidden_size={width} (-p hidden_size {width}).")
    elif projection is not None:
        if encoder_type != "transformer":
            raise ValueError(f"{name} holds a transformer encoder; encoder_type={encoder_type!r} cannot load it. "
                             "Set encoder_type='transformer' (-p encoder_type transformer).")
        if projection != hidden_size:
            raise ValueError(f"{name} holds a transformer {projection} wide; hidden_size={hidden_size} cannot load "
                             f"it. Set hidden_size={projection} (-p hidden_size {projection}).")
    return {field: widths[field] for field in data.categorical if field in widths}


def embedding_sizes(model: nn.Module) -> dict[str, int]:
    """``{field: width}`` of a built model's categorical embeddings (what :func:`build_model` takes back)."""
    encoder = getattr(model, "encoder", model)
    trx = getattr(encoder, "trx_encoder", None)
    embeddings = getattr(trx, "embeddings", {}) if trx is not None else {}
    return {field: int(module.weight.shape[1]) for field, module in embeddings.items()}
