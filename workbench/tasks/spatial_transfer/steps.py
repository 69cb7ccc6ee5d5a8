"""The spatial workflow's steps: the study (:func:`load`), bulk pretraining (through :mod:`workbench.protocol`),
loading the checkpoint, cross-validation.

Per fold the spatial model is fit with the best epoch restored, ridge regression (:func:`workbench.protocol.
fit_baseline`) is fit on exactly the model's training spots, and both test predictions are scored by
:func:`workbench.protocol.evaluate`; :func:`evaluate` then summarises the folds into ``final_metrics.json``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ... import protocol
from ...metrics import MetricsTable, fold_summary
from .batches import Scaler, SlideBatches, predict
from .data import SpotData, Study, read_visium, select_genes
from .defaults import CV_KINDS, DEFAULTS, PRETRAIN_SETTINGS, STRATEGIES
from .model import build_model
from .simulate import simulate

__all__ = ["load", "pretrain", "pretrained", "load_report", "report_table", "strategy_table", "cv_splits", "CVResult",
           "baseline", "cross_validate", "evaluate"]

def load(spatial_path: str = "", *, cells_path: str = "", cell_type_key: str = "bulk_labels",
         features_key: str = "X_features", slide_key: str = "library_id", genes="", n_bulk_slides: int = 16,
         n_spatial_slides: int = 4, sim_seed: int = 0, **overrides) -> Study:
    """The study: simulated stages, or the simulated bulk stage and a Visium-style spatial file."""
    study = simulate(cells_path, cell_type_key=cell_type_key, n_bulk_slides=n_bulk_slides,
                     n_spatial_slides=n_spatial_slides, seed=sim_seed, **overrides)
    if spatial_path:
        cfg = {**DEFAULTS, **overrides}
        study.spatial = read_visium(spatial_path, features_key=features_key, slide_key=slide_key, genes=genes,
                                    neighbours=cfg["neighbours"], radius=cfg["radius"])
    else:
        study.spatial = select_genes(study.spatial, genes)
    return study


def _batches(data: SpotData, train_idx, val_idx, *, seed: int = 0):
    """``(scaler, training batches, validation batches or None)``: the scaler is fit on ``train_idx`` alone."""
    scaler = Scaler.fit(data, train_idx)
    train_mask = np.zeros(len(data.spot_ids), bool)
    train_mask[train_idx] = True
    val_mask = np.zeros(len(data.spot_ids), bool)
    val_mask[val_idx] = True
    slides = data.slide_names
    batches = SlideBatches(data, scaler, slides, train_mask, shuffle=True, seed=seed)
    val = SlideBatches(data, scaler, slides, val_mask) if val_mask.any() else None
    return scaler, batches, val


def _fit(model, data: SpotData, train_idx, val_idx, *, epochs, lr, patience, min_delta=0.0, strategy="full",
         seed=0, progress=False, callbacks=(), run=None, device="auto", dtype=None):
    """Fit ``model`` on the spots ``train_idx`` (early stopping and the best epoch on ``val_idx``); ``(history,
    scaler)``."""
    from ...training import fit

    scaler, batches, val = _batches(data, train_idx, val_idx, seed=seed)
    history = fit(model, batches, epochs=epochs, learning_rate=lr, weight_decay=DEFAULTS["weight_decay"],
                  lr_scheduler_type="constant", strategy=strategy, val_data=val,
                  monitor="val_loss" if val is not None else "train_loss",
                  patience=patience or None, min_delta=min_delta, restore_best=True, run=run, callbacks=callbacks,
                  progress=progress, seed=seed, log_every=1000, device=device, dtype=dtype)
    return history, scaler


def _pretraining(study: Study, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto", dtype=None,
                 **overrides) -> dict:
    """What :func:`workbench.protocol.pretrain` needs for the bulk model: its model, batches, settings, reads."""
    bulk = study.bulk
    if bulk is None or len(bulk.slide_names) < 3:
        raise ValueError("Pretraining needs a bulk stage of at least 3 slides (n_bulk_slides >= 3). Use "
                         "pretrained_checkpoint='none' (from scratch) or a checkpoint path.")
    cfg = {**DEFAULTS, **overrides}
    val_slides = bulk.slide_names[-2:]  # the last two bulk slides validate (early stopping, best epoch)
    val = np.flatnonzero(np.isin(bulk.slides, val_slides))
    train = np.flatnonzero(~np.isin(bulk.slides, val_slides))
    _, batches, val_batches = _batches(bulk, train, val, seed=seed)
    return dict(
        workflow=__package__.rpartition(".")[2], objective="bulk_expression", reads=[bulk.content_hash],
        settings={k: cfg[k] for k in PRETRAIN_SETTINGS},
        model=lambda: build_model(bulk, layers=cfg["bulk_layers"], **cfg), batches=lambda: batches,
        epochs=cfg["pretrain_epochs"], learning_rate=cfg["pretrain_lr"], weight_decay=DEFAULTS["weight_decay"],
        lr_scheduler_type="constant", warmup_ratio=0.0, seed=seed, code=__package__,
        metadata={"stage": "bulk", "genes": bulk.genes},
        describe={"data": bulk.source, "data_hash": bulk.content_hash, "slides": len(bulk.slide_names)},
        fit_options=dict(strategy="full", val_data=val_batches, monitor="val_loss",
                         patience=cfg["pretrain_patience"] or None, min_delta=0.0, restore_best=True, seed=seed),
        device=device, dtype=dtype, progress=progress, cache_root=cache_root)


def pretrain(study: Study, *, seed: int = 0, progress: bool = True, cache_root=None, device="auto", dtype=None,
             **overrides) -> Path:
    """Train the bulk model (gene set A, ``bulk_layers`` layers); return ``pretrained.safetensors`` (cached).

    The last two bulk slides validate (early stopping). Cached by :func:`workbench.protocol.pretrain`: the key covers
    the bulk data's content, ``seed``, every setting in :data:`PRETRAIN_SETTINGS` and the source of every module of
    this package (:func:`workbench.cache.code_version` of the package).
    """
    return protocol.pretrain(**_pretraining(study, seed=seed, progress=progress, cache_root=cache_root,
                                            device=device, dtype=dtype, **overrides))


def pretrained(study: Study, pretrained_checkpoint: str, *, seed: int = 0, progress: bool = True, cache_root=None,
               **overrides):
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` (here, cached) | ``"none"`` | a path."""
    pretraining = _pretraining(study, seed=seed, progress=progress, cache_root=cache_root, **overrides) \
        if pretrained_checkpoint == "pretrain" else {}
    return protocol.pretrained(pretrained_checkpoint, **pretraining)


