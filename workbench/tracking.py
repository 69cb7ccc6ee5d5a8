"""The run folder, and where metrics go.

Every run writes a self-describing folder::

    <output_dir>/
        params.json          all parameters after defaults, plus package versions
        metrics.jsonl        one JSON object per epoch (always written, tracker or not)
        final_metrics.json   flat {name: number}
        load_report.json     what the pretrained checkpoint filled
        checkpoints/         best.safetensors, last.pt (resume state)
        figures/*.png

``tracker="wandb"`` mirrors metrics to Weights & Biases, in offline mode unless the user set
``WANDB_MODE`` (so nothing leaves the machine by default); when wandb is not installed a
message says so and training continues with the local files.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

from .checkpoints import atomic_write

__all__ = ["Run", "params_of", "package_versions"]

_JSON_TYPES = (str, int, float, bool, type(None), list, tuple, dict)
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
TRACKERS = ("none", "wandb")


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


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("workbench", "torch", "numpy", "scikit-learn", "scanpy", "anndata", "papermill", "wandb"):
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


class Run:
    """One run's folder, its parameters and its metric stream.

    Parameters
    ----------
    output_dir
        The run folder; created with parents.
    params
        Parameters to record in ``params.json`` (typically ``params_of(globals())``).
    tracker
        ``"none"`` (local files only) or ``"wandb"``.
    project, group, job_type
        Passed to ``wandb.init``; sweeps set ``group`` to the sweep name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        params: Mapping | None = None,
        tracker: str = "none",
        project: str = "workbench",
        group: str | None = None,
        job_type: str | None = None,
    ):
        if tracker not in TRACKERS:
            raise ValueError(f"tracker={tracker!r} is not one of {TRACKERS}. Use 'none' for local files only.")
        self.path = Path(output_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        self.params = dict(params or {})
        self.save_json("params.json", {**self.params, "versions": package_versions()})
        self._wandb = None
        if tracker == "wandb":
            self._wandb = _start_wandb(self, project=project, group=group, job_type=job_type)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ---- files
    def save_json(self, name: str, obj) -> Path:
        text = _dump(obj)
        return atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    def save_load_report(self, report) -> Path:
        return self.save_json("load_report.json", report.to_dict())

    def save_figure(self, fig, name: str) -> Path:
        path = self.path / "figures" / (name if name.endswith(".png") else f"{name}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return path

    def log(self, row: Mapping) -> None:
        """Append one row (an epoch) to metrics.jsonl and to wandb when enabled."""
        row = dict(row)
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def rewrite_metrics(self, rows) -> None:
        """Replace metrics.jsonl with ``rows`` (used on resume; wandb is not rewound)."""
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
            self.save_json("final_metrics.json", flat)
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
