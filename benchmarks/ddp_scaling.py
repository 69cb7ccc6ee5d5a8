"""DDP scaling: training samples per second of ``workbench.fit`` with 1 and with 2 processes.

Both runs train the ~1M-parameter MLP of ``loop_parity.py`` on the same data with the same
*global* batch (one process: batch B; two processes: B/2 each, DistributedSampler), launched
by torchrun with gloo on the CPU. The machine's cores are split between the processes
(``--cores`` threads for one process, ``cores / 2`` each for two), so the comparison asks
"does the same hardware train faster with DDP", not "do more cores help".

samples/s = samples per epoch / median epoch time, the first epoch left out (warm-up). The two
configurations are launched alternately ``--repeats`` times; the figures are medians, and the
speedup is the median of the per-repeat ratios (this machine is shared and noisy).

Last line: ``ddp_scaling samples_per_s_1=<...> samples_per_s_2=<...> speedup=<2 over 1>``
Writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args) -> None:
    """One rank: train and (rank 0) write the epoch times to ``args.out``."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import workbench as wb
    from loop_parity import EpochTimer, loss_fn, make_data, make_model
    from workbench.distributed import context

    ctx = context()
    torch.set_num_threads(max(1, args.cores // int(os.environ.get("WORLD_SIZE", 1))))
    x, y = make_data(args.samples)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True,
                                       batch_size=args.global_batch // int(os.environ.get("WORLD_SIZE", 1)))

    timer = EpochTimer()
    history = wb.fit(make_model(0), data, loss_fn=loss_fn, epochs=args.epochs, learning_rate=1e-3, weight_decay=0.01,
                     lr_scheduler_type="cosine", warmup_ratio=0.05, grad_clip=1.0, seed=0,
                     callbacks=[timer], progress=False)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({"epoch_s": timer.times, "train_loss": history.rows[-1]["train_loss"],
                                              "distributed": ctx.enabled, "threads": torch.get_num_threads()}))


def launch(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--worker", "--out", str(out), "--samples", str(args.samples), "--epochs", str(args.epochs),
               "--global-batch", str(args.global_batch), "--cores", str(args.cores)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    timed = result["epoch_s"][1:] or result["epoch_s"]
    result["epoch_s_median"] = statistics.median(timed)
    result["samples_per_s"] = args.samples / result["epoch_s_median"]
    result["launch_and_run_s"] = time.perf_counter() - started
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs = {1: [], 2: []}
    for rep in range(args.repeats):  # interleaved, so that drift of a shared machine hits both alike
        for nproc in ((1, 2) if rep % 2 == 0 else (2, 1)):
            result = launch(nproc, args)
            runs[nproc].append(result)
            print(f"repeat {rep}, {nproc} process(es): {result['samples_per_s']:.0f} samples/s (median epoch "
                  f"{result['epoch_s_median']:.3f} s, {result['threads']} threads each, final train_loss "
                  f"{result['train_loss']:.4f})", flush=True)
    import torch

    rate = {n: statistics.median(r["samples_per_s"] for r in runs[n]) for n in runs}
    speedup = statistics.median(b["samples_per_s"] / a["samples_per_s"] for a, b in zip(runs[1], runs[2]))
    summary = {
        "samples_per_s_1": rate[1],
        "samples_per_s_2": rate[2],
        "speedup": speedup,
        "speedup_note": "median over repeats of (2-process / 1-process samples/s in the same repeat)",
        "runs": {str(k): v for k, v in runs.items()},
        "samples": args.samples,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "global_batch": args.global_batch,
        "cores": args.cores,
        "backend": "gloo",
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp_scaling.json").write_text(json.dumps(summary, indent=2))
    print(f"ddp_scaling samples_per_s_1={rate[1]:.0f} "
          f"samples_per_s_2={rate[2]:.0f} speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
