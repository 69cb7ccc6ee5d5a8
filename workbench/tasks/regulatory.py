"""Regulatory expression: a region transformer pretrained on many conditions, fine-tuned on new ones.

Data
    One sample is one gene under one experimental condition: a region x motif matrix (motif
    hits in each of the gene's regulatory regions, as in GET), the accessibility of each
    region, the condition's features and the expression (the target). Condition features:
    ``medium``, ``drug`` and ``carbon_source`` (categorical; ``""`` means not given) and
    ``temperature`` (degrees C), ``preculture_h``, ``od600``, ``drug_conc`` (mol/L) and
    ``drug_time_h`` (numeric). Rows marked ``set=source`` are for pretraining; ``set=target`` rows hold
    the new conditions and are split into train / validation / test by ``seed``.
    ``data_path=""`` simulates a data set (:func:`simulate`); otherwise a CSV (:func:`read_csv`) or
    a zarr store in the layout of GET's region-motif datasets (:func:`read_zarr`).
Simulated ground truth (:func:`simulate`)
    Each motif ``m`` has a weight ``w[m] ~ N(0, 1)``; region ``r`` counts ``exp(-r / 3)``. A
    condition sets each motif's activity ``1 + a[m]``, where ``a`` adds up: the medium's
    effect (4 random motifs, N(0, 0.8) each); heat, ``1.2 * sigmoid((T - 37) / 2)`` on motifs
    0-1, and cold, ``-0.5 * sigmoid((25 - T) / 2)`` on motifs 2-3; the drug's effect (3 random
    motifs, N(0, 1)) times ``log10(1 + conc / 1e-6) / 3 * (1 - exp(-time_h))``; ``-0.3 * od600``
    on motifs 2-3 (stationary pre-cultures grow slower) and ``0.1 * (preculture_h - 3.5)``
    on all motifs; galactose ``+1.5`` and glucose ``-0.5`` on motif 4. Expression is
    ``sum_r exp(-r/3) * access[r] * sum_m motifs[r, m] * w[m] * (1 + a[m])`` plus N(0, 0.3)
    noise. Source conditions draw media from sc, ypd, ypgal, sd and drugs from none, caffeine,
    tunicamycin; the new conditions use a medium (``minimal``) or a drug (``rapamycin``) that
    pretraining never saw.
Model
    :class:`RegulatoryModel`: each region's motifs + accessibility are embedded (a linear
    layer plus a position embedding), a condition token is prepended, and a pre-norm
    transformer encoder (plain q/k/v/o linear layers) reads them. The condition encoder
    (:class:`ConditionEncoder`) embeds each categorical feature, index 0 being "unknown", and
    normalises numeric features with training statistics kept as buffers (so they are in every
    checkpoint). The head fuses the condition token's output with the condition vector by
    concatenation and a 2-layer MLP.
Pretraining
    Supervised, on the source conditions; cached by fingerprint (data content, source rows,
    vocabularies, every setting, the code), see :mod:`workbench.cache`. It reads nothing else of
    the split: the numeric features' statistics come from the source rows alone.
Fine-tuning
    ``full`` (every weight) or ``lora`` (peft adapters on the encoder's and head's linear
    layers, the condition embeddings trained in full), see :mod:`workbench.lora`. A LoRA run's
    checkpoints (``best.safetensors``, ``last.pt``) hold the trainable tensors only, beside the
    base weights they adapt (``checkpoints/base.safetensors``).
Baseline
    Ridge regression on the same features (flattened motifs and accessibility, one-hot
    categoricals, numeric features) and the rows whose expression the model learnt from: the
    new-condition train rows, and the source rows when the model was pretrained on them here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ..batches import TensorBatches
from ..cache import cached, code_version, content_hash, fingerprint
from . import set_threads  # noqa: F401 - the notebook calls <task>.set_threads()
from ..checkpoints import resolve_pretrained, save_weights
from ..devices import NOTEBOOK_DTYPES, DeviceName, placement_key, to_model, to_numpy
from ..metrics import MetricsTable, grouped_regression_metrics
from ..params import Choice, Flag, Integer, Real, Spec, Text
from ..workflow import Param, Workflow
from ..predict import MAX_MISSING, AlignmentReport, Predictions, PredictError, Predictor, align_names
from ..predict import save_predictor as _save_predictor
from ..tracking import TRACKERS
from ..transfer import unwrap

__all__ = [
    "WORKFLOW",
    "DEFAULTS", "CATEGORICAL", "NUMERIC", "TARGET", "RegulatoryData", "ConditionEncoder", "RegulatoryModel",
    "simulate", "read_csv", "write_csv", "read_zarr", "write_zarr", "load", "build_model", "pretrain", "pretrained", "load_checkpoint",
    "prepare", "finetune", "fit_rows", "predict", "baseline", "evaluate", "permutation_importance",
    "HEADLINE_METRICS", "PACKAGES", "NOTEBOOK", "LEGACY_KEY_MAP", "save_predictor", "RegulatoryPredictor",
]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "regulatory_lora.ipynb"
HEADLINE_METRICS = ("test_pearson", "test_spearman", "test_r2", "test_mse", "baseline_test_pearson", "trainable_fraction")
FINETUNE_METHODS = ("full", "lora")
PACKAGES = ("peft", "scipy")

#: What each notebook parameter accepts, checked before any work (``workbench run``/``sweep`` and the notebook).
WORKFLOW = Workflow(
    name='regulatory',
    title='Regulatory expression with LoRA',
    notebook=NOTEBOOK,
    headline_metrics=HEADLINE_METRICS,
    packages=PACKAGES,
    predictor="workbench.tasks.regulatory:RegulatoryPredictor",
    parameters=dict(
        data_path=Param("", "CSV file, one row per sample; empty means simulated data", Text()),
        pretrained_checkpoint=Param("pretrain", "pretrain (here, on the source conditions) | none (from scratch) | a checkpoint path", Choice("pretrain", "none", or_path=True)),
        trust_pickle=Param(False, "allow a pickle checkpoint from older code (only for files you trust)", Flag()),
        finetune=Param("lora", "lora (adapters) | full (every weight)", Choice(*FINETUNE_METHODS)),
        lora_rank=Param(2, "LoRA rank (finetune lora only)", Integer(ge=1)),
        learning_rate=Param(1.0e-3, "peak learning rate (cosine schedule)", Real(gt=0)),
        epochs=Param(30, "fine-tuning epochs", Integer(ge=1)),
        batch_size=Param(64, "samples per batch", Integer(ge=1)),
        label_fraction=Param(0.3, "share of the new-condition samples used for fine-tuning", Real(gt=0, lt=1)),
        val_fraction=Param(0.1, "share of the new-condition samples used for validation (picks the best epoch)", Real(ge=0, lt=1)),
        pretrain_epochs=Param(15, "epochs of pretraining on the source conditions", Integer(ge=1)),
        seed=Param(0, "split, pretraining, initialisation and data order", Integer(ge=0)),
        output_dir=Param("", "run folder; empty: a new dated folder under runs/regulatory/", Text()),
        tracker=Param("none", "none | wandb (offline unless WANDB_MODE is set)", Choice(*TRACKERS)),
        device=Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", DeviceName()),
        dtype=Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device path)", Choice(*NOTEBOOK_DTYPES)),
        interactive=Param(True, "show the widget panel (papermill runs set it False)", Flag()),
    ),
)

CATEGORICAL = ("medium", "drug", "carbon_source")
#: Values of the optional ``set`` column: ``source`` rows pretrain, ``target`` rows are split for fine-tuning.
SET_VALUES = ("source", "target")
NUMERIC = ("temperature", "preculture_h", "od600", "drug_conc", "drug_time_h")
TARGET = "expression"
UNKNOWN = "<unknown>"

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


# --------------------------------------------------------------------------- simulation


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate(*, n_genes: int = 150, n_regions: int = 8, n_motifs: int = 16, n_source_conditions: int = 24,
             n_new_conditions: int = 6, noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """A data set with the ground truth of the module docstring, one row per gene x condition.

    The simulated world (genes, motif weights, medium and drug effects) is fixed by ``seed``;
    it is the same whatever the split seed of :func:`load`. Returns the CSV layout of
    :func:`read_csv` (columns ``r{region}_m{motif}``, ``r{region}_access``, the condition
    columns, ``condition``, ``set`` and ``expression``).
    """
    if n_motifs < 5:
        raise ValueError(f"n_motifs={n_motifs} must be >= 5: motifs 0-4 carry the heat, cold and carbon effects.")
    rng = np.random.default_rng(seed)
    motifs = rng.binomial(1, 0.15, (n_genes, n_regions, n_motifs)).astype(np.float32)
    access = rng.beta(2, 2, (n_genes, n_regions)).astype(np.float32)
    weights = rng.normal(0, 1, n_motifs)
    decay = np.exp(-np.arange(n_regions) / 3)

    def sparse_effect(k, scale):
        effect = np.zeros(n_motifs)
        effect[rng.choice(n_motifs, k, replace=False)] = rng.normal(0, scale, k)
        return effect

    media = {name: sparse_effect(4, 0.8) for name in ("sc", "ypd", "ypgal", "sd", "minimal")}
    drugs = {"none": np.zeros(n_motifs)} | {name: sparse_effect(3, 1.0) for name in ("caffeine", "tunicamycin", "rapamycin")}

    def condition(new: bool, index: int) -> dict:
        novel = new and index % 2 == 0  # half the new conditions: a new medium; half: a new drug
        medium = "minimal" if novel else str(rng.choice(["sc", "ypd", "ypgal", "sd"]))
        drug = "rapamycin" if (new and not novel) else str(rng.choice(["none", "caffeine", "tunicamycin"]))
        temperature = float(rng.choice([30, 25, 42, 30])) if rng.random() < 0.7 else float(rng.uniform(20, 45))
        return {
            "medium": medium, "drug": drug,
            "carbon_source": str(rng.choice(["", "glucose", "galactose"])),
            "temperature": round(temperature, 1),
            "preculture_h": round(float(rng.uniform(3, 4)), 2), "od600": round(float(rng.uniform(0, 3)), 2),
            "drug_conc": 0.0 if drug == "none" else float(10 ** rng.uniform(-7, -4)),
            "drug_time_h": 0.0 if drug == "none" else round(float(rng.uniform(0.25, 4)), 2),
        }

    def activity(c: dict) -> np.ndarray:
        a = media[c["medium"]].copy()
        a[0:2] += 1.2 * _sigmoid((c["temperature"] - 37) / 2)
        a[2:4] -= 0.5 * _sigmoid((25 - c["temperature"]) / 2)
        dose = np.log10(1 + c["drug_conc"] / 1e-6) / 3 * (1 - np.exp(-c["drug_time_h"]))
        a += drugs[c["drug"]] * dose
        a[2:4] -= 0.3 * c["od600"]
        a += 0.1 * (c["preculture_h"] - 3.5)
        a[4] += {"galactose": 1.5, "glucose": -0.5}.get(c["carbon_source"], 0.0)
        return a

    columns = {f"r{r}_m{m}": motifs[:, r, m] for r in range(n_regions) for m in range(n_motifs)}
    columns |= {f"r{r}_access": access[:, r] for r in range(n_regions)}
    gene_frame = pd.DataFrame(columns)
    gene_frame.insert(0, "gene", [f"gene{g:04d}" for g in range(n_genes)])
    parts = []
    for new, count in ((False, n_source_conditions), (True, n_new_conditions)):
        for index in range(count):
            c = condition(new, index)
            effective = weights * (1 + activity(c))
            signal = np.einsum("grm,m,r,gr->g", motifs, effective, decay, access)
            part = gene_frame.copy()
            for key, value in c.items():
                part[key] = value
            part["condition"] = f"{'new' if new else 'source'}{index:02d}:{c['medium']}/{c['drug']}/{c['temperature']:g}C"
            part["set"] = "target" if new else "source"
            part[TARGET] = (signal + rng.normal(0, noise, n_genes)).astype(np.float32)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- reading


def _layout(columns) -> tuple[int, int]:
    """(regions, motifs) from the ``r{r}_m{m}`` columns."""
    cells = [c[1:].split("_m") for c in columns if c.startswith("r") and "_m" in c]
    cells = [(int(r), int(m)) for r, m in cells if r.isdigit() and m.isdigit()]
    if not cells:
        raise ValueError("No motif columns found: a regulatory CSV has columns named r{region}_m{motif} (e.g. r0_m0, "
                         "r0_m1, ..., r7_m15) and r{region}_access.")
    return max(r for r, _ in cells) + 1, max(m for _, m in cells) + 1


def _check_frame(frame: pd.DataFrame, source: str) -> tuple[int, int]:
    """Check columns and values; return (regions, motifs)."""
    n_regions, n_motifs = _layout(frame.columns)
    feature_columns = [f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]
    feature_columns += [f"r{r}_access" for r in range(n_regions)]
    expected = list(CATEGORICAL) + list(NUMERIC) + [TARGET]
    missing = [c for c in expected + feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}. A regulatory CSV needs "
            f"the condition columns {list(CATEGORICAL) + list(NUMERIC)}, the target {TARGET!r}, and "
            f"r{{region}}_m{{motif}} / r{{region}}_access for every region ({n_regions}) and motif ({n_motifs}). "
            "Add the missing column(s) (an empty categorical value means 'not given')."
        )
    for column in list(NUMERIC) + [TARGET] + feature_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: column {column!r} must be numeric, but row {row} holds {frame[column].iloc[row]!r} "
                f"({int(bad.sum())} such row(s)). Fix the value (a number, e.g. 30 for temperature) or drop the row."
            )
        frame[column] = values
    nan_target = frame[TARGET].isna() | ~np.isfinite(frame[TARGET].to_numpy(dtype=float))
    if nan_target.any():
        rows = np.flatnonzero(nan_target.to_numpy())
        raise ValueError(f"{source}: {len(rows)} row(s) have no {TARGET!r} value (NaN), e.g. row {int(rows[0])}. "
                         f"Every sample needs a target: drop them first, e.g. frame.dropna(subset=[{TARGET!r}]).")
    for column in NUMERIC:
        if frame[column].isna().any():
            row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
            raise ValueError(f"{source}: column {column!r} is empty in row {row}. Give a number (0 for no drug).")
    return n_regions, n_motifs


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a regulatory CSV: one row per sample (gene x condition).

    Columns: ``r{region}_m{motif}`` (motif hits), ``r{region}_access`` (accessibility),
    the condition columns :data:`CATEGORICAL` and :data:`NUMERIC`, the target ``expression``,
    and optionally ``set`` (``source`` rows pretrain, ``target`` rows are split for fine-tuning; case and
    surrounding spaces do not matter, other values are refused),
    ``condition`` (a name per condition, for per-condition metrics) and ``gene``.

    Raises
    ------
    ValueError
        For a missing column (naming it and listing the expected ones), a non-numeric value in
        a numeric column (naming the row and column) or a missing target.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist. Give a CSV file, or '' to simulate data.")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={c: str for c in CATEGORICAL})
    _check_frame(frame, path.name)
    return frame


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame from :func:`simulate` in the layout :func:`read_csv` reads."""
    path = Path(path)
    frame.to_csv(path, index=False)
    return path


