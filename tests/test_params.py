"""Parameters declared as data (workbench.params) and checked before any work starts (issue 12)."""

import json
from pathlib import Path

import pytest

from workbench import execute, sweeps
from workbench.cli import main
from workbench.params import Choice, Flag, Integer, ParameterError, Real, Spec, Text
from workbench.workflow import spec_of

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPE = ROOT / "notebooks" / "cell_type_annotation.ipynb"
WORKFLOW_NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if spec_of(p) is not None)


def test_each_constraint_accepts_its_values_and_names_what_it_accepts(tmp_path):
    spec = Spec(kind=Choice("cosine", "constant"), n=Integer(ge=1), lr=Real(gt=0, le=1), name=Text(nonempty=True),
                on=Flag(), ckpt=Choice("pretrain", "none", or_path=True), patience=Integer(ge=1, allow=(0,)))
    existing = tmp_path / "weights.safetensors"
    existing.write_bytes(b"x")
    good = dict(kind="cosine", n=3, lr=1, name="x", on=False, ckpt=str(existing), patience=0)
    assert spec.check(good) == good
    cases = {
        "kind": ("cosin", "kind='cosin' is not one of cosine, constant. Did you mean 'cosine'?"),
        "n": (0, "n=0 is not an integer >= 1."),
        "lr": (0.0, "lr=0.0 is not a number > 0 and <= 1."),
        "name": ("", "name='' is not a non-empty string."),
        "on": ("yes", "on='yes' is not True or False."),
        "ckpt": ("pretrian", "is not one of pretrain, none, and no file or folder exists at that path"),
        "patience": (-1, "patience=-1 is not an integer >= 1 (or 0)."),
    }
    for name, (value, phrase) in cases.items():
        with pytest.raises(ParameterError) as err:
            spec.check({**good, name: value})
        assert phrase in str(err.value), (name, str(err.value))
    assert spec.problems({**good, "n": True}) == ["n=True is not an integer >= 1."]  # a bool is not a number
    assert spec.problems({**good, "lr": float("nan")}) == ["lr=nan is not a number > 0 and <= 1."]
    assert spec.problems({"undeclared": object()}) == []  # names are the notebook's business


def test_every_problem_is_reported_at_once():
    spec = Spec(a=Integer(ge=1), b=Choice("x", "y"))
    with pytest.raises(ParameterError) as err:
        spec.check({"a": 0, "b": "z"}, where="nb.ipynb")
    assert err.value.problems == ["a=0 is not an integer >= 1.", "b='z' is not one of x, y."]
    assert str(err.value).startswith("nb.ipynb: 2 parameters are not accepted:")


def test_a_spec_holds_constraints_only():
    with pytest.raises(TypeError, match="must be a Constraint"):
        Spec(a=int)


@pytest.mark.parametrize("notebook", WORKFLOW_NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_parameter_is_declared_and_its_defaults_pass(notebook):
    """The declaration is complete: a parameter the spec misses would go unchecked."""
    spec = spec_of(notebook)
    declared = execute.notebook_parameters(notebook)
    missing = [name for name in declared if name not in spec]
    assert not missing, f"{notebook.name}: parameters with no constraint in PARAMETERS: {missing}"
    extra = [name for name in spec if name not in declared]
    assert not extra, f"{notebook.name}: PARAMETERS names parameters the notebook lacks: {extra}"
    spec.check(execute.notebook_defaults(notebook, declared=declared))
    source = "".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"])
    assert ".WORKFLOW.check(wb.params_of(globals()))" in source or ".WORKFLOW.start(globals()" in source, \
        "the notebook checks its own values too"


def test_workbench_run_refuses_a_bad_value_before_the_kernel_starts(tmp_path, capsys):
    """Issue 12: `-p lr_scheduler_type cosin` used to pretrain for 100 s before failing."""
    out = tmp_path / "run"
    code = main(["run", str(CELL_TYPE), "-p", "lr_scheduler_type", "cosin", "-p", "label_fraction", "1.5",
                 "-p", "epochs", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "lr_scheduler_type='cosin' is not one of constant, constant_with_warmup, cosine" in err
    assert "Did you mean 'cosine'?" in err and "label_fraction=1.5 is not a number > 0 and <= 1." in err
    assert not out.exists(), "nothing may start: no run folder, no kernel"


def test_run_in_process_refuses_a_bad_value_before_the_first_cell(tmp_path):
    with pytest.raises(ParameterError, match="strategy='frozen' is not one of full, frozen_backbone, linear_probe"):
        execute.run_in_process(CELL_TYPE, parameters={"strategy": "frozen", "output_dir": str(tmp_path / "r")})
    assert not (tmp_path / "r").exists()


def test_a_sweep_with_one_bad_grid_value_fails_at_load_naming_the_value_and_the_run(tmp_path):
    spec = {"name": "bad", "notebook": str(CELL_TYPE), "output_root": str(tmp_path),
            "parameters": {"epochs": 1}, "grid": {"lr_scheduler_type": ["cosine", "cosin"]}, "seeds": [0, 1]}
    with pytest.raises(ParameterError) as err:
        sweeps.load_spec(spec)
    text = str(err.value)
    assert "lr_scheduler_type='cosin' is not one of" in text and "Did you mean 'cosine'?" in text
    assert "sweep 'bad', run " in text and "cosin" in text.split("run ", 1)[1].split(":")[0]
    assert "(cell_type workflow) (2 of 4 runs" in text  # names the workflow whose declaration refused
    assert "(2 of 4 runs have values that are not accepted; no run was started.)" in text
    assert not any(tmp_path.iterdir())
