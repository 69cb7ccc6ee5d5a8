"""Atlas-scale streaming: cells/s, peak memory and scaling of the cell-type data path on a 1M-cell .h5ad.

The file: a synthetic sparse CSR ``.h5ad`` of 1,000,000 cells x 2,000 genes, about 5% non-zero
(log1p of Poisson counts, float32; 10 cell types in ``obs["cell_type"]``), written in chunks to
``data/cache/anndata_stream_1000000x2000.h5ad`` (git-ignored) and reused by the next run.

What one run measures, all through the training data path (``cell_type.load(..., backed="true")``
then ``CellData.batches(..., batch_size=256, shuffle=True)``: scdataset's block shuffling over the
backed file, densified to float32 tensors per batch):

- the time of one epoch over the first 10k, 100k and 1M cells (``scale_10x``: the larger of the
  100k/10k and 1M/100k epoch-time ratios);
- cells/s: cells of the 1M epoch over its wall time (and over this process's CPU time, which a busy
  shared machine does not inflate);
- peak RSS of this process (``ru_maxrss``) after everything, the file written and the references included;
- references on the 100k subset, in the same run: anndata's ``AnnLoader`` (batch 256, shuffled) over
  the backed subset, and an in-memory load (the 100k rows read into a CSR matrix, then shuffled
  batches densified the way the old ``ExpressionBatches`` did). The AnnLoader epoch is timed over
  ``--annloader-batches`` batches (default: all), since it reads cell by cell.

Usage (from the repository root)::

    nice python benchmarks/anndata_stream.py

The last printed line is ``anndata_stream cells_per_s=<n> peak_rss_gb=<g> scale_10x=<x>``; the
details go to ``benchmarks/results/anndata_stream.json``. Goals: cells_per_s >= 100000,
peak_rss_gb <= 2 at 1M cells, scale_10x <= 11.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "anndata_stream.json"
CACHE = REPO / "data" / "cache"
N_TYPES = 10


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def write_atlas(path: Path, *, n_cells: int, n_genes: int, density: float, seed: int = 0,
                chunk: int = 20_000) -> None:
    """Write a sparse CSR .h5ad chunk by chunk (never the whole matrix in memory), atomically."""
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    staging = path.with_name(f".{path.name}.staging")
    path.parent.mkdir(parents=True, exist_ok=True)
    types = np.array([f"type_{k}" for k in range(N_TYPES)])
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    labels = rng.integers(0, N_TYPES, n_cells)
    # chunk by chunk into resizable (so chunked) staging datasets, then copied into contiguous ones, the layout
    # anndata's write_h5ad gives (reading a few rows from a dataset chunked in 4 MB pieces costs 30x more)
    with h5py.File(staging, "w") as stage:
        data = stage.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = stage.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            mask = rng.random((stop - start, n_genes), dtype=np.float32) < density
            rows, cols = np.nonzero(mask)
            # each type has its own marker genes with higher counts, so the labels are learnable
            marker = (cols // 100) % N_TYPES == labels[start + rows]
            values = np.log1p(rng.poisson(np.where(marker, 4.0, 1.0)) + 1).astype(np.float32)
            n_old = data.shape[0]
            data.resize((n_old + len(values),))
            indices.resize((n_old + len(values),))
            data[n_old:], indices[n_old:] = values, cols.astype(np.int32)
            indptr[start + 1:stop + 1] = n_old + np.cumsum(np.bincount(rows, minlength=stop - start))
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
            X = f.create_group("X")
            X.attrs["encoding-type"], X.attrs["encoding-version"] = "csr_matrix", "0.1.0"
            X.attrs["shape"] = np.array([n_cells, n_genes])
            for name in ("data", "indices"):
                source = stage[name]
                target = X.create_dataset(name, shape=source.shape, dtype=source.dtype)
                for s in range(0, source.shape[0], 1 << 24):
                    target[s:s + (1 << 24)] = source[s:s + (1 << 24)]
            X.create_dataset("indptr", data=indptr)
            obs = pd.DataFrame({"cell_type": pd.Categorical(types[labels])},
                               index=pd.Index([f"cell_{i}" for i in range(n_cells)]))
            var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(n_genes)]))
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
    staging.unlink()
    anndata.read_h5ad(tmp, backed="r").file.close()  # a valid AnnData before it takes the final name
    os.replace(tmp, path)


def epoch(batches) -> tuple[float, float, int]:
    """Wall seconds and CPU seconds (this process) for one pass, and the cells it yielded."""
    start, cpu, cells = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        cells += batch[0].shape[0]
    return time.perf_counter() - start, time.process_time() - cpu, cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--annloader-batches", type=int, default=50,
                        help="batches timed for AnnLoader, which reads cell by cell (0: a whole epoch)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    from workbench.tasks import cell_type

    torch.set_num_threads(1)
    path = CACHE / f"anndata_stream_{args.cells}x{args.genes}.h5ad"
    written_s = None
    if not path.exists():
        start = time.perf_counter()
        write_atlas(path, n_cells=args.cells, n_genes=args.genes, density=args.density)
        written_s = time.perf_counter() - start
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {written_s:.0f} s", flush=True)
    rss_after_write = peak_rss_gb()

    start = time.perf_counter()
    data = cell_type.load(str(path), "cell_type", backed="true", test_size=0.2, val_fraction=0.0)
    load_s = time.perf_counter() - start
    print(f"load (backed; obs, splits, one scan for hash and NaN): {load_s:.1f} s; {data.summary()}", flush=True)

    sizes = [n for n in (10_000, 100_000, 1_000_000) if n <= args.cells]
    epochs, cpu_epochs = {}, {}
    for n in sizes:
        batches = data.batches(np.arange(n), batch_size=args.batch_size, shuffle=True, seed=0)
        seconds, cpu, cells = epoch(batches)
        assert cells == n, (cells, n)
        epochs[n], cpu_epochs[n] = seconds, cpu
        print(f"streamed epoch over {n:>9,} cells: {seconds:7.2f} s wall, {cpu:7.2f} s CPU  "
              f"({n / seconds:,.0f} cells/s wall, {n / cpu:,.0f} per CPU-second)  load {os.getloadavg()[0]:.1f}",
              flush=True)
    rss_stream = peak_rss_gb()
    ratios = [epochs[b] / epochs[a] for a, b in zip(sizes, sizes[1:])]
    cpu_ratios = [cpu_epochs[b] / cpu_epochs[a] for a, b in zip(sizes, sizes[1:])]
    top = sizes[-1]
    cells_per_s = top / epochs[top]

    # references on the 100k subset
    ref_n = min(100_000, args.cells)
    refs = {}
    import anndata
    import scipy.sparse as sp
    from anndata.experimental import AnnLoader

    backed = anndata.read_h5ad(path, backed="r")
    loader = AnnLoader(backed[:ref_n], batch_size=args.batch_size, shuffle=True)
    start, cells = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        cells += batch.X.shape[0]
        if args.annloader_batches and i + 1 >= args.annloader_batches:
            break
    seconds = time.perf_counter() - start
    refs["annloader_backed"] = {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds}
    backed.file.close()
    print(f"AnnLoader (backed, shuffled) on {cells:,} of {ref_n:,} cells: {cells / seconds:,.0f} cells/s", flush=True)

    start = time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r")
    X = sp.csr_matrix(adata.X[:ref_n], dtype=np.float32)
    adata.file.close()
    read_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    start, cells = time.perf_counter(), 0
    order = torch.randperm(ref_n, generator=gen).numpy()
    for s in range(0, ref_n, args.batch_size):
        x = torch.from_numpy(X[order[s:s + args.batch_size]].toarray())
        cells += x.shape[0]
    seconds = time.perf_counter() - start
    refs["in_memory"] = {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds, "read_s": read_s}
    print(f"in memory (CSR, random batches) on {ref_n:,} cells: {cells / seconds:,.0f} cells/s "
          f"(+{read_s:.1f} s to read)", flush=True)
    ours_100k = 100_000 / epochs[100_000] if 100_000 in epochs else None

    peak = peak_rss_gb()
    result = {
        "file": str(path.relative_to(REPO)), "file_gb": path.stat().st_size / 1e9, "written_s": written_s,
        "cells": args.cells, "genes": args.genes, "density": args.density, "batch_size": args.batch_size,
        "block_size": data.batches(np.arange(10), batch_size=1).block_size,
        "fetch_factor": data.batches(np.arange(10), batch_size=1).fetch_factor,
        "load_s": load_s, "epoch_s": {str(n): s for n, s in epochs.items()}, "scale_ratios": ratios,
        "scale_10x": max(ratios) if ratios else None, "cells_per_s": cells_per_s,
        "epoch_cpu_s": {str(n): s for n, s in cpu_epochs.items()}, "scale_ratios_cpu": cpu_ratios,
        "scale_10x_cpu": max(cpu_ratios) if cpu_ratios else None, "cells_per_cpu_s": top / cpu_epochs[top],
        "streamed_100k_cells_per_s": ours_100k, "references_100k": refs,
        "peak_rss_gb": peak, "peak_rss_gb_after_write": rss_after_write, "peak_rss_gb_after_streaming": rss_stream,
        "goals": {"cells_per_s": 100_000, "peak_rss_gb": 2.0, "scale_10x": 11.0},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                    "nice": os.nice(0)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"(per CPU-second of this process: {result['cells_per_cpu_s']:.0f} cells; CPU-time scale_10x "
          f"{result['scale_10x_cpu']:.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"anndata_stream cells_per_s={cells_per_s:.0f} peak_rss_gb={peak:.2f} "
          f"scale_10x={result['scale_10x']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