#: What a GET-style zarr store must hold (GET's region-motif layout, one "cell type" per condition).
ZARR_KEYS = ("data", "motif_names", "peak_names", "atpm", "expression_positive", "expression_negative",
             "gene_idx_info_index", "gene_idx_info_name", "gene_idx_info_strand")


def _texts(values) -> np.ndarray:
    """Strings from a zarr string array, whatever its string type (bytes included)."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()], dtype=object)


def read_zarr(path: str | os.PathLike, *, conditions_path: str | os.PathLike | None = None,
              n_regions: int = 8) -> pd.DataFrame:
    """Read a zarr store in the layout of GET's region-motif datasets into the CSV layout.

    The store holds ``data`` (peaks x motifs), ``peak_names``, ``motif_names``, and per "cell
    type" (here: per condition) ``atpm/<name>`` (accessibility per peak) and
    ``expression_positive/<name>`` / ``expression_negative/<name>`` (per peak), with the genes'
    TSS peaks in ``gene_idx_info_index`` / ``_name`` / ``_strand``. One sample is a gene under a
    condition: its TSS peak and the next ``n_regions - 1`` peaks in the gene's direction, the
    expression of its strand at the TSS peak. GET stores no condition features, so they come from
    ``conditions_path`` (default ``<store>.conditions.csv``): a ``celltype`` column naming the
    groups, the condition columns, and optionally ``condition`` and ``set``.

    Needs the ``zarr`` package (``pip install zarr``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist. Give a .zarr store, a CSV, or '' to simulate.")
    try:
        import zarr
    except ImportError:
        raise ImportError("Reading a .zarr store needs the zarr package: pip install zarr (or the workbench "
                          "'zarr' extra). Or export the samples to the CSV layout (read_csv).") from None
    root = zarr.open_group(str(path), mode="r")
    missing = [key for key in ZARR_KEYS if key not in root]
    if missing:
        raise ValueError(f"{path.name} lacks {missing}; a GET-style store holds {list(ZARR_KEYS)}.")
    conditions_path = Path(conditions_path) if conditions_path else path.with_suffix(".conditions.csv")
    if not conditions_path.exists():
        raise FileNotFoundError(f"No condition table for {path.name}: {str(conditions_path)!r} does not exist. Write a "
                                f"CSV with a 'celltype' column (the names under atpm/) and the columns "
                                f"{list(CATEGORICAL) + list(NUMERIC)}, or pass conditions_path=.")
    table = pd.read_csv(conditions_path, keep_default_na=False, na_values=[""],
                        dtype={c: str for c in (*CATEGORICAL, "celltype", "condition", "set")})
    if "celltype" not in table:
        raise ValueError(f"{conditions_path.name} has no 'celltype' column naming the groups under atpm/ in {path.name}.")
    motifs = np.asarray(root["data"][:], dtype=np.float32)
    tss = np.asarray(root["gene_idx_info_index"][:], dtype=np.int64)
    genes = _texts(root["gene_idx_info_name"][:])
    step = np.where(_texts(root["gene_idx_info_strand"][:]) == "-", -1, 1)
    windows = tss[:, None] + step[:, None] * np.arange(n_regions)
    inside = ((windows >= 0) & (windows < len(motifs))).all(axis=1)
    windows, tss, genes, step = windows[inside], tss[inside], genes[inside], step[inside]
    parts = []
    for _, row in table.iterrows():
        name = row["celltype"]
        if f"atpm/{name}" not in root:
            raise ValueError(f"{conditions_path.name} names celltype {name!r}, which {path.name} does not hold under "
                             f"atpm/ (it holds {sorted(root['atpm'].keys())[:10]}).")
        access = np.asarray(root[f"atpm/{name}"][:], dtype=np.float32)
        plus = np.asarray(root[f"expression_positive/{name}"][:], dtype=np.float32)
        minus = np.asarray(root[f"expression_negative/{name}"][:], dtype=np.float32)
        columns = {f"r{r}_m{m}": motifs[windows[:, r], m] for r in range(n_regions) for m in range(motifs.shape[1])}
        columns |= {f"r{r}_access": access[windows[:, r]] for r in range(n_regions)}
        part = pd.DataFrame(columns)
        part.insert(0, "gene", genes)
        for column in (*CATEGORICAL, *NUMERIC, "set"):
            if column in table:
                part[column] = row[column]
        part["condition"] = row["condition"] if "condition" in table else name
        part[TARGET] = np.where(step > 0, plus[tss], minus[tss])
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    _check_frame(frame, path.name)
    return frame


def write_zarr(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame from :func:`simulate` as a GET-style zarr store plus its condition table.

    Each gene gets its own run of peaks (its regions, TSS first, '+' strand); each condition
    becomes a "cell type" ``cond000``, ``cond001``, ... The condition features go to
    ``<store>.conditions.csv``. Read it back with :func:`read_zarr`.
    """
    import zarr

    path = Path(path)
    n_regions, n_motifs = _layout(frame.columns)
    names = list(dict.fromkeys(frame["condition"]))
    genes = list(dict.fromkeys(frame["gene"]))
    first = frame.drop_duplicates("gene").set_index("gene").loc[genes]
    motifs = first[[f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]].to_numpy(np.float32)
    def text(values) -> np.ndarray:  # variable-length strings: the zarr v3 string type with a specification
        return np.array(values, dtype=np.dtypes.StringDType())

    root = zarr.open_group(str(path), mode="w")
    root.create_array("data", data=motifs.reshape(len(genes) * n_regions, n_motifs))
    root.create_array("peak_names", data=text([f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(len(genes) * n_regions)]))
    root.create_array("motif_names", data=text([f"motif{m}" for m in range(n_motifs)]))
    root.create_array("gene_idx_info_index", data=np.arange(len(genes)) * n_regions)
    root.create_array("gene_idx_info_name", data=text(genes))
    root.create_array("gene_idx_info_strand", data=text(["+"] * len(genes)))
    rows = []
    for i, name in enumerate(names):
        part = frame[frame["condition"] == name].set_index("gene").loc[genes]
        group = f"cond{i:03d}"
        access = part[[f"r{r}_access" for r in range(n_regions)]].to_numpy(np.float32).ravel()
        expression = np.zeros(len(genes) * n_regions, np.float32)
        expression[np.arange(len(genes)) * n_regions] = part[TARGET].to_numpy(np.float32)
        root.create_array(f"atpm/{group}", data=access)
        root.create_array(f"expression_positive/{group}", data=expression)
        root.create_array(f"expression_negative/{group}", data=np.zeros_like(expression))
        columns = [c for c in (*CATEGORICAL, *NUMERIC, "set") if c in part]
        rows.append({"celltype": group, "condition": name, **part.iloc[0][columns].to_dict()})
    pd.DataFrame(rows).to_csv(path.with_suffix(".conditions.csv"), index=False)
    return path


# --------------------------------------------------------------------------- data


class RegulatoryBatches(TensorBatches):
    """Mini-batches ``(regions, categorical, numeric, target)``; has a length and a ``generator``, shards under DDP."""


@dataclass
class RegulatoryData:
    """Samples, their condition features, the target and the split.

    ``vocab`` lists each categorical feature's values seen in the labelled rows (source and
    fine-tuning train); index 0 of every feature is ``<unknown>``.
    """

    regions: np.ndarray  # samples x regions x (motifs + 1); the last channel is accessibility
    conditions: pd.DataFrame  # CATEGORICAL + NUMERIC columns, one row per sample
    y: np.ndarray
    condition_names: np.ndarray
    source_idx: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    source: str = ""
    vocab: dict = field(default_factory=dict)
    _content_hash: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.vocab:
            labelled = np.concatenate([self.source_idx, self.train_idx])
            self.vocab = {c: [UNKNOWN] + sorted(set(self.conditions[c].iloc[labelled])) for c in CATEGORICAL}

    @property
    def content_hash(self) -> str:
        if self._content_hash is None:
            self._content_hash = fingerprint(content_hash(self.regions), content_hash(self.y),
                                             content_hash(self.conditions.astype(str).to_numpy().astype("U")))
        return self._content_hash

    @property
    def n_regions(self) -> int:
        return self.regions.shape[1]

    @property
    def n_channels(self) -> int:
        return self.regions.shape[2]

    def numeric_stats(self, idx=None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the numeric features over rows ``idx`` (default: the labelled rows)."""
        labelled = np.concatenate([self.source_idx, self.train_idx]) if idx is None else np.asarray(idx)
        values = self.conditions[list(NUMERIC)].iloc[labelled].to_numpy(dtype=np.float64)
        std = values.std(axis=0)
        return values.mean(axis=0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)

    def encode(self, idx, *, conditions: pd.DataFrame | None = None, warn: bool = True):
        """Tensors ``(regions, categorical indices, numeric, target)`` of rows ``idx``.

        A categorical value outside ``vocab`` (a medium never seen in training) gets index 0,
        the "unknown" embedding, and a warning with the count.
        """
        frame = (self.conditions if conditions is None else conditions).iloc[idx]
        codes = []
        for column in CATEGORICAL:
            lookup = {value: i for i, value in enumerate(self.vocab[column])}
            values = frame[column].to_numpy()
            index = np.array([lookup.get(v, 0) for v in values], dtype=np.int64)
            unseen = [str(v) for v in values if v not in lookup]
            if unseen and warn:
                warnings.warn(f"{len(unseen)} sample(s) have a {column} not seen in training ({sorted(set(unseen))[:5]}); "
                              "they get the 'unknown' embedding.", stacklevel=2)
            codes.append(index)
        return (torch.from_numpy(np.ascontiguousarray(self.regions[idx], dtype=np.float32)),
                torch.from_numpy(np.stack(codes, axis=1)),
                torch.from_numpy(frame[list(NUMERIC)].to_numpy(dtype=np.float32)),
                torch.from_numpy(self.y[idx].astype(np.float32)))

    def batches(self, idx, *, batch_size: int, shuffle: bool = False, seed: int = 0) -> RegulatoryBatches:
        return RegulatoryBatches(self.encode(idx), batch_size=batch_size, shuffle=shuffle, seed=seed)

    def to_frame(self) -> pd.DataFrame:
        parts = {"pretraining (source)": self.source_idx, "fine-tuning train": self.train_idx,
                 "validation": self.val_idx, "test": self.test_idx}
        rows = []
        for name, idx in parts.items():
            conds = self.conditions.iloc[idx]
            rows.append({"part": name, "samples": len(idx), "conditions": len(set(self.condition_names[idx])),
                         "media": ", ".join(sorted(set(conds["medium"]))), "drugs": ", ".join(sorted(set(conds["drug"])))})
        return pd.DataFrame(rows).set_index("part")

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self.y), "regions": self.n_regions,
                "motifs": self.n_channels - 1, "pretrain": len(self.source_idx), "train": len(self.train_idx),
                "val": len(self.val_idx), "test": len(self.test_idx), "vocab": self.vocab}

    def summary(self) -> str:
        return (f"{self.source}: {len(self.y)} samples, {self.n_regions} regions x {self.n_channels - 1} motifs + "
                f"accessibility; {len(set(self.condition_names))} conditions")

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.to_frame().to_string()

    def _repr_html_(self) -> str:
        return f"<p><b>{self.summary()}</b></p>" + self.to_frame().to_html()


