"""Issue 24: the synthetic heart-sound task's difficulty, set by looking at the BASELINE alone.

For each value of the generator's free difficulty knob (``DEFAULTS["sim_snr_db"]``, the median ambient
signal-to-noise ratio in dB), this simulates the notebook's default data for seeds 0-4 exactly as the notebook
does (``heart_sound.load`` with the notebook's defaults), fits the band-power logistic regression
(``heart_sound.baseline``) and prints its test AUROC per seed and the mean. No model is trained or looked at.

``--label-fraction 1.0 0.1`` adds the baseline on the few-shot split (the same 10% of labelled patients the few_shot runs
use); ``--tasks`` measures other tasks too (their generator is the same code). Every knob value tried is kept in
benchmarks/results/heart_baseline_difficulty.json (merged by knob value and task), so the file is the record of
the tuning.

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/heart_baseline_difficulty.py --snr-db 10 5 0
    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/heart_baseline_difficulty.py --label before
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from workbench.tasks import heart_sound as hs

RESULTS = Path(__file__).resolve().parent / "results" / "heart_baseline_difficulty.json"


def measure(task: str, seeds, *, label_fraction: float = 1.0) -> dict:
    """The baseline's test AUROC per seed on the notebook's default synthetic data for ``task``."""
    scores = []
    for seed in seeds:
        data = hs.load("", task, label_fraction=label_fraction, seed=seed)  # the notebook's defaults
        scores.append(float(hs.baseline(data, seed=seed)["test_auroc"]))
    return {"per_seed": dict(zip(map(str, seeds), scores)), "mean": float(np.mean(scores)),
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--snr-db", type=float, nargs="*", default=[],
                        help="knob values to try; none: the generator as committed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", default=["circor_murmur"])
    parser.add_argument("--label-fraction", type=float, nargs="*", default=[1.0],
                        help="label_fraction values (0.1: the few_shot runs' labelled patients)")
    parser.add_argument("--label", default="", help="a name for this generator (e.g. before); default: the knob")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "workbench"], capture_output=True,
                                text=True).stdout.strip())
    knobs = args.snr_db or [hs.DEFAULTS.get("sim_snr_db")]
    for knob in knobs:
        if knob is not None:
            hs.DEFAULTS["sim_snr_db"] = knob
        name = args.label or f"sim_snr_db={knob:g}"
        for task in args.tasks:
            for ratio in args.label_fraction:
                start = time.time()
                result = measure(task, args.seeds, label_fraction=ratio)
                key = f"{name} | {task} | label_fraction={ratio:g}"
                per_seed = " / ".join(f"{v:.3f}" for v in result["per_seed"].values())
                print(f"{key}: baseline test AUROC {result['mean']:.3f} +- {result['std']:.3f} "
                      f"(seeds {per_seed}) in {time.time() - start:.0f} s", flush=True)
                record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"tries": {}}  # other runs' too
                record["tries"][key] = {"generator": name, "sim_snr_db": knob, "task": task, "label_fraction": ratio,
                                        **result, "commit": commit + ("+dirty" if dirty else ""),
                                        "inside_0.70-0.90": bool(0.70 <= result["mean"] <= 0.90)}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
