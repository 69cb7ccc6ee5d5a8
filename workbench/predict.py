"""Use what a run trained: predictions on new data from a run folder.

::

    import workbench as wb
    predictor = wb.load_run("runs/cell_type/20260101-120000-ab12")
    predictions = predictor.predict("new_cells.h5ad")      # AnnData, or a path
    predictions.report                                     # how the input was aligned to the model
    predictions.write("annotated.h5ad")                    # a copy with .obs / .obsm filled
    predictions.write("predictions.csv")                   # or .parquet

or from a shell: ``workbench predict RUN_DIR DATA -o predictions.csv -o annotated.h5ad``.

A run folder is self-contained for prediction. Besides the weights it keeps ``predictor.json``:
the workflow (task module), the workbench and package versions that made it, the weights file
it predicts with, and the preprocessing state of the workflow (gene names and order, class
names, scaler statistics, vocabularies, sample rate...) as plain JSON. Each workflow writes it
at evaluation time (``save_predictor``) and reads it back in its own :class:`Predictor`
subclass, named by the workflow's declaration (``Workflow(predictor=...)``). ``test_predictions.csv`` beside it holds the
run's own predictions on its test samples, in the format :meth:`Predictions.write` gives.

Inputs are aligned to what the model was trained on, and :class:`AlignmentReport` says how:
features matched by name and reordered, missing ones filled (and refused above a stated share),
extra ones ignored, unknown categories mapped to the unknown index, other sample rates
resampled. Each count is in the report; nothing is dropped silently.

Why this module is long: its parts are read together when a workflow adds its own predictor: the alignment of new
inputs and its report, the predictions object and its writers, the :class:`Predictor` base class, and
``predictor.json``, which ``save_predictor`` writes and :func:`load_run` reads back.
"""

from __future__ import annotations

import html
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np

__all__ = [
    "load_run",
    "save_predictor",
    "Predictor",
    "Predictions",
    "AlignmentReport",
    "PredictError",
    "align_names",
    "class_predictions",
    "data_kind",
    "PREDICTOR_FILE",
    "TEST_PREDICTIONS_FILE",
    "MAX_MISSING",
]

#: The file of a run folder that makes it loadable by :func:`load_run`.
PREDICTOR_FILE = "predictor.json"
#: The run's own predictions on its test samples (written at evaluation time).
TEST_PREDICTIONS_FILE = "test_predictions.csv"
#: Version of the predictor.json layout; a newer one is refused with the fix.
FORMAT = 1
#: Default share of the model's features that may be missing from the data (filled with 0) before it is refused.
MAX_MISSING = 0.5
#: Weights of the predictor when the model's weights are not those of ``checkpoints/best.safetensors``.
PREDICTOR_WEIGHTS = "predictor.safetensors"
#: What a table of predictions may be written as.
TABLE_SUFFIXES = (".csv", ".parquet")


class PredictError(ValueError):
    """A run or an input that cannot be predicted with; the one-line message names the fix."""


# --------------------------------------------------------------------------- alignment


