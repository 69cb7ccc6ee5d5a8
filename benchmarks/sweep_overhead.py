"""How much does running work as a papermill notebook cost, and do parallel sweeps pay off?

(a) per-run overhead: wall time of ``run_notebook`` on a workflow notebook, minus the same work
    done in-process; cold (the run starts its own kernel) and warm (the run takes a kernel that a
    sweep worker's :class:`workbench.kernels.WarmKernels` pool started and warmed meanwhile). By default the notebook is the cell-type workflow with the parameters
    ``make bench`` passes (``epochs=2``, ``pretrained_checkpoint=none``, ``interactive=False``),
    so the figure is what a workflow run pays, imports included. The in-process version is
    ``--function module:callable`` (called with the parameters and ``output_dir`` as keyword
    arguments) or, by default, the notebook's own code cells executed with ``exec`` in this
    process. All are timed ``--repeats`` times, interleaved, after one warm-up run; medians are
    compared. Warm runs are timed once the spare is ready (``per_run_warm_s``: what a sweep run
    pays when the run before it lasted longer than the warm-up) and back to back
    (``per_run_warm_back_to_back_s``: short runs that wait for the next kernel's imports).
(b) speedup of an ``--runs``-run sweep with 2 workers (1 thread each on 2 CPUs) over the same
    sweep with 1 worker. One worker is timed twice: with all CPUs' threads (what the sweep gives
    it, ``cpu_count // workers``) and with 1 thread, because on a busy machine extra threads can
    make a run slower, not faster (measured once here: 8.6 s of compute per run with 2 threads
    against 2.3 s with 1 thread). ``speedup_2w`` compares against the faster of the two, so it
    can only show what the second worker adds; both ratios are recorded. Each run does about
    ``--work-s`` seconds (single-threaded) of torch matmuls with
    ``torch.set_num_threads(TORCH_NUM_THREADS)``, the thread count the sweep passes down.

Usage (from the repository root)::

    python benchmarks/sweep_overhead.py                                  # what `make bench` runs
    python benchmarks/sweep_overhead.py --notebook tests/notebooks/tiny.ipynb --no-default-parameters
    python benchmarks/sweep_overhead.py -p epochs 1                      # replaces the default epochs=2

The last printed line is ``sweep_overhead per_run_s=<s> per_run_warm_s=<s> per_run_warm_back_to_back_s=<s>
speedup_2w=<x>``; the details go to ``benchmarks/results/sweep_overhead.json``. Targets: per_run_warm_s <= 1,
speedup_2w >= 1.6.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sweep_overhead.json"
#: The workflow notebook of (a) and the parameters `make bench` passes it (a short run, no pretraining, no widgets).
NOTEBOOK = REPO / "notebooks" / "cell_type_annotation.ipynb"
NOTEBOOK_PARAMETERS = {"epochs": "2", "pretrained_checkpoint": "none", "interactive": "False"}

CPU_WORK_PARAMETERS = """\
iters = 1000  # matmuls per run
size = 128  # matrix side
seed = 0
output_dir = "runs/cpu_work"
"""

CPU_WORK_BODY = """\
import json, os, pathlib, time
import torch

torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "1")))
torch.manual_seed(seed)
a, b = torch.randn(size, size), torch.randn(size, size)
start = time.perf_counter()
for _ in range(iters):
    c = a @ b
compute_s = time.perf_counter() - start
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
metrics = {"compute_s": compute_s, "threads": torch.get_num_threads(), "checksum": float(c.sum())}
(out / "final_metrics.json").write_text(json.dumps(metrics))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK,
                        help="notebook for the per-run overhead (default: notebooks/cell_type_annotation.ipynb)")
    parser.add_argument("--function", default=None,
                        help="module:callable doing the notebook's work in-process (default: exec its code cells)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="parameter for the notebook / function; repeat for several. With the default notebook "
                             "they are added to (and override) " + " ".join(f"-p {k} {v}" for k, v in
                                                                            NOTEBOOK_PARAMETERS.items()))
    parser.add_argument("--no-default-parameters", action="store_true",
                        help="pass only the -p parameters given, not the default notebook's short-run ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions for (a) (default: 3)")
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep of (b) (default: 8)")
    parser.add_argument("--no-sweep", action="store_true", help="measure (a) only")
    parser.add_argument("--work-s", type=float, default=2.5, help="single-thread CPU seconds per sweep run (default: 2.5)")
    parser.add_argument("--size", type=int, default=256, help="matrix side of the sweep's matmuls (default: 256)")
    parser.add_argument("--kernel", default="workbench", help="Jupyter kernel (default: workbench)")
    args = parser.parse_args(argv)
    given = dict(args.parameter)
    if args.notebook.resolve() == NOTEBOOK.resolve() and not args.no_default_parameters:
        given = {**NOTEBOOK_PARAMETERS, **given}
    args.parameter = list(given.items())
    return args


