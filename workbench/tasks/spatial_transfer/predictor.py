"""Prediction on new slides: what a run folder keeps (fold models and scalers) and :class:`SpatialPredictor`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ...checkpoints import save_weights
from ...predict import AlignmentReport, Predictions, PredictError, Predictor
from ...predict import save_predictor as _save_predictor
from .batches import Scaler, predict
from .data import SpotData
from .model import SpatialExpressionModel

__all__ = ["SpatialPredictor", "save_predictor"]

#: The workflow's module, recorded in predictor.json (``load_run`` imports it and finds the declaration there).
TASK = __package__


def save_fold(run, name: str, model, scaler: Scaler, test_slides, spot_ids, pred) -> dict:
    """One fold's model and scaler in ``folds/<name>/`` (for :class:`SpatialPredictor`), and its test predictions."""
    weights = f"folds/{name}/model.safetensors"
    if getattr(run, "writes", True):
        from ...transfer import unwrap

        save_weights(unwrap(model), run.path / weights)
    return {"name": name, "weights": weights, "test_slides": list(test_slides),
            "scaler": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in vars(scaler).items()},
            "test_spots": np.asarray(spot_ids).astype(str).tolist(), "_pred": pred}


def save_predictor(run, data: SpotData, folds: list[dict], cfg: Mapping):
    """Write what predicting on new slides needs into ``run``'s folder (see :mod:`workbench.predict`).

    The state: the target genes, the number of spot features, the graph settings, the
    architecture, and per fold its weights (``folds/<fold>/model.safetensors``) and its scaler
    (feature and target means and standard deviations of its training spots). The test spots'
    predictions of every fold (each spot is tested once) go to ``test_predictions.csv``.
    """
    if run is None or not folds:
        return None
    settings = {k: cfg[k] for k in ("hidden", "gat_heads", "d_model", "heads", "ff", "dropout", "spatial_layers",
                                    "neighbours", "radius")}
    state = {"genes": list(data.genes), "n_features": int(data.n_features), "source": data.source, **settings,
             "folds": [{k: v for k, v in fold.items() if not k.startswith("_")} for fold in folds]}
    values = np.concatenate([fold["_pred"] for fold in folds])
    spots = [spot for fold in folds for spot in fold["test_spots"]]
    report = AlignmentReport(what="features", n_model=data.n_features, n_data=data.n_features,
                             matched=data.n_features, n_samples=len(spots))
    test = _predictions(values, spots, data.genes, report)
    return _save_predictor(run, None, task=TASK, state=state, test_predictions=test, weights="folds")


def _predictions(values: np.ndarray, spots, genes, report, *, source=None) -> Predictions:
    frame = pd.DataFrame(values, index=pd.Index(list(spots), name="spot"), columns=list(genes))
    return Predictions(frame, report=report, output="values", source=source, task=TASK)


class SpatialPredictor(Predictor):
    """A spatial run's fold models and scalers: predicts the target genes of the spots of new slides.

    Input: a Visium-style .h5ad (``obsm['spatial']`` coordinates, ``obsm[features_key]`` spot
    features with the run's number of columns, ``obs[slide_key]`` slides; ``X`` is not needed).
    Each slide's spots get their graph as in training. The prediction is the mean of the fold
    models' (each with its own scaler), or one fold's with ``fold=``.
    """

    accepts = ("anndata",)
    outputs = ("values",)

    def setup(self, s: dict) -> None:
        self.genes, self.folds = list(s["genes"]), list(s["folds"])
        self.models = {}
        for fold in self.folds:
            model = SpatialExpressionModel(s["n_features"], len(self.genes), layers=s["spatial_layers"],
                                           hidden=s["hidden"], gat_heads=s["gat_heads"], d_model=s["d_model"],
                                           heads=s["heads"], ff=s["ff"], dropout=s["dropout"])
            from ...checkpoints import read_state_dict

            file = self.path / fold["weights"]
            if not file.is_file():
                raise PredictError(f"{self.path} names {fold['weights']} as the weights of fold {fold['name']}, but the "
                                   "file is gone. Run the notebook again into a new folder.")
            model.load_state_dict(read_state_dict(file))
            self.models[fold["name"]] = model.eval()

    def predict(self, data, *, output: str = "values", fold: str | None = None, features_key: str | None = None,
                slide_key: str | None = None) -> Predictions:
        """Predicted expression of the run's target genes for every spot of ``data`` (an AnnData or an .h5ad path)."""
        import anndata

        self.check_output(output)
        self.check_input(data)
        params = self._params()
        features_key = features_key or params.get("features_key", "X_features")
        slide_key = slide_key or params.get("slide_key", "library_id")
        adata = anndata.read_h5ad(data) if isinstance(data, (str, os.PathLike)) else data
        where = Path(data).name if isinstance(data, (str, os.PathLike)) else "the AnnData"
        if "spatial" not in adata.obsm:
            raise PredictError(f"{where} has no obsm['spatial'] (spot coordinates; obsm keys: {list(adata.obsm)}). "
                               "Give a Visium-style .h5ad (scanpy.read_visium / squidpy store them there).")
        if features_key not in adata.obsm:
            raise PredictError(f"{where} has no obsm[{features_key!r}], the spot features the model reads (obsm keys: "
                               f"{list(adata.obsm)}). Compute them as for training, or pass features_key=.")
        features = np.asarray(adata.obsm[features_key], np.float32)
        if features.shape[1] != self.state["n_features"]:
            raise PredictError(f"{where}: obsm[{features_key!r}] has {features.shape[1]} feature columns; the model "
                               f"reads {self.state['n_features']}. Compute the same features as for training.")
        chosen = list(self.models) if fold is None else [str(fold)]
        unknown = [f for f in chosen if f not in self.models]
        if unknown:
            raise PredictError(f"fold={fold!r} is not one of this run's folds ({', '.join(self.models)}).")
        slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key in adata.obs else \
            np.full(adata.n_obs, Path(where).stem, dtype=object).astype(str)
        spots = SpotData(features=features, targets=np.zeros((adata.n_obs, len(self.genes)), np.float32),
                         genes=self.genes, coords=np.asarray(adata.obsm["spatial"], float)[:, :2], slides=slides,
                         spot_ids=adata.obs_names.to_numpy().astype(str), source=where,
                         neighbours=self.state["neighbours"], radius=self.state["radius"])
        folds = {f["name"]: f for f in self.folds}
        values = np.zeros((adata.n_obs, len(self.genes)), dtype=np.float64)
        for name in chosen:
            scaler = Scaler(**{k: np.asarray(v, dtype=np.float32) if "mean" in k or "std" in k else v
                               for k, v in folds[name]["scaler"].items()})
            values += predict(self.models[name], spots, scaler, spots.slide_names)
        values = (values / len(chosen)).astype(np.float32)
        report = AlignmentReport(what="features", n_model=self.state["n_features"], n_data=features.shape[1],
                                 matched=features.shape[1], n_samples=adata.n_obs,
                                 notes=[f"{len(spots.slide_names)} slide(s); " + (
                                     f"the mean of {len(chosen)} fold models" if len(chosen) > 1
                                     else f"the model of fold {chosen[0]}")])
        return _predictions(values, spots.spot_ids, self.genes, report, source=adata)

    def _params(self) -> dict:
        import json

        file = self.path / "params.json"
        return json.loads(file.read_text()) if file.is_file() else {}
