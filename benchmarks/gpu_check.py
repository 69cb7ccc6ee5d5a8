"""GPU check: every workflow on a GPU, the loop against a bare bf16 loop, the largest batch, fp16 resume, NCCL.

One script, under 5 minutes on one GPU (``make gpu-check``). Checks, each recorded even when
another fails:

* ``workflows``: each workflow's notebook with tiny parameters (those of ``tests/test_device.py``)
  runs on ``cuda`` and on the CPU; the model must end on the GPU, and every headline metric must
  agree within ``--tolerance`` (absolute, default 0.15: the tiny test sets hold 10-60 samples, so
  one sample moves an accuracy by up to 0.1, and GPU kernels round differently from CPU ones).
* ``loop_parity_bf16``: ``workbench.fit(device="cuda", amp="bf16")`` against a bare PyTorch loop
  with the same bf16 autocast, model, data order, optimizer groups, schedule and clipping
  (``benchmarks/loop_parity.py``'s setup); ratio = median over repeats of fit / bare epoch time
  (the first epoch of each left out), and the largest difference of their epoch losses.
* ``cell_type_batch``: the largest power-of-two batch of the cell-type classifier (the
  workflow's MLP over ``--genes`` genes, default 20,000 as in a whole transcriptome) whose
  bf16 training step fits in memory, and its training samples/s.
* ``fp16_resume``: ``fit(amp="fp16", deterministic=True)`` stopped after one epoch and resumed
  equals the uninterrupted run (weights bit for bit, and the GradScaler's scale).
* ``nccl_2_ranks``: where two GPUs exist, ``fit`` under torchrun with nccl on 2 ranks (each rank on
  its own GPU, the same history on both).

Last line: ``gpu_check device=<name> workflows=<ok>/<n> ...``; writes
``benchmarks/results/gpu_check.json``. Without a CUDA device it says so and exits 0 (nothing is
written). Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

#: Tiny parameters of each workflow's notebook (tests/test_device.py runs the same in float64 on the CPU).
WORKFLOWS = {
    "cell_type_annotation": {"epochs": 1, "pretrained_checkpoint": "none", "find_lr": True},
    "heart_sound_classification": {"task": "physionet2016", "epochs": 1, "pretrain_epochs": 1, "batch_size": 16},
    "event_sequence_classification": {"pretrain_epochs": 1, "epochs": 2, "freeze_epochs": 1, "hidden_size": 8,
                                      "head_hidden": "8", "label_fraction": 0.5, "class_weights": "balanced"},
    "spatial_transfer": {"n_bulk_slides": 3, "n_spatial_slides": 2, "epochs": 2, "pretrain_epochs": 1, "cv": "kfold",
                         "folds": 2},
    "regulatory_lora": {"epochs": 2, "pretrain_epochs": 1, "label_fraction": 0.5, "lora_rank": 2},
}


def workflow_inputs(root: Path) -> dict:
    """Small inputs of the workflows whose default data is large."""
    from workbench.tasks import event_sequence, heart_sound, regulatory

    return {
        "heart_sound_classification": {"data_path": str(heart_sound.write_layout(
            root / "physionet", "physionet2016", n_patients=16, seconds=3, seed=7))},
        "event_sequence_classification": {"data_path": str(event_sequence.write_tables(
            *event_sequence.simulate(n_clients=48, max_len=60, seed=0), root / "events.csv")[0])},
        "regulatory_lora": {"data_path": str(regulatory.write_csv(regulatory.simulate(
            n_genes=24, n_regions=3, n_motifs=6, n_source_conditions=4, n_new_conditions=2), root / "regulatory.csv"))},
    }


def check_workflows(device: str, tolerance: float, names: list[str]) -> dict:
    """Each workflow on ``device`` and on the CPU: completion, the model's device, headline metric differences."""
    from workbench.execute import run_in_process
    from workbench.workflow import headline_metrics

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = workflow_inputs(tmp)
        for name in names:
            notebook = ROOT / "notebooks" / f"{name}.ipynb"
            row = {}
            try:
                finals = {}
                for where in (device, "cpu"):
                    os.environ["WORKBENCH_CACHE"] = str(tmp / f"cache_{where}")
                    started = time.perf_counter()
                    params = {**WORKFLOWS[name], **inputs.get(name, {}), "device": where,
                              "output_dir": str(tmp / f"{name}_{where}".replace(":", ""))}
                    namespace = run_in_process(notebook, parameters=params)
                    row[f"seconds_{where}"] = round(time.perf_counter() - started, 2)
                    model = namespace.get("model")
                    if model is not None and where != "cpu":
                        row["model_device"] = str(next(model.parameters()).device)
                    finals[where] = json.loads((Path(params["output_dir"]) / "final_metrics.json").read_text())
                metrics = [m for m in headline_metrics(notebook) if not m.startswith("baseline")]
                diffs = {m: abs(finals[device][m] - finals["cpu"][m]) for m in metrics if m in finals["cpu"]}
                row.update(metrics={m: {"gpu": finals[device][m], "cpu": finals["cpu"][m]} for m in diffs},
                           max_abs_diff=max(diffs.values()) if diffs else None)
                on_gpu = row.get("model_device", "cuda").startswith("cuda") or device == "cpu"
                row["ok"] = on_gpu and (row["max_abs_diff"] is None or row["max_abs_diff"] <= tolerance)
                if not row["ok"]:
                    row["error"] = (f"model on {row.get('model_device')}" if not on_gpu else
                                    f"headline metrics differ by {row['max_abs_diff']:.3f} > {tolerance}")
            except Exception as err:  # noqa: BLE001 - recorded, the other checks go on
                row.update(ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0][:500],
                           traceback=traceback.format_exc()[-3000:])
            out[name] = row
            print(f"workflow {name}: {'ok' if row['ok'] else 'FAILED: ' + row['error']}", flush=True)
    return {"ok": all(r["ok"] for r in out.values()), "runs": out}


