"""A workflow, declared once: its parameters, its notebook, its headline metrics; and the registry that finds it.

Each workflow declares a :class:`Workflow` (by convention ``WORKFLOW`` in its package) and registers it under the
entry-point group ``workbench.workflows``; the built-in five do so in workbench's own ``pyproject.toml``, and a lab's
package does the same in its own::

    [project.entry-points."workbench.workflows"]
    my_assay = "my_lab_workflows.my_assay:WORKFLOW"

Everything else derives from the declaration, so it cannot drift:

- the notebook's parameters cell (:meth:`Workflow.parameters_cell`; a test holds each notebook's cell equal to it);
- the checks before any work (:attr:`Workflow.spec`; ``workbench run`` and ``workbench sweep`` before a kernel starts,
  the notebook's second cell for interactive edits);
- the widget panel's fields and their options (:meth:`Workflow.options`);
- ``workbench run NOTEBOOK --help`` (:meth:`Workflow.help`);
- the run's ``params.json`` (the checked values, in declared order).

Running one in this process (the panel's Train button, tests) is :func:`workbench.execute.run_workflow`.

The notebook names its workflow in its metadata (``{"workbench": {"workflow": "cell_type"}}``); :func:`workflow_of`
reads it.

**One vocabulary.** A concept has one name in every workflow, and the core's functions take the same names. The
names below (:data:`SHARED`) carry their meaning, type and constraint with them: a workflow that declares one gives
its own default (and may narrow the options of a choice or reword the help), never another meaning. The run-level
parameters (:data:`RUN_PARAMETERS`: ``seed``, ``output_dir``, ``tracker``, ``device``, ``dtype``, ``interactive``)
are added to every workflow that does not declare them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from .params import Choice, Constraint, Flag, Integer, ParameterError, Real, Spec, Text

__all__ = ["Param", "Workflow", "SHARED", "RUN_PARAMETERS", "SYNONYMS", "ENTRY_POINT_GROUP", "workflows",
           "get_workflow", "workflow_of", "spec_of", "headline_metrics", "set_threads"]

#: The entry-point group under which packages register their workflows (``name = "package.module:WORKFLOW"``).
ENTRY_POINT_GROUP = "workbench.workflows"

_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its default (whose type is the parameter's type), a one-line help, what it accepts.

    ``help`` and ``accepts`` may be left out for a name in :data:`SHARED`: the shared meaning fills them in.
    """

    default: Any
    help: str = ""
    accepts: Constraint | None = None

    def __post_init__(self):
        if type(self.default) not in _TYPES:
            raise TypeError(f"Param(default={self.default!r}): a notebook parameter's default is a bool, int, float "
                            f"or str (a list or mapping goes in as a comma-separated or JSON string).")

    @property
    def type(self) -> type:
        return type(self.default)

    def line(self, name: str) -> str:
        """This parameter's line in the notebook's parameters cell: ``name: type = default  # help``."""
        return f"{name}: {self.type.__name__} = {_literal(self.default)}  # {self.help}"


def _literal(value) -> str:
    if isinstance(value, float):
        if value and math.isfinite(value) and (abs(value) < 0.05 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:e}".split("e")  # 0.001 -> 1.0e-3: YAML and papermill read it as a float
            mantissa = f"{float(mantissa):.6g}"
            return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent)}"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _options(constraint: Constraint | None) -> tuple:
    return constraint.options if isinstance(constraint, Choice) else ()


#: What ``device`` accepts: auto, cpu, cuda, cuda:N (see :mod:`workbench.devices`).
def _device_constraint() -> Constraint:
    from .devices import DeviceName

    return DeviceName()


