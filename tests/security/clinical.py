"""A clinical table shipped by an installed package (scikit-survival's GBSG2: German Breast
Cancer Study Group 2, 686 patients, numeric and categorical columns), written as hospital
CSV files with a declared public schema, the way a user would set up ``privml``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: Declared clinical ranges (public knowledge, not computed from the records).
GBSG2_BOUNDS = {"age": (18, 90), "tsize": (0, 150), "pnodes": (0, 60), "progrec": (0, 2500),
                "estrec": (0, 1500)}  # fmt: skip
GBSG2_CATEGORIES = {"horTh": ["no", "yes"], "menostat": ["Pre", "Post"],
                    "tgrade": ["I", "II", "III"]}  # fmt: skip


def gbsg2_config(folder: Path, *, hospitals: int = 4, extra: str = "") -> Path:
    """Hospital CSVs of GBSG2 (outcome: recurrence observed, yes / no) and a config for them."""
    datasets = pytest.importorskip("sksurv.datasets")
    X, y = datasets.load_gbsg2()
    df = X.copy()
    for c in GBSG2_CATEGORIES:
        df[c] = df[c].astype(str)
    df["recurrence"] = np.where(y["cens"], "yes", "no")
    parts = np.array_split(np.random.default_rng(0).permutation(len(df)), hospitals)
    lines = ['name = "gbsg2"', "[data]", 'target = "recurrence"', 'positive = "yes"']
    for i, p in enumerate(parts):
        path = folder / f"hospital_{i}.csv"
        df.iloc[p].to_csv(path, index=False)
        lines += ["[[data.sites]]", f'name = "hospital_{i}"', f'path = "{path}"']
    for c, (lo, hi) in GBSG2_BOUNDS.items():
        lines += [f"[data.schema.{c}]", 'type = "numeric"', f"min = {lo}", f"max = {hi}"]
    for c, vals in GBSG2_CATEGORIES.items():
        quoted = ", ".join(f'"{v}"' for v in vals)
        lines += [f"[data.schema.{c}]", 'type = "categorical"', f"values = [{quoted}]"]
    cfg = folder / "gbsg2.toml"
    cfg.write_text("\n".join(lines) + "\n" + extra)
    return cfg
