"""workbench: fine-tune pretrained models on biological data, in notebooks and in sweeps.

The top-level namespace re-exports the pieces a workflow notebook uses::

    import workbench as wb
    run = wb.Run("runs/x", params=wb.params_of(globals()))
    report = wb.load_pretrained(model, "pretrained.safetensors", run=run)
    wb.apply_strategy(model, "frozen_backbone")
    history = wb.fit(model, loader, epochs=10, learning_rate=1e-3, lr_scheduler_type="cosine", run=run)
    predictions = wb.load_run(run.path).predict("new_cells.h5ad")   # a finished run on new data

Heavy modules (torch, scanpy, papermill) are imported on first use, so ``import workbench``
and the command line stay fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Run": "tracking",
    "params_of": "tracking",
    "new_run_dir": "tracking",
    "RunFolderError": "tracking",
    "unwrap": "transfer",
    "load_pretrained": "transfer",
    "LoadReport": "transfer",
    "LoadError": "transfer",
    "apply_strategy": "transfer",
    "param_groups": "transfer",
    "lr_find": "lr_range",
    "LRFinderResult": "lr_range",
    "fit": "training",
    "place": "devices",
    "to_model": "devices",
    "to_numpy": "devices",
    "History": "training",
    "Callback": "training",
    "EarlyStopping": "training",
    "ModelCheckpoint": "training",
    "GradualUnfreeze": "training",
    "FitSettings": "training",
    "LiveCurves": "live",
    "build_scheduler": "schedules",
    "lr_curve": "schedules",
    "save_weights": "checkpoints",
    "read_state_dict": "checkpoints",
    "CheckpointError": "checkpoints",
    "run_notebook": "execute",
    "run_in_process": "execute",
    "run_workflow": "execute",
    "run_sweep": "sweeps",
    "load_run": "predict",
    "AlignmentReport": "predict",
    "PredictError": "predict",
    "Workflow": "workflow",
    "Param": "workflow",
    "workflows": "workflow",
    "get_workflow": "workflow",
    "workflow_of": "workflow",
}
_SUBMODULES = {"cache", "checkpoints", "distributed", "ema", "lr_range", "transfer", "schedules", "training", "tracking",
               "devices", "metrics", "splits", "plots", "execute", "sweeps", "report", "widgets", "tasks", "cli",
               "predict", "workflow", "protocol", "live"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return __all__
