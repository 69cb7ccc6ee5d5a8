"""Annotating an atlas: cells/s and peak memory of ``workbench predict`` on a backed 1M-cell .h5ad.

The file is the streaming benchmark's (``benchmarks/anndata_stream.py``): 1,000,000 cells x 2,000
genes, sparse CSR, about 5% non-zero, 10 types in ``obs["cell_type"]``, at
``data/cache/anndata_stream_1000000x2000.h5ad`` (written by the same code when missing).

What one run does:

1. a run folder with the workflow's default classifier (``CellTypeClassifier``, hidden 512, 256)
   over the 2,000 genes, fitted for one epoch on the first ``--train-cells`` cells of the file and
   saved the way a notebook run saves it (``predictor.json``, ``checkpoints/best.safetensors``);
2. in a new process (so that its peak memory is the prediction's alone): ``wb.load_run(run)``, then
   ``predictor.predict(file, backed="true")`` over all cells: streamed through
   :class:`workbench.streaming.StreamingBatches`, genes aligned, softmax per batch; then the table
   written as parquet. It reports wall and CPU seconds of the prediction, its peak RSS
   (``ru_maxrss``), and the accuracy of the labels against ``obs["cell_type"]`` (a check that the
   predictions mean something, not a score: most of these cells were not seen in training).

Usage (from the repository root)::

    nice python benchmarks/predict_stream.py

The last printed line is ``predict_stream cells_per_s=<n> cells_per_cpu_s=<n> peak_rss_gb=<g>``; the
details go to ``benchmarks/results/predict_stream.json``. Goals: cells_per_s >= 100000,
peak_rss_gb <= 2 at 1M cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results" / "predict_stream.json"
CACHE = REPO / "data" / "cache"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def make_run(path: Path, folder: Path, *, train_cells: int, seed: int = 0) -> Path:
    """A cell-type run folder for the atlas: the default classifier, one epoch on the first cells."""
    import shutil

    import torch

    from workbench.tasks import cell_type
    from workbench.tracking import Run
    from workbench.training import fit

    data = cell_type.load(str(path), "cell_type", backed="true", test_size=0.2, val_fraction=0.0, seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    run = Run(folder, params={"data_path": str(path), "train_cells": train_cells, "seed": seed})
    torch.manual_seed(seed)
    model = cell_type.build_model(data)
    batches = data.batches(np.arange(train_cells), batch_size=256, shuffle=True, seed=seed)
    fit(model, batches, epochs=1, learning_rate=1e-3, run=run, progress=False, restore_best=True)
    cell_type.save_predictor(run, model, data)
    return folder


def child(run_dir: str, path: str, out: str, batch_size: int, threads: int) -> None:
    """The measured part, in its own process: load the run, predict every cell of the backed file, write parquet."""
    import torch

    torch.set_num_threads(threads)
    import workbench as wb

    start, cpu = time.perf_counter(), time.process_time()
    predictor = wb.load_run(run_dir)
    predictions = predictor.predict(path, backed="true", batch_size=batch_size)
    predict_s, predict_cpu = time.perf_counter() - start, time.process_time() - cpu
    rss_predict = peak_rss_gb()
    start = time.perf_counter()
    predictions.write(out)
    write_s = time.perf_counter() - start
    import anndata

    truth = anndata.read_h5ad(path, backed="r").obs["cell_type"].astype(str).to_numpy()
    print(json.dumps({
        "cells": len(predictions), "predict_s": predict_s, "predict_cpu_s": predict_cpu, "write_parquet_s": write_s,
        "peak_rss_gb_predict": rss_predict, "peak_rss_gb": peak_rss_gb(), "threads": threads,
        "accuracy_vs_obs": float((predictions.labels == truth).mean()), "report": predictions.report.summary(),
    }))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--train-cells", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the prediction")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, metavar=("RUN", "FILE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, batch_size=args.batch_size, threads=args.threads)
        return 0

    from anndata_stream import write_atlas

    path = CACHE / f"anndata_stream_{args.cells}x{args.genes}.h5ad"
    written_s = None
    if not path.exists():
        start = time.perf_counter()
        write_atlas(path, n_cells=args.cells, n_genes=args.genes, density=args.density)
        written_s = time.perf_counter() - start
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {written_s:.0f} s", flush=True)
    run_dir = CACHE / "predict_stream_run"
    start = time.perf_counter()
    make_run(path, run_dir, train_cells=args.train_cells)
    print(f"run folder {run_dir} (one epoch on {args.train_cells:,} cells) in {time.perf_counter() - start:.0f} s",
          flush=True)

    out = CACHE / "predict_stream_predictions.parquet"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(path), str(out),
                           "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    cells_per_s = measured["cells"] / measured["predict_s"]
    cells_per_cpu_s = measured["cells"] / measured["predict_cpu_s"]
    result = {
        "file": str(path.relative_to(REPO)), "file_gb": path.stat().st_size / 1e9, "written_s": written_s,
        "cells": args.cells, "genes": args.genes, "density": args.density, "batch_size": args.batch_size,
        "model": "cell_type.CellTypeClassifier, hidden (512, 256), 10 classes", **measured,
        "cells_per_s": cells_per_s, "cells_per_cpu_s": cells_per_cpu_s, "process_s": process_s,
        "goals": {"cells_per_s": 100_000, "peak_rss_gb": 2.0},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0], "nice": os.nice(0)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(measured["report"])
    print(f"predicted {measured['cells']:,} cells in {measured['predict_s']:.1f} s wall, "
          f"{measured['predict_cpu_s']:.1f} s CPU ({measured['threads']} torch threads; load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); parquet written in "
          f"{measured['write_parquet_s']:.1f} s; labels agree with obs['cell_type'] on "
          f"{measured['accuracy_vs_obs']:.1%}")
    print(f"predict_stream cells_per_s={cells_per_s:.0f} cells_per_cpu_s={cells_per_cpu_s:.0f} "
          f"peak_rss_gb={measured['peak_rss_gb']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
