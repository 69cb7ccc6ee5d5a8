"""CoLES pretraining throughput: ``workbench.fit`` against ptls's own Lightning training, same model, same data.

One CoLES epoch of ptls's ``CoLESModule`` (``TrxEncoder`` + GRU, L2-normalised head,
``ContrastiveLoss`` with hard negatives) over the simulated clients of the event-sequence
workflow, cut into sub-sequences by ptls's ``SampleSlices`` (``ColesDataset`` in a DataLoader):

- ``fit``: :func:`workbench.fit` with the workflow's ``coles_loss`` (Adam, constant LR);
- ``lightning``: ``pytorch_lightning.Trainer(max_epochs=1)`` on the same module, i.e. ptls's own
  ``training_step`` and ``configure_optimizers`` (Adam, StepLR stepping once per epoch).

Both start from the same weights, the same data order and the same numpy seed (the slicing), so
they see the same events; the weights after the epoch are compared. Epoch times are measured
inside the loops (a callback each); repeats are interleaved so that load from other processes on a
shared machine hits both alike. Throughput is events (of all sub-sequences) per second.

Last line: ``coles_throughput fit_events_per_s=<...> lightning_events_per_s=<...> ratio=<fit time / lightning time>``
Writes benchmarks/results/coles_throughput.json.

    python benchmarks/coles_throughput.py --clients 600 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

import workbench as wb
from workbench.tasks import event_sequence as es

RESULTS = Path(__file__).parent / "results"


def make_module(data, *, hidden_size: int, seed: int):
    from ptls.frames.coles import CoLESModule  # noqa: F401 - built by es.build_coles

    torch.manual_seed(seed)
    module = es.build_coles(es.build_encoder(data, encoder_type="gru", hidden_size=hidden_size))
    module._optimizer_partial = partial(torch.optim.Adam, lr=1e-3)
    module._lr_scheduler_partial = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)
    return module


def make_loader(data, *, batch_size: int, seed: int):
    np.random.seed(seed)  # SampleSlices draws from numpy's global RNG
    cfg = es.DEFAULTS
    return es.coles_loader(data, data.train_idx, batch_size=batch_size, split_count=cfg["split_count"],
                           cnt_min=cfg["cnt_min"], cnt_max=cfg["cnt_max"], seed=seed)


class FitClock(wb.Callback):
    def on_epoch_start(self, trainer):
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, logs):  # right after the epoch's last step (no validation data here)
        self.seconds = time.perf_counter() - self.start


def counting_loss(events: list):
    def loss(module, batch):
        events.append(int(batch[0].seq_lens.sum()))
        return es.coles_loss(module, batch)
    return loss


def run_fit(data, *, hidden_size: int, batch_size: int, seed: int):
    module = make_module(data, hidden_size=hidden_size, seed=seed)
    loader = make_loader(data, batch_size=batch_size, seed=seed)
    clock, events = FitClock(), []
    wb.fit(module, loader, loss_fn=counting_loss(events), epochs=1, learning_rate=1e-3, optimizer="adam",
           lr_scheduler_type="constant",
           callbacks=[clock], progress=False, log_every=50)
    return clock.seconds, sum(events), module


def run_lightning(data, *, hidden_size: int, batch_size: int, seed: int):
    import pytorch_lightning as pl

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    class Clock(pl.Callback):
        events = 0

        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.events += int(batch[0].seq_lens.sum())

        def on_train_epoch_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    module = make_module(data, hidden_size=hidden_size, seed=seed)
    loader = make_loader(data, batch_size=batch_size, seed=seed)
    clock = Clock()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[clock])
    torch.manual_seed(seed)
    trainer.fit(module, train_dataloaders=loader)
    return clock.seconds, clock.events, module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=600, help="simulated clients (80%% train the CoLES epoch)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="clients per batch (x split_count sub-sequences)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    data = es.load("", n_clients=args.clients, seed=0)
    common = dict(hidden_size=args.hidden_size, batch_size=args.batch_size)
    run_fit(data, seed=99, **common)  # warm-up: first-use costs (imports, allocator) paid by neither measurement
    fit_s, light_s, ratios, events, weight_diff = [], [], [], None, 0.0
    for rep in range(args.repeats):
        order = (("fit", run_fit), ("lightning", run_lightning)) if rep % 2 == 0 else \
            (("lightning", run_lightning), ("fit", run_fit))
        out = {name: fn(data, seed=rep, **common) for name, fn in order}
        (tf, ef, mf), (tl, el, ml) = out["fit"], out["lightning"]
        if ef != el:
            raise RuntimeError(f"the two loops saw different data: {ef} events (fit) vs {el} (lightning)")
        events = ef
        weight_diff = max(weight_diff, max((a - b).abs().max().item()
                                           for a, b in zip(mf.parameters(), ml.parameters())))
        fit_s.append(tf)
        light_s.append(tl)
        ratios.append(tf / tl)
        print(f"repeat {rep}: fit {tf:.2f} s, lightning {tl:.2f} s, {events} events, ratio {tf / tl:.3f}", flush=True)

    ratio = statistics.median(ratios)
    fit_rate, light_rate = events / statistics.median(fit_s), events / statistics.median(light_s)
    result = {
        "ratio": ratio, "ratio_per_repeat": ratios, "fit_events_per_s": fit_rate, "lightning_events_per_s": light_rate,
        "fit_epoch_s": fit_s, "lightning_epoch_s": light_s, "events_per_epoch": events,
        "max_weight_diff_after_epoch": weight_diff, "clients": len(data.train_idx), "batch_size": args.batch_size,
        "split_count": es.DEFAULTS["split_count"], "hidden_size": args.hidden_size, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(),
        "note": "shared machine (other processes running): compare the ratio, not the absolute rates",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coles_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"coles_throughput fit_events_per_s={fit_rate:.0f} lightning_events_per_s={light_rate:.0f} "
          f"ratio={ratio:.3f} max_weight_diff={weight_diff:.2g}")


if __name__ == "__main__":
    main()
