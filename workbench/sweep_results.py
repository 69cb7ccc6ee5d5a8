"""What a sweep leaves behind: its result object and its folder (``results.csv``, ``summary.csv``, ``spec.json``).

:class:`SweepResult` is what :func:`workbench.sweeps.run_sweep` and :func:`workbench.sweeps.collect` return,
and what :func:`load_result` reads back from a sweep folder alone. :mod:`workbench.sweeps` (which writes
the folder), :mod:`workbench.sweep_plots` and :mod:`workbench.report` (which read it) import this module;
it imports none of them, so the three form no circle.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SweepResult", "load_result", "save_spec", "grid_keys_of", "available_metrics", "SPEC_FILE"]

SPEC_FILE = "spec.json"


# --------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Outcome of :func:`~workbench.sweeps.run_sweep`.

    Attributes
    ----------
    name
        The sweep's name.
    path
        The sweep folder (holds ``results.csv``, ``summary.csv``, ``comparison.png`` and the runs).
    results
        One row per run: ``run_id``, ``status`` (ok / failed), ``error``, ``failed_cell``,
        ``seconds``, each parameter, each final metric.
    summary
        One row per setting (grid values without the seed): ``setting``, the grid parameters,
        ``n``, ``n_failed``, and ``<metric>_mean`` / ``<metric>_std`` for each numeric final metric.
    n_failed
        Number of failed runs.
    n_executed
        Runs executed by this call; the others were complete already and were skipped.
    metric
        The metric of the comparison figure (None when no run reported a numeric metric).
    n_stale
        Finished (ok) runs made by an earlier version of the notebook, or by one that recorded no
        version; their results are in ``results``. ``run_sweep(..., rerun_stale=True)`` runs them again.
    """

    name: str
    path: Path
    results: Any
    summary: Any
    n_failed: int
    n_executed: int
    metric: str | None = None
    n_stale: int = 0

    @property
    def n_runs(self) -> int:
        return len(self.results)

    def to_frame(self):
        """The per-run results table (a copy)."""
        return self.results.copy()

    def to_dict(self) -> dict:
        """JSON-ready dict: counts, paths, and both tables as lists of records (NaN -> None)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "n_runs": self.n_runs,
            "n_failed": self.n_failed,
            "n_executed": self.n_executed,
            "n_stale": self.n_stale,
            "metric": self.metric,
            "results": _records(self.results),
            "summary": _records(self.summary),
        }

    def _repr_html_(self) -> str:
        stale = f", {self.n_stale} made by an earlier notebook" if self.n_stale else ""
        head = (f"<b>sweep {html.escape(self.name)}</b>: {self.n_runs} runs, {self.n_failed} failed{stale}, "
                f"{self.n_executed} executed now; <code>{html.escape(str(self.path))}</code>")
        parts = [head, self.summary.to_html(index=False, na_rep="")]
        failed = self.results[self.results["status"] != "ok"]
        if len(failed):
            parts.append("<b>failed runs</b>" + failed[["run_id", "error"]].to_html(index=False))
        return "<br>".join(parts)

    def __repr__(self) -> str:
        return f"SweepResult(name={self.name!r}, n_runs={self.n_runs}, n_failed={self.n_failed}, path='{self.path}')"


def _records(frame) -> list[dict]:
    import pandas as pd

    def plain(value):
        return None if not isinstance(value, (str, list, dict)) and pd.isna(value) else value

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


# --------------------------------------------------------------------------------------------
# a sweep folder
# --------------------------------------------------------------------------------------------


def save_spec(spec) -> Path:
    """Write the spec a sweep ran (``<sweep folder>/spec.json``), so that a report of the folder alone can show it."""
    record = {"name": spec.name, "notebook": str(spec.notebook), "parameters": spec.parameters, "grid": spec.grid,
              "seeds": spec.seeds, "metric": spec.metric, "output_root": str(spec.output_root)}
    path = Path(spec.path) / SPEC_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def load_result(folder: str | os.PathLike):
    """A :class:`~workbench.sweeps.SweepResult` from what a sweep folder holds (``results.csv``, ``summary.csv``).

    The metric comes from ``spec.json`` where the sweep wrote one (older folders have none).
    """
    import pandas as pd

    folder = Path(folder)
    missing = [name for name in ("results.csv", "summary.csv") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no {' or '.join(missing)}: it is not a sweep folder. Pass the folder "
                                "`workbench sweep` wrote (<output_root>/<name>), e.g. runs/sweeps/lr_schedule.")
    results = pd.read_csv(folder / "results.csv")
    summary = pd.read_csv(folder / "summary.csv")
    spec = read_spec(folder)
    result = SweepResult(name=spec.get("name", folder.name), path=folder, results=results, summary=summary,
                         n_failed=int((results["status"] == "failed").sum()), n_executed=0, metric=spec.get("metric"))
    if result.metric is None:  # a folder without spec.json: the workflow's first headline metric
        from .workflow import headline_metrics

        available = available_metrics(result)
        try:
            named = headline_metrics(notebook_of(folder, results))
        except ImportError:
            named = ()
        result.metric = next((m for m in named if m in available), None)
    return result


def read_spec(folder: Path) -> dict:
    """The spec.json a sweep wrote into ``folder`` (:func:`save_spec`); empty when there is none."""
    try:
        return json.loads((folder / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return {}


def notebook_of(folder: Path, results) -> Path | None:
    """The notebook the sweep ran: from spec.json, else from a run's status.json; None when it is gone."""
    candidates = [read_spec(folder).get("notebook")]
    for rid in results["run_id"]:
        try:
            candidates.append(json.loads((folder / rid / "status.json").read_text()).get("notebook"))
            break
        except (OSError, ValueError):
            continue
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------------------------
# reading the tables
# --------------------------------------------------------------------------------------------


def grid_keys_of(result) -> list[str]:
    """The grid parameters of a sweep (without the seed): the summary's columns between ``setting`` and ``n``."""
    columns = list(result.summary.columns)
    if "setting" not in columns or "n" not in columns:
        return []
    return columns[columns.index("setting") + 1: columns.index("n")]


def available_metrics(result) -> list[str]:
    """Numeric final metrics of the sweep, in the summary's order."""
    return [c[: -len("_mean")] for c in result.summary.columns if str(c).endswith("_mean")]


def column_values(frame, column: str | None) -> list:
    """Values of ``column`` in order of first appearance (grid order); missing values left out."""
    if column is None or column not in frame:
        return []
    return list(dict.fromkeys(v for v in frame[column].tolist() if not is_missing(v)))


def is_missing(value) -> bool:
    """None or NaN: a cell of results.csv that holds no value."""
    return value is None or (isinstance(value, float) and math.isnan(value))
