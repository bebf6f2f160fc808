"""Evasion and adversarial training, measured with ART's attacks as well as privml's.

Run:  .venv/bin/python benchmarks/bench_security_evasion.py [--quick] [--no-digits]

**Tabular demo** (always): the demo federation (breast cancer, 3 hospitals, logistic
regression, the demo's training settings). Undefended: the model ``privml run`` trains.
Defended: privml's federated TRADES with its trade-off chosen on validation records carved
from the hospitals' training records (``adversarial_method = "auto"`` of ``privml audit``,
eps 0.1). Both are attacked at each budget (a share of every column's declared range) by
privml's schema-respecting PGD-20 (``privml.security.tabular.schema_pgd``) and by ART's
``AutoProjectedGradientDescent`` with the cross-entropy loss (APGD-CE, 100 iterations, 5
random starts, the same mask and box); accuracy, balanced accuracy and AUC under attack are
reported beside the majority-class accuracy. Target: the defended model is not degenerate
(clean AUC >= 0.9) and beats the undefended one under the same attack at the same budget.

**Digits** (skipped with ``--no-digits``; 10-15 minutes here): scikit-learn's digits (8x8, pixels
scaled to [0, 1] by the declared bound 16), stratified 75/25 split, privml's small CNN
(``ModelSpec("cnn", 64, 10, image_shape=(8, 8))``: conv 16 - conv 32 stride 2 - dense 32).
Two models:

* plain: Adam, clean training;
* PGD-AT: privml's adversarial training (PGD-10 examples at L-inf 0.1, budget ramped over the
  first 30% of 40 epochs, Adam 3e-3).

Each is attacked by PGD-20 at L-inf 0.1 (step 0.01, one random start) from ART 1.20 and from
privml, by ART's APGD-CE and APGD-DLR (100 iterations, 5 random starts), and by FGSM. Then
both PGD implementations run the same work (same model, records, start at the clean point)
``--reps`` times, interleaved, to compare speed and agreement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.models.nets import ModelSpec, build_model  # noqa: E402
from privml.security.attacks.evasion import accuracy, fgsm, pgd  # noqa: E402
from privml.security.defenses.adversarial import adversarial_train  # noqa: E402


class _TwoLogits(torch.nn.Module):
    """A one-logit binary model as ART's two-class classifier: logits ``[0, z]``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.cat([torch.zeros_like(z), z], dim=1) if z.shape[1] == 1 else z


def art_apgd(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, eps: float,
             n_classes: int, loss: str, iters: int, restarts: int,
             mask: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    net = _TwoLogits(model).eval()
    clf = PyTorchClassifier(net, loss=torch.nn.CrossEntropyLoss(), input_shape=(X.shape[1],),
                            nb_classes=max(2, n_classes), clip_values=(0.0, 1.0))  # fmt: skip
    attack = AutoProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=2 * eps / 10, max_iter=iters,
        nb_random_init=restarts, batch_size=256, loss_type=loss, verbose=False,
    )  # fmt: skip
    # ART's APGD subsets the records it still attacks, so the mask must be per feature
    kw = {} if mask is None or mask.all() else {"mask": mask.astype(np.float32)}
    return attack.generate(X.astype(np.float32), y.astype(np.int64), **kw)


