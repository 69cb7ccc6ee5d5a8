"""Issue 9's acceptance runs, in one process: leave-one-slide-out over the 4 simulated spatial slides (3 train),
5 seeds; transfer (frozen_backbone, full, frozen_decoder) against the same model from scratch and ridge regression.

The same functions and defaults as notebooks/spatial_transfer.ipynb (and its sweep spec, whose runs hold one slide
each; a fold's validation spots depend on the fold's name, so a fold is the same in either). Per-fold rows go to
runs/spatial_transfer_loso/folds_seeds*.csv (one file per process: seeds
can run in parallel processes), the summary of every file there to benchmarks/results/spatial_transfer_loso.json.

    nice .venv/bin/python benchmarks/spatial_transfer_loso.py --seeds 0 1 2 &
    nice .venv/bin/python benchmarks/spatial_transfer_loso.py --seeds 3 4
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workbench.tasks import spatial_transfer as st

CONFIGS = [("frozen_backbone", "pretrain"), ("full", "pretrain"), ("frozen_decoder", "pretrain"), ("full", "none")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/spatial_transfer_loso")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = st.load()
    rows = []
    # the acceptance pair first (transfer with frozen_backbone, and from scratch) for every seed, then the others
    for phase in (CONFIGS[0::3], CONFIGS[1:3]):
        for seed in args.seeds:
            start = time.time()
            source = st.pretrained(study, "pretrain", seed=seed, progress=False)
            print(f"seed {seed}: pretrained in {time.time() - start:.0f} s", flush=True)
            for strategy, checkpoint in phase:
                start = time.time()
                result = st.cross_validate(study, source=source if checkpoint == "pretrain" else None,
                                           strategy=strategy, cv="loo", seed=seed)
                frame = result.per_fold.reset_index()
                frame.insert(0, "setting", f"{strategy}/{checkpoint}")
                frame.insert(1, "seed", seed)
                rows.append(frame)
                print(f"  {strategy}/{checkpoint}: mean per-gene Pearson {frame['test_mean_pearson'].mean():.4f} "
                      f"(ridge {frame['baseline_test_mean_pearson'].mean():.4f}) in {time.time() - start:.0f} s",
                      flush=True)
                pd.concat(rows).to_csv(out / f"folds_seeds{'-'.join(map(str, args.seeds))}.csv", index=False)
                summarize(pd.concat([pd.read_csv(p) for p in sorted(out.glob("folds_seeds*.csv"))]),
                          study.spatial.slide_names)


def summarize(folds, slides):
    per_seed = folds.groupby(["setting", "seed"])[["test_mean_pearson", "test_pearson", "test_mse",
                                                   "baseline_test_mean_pearson"]].mean()
    summary = per_seed.groupby("setting").agg(["mean", "std"])
    scratch = per_seed.loc["full/none", "test_mean_pearson"] if "full/none" in per_seed.index else None
    gains = {} if scratch is None else {
        s: (per_seed.loc[s, "test_mean_pearson"] - scratch).dropna().to_dict() for s in per_seed.index.levels[0]}
    result = {"seeds": sorted(set(folds["seed"].tolist())), "slides": slides, "runs": len(per_seed),
              "summary": {s: {f"{m}_{a}": float(v) for (m, a), v in row.items()} for s, row in summary.iterrows()},
              "gain_over_scratch_per_seed": {s: {int(k): float(v) for k, v in g.items()} for s, g in gains.items()}}
    print(summary.round(4).to_string(), flush=True)
    Path("benchmarks/results").mkdir(exist_ok=True)
    Path("benchmarks/results/spatial_transfer_loso.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
