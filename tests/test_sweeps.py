"""workbench.sweeps and `workbench sweep | report`: real papermill runs of tests/notebooks/tiny.ipynb."""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workbench.cli import main
from workbench.schedules import SCHEDULES
from workbench.sweeps import available_cpus, load_spec, run_id, run_sweep, summarize

from .test_execute import TINY, expected_accuracy

REPO = Path(__file__).resolve().parents[1]

# 2 settings x 2 seeds, written as a list of grids so that exactly one run gets the typo 'cosin'
GRID_WITH_TYPO = [
    {"lr_scheduler_type": ["constant"], "seed": [0, 1]},
    {"lr_scheduler_type": ["cosine"], "seed": [0]},
    {"lr_scheduler_type": ["cosin"], "seed": [1]},
]


def write_spec(folder: Path, **spec) -> Path:
    spec = {"name": "tiny", "notebook": str(TINY), "output_root": str(folder / "out"), **spec}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def fix_typo(path: Path) -> None:
    path.write_text(path.read_text().replace("cosin\n", "cosine\n"))


def status_mtimes(sweep: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/status.json")
            if json.loads(p.read_text())["ok"]}


def edit_notebook(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the notebook's code cells (``old`` must occur)."""
    nb = json.loads(path.read_text())
    found = False
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and old in source:
            cell["source"] = source.replace(old, new).splitlines(keepends=True)
            found = True
    assert found, f"{old!r} is not in {path}"
    path.write_text(json.dumps(nb, indent=1))


def sweep_cli(spec: Path, *args: str) -> subprocess.Popen:
    """`workbench sweep SPEC ARGS` as a separate driver process."""
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", "sweep", str(spec), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_four_run_sweep(sweep: Path, *, workers: int) -> None:
    """3 ok and 1 failed run, both CSVs, the figure, and the thread settings the kernels saw."""
    results = pd.read_csv(sweep / "results.csv")
    assert len(results) == 4
    assert sorted(results["status"]) == ["failed", "ok", "ok", "ok"]
    failed = results[results["status"] == "failed"].iloc[0]
    assert failed["lr_scheduler_type"] == "cosin" and failed["seed"] == 1
    assert failed["failed_cell"] == 4
    assert "cell 4 (# check the parameters) failed: ValueError: lr_scheduler_type='cosin'" in failed["error"]
    ok = results[results["status"] == "ok"]
    assert [round(a, 6) for a in ok["accuracy"]] == [
        expected_accuracy(lr_scheduler_type=s, seed=seed) for s, seed in zip(ok["lr_scheduler_type"], ok["seed"])]

    summary = pd.read_csv(sweep / "summary.csv").set_index("setting")
    assert summary.loc["lr_scheduler_type=constant", "n"] == 2
    assert summary.loc["lr_scheduler_type=constant", "accuracy_mean"] == pytest.approx(
        (expected_accuracy(seed=0) + expected_accuracy(seed=1)) / 2)
    assert summary.loc["lr_scheduler_type=cosin", "n_failed"] == 1
    assert (sweep / "comparison.png").stat().st_size > 1000

    threads = str(max(1, available_cpus() // workers))
    for env in sweep.glob("*/env.json"):
        seen = json.loads(env.read_text())
        assert {k: seen[k] for k in ("OMP_NUM_THREADS", "TORCH_NUM_THREADS")} == {"OMP_NUM_THREADS": threads,
                                                                               "TORCH_NUM_THREADS": threads}


# --------------------------------------------------------------------------------------------
# spec handling (no kernels)
# --------------------------------------------------------------------------------------------


def test_run_ids_are_stable_readable_and_filesystem_safe():
    params = {"lr_scheduler_type": "cosine", "seed": 0, "note": "a/b c"}
    rid = run_id(params, shown=["lr_scheduler_type", "seed", "note"])
    assert rid.startswith("lr_scheduler_type=cosine,seed=0,note=a_b_c-")
    assert rid == run_id(dict(reversed(params.items())), shown=["lr_scheduler_type", "seed", "note"])
    assert rid != run_id({**params, "seed": 1}, shown=["lr_scheduler_type", "seed", "note"])
    assert "/" not in rid and " " not in rid


def test_spec_expands_grid_and_seeds_with_coerced_values(tmp_path):
    spec = load_spec(write_spec(tmp_path, parameters={"lr": "1e-3"}, grid={"lr_scheduler_type": ["constant", "cosine"]},
                                seeds=[0, "1"]))
    runs = spec.runs()
    assert [p for _, p in runs] == [
        {"lr": 1.0e-3, "lr_scheduler_type": s, "seed": seed} for s in ("constant", "cosine") for seed in (0, 1)]
    assert len({rid for rid, _ in runs}) == 4
    assert runs[0][0].startswith("lr_scheduler_type=constant,seed=0-")
    assert spec.path == tmp_path / "out" / "tiny"


def test_spec_notebook_is_found_next_to_the_spec_or_in_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "tiny.ipynb").write_text(TINY.read_text())
    (tmp_path / "specs").mkdir()
    next_to_spec = write_spec(tmp_path / "specs", notebook="../nb/tiny.ipynb")
    assert load_spec(next_to_spec).notebook == (tmp_path / "nb" / "tiny.ipynb").resolve()

    monkeypatch.chdir(tmp_path)
    assert load_spec({"name": "x", "notebook": "nb/tiny.ipynb"}).notebook == (tmp_path / "nb" / "tiny.ipynb").resolve()
    with pytest.raises(FileNotFoundError, match=r"notebook='missing.ipynb' not found; tried .*specs/missing.ipynb"):
        load_spec(write_spec(tmp_path / "specs", notebook="missing.ipynb"))


def test_spec_errors_name_the_problem_and_the_options(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'seed'; accepted: name, notebook"):
        load_spec(write_spec(tmp_path, seed=[0]))
    with pytest.raises(ValueError, match=r"'learning_rate' is not a parameter of tiny.ipynb.*lr \(float"):
        load_spec(write_spec(tmp_path, grid={"learning_rate": [0.1, 0.01]}))
    with pytest.raises(ValueError, match=r"grid\['lr'\] must be a non-empty list"):
        load_spec(write_spec(tmp_path, grid={"lr": 0.1}))
    with pytest.raises(ValueError, match="executor='ray' is not one of local, dask"):
        run_sweep(write_spec(tmp_path), executor="ray")


def test_summarize_groups_over_seeds_and_counts_failures():
    results = pd.DataFrame({
        "run_id": list("abcd"), "status": ["ok", "ok", "ok", "failed"],
        "schedule": ["constant", "constant", "cosine", "cosine"], "seed": [0, 1, 0, 1],
        "f1": [0.5, 0.7, 0.9, float("nan")],
    })
    summary = summarize(results, by=["schedule"], metrics=["f1"]).set_index("setting")
    assert list(summary.columns) == ["schedule", "n", "n_failed", "f1_mean", "f1_std"]
    assert summary.loc["schedule=constant", "f1_mean"] == pytest.approx(0.6)
    assert summary.loc["schedule=constant", "f1_std"] == pytest.approx(0.141421, abs=1e-6)
    assert summary.loc["schedule=cosine", "n"] == 2 and summary.loc["schedule=cosine", "n_failed"] == 1
    assert summary.loc["schedule=cosine", "f1_mean"] == pytest.approx(0.9)


def test_lr_schedule_spec_matches_the_cell_type_notebook():
    path = REPO / "notebooks" / "sweeps" / "lr_schedule.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == "lr_schedule" and raw["metric"] == "test_macro_f1"
    # both schedules warm up the same way; they differ only in what follows (see the spec's comment)
    assert raw["grid"] == {"lr_scheduler_type": ["constant_with_warmup", "cosine"]} and raw["seeds"] == [0, 1, 2]
    assert set(raw["grid"]["lr_scheduler_type"]) <= set(SCHEDULES), f"unknown schedule in {path.name}"
    assert (REPO / raw["notebook"]).is_file(), f"{path.name} runs {raw['notebook']}, which does not exist"
    spec = load_spec(path)  # checks every name against the notebook's parameters cell
    assert len(spec.runs()) == 6


@pytest.mark.parametrize("path", sorted((REPO / "notebooks" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_spec_of_the_repository_loads(path):
    spec = load_spec(path)  # its notebook exists and declares every parameter the spec sets
    assert spec.runs()


def test_run_ids_cover_the_sweep_name_the_notebook_and_the_parameters(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "nb").mkdir(parents=True)
    shutil.copy(TINY, repo / "nb" / "tiny.ipynb")
    shutil.copy(TINY, repo / "nb" / "other.ipynb")

    def run_ids(**changes) -> list[str]:
        spec = {"name": "a", "notebook": "nb/tiny.ipynb", "output_root": "runs", "seeds": [0, 1], **changes}
        return [rid for rid, _ in load_spec(spec).runs()]

    monkeypatch.chdir(repo)
    ids = run_ids()
    assert re.fullmatch(r"seed=0-[0-9a-f]{8}", ids[0]) and ids == run_ids(), "ids are readable and stable"
    assert not set(run_ids(name="b")) & set(ids), "another sweep name must give other run ids"
    assert not set(run_ids(notebook="nb/other.ipynb")) & set(ids), "another notebook must give other run ids"
    assert not set(run_ids(parameters={"epochs": 2})) & set(ids), "other fixed parameters must give other run ids"

    monkeypatch.chdir(tmp_path)
    shutil.move(repo, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    assert run_ids() == ids, "moving the whole repository must keep the run ids"

    params = {"seed": 0}
    assert run_id(params, shown=["seed"], sweep="a", notebook="nb/tiny.ipynb") != run_id(
        params, shown=["seed"], sweep="b", notebook="nb/tiny.ipynb")


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", "a\\b", "/tmp/absolute", "two words"])
def test_a_sweep_name_must_be_one_folder_inside_output_root(tmp_path, name):
    pattern = rf"name={re.escape(repr(name))} .*[Aa]ccepted: .*letters, digits"
    with pytest.raises(ValueError, match=pattern):
        load_spec(write_spec(tmp_path, name=name))
    with pytest.raises(ValueError, match=pattern):
        run_sweep({"name": name, "notebook": str(TINY), "output_root": str(tmp_path / "out")}, progress=False)
    assert not (tmp_path / "out").exists()


def test_output_root_may_be_any_folder_relative_or_absolute(tmp_path, monkeypatch):
    absolute = tmp_path / "elsewhere" / "sweeps"
    assert load_spec(write_spec(tmp_path, output_root=str(absolute))).path == absolute / "tiny"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_spec(write_spec(tmp_path, output_root="../up")).path.resolve() == tmp_path / "up" / "tiny"
    result = run_sweep(write_spec(tmp_path, output_root=str(absolute), name="abs"), progress=False)
    assert result.path == absolute / "abs" and list(result.results["status"]) == ["ok"]


# --------------------------------------------------------------------------------------------
# real sweeps
# --------------------------------------------------------------------------------------------


def test_sweep_isolates_a_failed_run_and_reruns_only_what_is_missing(tmp_path, capsys):
    spec = write_spec(tmp_path, grid=GRID_WITH_TYPO)
    sweep = tmp_path / "out" / "tiny"

    code = main(["sweep", str(spec), "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 1, "a failed run must make `workbench sweep` exit non-zero"
    assert "1 run(s) failed" in captured.err and "'cosin' is not one of constant, cosine" in captured.err
    assert "lr_scheduler_type=constant" in captured.out  # the summary table
    check_four_run_sweep(sweep, workers=2)
    done = status_mtimes(sweep)
    assert len(done) == 3

    fix_typo(spec)
    result = run_sweep(spec, workers=2, progress=False)
    assert result.n_executed == 1, "only the run with the fixed value may execute again"
    assert result.n_failed == 0 and len(result.results) == 4
    assert status_mtimes(sweep).items() >= done.items(), "completed runs were executed again"
    summary = result.summary.set_index("setting")
    assert list(summary["n"]) == [2, 2]
    assert summary.loc["lr_scheduler_type=cosine", "accuracy_mean"] == pytest.approx(
        (expected_accuracy(lr_scheduler_type="cosine", seed=0) + expected_accuracy(lr_scheduler_type="cosine", seed=1)) / 2)
    assert json.loads(json.dumps(result.to_dict()))["n_runs"] == 4
    assert result.to_frame().equals(pd.read_csv(sweep / "results.csv").astype(result.results.dtypes.to_dict()))
    assert "sweep tiny" in result._repr_html_()

    assert main(["report", str(sweep)]) == 0
    report = capsys.readouterr().out
    assert "lr_scheduler_type=cosine" in report and "4 runs, 0 not ok" in report
    run_folder = next(sweep.glob("lr_scheduler_type=cosine,seed=1-*"))
    assert main(["report", str(run_folder)]) == 0
    report = capsys.readouterr().out
    assert "status: ok" in report and f"accuracy  {expected_accuracy(lr_scheduler_type='cosine', seed=1)}" in report


def test_sweep_on_a_dask_local_cluster(tmp_path):
    spec = write_spec(tmp_path, grid=GRID_WITH_TYPO)
    sweep = tmp_path / "out" / "tiny"

    result = run_sweep(spec, workers=2, executor="dask", progress=False)
    assert result.n_executed == 4 and result.n_failed == 1
    check_four_run_sweep(sweep, workers=2)

    done = status_mtimes(sweep)
    fix_typo(spec)
    result = run_sweep(spec, workers=2, executor="dask", progress=False)
    assert result.n_executed == 1 and result.n_failed == 0
    assert status_mtimes(sweep).items() >= done.items()


def test_sigterm_keeps_completed_runs_and_a_rerun_finishes_the_rest(tmp_path):
    spec = write_spec(tmp_path, parameters={"sleep_s": 1.0}, seeds=[0, 1, 2])
    sweep = tmp_path / "out" / "tiny"
    driver = subprocess.Popen([sys.executable, "-m", "workbench.cli", "sweep", str(spec), "--workers", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list(sweep.glob("*/status.json")):
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no run completed within 90 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    assert "interrupted" in err

    done = status_mtimes(sweep)
    assert 1 <= len(done) < 3, f"expected the sweep to stop midway, completed: {sorted(done)}"
    assert len(list(sweep.glob("*/status.json"))) == len(done), "an interrupted run must not look finished"

    result = run_sweep(spec, workers=1, progress=False)
    assert result.n_executed == 3 - len(done)
    assert result.n_failed == 0 and list(result.results["status"]) == ["ok"] * 3
    assert status_mtimes(sweep).items() >= done.items(), "completed runs were executed again"


def test_two_sweeps_with_equal_run_ids_share_a_dask_cluster_without_mixing_their_runs(tmp_path):
    """Same name, notebook and parameters in two output folders: same run ids, but each sweep runs its own."""
    from distributed import LocalCluster

    specs = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        specs.append(write_spec(folder, parameters={"sleep_s": 3.0}, seeds=[0, 1]))
    assert [rid for rid, _ in load_spec(specs[0]).runs()] == [rid for rid, _ in load_spec(specs[1]).runs()]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        drivers = [sweep_cli(spec, "--executor", "dask", "--scheduler", cluster.scheduler_address) for spec in specs]
        try:
            outputs = [driver.communicate(timeout=180) for driver in drivers]
        finally:
            for driver in drivers:
                if driver.poll() is None:
                    driver.kill()
    for folder, driver, (out, err) in zip("ab", drivers, outputs):
        results = pd.read_csv(tmp_path / folder / "out" / "tiny" / "results.csv")
        assert list(results["status"]) == ["ok", "ok"], f"sweep {folder}: {results.to_dict('records')}\n{err}"
        assert driver.returncode == 0, err


def test_runs_of_an_earlier_notebook_are_counted_and_rerun_only_when_asked(tmp_path, capsys):
    notebook = tmp_path / "tiny.ipynb"
    shutil.copy(TINY, notebook)
    bug = "if seed == 1:\n    raise ValueError('seed 1 is broken')\n"
    edit_notebook(notebook, "# check the parameters\n", "# check the parameters\n" + bug)
    spec = write_spec(tmp_path, notebook=str(notebook), seeds=[0, 1])
    sweep = tmp_path / "out" / "tiny"
    result = run_sweep(spec, progress=False)
    assert result.n_failed == 1 and result.n_stale == 0
    done = status_mtimes(sweep)
    (seed0,) = done

    edit_notebook(notebook, bug, "")  # the fix
    with pytest.warns(UserWarning, match=r"1 finished run\(s\) of sweep tiny were made by an earlier .*version of "
                                         r"tiny.ipynb.*rerun_stale=True"):
        result = run_sweep(spec, progress=False)
    assert result.n_executed == 1, "only the failed run may execute again"
    assert result.n_failed == 0 and result.n_stale == 1
    assert status_mtimes(sweep)[seed0] == done[seed0]

    result = run_sweep(spec, progress=False, rerun_stale=True)
    assert result.n_executed == 1 and result.n_stale == 0 and result.n_failed == 0, result.results.to_dict("records")
    assert status_mtimes(sweep)[seed0] > done[seed0], "the stale run was not executed again"
    assert result.to_dict()["n_stale"] == 0

    # a status.json from before the notebook's hash was recorded counts as stale too; the CLI says so
    status_file = next(sweep.glob("seed=1-*/status.json"))
    status = json.loads(status_file.read_text())
    del status["notebook_sha256"]
    status_file.write_text(json.dumps(status))
    assert main(["sweep", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "0 executed now" in out and "1 finished run(s) were made by an earlier or unknown version" in out
    assert "--rerun-stale" in out
    assert main(["sweep", str(spec), "--rerun-stale"]) == 0
    out = capsys.readouterr().out
    assert "1 executed now" in out and "finished run(s)" not in out
    assert run_sweep(spec, progress=False).n_stale == 0


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_a_run_whose_status_cannot_be_written_fails_alone(tmp_path, capsys, executor):
    spec = write_spec(tmp_path, seeds=[0, 1])
    sweep = tmp_path / "out" / "tiny"
    broken = sweep / load_spec(spec).runs()[1][0]
    (broken / "status.json").mkdir(parents=True)  # writing status.json there fails with IsADirectoryError

    code = main(["sweep", str(spec), "--executor", executor, "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 1
    results = pd.read_csv(sweep / "results.csv")
    assert list(results["status"]) == ["ok", "failed"]
    assert "could not write status.json: IsADirectoryError" in results["error"][1]
    assert f"{broken.name}: " in captured.err and "could not write status.json" in captured.err


def wait_for_lock(lock: Path, pid: int, *, driver: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (lock.is_file() and lock.read_text().strip() == str(pid)):
        if driver is not None:
            assert driver.poll() is None, f"the driver ended without taking {lock}: {driver.communicate()}"
        assert time.monotonic() < deadline, f"{lock} did not name pid {pid} within {timeout} s"
        time.sleep(0.05)


def test_a_second_driver_on_the_same_sweep_folder_refuses(tmp_path, capsys):
    spec = write_spec(tmp_path, parameters={"sleep_s": 3.0})
    sweep = tmp_path / "out" / "tiny"
    first = sweep_cli(spec)
    try:
        wait_for_lock(sweep / ".sweep.lock", first.pid, driver=first)
        from workbench.sweeps import SweepLockedError

        with pytest.raises(SweepLockedError, match=rf"{re.escape(str(sweep))} .*pid {first.pid}.*[Ww]ait"):
            run_sweep(spec, progress=False)
        assert main(["sweep", str(spec)]) == 2
        err = capsys.readouterr().err
        assert str(sweep) in err and f"pid {first.pid}" in err
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert run_sweep(spec, progress=False).n_executed == 0, "the finished driver must have released the lock"


def test_the_lock_is_released_when_a_sweep_is_interrupted(tmp_path):
    spec = write_spec(tmp_path, parameters={"sleep_s": 8.0})
    sweep = tmp_path / "out" / "tiny"
    finished = threading.Event()
    seen = []

    def interrupt_while_running():
        while not finished.is_set():
            lock = sweep / ".sweep.lock"
            if lock.is_file() and lock.read_text().strip() == str(os.getpid()) and list(sweep.glob("*/notebook.ipynb")):
                seen.append(True)
                # The notebook is written before its kernel starts; a Ctrl-C that lands inside the kernel's launch
                # can be absorbed there (1 of 4 full runs, and twice in a row under load), so press again, as a user
                # would, while the sweep still runs (its notebook sleeps 8 s); 2.5 s apart, so that a press does not
                # land in the cleanup of the one before.
                for wait_s in (1.0, 2.5, 2.5):
                    if finished.wait(wait_s):
                        return
                    os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    # Ctrl-C as a user's process gets it: Python's default handler. In the full suite an earlier test in the same
    # pytest worker leaves SIGINT handled otherwise (the press never raised, 2 of 2 full runs; alone it passes).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=interrupt_while_running, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec, progress=False)
    finally:
        finished.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    assert seen, "the sweep did not hold the lock while it ran"
    with open(sweep / ".sweep.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while the lock is still held
    result = run_sweep(spec, progress=False)
    assert result.n_executed == 1 and result.n_failed == 0


def test_collect_keeps_a_final_metric_named_like_a_parameter(tmp_path):
    """Issue 21 item 13: spatial's final metric `folds` (folds run) was dropped beside its parameter `folds`."""
    from workbench.execute import METRICS_FILE, STATUS_FILE, notebook_sha256
    from workbench.sweeps import collect

    spec = load_spec(write_spec(tmp_path, grid={"epochs": [2, 3]}, seeds=[0]))
    for i, (rid, params) in enumerate(spec.runs()):
        folder = spec.path / rid
        folder.mkdir(parents=True)
        (folder / STATUS_FILE).write_text(json.dumps({"ok": True, "error": None, "failed_cell": None, "seconds": 1.0,
                                                      "notebook_sha256": notebook_sha256(spec.notebook)}))
        metrics = {"accuracy": 0.5 + i / 10, "epochs": params["epochs"] - 1, "seconds": 99.0}
        (folder / METRICS_FILE).write_text(json.dumps(metrics))
    result = collect(spec)
    frame = result.results.set_index("epochs")
    assert frame.loc[2, "metric_epochs"] == 1 and frame.loc[3, "metric_epochs"] == 2  # the runs' own numbers
    assert frame.loc[2, "metric_seconds"] == 99.0 and frame.loc[2, "seconds"] == 1.0
    assert frame.loc[3, "accuracy"] == pytest.approx(0.6)
    assert "metric_epochs_mean" in result.summary.columns
    assert pd.read_csv(spec.path / "results.csv")["metric_epochs"].tolist() == [1, 2]
