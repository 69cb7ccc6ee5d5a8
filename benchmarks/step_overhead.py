"""CPU time per optimizer step of ``fit`` on a tiny model, where the loop's own overhead dominates.

Compares two checkouts of the loop on a shared machine, where wall-clock epoch times are too noisy:
thread CPU time (``time.thread_time``) is barely touched by other processes. Run it alternately under each
checkout and compare the medians::

    for i in 1 2 3 4 5 6 7 8; do for c in /path/to/old /path/to/new; do
        echo "$c $(cd /tmp && PYTHONPATH=$c python /path/to/new/benchmarks/step_overhead.py)"; done; done

Prints one number: the median over epochs 2..12 of the CPU microseconds per step.
"""

import statistics
import time

import torch
from torch import nn

import workbench as wb

STEPS, BATCH = 256, 16


class Batches:
    batch_size = BATCH

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return STEPS

    def __iter__(self):
        for i in range(0, STEPS * BATCH, BATCH):
            yield self.x[i:i + BATCH], self.y[i:i + BATCH]


class CpuTimer(wb.Callback):
    def __init__(self):
        self.times = []

    def on_epoch_start(self, trainer):
        self._t = time.thread_time()

    def on_epoch_end(self, trainer, logs):
        self.times.append(time.thread_time() - self._t)


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(STEPS * BATCH, 32)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    timer = CpuTimer()
    wb.fit(model, Batches(x, y), epochs=12, learning_rate=1e-3, loss_fn=loss_fn, callbacks=[timer], progress=False,
           grad_clip=1.0, lr_scheduler_type="cosine")
    print(statistics.median(timer.times[1:]) / STEPS * 1e6)


if __name__ == "__main__":
    main()
