"""An ipywidgets panel over a notebook's parameters.

For a notebook that names its workflow (``{"workbench": {"workflow": NAME}}`` in its metadata) the
panel's fields come from the workflow's declaration (:class:`workbench.workflow.Workflow`): names,
types, defaults, help and the options of each choice. For any other notebook they come from its
cell tagged ``parameters`` (names, types, defaults and help comments, through
:func:`workbench.execute.notebook_parameters`). Either way the names it edits are the names
papermill injects, the names a sweep grid varies and the keys of a run's ``params.json``. In a
workflow notebook::

    from workbench import widgets
    from workbench.tasks import cell_type

    widgets.panel("cell_type_annotation.ipynb", values=params)  # Train runs the notebook's cells in this process

One widget per parameter: ``int`` -> IntText, ``float`` -> FloatText, ``bool`` -> Checkbox, a
``str`` the declaration limits to a :class:`workbench.params.Choice` -> Dropdown of its options
(a Combobox when a path is accepted too, ``Choice(..., or_path=True)``), any other ``str`` -> Text.
A notebook without a workflow gets its dropdowns from help comments that list options
(``# constant | cosine | linear``). Below them, three tabs:

LR schedule
    The planned learning rate at every step, redrawn whenever ``lr_scheduler_type``,
    ``learning_rate``, ``warmup_ratio``, ``epochs`` or ``batch_size`` change. With ``find_lr=``
    a "Find LR" button runs the LR range test (:func:`workbench.lr_find`) for the current
    values, draws its curve and fills ``learning_rate`` with the suggestion.
Train
    Runs ``train(values, callbacks=[...])`` in this process with live training curves, into a run
    folder of its own (``<output_dir>/panel/001``, ``002``, ...), never the notebook's.
Export sweep
    Writes a sweep spec (YAML) for ``workbench sweep`` from the current values and the values
    typed into the "vary" fields.

Everything also works without a browser: ``panel.set(...)``, ``panel.train()`` and
``panel.export_sweep()`` do what the widgets do, and button callbacks can be fired with
``button.click()``. Results never live only in the widgets: a panel run writes its run folder, and
an export writes its YAML file.

Why this module is long: most of it is one class, :class:`ParameterPanel`, whose widgets, tabs and button callbacks
share the panel's state (the current values, the output areas, the run counter); split apart, the pieces would pass
that state around. The functions that build it and the live curves in an Output widget are short.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .execute import coerce_parameters, notebook_parameters
from .live import LiveCurves

__all__ = ["panel", "ParameterPanel", "OutputCurves", "parse_options"]

#: Parameters the LR preview reads; the preview needs the first four (the others are optional).
PREVIEW_NAMES = ("lr_scheduler_type", "learning_rate", "epochs", "batch_size", "warmup_ratio", "backbone_lr_ratio",
                 "freeze_epochs")

#: Parameters without a "vary" field: the run folder is the sweep's business, the panel is never
#: shown in a sweep run, and seeds have a field of their own.
NOT_VARIED = ("output_dir", "interactive", "seed")

_OPTION = re.compile(r"""^["']?([A-Za-z0-9_.\-/]+)["']?\s*(\(.*\))?$""")
_SWEEP_NAME = re.compile(r"^[A-Za-z0-9._=,+-]+$")
_WIDTH = {"description_width": "170px"}
_WIDE = {"width": "560px"}  # room for paths and the listed options


# --------------------------------------------------------------------------------------------
# building the panel
# --------------------------------------------------------------------------------------------


def panel(
    notebook: str | os.PathLike | None = None,
    *,
    fallback: str | os.PathLike | None = None,
    values: Mapping | None = None,
    train: Callable | None = None,
    sweep_dir: str | os.PathLike | None = None,
    steps_per_epoch: int | None = None,
    train_size: int | None = None,
    metric: str | None = None,
    find_lr: Callable | None = None,
) -> ParameterPanel:
    """A widget panel over the parameters cell of ``notebook``.

    Parameters
    ----------
    notebook
        Path of the ``.ipynb`` file whose cell tagged ``parameters`` declares the parameters.
        None: the notebook open in JupyterLab (the kernel's ``__session__``), so that Train and
        Export sweep follow the user's own copy of a workflow notebook.
    fallback
        The notebook to use when ``notebook`` is None and no open notebook is known (a kernel
        started outside JupyterLab); the panel then says so.
    values
        ``{name: value}`` overriding the notebook's defaults, typically the notebook's current
        values (``wb.params_of(globals())``). Names must be parameters of the notebook.
    train
        Function that trains for a parameter dict and returns a result, called as
        ``train(values, callbacks=[OutputCurves(...)])``. Default: run the panel's notebook in
        this process (:func:`workbench.execute.run_in_process`) and return its ``result``.
    sweep_dir
        Folder the exported sweep specs go to; default: ``sweeps/`` next to the notebook
        (``notebooks/sweeps`` for the workflow notebooks), whatever the working directory.
    steps_per_epoch
        Optimizer steps per epoch for the LR preview, fixed whatever the batch size. Default:
        ``ceil(train_size / batch_size)``, which follows the batch_size field.
    train_size
        Training examples per epoch (e.g. ``len(data.labelled_idx)``), used when
        ``steps_per_epoch`` is not given. With neither, the LR tab says that it needs one.
    metric
        Initial value of the sweep's ``metric`` field (the final metric its comparison figure
        shows). Default: the first of the notebook's workflow's ``HEADLINE_METRICS``.
    find_lr
        Function running the LR range test for a parameter dict, called as ``find_lr(values)``
        and returning a :class:`workbench.lr_range.LRFinderResult` (e.g. ``cell_type.lr_finder(model, data)``).
        None: the Find LR button is disabled.

    Returns
    -------
    ParameterPanel
        Display it (it is the last expression of a cell, or ``display(panel)``).

    Examples
    --------
    >>> p = panel("notebooks/cell_type_annotation.ipynb", values={"epochs": 5})  # doctest: +SKIP
    >>> p.set(lr_scheduler_type="constant")                                      # doctest: +SKIP
    >>> p.preview_curve["head"].nunique()                                        # doctest: +SKIP
    1
    """
    path, note = resolve_notebook(notebook, fallback)
    made = ParameterPanel(path, values=values, train=train, sweep_dir=sweep_dir,
                          steps_per_epoch=steps_per_epoch, train_size=train_size, metric=metric, find_lr=find_lr)
    made.note = note
    if note:
        made.note_html.value = f"<small style='color:#a60'>{_escape(note)}</small>"
    return made


def open_notebook() -> Path | None:
    """The notebook open in JupyterLab: the kernel's ``__session__`` (an absolute path there), or None."""
    from IPython import get_ipython

    shell = get_ipython()
    session = shell.user_ns.get("__session__") if shell is not None else None
    if session and str(session).endswith(".ipynb") and Path(session).is_file():
        return Path(session)
    return None


def resolve_notebook(notebook, fallback) -> tuple[Path, str]:
    """``(notebook to use, note for the user)``: the given one, else the open one, else ``fallback``."""
    if notebook is not None:
        return Path(notebook), ""
    found = open_notebook()
    if found is not None:
        return found, ""
    if fallback is None:
        raise ValueError("panel() needs a notebook: none was given and the kernel does not say which notebook is "
                         "open (no __session__, e.g. outside JupyterLab). Pass panel('path/to.ipynb').")
    return Path(fallback), (f"The open notebook is not known here (no __session__), so Train and Export use "
                            f"{fallback}.")


def _declared_parameters(workflow) -> dict[str, dict]:
    """A workflow's parameters in the shape :func:`workbench.execute.notebook_parameters` gives a cell's:
    ``{name: {"type", "default" (source text), "help"}}``, in declared order."""
    return {name: {"type": param.type.__name__, "default": repr(param.default), "help": param.help}
            for name, param in workflow.parameters.items()}


def parse_options(help_text: str) -> tuple[list[str], bool]:
    """The options listed in a parameter's help comment.

    ``"constant | cosine | linear"`` gives ``(["constant", "cosine", "linear"], False)``. Of each
    option only the leading word counts: ``"pretrain (here, on unlabeled cells)"`` gives
    ``"pretrain"``. An option that is a description rather than a word (``"a checkpoint path"``)
    makes the list open: the second item is then True, and any text is accepted besides the
    listed words.

    Returns
    -------
    tuple
        ``(options, open_ended)``; ``([], False)`` when the help text lists no options.
    """
    if "|" not in (help_text or ""):
        return [], False
    options, open_ended = [], False
    for part in help_text.split("|"):
        match = _OPTION.match(part.strip())
        if match is None:
            open_ended = True
        elif match.group(1) not in options:
            options.append(match.group(1))
    return options, open_ended


class ParameterPanel:
    """Widgets for the parameters of one notebook; build it with :func:`panel`.

    Attributes
    ----------
    notebook
        Absolute path of the notebook.
    parameters
        What the parameters cell declares: ``{name: {"type", "default", "help"}}``.
    fields
        ``{name: widget}``, one per parameter, in declaration order.
    workflow
        The notebook's :class:`workbench.workflow.Workflow` (the fields come from its declaration), or None
        (the fields come from the parameters cell).
    options
        ``{name: [options]}`` for the string parameters limited to a list of options (a dropdown).
    vary
        ``{name: Text}``: comma-separated values a sweep grid varies (empty: not varied).
    widget
        The ipywidgets container holding everything.
    preview_out, train_out, curves_out, result_out, sweep_out
        The ``Output`` widgets of the tabs: LR curve; training messages, live curves and result
        table; export messages.
    preview_curve
        The last planned LR curve (DataFrame from :func:`workbench.schedules.lr_curve`), or None.
    last_result
        What the last Train click (or :meth:`train`) returned, or None.
    last_run_dir
        The run folder of the last panel run, or None.
    last_error
        The exception of the last failed preview, training or export, or None.
    """

    def __init__(self, notebook, *, values=None, train=None, sweep_dir=None, steps_per_epoch=None,
                 train_size=None, metric=None, find_lr=None):
        import ipywidgets as w

        self.notebook_given = str(notebook)
        self.notebook = Path(notebook).resolve()
        from .workflow import workflow_of

        self.workflow = workflow_of(self.notebook)
        self.parameters = (_declared_parameters(self.workflow) if self.workflow is not None
                           else notebook_parameters(self.notebook))
        if not self.parameters:
            raise ValueError(f"notebook={self.notebook_given!r} has no cell tagged 'parameters' (or it declares "
                             "nothing); tag the cell that assigns the parameters with 'parameters'.")
        if train is not None and not callable(train):
            raise TypeError(f"train must be a function called as train(values, callbacks=[...]), "
                            f"got {type(train).__name__}.")
        for arg, given in (("steps_per_epoch", steps_per_epoch), ("train_size", train_size)):
            if given is not None and (not isinstance(given, int) or isinstance(given, bool) or given < 1):
                raise ValueError(f"{arg}={given!r}: give a positive int (steps per epoch = "
                                 "ceil(train_size / batch_size)), or None.")
        self.sweep_dir = Path(sweep_dir) if sweep_dir is not None else self.notebook.parent / "sweeps"
        self.note = ""
        self.steps_per_epoch = steps_per_epoch
        self.train_size = train_size
        if metric is None:
            from .workflow import headline_metrics

            metric = next(iter(headline_metrics(self.notebook)), "")
        self._train_fn = train if train is not None else self._run_notebook
        self.preview_curve = None
        self.last_result = None
        self.last_run_dir = None
        self.last_error = None
        self.last_spec_path = None
        self.last_lr_find = None
        self._find_lr_fn = find_lr

        self.options = {}
        self.fields = {name: self._make_field(name, info) for name, info in self.parameters.items()}
        start = {name: self._default(name) for name in self.parameters}
        for name, value in self._checked(values or {}).items():
            start[name] = _widget_value(value, self.parameters[name]["type"])
        for name, value in start.items():
            if value is not None:
                self.fields[name].value = value

        self.preview_out, self.sweep_out = w.Output(), w.Output()
        self.preview_title = w.HTML("")  # the plan in words (also the figure's title), readable without the image
        self.train_out, self.curves_out, self.result_out = w.Output(), w.Output(), w.Output()
        self.train_button = w.Button(description="Train", icon="play", button_style="primary",
                                     tooltip="train in this process with the values above, into <output_dir>/panel/NNN")
        self.train_button.on_click(self._on_train)
        self.export_button = w.Button(description="Export sweep", icon="save",
                                      tooltip="write a sweep spec (YAML) for `workbench sweep`")
        self.export_button.on_click(self._on_export)
        self.find_lr_out = w.Output()
        self.find_lr_button = w.Button(description="Find LR", icon="search",
                                       disabled=find_lr is None or "learning_rate" not in self.parameters,
                                       tooltip="LR range test with the values above; fills learning_rate")
        self.find_lr_button.on_click(self._on_find_lr)
        self._make_sweep_fields(seed=start.get("seed"), metric=metric)
        missing = [name for name in PREVIEW_NAMES[:4] if name not in self.parameters]
        if missing:
            _say(self.preview_out, f"No LR preview: the notebook has no parameter(s) {', '.join(missing)}.")
        else:
            for name in PREVIEW_NAMES:
                if name in self.fields:
                    self.fields[name].observe(self._on_preview_change, names="value")
            self._draw_preview()
        self.note_html = w.HTML("")
        self.command_html = w.HTML("")
        for field in self.fields.values():
            field.observe(self._update_command, names="value")
        if "seed" in self.fields:
            self.fields["seed"].observe(self._on_seed_change, names="value")
        self._update_command()
        self.widget = self._layout()

    # -- widgets -----------------------------------------------------------------------------

    def _make_field(self, name: str, info: dict):
        import ipywidgets as w

        kind, help_text = info["type"], info["help"] or ""
        common = {"description": name, "tooltip": help_text or name, "style": _WIDTH}
        wide = {**common, "layout": w.Layout(**_WIDE)}
        if kind == "int":
            return w.IntText(**common)
        if kind == "float":
            return w.FloatText(**common)
        if kind == "bool":
            return w.Checkbox(indent=True, **common)
        if kind not in ("str", None):
            options, open_ended = [], False
        elif self.workflow is not None:  # the declaration: a Choice's options, or_path for a path besides
            options, open_ended = self.workflow.options(name)
            options = list(options)
        else:
            options, open_ended = parse_options(help_text)
        if options and not open_ended:
            self.options[name] = options
            return w.Dropdown(options=options, **wide)  # the default width cuts off e.g. constant_with_warmup
        if options:  # listed words plus free text, e.g. "pretrain | none | a checkpoint path"
            return w.Combobox(options=options, ensure_option=False, placeholder=" | ".join(options), **wide)
        return w.Text(**wide)

    def _make_sweep_fields(self, *, seed, metric: str) -> None:
        import ipywidgets as w

        self.vary = {
            name: w.Text(description=name, placeholder=self._vary_hint(name), style=_WIDTH, layout=w.Layout(**_WIDE),
                         tooltip=f"comma-separated {info['type'] or 'str'} values to sweep over")
            for name, info in self.parameters.items()
            if name not in NOT_VARIED and info["type"] not in ("list", "dict")
        }
        self.seeds_field = w.Text(description="seeds", value="" if seed is None else str(seed), style=_WIDTH,
                                  placeholder="e.g. 0, 1, 2", disabled="seed" not in self.parameters,
                                  tooltip="values of seed; each setting runs once per seed (empty: seed as above)")
        self.name_field = w.Text(description="sweep name", value=f"{self.notebook.stem}_sweep", style=_WIDTH,
                                 layout=w.Layout(**_WIDE))
        self.metric_field = w.Text(description="metric", value=metric or "", style=_WIDTH, layout=w.Layout(**_WIDE),
                                   tooltip="final metric for the comparison figure (empty: the first numeric one)")
        self.sweep_dir_field = w.Text(description="spec folder", value=str(self.sweep_dir), style=_WIDTH,
                                      layout=w.Layout(**_WIDE), tooltip="the YAML goes to <spec folder>/<name>.yaml")

    def _layout(self):
        import ipywidgets as w

        rows = []
        for name, field in self.fields.items():
            help_text = self.parameters[name]["help"] or ""
            rows.append(w.HBox([field, w.HTML(f"<small style='color:#666'>{_escape(help_text)}</small>")]))
        train_page = w.VBox([self.train_button, self.train_out, self.curves_out, self.result_out])
        sweep_page = w.VBox([
            w.HTML("<small>Vary a parameter by listing values, separated by commas; the others keep the values "
                   "above. The spec is written to <code>&lt;spec folder&gt;/&lt;name&gt;.yaml</code>.</small>"),
            *self.vary.values(), self.seeds_field, self.metric_field, self.name_field, self.sweep_dir_field,
            self.export_button, self.sweep_out,
        ])
        lr_page = w.VBox([self.preview_title, self.preview_out, self.find_lr_button, self.find_lr_out])
        tabs = w.Tab(children=[lr_page, train_page, sweep_page])
        tabs.titles = ("LR schedule", "Train", "Export sweep")
        title = w.HTML(f"<b>{_escape(self.notebook.name)}</b>: parameters <small>({_escape(str(self.notebook))})</small>")
        says = w.HTML("<small>This panel does not edit the notebook's parameters cell: Train runs these values in a "
                      "folder of its own. To keep them, copy the command below or edit the parameters cell.</small>")
        return w.VBox([title, self.note_html, says, w.VBox(rows), w.HTML("<small>same run from a terminal:</small>"),
                       self.command_html, tabs])

    def command(self) -> str:
        """The ``workbench run`` command for the current values (those that differ from the notebook's defaults)."""
        import shlex

        defaults = {name: self._default_value(name) for name in self.parameters}
        parts = ["workbench", "run", str(self.notebook)]
        try:
            values = self.values()
        except ValueError as err:
            return f"(no command: {err})"
        for name, value in values.items():
            if name in ("output_dir", "interactive") or value == defaults.get(name):
                continue
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            parts += ["-p", name, text]
        return " ".join(shlex.quote(p) for p in parts)

    def _default_value(self, name: str) -> Any:
        try:
            return ast.literal_eval(self.parameters[name]["default"])
        except (ValueError, SyntaxError):
            return None

    def _update_command(self, change=None) -> None:
        self.command_html.value = f"<code style='user-select:all'>{_escape(self.command())}</code>"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def __repr__(self) -> str:
        return f"ParameterPanel({self.notebook.name!r}, {len(self.fields)} parameters)"

    # -- values ------------------------------------------------------------------------------

    def values(self) -> dict:
        """The current value of every parameter, converted to its declared type."""
        raw = {name: self._read(name) for name in self.fields}
        return coerce_parameters(self.notebook, raw, declared=self.parameters)

    def set(self, **values) -> None:
        """Set parameters by name, e.g. ``panel.set(epochs=1, lr_scheduler_type="constant")``.

        Values are converted to the declared types (``"1e-3"`` becomes 0.001 for a float).

        Raises
        ------
        ValueError
            For a name the notebook does not declare, a value that does not convert, or an option
            the notebook's help comment does not list.
        """
        for name, value in self._checked(values).items():
            self.fields[name].value = _widget_value(value, self.parameters[name]["type"])

    def _checked(self, values: Mapping) -> dict:
        converted = coerce_parameters(self.notebook, dict(values), declared=self.parameters)
        for name, value in converted.items():
            self._check_option(name, value)
        return converted

    def _check_option(self, name: str, value: Any) -> None:
        if name in self.options and value not in self.options[name]:
            if self.workflow is not None:
                raise ValueError(
                    f"{name}={value!r} is not one of {', '.join(self.options[name])}, the options the "
                    f"{self.workflow.name} workflow declares for it ({self.notebook.name}). Pick one of them."
                )
            raise ValueError(
                f"{name}={value!r} is not one of {', '.join(self.options[name])}, the options the parameters cell of "
                f"{self.notebook.name} lists for it. Pick one of them, or add it to the comment after {name} "
                "in that cell."
            )

    def _default(self, name: str) -> Any:
        text = self.parameters[name]["default"]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None  # an expression (e.g. a function call): leave the field empty
        return _widget_value(value, self.parameters[name]["type"])

    def _read(self, name: str) -> Any:
        value = self.fields[name].value
        if self.parameters[name]["type"] is None and isinstance(value, str):
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return value

    # -- LR preview --------------------------------------------------------------------------

    def _on_preview_change(self, change) -> None:
        self._draw_preview()

    def _draw_preview(self) -> None:
        """Recompute :attr:`preview_curve` and redraw it in the LR schedule tab."""
        try:
            self.preview_curve = self.planned_curve()
        except Exception as err:  # a half-typed value must not break the panel: say what is wrong
            self.last_error = err
            self.preview_out.clear_output(wait=True)
            _say(self.preview_out, f"No preview: {err}")
            return
        import matplotlib.pyplot as plt

        from .plots import plot_lr_schedule

        figure = plot_lr_schedule(self.preview_curve)
        self.preview_title.value = f"<b>{_escape(figure.axes[0].get_title())}</b>"
        _show_in(self.preview_out, figure)
        plt.close(figure)

    def planned_curve(self):
        """The LR at every step for the current values (see :func:`workbench.schedules.lr_curve`).

        Steps = ``epochs`` x steps per epoch: the panel's ``steps_per_epoch`` when given, else
        ``ceil(train_size / batch_size)``.
        """
        from .schedules import lr_curve

        v = self.values()
        if v["epochs"] < 1 or v["batch_size"] < 1:
            raise ValueError(f"epochs={v['epochs']} and batch_size={v['batch_size']} must both be at least 1.")
        if self.steps_per_epoch is None and self.train_size is None:
            raise ValueError("the preview needs the steps per epoch: build the panel with train_size= (the number of "
                             "training examples) or steps_per_epoch=.")
        per_epoch = self.steps_per_epoch or math.ceil(self.train_size / v["batch_size"])
        groups = None
        if "backbone_lr_ratio" in v or "freeze_epochs" in v:  # one line per parameter group, freeze phase marked
            groups = {"backbone": v.get("backbone_lr_ratio", 1.0), "head": 1.0}
        return lr_curve(v["lr_scheduler_type"], learning_rate=v["learning_rate"],
                        total_steps=v["epochs"] * per_epoch, warmup_ratio=v.get("warmup_ratio", 0.0), groups=groups,
                        freeze_steps=v.get("freeze_epochs", 0) * per_epoch)

    # -- LR range test -----------------------------------------------------------------------

    def find_lr(self):
        """Run the LR range test for the current values, as the Find LR button does; fill ``learning_rate``.

        The curve is drawn in the LR schedule tab and the result kept as :attr:`last_lr_find`;
        the preview follows the new learning rate.
        """
        if self._find_lr_fn is None:
            raise ValueError("this panel was built without find_lr=, so it cannot run the LR range test. Build it "
                             "with widgets.panel(..., find_lr=cell_type.lr_finder(model, data)) "
                             "(or your own function).")
        self.find_lr_out.clear_output()
        _say(self.find_lr_out, "LR range test ...")
        with _capture(self.find_lr_out):
            result = self._find_lr_fn(self.values())
        self.last_lr_find = result
        self.fields["learning_rate"].value = float(result.suggestion)
        from .plots import plot_lr_find

        _show_in(self.find_lr_out, plot_lr_find(result))
        _say(self.find_lr_out, f"learning_rate set to {result.suggestion:.3g}: {result.summary()}")
        return result

    def _on_find_lr(self, button) -> None:
        button.disabled = True
        try:
            with _errors_into(self, self.find_lr_out, "LR range test failed"):
                self.find_lr()
        finally:
            button.disabled = False

    # -- training ----------------------------------------------------------------------------

    def train(self):
        """Train with the current values, as the Train button does, and return the result.

        The run goes to a new folder ``<output_dir>/panel/NNN`` (so a panel run never overwrites
        the notebook's own run folder or an earlier panel run), with ``interactive=False``.
        Training curves are redrawn after every epoch in the Train tab; the result (its table)
        is shown below them and kept as :attr:`last_result`.
        """
        params = self.values()
        if "output_dir" not in params:
            raise ValueError(f"{self.notebook.name} declares no output_dir parameter, so a panel run has no run "
                             "folder to go to. Add `output_dir: str = \"runs/...\"` to its parameters cell.")
        run_dir = _next_run_dir(Path(params["output_dir"]) / "panel")
        params["output_dir"] = str(run_dir)
        if "interactive" in params:
            params["interactive"] = False
        for output in (self.train_out, self.curves_out, self.result_out):
            output.clear_output()
        _say(self.train_out, f"Training in {run_dir} ...")
        with _capture(self.train_out):  # what the run prints (folder, schedule, progress) goes to the Train tab
            result = self._train_fn(params, callbacks=[OutputCurves(self.curves_out)])
        self.last_result, self.last_run_dir = result, run_dir
        _show_in(self.result_out, result)
        _say(self.train_out, f"Done. Run folder: {run_dir}")
        return result

    def _run_notebook(self, values: dict, *, callbacks=()):
        """The default training function: this panel's notebook, run in this process; its ``result``."""
        from .execute import run_workflow

        return run_workflow(self.notebook, values, callbacks=callbacks)

    def _on_train(self, button) -> None:
        button.disabled = True
        try:
            with _errors_into(self, self.train_out, "Training failed"):
                self.train()
        finally:
            button.disabled = False

    # -- sweep export ------------------------------------------------------------------------

    def grid(self) -> dict:
        """``{name: [values]}`` from the non-empty "vary" fields, each value of the declared type."""
        grid = {}
        for name, field in self.vary.items():
            items = [item.strip() for item in field.value.split(",") if item.strip()]
            if not items:
                continue
            values = []
            for item in items:
                value = coerce_parameters(self.notebook, {name: _unquote(item)}, declared=self.parameters)[name]
                self._check_option(name, value)
                if value not in values:
                    values.append(value)
            grid[name] = values
        return grid

    def seeds(self) -> list[int]:
        """The integers of the seeds field (empty list when it is empty)."""
        seeds = []
        for item in (s.strip() for s in self.seeds_field.value.split(",")):
            if not item:
                continue
            try:
                seed = int(item)
            except ValueError:
                raise ValueError(f"seeds={self.seeds_field.value!r}: {item!r} is not an integer. "
                                 "Write whole numbers separated by commas, e.g. 0, 1, 2.") from None
            if seed not in seeds:
                seeds.append(seed)
        return seeds

    def sweep_spec(self, name: str | None = None, *, output_root: str | os.PathLike | None = None) -> dict:
        """The sweep spec as a dict (what :meth:`export_sweep` writes).

        ``parameters`` holds the current value of every parameter that is not varied, except
        ``output_dir`` (each run gets its own folder) and with ``interactive: false``; ``seed`` is
        left out when the seeds field is filled in.
        """
        name = (name if name is not None else self.name_field.value).strip()
        if not _SWEEP_NAME.match(name):
            raise ValueError(f"sweep name={name!r} becomes a file and folder name: use letters, digits and "
                             ". _ - = , + only (e.g. lr_schedule).")
        grid, seeds = self.grid(), self.seeds()
        if seeds and "seed" not in self.parameters:
            raise ValueError(f"seeds={seeds} but {self.notebook.name} declares no seed parameter; clear the seeds "
                             "field, or add `seed: int = 0` to the notebook's parameters cell.")
        skip = {"output_dir", *grid, *(["seed"] if seeds else [])}
        parameters = {k: v for k, v in self.values().items() if k not in skip}
        if "interactive" in parameters:
            parameters["interactive"] = False
        spec = {"name": name, "notebook": self._notebook_for_spec(), "parameters": parameters, "grid": grid}
        if seeds:
            spec["seeds"] = seeds
        if self.metric_field.value.strip():
            spec["metric"] = self.metric_field.value.strip()
        if output_root is not None:
            spec["output_root"] = str(output_root)
        return spec

    def export_sweep(self, name: str | None = None, *, output_root: str | os.PathLike | None = None) -> Path:
        """Write the sweep spec to ``<sweep_dir>/<name>.yaml`` and return its path.

        Parameters
        ----------
        name
            Sweep name (also the folder of its runs); default: the panel's "sweep name" field.
        output_root
            Folder that will hold the sweep's run folders (the spec's ``output_root``); default:
            the sweep driver's (``runs/sweeps``).

        Returns
        -------
        pathlib.Path
            The YAML file; run it with ``workbench sweep <path> --workers 2``. An existing file of
            that name is replaced. The file is checked by :func:`workbench.sweeps.load_spec`.
        """
        import yaml

        from .sweeps import load_spec

        self.sweep_dir = Path(self.sweep_dir_field.value.strip() or self.sweep_dir).expanduser()
        spec = self.sweep_spec(name, output_root=output_root)
        path = self.sweep_dir / f"{spec['name']}.yaml"
        header = (f"# Sweep exported from the widget panel of {self.notebook.name}.\n"
                  f"#   workbench sweep {path} --workers 2\n")
        text = header + yaml.dump(spec, Dumper=_spec_dumper(), sort_keys=False)
        load_spec(yaml.safe_load(text) | {"notebook": str(self.notebook)})  # the driver must accept it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.last_spec_path = path
        return path

    def _notebook_for_spec(self) -> str:
        """The notebook path relative to the spec's folder (the sweep driver tries that first)."""
        home = self.sweep_dir.resolve()
        if not self.notebook.is_relative_to(home.parent):  # e.g. a sweep_dir elsewhere: keep it absolute
            return str(self.notebook)
        return Path(os.path.relpath(self.notebook, home)).as_posix()

    def _on_export(self, button) -> None:
        self.sweep_out.clear_output()
        with _errors_into(self, self.sweep_out, "Export failed"):
            path = self.export_sweep()
            _say(self.sweep_out, f"Wrote {path}\nRun it with:  workbench sweep {path} --workers 2")

    def _on_seed_change(self, change) -> None:
        """The seeds field follows the seed field while it holds the seed the field held before.

        It starts at the seed the panel was opened with; without this, an export after editing
        the seed would sweep the opening seed (another split) while the panel and its command say
        the new one. Seeds the user typed (``0, 1, 2``) are left alone.
        """
        if self.seeds_field.value.strip() == str(change["old"]):
            self.seeds_field.value = "" if change["new"] is None else str(change["new"])

    def _vary_hint(self, name: str) -> str:
        if name in self.options:
            return ", ".join(self.options[name])
        return {"float": "e.g. 1.0e-4, 1.0e-3", "int": "e.g. 10, 30", "bool": "true, false"}.get(
            self.parameters[name]["type"], "e.g. a, b")


# --------------------------------------------------------------------------------------------
# live curves in an Output widget
# --------------------------------------------------------------------------------------------


class OutputCurves(LiveCurves):
    """Training curves redrawn after every epoch inside an ipywidgets ``Output``.

    :class:`workbench.live.LiveCurves` updates a display handle, but display updates do not
    reach outputs captured by an ``Output`` widget (jupyter-widgets/ipywidgets#1844). This
    variant clears the widget and draws the new figure instead, and closes each figure so that
    none piles up in pyplot (or reappears under the next cell that runs).

    Parameters
    ----------
    output
        The ``ipywidgets.Output`` to draw into.
    """

    def __init__(self, output):
        super().__init__()
        self.output = output

    def on_epoch_end(self, trainer, logs):
        import matplotlib.pyplot as plt

        from .plots import plot_history

        figure = plot_history(trainer.history)
        _show_in(self.output, figure)
        plt.close(figure)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _errors_into:
    """Show an exception in an Output widget (button callbacks have nowhere else to report)."""

    def __init__(self, owner: ParameterPanel, output, what: str):
        self.owner, self.output, self.what = owner, output, what

    def __enter__(self):
        self.owner.last_error = None
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception):
            return False
        self.owner.last_error = error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _say(self.output, f"{self.what}: {type(error).__name__}: {first}", error=True)
        return True


