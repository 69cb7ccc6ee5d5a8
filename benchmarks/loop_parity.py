"""Loop parity: ``workbench.fit`` against a bare PyTorch loop (and Lightning, when installed).

The same ~1M-parameter MLP, the same data order, seed, AdamW parameter groups, cosine schedule
with warmup and gradient clipping are trained by each loop. Epoch times are measured inside the
loops (a callback for fit and Lightning, the loop itself for the bare loop); the repeats are
interleaved so that machine drift hits every loop alike.

The ratio is the median over repeats of (median fit epoch / median bare epoch in that repeat).

With ``--techniques`` (the default) each repeat also times ``fit`` with gradient accumulation
(batch 64, ``accumulate=2``: the same 128 samples per optimizer step) and with an EMA of the
weights (``ema=0.999``), each reported as its ratio to the plain ``fit`` of the same repeat.

Last line: ``loop_parity ratio=<fit/bare median epoch time> max_loss_diff=<...> [lightning_ratio=<...>]
[accumulate_cost=<fit accumulate=2 / fit>] [ema_cost=<fit ema / fit>]``
Writes benchmarks/results/loop_parity.json.
"""

from __future__ import annotations

import argparse
import json
import math
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


class EpochTimer(wb.Callback):
    def __init__(self):
        self.times = []

    def on_epoch_start(self, trainer):
        self._t = time.perf_counter()

    def on_epoch_end(self, trainer, logs):
        self.times.append(time.perf_counter() - self._t)


def run_fit(x, y, *, epochs, seed, batch_size=128, **techniques):
    model = make_model(seed)
    timer = EpochTimer()
    history = wb.fit(
        model, Batches(x, y, batch_size=batch_size, seed=seed), loss_fn=loss_fn, epochs=epochs, lr=CFG["lr"],
        weight_decay=CFG["weight_decay"], schedule="cosine", warmup_ratio=CFG["warmup_ratio"],
        grad_clip=CFG["grad_clip"], callbacks=[timer], progress=False, log_every=50, **techniques,
    )
    return timer.times, [r["train_loss"] for r in history.rows], model


def run_bare(x, y, *, epochs, seed):
    """What one would write by hand: the same groups, schedule and clipping, no framework."""
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
    times, losses = [], []
    for _ in range(epochs):
        t = time.perf_counter()
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
        losses.append(running.item() / n)
        times.append(time.perf_counter() - t)
    return times, losses, model


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
            self.times = []

        def on_train_epoch_start(self, trainer, module):
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.times.append(time.perf_counter() - self._t)

    timer = Timer()
    loader = Batches(x, y, batch_size=128, seed=seed)  # the same batches as the other two loops
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CFG["grad_clip"], callbacks=[timer],
    )
    trainer.fit(Module(), loader)
    return timer.times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-lightning", dest="lightning", action="store_false", help="skip the Lightning comparison")
    parser.add_argument("--no-techniques", dest="techniques", action="store_false",
                        help="skip timing fit with accumulate=2 and with ema")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = make_data(args.samples)
    n_params = sum(p.numel() for p in make_model(0).parameters())

    fit_t, bare_t, light_t, loss_diff, weight_diff = [], [], [], 0.0, 0.0
    ratios, light_ratios = [], []
    cost = {"accumulate": [], "ema": []}  # fit with the technique / plain fit, per repeat
    variants = {"accumulate": dict(batch_size=64, accumulate=2), "ema": dict(ema=0.999)}
    run_bare(x[:2048], y[:2048], epochs=1, seed=0)  # warm up allocator and kernels
    for rep in range(args.repeats):
        # Alternate the order every repeat so that slow drift of the machine cancels out, and
        # compare each loop with the bare loop of the same repeat.
        if rep % 2 == 0:
            t_f, l_f, m_f = run_fit(x, y, epochs=args.epochs, seed=rep)
            t_b, l_b, m_b = run_bare(x, y, epochs=args.epochs, seed=rep)
        else:
            t_b, l_b, m_b = run_bare(x, y, epochs=args.epochs, seed=rep)
            t_f, l_f, m_f = run_fit(x, y, epochs=args.epochs, seed=rep)
        fit_t += t_f
        bare_t += t_b
        ratios.append(statistics.median(t_f) / statistics.median(t_b))
        loss_diff = max(loss_diff, max(abs(a - b) for a, b in zip(l_f, l_b)))
        weight_diff = max(weight_diff, max((a - b).abs().max().item() for a, b in zip(m_f.parameters(), m_b.parameters())))
        for name, kwargs in variants.items() if args.techniques else ():
            t_v, _, _ = run_fit(x, y, epochs=args.epochs, seed=rep, **kwargs)
            cost[name].append(statistics.median(t_v) / statistics.median(t_f))
        lt = run_lightning(x, y, epochs=args.epochs, seed=rep) if args.lightning else None
        if lt is not None:
            light_t += lt
            light_ratios.append(statistics.median(lt) / statistics.median(t_b))
        print(f"repeat {rep}: fit {['%.3f' % t for t in t_f]} bare {['%.3f' % t for t in t_b]}"
              + (f" lightning {['%.3f' % t for t in lt]}" if lt else "") + f" ratio {ratios[-1]:.4f}"
              + "".join(f" {k}_cost {v[-1]:.4f}" for k, v in cost.items() if v), flush=True)

    ratio = statistics.median(ratios)
    result = {
        "ratio": ratio,
        "ratio_per_repeat": ratios,
        "max_loss_diff": loss_diff,
        "max_weight_diff": weight_diff,
        "fit_epoch_s_median": statistics.median(fit_t),
        "bare_epoch_s_median": statistics.median(bare_t),
        "fit_epoch_s": fit_t,
        "bare_epoch_s": bare_t,
        "params": n_params,
        "samples": args.samples,
        "batch_size": 128,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    line = f"loop_parity ratio={ratio:.4f} max_loss_diff={loss_diff:.3g}"
    if light_t:
        result["lightning_epoch_s_median"] = statistics.median(light_t)
        result["lightning_ratio"] = statistics.median(light_ratios)
        result["lightning_ratio_per_repeat"] = light_ratios
        result["lightning_epoch_s"] = light_t
        line += f" lightning_ratio={result['lightning_ratio']:.4f}"
    for name, values in cost.items():
        if values:
            result[f"{name}_cost"] = statistics.median(values)
            result[f"{name}_cost_per_repeat"] = values
            line += f" {name}_cost={result[f'{name}_cost']:.4f}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loop_parity.json").write_text(json.dumps(result, indent=2))
    print(line)


if __name__ == "__main__":
    main()
