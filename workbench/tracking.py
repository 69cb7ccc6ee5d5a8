"""The run folder, and where metrics go.

Every run writes a self-describing folder::

    <output_dir>/
        params.json          all parameters after defaults, plus package versions
        metrics.jsonl        one JSON object per epoch (always written, tracker or not)
        final_metrics.json   flat {name: number}
        train.log            what happened, as text: fit's settings, schedule, freezing, one line per epoch
                             (losses, metrics, every group's LR), and the lines a workflow adds (Run.log_text)
        fit_settings.json    the settings the run's (last) fit trained with (workbench.FitSettings, plus the
                             derived batch_size, steps_per_epoch, world_size, device)
        load_report.json     what the pretrained checkpoint filled
        checkpoints/         best.safetensors, last.pt (resume state)
        predictor.json       what predicting on new data needs (workbench.load_run, ``workbench predict``)
        test_predictions.csv the run's own predictions on its test samples
        figures/*.png

``tracker="wandb"`` mirrors metrics to Weights & Biases, in offline mode unless the user set
``WANDB_MODE`` (so nothing leaves the machine by default); when wandb is not installed a
message says so and training continues with the local files. ``Run.watch(model)`` asks the
trackers to log gradient histograms (``wandb.watch``); with no tracker that can, it says so once
and returns False.

A folder holds exactly one run. ``Run(folder, params=...)`` on a folder that already holds a run:

* with other parameters: refuses (:class:`RunFolderError`, one line naming the folder, the
  parameters that differ and the ways out: another ``output_dir``, or ``overwrite=True``); the
  earlier run is left as it was;
* with the same parameters: starts that run again from a clean folder, or continues it with
  ``resume=True`` (``fit(..., resume=True)`` then picks up ``checkpoints/last.pt``).

``new_run_dir(root)`` gives a fresh dated folder, so that a notebook run with the default
``output_dir=""`` never lands on an earlier run.

Under torchrun (several processes), only rank 0 touches the folder: on other ranks ``Run``
neither checks nor creates it, and every method that writes does nothing, so the same code runs
unchanged on every rank.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from .checkpoints import atomic_write

__all__ = ["Run", "RunFolderError", "params_of", "package_versions", "new_run_dir", "process_rank", "CORE_PACKAGES"]

_JSON_TYPES = (str, int, float, bool, type(None), list, tuple, dict)
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
TRACKERS = ("none", "wandb")
#: Packages whose versions every params.json records; a workflow adds its own (``Run(packages=...)``).
CORE_PACKAGES = ("workbench", "torch", "numpy", "scikit-learn", "papermill", "wandb")
#: Parameters that say where a run goes or how it is shown, not what it computes: not compared between runs.
NOT_COMPARED = ("output_dir", "interactive", "versions")
#: What a run writes into its folder; only these are removed when a run starts again.
RUN_ARTIFACTS = ("params.json", "metrics.jsonl", "final_metrics.json", "load_report.json", "status.json",
                 "train.log", "fit_settings.json", "checkpoints", "figures", "pretrain", "wandb", ".wandb-cache",
                 "predictor.json", "predictor.safetensors", "test_predictions.csv")  # the last: workbench.predict


class RunFolderError(ValueError):
    """The run folder already holds a different run; the message names what differs and the way out."""


def params_of(namespace: Mapping) -> dict:
    """The notebook's parameters: the plain-valued, public names of ``namespace``.

    Call it right after the parameters cell (``wb.params_of(globals())``): at that point the
    namespace holds just the parameters (including any papermill injected).
    """
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in namespace.items()
        if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _JSON_TYPES)
    }


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of Python, the core packages and ``extra`` (a workflow's own, e.g. ``("anndata",)``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in dict.fromkeys((*CORE_PACKAGES, *extra)):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True)


def process_rank() -> int:
    """This process's rank under torch.distributed / torchrun (``RANK``), 0 otherwise."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def new_run_dir(root: str | os.PathLike = "runs", *, label: str = "") -> Path:
    """A run folder that does not exist yet: ``<root>/<YYYYmmdd-HHMMSS>[-label]-<4 hex>``.

    The notebooks use it when ``output_dir`` is empty, so Run All after changing a parameter
    starts a new run instead of landing on the previous one.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    while True:
        name = "-".join(part for part in (stamp, label, secrets.token_hex(2)) if part)
        path = Path(root) / name
        if not path.exists():
            return path


def _comparable(params: Mapping) -> dict:
    """Parameters as JSON would hold them, without the ones that only say where the run goes."""
    return json.loads(_dump({k: v for k, v in params.items() if k not in NOT_COMPARED}))


def params_differ(recorded: Mapping, wanted: Mapping) -> dict[str, tuple]:
    """``{name: (recorded value, wanted value)}`` for every parameter both name with different values.

    A name only one side holds is not compared: a notebook may record fewer parameters than it
    declares, and a parameter added later had its default before it was declared.
    """
    a, b = _comparable(recorded), _comparable(wanted)
    return {key: (a[key], b[key]) for key in sorted(set(a) & set(b)) if a[key] != b[key]}


def check_run_folder(path: str | os.PathLike, params: Mapping) -> str:
    """What starting a run with ``params`` in ``path`` means: ``"new"``, ``"same"`` or raises.

    ``"new"``: the folder holds no run. ``"same"``: it holds a run with equal parameters.

    Raises
    ------
    RunFolderError
        When the folder holds a run with other parameters, or a run whose parameters were not
        recorded (metrics or checkpoints without params.json).
    """
    path = Path(path)
    recorded_file = path / "params.json"
    if recorded_file.is_file():
        try:
            recorded = json.loads(recorded_file.read_text())
        except ValueError:
            recorded = None
        if isinstance(recorded, dict):
            differ = params_differ(recorded, params)
            if not differ:
                return "same"
            shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(differ.items())[:6])
            more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
            raise RunFolderError(
                f"{path} already holds another run ({shown}{more}). It is left as it is. Give another "
                "output_dir (an empty output_dir makes a new dated folder), or pass overwrite=True to replace it."
            )
    leftovers = [name for name in ("metrics.jsonl", "final_metrics.json", "load_report.json", "checkpoints", "pretrain")
                 if (path / name).is_file() or ((path / name).is_dir() and any((path / name).iterdir()))]
    if leftovers or recorded_file.exists():
        raise RunFolderError(
            f"{path} holds run files ({', '.join(leftovers or ['params.json'])}) but no readable params.json, so "
            "it cannot tell which run made them. It is left as it is. Give another output_dir, or pass "
            "overwrite=True to replace them."
        )
    return "new"


def clear_run_folder(path: str | os.PathLike) -> None:
    """Remove what a run wrote into ``path`` (only the files a run writes; nothing else)."""
    path = Path(path)
    for name in RUN_ARTIFACTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for stale in path.glob(".*.tmp"):  # temporary files of an interrupted atomic write
        stale.unlink(missing_ok=True)


class Run:
    """One run's folder, its parameters and its metric stream.

    Parameters
    ----------
    output_dir
        The run folder; created with parents. ``""`` or None makes a new dated folder under
        ``runs/`` (see :func:`new_run_dir`).
    params
        Parameters to record in ``params.json`` (typically ``params_of(globals())``). They
        identify the run: a folder that holds a run with other parameters is refused.
    tracker
        ``"none"`` (local files only) or ``"wandb"``.
    project, group, job_type
        Passed to ``wandb.init``; sweeps set ``group`` to the sweep name.
    packages
        Packages besides the core ones whose versions ``params.json`` records (a workflow's own).
    resume
        Keep what an earlier run with the same parameters left (``fit(..., resume=True)``
        continues from its ``checkpoints/last.pt``). Without it, a run with the same
        parameters starts again from a clean folder.
    overwrite
        Replace a run with other parameters instead of refusing.

    Attributes
    ----------
    state
        ``"new"`` (empty folder), ``"restarted"`` (same parameters, earlier files removed),
        ``"resumed"`` (same parameters, kept) or ``"overwritten"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        *,
        params: Mapping | None = None,
        tracker: str = "none",
        project: str = "workbench",
        group: str | None = None,
        job_type: str | None = None,
        packages: Iterable[str] = (),
        resume: bool = False,
        overwrite: bool = False,
    ):
        if tracker not in TRACKERS:
            raise ValueError(f"tracker={tracker!r} is not one of {TRACKERS}. Use 'none' for local files only.")
        self.path = Path(output_dir) if output_dir else new_run_dir("runs")
        self.params = dict(params or {})
        self.resume = resume
        self.checkpoints = self.path / "checkpoints"
        self._wandb = None
        self._said_no_watch = False
        self.writes = process_rank() == 0  # under torchrun, rank 0 alone writes the run folder
        if not self.writes:
            self.state = "not written on this rank"
            return
        try:
            found = check_run_folder(self.path, self.params)
        except RunFolderError:
            if not overwrite:
                raise
            found = "overwritten"
        if found in ("same", "overwritten") and not (resume and found == "same"):
            clear_run_folder(self.path)
        self.state = {"new": "new", "same": "resumed" if resume else "restarted"}.get(found, found)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.save_json("params.json", {**self.params, "versions": package_versions(packages)})
        if tracker == "wandb":
            self._wandb = _start_wandb(self, project=project, group=group, job_type=job_type)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.state})"

    def _repr_html_(self) -> str:
        import html

        return f"<p>run folder <code>{html.escape(str(self.path))}</code> ({self.state})</p>"

    # ---- files
    def save_json(self, name: str, obj) -> Path:
        if not self.writes:
            return self.path / name
        text = _dump(obj)
        return atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    def save_load_report(self, report) -> Path:
        return self.save_json("load_report.json", report.to_dict())

    def save_figure(self, fig, name: str) -> Path:
        path = self.path / "figures" / (name if name.endswith(".png") else f"{name}.png")
        if self.writes:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return path

    def log(self, row: Mapping) -> None:
        """Append one row (an epoch) to metrics.jsonl and to wandb when enabled."""
        row = dict(row)
        if not self.writes:
            return
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def log_text(self, text: str) -> None:
        """Append ``text`` to ``train.log`` in the run folder, one timestamped line per line of text.

        :func:`workbench.fit` writes its settings, schedule, freezing and one line per epoch there; a
        workflow adds its own lines (what loading did, a pretraining step) the same way.
        """
        if not self.writes:
            return
        stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
        lines = "".join(f"{stamp} {line}\n" for line in str(text).splitlines() or [""])
        with open(self.path / "train.log", "a") as fh:
            fh.write(lines)

    def watch(self, model, *, log: str = "gradients", log_freq: int = 50) -> bool:
        """Ask the trackers to watch ``model``: gradient (``log="gradients"``), parameter (``"parameters"``) or
        both (``"all"``) histograms every ``log_freq`` steps, through ``wandb.watch``.

        Returns True when a tracker watches it. Without one (``tracker="none"``, or wandb not installed)
        it says so once per run (a warning and a ``train.log`` line) and returns False; on ranks other
        than 0 it does nothing and returns False.
        """
        if log not in ("gradients", "parameters", "all"):
            raise ValueError(f"log={log!r} is not one of 'gradients', 'parameters', 'all'.")
        if not self.writes:
            return False
        if self._wandb is None:
            if not self._said_no_watch:
                self._said_no_watch = True
                message = ("Run.watch: no tracker can watch the model (tracker='none', or wandb not installed), so "
                           "no gradient histograms are logged. Open the run with tracker='wandb' to get them.")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.log_text(message)
            return False
        self._wandb.watch(model, log=log, log_freq=log_freq)
        return True

    def rewrite_metrics(self, rows) -> None:
        """Replace metrics.jsonl with ``rows`` (used on resume; wandb is not rewound)."""
        if not self.writes:
            return
        text = "".join(json.dumps(dict(r), default=_json_default) + "\n" for r in rows)
        atomic_write(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def finish(self, final_metrics: Mapping | None = None) -> dict:
        """Write final_metrics.json (flat name -> number) and close the tracker."""
        flat = {}
        for k, v in dict(final_metrics or {}).items():
            v = v.item() if hasattr(v, "item") else v
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"final metric {k!r} is {v!r}; final_metrics.json holds numbers only.")
            flat[k] = v
        if final_metrics is not None:
            self.save_json("final_metrics.json", flat)  # a no-op on ranks other than 0
        if self._wandb is not None:
            self._wandb.summary.update(flat)
            self._wandb.finish()
            self._wandb = None
        return flat


def _start_wandb(run: Run, *, project: str, group: str | None, job_type: str | None):
    try:
        import wandb
    except ImportError:
        warnings.warn(
            "tracker='wandb' but wandb is not installed; metrics go to metrics.jsonl only. "
            "Install it with `pip install wandb` to mirror them to Weights & Biases.",
            stacklevel=3,
        )
        return None
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CACHE_DIR", str(run.path / ".wandb-cache"))
    return wandb.init(
        project=project,
        dir=str(run.path),
        config=run.params,
        group=group,
        job_type=job_type,
        name=run.path.name,
        reinit="finish_previous",
    )
