"""One module per workflow: its data, its model and its pretraining objective.

- :mod:`workbench.tasks.cell_type`: cell-type annotation from single-cell expression.
- :mod:`workbench.tasks.regulatory`: expression under new experimental conditions, LoRA against full fine-tuning.
- :mod:`workbench.tasks.heart_sound`: phonocardiograms, contrastive pretraining; linear eval, few-shot, full.
- :mod:`workbench.tasks.event_sequence`: client event sequences, CoLES encoders from pytorch-lifestream.
- :mod:`workbench.tasks.spatial_transfer`: a bulk-trained expression model moved to a spatial gene panel.

A workflow module declares what the core needs to know about it, so the core never names a
workflow's metrics or packages itself:

``NOTEBOOK``
    its notebook; the notebook names the module back in its metadata
    (``{"workbench": {"task": "workbench.tasks.cell_type"}}``), read by :func:`workflow_of`;
``HEADLINE_METRICS``
    the final metrics a terminal summary and the panel's sweep export show first;
``PACKAGES``
    packages besides the core ones whose versions each run records;
``PARAMETERS``
    what each notebook parameter accepts (:class:`workbench.params.Spec`), checked before any work;
``run_workflow(params, *, callbacks=())``
    its notebook's steps, in this process (the widget panel's Train button).
"""

from __future__ import annotations

import json
import os
from importlib import import_module
from pathlib import Path
from types import ModuleType

__all__ = ["workflow_of", "headline_metrics", "set_threads"]


def workflow_of(notebook: str | os.PathLike | None) -> ModuleType | None:
    """The task module a notebook names in its metadata (``workbench.task``), or None."""
    if notebook is None:
        return None
    try:
        name = json.loads(Path(notebook).read_text())["metadata"]["workbench"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return import_module(name)


def headline_metrics(notebook: str | os.PathLike | None) -> tuple[str, ...]:
    """The ``HEADLINE_METRICS`` of the notebook's workflow; empty when it names none."""
    module = workflow_of(notebook)
    return tuple(getattr(module, "HEADLINE_METRICS", ())) if module is not None else ()


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch threads (default: ``$TORCH_NUM_THREADS``, which sweep workers set).

    A workflow notebook calls it first, so that parallel sweep runs share the cores instead of
    each starting one thread per core. The BLAS and OpenMP pools (numpy's and torch's OpenBLAS, which
    ``torch.set_num_threads`` does not govern) get the same number: a matrix product's summation order
    depends on its thread count, so a run's figures would otherwise depend on what the process did
    before (a pytest worker, a kernel) rather than on its parameters.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = threads or int(os.environ.get("TORCH_NUM_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # pools loaded later (scipy's, with scikit-learn) read these when they load
    threadpool_limits(limits=threads)  # pools loaded already; process-wide, not a context: it lasts for the run
    return threads