@dataclass
class AlignmentReport:
    """How an input was fitted to what the model expects.

    Attributes
    ----------
    what
        What was matched: ``"genes"``, ``"fields"``, ...
    n_model
        Features the model expects.
    n_data
        Features the input has.
    matched
        Model features found in the input.
    missing
        Model features absent from the input (filled with ``fill``).
    extra
        Input features the model does not use (ignored).
    reordered
        The matched features came in another order than the model's.
    max_missing
        The share of missing features above which the input is refused.
    unknown
        ``{field: count}`` of values never seen in training, mapped to the unknown index.
    notes
        Other things done to the input, one line each (resampling, the matrix used...).
    """

    what: str = "features"
    n_model: int = 0
    n_data: int = 0
    matched: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    reordered: bool = False
    max_missing: float = MAX_MISSING
    fill: float = 0.0
    unknown: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    n_samples: int = 0

    @property
    def missing_share(self) -> float:
        return len(self.missing) / self.n_model if self.n_model else 0.0

    def summary(self) -> str:
        parts = [f"{self.matched} of {self.n_model} model {self.what} found in the input"
                 + (" (reordered to the model's order)" if self.reordered else "")] if self.n_model else []
        if self.missing:
            parts.append(f"{len(self.missing)} missing, filled with {self.fill:g} ({self.missing_share:.1%}; "
                         f"refused above {self.max_missing:.0%})")
        if self.extra:
            parts.append(f"{len(self.extra)} extra ignored")
        for name, count in self.unknown.items():
            parts.append(f"{count} unknown {name} mapped to the unknown index")
        line = "; ".join(parts)
        if self.n_samples:
            line = f"{self.n_samples} samples" + (f": {line}" if line else "")
        return "\n".join([line, *self.notes])

    def to_dict(self) -> dict:
        return {
            "what": self.what, "n_samples": self.n_samples, "n_model": self.n_model, "n_data": self.n_data,
            "matched": self.matched, "n_missing": len(self.missing), "n_extra": len(self.extra),
            "missing_share": self.missing_share, "max_missing": self.max_missing, "fill": self.fill,
            "reordered": self.reordered, "missing": list(self.missing), "extra": list(self.extra),
            "unknown": dict(self.unknown), "notes": list(self.notes),
        }

    def to_frame(self):
        """One row per count: matched, missing (filled), extra (ignored), unknown categories per field."""
        import pandas as pd

        def examples(names):
            return ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")

        rows = [
            {"item": f"{self.what} matched", "count": self.matched, "examples": ""},
            {"item": f"{self.what} missing (filled with {self.fill:g})", "count": len(self.missing),
             "examples": examples(self.missing)},
            {"item": f"{self.what} extra (ignored)", "count": len(self.extra), "examples": examples(self.extra)},
        ]
        rows += [{"item": f"unknown {name} (unknown index)", "count": count, "examples": ""}
                 for name, count in self.unknown.items()]
        return pd.DataFrame(rows, columns=["item", "count", "examples"])

    def __repr__(self) -> str:
        return f"AlignmentReport: {self.summary()}"

    def _repr_html_(self) -> str:
        lines = "<br>".join(html.escape(line) for line in self.summary().splitlines())
        return f"<p><b>Input alignment</b>: {lines}</p>" + self.to_frame().to_html(index=False)


def align_names(data_names: Sequence[str], model_names: Sequence[str], *, what: str = "genes",
                max_missing: float = MAX_MISSING, where: str = "the input") -> tuple[np.ndarray, AlignmentReport]:
    """Match the input's feature names to the model's.

    Returns
    -------
    positions
        For each model feature, its column in the input, or -1 where it is missing.
    report
        The counts (:class:`AlignmentReport`).

    Raises
    ------
    PredictError
        When the input shares no name with the model, or misses more than ``max_missing`` of them.
    """
    if not 0 <= max_missing <= 1:
        raise PredictError(f"max_missing={max_missing!r} must be a share in [0, 1], e.g. 0.5.")
    data_names = [str(n) for n in data_names]
    model_names = [str(n) for n in model_names]
    column = {}
    for i, name in enumerate(data_names):
        column.setdefault(name, i)
    positions = np.array([column.get(name, -1) for name in model_names], dtype=np.int64)
    present = positions >= 0
    wanted = set(model_names)
    report = AlignmentReport(
        what=what, n_model=len(model_names), n_data=len(data_names), matched=int(present.sum()),
        missing=[n for n, p in zip(model_names, present) if not p],
        extra=[n for n in data_names if n not in wanted],
        reordered=bool(np.any(np.diff(positions[present]) < 0)), max_missing=max_missing,
    )
    if report.matched == 0:
        raise PredictError(
            f"{where} shares no {what} with the model ({len(data_names)} {what} such as "
            f"{', '.join(data_names[:3]) or 'none'}; the model's are such as {', '.join(model_names[:3])}). "
            f"Give data with the same {what} identifiers the run was trained on (e.g. symbols, not Ensembl IDs).")
    if report.missing_share > max_missing:
        raise PredictError(
            f"{len(report.missing)} of the model's {report.n_model} {what} ({report.missing_share:.1%}) are missing "
            f"from {where}, above the allowed share of {max_missing:.0%}; filling that many with 0 would not give "
            f"trustworthy predictions. Give data measuring these {what}, or raise max_missing "
            f"(--max-missing) if you accept it.")
    return positions, report