def _in_kernel() -> bool:
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def _show_in(output, obj) -> None:
    """Replace what an Output widget shows by ``obj``; without a Jupyter kernel (tests, scripts) do nothing."""
    from IPython.display import display

    if not _in_kernel():
        return
    output.clear_output(wait=True)
    with output:
        display(obj)


def _capture(output):
    """Inside a kernel, the Output widget's context (prints land in it); elsewhere, nothing."""
    import contextlib

    return output if _in_kernel() else contextlib.nullcontext()


def _say(output, text: str, *, error: bool = False) -> None:
    """Add a line of text to an Output widget.

    In a kernel it is printed inside the widget's context, like the figures: setting
    ``output.outputs`` from here (``append_stdout``) would replace what the frontend captured.
    Without a kernel it goes into ``output.outputs``, where tests can read it.
    """
    if _in_kernel():
        with output:
            print(text, file=sys.stderr if error else sys.stdout)
    elif error:
        output.append_stderr(text + "\n")
    else:
        output.append_stdout(text + "\n")


def _spec_dumper():
    import yaml

    class SpecDumper(yaml.SafeDumper):
        """Safe YAML with lists in flow style (``[constant, cosine]``) and mappings in block style."""

    def flow_list(dumper, value):
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)

    SpecDumper.add_representer(list, flow_list)
    return SpecDumper


def _next_run_dir(parent: Path) -> Path:
    taken = [int(p.name) for p in parent.glob("[0-9][0-9][0-9]*") if p.name.isdigit()] if parent.is_dir() else []
    return parent / f"{max(taken, default=0) + 1:03d}"


def _widget_value(value: Any, kind: str | None) -> Any:
    """How a typed value sits in its widget: JSON text for list/dict, source text for unknown types."""
    if kind in ("list", "dict"):
        return json.dumps(value)
    if kind is None and not isinstance(value, str):
        return repr(value)
    return value


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _escape(text: str) -> str:
    import html

    return html.escape(text)
