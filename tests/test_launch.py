"""A workflow notebook on 2 processes: `workbench run NOTEBOOK --nproc 2` (torchrun, gloo, real files; issue 11)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from workbench.batches import TensorBatches
from workbench.checkpoints import load_state
from workbench.distributed import shard_indices

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "cell_type_annotation.ipynb"


def test_shard_indices_split_an_epoch_like_distributed_sampler():
    order = np.array([5, 3, 0, 4, 1, 2, 6])
    shards = [shard_indices(order, r, 2) for r in (0, 1)]
    assert [s.tolist() for s in shards] == [[5, 0, 1, 6], [3, 4, 2, 5]]  # padded by repeating the start
    assert shard_indices(order, 0, 1) is order
    sampler = torch.utils.data.DistributedSampler(range(7), num_replicas=2, rank=1, shuffle=False)
    assert shard_indices(np.arange(7), 1, 2).tolist() == list(sampler)


def test_index_batches_shard_themselves_and_keep_one_generator():
    x = torch.arange(10.0)
    batches = TensorBatches((x, x * 2), batch_size=3, shuffle=True, seed=4)
    ranks = [batches.shard(r, 2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2] and len(batches) == 4
    seen = [torch.cat([b[0] for b in r]) for r in ranks]  # one epoch each, from equal generator states
    ranks[1].generator.manual_seed(4)
    seen[1] = torch.cat([b[0] for b in ranks[1]])
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    assert ranks[0].generator is batches.generator  # fit checkpoints and restores this one RNG


def test_workbench_run_nproc_trains_the_notebook_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_NUM_THREADS": "1", "WORKBENCH_CACHE": str(tmp_path / "cache"),
           "WORKBENCH_DDP_TIMEOUT_S": "120"}
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(NOTEBOOK), "--nproc", "2", "-p", "epochs", "2",
           "-p", "pretrained_checkpoint", "pretrain", "-p", "seed", "3", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes" in done.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["ok"] and status["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote, one row per epoch
    assert json.loads((out / "final_metrics.json").read_text())["test_accuracy"] > 0
    assert load_state(out / "checkpoints" / "last.pt")["settings"]["world_size"] == 2
    assert len(list((tmp_path / "cache" / "pretrain").glob("*/pretrained.safetensors"))) == 1  # built once
    assert not (out / "notebook.ipynb").exists()  # the notebook stays the one-process view


def test_nproc_checks_parameters_before_torchrun_starts(tmp_path):
    from workbench.cli import main

    assert main(["run", str(NOTEBOOK), "--nproc", "2", "-p", "epochs", "0", "-o", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


RANKED_NOTEBOOK = '''
import os, pathlib, time
rank = int(os.environ["RANK"])
pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
time.sleep(3 if rank == 1 else 0)  # rank 1 finishes well after rank 0
if rank == 1 and fail:
    raise ValueError("rank 1 broke after rank 0 had finished")
if rank == 1:
    (pathlib.Path(output_dir).parent / "rank1_done").write_text(str(time.time()))
'''


def _ranked_run(tmp_path, name: str, *, fail: bool):
    import nbformat

    notebook = tmp_path / "ranked.ipynb"
    if not notebook.exists():
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell('output_dir = ""\nfail = False', metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(RANKED_NOTEBOOK)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, notebook)
    folder = tmp_path / name
    folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DDP_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "workbench.launch", str(notebook), "-o", str(folder / "run"), "-p", "fail", str(fail)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    return done, folder


def test_status_says_ok_only_after_every_rank_has_finished(tmp_path):
    """Issue 21 item 11: rank 0 wrote status.json (ok) as soon as its own cells were done, whatever the others did."""
    done, folder = _ranked_run(tmp_path, "fails", fail=True)
    assert done.returncode != 0
    status = json.loads((folder / "run" / "status.json").read_text())
    assert not status["ok"] and "rank 1: ValueError: rank 1 broke after rank 0 had finished" in status["error"]

    done, folder = _ranked_run(tmp_path, "slow", fail=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status_file = folder / "run" / "status.json"
    assert json.loads(status_file.read_text())["ok"]
    assert status_file.stat().st_mtime >= float((folder / "rank1_done").read_text())  # written after rank 1 ended
