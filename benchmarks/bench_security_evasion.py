"""Evasion and adversarial training on digits, measured with ART's PGD as well as privml's.

Setting (issue 8): scikit-learn's digits (8x8, pixels scaled to [0, 1] by the declared bound
16), stratified 75/25 split, privml's small CNN (``ModelSpec("cnn", 64, 10,
image_shape=(8, 8))``: conv 16 - conv 32 stride 2 - dense 32). Two models:

* plain: Adam, clean training;
* PGD-AT: privml's adversarial training (PGD-10 examples at L-inf 0.1, budget ramped over the
  first 30% of 40 epochs, Adam 3e-3).

Each is attacked by PGD-20 at L-inf 0.1 (step 0.01, one random start) from ART 1.20 and from
privml, and by FGSM. Then both PGD implementations run the same work (same model, records,
start at the clean point) ``--reps`` times to compare speed and agreement.

    .venv/bin/python benchmarks/bench_security_evasion.py [--epochs 40] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from privml.models.nets import ModelSpec, build_model
from privml.security.attacks.evasion import accuracy, fgsm, pgd
from privml.security.defenses.adversarial import adversarial_train


def art_pgd(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, eps: float, step: float,
            iters: int, random_init: int) -> np.ndarray:  # fmt: skip
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=(64,), nb_classes=10,
        clip_values=(0.0, 1.0),
    )  # fmt: skip
    attack = ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=step, max_iter=iters, num_random_init=random_init,
        batch_size=256, verbose=False,
    )  # fmt: skip
    return attack.generate(X, y)


def train_plain(X: np.ndarray, y: np.ndarray, spec: ModelSpec, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(spec)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(Xt[idx]), yt[idx]).backward()
            opt.step()
    m.eval()
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(
        X, d.target, test_size=0.25, random_state=0, stratify=d.target
    )
    spec = ModelSpec("cnn", 64, 10, image_shape=(8, 8))
    eps, step = args.eps, args.eps / 10
    out: dict[str, object] = {"eps": eps, "pgd_steps": 20, "step": step, "n_test": len(yte)}

    t0 = time.perf_counter()
    plain = train_plain(Xtr, ytr, spec, args.epochs)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    at = adversarial_train(Xtr, ytr, spec, eps=eps, epochs=args.epochs, steps=10, lr=3e-3)
    t_at = time.perf_counter() - t0
    rows = {}
    for name, m in (("plain", plain), ("pgd_at", at.model)):
        rows[name] = {
            "clean": accuracy(m, Xte, yte),
            "art_pgd20": accuracy(m, art_pgd(m, Xte, yte, eps=eps, step=step, iters=20,
                                             random_init=1), yte),  # fmt: skip
            "privml_pgd20": accuracy(m, pgd(m, Xte, yte, eps=eps, steps=20, step_size=step), yte),
            "privml_fgsm": accuracy(m, fgsm(m, Xte, yte, eps=eps), yte),
        }
    rows["plain"]["train_seconds"] = t_plain
    rows["pgd_at"]["train_seconds"] = t_at
    out["models"] = rows

    # Same work for both: PGD-20 from the clean point on the PGD-AT model.
    t_art, t_ours, diff = [], [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        a = art_pgd(at.model, Xte, yte, eps=eps, step=step, iters=20, random_init=0)
        t_art.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = pgd(at.model, Xte, yte, eps=eps, steps=20, step_size=step, random_init=False)
        t_ours.append(time.perf_counter() - t0)
        diff.append(float(np.abs(a - b).max()))
    out["speed"] = {
        "art_median_s": statistics.median(t_art),
        "privml_median_s": statistics.median(t_ours),
        "ratio_art_over_privml": statistics.median(t_art) / statistics.median(t_ours),
        "max_abs_difference": max(diff),
    }
    print(json.dumps(out, indent=2))
    print()
    for name, r in rows.items():
        print(
            f"{name:7s} clean {r['clean']:.3f}  ART PGD-20 {r['art_pgd20']:.3f}  privml PGD-20 "
            f"{r['privml_pgd20']:.3f}  FGSM {r['privml_fgsm']:.3f}"
        )
    sp = out["speed"]
    assert isinstance(sp, dict)
    print(
        f"PGD-20 on {len(yte)} records: ART {sp['art_median_s']:.3f} s, privml "
        f"{sp['privml_median_s']:.3f} s (median of {args.reps}); ratio "
        f"{sp['ratio_art_over_privml']:.1f}x; max |diff| {sp['max_abs_difference']:.1e}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
