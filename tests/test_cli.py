"""The `workbench` command's view of the registry: `run NOTEBOOK --help`, `run NAME`, `workbench workflows`."""

from pathlib import Path

import pytest

from workbench.cli import main
from workbench.workflow import get_workflow, workflows

TINY = Path(__file__).parent / "notebooks" / "tiny.ipynb"


def test_run_notebook_help_lists_the_workflows_declared_parameters(capsys):
    workflow = get_workflow("regulatory")
    assert main(["run", str(workflow.notebook), "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: workbench run" in out and "--output-dir" in out  # the command's own options first
    assert workflow.help() in out
    listed = out.split("parameters of the regulatory workflow", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in listed] == list(workflow.parameters)
    assert "lora (adapters) | full (every weight) [one of full, lora]" in out  # help and constraint


def test_run_help_of_a_notebook_without_workflow_lists_its_parameters_cell(capsys):
    assert main(["run", str(TINY), "-h"]) == 0
    out = capsys.readouterr().out
    assert "parameters of tiny.ipynb (its parameters cell; it names no workflow)" in out
    assert "lr_scheduler_type  str   = \"constant\"   constant | cosine" in out


def test_run_accepts_a_registered_workflow_name(capsys):
    assert main(["run", "spatial_transfer", "--help"]) == 0
    assert get_workflow("spatial_transfer").help() in capsys.readouterr().out
    assert main(["run", "spatial_transfe", "-p", "epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "'spatial_transfe' is neither a notebook nor a registered workflow" in err
    assert "Did you mean 'spatial_transfer'?" in err


@pytest.mark.parametrize("argv", [["workflows"], ["run", "--list"]])
def test_the_registered_workflows_are_listed_with_title_and_notebook(argv, capsys):
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    found = workflows()
    assert len(found) >= 5 and len(lines) == 2 * len(found)
    for (name, workflow), first, second in zip(found.items(), lines[::2], lines[1::2]):
        assert first.split()[0] == name and first.endswith(workflow.title) and workflow.title
        assert second.strip() == str(workflow.notebook)
