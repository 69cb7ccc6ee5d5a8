"""Reading and writing regulatory samples: the CSV layout (one row per gene x condition) and GET-style zarr stores.

A sample is one gene under one condition: columns ``r{region}_m{motif}`` (motif hits), ``r{region}_access``
(accessibility), the condition columns :data:`CATEGORICAL` and :data:`NUMERIC`, the target :data:`TARGET`, and
optionally ``set`` (``source`` rows pretrain), ``condition`` and ``gene``. Every reader checks columns and values and
names the fix in its error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["CATEGORICAL", "NUMERIC", "TARGET", "SET_VALUES", "UNKNOWN", "ZARR_KEYS", "read_csv", "write_csv",
           "read_zarr", "write_zarr"]

CATEGORICAL = ("medium", "drug", "carbon_source")
#: Values of the optional ``set`` column: ``source`` rows pretrain, ``target`` rows are split for fine-tuning.
SET_VALUES = ("source", "target")
NUMERIC = ("temperature", "preculture_h", "od600", "drug_conc", "drug_time_h")
TARGET = "expression"
UNKNOWN = "<unknown>"


def _layout(columns) -> tuple[int, int]:
    """(regions, motifs) from the ``r{r}_m{m}`` columns."""
    cells = [c[1:].split("_m") for c in columns if c.startswith("r") and "_m" in c]
    cells = [(int(r), int(m)) for r, m in cells if r.isdigit() and m.isdigit()]
    if not cells:
        raise ValueError("No motif columns found: a regulatory CSV has columns named r{region}_m{motif} (e.g. r0_m0, "
                         "r0_m1, ..., r7_m15) and r{region}_access.")
    return max(r for r, _ in cells) + 1, max(m for _, m in cells) + 1


def _check_frame(frame: pd.DataFrame, source: str) -> tuple[int, int]:
    """Check columns and values; return (regions, motifs)."""
    n_regions, n_motifs = _layout(frame.columns)
    feature_columns = [f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]
    feature_columns += [f"r{r}_access" for r in range(n_regions)]
    expected = list(CATEGORICAL) + list(NUMERIC) + [TARGET]
    missing = [c for c in expected + feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}. A regulatory CSV needs "
            f"the condition columns {list(CATEGORICAL) + list(NUMERIC)}, the target {TARGET!r}, and "
            f"r{{region}}_m{{motif}} / r{{region}}_access for every region ({n_regions}) and motif ({n_motifs}). "
            "Add the missing column(s) (an empty categorical value means 'not given')."
        )
    for column in list(NUMERIC) + [TARGET] + feature_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{source}: column {column!r} must be numeric, but row {row} holds {frame[column].iloc[row]!r} "
                f"({int(bad.sum())} such row(s)). Fix the value (a number, e.g. 30 for temperature) or drop the row."
            )
        frame[column] = values
    nan_target = frame[TARGET].isna() | ~np.isfinite(frame[TARGET].to_numpy(dtype=float))
    if nan_target.any():
        rows = np.flatnonzero(nan_target.to_numpy())
        raise ValueError(f"{source}: {len(rows)} row(s) have no {TARGET!r} value (NaN), e.g. row {int(rows[0])}. "
                         f"Every sample needs a target: drop them first, e.g. frame.dropna(subset=[{TARGET!r}]).")
    for column in NUMERIC:
        if frame[column].isna().any():
            row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
            raise ValueError(f"{source}: column {column!r} is empty in row {row}. Give a number (0 for no drug).")
    return n_regions, n_motifs


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a regulatory CSV: one row per sample (gene x condition).

    Columns: ``r{region}_m{motif}`` (motif hits), ``r{region}_access`` (accessibility),
    the condition columns :data:`CATEGORICAL` and :data:`NUMERIC`, the target ``expression``,
    and optionally ``set`` (``source`` rows pretrain, ``target`` rows are split for fine-tuning; case and
    surrounding spaces do not matter, other values are refused),
    ``condition`` (a name per condition, for per-condition metrics) and ``gene``.

    Raises
    ------
    ValueError
        For a missing column (naming it and listing the expected ones), a non-numeric value in
        a numeric column (naming the row and column) or a missing target.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist. Give a CSV file, or '' to simulate data.")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={c: str for c in CATEGORICAL})
    _check_frame(frame, path.name)
    return frame


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame from :func:`simulate` in the layout :func:`read_csv` reads."""
    path = Path(path)
    frame.to_csv(path, index=False)
    return path


#: What a GET-style zarr store must hold (GET's region-motif layout, one "cell type" per condition).
ZARR_KEYS = ("data", "motif_names", "peak_names", "atpm", "expression_positive", "expression_negative",
             "gene_idx_info_index", "gene_idx_info_name", "gene_idx_info_strand")


