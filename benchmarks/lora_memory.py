"""Peak memory and optimizer-state size: LoRA against full fine-tuning of the same regulatory model.

Each method trains the same model (same data, same steps, same optimizer: AdamW through
``workbench.fit``) in a fresh child process, so that one method's memory does not hide the
other's. Measured per method:

- optimizer state: bytes of every tensor AdamW keeps (two moments per trained parameter);
- gradients: bytes of the gradients of trained parameters;
- peak memory during training: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
  process's peak resident memory (``ru_maxrss``) minus its resident memory just before training.

Usage::

    python benchmarks/lora_memory.py                       # width 256, 4 layers, rank 4, 40 steps
    python benchmarks/lora_memory.py --width 512 --rank 8

Results go to ``benchmarks/results/lora_memory.json``; the last line printed is the summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lora_memory.json"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(method: str, args) -> dict:
    """Train one method and return its measurements (runs in its own process)."""
    import torch

    from workbench.lora import trainable_state
    from workbench.tasks import regulatory
    from workbench.training import Callback, fit

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = regulatory.load(seed=0)
    model = regulatory.build_model(data, width=args.width, layers=args.layers)
    model, report = regulatory.prepare(model, method=method, rank=args.rank)
    batches = data.batches(data.source_idx[: args.steps * args.batch_size], batch_size=args.batch_size, shuffle=True)

    class Measure(Callback):
        def on_fit_end(self, trainer):
            state = trainer.optimizer.state.values()
            self.optimizer_bytes = sum(t.numel() * t.element_size() for s in state for t in s.values()
                                       if torch.is_tensor(t))
            self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainer.model.parameters()
                                  if p.grad is not None)

    measure = Measure()
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    fit(model, batches, epochs=1, learning_rate=1e-3, strategy=None if method == "lora" else "full",
        callbacks=[measure],
        progress=False)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "method": method, "rank": args.rank if method == "lora" else None,
        "trainable": report.trainable, "total": report.total, "trainable_fraction": report.trainable / report.total,
        "optimizer_state_mb": measure.optimizer_bytes / 1e6, "gradients_mb": measure.grad_bytes / 1e6,
        "peak_training_mb": (peak - before) / 1e6, "trainable_state_mb": sum(
            t.numel() * t.element_size() for t in trainable_state(model).values()) / 1e6,
        "device": "cuda" if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    rows = []
    for method in ("full", "lora"):
        command = [sys.executable, __file__, "--child", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full, lora = rows
    print(f"{'method':<12}{'trainable':>12}{'fraction':>10}{'optimizer MB':>14}{'grads MB':>10}{'peak MB':>10}")
    for r in rows:
        name = r["method"] + (f" r{r['rank']}" if r["rank"] else "")
        print(f"{name:<12}{r['trainable']:>12,}{r['trainable_fraction']:>10.2%}{r['optimizer_state_mb']:>14.2f}"
              f"{r['gradients_mb']:>10.2f}{r['peak_training_mb']:>10.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "child"},
                                   "machine": platform.processor() or platform.machine(), "results": rows}, indent=2))
    print(f"SUMMARY: LoRA rank {args.rank} trains {lora['trainable_fraction']:.2%} of {lora['total']:,} parameters; "
          f"optimizer state {lora['optimizer_state_mb']:.2f} MB vs {full['optimizer_state_mb']:.2f} MB full "
          f"({full['optimizer_state_mb'] / max(lora['optimizer_state_mb'], 1e-9):.0f}x smaller); peak training memory "
          f"{lora['peak_training_mb']:.1f} MB vs {full['peak_training_mb']:.1f} MB ({lora['device']})")


if __name__ == "__main__":
    main()