def check_loop_parity(device: str, *, samples: int, epochs: int, repeats: int) -> dict:
    """fit(amp="bf16") against a bare bf16 loop on ``device`` (loop_parity.py's model, data and settings)."""
    import torch
    from loop_parity import CFG, Batches, EpochTimer, loss_fn, make_data, make_model

    import workbench as wb

    dev = torch.device(device)
    x, y = make_data(samples)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    class SyncedTimer(EpochTimer):
        def on_epoch_start(self, trainer):
            sync()
            super().on_epoch_start(trainer)

        def on_epoch_end(self, trainer, logs):
            sync()
            super().on_epoch_end(trainer, logs)

    def run_fit():
        timer = SyncedTimer()
        history = wb.fit(make_model(0), Batches(x, y, batch_size=128, seed=0), loss_fn=loss_fn, epochs=epochs,
                         learning_rate=CFG["lr"], weight_decay=CFG["weight_decay"], lr_scheduler_type="cosine",
                         warmup_ratio=CFG["warmup_ratio"], grad_clip=CFG["grad_clip"], callbacks=[timer],
                         progress=False, log_every=50, device=dev, amp="bf16")
        return timer.times, [r["train_loss"] for r in history.rows]

    def run_bare():
        model = make_model(0).to(dev)
        head = list(model[-1].parameters())
        rest = [p for p in model.parameters() if all(p is not h for h in head)]
        groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": CFG["weight_decay"]},
                  {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0},
                  {"params": [p for p in head if p.ndim > 1], "weight_decay": CFG["weight_decay"]},
                  {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=CFG["lr"])
        data = Batches(x, y, batch_size=128, seed=0)
        total = epochs * len(data)
        warmup = int(round(CFG["warmup_ratio"] * total))

        def factor(step):
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        times, losses = [], []
        for _ in range(epochs):
            sync()
            started = time.perf_counter()
            model.train()
            running, n = torch.zeros((), device=dev), 0
            for xb, yb in data:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                    loss = loss_fn(model, (xb, yb))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["grad_clip"])
                opt.step()
                sched.step()
                running += loss.detach().float() * xb.shape[0]
                n += xb.shape[0]
            losses.append(running.item() / n)
            sync()
            times.append(time.perf_counter() - started)
        return times, losses

    ratios, diffs = [], []
    for rep in range(repeats):
        order = (run_fit, run_bare) if rep % 2 == 0 else (run_bare, run_fit)
        result = {fn.__name__: fn() for fn in order}
        (fit_t, fit_l), (bare_t, bare_l) = result["run_fit"], result["run_bare"]
        ratios.append(statistics.median(fit_t[1:] or fit_t) / statistics.median(bare_t[1:] or bare_t))
        diffs.append(max(abs(a - b) for a, b in zip(fit_l, bare_l)))
    out = {"ratio": statistics.median(ratios), "ratios": ratios, "max_loss_diff": max(diffs), "samples": samples,
           "epochs": epochs, "repeats": repeats, "amp": "bf16",
           "note": "median over repeats of (median fit epoch / median bare epoch), first epoch left out"}
    out["ok"] = out["max_loss_diff"] < 0.05
    print(f"loop parity (bf16): ratio {out['ratio']:.3f}, max loss diff {out['max_loss_diff']:.2e}", flush=True)
    return out