def _texts(values) -> np.ndarray:
    """Strings from a zarr string array, whatever its string type (bytes included)."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()], dtype=object)


def read_zarr(path: str | os.PathLike, *, conditions_path: str | os.PathLike | None = None,
              n_regions: int = 8) -> pd.DataFrame:
    """Read a zarr store in the layout of GET's region-motif datasets into the CSV layout.

    The store holds ``data`` (peaks x motifs), ``peak_names``, ``motif_names``, and per "cell
    type" (here: per condition) ``atpm/<name>`` (accessibility per peak) and
    ``expression_positive/<name>`` / ``expression_negative/<name>`` (per peak), with the genes'
    TSS peaks in ``gene_idx_info_index`` / ``_name`` / ``_strand``. One sample is a gene under a
    condition: its TSS peak and the next ``n_regions - 1`` peaks in the gene's direction, the
    expression of its strand at the TSS peak. GET stores no condition features, so they come from
    ``conditions_path`` (default ``<store>.conditions.csv``): a ``celltype`` column naming the
    groups, the condition columns, and optionally ``condition`` and ``set``.

    Needs the ``zarr`` package (``pip install zarr``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_path={str(path)!r} does not exist. Give a .zarr store, a CSV, or '' to simulate.")
    try:
        import zarr
    except ImportError:
        raise ImportError("Reading a .zarr store needs the zarr package: pip install zarr (or the workbench "
                          "'zarr' extra). Or export the samples to the CSV layout (read_csv).") from None
    root = zarr.open_group(str(path), mode="r")
    missing = [key for key in ZARR_KEYS if key not in root]
    if missing:
        raise ValueError(f"{path.name} lacks {missing}; a GET-style store holds {list(ZARR_KEYS)}.")
    conditions_path = Path(conditions_path) if conditions_path else path.with_suffix(".conditions.csv")
    if not conditions_path.exists():
        raise FileNotFoundError(f"No condition table for {path.name}: {str(conditions_path)!r} does not exist. Write a "
                                f"CSV with a 'celltype' column (the names under atpm/) and the columns "
                                f"{list(CATEGORICAL) + list(NUMERIC)}, or pass conditions_path=.")
    table = pd.read_csv(conditions_path, keep_default_na=False, na_values=[""],
                        dtype={c: str for c in (*CATEGORICAL, "celltype", "condition", "set")})
    if "celltype" not in table:
        raise ValueError(f"{conditions_path.name} has no 'celltype' column naming the groups under atpm/ in {path.name}.")
    motifs = np.asarray(root["data"][:], dtype=np.float32)
    tss = np.asarray(root["gene_idx_info_index"][:], dtype=np.int64)
    genes = _texts(root["gene_idx_info_name"][:])
    step = np.where(_texts(root["gene_idx_info_strand"][:]) == "-", -1, 1)
    windows = tss[:, None] + step[:, None] * np.arange(n_regions)
    inside = ((windows >= 0) & (windows < len(motifs))).all(axis=1)
    windows, tss, genes, step = windows[inside], tss[inside], genes[inside], step[inside]
    parts = []
    for _, row in table.iterrows():
        name = row["celltype"]
        if f"atpm/{name}" not in root:
            raise ValueError(f"{conditions_path.name} names celltype {name!r}, which {path.name} does not hold under "
                             f"atpm/ (it holds {sorted(root['atpm'].keys())[:10]}).")
        access = np.asarray(root[f"atpm/{name}"][:], dtype=np.float32)
        plus = np.asarray(root[f"expression_positive/{name}"][:], dtype=np.float32)
        minus = np.asarray(root[f"expression_negative/{name}"][:], dtype=np.float32)
        columns = {f"r{r}_m{m}": motifs[windows[:, r], m] for r in range(n_regions) for m in range(motifs.shape[1])}
        columns |= {f"r{r}_access": access[windows[:, r]] for r in range(n_regions)}
        part = pd.DataFrame(columns)
        part.insert(0, "gene", genes)
        for column in (*CATEGORICAL, *NUMERIC, "set"):
            if column in table:
                part[column] = row[column]
        part["condition"] = row["condition"] if "condition" in table else name
        part[TARGET] = np.where(step > 0, plus[tss], minus[tss])
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    _check_frame(frame, path.name)
    return frame


def write_zarr(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a frame from :func:`simulate` as a GET-style zarr store plus its condition table.

    Each gene gets its own run of peaks (its regions, TSS first, '+' strand); each condition
    becomes a "cell type" ``cond000``, ``cond001``, ... The condition features go to
    ``<store>.conditions.csv``. Read it back with :func:`read_zarr`.
    """
    import zarr

    path = Path(path)
    n_regions, n_motifs = _layout(frame.columns)
    names = list(dict.fromkeys(frame["condition"]))
    genes = list(dict.fromkeys(frame["gene"]))
    first = frame.drop_duplicates("gene").set_index("gene").loc[genes]
    motifs = first[[f"r{r}_m{m}" for r in range(n_regions) for m in range(n_motifs)]].to_numpy(np.float32)
    def text(values) -> np.ndarray:  # variable-length strings: the zarr v3 string type with a specification
        return np.array(values, dtype=np.dtypes.StringDType())

    root = zarr.open_group(str(path), mode="w")
    root.create_array("data", data=motifs.reshape(len(genes) * n_regions, n_motifs))
    root.create_array("peak_names", data=text([f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(len(genes) * n_regions)]))
    root.create_array("motif_names", data=text([f"motif{m}" for m in range(n_motifs)]))
    root.create_array("gene_idx_info_index", data=np.arange(len(genes)) * n_regions)
    root.create_array("gene_idx_info_name", data=text(genes))
    root.create_array("gene_idx_info_strand", data=text(["+"] * len(genes)))
    rows = []
    for i, name in enumerate(names):
        part = frame[frame["condition"] == name].set_index("gene").loc[genes]
        group = f"cond{i:03d}"
        access = part[[f"r{r}_access" for r in range(n_regions)]].to_numpy(np.float32).ravel()
        expression = np.zeros(len(genes) * n_regions, np.float32)
        expression[np.arange(len(genes)) * n_regions] = part[TARGET].to_numpy(np.float32)
        root.create_array(f"atpm/{group}", data=access)
        root.create_array(f"expression_positive/{group}", data=expression)
        root.create_array(f"expression_negative/{group}", data=np.zeros_like(expression))
        columns = [c for c in (*CATEGORICAL, *NUMERIC, "set") if c in part]
        rows.append({"celltype": group, "condition": name, **part.iloc[0][columns].to_dict()})
    pd.DataFrame(rows).to_csv(path.with_suffix(".conditions.csv"), index=False)
    return path