#: Names with one meaning across workflows. A workflow declaring one of them gives its default; help and constraint
#: come from here unless it words them for its data (same concept, e.g. "cells" for "samples").
SHARED: dict[str, Param] = {
    # data and split
    "data_path": Param("", "input file or folder; empty means the bundled or simulated data", Text()),
    "label_fraction": Param(1.0, "share of the labelled training samples whose labels are used", Real(gt=0, le=1)),
    "val_fraction": Param(0.1, "share of the labelled training samples held out for validation (picks the best "
                               "epoch)", Real(ge=0, lt=1)),
    "test_size": Param(0.2, "held-out test share", Real(gt=0, lt=1)),
    # pretraining
    "pretrained_checkpoint": Param("pretrain", "pretrain (here, cached) | none (from scratch) | a checkpoint path",
                                   Choice("pretrain", "none", or_path=True)),
    "pretrain_epochs": Param(20, "pretraining epochs (pretrained_checkpoint pretrain)", Integer(ge=1)),
    "trust_pickle": Param(False, "allow a pickle checkpoint with Python objects (only for files you trust)", Flag()),
    # fine-tuning (the names of workbench.fit's settings)
    "strategy": Param("full", "which weights train: full | frozen_backbone | linear_probe", Text(nonempty=True)),
    "epochs": Param(20, "fine-tuning epochs", Integer(ge=1)),
    "learning_rate": Param(1.0e-3, "peak learning rate (of the head)", Real(gt=0)),
    "backbone_lr_ratio": Param(1.0, "backbone (encoder) learning rate as a multiple of learning_rate", Real(ge=0)),
    "freeze_epochs": Param(0, "epochs with the backbone frozen (head only) before everything trains", Integer(ge=0)),
    "lr_scheduler_type": Param("cosine", "constant | constant_with_warmup | cosine | linear | step | plateau",
                               Text(nonempty=True)),
    "warmup_ratio": Param(0.1, "fraction of steps spent warming up", Real(ge=0, lt=1)),
    "batch_size": Param(32, "samples per batch", Integer(ge=1)),
    "monitor": Param("val_loss", "the validation metric that picks the best epoch", Text(nonempty=True)),
    "patience": Param(0, "stop after this many epochs without improvement (0: never)", Integer(ge=0)),
    "min_delta": Param(0.0, "smallest improvement of monitor that counts", Real(ge=0)),
    "label_smoothing": Param(0.0, "label smoothing of the cross-entropy loss", Real(ge=0, lt=1)),
    "grad_clip": Param(0.0, "clip the gradient norm (0: no clipping)", Real(ge=0)),
    "save_top_k": Param(1, "checkpoints kept (the best epochs by monitor)", Integer(ge=1)),
    "find_lr": Param(False, "run the LR range test first and train at its suggestion instead of learning_rate",
                     Flag()),
    "watch": Param(False, "log gradient histograms to the tracker (wandb)", Flag()),
}

#: Parameters every workflow has; appended, in this order, to a declaration that does not list them.
RUN_PARAMETERS: dict[str, Param] = {
    "seed": Param(0, "split, initialisation and data order", Integer(ge=0)),
    "output_dir": Param("", "run folder; empty: a new dated folder under runs/<workflow>/", Text()),
    "tracker": Param("none", "none | wandb (offline unless WANDB_MODE is set)", Choice("none", "wandb")),
    "device": Param("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available, else the CPU)", None),
    "dtype": Param("float32", "float32 | float64 (float64 on the CPU checks that every tensor takes the device "
                              "path)", Choice("float32", "float64")),
    "interactive": Param(True, "show the widget panel and live curves (papermill runs set it False)", Flag()),
}

#: Names that a concept must not carry (the shared name to use instead): one concept, one name.
SYNONYMS: dict[str, str] = {
    "shot_ratio": "label_fraction", "train_fraction": "label_fraction", "labelled_fraction": "label_fraction",
    "encoder_lr_ratio": "backbone_lr_ratio", "lr": "learning_rate", "schedule": "lr_scheduler_type",
    "lr_schedule": "lr_scheduler_type", "n_epochs": "epochs", "max_epochs": "epochs", "checkpoint": "pretrained_checkpoint",
    "finetune_epochs": "epochs", "warmup": "warmup_ratio", "clip_grad": "grad_clip",
}


