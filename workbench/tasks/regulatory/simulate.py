"""The simulated data set and its ground truth (see the package docstring, "Simulated ground truth")."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .formats import TARGET

__all__ = ["simulate"]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate(*, n_genes: int = 150, n_regions: int = 8, n_motifs: int = 16, n_source_conditions: int = 24,
             n_new_conditions: int = 6, noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """A data set with the ground truth of the module docstring, one row per gene x condition.

    The simulated world (genes, motif weights, medium and drug effects) is fixed by ``seed``;
    it is the same whatever the split seed of :func:`load`. Returns the CSV layout of
    :func:`read_csv` (columns ``r{region}_m{motif}``, ``r{region}_access``, the condition
    columns, ``condition``, ``set`` and ``expression``).
    """
    if n_motifs < 5:
        raise ValueError(f"n_motifs={n_motifs} must be >= 5: motifs 0-4 carry the heat, cold and carbon effects.")
    rng = np.random.default_rng(seed)
    motifs = rng.binomial(1, 0.15, (n_genes, n_regions, n_motifs)).astype(np.float32)
    access = rng.beta(2, 2, (n_genes, n_regions)).astype(np.float32)
    weights = rng.normal(0, 1, n_motifs)
    decay = np.exp(-np.arange(n_regions) / 3)

    def sparse_effect(k, scale):
        effect = np.zeros(n_motifs)
        effect[rng.choice(n_motifs, k, replace=False)] = rng.normal(0, scale, k)
        return effect

    media = {name: sparse_effect(4, 0.8) for name in ("sc", "ypd", "ypgal", "sd", "minimal")}
    drugs = {"none": np.zeros(n_motifs)} | {name: sparse_effect(3, 1.0) for name in ("caffeine", "tunicamycin", "rapamycin")}

    def condition(new: bool, index: int) -> dict:
        novel = new and index % 2 == 0  # half the new conditions: a new medium; half: a new drug
        medium = "minimal" if novel else str(rng.choice(["sc", "ypd", "ypgal", "sd"]))
        drug = "rapamycin" if (new and not novel) else str(rng.choice(["none", "caffeine", "tunicamycin"]))
        temperature = float(rng.choice([30, 25, 42, 30])) if rng.random() < 0.7 else float(rng.uniform(20, 45))
        return {
            "medium": medium, "drug": drug,
            "carbon_source": str(rng.choice(["", "glucose", "galactose"])),
            "temperature": round(temperature, 1),
            "preculture_h": round(float(rng.uniform(3, 4)), 2), "od600": round(float(rng.uniform(0, 3)), 2),
            "drug_conc": 0.0 if drug == "none" else float(10 ** rng.uniform(-7, -4)),
            "drug_time_h": 0.0 if drug == "none" else round(float(rng.uniform(0.25, 4)), 2),
        }

    def activity(c: dict) -> np.ndarray:
        a = media[c["medium"]].copy()
        a[0:2] += 1.2 * _sigmoid((c["temperature"] - 37) / 2)
        a[2:4] -= 0.5 * _sigmoid((25 - c["temperature"]) / 2)
        dose = np.log10(1 + c["drug_conc"] / 1e-6) / 3 * (1 - np.exp(-c["drug_time_h"]))
        a += drugs[c["drug"]] * dose
        a[2:4] -= 0.3 * c["od600"]
        a += 0.1 * (c["preculture_h"] - 3.5)
        a[4] += {"galactose": 1.5, "glucose": -0.5}.get(c["carbon_source"], 0.0)
        return a

    columns = {f"r{r}_m{m}": motifs[:, r, m] for r in range(n_regions) for m in range(n_motifs)}
    columns |= {f"r{r}_access": access[:, r] for r in range(n_regions)}
    gene_frame = pd.DataFrame(columns)
    gene_frame.insert(0, "gene", [f"gene{g:04d}" for g in range(n_genes)])
    parts = []
    for new, count in ((False, n_source_conditions), (True, n_new_conditions)):
        for index in range(count):
            c = condition(new, index)
            effective = weights * (1 + activity(c))
            signal = np.einsum("grm,m,r,gr->g", motifs, effective, decay, access)
            part = gene_frame.copy()
            for key, value in c.items():
                part[key] = value
            part["condition"] = f"{'new' if new else 'source'}{index:02d}:{c['medium']}/{c['drug']}/{c['temperature']:g}C"
            part["set"] = "target" if new else "source"
            part[TARGET] = (signal + rng.normal(0, noise, n_genes)).astype(np.float32)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)