def load(data_path: str = "", *, label_fraction: float = 0.3, val_fraction: float = 0.1, seed: int = 0,
         simulation_seed: int = 0) -> RegulatoryData:
    """Read (or simulate) the samples and split the new-condition rows.

    Parameters
    ----------
    data_path
        A CSV (:func:`read_csv`), a GET-style ``.zarr`` store (:func:`read_zarr`, condition table
        beside it), or ``""`` to simulate (:func:`simulate`, world ``simulation_seed``).
    label_fraction, val_fraction
        Shares of the new-condition (non-source) rows used to fine-tune and to validate; the
        rest is the test set.
    seed
        The split.
    """
    for name, value in (("label_fraction", label_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be in [0, 1), e.g. 0.3.")
    if label_fraction <= 0 or label_fraction + val_fraction >= 1:
        raise ValueError(f"label_fraction={label_fraction} and val_fraction={val_fraction} must be > 0 and sum to "
                         "less than 1: the rest is the test set.")
    if data_path and Path(data_path).suffix == ".zarr":
        frame, source = read_zarr(data_path), Path(data_path).name
    elif data_path:
        frame, source = read_csv(data_path), Path(data_path).name
    else:
        frame, source = simulate(seed=simulation_seed), f"simulated (world {simulation_seed})"
    n_regions, n_motifs = _check_frame(frame, source)
    motif_cols = [f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]
    motifs = frame[motif_cols].to_numpy(np.float32).reshape(len(frame), n_regions, n_motifs)
    access = frame[[f"r{r}_access" for r in range(n_regions)]].to_numpy(np.float32)[:, :, None]
    conditions = frame[list(CATEGORICAL) + list(NUMERIC)].copy()
    for column in CATEGORICAL:
        conditions[column] = conditions[column].fillna("").astype(str)
    names = (frame["condition"].astype(str).to_numpy() if "condition" in frame
             else conditions.astype(str).agg("/".join, axis=1).to_numpy())
    is_source = _source_rows(frame, source)
    target = np.flatnonzero(~is_source)
    order = np.random.default_rng(seed).permutation(target)
    n_train = max(1, round(label_fraction * len(order)))
    n_val = round(val_fraction * len(order))
    return RegulatoryData(
        regions=np.concatenate([motifs, access], axis=2), conditions=conditions.reset_index(drop=True),
        y=frame[TARGET].to_numpy(np.float32), condition_names=names, source_idx=np.flatnonzero(is_source),
        train_idx=np.sort(order[:n_train]), val_idx=np.sort(order[n_train:n_train + n_val]),
        test_idx=np.sort(order[n_train + n_val:]), source=source,
    )


def _source_rows(frame: pd.DataFrame, source: str) -> np.ndarray:
    """Which rows the ``set`` column marks for pretraining (``source``); the others are ``target`` rows.

    Values are compared without regard to case and surrounding spaces (``Source``, `` source``);
    any other value, an empty cell included, is an error that names it: a misspelt ``source``
    would otherwise put every pretraining row into fine-tuning and test without a word.
    """
    if "set" not in frame:
        return np.zeros(len(frame), bool)
    values = frame["set"].astype("string").str.strip().str.lower()
    unknown = ~values.isin(SET_VALUES).fillna(False).to_numpy(bool)
    if unknown.any():
        raw = frame["set"][unknown]
        shown = list(dict.fromkeys(repr(v) if isinstance(v, str) else "an empty cell" for v in raw))
        raise ValueError(
            f"{source}: column 'set' holds {int(unknown.sum())} value(s) that are not one of {', '.join(SET_VALUES)} "
            f"(case and surrounding spaces aside): {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}, first in "
            f"row {int(np.flatnonzero(unknown)[0])}. Mark the pretraining rows 'source' and the new-condition rows "
            "'target', or drop the column (then every row is a new-condition row).")
    return (values == "source").fillna(False).to_numpy(bool)


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- pretraining


def pretrain(data: RegulatoryData, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto",
             dtype=None, **overrides) -> Path:
    """Train the model on the source conditions; return ``pretrained.safetensors`` (cached by fingerprint).

    The fingerprint covers the data's content, the exact source rows, the vocabularies, ``seed``,
    every setting in :data:`PRETRAIN_SETTINGS` and the code; an entry is reused only when all are
    equal. The build reads nothing else: the numeric statistics (buffers in the checkpoint) come
    from the source rows, not from the fine-tuning rows of the split that happened to build it.
    """
    if len(data.source_idx) == 0:
        raise ValueError(f"{data.source} has no source rows (set=source) to pretrain on. Add them, or use "
                         "pretrained_checkpoint='none' (from scratch) or a checkpoint path.")
    cfg = {**DEFAULTS, **overrides}
    settings = {k: cfg[k] for k in PRETRAIN_SETTINGS} | {"seed": seed, "objective": "expression_on_source"}
    settings.update(placement_key(device, dtype))
    key = fingerprint(data.content_hash, data.source_idx, data.vocab, settings, code_version(__name__))

    def build(folder: Path) -> None:
        from ..tracking import Run
        from ..training import fit

        torch.manual_seed(seed)
        model = build_model(data, numeric_rows=data.source_idx, **cfg)
        run = Run(folder / "run", params=settings, resume=True)
        batches = data.batches(data.source_idx, batch_size=cfg["pretrain_batch_size"], shuffle=True, seed=seed)
        fit(model, batches, epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"], weight_decay=cfg["weight_decay"],
            schedule="cosine", warmup_ratio=0.05, run=run, resume=True, progress=progress, log_every=100,
            device=device, dtype=dtype)
        meta = {"task": "regulatory", "fingerprint": key, "vocab": data.vocab, "samples": len(data.source_idx),
                **settings}
        save_weights(model, folder / "pretrained.safetensors", metadata=meta)

    describe = {"data": data.source, "data_hash": data.content_hash, "source_rows": len(data.source_idx), **settings}
    return cached("pretrain", key, build, root=cache_root, describe=describe) / "pretrained.safetensors"


def pretrained(data: RegulatoryData, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True,
               cache_root=None, **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    return resolve_pretrained(pretrained_checkpoint,
                              lambda: pretrain(data, seed=seed, progress=progress, cache_root=cache_root, **overrides))


def load_checkpoint(model: nn.Module, source, *, trust_pickle: bool = False, key_map=None, run=None):
    """Load a pretrained checkpoint into ``model``; return the :class:`workbench.LoadReport`.

    Checkpoints that older code wrote: a pickle file loads only with ``trust_pickle=True``
    (and a warning names the risk); weights it named differently are renamed through
    ``key_map`` (default :data:`LEGACY_KEY_MAP` when the names do not fit as they are), and the
    report's ``prefix_map`` shows what was renamed.
    """
    from ..checkpoints import PICKLE_SUFFIXES, read_state_dict
    from ..transfer import load_pretrained

    if trust_pickle and isinstance(source, (str, os.PathLike)) and Path(source).suffix in PICKLE_SUFFIXES:
        warnings.warn(f"trust_pickle=True: {str(source)!r} is unpickled in full, which can run any code it holds. "
                      "Do this only for a file whose origin you trust; re-save it with workbench.save_weights.",
                      stacklevel=2)
    state = read_state_dict(source, trust_pickle=trust_pickle)
    if key_map is None and any(k.startswith(tuple(LEGACY_KEY_MAP)) for k in state):
        key_map = LEGACY_KEY_MAP
    report = load_pretrained(model, source, key_map=key_map, trust_pickle=trust_pickle, run=run)
    return report


# --------------------------------------------------------------------------- fine-tuning



def prepare(model: RegulatoryModel, *, method: str = "lora", rank: int = 4, run=None):
    """``(model to train, report)``: the model itself for ``full``; peft-wrapped for ``lora``.

    With a ``run``, a LoRA run's folder keeps the base weights the adapters are trained on
    (``checkpoints/base.safetensors``, written before the adapters are put on): its checkpoints
    hold the trainable tensors only, and the cache that held the pretrained weights is not durable.
    """
    from ..transfer import apply_strategy

    if method not in FINETUNE_METHODS:
        raise ValueError(f"finetune={method!r} is not one of {FINETUNE_METHODS}.")
    if method == "full":
        return model, apply_strategy(model, "full")
    from ..lora import apply_lora

    if run is not None and run.writes:  # under torchrun, rank 0 alone writes the run folder
        save_weights(model, run.checkpoints / "base.safetensors",
                     metadata={"what": "the base weights the LoRA adapters of this run adapt", "rank": rank})
    return apply_lora(model, rank=rank)


def finetune(model, data: RegulatoryData, *, epochs: int, learning_rate: float, batch_size: int = 64,
             warmup_ratio: float = 0.1, save_every: int | None = None, seed: int = 0, run=None, callbacks=(),
             resume: bool = False, progress: bool = True, device="auto", dtype=None):
    """Fine-tune on the new-condition train rows, pick the epoch with the lowest ``val_loss``.

    ``model`` is what :func:`prepare` returned. A LoRA model (peft) keeps its own freezing and
    its checkpoints (``best.safetensors``, every ``save_every`` epochs, ``last.pt``) hold only
    the trainable tensors (:func:`workbench.lora.checkpoint_state`). ``resume=True`` continues
    from ``run``'s ``last.pt`` (open it with ``Run(..., resume=True)``), LoRA or not.
    """
    from ..training import fit

    is_lora = hasattr(model, "peft_config")
    has_val = len(data.val_idx) > 0
    batches = data.batches(data.train_idx, batch_size=batch_size, shuffle=True, seed=seed)
    val = data.batches(data.val_idx, batch_size=512) if has_val else None
    monitor = "val_loss" if has_val else "train_loss"
    state_fn = None
    if is_lora:
        from ..lora import checkpoint_state as state_fn
    return fit(model, batches, epochs=epochs, lr=learning_rate, weight_decay=DEFAULTS["weight_decay"],
               schedule="cosine", warmup_ratio=warmup_ratio, val_data=val, monitor=monitor, progress=progress,
               seed=seed, log_every=100, strategy=None if is_lora else "full", restore_best=True, run=run,
               resume=resume, save_every=save_every, state_fn=state_fn, callbacks=callbacks, device=device, dtype=dtype)


# --------------------------------------------------------------------------- evaluation


def predict(model, data: RegulatoryData, idx, *, conditions: pd.DataFrame | None = None, batch_size: int = 512,
            warn: bool = True) -> np.ndarray:
    """Predicted expression of rows ``idx`` (optionally with other condition values)."""
    tensors = data.encode(idx, conditions=conditions, warn=warn)
    model.eval()
    with torch.no_grad():
        parts = [model(*to_model((r, c, n), model))
                 for r, c, n, _ in RegulatoryBatches(tensors, batch_size=batch_size, shuffle=False)]
    return to_numpy(torch.cat(parts).float()) if parts else np.zeros(0, np.float32)


def _baseline_features(data: RegulatoryData, idx) -> np.ndarray:
    conds = data.conditions.iloc[idx]
    onehot = [np.stack([(conds[c].to_numpy() == v) for v in data.vocab[c][1:]], axis=1) for c in CATEGORICAL]
    mean, std = data.numeric_stats()
    numeric = (conds[list(NUMERIC)].to_numpy(np.float32) - mean) / std
    return np.concatenate([data.regions[idx].reshape(len(idx), -1), *onehot, numeric], axis=1).astype(np.float32)


def fit_rows(data: RegulatoryData, *, pretrained_checkpoint: str = "pretrain") -> np.ndarray:
    """The rows whose expression the model learnt from, so the baseline fits the same ones.

    The fine-tuning train rows, and the source rows when the model was pretrained on them here
    (``pretrained_checkpoint="pretrain"``). From scratch, or from a checkpoint made elsewhere,
    the train rows alone.
    """
    if pretrained_checkpoint == "pretrain":
        return np.concatenate([data.source_idx, data.train_idx])
    return np.asarray(data.train_idx)


def baseline(data: RegulatoryData, *, rows=None) -> np.ndarray:
    """Ridge regression on the same features, fit on ``rows`` (default: source + train); test predictions."""
    from sklearn.linear_model import RidgeCV

    labelled = np.concatenate([data.source_idx, data.train_idx]) if rows is None else np.asarray(rows)
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(_baseline_features(data, labelled), data.y[labelled])
    return ridge.predict(_baseline_features(data, data.test_idx))


def permutation_importance(model, data: RegulatoryData, idx=None, *, repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """Drop in test Pearson when one condition feature is shuffled across samples.

    Returns
    -------
    pandas.DataFrame
        ``feature``, ``importance`` (mean drop), ``std`` over ``repeats`` shuffles; largest first.
    """
    from ..metrics import regression_metrics

    idx = data.test_idx if idx is None else idx
    truth = data.y[idx]
    reference = regression_metrics(truth, predict(model, data, idx, warn=False))["pearson"]
    rng = np.random.default_rng(seed)
    rows = []
    for feature in CATEGORICAL + NUMERIC:
        drops = []
        for _ in range(repeats):
            shuffled = data.conditions.copy()
            values = shuffled[feature].to_numpy().copy()
            values[idx] = values[idx][rng.permutation(len(idx))]
            shuffled[feature] = values
            score = regression_metrics(truth, predict(model, data, idx, conditions=shuffled, warn=False))["pearson"]
            drops.append(reference - score)
        rows.append({"feature": feature, "importance": float(np.mean(drops)), "std": float(np.std(drops))})
    return pd.DataFrame(rows).sort_values("importance", ascending=False, ignore_index=True)


@dataclass
class Evaluation:
    """Test metrics (overall and per condition) of the model and of ridge regression."""

    table: MetricsTable
    per_condition: pd.DataFrame
    predictions: pd.DataFrame
    final: dict

    def _repr_html_(self) -> str:
        return self.table._repr_html_() + "<p><b>Per condition (fine-tuned model)</b></p>" + self.per_condition.to_html(
            float_format="{:.3f}".format)

    def __repr__(self) -> str:
        return repr(self.table) + "\n" + self.per_condition.to_string()


def evaluate(model, data: RegulatoryData, *, run=None, pretrained_checkpoint: str = "pretrain",
             extra: Mapping | None = None) -> Evaluation:
    """Score the test rows beside ridge regression; write predictions.csv, metrics.json, final_metrics.json.

    ``pretrained_checkpoint`` is the parameter the model was made with: ridge regression fits the
    rows the model learnt from (:func:`fit_rows`); ``n_train`` and ``baseline_n_train`` say how many.

    With a ``run``, its folder also gets what predicting on new samples needs (``save_predictor``).
    """
    pred = predict(model, data, data.test_idx)
    save_predictor(run, model, data, test_predictions=pred)
    truth = data.y[data.test_idx]
    groups = data.condition_names[data.test_idx]
    rows = fit_rows(data, pretrained_checkpoint=pretrained_checkpoint)
    ours = grouped_regression_metrics(truth, pred, groups)
    base = grouped_regression_metrics(truth, baseline(data, rows=rows), groups)
    keys = ("pearson", "spearman", "r2", "mse")
    overall, base_overall = ours.loc["overall", list(keys)].to_dict(), base.loc["overall", list(keys)].to_dict()
    table = MetricsTable({"fine-tuned model": overall, "baseline (ridge regression)": base_overall})
    final = {f"test_{k}": float(v) for k, v in overall.items()} | {f"baseline_test_{k}": float(v) for k, v in base_overall.items()}
    n_model = len(data.train_idx) + (len(data.source_idx) if pretrained_checkpoint == "pretrain" else 0)
    final |= {"n_train": n_model, "baseline_n_train": len(rows)}
    final |= {k: float(v) for k, v in dict(extra or {}).items()}
    predictions = pd.DataFrame({"row": data.test_idx, "condition": groups, "true": truth, "predicted": pred,
                                "residual": pred - truth})
    if run is not None:
        if run.writes:  # under torchrun, rank 0 alone writes the run folder
            predictions.to_csv(run.path / "predictions.csv", index=False)
        run.save_json("metrics.json", {"overall": overall, "baseline": base_overall,
                                       "per_condition": ours.drop(index="overall").to_dict(orient="index")})
        final = run.finish(final)
    return Evaluation(table=table, per_condition=ours, predictions=predictions, final=final)



# --------------------------------------------------------------------------- prediction on new samples

#: Columns of a table that name or score a sample rather than describe it: not counted as extra fields.
ID_COLUMNS = ("gene", "condition", "set", TARGET)


def _model_settings(model) -> dict:
    """The architecture of a (possibly peft-wrapped) :class:`RegulatoryModel`, read from its layers."""
    inner = unwrap(model)
    block = inner.encoder[0]
    width = inner.position.shape[1]
    return {"width": int(width), "layers": len(inner.encoder), "heads": int(block.heads),
            "ff_mult": int(block.ff1.out_features // width),
            "condition_dim": int((inner.condition_token.in_features - len(NUMERIC)) // len(CATEGORICAL)),
            "fusion_hidden": int(inner.head[0].out_features), "dropout": float(block.dropout)}


def save_predictor(run, model, data: RegulatoryData, *, test_predictions: np.ndarray | None = None):
    """Write what predicting on new samples needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the layout (regions, motifs), the vocabularies (index 0 is unknown) and the
    architecture; the numeric statistics are buffers of the weights. A LoRA model is kept as
    its adapters plus the base weights they were trained on (``adapters/``, see
    :func:`workbench.lora.save_adapters`), never only in the cache; a fully fine-tuned model as
    its weights. ``test_predictions`` (of ``data.test_idx``) go to ``test_predictions.csv``.
    """
    if run is None:
        return None
    is_lora = hasattr(model, "peft_config")
    weights = None
    if is_lora and getattr(run, "writes", True):
        from ..lora import save_adapters

        save_adapters(model, run.path / "adapters")
        weights = "adapters"
    state = {"n_regions": data.n_regions, "n_motifs": data.n_channels - 1, "vocab": data.vocab,
             "categorical": list(CATEGORICAL), "numeric": list(NUMERIC), "finetune": "lora" if is_lora else "full",
             "source": data.source, **_model_settings(model)}
    test = None
    if test_predictions is not None:
        report = AlignmentReport(what="fields", n_model=len(_fields(data.n_regions, data.n_channels - 1)),
                                 n_samples=len(data.test_idx))
        report.n_data = report.matched = report.n_model
        test = _predictions(np.asarray(test_predictions), data.conditions.iloc[data.test_idx], data.test_idx, report,
                            genes=None)
    return _save_predictor(run, model, task=__name__, state=state, test_predictions=test, weights=weights)


def _fields(n_regions: int, n_motifs: int) -> list[str]:
    return [*CATEGORICAL, *NUMERIC, *(f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)),
            *(f"r{r}_access" for r in range(n_regions))]


def _predictions(values: np.ndarray, frame: pd.DataFrame, rows, report, *, genes=None) -> Predictions:
    out = pd.DataFrame({"predicted_expression": values}, index=pd.Index(np.asarray(rows), name="row"))
    if genes is not None:
        out.insert(0, "gene", np.asarray(genes))
    return Predictions(out, report=report, output="values", task=__name__)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return read_zarr(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], sep="\t" if suffix == ".tsv" else ",",
                       dtype={c: str for c in (*CATEGORICAL, "gene", "condition", "set")})


class RegulatoryPredictor(Predictor):
    """A regulatory run's model (merged from nothing: base + adapters for LoRA), its vocabularies and layout.

    Predicts expression for a table of samples in the CSV layout of :func:`read_csv` (the target
    column is not needed), a parquet file or a GET-style zarr store. Columns are matched by name:
    a missing motif or accessibility column is filled with 0, a missing categorical one is
    "unknown", a missing numeric one takes the training mean (refused above ``max_missing`` of
    all fields); a category never seen in training gets the unknown index, counted per column.
    """

    accepts = ("table", "zarr")
    outputs = ("values",)

    def __init__(self, path, record):
        super().__init__(path, record)
        s = self.state
        self.vocab = {k: list(v) for k, v in s["vocab"].items()}
        self.fields = _fields(s["n_regions"], s["n_motifs"])
        model = RegulatoryModel(
            s["n_regions"], s["n_motifs"] + 1, {c: len(v) for c, v in self.vocab.items()}, len(NUMERIC),
            width=s["width"], layers=s["layers"], heads=s["heads"], ff_mult=s["ff_mult"],
            condition_dim=s["condition_dim"], fusion_hidden=s["fusion_hidden"], dropout=s["dropout"])
        if s.get("finetune") == "lora":
            from ..lora import load_adapters

            folder = self.path / self.record["weights"]
            if not (folder / "base.safetensors").is_file():
                raise PredictError(f"{folder} holds no base.safetensors: the adapters cannot be applied without the "
                                   "base weights they were trained on. Run the notebook again into a new folder.")
            self.model = load_adapters(model, folder).eval()
        else:
            self.model = self.load_weights(model)

    def predict(self, data, *, output: str = "values", batch_size: int = 512,
                max_missing: float = MAX_MISSING) -> Predictions:
        """Predicted expression, one row per sample of ``data`` (a DataFrame, or a .csv/.parquet/.zarr path)."""
        self.check_output(output)
        self.check_input(data)
        if isinstance(data, (str, os.PathLike)):
            frame, where = _read_table(Path(data)), Path(data).name
        elif isinstance(data, pd.DataFrame):
            frame, where = data, "the table"
        else:
            raise PredictError(f"cannot predict on a {type(data).__name__}: give a DataFrame or the path of a "
                               ".csv, .parquet or .zarr table.")
        frame = frame.reset_index(drop=True)
        columns = [c for c in frame.columns if c not in ID_COLUMNS]
        _, report = align_names(columns, self.fields, what="fields", max_missing=max_missing, where=where)
        report.n_samples = len(frame)
        inner = unwrap(self.model)
        mean = inner.conditions.original_module.numeric_mean if hasattr(inner.conditions, "original_module") \
            else inner.conditions.numeric_mean
        filled = {}
        for i, column in enumerate(NUMERIC):
            if column not in frame:
                filled[column] = float(mean[i])
        if filled:
            report.notes.append("numeric fields missing, set to their training mean: "
                                + ", ".join(f"{k}={v:g}" for k, v in filled.items()))
        n = len(frame)
        numeric = np.empty((n, len(NUMERIC)), dtype=np.float32)
        for i, column in enumerate(NUMERIC):
            numeric[:, i] = filled[column] if column in filled else _numbers(frame, column, where)
        codes = np.zeros((n, len(CATEGORICAL)), dtype=np.int64)
        for i, column in enumerate(CATEGORICAL):
            if column not in frame:
                continue
            lookup = {value: k for k, value in enumerate(self.vocab[column])}
            values = frame[column].fillna("").astype(str).to_numpy()
            codes[:, i] = [lookup.get(v, 0) for v in values]
            unknown = int(sum(v not in lookup for v in values))
            if unknown:
                report.unknown[column] = unknown
        s = self.state
        regions = np.zeros((n, s["n_regions"], s["n_motifs"] + 1), dtype=np.float32)
        for r in range(s["n_regions"]):
            for m in range(s["n_motifs"]):
                if f"r{r}_m{m}" in frame:
                    regions[:, r, m] = _numbers(frame, f"r{r}_m{m}", where)
            if f"r{r}_access" in frame:
                regions[:, r, s["n_motifs"]] = _numbers(frame, f"r{r}_access", where)
        tensors = to_model((torch.from_numpy(regions), torch.from_numpy(codes), torch.from_numpy(numeric)), self.model)
        with torch.no_grad():
            parts = [self.model(*(t[a:a + batch_size] for t in tensors)) for a in range(0, n, batch_size)]
        values = to_numpy(torch.cat(parts)) if parts else np.zeros(0, np.float32)
        return _predictions(values, frame, np.arange(n), report,
                            genes=frame["gene"].to_numpy() if "gene" in frame else None)


def _numbers(frame: pd.DataFrame, column: str, where: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise PredictError(f"{where}: column {column!r} must be numeric, but row {row} holds "
                           f"{frame[column].iloc[row]!r} ({int(bad.sum())} such row(s)). Fix or drop those rows.")
    return values.to_numpy(np.float32)