def load_report(model, source, *, run=None):
    """Load the bulk checkpoint into the spatial ``model``; the :class:`workbench.LoadReport`."""
    from ...transfer import load_pretrained

    return load_pretrained(model, source, run=run)


def report_table(report, source) -> pd.DataFrame:
    """What did not load, grouped by module: status, keys, parameter count and shapes (checkpoint and model).

    The core report lists unexpected keys without shapes; the shapes come from the checkpoint here.
    """
    from ...checkpoints import read_state_dict

    state = read_state_dict(source)
    rows = []
    for key, (ckpt, model_shape) in report.mismatched.items():
        rows.append({"status": "mismatched (skipped)", "key": key, "checkpoint_shape": tuple(ckpt),
                     "model_shape": tuple(model_shape), "params": math.prod(ckpt)})
    for key in report.unexpected:
        shape = tuple(state[key].shape)
        rows.append({"status": "unexpected", "key": key, "checkpoint_shape": shape, "model_shape": None,
                     "params": math.prod(shape)})
    for key in report.missing:
        rows.append({"status": "missing", "key": key, "checkpoint_shape": None, "model_shape": None, "params": 0})
    return pd.DataFrame(rows, columns=["status", "key", "checkpoint_shape", "model_shape", "params"])


def strategy_table(model) -> pd.DataFrame:
    """Trainable parameters per module under each named strategy of the model (it ends unfrozen).

    When the checkpoint left tensors at initialisation (e.g. the GNN's input weights, for spot
    features of another width), no strategy freezes them: the last row, ``kept trainable (not
    loaded)``, counts their parameters under each strategy.
    """
    from ...transfer import apply_strategy

    frames, kept = [], {}
    for name in STRATEGIES:
        frame = apply_strategy(model, name).to_frame().set_index("module")
        frames.append(frame["trainable"].rename(name))
        kept[name] = int(frame["kept_trainable"].sum())
    apply_strategy(model, "full")
    table = pd.concat(frames, axis=1)
    table.loc["total"] = table.sum()
    if any(kept.values()):
        table.loc["kept trainable (not loaded)"] = pd.Series(kept)
    return table


# --------------------------------------------------------------------------- cross-validation


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in (value or [])]


