"""Loop parity: ``workbench.fit`` against a bare PyTorch loop (and Lightning, when installed).

The same ~1M-parameter MLP, the same data order, seed, AdamW parameter groups, cosine schedule
with warmup and gradient clipping are trained by each loop.

How it is timed, so that a busy 2-core machine can judge a 1% difference: in lockstep. ``fit``
trains on batches that, each time ``fit`` asks for the next one, first run one step of the bare
loop (on its own model and its own copy of the batches). The two loops thus alternate step by
step, so whatever the machine does (other processes, a busy hyperthread sibling, clock changes)
hits both alike within milliseconds. Each loop's time is the sum of its own stretches: for the
bare loop the steps (and its end-of-epoch work) run from the iterator; for ``fit`` its epoch (a
callback) minus those. The primary figure is CPU time of the training thread (``time.thread_time``;
``time.process_time`` with ``--threads`` > 1), the wall clock of the same stretches is beside it.

Measured on a busy machine (load 17 on 2 cores): separate, interleaved epochs gave per-repeat
CPU-time ratios from 0.75 to 1.33 (the machine's speed changes over seconds); lockstep cancels that.

Phases, apart from each other:

1. parity: fit against the bare loop. ``ratio`` = median over repeats of fit CPU s / bare CPU s
   (per epoch); ``wall_ratio`` the same with the wall clock.
2. techniques (``--techniques``, the default): plain fit, fit with gradient accumulation (batch 64,
   ``accumulate=2``: the same 128 samples per optimizer step) and fit with an EMA of the weights
   (``ema=0.999``), each in lockstep with the bare loop, in a rotating order;
   ``accumulate_cost`` / ``ema_cost`` = median over repeats of (its ratio / plain fit's ratio).
3. Lightning against the bare loop, epochs interleaved (not lockstep), when lightning is
   installed (``--no-lightning`` skips it).

Last line: ``loop_parity ratio=<fit/bare CPU s, median> wall_ratio=<...> spread=<max-min per repeat>
max_loss_diff=<...> [accumulate_cost=<...>] [ema_cost=<...>] [lightning_ratio=<...>]``
Writes benchmarks/results/loop_parity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import workbench as wb

RESULTS = Path(__file__).parent / "results"


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(512, 1024), nn.GELU(),
        nn.Linear(1024, 512), nn.GELU(),
        nn.Sequential(nn.Linear(512, 10)),  # the head (last child)
    )


class Batches:
    """Shuffled mini-batches of in-memory tensors; the same order for every loop."""

    def __init__(self, x, y, *, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 512, generator=g)
    teacher = torch.randn(512, 10, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


CFG = dict(lr=1e-3, weight_decay=0.01, warmup_ratio=0.05, grad_clip=1.0)


#: The CPU clock: the training thread's (one thread), or the whole process's (intra-op threads too).
cpu_clock = time.thread_time


class Clock:
    """CPU and wall seconds of stretches of code: ``start()``, then ``stop()`` appends one of each."""

    def __init__(self):
        self.cpu, self.wall = [], []

    def start(self):
        self._cpu, self._wall = cpu_clock(), time.perf_counter()

    def stop(self):
        self.cpu.append(cpu_clock() - self._cpu)
        self.wall.append(time.perf_counter() - self._wall)


class EpochTimer(wb.Callback):
    def __init__(self):
        self.clock = Clock()

    def on_epoch_start(self, trainer):
        self.clock.start()

    def on_epoch_end(self, trainer, logs):
        self.clock.stop()


def run_fit(x, y, *, epochs, seed, batch_size=128, **techniques):
    model = make_model(seed)
    timer = EpochTimer()
    history = wb.fit(
        model, Batches(x, y, batch_size=batch_size, seed=seed), loss_fn=loss_fn, epochs=epochs, learning_rate=CFG["lr"],
        weight_decay=CFG["weight_decay"], lr_scheduler_type="cosine", warmup_ratio=CFG["warmup_ratio"],
        grad_clip=CFG["grad_clip"], callbacks=[timer], progress=False, log_every=50, **techniques,
    )
    return timer.clock, [r["train_loss"] for r in history.rows], model


def bare_loop(x, y, *, epochs, seed):
    """What one would write by hand: the same groups, schedule and clipping, no framework.

    A generator that yields ``"step"`` after every optimizer step and ``"epoch"`` after every
    epoch's bookkeeping, so that it can run by itself (:func:`run_bare`) or in lockstep with fit;
    it returns ``(losses, model)``.
    """
    model = make_model(seed)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    head = list(model[-1].parameters())
    groups = [
        {"params": [p for p in decay if all(p is not h for h in head)], "weight_decay": CFG["weight_decay"]},
        {"params": [p for p in no_decay if all(p is not h for h in head)], "weight_decay": 0.0},
        {"params": [p for p in head if p.ndim > 1], "weight_decay": CFG["weight_decay"]},
        {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=CFG["lr"])
    data = Batches(x, y, batch_size=128, seed=seed)
    total = epochs * len(data)
    warmup = int(round(CFG["warmup_ratio"] * total))

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    yield "ready"  # set up, as fit is before its first epoch
    for _ in range(epochs):
        model.train()
        running = torch.zeros(())
        n = 0
        for xb, yb in data:
            loss = loss_fn(model, (xb, yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["grad_clip"])
            opt.step()
            sched.step()
            running += loss.detach() * xb.shape[0]  # the epoch loss is a mean over samples, as fit reports it
            n += xb.shape[0]
            yield "step"
        losses.append(running.item() / n)
        yield "epoch"
    return losses, model


def run_bare(x, y, *, epochs, seed):
    """The bare loop by itself; per-epoch CPU and wall seconds in a Clock."""
    clock = Clock()
    loop = bare_loop(x, y, epochs=epochs, seed=seed)
    next(loop)  # "ready"
    clock.start()
    while True:
        try:
            event = next(loop)
        except StopIteration as done:
            losses, model = done.value
            return clock, losses, model
        if event == "epoch":
            clock.stop()
            clock.start()


class Lockstep(Batches):
    """fit's batches; fetching each one first runs the partner's (the bare loop's) next step, timed apart.

    ``every``: fit batches per partner step (2 when fit accumulates two half batches per step).
    """

    def __init__(self, x, y, *, batch_size, seed, partner, every=1):
        super().__init__(x, y, batch_size=batch_size, seed=seed)
        self.partner, self.every = partner, every
        self.cpu, self.wall = 0.0, 0.0  # partner seconds in the current epoch
        self.result = None
        self.steps = []  # (fit CPU s, partner CPU s) of each pair of steps, in order

    def _advance(self):
        cpu, wall = cpu_clock(), time.perf_counter()
        try:
            event = next(self.partner)
        except StopIteration as done:
            self.result, event = done.value, None
        self.cpu += cpu_clock() - cpu
        self.wall += time.perf_counter() - wall
        return event

    def __iter__(self):
        handed = None  # CPU clock when fit got its last batch
        fit_cpu = 0.0
        for i, batch in enumerate(super().__iter__()):
            if handed is not None:
                fit_cpu += cpu_clock() - handed
            if i % self.every == 0:
                before = self.cpu
                self._advance()
                if i:
                    self.steps.append((fit_cpu, self.cpu - before))  # fit's step i-1 and the partner's step i
                fit_cpu = 0.0
            handed = cpu_clock()
            yield batch
        while self._advance() == "step":  # the partner's end of epoch ("epoch"), or a step fit has no batch for
            pass


class LockstepTimer(EpochTimer):
    """Per epoch: fit's own CPU and wall seconds (the epoch minus the partner's) and the partner's."""

    def __init__(self, data: Lockstep):
        super().__init__()
        self.data, self.partner_clock = data, Clock()

    def on_epoch_start(self, trainer):
        self.data.cpu = self.data.wall = 0.0
        super().on_epoch_start(trainer)

    def on_epoch_end(self, trainer, logs):
        super().on_epoch_end(trainer, logs)
        self.clock.cpu[-1] -= self.data.cpu
        self.clock.wall[-1] -= self.data.wall
        self.partner_clock.cpu.append(self.data.cpu)
        self.partner_clock.wall.append(self.data.wall)


