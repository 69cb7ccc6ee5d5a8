"""Run a workflow notebook on several processes: one rank of ``workbench run NOTEBOOK --nproc N``.

``workbench run notebooks/cell_type_annotation.ipynb --nproc 2 -o runs/ct_ddp`` starts
``torchrun --standalone --nproc_per_node 2 -m workbench.launch ...``; each process runs the
notebook's code cells in-process (:func:`workbench.execute.run_in_process`, the notebook is the
one definition of the steps) and every ``wb.fit`` inside trains with DistributedDataParallel.
On several machines, start this module with torchrun yourself, on each machine::

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \\
        -m workbench.launch notebooks/cell_type_annotation.ipynb -p epochs 20 -o /shared/runs/ct_ddp

What differs from a one-process run:

* Only rank 0 writes the run folder (params.json, metrics.jsonl, checkpoints, figures,
  ``status.json``); ``wb.Run`` is rank-aware. ``status.json`` is written once every rank has
  finished (their outcomes are gathered), and says ok only when every rank did. No executed notebook is written: the notebook
  stays the one-process view (open it, or ``workbench run`` without ``--nproc``, to see figures).
* Work that is cached (:func:`workbench.cache.cached`, e.g. pretraining) is built by one process
  while the others wait for it, then every rank loads it.
* Steps outside ``fit`` (data loading, baselines, evaluation) run on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "torchrun_command", "backend_environment"]


def backend_environment(nproc: int, backend: str = "auto", *, gpus: int | None = None, environ=None) -> dict:
    """The environment of the torchrun processes for ``backend``; a clear error when ``nproc`` exceeds the GPUs.

    ``auto``: nccl with one GPU per process when CUDA is available, else gloo. ``gloo``: CPU
    processes, also on a GPU machine (``device="auto"`` is then the CPU). ``gpus`` (default:
    ``torch.cuda.device_count()``) is the number of GPUs this machine's processes can use.
    """
    from .distributed import BACKEND_VAR

    env = dict(os.environ if environ is None else environ)
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend={backend!r} is not one of auto, nccl, gloo.")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        backend = "nccl" if gpus else "gloo"
    if backend == "nccl" and nproc > gpus:
        fewer = f"Use --nproc {gpus} or fewer, or" if gpus else "Use"
        raise ValueError(f"--nproc {nproc} with nccl needs {nproc} GPUs (one per process), but {gpus} "
                         f"{'is' if gpus == 1 else 'are'} visible. {fewer} --backend gloo to run CPU processes.")
    env[BACKEND_VAR] = backend
    return env


def torchrun_command(notebook, parameters: dict, output_dir, *, nproc: int) -> list[str]:
    """The command ``workbench run --nproc`` starts: torchrun on this machine with ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "workbench.launch", str(notebook), "-o", str(output_dir)]
    for name, value in parameters.items():
        cmd += ["-p", name, str(value)]
    return cmd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench.launch",
                                     description="One rank of a distributed notebook run (start it with torchrun).")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("-o", "--output-dir", type=Path, required=True,
                        help="run folder; every rank must be given the same one")
    return parser


def _outcomes(error: str | None, *, rank: int, world: int) -> dict[int, str | None]:
    """Every rank's error (None: it finished), gathered once all of them are done; this rank's alone with one."""
    if world <= 1:
        return {0: error}
    try:
        from .distributed import context

        return dict(enumerate(context(True).gather_objects(error)))
    except Exception as err:  # noqa: BLE001 - a rank that died or hung: not every rank is known to have finished
        text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return {rank: error, -1: f"not every rank reported that it finished ({text})"}


def main(argv: list[str] | None = None) -> int:
    """Run the notebook on this rank; rank 0 writes ``status.json`` once every rank has finished.

    Returns the exit status: 1 on rank 0 when another rank failed (a failure here raises).
    """
    from .execute import STATUS_FILE, notebook_sha256, run_in_process
    from .tracking import process_rank

    args = _parser().parse_args(argv)
    params = dict(args.parameter)
    out = args.output_dir.resolve()
    rank, world = process_rank(), int(os.environ.get("WORLD_SIZE", 1))
    start = time.perf_counter()
    error, failed = None, {}
    try:
        run_in_process(args.notebook, parameters={**params, "output_dir": str(out)})
    except Exception as err:  # noqa: BLE001 - recorded in status.json, then re-raised
        error = f"{type(err).__name__}: {err}".splitlines()[0]
        raise
    finally:
        failed = {r: e for r, e in _outcomes(error, rank=rank, world=world).items() if e is not None}
        if world > 1 and failed:
            error = "; ".join(e if r < 0 else f"rank {r}: {e}" for r, e in sorted(failed.items()))
        if rank == 0 and out.is_dir():
            status = {"ok": not failed, "error": error, "failed_cell": None,
                      "seconds": round(time.perf_counter() - start, 3), "notebook": str(args.notebook.resolve()),
                      "notebook_sha256": notebook_sha256(args.notebook), "world_size": world}
            (out / STATUS_FILE).write_text(json.dumps(status, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