def cv_splits(data: SpotData, *, cv: str = "loo", folds: int = 5, held_out="", seed: int = 0):
    """``[(fold name, train positions, test positions)]`` for ``cv="loo"`` (by slide) or ``"kfold"`` (by spot)."""
    from ... import splits

    if cv not in CV_KINDS:
        raise ValueError(f"cv={cv!r} is not one of {CV_KINDS}: 'loo' leaves one slide out, 'kfold' splits spots.")
    slides = data.slide_names
    if cv == "kfold":
        pairs = splits.kfold(data.slides, n_splits=folds, stratify=len(slides) > 1 and
                             min(np.unique(data.slides, return_counts=True)[1]) >= folds, seed=seed)
        return [(f"fold{i}", np.sort(train), np.sort(test)) for i, (train, test) in enumerate(pairs)]
    names = _names(held_out) or slides
    unknown = [n for n in names if n not in slides]
    if unknown:
        raise ValueError(f"held_out names slide(s) {unknown} that do not exist; the slides are {slides}.")
    counts = {s: len(data.positions(s)) for s in slides}
    single = [s for s, c in counts.items() if c < 2]
    if single:
        raise ValueError(f"cv='loo' needs at least 2 spots on every slide, but {single} hold(s) "
                         f"{[counts[s] for s in single]}: a slide of one spot is no test set and has no graph. "
                         "Drop it, merge it with another slide, or use cv='kfold'.")
    by_name = {name: (train, test) for name, train, test in splits.leave_one_group_out(data.slides)}
    return [(name, *by_name[name]) for name in names]


@dataclass
class CVResult:
    """Per-fold metrics of the model and of ridge regression, their summary, and each fold's predictions.

    Three faces: ``_repr_html_`` (summary and folds), ``to_frame()`` (one row per fold), ``to_dict()`` (the final
    metrics: each summary metric's mean over folds and ``<metric>_std``, as ``final_metrics.json`` holds them).
    """

    per_fold: pd.DataFrame
    summary: pd.DataFrame
    predictions: dict
    histories: dict
    strategy: str
    cv: str
    final: dict = field(default_factory=dict)

    def table(self) -> MetricsTable:
        metrics = ("mean_pearson", "pearson", "mse")
        model = {m: self.summary.loc[f"test_{m}", "mean"] for m in metrics}
        ridge = {m: self.summary.loc[f"baseline_test_{m}", "mean"] for m in metrics}
        return MetricsTable({f"model ({self.strategy})": model, "baseline (ridge regression)": ridge})

    def to_frame(self) -> pd.DataFrame:
        """One row per fold: spots, best epoch, the model's and the baseline's test metrics."""
        return self.per_fold.copy()

    def to_dict(self) -> dict:
        """The final metrics (what :func:`evaluate` wrote; computed from the folds before it ran)."""
        return dict(self.final) if self.final else _final(self)

    def _repr_html_(self) -> str:
        return (f"<p><b>{self.cv}: {len(self.per_fold)} folds, mean ± std</b></p>"
                + self.summary.to_html(float_format="{:.4f}".format)
                + "<p>Per fold</p>" + self.per_fold.to_html(float_format="{:.4f}".format))

    def __repr__(self) -> str:
        return self.summary.to_string() + "\n" + self.per_fold.to_string()


def _baseline_inputs(data: SpotData, scaler: Scaler) -> np.ndarray:
    """A spot's features and the mean features of its graph neighbours (what the GNN sees at one hop), scaled."""
    x = (data.features - scaler.feature_mean) / scaler.feature_std
    return np.concatenate([x, data.neighbour_mean(x)], axis=1)


def baseline(data: SpotData, train_idx, test_idx) -> np.ndarray:
    """Ridge regression on a spot's features and its neighbours' mean features; predictions for ``test_idx``.

    Fit on ``train_idx`` (the model's training spots) by :func:`workbench.protocol.fit_baseline` (``kind="ridge"``,
    its penalty by leave-one-out over ``10**[-2, 4]``, 13 values; the features scaled by the training spots').
    """
    inputs = _baseline_inputs(data, Scaler.fit(data, train_idx))
    ridge = protocol.fit_baseline(inputs[train_idx], data.targets[train_idx], kind="ridge", scale=False,
                                  alphas=np.logspace(-2, 4, 13))
    return ridge.predict(inputs[test_idx])


def _long_predictions(data: SpotData, idx, truth, pred) -> pd.DataFrame:
    n_genes = len(data.genes)
    return pd.DataFrame({"spot_id": np.repeat(data.spot_ids[idx], n_genes), "slide": np.repeat(data.slides[idx], n_genes),
                         "gene": np.tile(data.genes, len(idx)), "true": truth.ravel(), "predicted": pred.ravel()})