# --------------------------------------------------------------------------- what a path holds

#: The kinds of input :func:`data_kind` tells apart, and how a message names them.
DATA_KINDS = {
    "anndata": "AnnData (.h5ad)",
    "recordings": "a folder of recordings (.wav)",
    "table": "a table (.csv / .parquet)",
    "zarr": "a zarr store (.zarr)",
}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def data_kind(path: str | os.PathLike) -> str:
    """What a path holds, by its name and layout: one of ``DATA_KINDS``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    PredictError
        A file in a format no workflow predicts from.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Give the file or folder to predict on.")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return "anndata"
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".csv", ".tsv", ".parquet", ".pq"):
        return "table"
    if suffix in AUDIO_SUFFIXES:
        return "recordings"
    if path.is_dir():
        if next((p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES), None) is not None:
            return "recordings"
        raise PredictError(f"{path} is a folder without recordings ({', '.join(AUDIO_SUFFIXES)}) and not a .zarr "
                           f"store. Give one of: {', '.join(DATA_KINDS.values())}.")
    raise PredictError(f"{path.name} is in an unsupported format ({suffix or 'no suffix'}). Give one of: "
                       f"{', '.join(DATA_KINDS.values())}; convert it first (e.g. adata.write_h5ad, df.to_parquet).")


# --------------------------------------------------------------------------- predictions


class Predictions:
    """Predictions for the samples of one input, with the report of how the input was aligned.

    Attributes
    ----------
    frame
        One row per sample (indexed by its name): ``label`` and ``probability`` (the top class's
        probability) and one ``proba_<class>`` column per class for a classifier; the predicted
        values for a regressor; the embedding's dimensions with ``output="embedding"``.
    report
        :class:`AlignmentReport`.
    output
        ``"probabilities"``, ``"values"`` or ``"embedding"``.
    embedding
        ``samples x dimensions`` (``output="embedding"``), else None.
    """

    def __init__(self, frame, *, report: AlignmentReport, output: str, classes: Sequence[str] = (),
                 embedding: np.ndarray | None = None, source=None, task: str = ""):
        self.frame, self.report, self.output = frame, report, output
        self.classes, self.embedding, self.source, self.task = list(classes), embedding, source, task

    @property
    def probabilities(self) -> np.ndarray:
        return self.frame[[f"proba_{c}" for c in self.classes]].to_numpy()

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.frame)

    def summary(self) -> str:
        what = {"probabilities": f"class probabilities over {len(self.classes)} classes and the label",
                "embedding": f"embeddings of {self.frame.shape[1]} dimensions",
                "values": f"{self.frame.shape[1]} predicted values"}.get(self.output, self.output)
        return f"{len(self)} samples: {what}\n{self.report.summary()}"

    def to_frame(self):
        return self.frame

    def to_dict(self) -> dict:
        out = {"task": self.task, "output": self.output, "samples": len(self), "report": self.report.to_dict()}
        if self.output == "probabilities":
            out["label_counts"] = {str(k): int(v) for k, v in self.frame["label"].value_counts().items()}
        return out

    def __repr__(self) -> str:
        return self.summary() + "\n" + self.frame.head(10).to_string()

    def _repr_html_(self) -> str:
        head = f"<p><b>{html.escape(self.summary().splitlines()[0])}</b></p>"
        return head + self.report._repr_html_() + self.frame.head(20).to_html()

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``.csv`` / ``.parquet`` (the table) or ``.h5ad`` (a copy of the AnnData input, annotated).

        The ``.h5ad`` copy holds the input unchanged plus ``obs["predicted_label"]``,
        ``obs["predicted_probability"]`` and ``obsm["predicted_probabilities"]`` (classes in
        ``uns["predicted_classes"]``), or ``obsm["X_workbench"]`` for embeddings (usable as
        ``sc.pp.neighbors(adata, use_rep="X_workbench")``). A backed input is copied file to file;
        its X is never read into memory.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            self.frame.to_csv(path, index_label=self.frame.index.name or "sample")
        elif suffix == ".parquet":
            self.frame.to_parquet(path)
        elif suffix == ".h5ad":
            if self.source is None or not hasattr(self.source, "obs"):
                raise PredictError(f"{path.name}: an .h5ad copy needs AnnData input; this input was not AnnData. "
                                   f"Write {', '.join(TABLE_SUFFIXES)} instead.")
            _write_annotated(self, path)
        else:
            raise PredictError(f"-o {path}: predictions are written as .csv, .parquet or (for AnnData input) .h5ad; "
                               f"{suffix or 'no suffix'} is none of them.")
        return path


def class_predictions(proba: np.ndarray, names: Sequence, classes: Sequence[str], report: AlignmentReport, *,
                      index_name: str = "sample", source=None, task: str = "") -> Predictions:
    """:class:`Predictions` of a classifier: ``label``, ``probability`` (the top class's) and ``proba_<class>``."""
    import pandas as pd

    proba = np.asarray(proba)
    frame = pd.DataFrame(proba, index=pd.Index(list(names), name=index_name), columns=[f"proba_{c}" for c in classes])
    top = proba.argmax(1) if len(proba) else np.zeros(0, dtype=np.int64)
    frame.insert(0, "probability", proba[np.arange(len(proba)), top])
    frame.insert(0, "label", np.asarray(classes, dtype=object)[top])
    return Predictions(frame, report=report, output="probabilities", classes=classes, source=source, task=task)


def _annotations(predictions: Predictions) -> tuple[dict, dict, dict]:
    """``obs`` columns, ``obsm`` arrays and ``uns`` entries the predictions add to an AnnData."""
    if predictions.output == "embedding":
        return {}, {"X_workbench": np.asarray(predictions.embedding, dtype=np.float32)}, {}
    frame = predictions.frame
    if predictions.output == "probabilities":
        import pandas as pd

        obs = {"predicted_label": pd.Categorical(frame["label"].astype(str), categories=predictions.classes),
               "predicted_probability": frame["probability"].to_numpy(np.float32)}
        return obs, {"predicted_probabilities": predictions.probabilities.astype(np.float32)}, \
            {"predicted_classes": list(predictions.classes)}
    return {}, {"predicted_values": frame.to_numpy(np.float32)}, {"predicted_value_names": list(frame.columns)}


def _write_annotated(predictions: Predictions, path: Path) -> None:
    import shutil

    from .checkpoints import atomic_write

    adata = predictions.source
    obs_cols, obsm, uns = _annotations(predictions)
    if len(predictions) != adata.n_obs:
        raise PredictError(f"{len(predictions)} predictions for {adata.n_obs} cells; write a table instead.")
    if not adata.isbacked:
        copy = adata.copy()
        for name, values in obs_cols.items():
            copy.obs[name] = values
        copy.obsm.update(obsm)
        copy.uns.update(uns)
        atomic_write(path, lambda tmp: copy.write_h5ad(tmp))
        return
    import h5py
    from anndata.io import read_elem, write_elem

    def annotate(tmp: str) -> None:
        shutil.copyfile(adata.filename, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = read_elem(f["obs"])
            for name, values in obs_cols.items():
                obs[name] = values
            write_elem(f, "obs", obs)
            for name, values in obsm.items():
                write_elem(f, f"obsm/{name}", values)
            for name, values in uns.items():
                write_elem(f, f"uns/{name}", np.asarray(values, dtype=object) if isinstance(values, list) else values)

    atomic_write(path, annotate)


# --------------------------------------------------------------------------- the run folder


class Predictor:
    """A trained model with the preprocessing state of its run: predicts on new data.

    Made by :func:`load_run`; each workflow subclasses it (named by its ``Workflow(predictor=...)``) and
    implements ``predict`` for its own formats.

    Attributes
    ----------
    path
        The run folder.
    record
        ``predictor.json``: ``task``, ``workbench_version``, ``versions``, ``weights``, ``state``.
    version_differences
        ``{package: (version that made the run, version now)}`` where they differ.
    """

    #: The input kinds (``DATA_KINDS``) this workflow predicts from.
    accepts: tuple[str, ...] = ()
    #: What ``output=`` may be.
    outputs: tuple[str, ...] = ("probabilities",)

    def __init__(self, path: Path, record: dict):
        self.path = Path(path)
        self.record = record
        self.state = record.get("state", {})
        self.task = record.get("task", "")
        self.version_differences = versions_differ(record.get("versions", {}))
        self.setup(self.state)

    def setup(self, state: dict) -> None:
        """Rebuild what predicting needs from the run's saved ``state`` (the model, the genes, the classes, ...).

        Each workflow's predictor overrides it; ``self.load_weights(model)`` loads the run's weights into the model.
        """

    @property
    def weights_path(self) -> Path:
        return self.path / self.record.get("weights", PREDICTOR_WEIGHTS)

    def load_weights(self, model):
        """Load the run's weights into ``model`` (every key must fit); returns the model in eval mode."""
        from .checkpoints import read_state_dict

        if not self.weights_path.is_file():
            raise PredictError(f"{self.path} names {self.record.get('weights')} as its weights, but the file is gone. "
                               "Run the notebook again into this folder to write it.")
        model.load_state_dict(read_state_dict(self.weights_path))
        return model.eval()

    def check_output(self, output: str) -> None:
        if output not in self.outputs:
            raise PredictError(f"output={output!r} is not one of {', '.join(self.outputs)} for this workflow.")

    def check_input(self, data) -> str | None:
        """The kind of a path input, refused with the fix when this workflow does not predict from it."""
        if not isinstance(data, (str, os.PathLike)):
            return None
        kind = data_kind(data)
        if kind not in self.accepts:
            accepted = " or ".join(DATA_KINDS[k] for k in self.accepts)
            raise PredictError(
                f"{Path(data).name} is {DATA_KINDS[kind]}, but {self.path.name} is a run of {self.task}, which "
                f"predicts from {accepted}. Pass data of that workflow, or a run folder of the workflow this data "
                "belongs to.")
        return kind

    def predict(self, data, *, output: str = "probabilities", **options) -> Predictions:
        raise NotImplementedError

    def summary(self) -> str:
        made = self.record.get("workbench_version", "?")
        line = f"{self.task} run {self.path} (made by workbench {made})"
        if self.version_differences:
            line += "\n" + version_note(self.version_differences)
        return line

    def __repr__(self) -> str:
        return f"{type(self).__name__}: {self.summary()}"

    def _repr_html_(self) -> str:
        return "<p>" + "<br>".join(html.escape(x) for x in self.summary().splitlines()) + "</p>"

    def to_dict(self) -> dict:
        return {"path": str(self.path), **{k: v for k, v in self.record.items() if k != "state"},
                "version_differences": {k: list(v) for k, v in self.version_differences.items()}}


def versions_differ(recorded: Mapping) -> dict[str, tuple[str, str]]:
    """``{package: (recorded, now)}`` for the packages a run recorded whose versions differ now."""
    from .tracking import package_versions

    now = package_versions([k for k in recorded if k != "python"])
    return {k: (str(v), now.get(k, "not installed")) for k, v in recorded.items() if str(now.get(k)) != str(v)}


def version_note(differences: Mapping) -> str:
    shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differences.items())
    return (f"versions differ from those that made the run: {shown}. Predictions may differ slightly from the run's "
            "own; compare with its test_predictions.csv, or retrain with these versions.")


def save_predictor(run, model, *, task: str, state: Mapping, test_predictions=None,
                   weights: str | None = None) -> Path | None:
    """Make ``run``'s folder loadable by :func:`load_run`: write ``predictor.json`` (and the test predictions).

    The weights are those of ``checkpoints/best.safetensors`` when ``model`` holds exactly them
    (the usual case: ``fit(..., restore_best=True)``); otherwise the model's weights are written
    to ``predictor.safetensors``.

    Parameters
    ----------
    run
        The :class:`workbench.Run` (None: nothing is written).
    model
        The model as evaluated.
    task
        The task module's name (``__name__``), which :func:`load_run` imports.
    state
        The workflow's preprocessing state and model settings, as plain JSON values.
    test_predictions
        :class:`Predictions` of the run's test samples, written to ``test_predictions.csv``.
    weights
        Where the workflow saved the weights itself (relative to the run folder, e.g. an adapters
        folder with its base); ``model`` is then not written.
    """
    if run is None or not getattr(run, "writes", True):
        return None
    from . import __version__
    from .checkpoints import read_state_dict, save_weights
    from .tracking import package_versions
    from .transfer import unwrap

    best = run.checkpoints / "best.safetensors"
    if weights is None:
        model = unwrap(model)
        weights = PREDICTOR_WEIGHTS
    if weights == PREDICTOR_WEIGHTS and best.is_file():
        saved, current = read_state_dict(best), model.state_dict()
        if saved.keys() == current.keys() and all(saved[k].shape == current[k].shape
                                                   and torch_equal(saved[k], current[k]) for k in saved):
            weights = "checkpoints/best.safetensors"
    if weights == PREDICTOR_WEIGHTS:  # a copy: the weights the model holds are not those of best.safetensors
        save_weights(model, run.path / PREDICTOR_WEIGHTS)
    params = run.path / "params.json"
    recorded = json.loads(params.read_text()).get("versions", {}) if params.is_file() else {}
    record = {"format": FORMAT, "task": task, "workbench_version": __version__,
              "versions": recorded or package_versions(), "weights": weights, "state": dict(state)}
    if test_predictions is not None:
        test_predictions.write(run.path / TEST_PREDICTIONS_FILE)
    return run.save_json(PREDICTOR_FILE, record)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))


