"""The built-in workflows, one package each: its data, its model, its pretraining objective, its baseline.

- :mod:`workbench.tasks.cell_type`: cell-type annotation from single-cell expression.
- :mod:`workbench.tasks.regulatory`: expression under new experimental conditions, LoRA against full fine-tuning.
- :mod:`workbench.tasks.heart_sound`: phonocardiograms, contrastive pretraining; linear eval, few-shot, full.
- :mod:`workbench.tasks.event_sequence`: client event sequences, CoLES encoders from pytorch-lifestream.
- :mod:`workbench.tasks.spatial_transfer`: a bulk-trained expression model moved to a spatial gene panel.

Each declares itself once as a :class:`workbench.workflow.Workflow` (``WORKFLOW``), registered under the entry-point
group ``workbench.workflows`` in workbench's ``pyproject.toml``, exactly as a lab's own package registers its
workflows; the core finds them through :mod:`workbench.workflow` and never names one. No task imports another.
"""

from __future__ import annotations

from ..workflow import set_threads  # noqa: F401 - the notebooks call <task>.set_threads()

__all__ = ["set_threads"]