def cross_validate(study: Study, *, source=None, strategy: str = "frozen_backbone", cv: str = "loo", folds: int = 5,
                   held_out="", epochs: int = 150, learning_rate: float = 1e-3, patience: int = 20,
                   min_delta: float = 1e-3, seed: int = 0, run=None, callbacks=(), progress: bool = False,
                   device="auto", dtype=None, **overrides) -> CVResult:
    """Train and test the spatial model once per fold; per-fold files under ``<run>/folds/<fold>/``.

    Each fold: a fresh model (``spatial_layers`` layers, seeded), the checkpoint ``source``
    loaded (None: from scratch), ``strategy`` applied by :func:`workbench.fit`, early stopping on
    the validation spots, then test metrics (overall Pearson, mean per-gene Pearson, MSE) of the
    model and of :func:`baseline` (fit on the model's training spots), both scored by
    :func:`workbench.protocol.evaluate`. Writes ``metrics.json``, ``predictions.csv`` (spot ids)
    and ``curves.png`` per fold.
    """
    from ...plots import plot_history
    from .predictor import save_fold, save_predictor

    cfg = {**DEFAULTS, **overrides}
    data = study.spatial
    rows, predictions, histories, fold_models = {}, {}, {}, []
    for name, train, test in cv_splits(data, cv=cv, folds=folds, held_out=held_out, seed=seed):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # by name: a fold is the same in any run
        shuffled = rng.permutation(train)
        n_val = max(1, int(round(cfg["val_fraction"] * len(train))))
        val, fit_idx = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
        torch.manual_seed(seed)
        model = build_model(data, **cfg)
        if source is not None:
            load_report(model, source)
        history, scaler = _fit(model, data, fit_idx, val, epochs=epochs, lr=learning_rate, patience=patience,
                               min_delta=min_delta, strategy=strategy, seed=seed, progress=progress,
                               callbacks=callbacks, device=device, dtype=dtype)
        test_slides = list(dict.fromkeys(data.slides[test].tolist()))
        pred = predict(model, data, scaler, test_slides)[test]
        truth = data.targets[test]
        scores = protocol.evaluate(truth, pred, baseline(data, fit_idx, test), n_train=len(fit_idx),
                                   baseline_n_train=len(fit_idx)).final
        row = {"train_spots": scores["n_train"], "baseline_train_spots": scores["baseline_n_train"],
               "val_spots": len(val), "test_spots": len(test),
               "best_epoch": history.best_epoch, "epochs_run": len(history.rows)}
        row |= {f"{who}test_{m}": scores[f"{who}test_{m}"] for who in ("", "baseline_")
                for m in ("pearson", "mean_pearson", "mse")}
        # genes predicted as a constant count as r = 0 in mean_pearson; how many there were
        row |= {"constant_genes": int(scores["test_constant_predictions"]),
                "baseline_constant_genes": int(scores["baseline_test_constant_predictions"])}
        rows[name] = row
        predictions[name] = _long_predictions(data, test, truth, pred)
        histories[name] = history
        if run is not None and run.writes:  # under torchrun, rank 0 alone writes the run folder
            folder = run.path / "folds" / name
            folder.mkdir(parents=True, exist_ok=True)
            run.save_json(f"folds/{name}/metrics.json", {**row, "test_slides": test_slides,
                                                          "stop_reason": history.stop_reason})
            predictions[name].to_csv(folder / "predictions.csv", index=False)
            plot_history(history).savefig(folder / "curves.png", dpi=90, bbox_inches="tight")
            fold_models.append(save_fold(run, name, model, scaler, test_slides, data.spot_ids[test], pred))
    if run is not None:
        save_predictor(run, data, fold_models, cfg)
    per_fold = pd.DataFrame.from_dict(rows, orient="index").rename_axis("fold")
    summary = fold_summary(per_fold, [c for c in per_fold.columns if c.startswith(("test_", "baseline_test_"))
                                      and c != "test_spots"])
    return CVResult(per_fold=per_fold, summary=summary, predictions=predictions, histories=histories,
                    strategy=strategy if source is not None else f"{strategy}, from scratch", cv=cv)


def _final(result: CVResult) -> dict:
    final = {}
    for metric, row in result.summary.iterrows():
        final[metric] = float(row["mean"])
        final[f"{metric}_std"] = float(row["std"])
    final["folds"] = len(result.per_fold)
    # spots the model and ridge regression were fit on, mean over folds
    final["n_train"] = float(result.per_fold["train_spots"].mean())
    final["baseline_n_train"] = float(result.per_fold["baseline_train_spots"].mean())
    return final


def evaluate(result: CVResult, *, run=None, extra: Mapping | None = None) -> CVResult:
    """Final metrics: each summary metric's mean over folds, and ``<metric>_std``; write final_metrics.json."""
    final = _final(result) | {k: float(v) for k, v in dict(extra or {}).items()}
    if run is not None:
        run.save_json("cv_summary.json", {"summary": result.summary.drop(columns="mean ± std").to_dict(orient="index"),
                                          "per_fold": result.per_fold.to_dict(orient="index")})
        final = run.finish(final)
    result.final = final
    return result
