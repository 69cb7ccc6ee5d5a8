"""workbench.widgets: the parameter panel over the real cell-type notebook, headless (no frontend)."""

import json
import math
from pathlib import Path

import ipywidgets as w
import numpy as np
import pytest
import yaml

from workbench import widgets
from workbench.execute import notebook_parameters
from workbench.sweeps import load_spec, run_sweep
from workbench.execute import run_workflow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "cell_type_annotation.ipynb"
SCHEDULES = ["constant", "constant_with_warmup", "cosine", "linear", "step", "plateau"]  # as declared
TINY = {"epochs": 1, "pretrained_checkpoint": "none", "batch_size": 64}


def printed(output: w.Output) -> str:
    """The text an Output widget holds (headless, the panel's messages land in its outputs)."""
    return "".join(o.get("text", "") for o in output.outputs)


@pytest.fixture
def make_panel(tmp_path):
    """A panel over the real notebook whose exports and run folders stay under tmp_path."""

    def make(**kwargs):
        values = {"output_dir": str(tmp_path / "notebook_run"), **kwargs.pop("values", {})}
        return widgets.panel(NOTEBOOK, values=values, sweep_dir=tmp_path / "sweeps", **kwargs)

    return make


def test_widgets_mirror_the_parameters_cell(make_panel):
    declared = notebook_parameters(NOTEBOOK)
    panel = make_panel()
    assert list(panel.fields) == list(declared)
    kinds = {"int": w.IntText, "float": w.FloatText, "bool": w.Checkbox}
    for name, info in declared.items():
        field = panel.fields[name]
        assert field.description == name and field.tooltip == info["help"]
        if info["type"] in kinds:
            assert type(field) is kinds[info["type"]], name
    assert isinstance(panel.fields["lr_scheduler_type"], w.Dropdown)
    assert list(panel.fields["lr_scheduler_type"].options) == SCHEDULES
    assert list(panel.fields["strategy"].options) == ["full", "frozen_backbone", "linear_probe"]
    # "pretrain (...) | none (...) | a checkpoint path": the listed words, and a path may be typed too
    assert isinstance(panel.fields["pretrained_checkpoint"], w.Combobox)
    assert list(panel.fields["pretrained_checkpoint"].options) == ["pretrain", "none"]
    assert type(panel.fields["data_path"]) is w.Text
    assert isinstance(panel.widget, w.Box)

    values = panel.values()
    assert list(values) == list(declared)
    assert values["learning_rate"] == 1.0e-3 and type(values["learning_rate"]) is float
    assert values["epochs"] == 100 and type(values["epochs"]) is int
    assert values["interactive"] is True and values["lr_scheduler_type"] == "cosine"


def test_values_and_set_are_typed_and_checked(make_panel):
    panel = make_panel(values={"epochs": 3, "learning_rate": "2e-4"})
    assert panel.values()["epochs"] == 3 and panel.values()["learning_rate"] == 2e-4
    panel.set(pretrained_checkpoint="/data/encoder.safetensors", batch_size="16", interactive="false")
    values = panel.values()
    assert values["pretrained_checkpoint"] == "/data/encoder.safetensors"
    assert values["batch_size"] == 16 and values["interactive"] is False
    with pytest.raises(ValueError, match=r"lr_scheduler_type='cosin' is not one of constant, constant_with_warmup"):
        panel.set(lr_scheduler_type="cosin")
    with pytest.raises(ValueError, match=r"'lr' is not a parameter of cell_type_annotation.ipynb.*learning_rate"):
        panel.set(lr=1e-3)
    with pytest.raises(ValueError, match=r"epochs='many'.*cannot be converted to int"):
        panel.set(epochs="many")
    with pytest.raises(ValueError, match="lr_scheduler_type='cosin' is not one of .*, the options the cell_type "
                                         "workflow declares for it"):
        make_panel(values={"lr_scheduler_type": "cosin"})
    assert make_panel(values={"lr_scheduler_type": "plateau"}).values()["lr_scheduler_type"] == "plateau"


