"""workbench.workflow: each workflow declared once, found through the registry, speaking one vocabulary."""

import json
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.params import Choice, Integer, ParameterError
from workbench.workflow import RUN_PARAMETERS, SHARED, SYNONYMS, Param, Workflow, headline_metrics, set_threads, \
    workflow_of

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("cell_type", "event_sequence", "heart_sound", "regulatory", "spatial_transfer")
WORKFLOWS = [wb.get_workflow(name) for name in BUILT_IN]


def _parameters_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))


def test_set_threads_follows_the_sweep_workers_variable(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("TORCH_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_built_in_workflows_are_found_through_the_entry_point_group():
    assert set(BUILT_IN) <= set(wb.workflows())
    with pytest.raises(KeyError, match="no workflow named 'cell_typ' .*Did you mean 'cell_type'"):
        wb.get_workflow("cell_typ")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_each_notebook_names_its_workflow_and_its_parameters_cell_equals_the_declaration(workflow):
    assert workflow.notebook.parent == ROOT / "notebooks" and workflow.notebook.is_file()
    assert workflow_of(workflow.notebook) is workflow
    assert headline_metrics(workflow.notebook) == workflow.headline_metrics and workflow.headline_metrics
    assert _parameters_cell(workflow.notebook) == workflow.parameters_cell(), (
        f"{workflow.notebook.name}: the parameters cell differs from the declaration; paste "
        f"wb.get_workflow({workflow.name!r}).parameters_cell() into it")
    workflow.check(workflow.defaults())  # the defaults pass their own constraints
    assert workflow.predictor_class() is not None
    assert workflow_of(ROOT / "tests" / "notebooks" / "tiny.ipynb") is None


def test_one_vocabulary_across_the_workflows():
    """A concept has one name, one type and one constraint in every workflow; run-level parameters everywhere."""
    seen: dict[str, tuple] = {}
    for workflow in WORKFLOWS:
        names = set(workflow.parameters)
        assert not names & set(SYNONYMS), f"{workflow.name} uses {names & set(SYNONYMS)}: {SYNONYMS}"
        assert set(RUN_PARAMETERS) <= names
        if "pretrained_checkpoint" in names:  # every workflow that pretrains exposes the same pretraining settings
            assert "pretrain_epochs" in names, f"{workflow.name} pretrains but has no pretrain_epochs"
        for name, param in workflow.parameters.items():
            shared = SHARED.get(name) or RUN_PARAMETERS.get(name)
            if shared is not None:
                assert param.type is shared.type, (workflow.name, name)
                if isinstance(shared.accepts, Choice) and isinstance(param.accepts, Choice):
                    assert set(param.accepts.options) <= set(shared.accepts.options), (workflow.name, name)
            else:  # a name only one workflow uses is fine; two workflows using it must agree on its type
                if name in seen:
                    assert seen[name][1] is param.type, f"{name}: {seen[name][0]} and {workflow.name} disagree"
                seen.setdefault(name, (workflow.name, param.type))


def test_a_declaration_refuses_a_synonym_a_wrong_type_and_a_missing_help(tmp_path):
    with pytest.raises(ValueError, match="'shot_ratio' is spelled 'label_fraction'"):
        Workflow("x", tmp_path / "x.ipynb", {"shot_ratio": Param(0.1, "share")})
    with pytest.raises(TypeError, match="epochs is a int in every workflow"):
        Workflow("x", tmp_path / "x.ipynb", {"epochs": Param(1.5)})
    with pytest.raises(ValueError, match="'depth' has no help text"):
        Workflow("x", tmp_path / "x.ipynb", {"depth": Param(2)})
    w = Workflow("x", tmp_path / "x.ipynb", {"depth": Param(2, "layers", Integer(ge=1)), "epochs": Param(3),
                                              "learning_rate": Param(1e-3)})
    assert list(w.parameters)[:3] == ["depth", "epochs", "learning_rate"] and "seed" in w.parameters
    assert w.parameters["epochs"].help == SHARED["epochs"].help
    assert "learning_rate: float = 1.0e-3  # peak learning rate" in w.parameters_cell()
    assert "output_dir: str = \"\"  # run folder; empty: a new dated folder under runs/x/" in w.parameters_cell()
    with pytest.raises(ParameterError) as err:
        w.check({"depht": 3, "epochs": "3", "learning_rate": 0})
    problems = err.value.problems
    assert "'depht' is not a parameter of the x workflow. Did you mean 'depth'?" in problems
    assert any("epochs='3' is a str; epochs is a int" in p for p in problems)
    assert "learning_rate=0 is not a number > 0." in problems
    assert w.check({"learning_rate": 1}) ["learning_rate"] == 1.0
    assert set(w.to_dict()["parameters"]) == set(w.parameters) and len(w.to_frame()) == len(w.parameters)