def check_cell_type_batch(device: str, *, genes: int, limit: int) -> dict:
    """The largest power-of-two batch whose bf16 training step fits, and training samples/s at that batch."""
    import torch

    from workbench.tasks.cell_type import CellTypeClassifier

    dev = torch.device(device)
    model = CellTypeClassifier(genes, 10).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        x = torch.randn(batch, genes, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = model.loss((x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    largest, batch = None, 1024
    while batch <= limit:
        try:
            step(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            largest = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    out = {"genes": genes, "largest_batch": largest, "limit": limit, "hidden": [512, 256], "amp": "bf16"}
    if largest:
        steps = 10
        step(largest)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        started = time.perf_counter()
        for _ in range(steps):
            step(largest)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        out["samples_per_s"] = steps * largest / (time.perf_counter() - started)
    out["ok"] = largest is not None
    print(f"cell-type batch: largest {largest} ({genes} genes), {out.get('samples_per_s', 0):.0f} samples/s",
          flush=True)
    return out


def check_fp16_resume(device: str) -> dict:
    """fit(amp="fp16") stopped after epoch 0 and resumed equals the uninterrupted run (weights and loss scale)."""
    import torch
    from loop_parity import Batches, loss_fn, make_data, make_model

    import workbench as wb

    x, y = make_data(2048)

    class Stop(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.epoch == 0:
                raise KeyboardInterrupt("stopped after epoch 0, as a kill would")

    def train(folder, *, resume=False, callbacks=()):
        model = make_model(0)
        scale = {}

        class Scale(wb.Callback):
            def on_fit_end(self, trainer):
                scale["value"] = trainer.scaler.get_scale()

        run = wb.Run(folder, params={}, resume=resume)
        wb.fit(model, Batches(x, y, batch_size=128, seed=0), loss_fn=loss_fn, epochs=2, learning_rate=1e-3, amp="fp16",
               device=device, deterministic=True, seed=0, run=run, resume=resume, progress=False,
               callbacks=[*callbacks, Scale()])
        return model, scale.get("value")

    with tempfile.TemporaryDirectory() as tmp:
        whole, whole_scale = train(Path(tmp) / "whole")
        try:
            train(Path(tmp) / "parts", callbacks=[Stop()])
        except KeyboardInterrupt:
            pass
        resumed, resumed_scale = train(Path(tmp) / "parts", resume=True)
    equal = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    out = {"weights_equal": equal, "scale_whole": whole_scale, "scale_resumed": resumed_scale,
           "ok": equal and whole_scale == resumed_scale}
    print(f"fp16 resume: weights equal {equal}, loss scale {whole_scale} vs {resumed_scale}", flush=True)
    return out


def ddp_worker(out: str) -> None:
    """One rank of the NCCL check: fit under DDP, write this rank's device and history."""
    import torch
    from loop_parity import loss_fn, make_data, make_model

    import workbench as wb
    from workbench.distributed import context

    ctx = context()
    x, y = make_data(4096)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True, batch_size=128)
    model = make_model(0)
    history = wb.fit(model, data, loss_fn=loss_fn, epochs=2, learning_rate=1e-3, seed=0, progress=False,
                     device="cuda:0")
    Path(f"{out}.{ctx.rank}").write_text(json.dumps({
        "rank": ctx.rank, "device": str(next(model.parameters()).device), "backend": torch.distributed.get_backend(),
        "rows": [{k: r[k] for k in ("epoch", "train_loss")} for r in history.rows]}))


def check_nccl() -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"ok": True, "skipped": f"{torch.cuda.device_count()} GPU visible; the 2-rank run needs 2"}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--ddp-worker", out]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "WORKBENCH_DDP_BACKEND": "nccl"})
        if done.returncode != 0:
            return {"ok": False, "error": done.stderr[-2000:]}
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    result = {"devices": [r["device"] for r in ranks], "backend": ranks[0]["backend"], "rows": ranks[0]["rows"],
              "ok": [r["device"] for r in ranks] == ["cuda:0", "cuda:1"] and ranks[0]["rows"] == ranks[1]["rows"]}
    print(f"nccl 2 ranks: devices {result['devices']}, same history {ranks[0]['rows'] == ranks[1]['rows']}",
          flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the GPU to check (default: cuda)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="largest |gpu - cpu| of a headline metric")
    parser.add_argument("--workflows", default=",".join(WORKFLOWS), help="comma-separated workflows to run")
    parser.add_argument("--checks", default="workflows,loop_parity_bf16,cell_type_batch,fp16_resume,nccl_2_ranks")
    parser.add_argument("--samples", type=int, default=20_000, help="loop parity: samples per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="loop parity: epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="loop parity: interleaved repeats")
    parser.add_argument("--genes", type=int, default=20_000, help="cell-type batch: genes (model input width)")
    parser.add_argument("--batch-limit", type=int, default=1 << 20, help="cell-type batch: largest batch tried")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker)
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); nothing to check. "
              "Run `make gpu-check` on a machine with a GPU.")
        return 0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call (fp16_resume)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    checks = args.checks.split(",")
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
              "machine": platform.machine(), "tolerance": args.tolerance}
    runners = {
        "workflows": lambda: check_workflows(args.device, args.tolerance, args.workflows.split(",")),
        "loop_parity_bf16": lambda: check_loop_parity(args.device, samples=args.samples, epochs=args.epochs,
                                                      repeats=args.repeats),
        "cell_type_batch": lambda: check_cell_type_batch(args.device, genes=args.genes, limit=args.batch_limit),
        "fp16_resume": lambda: check_fp16_resume(args.device),
        "nccl_2_ranks": check_nccl,
    }
    for check in checks:
        t0 = time.perf_counter()
        try:
            result[check] = runners[check]()
        except Exception as err:  # noqa: BLE001 - recorded, the other checks go on
            result[check] = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500],
                             "traceback": traceback.format_exc()[-3000:]}
            print(f"{check}: FAILED: {result[check]['error']}", flush=True)
        result[check]["seconds"] = round(time.perf_counter() - t0, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))

    flows = result.get("workflows", {}).get("runs", {})
    ok_flows = sum(1 for r in flows.values() if r.get("ok"))
    diffs = [r["max_abs_diff"] for r in flows.values() if r.get("max_abs_diff") is not None]
    parity = result.get("loop_parity_bf16", {})
    batch = result.get("cell_type_batch", {})
    nccl = result.get("nccl_2_ranks", {})
    resume = result.get("fp16_resume", {})
    line = (f"gpu_check device={name.replace(' ', '_')} workflows={ok_flows}/{len(flows)}"
            f" max_metric_diff={max(diffs) if diffs else float('nan'):.3f}"
            f" parity_ratio_bf16={parity.get('ratio', float('nan')):.3f}"
            f" largest_batch={batch.get('largest_batch')} samples_per_s={batch.get('samples_per_s', float('nan')):.0f}"
            f" fp16_resume={'equal' if resume.get('ok') else 'DIFFERS' if resume else 'not run'}"
            f" nccl={'skipped' if nccl.get('skipped') else 'ok' if nccl.get('ok') else 'FAILED' if nccl else 'not run'}"
            f" seconds={result['seconds']:.0f}")
    print(line)
    failed = [c for c in checks if not result[c].get("ok")]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)} (details in {args.out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
