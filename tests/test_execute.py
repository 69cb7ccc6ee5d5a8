"""workbench.execute and `workbench run`: real papermill runs of tests/notebooks/tiny.ipynb."""

import json
import math
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.execute import (coerce_parameters, ensure_kernel, notebook_parameters, notebook_sha256,
                               run_in_process, run_notebook)

TINY = Path(__file__).parent / "notebooks" / "tiny.ipynb"


def expected_accuracy(*, lr=1.0e-3, lr_scheduler_type="constant", seed=0, epochs=3):
    """The fake metric tiny.ipynb computes (kept in sync with its 'fake training' cell)."""
    bonus = 0.05 if lr_scheduler_type == "cosine" else 0.0
    return round(0.70 + bonus + 0.01 * seed + 0.01 * epochs - 0.02 * abs(math.log10(lr) + 3), 6)


def test_tiny_notebook_is_committed_without_outputs():
    nb = json.loads(TINY.read_text())
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert any("parameters" in cell["metadata"].get("tags", []) for cell in code)


def test_notebook_parameters_reads_types_from_annotations_and_defaults():
    declared = notebook_parameters(TINY)
    assert {name: d["type"] for name, d in declared.items()} == {
        "lr": "float", "lr_scheduler_type": "str", "seed": "int", "epochs": "int", "sleep_s": "float",
        "kill_kernel": "bool", "interactive": "bool", "output_dir": "str",
    }
    assert declared["lr"]["help"].startswith("learning rate")


def test_coerce_parameters_converts_strings_to_declared_types():
    values = coerce_parameters(TINY, {"lr": "1e-3", "seed": "3", "epochs": 2.0, "lr_scheduler_type": "cosine"})
    assert values == {"lr": 1.0e-3, "seed": 3, "epochs": 2, "lr_scheduler_type": "cosine"}
    assert type(values["lr"]) is float and type(values["seed"]) is int and type(values["epochs"]) is int

    with pytest.raises(ValueError, match=r"epochs=2\.5 .*cannot be converted to int"):
        coerce_parameters(TINY, {"epochs": 2.5})
    with pytest.raises(ValueError, match=r"lr='fast' \(str\) cannot be converted to float.*1\.0e-3"):
        coerce_parameters(TINY, {"lr": "fast"})


