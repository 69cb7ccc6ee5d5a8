"""fit under torchrun: 2 real processes, gloo on the CPU, real run folders (tests/ddp_worker.py is one rank)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.checkpoints import load_state, read_state_dict
from workbench.distributed import DistContext, PerRank, ShardingError

from .ddp_worker import FIT, PlainNet, dataset

WORKER = Path(__file__).with_name("ddp_worker.py")
LAUNCH_TIMEOUT_S = 120


def launch(tmp, name, run_dir, *options, timeout_s=30):
    """Run the worker under torchrun (2 processes): OUT is tmp/name; every rank opens RUN_DIR."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DDP_TIMEOUT_S": str(timeout_s)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp / name), str(run_dir), *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-process run (per-process batch 16, 4 epochs) in tmp/run."""
    tmp = tmp_path_factory.mktemp("ddp")
    done = launch(tmp, "ddp", tmp / "run")
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp


def single_process_run(run_dir=None, *, epochs=4):
    """The same training in this process with batch 32 and the sample order DistributedSampler gives."""
    data = dataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    train = torch.utils.data.DataLoader(data, batch_size=32, sampler=sampler)
    val = torch.utils.data.DataLoader(dataset(100, seed=1), batch_size=32)
    torch.manual_seed(0)
    model = PlainNet()
    run = wb.Run(run_dir, params={"case": "ddp"}) if run_dir else None
    history = wb.fit(model, train, val_data=val, epochs=epochs, run=run, distributed=False, **FIT)
    return model, history


def test_two_processes_with_half_batches_reproduce_one_process(ddp_run):
    """No dropout and no BatchNorm in PlainNet: the B/2 + B/2 gradients average to the batch-B gradient."""
    model, history = single_process_run()
    ranks = [read_state_dict(ddp_run / "ddp" / f"final_rank{r}.safetensors") for r in (0, 1)]
    for key, value in model.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks stayed in step
        assert (ranks[0][key] - value).abs().max().item() < 1e-5, key
    ddp_rows = json.loads((ddp_run / "ddp" / "history.json").read_text())
    assert len(ddp_rows) == len(history.rows) == 4
    for ours, ref in zip(ddp_rows, history.rows):
        assert ours["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-4)
        assert ours["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)
        assert ours["step"] == ref["step"]  # 8 steps of 2 x 16 samples, as 8 of 32


def test_accumulation_under_ddp_skips_the_sync_of_all_but_the_last_micro_batch(tmp_path):
    """2 ranks x batch 8 x accumulate 2 trains the weights of one process with batch 32, syncing once per step."""
    done = launch(tmp_path, "acc", tmp_path / "run", "--batch-size", "8", "--accumulate", "2", "--epochs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    model, history = single_process_run(epochs=2)
    for rank in (0, 1):
        weights = read_state_dict(tmp_path / "acc" / f"final_rank{rank}.safetensors")
        for key, value in model.state_dict().items():
            assert (weights[key] - value).abs().max().item() < 1e-5, (rank, key)
        # 8 optimizer steps per epoch, each with one micro-batch inside no_sync
        assert len(json.loads((tmp_path / "acc" / f"no_sync_rank{rank}.json").read_text())) == 2 * 8
    rows = json.loads((tmp_path / "acc" / "history.json").read_text())
    assert [r["step"] for r in rows] == [r["step"] for r in history.rows] == [8, 16]


def test_rank_zero_alone_writes_the_run_folder(ddp_run):
    rows = [json.loads(line) for line in (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert len(list(ddp_run.rglob("metrics.jsonl"))) == 1
    assert (ddp_run / "run" / "checkpoints" / "last.pt").exists()
    # every rank opened this same folder: had rank 1's Run cleared or written it, the rows or last.pt above would show it


def test_killed_rank_is_named_then_resume_matches_an_uninterrupted_run(ddp_run, tmp_path):
    # rank 1 dies (SIGKILL) at step 20 of 32, in epoch 2; last.pt holds the end of epoch 1
    killed = launch(tmp_path, "killed", tmp_path / "run", "--kill-rank", "1", "--kill-step", "20")
    assert killed.returncode != 0
    out = killed.stdout + killed.stderr
    assert "RankFailedError: rank 0 of 2 stops at epoch 2, step 19: rank 1 stopped answering" in out, out[-3000:]
    assert "resume=True" in out
    assert not (tmp_path / "killed" / "final_rank0.safetensors").exists()
    assert load_state(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = launch(tmp_path, "resumed", tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = read_state_dict(ddp_run / "ddp" / "final_rank0.safetensors")
    for rank in (0, 1):
        b = read_state_dict(tmp_path / "resumed" / f"final_rank{rank}.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), (rank, key)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]


def test_a_hung_rank_is_named_after_the_timeout_instead_of_hanging(tmp_path):
    """Rank 1 sleeps inside a step: rank 0's gradient all_reduce times out (5 s) and names it."""
    started = time.monotonic()
    hung = launch(tmp_path, "hung", tmp_path / "run", "--epochs", "2", "--kill-rank", "1", "--kill-step", "3",
                  "--how", "hang", timeout_s=5)
    assert hung.returncode != 0
    assert "rank 0 of 2 stops at epoch 0, step 2: rank 1 stopped answering" in hung.stderr, hung.stderr[-3000:]
    assert time.monotonic() - started < 60