# (a) ------------------------------------------------------------------------------------------


def notebook_as_function(notebook: Path):
    """A callable that runs the notebook's code cells in this process, parameters applied."""
    import nbformat

    cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    params_cell = next((c for c in cells if "parameters" in c.metadata.get("tags", [])), None)
    rest = [c for c in cells if c is not params_cell]

    def strip_magics(source: str) -> str:
        return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))

    code = [compile(strip_magics(c.source), f"<{notebook.name} cell {i}>", "exec") for i, c in enumerate(rest)]
    params_code = compile(params_cell.source, "<parameters>", "exec") if params_cell else None

    def run(**params):
        namespace = {"__name__": "__main__"}
        if params_code is not None:
            exec(params_code, namespace)
        namespace.update(params)
        for block in code:
            exec(block, namespace)

    return run


def load_function(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--function={spec!r}: expected module:callable, e.g. workbench.tasks.cell_type:run")
    return getattr(importlib.import_module(module), name)


def time_calls(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def per_run_overhead(args, workdir: Path) -> dict:
    """Cold, warm and in-process runs, interleaved (one of each per repeat), so that load drifts hit all three.

    cold: ``run_notebook`` starting its own kernel. warm: ``run_notebook(kernels=...)`` taking a kernel that a
    :class:`workbench.kernels.WarmKernels` pool warmed after the previous run (the benchmark waits until the
    spare is ready, as a sweep run longer than the warm-up finds it; the next spare warms during the timed run,
    as in a sweep). warm_back_to_back: the same without the wait, the runs one after the other.
    """
    from workbench.execute import coerce_parameters, run_notebook
    from workbench.kernels import WarmKernels

    params = coerce_parameters(args.notebook, dict(args.parameter))
    function = load_function(args.function) if args.function else notebook_as_function(args.notebook)
    counter = iter(range(10**6))
    kernels = WarmKernels(kernel_name=args.kernel)

    def notebook_call(pool=None):
        result = run_notebook(args.notebook, parameters=params, output_dir=workdir / f"nb{next(counter)}",
                              kernel_name=args.kernel, kernels=pool)
        if not result.ok:
            raise SystemExit(f"{args.notebook} failed: {result.error}")

    def inprocess_call():
        function(**params, output_dir=str(workdir / f"fn{next(counter)}"))

    cold_s, warm_s, inprocess_s = [], [], []
    try:
        notebook_call(), notebook_call(kernels), inprocess_call()  # warm-up: imports, kernelspec, caches; the pool learns
        for _ in range(args.repeats):
            cold_s += time_calls(notebook_call, 1)
            if not kernels.wait_ready():
                raise SystemExit("the warm kernel did not become ready")
            warm_s += time_calls(lambda: notebook_call(kernels), 1)
            inprocess_s += time_calls(inprocess_call, 1)
        kernels.wait_ready()
        back_to_back_s = time_calls(lambda: notebook_call(kernels), args.repeats)
    finally:
        kernels.close()
    notebook = args.notebook.resolve()
    shown = notebook.relative_to(REPO).as_posix() if notebook.is_relative_to(REPO) else str(notebook)
    inprocess = statistics.median(inprocess_s)
    return {"notebook": shown, "function": args.function or "exec of the notebook's code cells",
            "parameters": params, "notebook_s": cold_s, "warm_notebook_s": warm_s,
            "warm_back_to_back_s": back_to_back_s, "inprocess_s": inprocess_s,
            "per_run_s": statistics.median(cold_s) - inprocess,
            "per_run_warm_s": statistics.median(warm_s) - inprocess,
            "per_run_warm_back_to_back_s": statistics.median(back_to_back_s) - inprocess}


# (b) ------------------------------------------------------------------------------------------


def write_cpu_work_notebook(path: Path) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(CPU_WORK_PARAMETERS, metadata={"tags": ["parameters"]}),
                             new_code_cell(CPU_WORK_BODY)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def iterations_for(work_s: float, size: int) -> int:
    """Matmuls of size x size that take about ``work_s`` seconds on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(20):
        a @ b
    n, start = 200, time.perf_counter()
    for _ in range(n):
        a @ b
    per_matmul = (time.perf_counter() - start) / n
    torch.set_num_threads(previous)
    return max(1, round(work_s / per_matmul))


@contextmanager
def cpus_seen_by_the_sweep(cpus: int):
    """Make ``run_sweep`` see ``cpus`` CPUs, so that each run gets ``cpus // workers`` threads.

    The sweep reads the CPU count once, in the driver, through ``workbench.sweeps.available_cpus``;
    the runs' processes are spawned with the thread count it computed.
    """
    from unittest import mock

    with mock.patch("workbench.sweeps.available_cpus", return_value=cpus):
        yield


def sweep_speedup(args, workdir: Path) -> dict:
    from workbench.sweeps import available_cpus, run_sweep

    notebook = write_cpu_work_notebook(workdir / "cpu_work.ipynb")
    iters = iterations_for(args.work_s, args.size)
    cpus = available_cpus()
    # (label, workers, threads per run); 1 worker with all threads, 1 worker with 1 thread, 2 workers
    settings = [("1w", 1, cpus), ("1w_1t", 1, 1), ("2w", 2, max(1, cpus // 2))]
    if cpus == 1:
        settings = [s for s in settings if s[0] != "1w_1t"]  # the same as "1w"
    timings, compute = {}, {}
    for label, workers, threads in settings:
        spec = {"name": f"cpu_work_{label}", "notebook": str(notebook),
                "parameters": {"iters": iters, "size": args.size},
                "seeds": list(range(args.runs)), "output_root": str(workdir / "sweeps")}
        with cpus_seen_by_the_sweep(threads * workers):
            start = time.perf_counter()
            result = run_sweep(spec, workers=workers, kernel_name=args.kernel, progress=False)
            timings[label] = time.perf_counter() - start
        if result.n_failed:
            raise SystemExit(f"sweep {label} had failed runs:\n{result.results[['run_id', 'error']]}")
        compute[label] = {"workers": workers, "threads": int(result.results["threads"].iloc[0]),
                          "sweep_s": timings[label],
                          "compute_s_mean": float(result.results["compute_s"].mean()),
                          "run_s_mean": float(result.results["seconds"].mean())}
    one_worker = {label: timings[label] for label in ("1w", "1w_1t") if label in timings}
    best = min(one_worker, key=one_worker.get)
    return {"runs": args.runs, "size": args.size, "iters": iters, "work_s": args.work_s, "cpus": cpus,
            "settings": compute,
            "speedup_2w_vs_1w": timings["1w"] / timings["2w"],
            "speedup_2w_vs_1w_1t": timings["1w_1t"] / timings["2w"] if "1w_1t" in timings else None,
            "faster_1w": best,
            "speedup_2w": timings[best] / timings["2w"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        overhead = per_run_overhead(args, Path(tmp))
        speedup = None if args.no_sweep else sweep_speedup(args, Path(tmp))
    if speedup is None:
        record = {k: round(v, 3) for k, v in overhead.items() if k.startswith("per_run")}
        print(json.dumps({**overhead, "loadavg_before": load_before}, indent=2, default=str))
        print("sweep_overhead " + " ".join(f"{k}={v:.2f}" for k, v in record.items()) + " (not recorded: --no-sweep)")
        return 0
    record = {"per_run_s": round(overhead["per_run_s"], 3), "per_run_warm_s": round(overhead["per_run_warm_s"], 3),
              "per_run_warm_back_to_back_s": round(overhead["per_run_warm_back_to_back_s"], 3),
              "speedup_2w": round(speedup["speedup_2w"], 3),
              "speedup_2w_vs_1w": round(speedup["speedup_2w_vs_1w"], 3),
              "speedup_2w_vs_1w_1t": None if speedup["speedup_2w_vs_1w_1t"] is None
              else round(speedup["speedup_2w_vs_1w_1t"], 3),
              "speedup_2w_against": f"the faster 1-worker setting: {speedup['faster_1w']}",
              "targets": {"per_run_warm_s": "<= 1", "speedup_2w": ">= 1.6"},
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "python": sys.version.split()[0],
              "overhead": overhead, "sweep": speedup}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    vs_1t = record["speedup_2w_vs_1w_1t"]
    print(f"speedup of 2 workers: {record['speedup_2w_vs_1w']:.2f}x over 1 worker with {speedup['cpus']} threads, "
          + (f"{vs_1t:.2f}x over 1 worker with 1 thread; " if vs_1t is not None else "")
          + f"speedup_2w uses the faster ({speedup['faster_1w']})")
    print(f"sweep_overhead per_run_s={record['per_run_s']:.2f} per_run_warm_s={record['per_run_warm_s']:.2f} "
          f"per_run_warm_back_to_back_s={record['per_run_warm_back_to_back_s']:.2f} speedup_2w={record['speedup_2w']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