def tabular_demo(bench: Bench, quick: bool) -> None:
    from privml.config import load_config
    from privml.data.federation import load_federation
    from privml.fl.engine import simulate
    from privml.pipeline import model_spec
    from privml.security.baselines import majority_accuracy, model_quality
    from privml.security.experiments import adversarial_defence
    from privml.security.tabular import FeatureLayout, budget_in_units, schema_pgd

    cfg = load_config(None)
    if quick:
        cfg.training.rounds, cfg.training.local_epochs = 1, 1
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    X, y = fed.pooled_test()
    layout = FeatureLayout.from_encoder(fed.encoder, fed.n_features)
    t0 = time.perf_counter()
    res = simulate(fed, spec, cfg.training)
    plain = res.model.eval()
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    betas = (0.5,) if quick else (0.5, 2.0, 6.0)
    d = adversarial_defence(fed, spec, cfg.training, eps=0.1, method="auto", betas=betas, seed=0)
    t_def = time.perf_counter() - t0
    models = {"undefended": plain}
    if d["model"] is not None:
        models["defended"] = d["model"]
    budgets = [0.05] if quick else [0.02, 0.05, 0.1]
    iters, restarts = (5, 1) if quick else (100, 5)
    out: dict[str, Any] = {"defence": {k: v for k, v in d.items() if k != "model"},
                           "train_seconds": {"undefended": t_plain, "defended": t_def},
                           "majority_accuracy": majority_accuracy(y), "models": {}}  # fmt: skip
    rows = []
    for name, m in models.items():
        q = model_quality(m, X, y, classes=fed.task.classes)
        rec: dict[str, Any] = {"clean": q.to_dict(), "budgets": {}}
        rows.append([name, "clean", "-", f"{q.accuracy:.3f}", f"{q.balanced_accuracy:.3f}",
                     f"{q.auc:.3f}",
                     f"DEGENERATE: {q.reason}" if q.degenerate else "ok"])  # fmt: skip
        for b in budgets:
            ours = schema_pgd(m, X, y, layout, eps=b, steps=20, seed=0)
            theirs = art_apgd(m, X, y, eps=b, n_classes=2, loss="cross_entropy", iters=iters,
                              restarts=restarts, mask=layout.numeric_mask())  # fmt: skip
            for attack, adv in (("privml schema PGD-20", ours), ("ART APGD-CE", theirs)):
                qa = model_quality(m, adv, y)
                rec["budgets"].setdefault(str(b), {})[attack] = qa.to_dict()
                rows.append([name, attack, f"{b:g} ({budget_in_units(layout, b, limit=1)['text']})",
                             f"{qa.accuracy:.3f}", f"{qa.balanced_accuracy:.3f}",
                             f"{qa.auc:.3f}", ""])  # fmt: skip
        out["models"][name] = rec
    bench.record("tabular_demo", out)
    cleanq = out["models"].get("defended", {}).get("clean", {})
    bench.record("tabular_verdicts", {
        "defended_not_degenerate_auc_ge_0.9": bool(cleanq) and not cleanq["degenerate"]
        and (cleanq["auc"] or 0) >= 0.9,
        "defended_beats_undefended": bool(cleanq) and all(
            out["models"]["defended"]["budgets"][str(b)][a]["accuracy"]
            > out["models"]["undefended"]["budgets"][str(b)][a]["accuracy"]
            for b in budgets for a in ("privml schema PGD-20", "ART APGD-CE")),
    })  # fmt: skip
    bench.table(
        "tabular", ["model", "attack", "eps (share of declared range)", "accuracy",
                    "balanced accuracy", "AUC", "model status"], rows,
        caption=f"Demo (breast cancer, 3 hospitals, logistic regression), {len(y)} test records; "
        f"majority-class accuracy {majority_accuracy(y):.3f}, chance balanced accuracy and AUC "
        f"0.5. Defended: {d['label']}.",
    )  # fmt: skip


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
    add_common_args(ap)
    ap.add_argument("--no-digits", action="store_true", help="skip the digits CNN (slow)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench("security_evasion", quick=args.quick, out=args.out,
                  params={"digits": not args.no_digits, "epochs": args.epochs, "eps": args.eps})
    tabular_demo(bench, args.quick)
    if not args.no_digits:
        digits_cnn(bench, args)
    bench.write()


