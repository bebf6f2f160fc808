"""The encoded feature space of a tabular schema, as an attacker and an auditor must see it.

privml encodes a numeric column into [0, 1] by its declared bounds, a categorical column into
one-hot columns over its declared values (plus ``__other``), a binary column into one 0/1
column, and adds a ``__missing`` indicator where missing values are allowed
(:mod:`privml.data.encoding`). A threat model that makes sense on such records:

* moves a **numeric** feature only inside its declared bounds, by at most ``eps`` of its
  declared range (so ``eps = 0.05`` on ``age`` declared in [18, 90] is 3.6 years);
* moves a **categorical** or **binary** column only from one valid value to another (a
  record is never 0.3 "smoker=current"), in at most ``max_category_changes`` columns per
  record, or not at all;
* never touches the missing-value indicators.

:class:`FeatureLayout` reads this from the encoder; :func:`schema_pgd` is PGD on the numeric
features followed by greedy moves between valid category values; :func:`random_records` draws
records that respect the schema (the canaries of the one-run privacy audit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.errors import UsageError
from privml.security._checks import check_float, check_int

__all__ = [
    "FeatureLayout",
    "budget_in_units",
    "check_valid",
    "numeric_attack_from",
    "random_records",
    "schema_pgd",
]


@dataclass(frozen=True)
class FeatureLayout:
    """Which encoded columns are numeric, binary, one-hot groups, or frozen.

    Attributes:
        n_features: encoded width.
        numeric: indices of numeric columns (scaled into [0, 1] by declared bounds).
        numeric_names: their column names.
        numeric_ranges: their declared ``(min, max)`` in the schema's units (None: unknown).
        binary: indices of binary 0/1 columns.
        categorical: one list of one-hot indices per categorical column (``__other``
            included when declared).
        categorical_names: those columns' names.
        frozen: indices never changed (missing-value indicators).
    """

    n_features: int
    numeric: tuple[int, ...]
    numeric_names: tuple[str, ...] = ()
    numeric_ranges: tuple[tuple[float, float] | None, ...] = ()
    binary: tuple[int, ...] = ()
    categorical: tuple[tuple[int, ...], ...] = ()
    categorical_names: tuple[str, ...] = ()
    frozen: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_encoder(cls, encoder: Any, n_features: int | None = None) -> FeatureLayout:
        """The layout of :class:`privml.data.encoding.Encoder` ``encoder``'s output; an encoder
        without a schema (arrays made by hand) gives ``n_features`` numeric columns."""
        schema = getattr(encoder, "schema", None) or {}
        if not schema:
            if n_features is None:
                raise UsageError("FeatureLayout.from_encoder needs n_features for an empty schema")
            return cls.all_numeric(n_features)
        j = 0
        num: list[int] = []
        num_names: list[str] = []
        ranges: list[tuple[float, float] | None] = []
        binary: list[int] = []
        cats: list[tuple[int, ...]] = []
        cat_names: list[str] = []
        frozen: list[int] = []
        for col, spec in schema.items():
            if spec.type == "numeric":
                num.append(j)
                num_names.append(col)
                ranges.append(
                    (float(spec.min), float(spec.max))
                    if spec.min is not None and spec.max is not None
                    else None
                )
                j += 1
            elif spec.type == "binary":
                binary.append(j)
                j += 1
            else:
                width = len(spec.values or []) + int(bool(spec.other))
                cats.append(tuple(range(j, j + width)))
                cat_names.append(col)
                j += width
            if spec.missing:
                frozen.append(j)
                j += 1
        if n_features is not None and j != n_features:
            raise UsageError(
                f"the schema encodes {j} features but the model takes {n_features}; the "
                "encoder does not match the model"
            )
        return cls(j, tuple(num), tuple(num_names), tuple(ranges), tuple(binary), tuple(cats),
                   tuple(cat_names), tuple(frozen))  # fmt: skip

    @classmethod
    def all_numeric(cls, n_features: int) -> FeatureLayout:
        """Every column numeric in [0, 1] (images, hand-made arrays)."""
        idx = tuple(range(int(n_features)))
        return cls(int(n_features), idx, tuple(f"x{i}" for i in idx), (None,) * len(idx))

    @property
    def has_categories(self) -> bool:
        return bool(self.binary or self.categorical)

    def numeric_mask(self) -> np.ndarray:
        """``[F]`` float32 mask of the numeric columns (what PGD may move)."""
        m = np.zeros(self.n_features, dtype=np.float32)
        m[list(self.numeric)] = 1.0
        return m

    def category_moves(self) -> list[tuple[str, tuple[int, ...], int | None]]:
        """Every single-column move: ``(label, group columns, column to set)``; for a binary
        column the group is the column itself and ``None`` means "flip"."""
        moves: list[tuple[str, tuple[int, ...], int | None]] = []
        for name, grp in zip(self.categorical_names, self.categorical, strict=True):
            for c in grp:
                moves.append((name, grp, c))
        for b in self.binary:
            moves.append((f"binary {b}", (b,), None))
        return moves

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "numeric": len(self.numeric),
            "binary": len(self.binary),
            "categorical": dict(
                zip(self.categorical_names, [len(g) for g in self.categorical], strict=True)
            ),
            "frozen": len(self.frozen),
        }


def budget_in_units(layout: FeatureLayout, eps: float, *, limit: int = 3) -> dict[str, Any]:
    """An L-inf budget ``eps`` (share of each declared range) in the schema's own units.

    Returns ``{"per_column": {col: eps * (max - min)}, "text": "age +-3.6, ..."}``.
    """
    per = {
        n: float(eps * (r[1] - r[0]))
        for n, r in zip(layout.numeric_names, layout.numeric_ranges, strict=True)
        if r is not None
    }
    shown = list(per.items())[:limit]
    text = ", ".join(f"{n} +-{v:.3g}" for n, v in shown)
    if len(per) > limit:
        text += f", ... ({len(per)} numeric columns)"
    if not per:
        text = f"+-{eps:g} of each feature's [0, 1] range"
    return {"eps": eps, "per_column": per, "text": text}


def random_records(
    layout: FeatureLayout, n: int, *, rng: np.random.Generator
) -> np.ndarray:
    """``n`` random encoded records valid under the schema: numeric uniform in their declared
    range, one valid value per categorical column, random binary values, no missing flags."""
    k = check_int(n, "n", "random_records", low=1)
    X = np.zeros((k, layout.n_features), dtype=np.float32)
    num = list(layout.numeric)
    X[:, num] = rng.random((k, len(num)))
    for b in layout.binary:
        X[:, b] = rng.integers(0, 2, k)
    for grp in layout.categorical:
        pick = rng.integers(0, len(grp), k)
        X[np.arange(k), np.asarray(grp)[pick]] = 1.0
    return X


def _losses(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from privml.security.attacks.evasion import logits_loss

    with torch.no_grad():
        return logits_loss(model(X), y)


def schema_pgd(
    model: nn.Module,
    X: Any,
    y: Any,
    layout: FeatureLayout,
    *,
    eps: float,
    steps: int = 20,
    restarts: int = 1,
    max_category_changes: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Evasion that respects the schema: PGD on the numeric features within ``eps`` (L-inf,
    share of each declared range) and inside the declared bounds, then up to
    ``max_category_changes`` greedy moves of categorical / binary columns between valid values
    (each time the single move that raises the loss most, if any does), each followed by PGD
    on the numeric features again from the moved record.

    Args:
        model: torch module mapping encoded records to logits.
        X, y: clean encoded records and their labels.
        layout: the schema's :class:`FeatureLayout`.
        eps: numeric budget, > 0.
        steps, restarts, seed: PGD settings (:func:`privml.security.attacks.evasion.pgd`).
        max_category_changes: categorical/binary columns a record may change, >= 0.

    Returns:
        float32 adversarial records; numeric columns within ``eps`` and [0, 1], categorical
        groups still one-hot over valid values, frozen columns unchanged.
    """
    where = "schema_pgd"
    e = check_float(eps, "eps", where, low=0.0, low_open=True)
    kmax = check_int(max_category_changes, "max_category_changes", where, low=0)
    X0 = np.asarray(X, dtype=np.float32)
    yy = np.asarray(y)
    if X0.ndim != 2 or X0.shape[1] != layout.n_features:
        raise UsageError(
            f"The 'X' parameter of {where} must be [n, {layout.n_features}] (the layout's width)."
            f" Got shape {X0.shape} instead."
        )
    adv = numeric_attack_from(model, X0, X0, yy, layout, e, steps, restarts, seed)
    moves = layout.category_moves()
    if kmax == 0 or not moves:
        return adv
    yt = torch.from_numpy(yy.astype(np.int64))
    for _ in range(kmax):
        xt = torch.from_numpy(adv)
        base = _losses(model, xt, yt)
        best = base.clone()
        choice = torch.full((len(yy),), -1, dtype=torch.int64)
        for m, (_name, grp, col) in enumerate(moves):
            cand = xt.clone()
            if col is None:
                cand[:, grp[0]] = 1.0 - cand[:, grp[0]]
            else:
                cand[:, list(grp)] = 0.0
                cand[:, col] = 1.0
            changed = (cand != xt).any(dim=1)
            loss = _losses(model, cand, yt)
            better = changed & (loss > best)
            best = torch.where(better, loss, best)
            choice = torch.where(better, torch.tensor(m), choice)
        if bool((choice < 0).all()):
            break
        moved = adv.copy()
        for m, (_name, grp, col) in enumerate(moves):
            rows = (choice == m).numpy()
            if not rows.any():
                continue
            if col is None:
                moved[rows, grp[0]] = 1.0 - moved[rows, grp[0]]
            else:
                moved[np.ix_(rows, np.asarray(grp, dtype=np.int64))] = 0.0
                moved[rows, col] = 1.0
        # numeric part starts again from the clean values (so the eps box stays centred)
        num = list(layout.numeric)
        moved[:, num] = X0[:, num]
        again = numeric_attack_from(model, moved, X0, yy, layout, e, steps, restarts, seed)
        adv = np.where((choice >= 0).numpy()[:, None], again, adv)
    return adv


