"""Generated multi-site CSV files for tests: what a user brings (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SIZES = (160, 110, 70)


def patient_frame(n: int, seed: int) -> pd.DataFrame:
    """Records with numeric, binary and categorical columns, missing values, string labels.

    The label depends on age, smoking and sex, so a trained model beats the majority class.
    """
    r = np.random.default_rng(seed)
    age = r.integers(20, 90, n).astype(float)
    sex = r.choice(["F", "M"], n)
    chol = r.normal(200, 30, n).round(1)
    smoker = r.choice(["never", "former", "current"], n, p=[0.5, 0.3, 0.2])
    logit = 0.08 * (age - 55) + 1.5 * (smoker == "current") - 0.6 * (sex == "F")
    death = np.where(r.random(n) < 1 / (1 + np.exp(-logit)), "dead", "alive")
    df = pd.DataFrame(
        {"age": age, "sex": sex, "chol": chol, "smoker": smoker, "death": death}
    ).astype({"chol": object, "smoker": object})
    df.loc[r.random(n) < 0.1, "chol"] = None
    df.loc[r.random(n) < 0.08, "smoker"] = None
    return df


def write_sites(folder: Path, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> list[Path]:
    """Write one CSV per site into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(sizes):
        p = folder / f"site_{i}.csv"
        patient_frame(n, seed + i).to_csv(p, index=False)
        paths.append(p)
    return paths


def five_line_config(folder: Path, paths: list[Path], extra: str = "") -> Path:
    """The five-line config of the README: target, positive and the sites (relative paths)."""
    sites = ", ".join(f'{{name = "s{i}", path = "{p.name}"}}' for i, p in enumerate(paths))
    text = f'[data]\ntarget = "death"\npositive = "dead"\nsites = [{sites}]\n{extra}'
    cfg = folder / "privml.toml"
    cfg.write_text(text)
    return cfg