def run_lockstep(x, y, *, epochs, seed, batch_size=128, **techniques):
    """fit and the bare loop, step by step; returns (fit Clock, bare Clock, fit losses, bare losses, models)."""
    partner = bare_loop(x, y, epochs=epochs, seed=seed)
    next(partner)  # "ready": the bare loop's setup is not timed, nor is fit's
    data = Lockstep(x, y, batch_size=batch_size, seed=seed, partner=partner, every=128 // batch_size)
    timer = LockstepTimer(data)
    model = make_model(seed)
    history = wb.fit(
        model, data, loss_fn=loss_fn, epochs=epochs, learning_rate=CFG["lr"],
        weight_decay=CFG["weight_decay"], lr_scheduler_type="cosine", warmup_ratio=CFG["warmup_ratio"],
        grad_clip=CFG["grad_clip"], callbacks=[timer], progress=False, log_every=50, **techniques,
    )
    while data.result is None:  # the bare loop returns after its last epoch
        data._advance()
    bare_losses, bare_model = data.result
    return timer.clock, timer.partner_clock, [r["train_loss"] for r in history.rows], bare_losses, (model, bare_model)


def run_lightning(x, y, *, epochs, seed):
    try:
        import lightning as L
    except ImportError:
        return None

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(seed)

        def training_step(self, batch, batch_idx):
            return loss_fn(self.model, batch)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=CFG["lr"], weight_decay=CFG["weight_decay"])
            total = epochs * math.ceil(len(x) / 128)
            warmup = int(round(CFG["warmup_ratio"] * total))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Timer(L.Callback):
        def __init__(self):
            self.clock = Clock()

        def on_train_epoch_start(self, trainer, module):
            self.clock.start()

        def on_train_epoch_end(self, trainer, module):
            self.clock.stop()

    timer = Timer()
    loader = Batches(x, y, batch_size=128, seed=seed)  # the same batches as the other two loops
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CFG["grad_clip"], callbacks=[timer],
    )
    trainer.fit(Module(), loader)
    return timer.clock