def test_world_size_mismatch_on_resume_is_a_clear_error(ddp_run, tmp_path):
    # saved by 2 processes, resumed by 1
    shutil.copytree(ddp_run / "run", tmp_path / "run")
    with pytest.raises(ValueError, match=r"world_size: 2 saved, 1 now"):
        single_process_run_resume(tmp_path / "run")
    # saved by 1 process, resumed by 2 (every rank stops with the same message)
    single_process_run(tmp_path / "one")
    resumed = launch(tmp_path, "two", tmp_path / "one", "--resume", "--batch-size", "32")
    assert resumed.returncode != 0
    assert "world_size: 1 saved, 2 now" in resumed.stderr, resumed.stderr[-3000:]


def single_process_run_resume(run_dir):
    data = dataset()
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    run = wb.Run(run_dir, params={"case": "ddp"}, resume=True)
    wb.fit(PlainNet(), train, epochs=4, run=run, resume=True, distributed=False, **FIT)


def test_data_that_cannot_be_sharded_is_refused_with_the_way_out():
    ctx = DistContext(enabled=True, rank=0, world_size=2)
    batches = [(torch.zeros(4, 10), torch.zeros(4).long())] * 3
    with pytest.raises(ShardingError, match="PerRank"):
        ctx.shard_train(batches, seed=0)
    assert ctx.shard_train(PerRank(batches), seed=0).batches is batches
    loader = torch.utils.data.DataLoader(dataset(), batch_size=16, shuffle=True)
    sharded = ctx.shard_train(loader, seed=0)
    assert len(sharded) == 8 and sharded.batch_size == 16
    val = ctx.shard_eval(torch.utils.data.DataLoader(dataset(101), batch_size=16))
    assert len(val.sampler) == 51  # rank 0 of 2 gets samples 0, 2, ..., 100: no padding


def test_distributed_true_without_a_launcher_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        wb.fit(PlainNet(), [], epochs=1, learning_rate=0.1, distributed=True, progress=False)


def test_fit_calls_set_epoch_so_each_epoch_has_its_own_order():
    data = dataset(64)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    seen = []

    def loss_fn(model, batch):
        if model.training:
            seen.append(batch[0][:, 0].clone())
        return model.loss(batch)

    wb.fit(PlainNet(), torch.utils.data.DataLoader(data, batch_size=64, sampler=sampler), epochs=2, learning_rate=0.01,
           loss_fn=loss_fn, progress=False)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert torch.equal(seen[epoch], data.tensors[0][list(sampler), 0])
    assert not torch.equal(seen[0], seen[1])


EVAL_WORKER = Path(__file__).with_name("ddp_eval_worker.py")


@pytest.fixture(scope="module")
def ddp_eval(tmp_path_factory):
    """tests/ddp_eval_worker.py on 2 processes: its cases' records, per case and rank."""
    tmp = tmp_path_factory.mktemp("ddp_eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_DDP_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EVAL_WORKER),
           str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return {case: [json.loads((tmp / f"{case}_rank{r}.json").read_text()) for r in (0, 1)]
            for case in ("macro_f1", "batchnorm", "restore_best")}


def test_macro_f1_under_ddp_is_the_whole_validation_sets(ddp_eval):
    """Issue 21 item 5: each rank's macro-F1 was averaged (0.6667 logged with 2 processes, 0.6944 for the whole set)."""
    rank0, rank1 = ddp_eval["macro_f1"]
    logged = rank0["rows"][-1]["val_macro_f1"]
    assert logged == pytest.approx(rank0["whole_set"]["val_macro_f1"], abs=1e-12)
    assert rank1["rows"][-1]["val_macro_f1"] == logged  # every rank logs (and early-stops on) the same number


def test_validation_under_ddp_runs_rank_zeros_batchnorm_statistics(ddp_eval):
    """Issue 21 item 12: each rank validated with its own BatchNorm running statistics, and the ranks ended apart."""
    rank0, rank1 = ddp_eval["batchnorm"]
    assert rank0["rows"][-1]["val_loss"] == pytest.approx(rank0["rank0_val_loss"], rel=1e-6)
    assert [r["val_loss"] for r in rank0["rows"]] == [r["val_loss"] for r in rank1["rows"]]
    assert rank0["state"] == rank1["state"]  # one model on every rank when fit returns, buffers included


def test_restore_best_without_a_run_under_ddp_gives_every_rank_the_best_epoch(ddp_eval):
    """Issue 21 item 1 under DDP: the best epoch's weights, kept in memory by rank 0, reach every rank."""
    for record in ddp_eval["restore_best"]:
        assert record["best_epoch"] == 1
        assert record["final"] == ddp_eval["restore_best"][0]["epochs"][1]
        assert record["final"] != record["epochs"][2]