def test_parse_options_takes_the_leading_word():
    assert widgets.parse_options("constant | cosine | linear") == (["constant", "cosine", "linear"], False)
    assert widgets.parse_options("pretrain (here, on cells) | none (from scratch) | a checkpoint path") == (
        ["pretrain", "none"], True)
    assert widgets.parse_options("none | wandb (offline unless WANDB_MODE is set)") == (["none", "wandb"], False)
    assert widgets.parse_options("head learning rate") == ([], False)


def test_preview_follows_the_fields(make_panel):
    panel = make_panel(values={"epochs": 5, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}, steps_per_epoch=4)
    curve = panel.preview_curve
    assert len(curve) == 5 * 4 and curve.attrs["schedule"] == "constant"
    assert np.allclose(curve["head"], 1.0e-3) and np.allclose(curve["backbone"], 1.0e-3)
    # issue 14: one line per parameter group, with the freeze phase (backbone at a tenth, frozen 2 epochs)
    panel.set(backbone_lr_ratio=0.1, freeze_epochs=2)
    curve = panel.preview_curve
    assert curve["backbone"].iloc[:8].isna().all() and np.allclose(curve["backbone"].iloc[8:], 1.0e-4)
    assert curve.attrs["freeze_steps"] == 8
    panel.set(backbone_lr_ratio=1.0, freeze_epochs=0)

    # changing the widgets themselves (as a user does) redraws: cosine with 25% warmup
    panel.fields["lr_scheduler_type"].value = "cosine"
    panel.fields["warmup_ratio"].value = 0.25
    assert "cosine schedule, warmup 5 steps" in panel.preview_title.value
    lr = panel.preview_curve["head"].to_numpy()
    assert panel.preview_curve.attrs["schedule"] == "cosine" and panel.preview_curve.attrs["warmup_steps"] == 5
    assert lr.argmax() == 5 and np.all(np.diff(lr[:6]) > 0) and np.all(np.diff(lr[5:]) < 0)
    assert lr[0] < 1.0e-3 / 4 and lr[-1] < 1.0e-3 / 10 and np.isclose(lr.max(), 1.0e-3)

    panel.fields["learning_rate"].value = 0.01
    panel.fields["epochs"].value = 7
    assert len(panel.preview_curve) == 7 * 4 and np.isclose(panel.preview_curve["head"].max(), 0.01)

    unsized = make_panel(values={"epochs": 2, "batch_size": 64})  # issue 17 E: no cell-type estimate in the core
    assert unsized.preview_curve is None and "train_size=" in str(unsized.last_error)
    estimated = make_panel(values={"epochs": 2, "batch_size": 64}, train_size=560)
    assert len(estimated.preview_curve) == 2 * math.ceil(560 / 64)
    estimated.fields["batch_size"].value = 100
    assert len(estimated.preview_curve) == 2 * math.ceil(560 / 100)

    sized = make_panel(values={"epochs": 3, "batch_size": 32}, train_size=100)
    assert len(sized.preview_curve) == 3 * 4
    sized.fields["batch_size"].value = 50
    assert len(sized.preview_curve) == 3 * 2
    with pytest.raises(ValueError, match="train_size=0: give a positive int"):
        make_panel(train_size=0)

    before = estimated.preview_curve
    estimated.fields["epochs"].value = 0  # a half-typed value: no crash, the last curve stays
    assert estimated.preview_curve is before and "epochs=0" in str(estimated.last_error)