def numeric_attack_from(
    model: nn.Module,
    start: np.ndarray,
    clean: np.ndarray,
    y: np.ndarray,
    layout: FeatureLayout,
    eps: float,
    steps: int,
    restarts: int,
    seed: int,
) -> np.ndarray:
    """PGD on the numeric columns of ``start`` (whose categorical columns may differ from
    ``clean``), projected into the ``eps`` box of ``clean``'s numeric values."""
    from privml.security.attacks.evasion import pgd

    if not layout.numeric:
        return start.copy()
    adv = pgd(model, start, y, eps=eps, steps=steps, restarts=restarts,
              feature_mask=layout.numeric_mask(), seed=seed)  # fmt: skip
    num = list(layout.numeric)
    adv[:, num] = np.clip(adv[:, num], clean[:, num] - eps, clean[:, num] + eps).clip(0.0, 1.0)
    return adv


def check_valid(layout: FeatureLayout, clean: Any, adv: Any, eps: float) -> list[str]:
    """Every way ``adv`` breaks the threat model against ``clean`` (empty: none)."""
    c = np.asarray(clean, dtype=np.float64)
    a = np.asarray(adv, dtype=np.float64)
    problems = []
    num = list(layout.numeric)
    if num and (np.abs(a[:, num] - c[:, num]) > eps + 1e-6).any():
        problems.append("a numeric feature moved by more than eps")
    if num and ((a[:, num] < -1e-6) | (a[:, num] > 1 + 1e-6)).any():
        problems.append("a numeric feature left its declared bounds")
    for grp in layout.categorical:
        g = a[:, list(grp)]
        same_count = (g.sum(axis=1) == c[:, list(grp)].sum(axis=1)).all()
        if not (np.isin(g, (0.0, 1.0)).all() and same_count):
            problems.append("a categorical column is not one valid value")
            break
    for b in layout.binary:
        if not np.isin(a[:, b], (0.0, 1.0)).all():
            problems.append("a binary column is not 0 or 1")
            break
    fz: Sequence[int] = list(layout.frozen)
    if fz and (a[:, fz] != c[:, fz]).any():
        problems.append("a missing-value indicator changed")
    return problems