def load_run(run_dir: str | os.PathLike) -> Predictor:
    """The predictor of a run folder: its model with its weights and preprocessing state.

    Raises
    ------
    PredictError
        The folder is not a run, or a run made before runs were saved for prediction, or by a
        newer workbench. Each message names the fix.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder. Give the run folder that `workbench run` or the notebook "
                                "wrote (its output_dir, e.g. runs/cell_type/20260101-120000-ab12).")
    file = path / PREDICTOR_FILE
    if not file.is_file():
        if (path / "params.json").is_file():
            raise PredictError(
                f"{path} holds a run but no {PREDICTOR_FILE}: it did not finish, or an older workbench made it. "
                "Run its notebook again into a new folder with the same parameters (workbench run NOTEBOOK -p ... "
                "-o NEW_DIR), then predict with that folder.")
        raise PredictError(f"{path} is not a run folder (no {PREDICTOR_FILE}, no params.json). Give the folder a run "
                           "wrote, e.g. runs/cell_type/20260101-120000-ab12 (the notebook prints it as 'run folder').")
    try:
        record = json.loads(file.read_text())
    except ValueError as err:
        raise PredictError(f"{file} is not valid JSON ({err}). Run the notebook again to rewrite it.") from None
    if int(record.get("format", 0)) > FORMAT:
        raise PredictError(f"{path} was saved by a newer workbench ({record.get('workbench_version')}, predictor "
                           f"format {record.get('format')}); upgrade workbench (pip install -U workbench) to use it.")
    try:
        module = import_module(record["task"])
        workflow = getattr(module, "WORKFLOW", None)  # the declaration names its predictor (workbench.workflow)
        cls = workflow.predictor_class() if workflow is not None and workflow.predictor else module.PREDICTOR
        if cls is None:
            raise AttributeError(record["task"])
    except (KeyError, ImportError, AttributeError):
        raise PredictError(f"{file} names the workflow {record.get('task')!r}, which this workbench does not have "
                           "(or which cannot predict). Use the workbench version that made the run.") from None
    predictor = cls(path, record)
    if predictor.version_differences:
        warnings.warn(version_note(predictor.version_differences), stacklevel=2)
    return predictor