@dataclass(frozen=True)
class Workflow:
    """One workflow: the single declaration its notebook, checks, panel, CLI help and sweeps derive from.

    Parameters
    ----------
    name
        Registry name (``workbench run <name>``), the default run folder ``runs/<name>/`` and the key in
        ``predictor.json``.
    notebook
        The workflow's notebook; its metadata names ``name`` back.
    parameters
        ``{name: Param}`` in the order of the parameters cell; :data:`RUN_PARAMETERS` are appended when missing.
    headline_metrics
        The final metrics a summary shows first (the first is the primary one).
    packages
        Packages besides the core ones whose versions each run records.
    predictor
        ``"module:Class"`` or the class of the :class:`workbench.predict.Predictor` that predicts from a run folder.
    title
        A line for listings (``workbench run --list``) and the docs.
    """

    name: str
    notebook: Path
    parameters: Mapping[str, Param]
    headline_metrics: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    predictor: Any = None
    title: str = ""

    def __post_init__(self):
        object.__setattr__(self, "notebook", Path(self.notebook))
        object.__setattr__(self, "headline_metrics", tuple(self.headline_metrics))
        object.__setattr__(self, "packages", tuple(self.packages))
        params = {}
        for pname, param in {**self.parameters, **{k: v for k, v in RUN_PARAMETERS.items()
                                                   if k not in self.parameters}}.items():
            if not isinstance(param, Param):
                raise TypeError(f"Workflow {self.name!r}: parameter {pname}={param!r} is not a Param(default, help, "
                                f"accepts).")
            if pname in SYNONYMS:
                raise ValueError(f"Workflow {self.name!r}: parameter {pname!r} is spelled {SYNONYMS[pname]!r} in "
                                 f"every workflow (workbench.workflow.SHARED); rename it.")
            shared = SHARED.get(pname) or RUN_PARAMETERS.get(pname)
            if shared is not None:
                if param.type is not shared.type and not (shared.type is float and param.type is int):
                    raise TypeError(f"Workflow {self.name!r}: {pname} is a {shared.type.__name__} in every workflow, "
                                    f"got default {param.default!r}.")
                if param.type is not shared.type:
                    param = replace(param, default=shared.type(param.default))
                help_ = (param.help or shared.help).replace("<workflow>", self.name)
                param = replace(param, help=help_, accepts=param.accepts or shared.accepts)
            if pname == "device" and param.accepts is None:
                param = replace(param, accepts=_device_constraint())
            if not param.help:
                raise ValueError(f"Workflow {self.name!r}: parameter {pname!r} has no help text (one line saying "
                                 f"what it does and what it accepts).")
            params[pname] = param
        object.__setattr__(self, "parameters", params)

    # --------------------------------------------------------------- derived views

    @property
    def spec(self) -> Spec:
        """The constraints of the parameters (:class:`workbench.params.Spec`), checked before any work."""
        return Spec(**{k: p.accepts for k, p in self.parameters.items() if p.accepts is not None})

    def defaults(self) -> dict:
        """``{name: default}`` in declared order."""
        return {k: p.default for k, p in self.parameters.items()}

    def options(self, name: str) -> tuple[tuple, bool]:
        """``(options, open_ended)`` of a parameter: the listed choices, and whether a path (or any text) is also
        accepted. ``((), False)`` for a parameter without a list of choices.

        A :class:`workbench.params.Choice` gives its options (open-ended with ``or_path``); another constraint that
        names its usual values as ``suggestions`` gives those, open-ended (``device``: auto, cpu, cuda, and cuda:N).
        The widget panel builds its dropdowns and comboboxes from this.
        """
        accepts = self.parameters[name].accepts
        if isinstance(accepts, Choice):
            return _options(accepts), accepts.or_path
        suggestions = tuple(getattr(accepts, "suggestions", ()))
        return suggestions, bool(suggestions)

    def parameters_cell(self) -> str:
        """The source of the notebook's cell tagged ``parameters``: one typed, commented line per parameter."""
        return "\n".join(p.line(k) for k, p in self.parameters.items())

    def check(self, values: Mapping, *, where: str = "") -> dict:
        """``values`` over the defaults, in declared order, if every name is declared and every value accepted.

        Raises :class:`workbench.params.ParameterError` listing every problem at once (an unknown name with its
        closest declared one, a value of the wrong type, a value outside what the parameter accepts).
        """
        problems = []
        for k, v in values.items():
            if k not in self.parameters:
                hint = difflib.get_close_matches(k, list(self.parameters), n=1)
                problems.append(f"{k!r} is not a parameter of the {self.name} workflow."
                                + (f" Did you mean {hint[0]!r}?" if hint else f" It has: {', '.join(self.parameters)}."))
                continue
            want = self.parameters[k].type
            if not (isinstance(v, want) and not (want is not bool and isinstance(v, bool))
                    or (want is float and isinstance(v, int) and not isinstance(v, bool))):
                problems.append(f"{k}={v!r} is a {type(v).__name__}; {k} is a {want.__name__} "
                                f"(default {self.parameters[k].default!r}).")
        merged = {**self.defaults(), **{k: v for k, v in values.items() if k in self.parameters}}
        problems += self.spec.problems(merged)
        if problems:
            raise ParameterError(problems, where=where or self.name)
        return {k: (float(v) if self.parameters[k].type is float and isinstance(v, int) else v)
                for k, v in merged.items()}

    def help(self) -> str:
        """The parameters as ``workbench run NOTEBOOK --help`` lists them."""
        width = max(map(len, self.parameters))
        lines = [f"parameters of the {self.name} workflow ({self.notebook.name}); set with -p NAME VALUE:"]
        for k, p in self.parameters.items():
            accepts = f" [{p.accepts.describe()}]" if p.accepts is not None else ""
            lines.append(f"  {k:<{width}}  {p.type.__name__:<5} = {_literal(p.default):<12} {p.help}{accepts}")
        return "\n".join(lines)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [{"parameter": k, "type": p.type.__name__, "default": p.default, "accepts":
              p.accepts.describe() if p.accepts is not None else "", "help": p.help}
             for k, p in self.parameters.items()]).set_index("parameter")

    def to_dict(self) -> dict:
        return {"name": self.name, "notebook": str(self.notebook), "headline_metrics": list(self.headline_metrics),
                "packages": list(self.packages),
                "parameters": {k: {"type": p.type.__name__, "default": p.default, "help": p.help,
                                   "accepts": p.accepts.describe() if p.accepts is not None else None}
                               for k, p in self.parameters.items()}}

    def _repr_html_(self) -> str:
        return f"<p><b>{self.name}</b> workflow: {self.notebook.name}</p>" + self.to_frame().to_html()

    # --------------------------------------------------------------- running

    def predictor_class(self):
        """The :class:`workbench.predict.Predictor` subclass of this workflow, or None."""
        if isinstance(self.predictor, str):
            from importlib import import_module

            module, _, attr = self.predictor.partition(":")
            return getattr(import_module(module), attr)
        return self.predictor

    def start(self, namespace: Mapping, **run_options):
        """The first step of the workflow's notebook: ``params, run = WORKFLOW.start(globals())``.

        Checks the parameters cell's values against the declaration (every problem at once, before any work), pins
        the threads (:func:`set_threads`), seeds torch with ``seed`` and opens the run folder (``output_dir``, or a
        new dated folder under ``runs/<name>/``) with the run's tracker and the workflow's packages recorded.
        ``run_options`` go to :class:`workbench.Run` (e.g. ``project=`` for wandb).
        """
        import torch

        from .tracking import Run, new_run_dir, params_of

        found = params_of(namespace)  # the parameters cell's names (and any other plain values defined since)
        params = self.check({k: found[k] for k in self.parameters if k in found})
        set_threads()
        torch.manual_seed(params["seed"])
        run = Run(params["output_dir"] or new_run_dir(f"runs/{self.name}"), params=params, tracker=params["tracker"],
                  packages=self.packages, **run_options)
        print(f"run folder: {run.path}")
        return params, run


