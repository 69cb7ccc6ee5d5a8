"""One rank of a DDP training run, launched by tests/test_distributed.py under torchrun.

``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT RUN_DIR [options]``

Every rank trains :class:`PlainNet` (no dropout, no BatchNorm: DDP with a per-process batch of
B/2 then computes exactly the gradients of one process with batch B) with ``wb.fit``. Every rank
opens the same run folder RUN_DIR, as user code does; only rank 0 may write to it. Each rank saves its final weights to
``OUT/final_rank<r>.safetensors``; rank 0 also ``OUT/history.json``. With ``--accumulate K`` each
rank also writes ``OUT/no_sync_rank<r>.json``: how many micro-batches ran inside DDP's ``no_sync``.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.distributed import context  # noqa: E402

N_SAMPLES = 256


class PlainNet(nn.Module):
    """encoder (Linear + ReLU) -> head; nothing random in its forward."""

    def __init__(self, n_in: int = 10, n_hidden: int = 32, n_classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU())
        self.head = nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def dataset(n: int = N_SAMPLES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


FIT = dict(learning_rate=0.05, weight_decay=0.01, lr_scheduler_type="cosine", warmup_ratio=0.2, grad_clip=1.0, seed=0,
           progress=False)


class KillAt:
    """A loss_fn that, at a training step, kills this process (SIGKILL) or hangs it (``how="hang"``)."""

    def __init__(self, step: int, how: str):
        self.step, self.how, self.calls = step, how, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.step and self.how == "hang":
                time.sleep(600)  # alive, but never reaches the next collective
            elif self.calls == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
        return model.loss(batch)


def count_no_sync() -> list:
    """Count the entries into DistributedDataParallel.no_sync (one per micro-batch that skips the all-reduce)."""
    from torch.nn.parallel import DistributedDataParallel

    calls = []
    original = DistributedDataParallel.no_sync

    def counted(self):
        calls.append(1)
        return original(self)

    DistributedDataParallel.no_sync = counted
    return calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=-1)
    parser.add_argument("--how", choices=("kill", "hang"), default="kill")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    no_sync = count_no_sync() if args.accumulate > 1 else None
    torch.set_num_threads(1)
    ctx = context(True)  # starts the process group from torchrun's variables
    # the same line on every rank, as a user writes it: Run writes nothing on ranks > 0
    run = wb.Run(args.run_dir, params={"case": "ddp"}, resume=args.resume)
    torch.manual_seed(ctx.rank)  # different initial weights per rank: DDP must make them equal
    model = PlainNet()
    loss_fn = None
    if ctx.rank == args.kill_rank:
        loss_fn = KillAt(args.kill_step, args.how)
    train = torch.utils.data.DataLoader(dataset(), batch_size=args.batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(dataset(100, seed=1), batch_size=args.batch_size)
    history = wb.fit(model, train, val_data=val, epochs=args.epochs, loss_fn=loss_fn, run=run, resume=args.resume,
                     accumulate=args.accumulate, **FIT)
    args.out.mkdir(parents=True, exist_ok=True)
    wb.save_weights(model, args.out / f"final_rank{ctx.rank}.safetensors")
    if ctx.is_main:
        (args.out / "history.json").write_text(json.dumps(history.rows))
    if no_sync is not None:
        (args.out / f"no_sync_rank{ctx.rank}.json").write_text(json.dumps(no_sync))


if __name__ == "__main__":
    main()