def test_export_writes_typed_yaml_the_driver_accepts(make_panel, tmp_path):
    panel = make_panel(values={"learning_rate": 1.0e-4, "seed": 3})
    panel.vary["lr_scheduler_type"].value = "constant, cosine"
    panel.vary["warmup_ratio"].value = "0, 1e-1, 0.1"
    panel.metric_field.value = "test_accuracy"
    path = panel.export_sweep("lr_try", output_root=tmp_path / "out")
    assert path == tmp_path / "sweeps" / "lr_try.yaml"

    spec = yaml.safe_load(path.read_text())
    assert spec["name"] == "lr_try" and spec["metric"] == "test_accuracy"
    assert spec["grid"] == {"lr_scheduler_type": ["constant", "cosine"], "warmup_ratio": [0.0, 0.1]}
    assert all(type(v) is float for v in spec["grid"]["warmup_ratio"])
    params = spec["parameters"]
    assert params["learning_rate"] == 1.0e-4 and type(params["learning_rate"]) is float
    assert type(params["epochs"]) is int and params["interactive"] is False
    assert "output_dir" not in params and "seed" not in params and spec["seeds"] == [3]
    assert not set(params) & set(spec["grid"])
    assert set(params) | set(spec["grid"]) | {"seed", "output_dir"} == set(notebook_parameters(NOTEBOOK))
    assert Path(spec["output_root"]) == tmp_path / "out"

    loaded = load_spec(path)
    assert loaded.notebook == NOTEBOOK and len(loaded.runs()) == 4

    # without seeds, seed stays a plain parameter
    panel.seeds_field.value = ""
    assert panel.sweep_spec("x")["parameters"]["seed"] == 3 and "seeds" not in panel.sweep_spec("x")

    panel.vary["strategy"].value = "full, frozen"
    with pytest.raises(ValueError, match="strategy='frozen' is not one of full, frozen_backbone, linear_probe"):
        panel.export_sweep("bad")
    panel.vary["strategy"].value = ""
    panel.seeds_field.value = "0, one"
    with pytest.raises(ValueError, match="'one' is not an integer"):
        panel.export_sweep("bad")
    panel.seeds_field.value = "0"
    with pytest.raises(ValueError, match="sweep name='my sweep'"):
        panel.export_sweep("my sweep")
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["lr_try.yaml"]

    # the button writes the spec named in the panel, and reports failures in the panel
    panel.name_field.value = "from_button"
    panel.export_button.click()
    assert panel.last_error is None and panel.last_spec_path == tmp_path / "sweeps" / "from_button.yaml"
    assert "Wrote " + str(panel.last_spec_path) in printed(panel.sweep_out)
    panel.name_field.value = "no good"
    panel.export_button.click()
    assert isinstance(panel.last_error, ValueError)
    assert "Export failed: ValueError: sweep name='no good'" in printed(panel.sweep_out)


def test_export_uses_the_seed_the_field_holds_now(make_panel, tmp_path):
    """Changing the seed field after opening the panel changes the exported sweep's seed (another split)."""
    panel = make_panel(values={"seed": 0})
    panel.fields["seed"].value = 5
    assert "-p seed 5" in panel.command()
    spec = yaml.safe_load(panel.export_sweep("seed_edit").read_text())
    assert spec["seeds"] == [5] and "seed" not in spec["parameters"]
    panel.set(seed=7)
    assert panel.sweep_spec("x")["seeds"] == [7]
    panel.seeds_field.value = "0, 1, 2"  # seeds the user typed stay as typed
    panel.fields["seed"].value = 9
    assert panel.sweep_spec("x")["seeds"] == [0, 1, 2]
    panel.seeds_field.value = ""  # empty: the seed above, as a plain parameter
    panel.fields["seed"].value = 4
    assert panel.sweep_spec("x")["parameters"]["seed"] == 4 and "seeds" not in panel.sweep_spec("x")


def test_exported_sweep_runs_through_the_driver(make_panel, tmp_path):
    panel = make_panel(values=TINY)
    panel.vary["lr_scheduler_type"].value = "constant, cosine"
    panel.seeds_field.value = "0"
    path = panel.export_sweep("panel_sweep", output_root=tmp_path / "out")

    result = run_sweep(path, workers=2, progress=False)
    assert result.n_failed == 0 and len(result.results) == 2
    assert sorted(result.results["lr_scheduler_type"]) == ["constant", "cosine"]
    assert result.results["test_accuracy"].between(0, 1).all()
    recorded = [json.loads(p.read_text()) for p in (tmp_path / "out" / "panel_sweep").glob("*/params.json")]
    assert len(recorded) == 2
    assert all(r["interactive"] is False and r["epochs"] == 1 and r["batch_size"] == 64 for r in recorded)
    assert not (tmp_path / "notebook_run").exists()