# ------------------------------------------------------------------- the registry


@cache
def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def workflows() -> dict[str, Workflow]:
    """Every registered workflow by name: workbench's own and those of installed packages (entry points).

    The entry points are read anew, so a package installed since the first look (in this process) is listed too.
    """
    _entry_points.cache_clear()
    return {name: get_workflow(name) for name in sorted(_entry_points())}


def get_workflow(name: str) -> Workflow:
    """The registered workflow called ``name``; the error lists the registered ones."""
    eps = _entry_points()
    if name not in eps:
        _entry_points.cache_clear()  # a package installed since the first look
        eps = _entry_points()
    if name not in eps:
        hint = difflib.get_close_matches(name, list(eps), n=1)
        raise KeyError(f"no workflow named {name!r} is registered (entry-point group {ENTRY_POINT_GROUP!r}); "
                       f"registered: {', '.join(sorted(eps)) or 'none (is workbench installed? pip install -e .)'}."
                       + (f" Did you mean {hint[0]!r}?" if hint else ""))
    return _load(eps[name])


@cache
def _load(ep) -> Workflow:
    workflow = ep.load()
    if not isinstance(workflow, Workflow):
        raise TypeError(f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}) is not a "
                        f"workbench.Workflow but {type(workflow).__name__}.")
    return workflow


def _metadata(notebook) -> dict:
    try:
        return json.loads(Path(notebook).read_text())["metadata"]["workbench"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def workflow_of(notebook: str | os.PathLike | None) -> Workflow | None:
    """The workflow a notebook names in its metadata (``{"workbench": {"workflow": NAME}}``), or None."""
    if notebook is None:
        return None
    meta = _metadata(notebook)
    if "workflow" in meta:
        return get_workflow(meta["workflow"])
    if "task" in meta:  # notebooks written before the registry named the task module
        from importlib import import_module

        return getattr(import_module(meta["task"]), "WORKFLOW", None)
    return None


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch threads (default: ``$TORCH_NUM_THREADS``, which sweep workers set).

    A workflow notebook calls it first (:meth:`Workflow.start` does), so that parallel sweep runs share the cores
    instead of each starting one thread per core. The BLAS and OpenMP pools (numpy's and torch's OpenBLAS, which
    ``torch.set_num_threads`` does not govern) get the same number: a matrix product's summation order depends on its
    thread count, so a run's figures would otherwise depend on what the process did before (a pytest worker, a
    kernel) rather than on its parameters.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = threads or int(os.environ.get("TORCH_NUM_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # pools loaded later (scipy's, with scikit-learn) read these when they load
    threadpool_limits(limits=threads)  # pools loaded already; process-wide, not a context: it lasts for the run
    return threads


def spec_of(notebook) -> Spec | None:
    """The :class:`workbench.params.Spec` of the workflow a notebook belongs to, or None."""
    workflow = workflow_of(notebook)
    return workflow.spec if workflow is not None else None


def headline_metrics(notebook: str | os.PathLike | None) -> tuple[str, ...]:
    """The headline metrics of the notebook's workflow; empty when it names none."""
    workflow = workflow_of(notebook)
    return workflow.headline_metrics if workflow is not None else ()