def test_unknown_parameter_lists_the_notebook_parameters(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        run_notebook(TINY, parameters={"learning_rate": 0.1}, output_dir=out)
    message = str(err.value)
    assert "'learning_rate' is not a parameter of tiny.ipynb" in message
    for name in ("lr (float", "lr_scheduler_type", "seed (int", "output_dir"):
        assert name in message
    assert not out.exists(), "nothing may run (or be created) for an invalid call"


def test_run_notebook_injects_coerced_parameters_and_records_the_run(tmp_path):
    out = tmp_path / "deep" / "run"  # parents do not exist yet
    result = run_notebook(TINY, parameters={"lr": "1e-2", "seed": "2", "lr_scheduler_type": "cosine"},
                          output_dir=out)

    assert result.ok, result.error
    assert result.error is None and result.seconds > 0
    assert result.notebook_path == out.resolve() / "notebook.ipynb" and result.notebook_path.is_file()
    params = json.loads((out / "params.json").read_text())
    assert params["lr"] == 0.01 and params["seed"] == 2 and params["lr_scheduler_type"] == "cosine"
    assert isinstance(params["seed"], int), "'2' must reach the notebook as an int"
    assert params["interactive"] is False, "a headless run must switch the notebook's widgets off"
    accuracy = expected_accuracy(lr=0.01, lr_scheduler_type="cosine", seed=2)
    assert result.final_metrics == {"accuracy": accuracy, "loss": round(1.0 - accuracy, 6)}

    status = json.loads((out / "status.json").read_text())
    assert status["ok"] is True and status["error"] is None
    injected = json.loads(result.notebook_path.read_text())["cells"]
    assert any(f"output_dir = \"{out.resolve()}\"" in "".join(c["source"]) for c in injected)
    assert json.loads(json.dumps(result.to_dict()))["final_metrics"]["accuracy"] == accuracy
    assert result.to_frame().loc[str(out.resolve()), "accuracy"] == accuracy
    assert "run ok" in result._repr_html_()


def test_failing_cell_is_reported_without_raising(tmp_path):
    out = tmp_path / "bad"
    result = run_notebook(TINY, parameters={"lr_scheduler_type": "cosin"}, output_dir=out)

    assert not result.ok
    # cell 4 of the executed notebook: markdown, parameters, injected parameters, the check
    assert result.failed_cell == 4
    assert result.error.startswith("cell 4 (# check the parameters) failed: ValueError: ")
    assert "lr_scheduler_type='cosin' is not one of constant, cosine" in result.error
    assert "\n" not in result.error
    assert result.final_metrics == {}
    status = json.loads((out / "status.json").read_text())
    assert status == {"ok": False, "error": result.error, "failed_cell": 4, "seconds": status["seconds"],
                      "notebook": str(TINY.resolve()), "notebook_sha256": notebook_sha256(TINY)}


def test_cell_timeout_is_a_failed_run_too(tmp_path):
    result = run_notebook(TINY, parameters={"sleep_s": 30}, output_dir=tmp_path / "slow", timeout=1)
    assert not result.ok
    assert result.failed_cell == 5 and "# fake training" in result.error
    assert "CellTimeoutError" in result.error
    assert result.seconds < 20
    assert json.loads((tmp_path / "slow" / "status.json").read_text())["ok"] is False


def test_dead_kernel_is_a_failed_run_and_raise_on_error_raises(tmp_path):
    result = run_notebook(TINY, parameters={"kill_kernel": "true"}, output_dir=tmp_path / "dead")
    assert not result.ok
    assert result.failed_cell == 5 and "DeadKernelError" in result.error
    assert json.loads((tmp_path / "dead" / "status.json").read_text())["ok"] is False

    with pytest.raises(RuntimeError, match=r"tiny.ipynb failed: cell 4 \(# check the parameters\) failed: ValueError"):
        run_notebook(TINY, parameters={"lr_scheduler_type": "cosin"}, output_dir=tmp_path / "bad", raise_on_error=True)
    assert json.loads((tmp_path / "bad" / "status.json").read_text())["ok"] is False


def test_ensure_kernel_installs_a_missing_kernelspec():
    from jupyter_client.kernelspec import KernelSpecManager

    name = "workbench-test-ensure-kernel"
    manager = KernelSpecManager()
    if name in manager.find_kernel_specs():
        manager.remove_kernel_spec(name)
    try:
        assert ensure_kernel(name) == name
        spec = KernelSpecManager().get_kernel_spec(name)
        assert "ipykernel" in " ".join(spec.argv)
    finally:
        KernelSpecManager().remove_kernel_spec(name)


def test_cli_run_success_prints_folder_and_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(TINY), "-p", "lr", "1e-3", "-p", "seed", "1"])
    captured = capsys.readouterr()

    assert code == 0, captured.err
    runs = list((tmp_path / "runs" / "tiny").iterdir())  # default: runs/<notebook stem>/<timestamp>
    assert len(runs) == 1 and (runs[0] / "status.json").is_file()
    assert f"run folder: {runs[0].resolve()}" in captured.out
    assert f"accuracy  {expected_accuracy(seed=1)}" in captured.out


def test_cli_run_failure_exits_nonzero_with_cell_and_error(tmp_path, capsys):
    code = main(["run", str(TINY), "-p", "lr_scheduler_type", "cosin", "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err

    assert code == 1
    first = err.splitlines()[0]
    assert first.startswith("workbench run: tiny.ipynb failed: cell 4 (# check the parameters) failed: ValueError:")
    assert "'cosin' is not one of constant, cosine" in first
    assert str((tmp_path / "run" / "notebook.ipynb").resolve()) in err


def test_cli_run_unknown_parameter_exits_2(tmp_path, capsys):
    code = main(["run", str(TINY), "-p", "lrr", "1", "-o", str(tmp_path / "run")])
    assert code == 2
    assert "'lrr' is not a parameter of tiny.ipynb" in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_before_the_kernel_starts(tmp_path):
    """Issue 17 A: the earlier run, executed notebook included, stays byte for byte; overwrite replaces it."""
    from workbench.tracking import RunFolderError

    out = tmp_path / "run"
    assert run_notebook(TINY, parameters={"seed": 0}, output_dir=out).ok
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match="seed: 0 there, 1 now"):
        run_notebook(TINY, parameters={"seed": 1}, output_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert run_notebook(TINY, parameters={"seed": 0}, output_dir=out).ok  # the same run again is fine
    assert run_notebook(TINY, parameters={"seed": 1}, output_dir=out, overwrite=True).ok
    assert json.loads((out / "params.json").read_text())["seed"] == 1


def test_run_in_process_runs_the_notebooks_cells_with_the_parameters(tmp_path):
    namespace = run_in_process(TINY, parameters={"seed": "2", "output_dir": str(tmp_path / "r")})
    assert namespace["seed"] == 2 and namespace["interactive"] is False
    assert namespace["final_metrics"]["accuracy"] == expected_accuracy(seed=2)
    assert json.loads((tmp_path / "r" / "final_metrics.json").read_text()) == namespace["final_metrics"]
