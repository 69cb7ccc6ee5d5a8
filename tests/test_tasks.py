"""workbench.tasks: what every workflow shares (threads, the workflow a notebook names)."""

from pathlib import Path

import torch

from workbench.tasks import headline_metrics, set_threads, workflow_of

ROOT = Path(__file__).resolve().parents[1]


def test_set_threads_follows_the_sweep_workers_variable(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("TORCH_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_each_workflow_notebook_names_its_task_module():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 4
    for notebook in notebooks:
        module = workflow_of(notebook)
        assert module is not None, f"{notebook.name} names no task module in its metadata"
        assert module.__name__.startswith("workbench.tasks.")
        assert module.NOTEBOOK == notebook
        assert headline_metrics(module.NOTEBOOK) == tuple(module.HEADLINE_METRICS) and module.PACKAGES is not None
    assert workflow_of(ROOT / "tests" / "notebooks" / "tiny.ipynb") is None