def test_train_button_runs_in_a_folder_of_its_own(make_panel, tmp_path):
    from workbench.tasks import cell_type

    calls = []

    def train(values, *, callbacks=()):
        calls.append((dict(values), list(callbacks)))
        return run_workflow(cell_type.WORKFLOW, values, callbacks=callbacks)

    panel = make_panel(values=TINY, train=train)
    panel.train_button.click()
    assert panel.last_error is None, panel.last_error
    assert 0.0 <= panel.last_result.final["test_accuracy"] <= 1.0

    notebook_run = tmp_path / "notebook_run"
    assert panel.last_run_dir == notebook_run / "panel" / "001"
    assert (panel.last_run_dir / "final_metrics.json").is_file()
    # the panel runs the notebook's own cells, so its run folder holds the same files (issue 14: no figures)
    assert {p.name for p in (panel.last_run_dir / "figures").iterdir()} >= {"training_curves.png", "confusion_matrix.png"}
    assert (panel.last_run_dir / "metrics.jsonl").is_file()
    assert not (notebook_run / "final_metrics.json").exists() and not (notebook_run / "params.json").exists()
    values, callbacks = calls[0]
    assert values["interactive"] is False and values["output_dir"] == str(panel.last_run_dir)
    assert [type(cb) for cb in callbacks] == [widgets.OutputCurves]
    assert json.loads((panel.last_run_dir / "params.json").read_text())["interactive"] is False
    assert panel.values()["interactive"] is True  # the panel's own field is untouched
    assert panel.train_button.disabled is False
    assert f"Run folder: {panel.last_run_dir}" in printed(panel.train_out)


def test_errors_in_the_panel_are_one_line(make_panel):
    """Issue 14: a bad value in Export printed a 5-frame traceback under its one-line message."""
    panel = make_panel()
    panel.vary["epochs"].value = "3, many"
    panel.export_button.click()
    text = printed(panel.sweep_out)
    assert text.startswith("Export failed: ValueError: parameter epochs='many'") and text.count("\n") == 1
    assert "Traceback" not in text and isinstance(panel.last_error, ValueError)
    with pytest.raises(TypeError, match="train must be a function"):
        make_panel(train="run_workflow")


def test_the_panel_says_what_it_runs_and_gives_the_command(make_panel, tmp_path):
    panel = make_panel(values={"epochs": 3, "lr_scheduler_type": "constant"})
    command = panel.command()
    assert command.startswith(f"workbench run {NOTEBOOK} ") and "-p epochs 3" in command
    assert "-p lr_scheduler_type constant" in command and "output_dir" not in command
    panel.fields["seed"].value = 4  # typing in a field updates the command line
    assert "-p seed 4" in panel.command_html.value
    html = "".join(getattr(child, "value", "") for child in panel.widget.children)
    assert "does not edit the notebook's parameters cell" in html
    assert panel.fields["output_dir"].layout.width == "560px"  # wide enough for a path


def test_the_panel_follows_the_open_notebook(tmp_path):
    """Issue 14: Export and Train used the repository's notebook even when the user worked in a copy."""
    from IPython.core.interactiveshell import InteractiveShell

    copy = tmp_path / "my_copy.ipynb"
    copy.write_bytes(NOTEBOOK.read_bytes())
    fallback = widgets.panel(fallback=NOTEBOOK)  # no kernel here: the fallback, with a note saying so
    assert fallback.notebook == NOTEBOOK and "no __session__" in fallback.note and fallback.note_html.value
    shell = InteractiveShell.instance()
    try:
        shell.user_ns["__session__"] = str(copy)  # what JupyterLab's kernel holds
        opened = widgets.panel(fallback=NOTEBOOK)
    finally:
        InteractiveShell.clear_instance()
    assert opened.notebook == copy and opened.note == ""
    assert opened.sweep_dir == tmp_path / "sweeps" and str(copy) in opened.command()
    opened.sweep_dir_field.value = str(tmp_path / "elsewhere")  # or a folder the user types
    path = opened.export_sweep("mine")
    assert path == tmp_path / "elsewhere" / "mine.yaml"
    assert yaml.safe_load(path.read_text())["notebook"].endswith("my_copy.ipynb")


def make_panel_metric(notebook) -> str:
    return widgets.panel(notebook).metric_field.value