def digits_cnn(bench: Bench, args: Any) -> None:
    epochs = 1 if args.quick else args.epochs
    reps = 1 if args.quick else args.reps
    it, rs = (5, 1) if args.quick else (100, 5)
    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(
        X, d.target, test_size=0.25, random_state=0, stratify=d.target
    )
    if args.quick:
        Xtr, ytr, Xte, yte = Xtr[:100], ytr[:100], Xte[:30], yte[:30]
    spec = ModelSpec("cnn", 64, 10, image_shape=(8, 8))
    eps, step = args.eps, args.eps / 10
    out: dict[str, object] = {"eps": eps, "pgd_steps": 20, "step": step, "n_test": len(yte)}

    t0 = time.perf_counter()
    plain = train_plain(Xtr, ytr, spec, epochs)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    at = adversarial_train(Xtr, ytr, spec, eps=eps, epochs=epochs, steps=10, lr=3e-3)
    t_at = time.perf_counter() - t0
    rows_d: dict[str, dict[str, float]] = {}
    for name, m in (("plain", plain), ("pgd_at", at.model)):
        rows_d[name] = {
            "clean": accuracy(m, Xte, yte),
            "art_pgd20": accuracy(m, art_pgd(m, Xte, yte, eps=eps, step=step, iters=20,
                                             random_init=1), yte),  # fmt: skip
            "privml_pgd20": accuracy(m, pgd(m, Xte, yte, eps=eps, steps=20, step_size=step), yte),
            "privml_fgsm": accuracy(m, fgsm(m, Xte, yte, eps=eps), yte),
            "art_apgd_ce": accuracy(m, art_apgd(m, Xte, yte, eps=eps, n_classes=10,
                                                loss="cross_entropy", iters=it,
                                                restarts=rs), yte),
            "art_apgd_dlr": accuracy(m, art_apgd(m, Xte, yte, eps=eps, n_classes=10,
                                                 loss="difference_logits_ratio", iters=it,
                                                 restarts=rs), yte),
        }
    rows_d["plain"]["train_seconds"] = t_plain
    rows_d["pgd_at"]["train_seconds"] = t_at
    out["models"] = rows_d

    # Same work for both: PGD-20 from the clean point on the PGD-AT model.
    diff: list[float] = []
    got: dict[str, np.ndarray] = {}

    def run_art() -> None:
        got["art"] = art_pgd(at.model, Xte, yte, eps=eps, step=step, iters=20, random_init=0)

    def run_ours() -> None:
        got["privml"] = pgd(at.model, Xte, yte, eps=eps, steps=20, step_size=step,
                            random_init=False)  # fmt: skip
        if "art" in got:
            diff.append(float(np.abs(got["art"] - got["privml"]).max()))

    from harness import ratios

    timing = bench.interleave({"art": run_art, "privml": run_ours}, reps=reps,
                              warmup=0 if args.quick else 1, key="speed_pgd20")  # fmt: skip
    out["speed"] = {
        "art_median_s": timing["art"].median,
        "privml_median_s": timing["privml"].median,
        "ratio_art_over_privml": ratios(timing["art"], timing["privml"]).median,
        "max_abs_difference": max(diff) if diff else None,
    }
    bench.record("digits", out)
    rows = []
    for name, r in rows_d.items():
        rows.append([name, f"{r['clean']:.3f}", f"{r['art_pgd20']:.3f}",
                     f"{r['art_apgd_ce']:.3f}", f"{r['art_apgd_dlr']:.3f}",
                     f"{r['privml_pgd20']:.3f}", f"{r['privml_fgsm']:.3f}"])  # fmt: skip
    bench.table("digits", ["model", "clean", "ART PGD-20", "ART APGD-CE", "ART APGD-DLR",
                           "privml PGD-20", "FGSM"], rows,
                caption=f"Digits CNN, L-inf eps {eps:g}, {len(yte)} test images.")  # fmt: skip
    sp = out["speed"]
    assert isinstance(sp, dict)
    cols = ["work", "ART", "privml", "ratio ART / privml", "max abs difference"]
    bench.table("digits_speed", cols, [[
        f"PGD-20 on {len(yte)} records from the clean point, PGD-AT model",
        f"{sp['art_median_s']:.3f} s", f"{sp['privml_median_s']:.3f} s",
        f"{sp['ratio_art_over_privml']:.2f}x", f"{sp['max_abs_difference'] or 0:.1e}"]],
        caption=f"Median of {reps} interleaved repetitions.")  # fmt: skip


if __name__ == "__main__":
    main()