def per_epoch(clock: Clock) -> tuple[float, float]:
    """Median CPU and wall seconds per epoch of one run."""
    return statistics.median(clock.cpu), statistics.median(clock.wall)


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def main():
    global cpu_clock
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; with more, CPU time is the whole process's)")
    parser.add_argument("--no-lightning", dest="lightning", action="store_false", help="skip the Lightning comparison")
    parser.add_argument("--no-techniques", dest="techniques", action="store_false",
                        help="skip timing fit with accumulate=2 and with ema")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu_clock = time.thread_time if args.threads == 1 else time.process_time
    x, y = make_data(args.samples)
    n_params = sum(p.numel() for p in make_model(0).parameters())
    steps = math.ceil(args.samples / 128) * args.epochs
    load_before = os.getloadavg()
    run_lockstep(x[:2048], y[:2048], epochs=1, seed=0)  # warm up allocator, kernels and lazy imports

    print("phase 1: fit against the bare loop, in lockstep", flush=True)
    cpu_ratios, wall_ratios, fit_cpu, bare_cpu, fit_wall, bare_wall = [], [], [], [], [], []
    loss_diff = weight_diff = 0.0
    for rep in range(args.repeats):
        f, b, l_f, l_b, (m_f, m_b) = run_lockstep(x, y, epochs=args.epochs, seed=rep)
        (fc, fw), (bc, bw) = per_epoch(f), per_epoch(b)
        fit_cpu.append(fc), bare_cpu.append(bc), fit_wall.append(fw), bare_wall.append(bw)
        cpu_ratios.append(fc / bc)
        wall_ratios.append(fw / bw)
        loss_diff = max(loss_diff, max(abs(p - q) for p, q in zip(l_f, l_b)))
        weight_diff = max(weight_diff, max((p - q).abs().max().item() for p, q in zip(m_f.parameters(), m_b.parameters())))
        print(f"repeat {rep}: fit cpu {fc:.3f} s wall {fw:.3f} s | bare cpu {bc:.3f} s wall {bw:.3f} s | "
              f"ratio cpu {cpu_ratios[-1]:.4f} wall {wall_ratios[-1]:.4f}", flush=True)
    result = {
        "ratio": statistics.median(cpu_ratios),
        "ratio_clock": ("CPU time of the training thread" if args.threads == 1 else "CPU time of the process")
                       + ", fit and the bare loop in lockstep",
        "ratio_per_repeat": cpu_ratios,
        "ratio_spread_within_run": spread(cpu_ratios),
        "wall_ratio": statistics.median(wall_ratios),
        "wall_ratio_per_repeat": wall_ratios,
        "max_loss_diff": loss_diff,
        "max_weight_diff": weight_diff,
        "fit_cpu_ms_per_step": 1e3 * statistics.median(fit_cpu) / steps * args.epochs,
        "bare_cpu_ms_per_step": 1e3 * statistics.median(bare_cpu) / steps * args.epochs,
        "fit_epoch_s_median": statistics.median(fit_wall),
        "bare_epoch_s_median": statistics.median(bare_wall),
        "fit_epoch_cpu_s": fit_cpu,
        "bare_epoch_cpu_s": bare_cpu,
        "fit_epoch_s": fit_wall,
        "bare_epoch_s": bare_wall,
        "params": n_params,
        "samples": args.samples,
        "batch_size": 128,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "loadavg_before": list(load_before),
    }
    line = (f"loop_parity ratio={result['ratio']:.4f} wall_ratio={result['wall_ratio']:.4f} "
            f"spread={spread(cpu_ratios):.4f} max_loss_diff={loss_diff:.3g}")

    if args.techniques:
        print("phase 2: plain fit, accumulate=2 and ema, each in lockstep with the bare loop", flush=True)
        variants = {"plain": {}, "accumulate": dict(batch_size=64, accumulate=2), "ema": dict(ema=0.999)}
        names = list(variants)
        per = {name: [] for name in names}
        for rep in range(args.repeats):
            for name in names[rep % 3:] + names[:rep % 3]:
                f, b, *_ = run_lockstep(x, y, epochs=args.epochs, seed=rep, **variants[name])
                per[name].append(per_epoch(f)[0] / per_epoch(b)[0])
            print(f"repeat {rep}: " + " ".join(f"{k} {v[-1]:.4f}" for k, v in per.items()), flush=True)
        for name in ("accumulate", "ema"):
            costs = [t / p for t, p in zip(per[name], per["plain"])]
            result[f"{name}_cost"] = statistics.median(costs)
            result[f"{name}_cost_per_repeat"] = costs
            line += f" {name}_cost={result[f'{name}_cost']:.4f}"

    if args.lightning and run_lightning(x[:2048], y[:2048], epochs=1, seed=0) is not None:
        print("phase 3: Lightning against the bare loop (epochs interleaved)", flush=True)
        values, wall_values = [], []
        for rep in range(args.repeats):
            pair = [lambda: run_lightning(x, y, epochs=args.epochs, seed=rep),
                    lambda: run_bare(x, y, epochs=args.epochs, seed=rep)[0]]
            light, bare = (pair[0](), pair[1]()) if rep % 2 == 0 else tuple(reversed((pair[1](), pair[0]())))
            (lc, lw), (bc, bw) = per_epoch(light), per_epoch(bare)
            values.append(lc / bc)
            wall_values.append(lw / bw)
        result["lightning_ratio"] = statistics.median(values)
        result["lightning_ratio_per_repeat"] = values
        result["lightning_wall_ratio"] = statistics.median(wall_values)
        line += f" lightning_ratio={result['lightning_ratio']:.4f}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loop_parity.json").write_text(json.dumps(result, indent=2))
    print(line)


if __name__ == "__main__":
    main()