def test_any_notebook_gets_a_panel(tmp_path):
    import nbformat

    source = ('hidden: list = [64, 32]  # layer sizes\n'
              'mode: str = "fast"  # fast | exact\n'
              'scale = 2.5  # no annotation: the type comes from the default\n')
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, metadata={"tags": ["parameters"]})],
                                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    path = tmp_path / "other.ipynb"
    nbformat.write(notebook, path)

    panel = widgets.panel(path, values={"hidden": [8]}, train=lambda values, callbacks=(): None)
    assert type(panel.fields["scale"]) is w.FloatText and isinstance(panel.fields["mode"], w.Dropdown)
    assert panel.fields["hidden"].value == "[8]" and panel.values()["hidden"] == [8]
    panel.set(hidden=[1, 2])
    assert panel.values() == {"hidden": [1, 2], "mode": "fast", "scale": 2.5}
    assert panel.preview_curve is None and "hidden" not in panel.vary and panel.seeds_field.disabled
    assert panel.metric_field.value == ""  # no workflow named in its metadata: no headline metric to offer
    assert make_panel_metric(NOTEBOOK) == "test_macro_f1"  # the cell-type workflow's first headline metric
    assert panel.sweep_dir == tmp_path / "sweeps"
    with pytest.raises(ValueError, match="declares no output_dir parameter"):
        panel.train()
    panel.vary["mode"].value = "fast, exact"
    spec = yaml.safe_load(panel.export_sweep("other").read_text())
    assert spec["notebook"] == "../other.ipynb" and spec["parameters"] == {"hidden": [1, 2], "scale": 2.5}
    assert spec["grid"] == {"mode": ["fast", "exact"]} and "seeds" not in spec


def test_find_lr_button_fills_learning_rate_and_leaves_the_model(make_panel):
    """Issue 15: the Find LR button runs the range test for the panel's values and fills learning_rate."""
    import torch

    from workbench.tasks import cell_type

    data = cell_type.load(seed=0)
    model = cell_type.build_model(data, hidden=(32,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = make_panel(values={"epochs": 2, "batch_size": 64}, steps_per_epoch=4,
                       find_lr=cell_type.lr_finder(model, data))
    assert panel.find_lr_button.disabled is False
    panel.find_lr_button.click()
    assert panel.last_error is None, panel.last_error
    suggestion = panel.last_lr_find.suggestion
    assert panel.values()["learning_rate"] == suggestion != 1.0e-3
    assert np.isclose(panel.preview_curve["head"].max(), suggestion)  # the preview follows the filled rate
    assert "learning_rate set to" in printed(panel.find_lr_out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    plain = make_panel()
    assert plain.find_lr_button.disabled is True
    with pytest.raises(ValueError, match="built without find_lr="):
        plain.find_lr()


@pytest.mark.parametrize("name", ["cell_type", "event_sequence", "heart_sound", "regulatory", "spatial_transfer"])
def test_the_panel_offers_every_declared_option(name):
    """Issue 22: fields and options come from the workflow's declaration, not from help comments (the cell-type
    panel lacked plateau, and cell type's `backed` offered auto, true and free text, when both were declared)."""
    from workbench.params import Choice
    from workbench.workflow import get_workflow

    workflow = get_workflow(name)
    panel = widgets.panel(workflow.notebook, train=lambda values, callbacks=(): None)
    assert panel.workflow is workflow and list(panel.fields) == list(workflow.parameters)
    kinds = {int: w.IntText, float: w.FloatText, bool: w.Checkbox, str: (w.Text, w.Dropdown, w.Combobox)}
    choices = 0
    for pname, param in workflow.parameters.items():
        field = panel.fields[pname]
        assert isinstance(field, kinds[param.type]), pname
        assert field.value == param.default and field.tooltip == param.help, pname
        if isinstance(param.accepts, Choice):
            choices += 1
            assert type(field) is (w.Combobox if param.accepts.or_path else w.Dropdown), pname
            assert list(field.options) == list(param.accepts.options), pname
            for option in param.accepts.options:
                panel.set(**{pname: option})  # each option is accepted as a value, too
            panel.set(**{pname: param.default})
    assert choices >= 4
    assert isinstance(panel.fields["device"], w.Combobox)  # auto | cpu | cuda, and cuda:N typed
    assert list(panel.fields["device"].options) == ["auto", "cpu", "cuda"]
