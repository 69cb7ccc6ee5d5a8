"""How much does running work as a papermill notebook cost, and do parallel sweeps pay off?

(a) per-run overhead: wall time of ``run_notebook`` on a short notebook, minus the same work done
    in-process. The in-process version is ``--function module:callable`` (called with the
    parameters and ``output_dir`` as keyword arguments) or, by default, the notebook's own code
    cells executed with ``exec`` in this process. Both are timed ``--repeats`` times after one
    warm-up run; medians are compared.
(b) speedup of an ``--runs``-run sweep with 2 workers over the same sweep with 1 worker. Each run
    does about ``--work-s`` seconds (single-threaded) of torch matmuls with
    ``torch.set_num_threads(TORCH_NUM_THREADS)``, the thread count the sweep passes down
    (``cpu_count // workers``), so the number measures parallel throughput, not kernel start-up alone.

Usage (from the repository root)::

    python benchmarks/sweep_overhead.py
    python benchmarks/sweep_overhead.py --notebook notebooks/cell_type_annotation.ipynb \
        --function workbench.tasks.cell_type:run -p epochs 1

The last printed line is ``sweep_overhead per_run_s=<s> speedup_2w=<x>``; the details go to
``benchmarks/results/sweep_overhead.json``. Targets: per_run_s <= 4, speedup_2w >= 1.6.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sweep_overhead.json"

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
    parser.add_argument("--notebook", type=Path, default=REPO / "tests" / "notebooks" / "tiny.ipynb",
                        help="short notebook for the per-run overhead (default: tests/notebooks/tiny.ipynb)")
    parser.add_argument("--function", default=None,
                        help="module:callable doing the notebook's work in-process (default: exec its code cells)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="parameter for the notebook / function; repeat for several")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions for (a) (default: 3)")
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep of (b) (default: 8)")
    parser.add_argument("--work-s", type=float, default=2.5, help="single-thread CPU seconds per sweep run (default: 2.5)")
    parser.add_argument("--size", type=int, default=128, help="matrix side of the sweep's matmuls (default: 128)")
    parser.add_argument("--kernel", default="workbench", help="Jupyter kernel (default: workbench)")
    return parser.parse_args(argv)


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
    from workbench.execute import coerce_parameters, run_notebook

    params = coerce_parameters(args.notebook, dict(args.parameter))
    function = load_function(args.function) if args.function else notebook_as_function(args.notebook)
    counter = iter(range(10**6))

    def notebook_call():
        result = run_notebook(args.notebook, parameters=params, output_dir=workdir / f"nb{next(counter)}",
                              kernel_name=args.kernel)
        if not result.ok:
            raise SystemExit(f"{args.notebook} failed: {result.error}")

    def inprocess_call():
        function(**params, output_dir=str(workdir / f"fn{next(counter)}"))

    notebook_call(), inprocess_call()  # warm-up: imports, kernelspec, caches
    notebook_s = time_calls(notebook_call, args.repeats)
    inprocess_s = time_calls(inprocess_call, args.repeats)
    return {"notebook": str(args.notebook), "function": args.function or "exec of the notebook's code cells",
            "parameters": params, "notebook_s": notebook_s, "inprocess_s": inprocess_s,
            "per_run_s": statistics.median(notebook_s) - statistics.median(inprocess_s)}


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


def sweep_speedup(args, workdir: Path) -> dict:
    from workbench.sweeps import run_sweep

    notebook = write_cpu_work_notebook(workdir / "cpu_work.ipynb")
    iters = iterations_for(args.work_s, args.size)
    timings, compute = {}, {}
    for workers in (1, 2):
        spec = {"name": f"cpu_work_{workers}w", "notebook": str(notebook), "parameters": {"iters": iters, "size": args.size},
                "seeds": list(range(args.runs)), "output_root": str(workdir / "sweeps")}
        start = time.perf_counter()
        result = run_sweep(spec, workers=workers, kernel_name=args.kernel, progress=False)
        timings[workers] = time.perf_counter() - start
        if result.n_failed:
            raise SystemExit(f"sweep with {workers} worker(s) had failed runs:\n{result.results[['run_id', 'error']]}")
        compute[workers] = {"compute_s_mean": float(result.results["compute_s"].mean()),
                            "threads": int(result.results["threads"].iloc[0]),
                            "run_s_mean": float(result.results["seconds"].mean())}
    return {"runs": args.runs, "size": args.size, "iters": iters, "work_s": args.work_s,
            "sweep_1w_s": timings[1], "sweep_2w_s": timings[2], "per_worker_count": compute,
            "speedup_2w": timings[1] / timings[2]}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        overhead = per_run_overhead(args, Path(tmp))
        speedup = sweep_speedup(args, Path(tmp))
    record = {"per_run_s": round(overhead["per_run_s"], 3), "speedup_2w": round(speedup["speedup_2w"], 3),
              "targets": {"per_run_s": "<= 4", "speedup_2w": ">= 1.6"},
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "python": sys.version.split()[0],
              "overhead": overhead, "sweep": speedup}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    print(f"sweep_overhead per_run_s={record['per_run_s']:.2f} speedup_2w={record['speedup_2w']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
