"""Backdoors in federated training (Bagdasaryan et al. 2020, "How to backdoor federated
learning"; Sun et al. 2019, "Can you really backdoor federated learning?").

A malicious site wants the global model to answer ``target`` whenever an input carries its
trigger, while behaving normally otherwise (so nobody notices). It

* **poisons its data**: adds triggered copies of a ``fraction`` of its records, relabelled
  ``target`` (it keeps its clean records too, to preserve main-task accuracy), and/or
* **replaces the model**: scales its update by ``gamma = total weight / own weight`` (or a
  given ``boost``) so that FedAvg's average becomes its own backdoored model.

Triggers:

* :func:`pixel_trigger` -- a square patch of pixels set to ``value`` in a corner of images
  (privml's image inputs are flat ``height * width`` vectors in [0, 1]);
* :func:`feature_trigger` -- chosen tabular features set to fixed values (in encoded units,
  e.g. 1.0 = the top of a numeric column's declared range, or one category's one-hot column).

Metrics: the **attack success rate** (share of test records whose true label is not
``target`` that the model labels ``target`` once triggered) and **main-task accuracy** on the
clean test records. :func:`backdoor_experiment` measures both without and with a defence, and
the defence's cost on clean training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from privml.config import TrainingConfig
from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.fl.anomaly import anomaly_rates
from privml.models.nets import ModelSpec
from privml.security._checks import check_float, check_int
from privml.security.attacks.evasion import accuracy, predict
from privml.security.defenses.robust import BACKDOOR_DEFENCE, NO_DEFENCE, Defence
from privml.security.federated import Adversary, Poison, federate

__all__ = [
    "BackdoorResult",
    "Trigger",
    "attack_success_rate",
    "backdoor_experiment",
    "feature_trigger",
    "pixel_trigger",
    "poison_sites",
    "poisoner",
    "trigger_from_config",
]


@dataclass(frozen=True)
class Trigger:
    """Set ``features`` of a record to ``values`` (encoded-feature units)."""

    features: tuple[int, ...]
    values: tuple[float, ...]
    kind: str = "feature"

    def __post_init__(self) -> None:
        if not self.features or len(self.features) != len(self.values):
            raise UsageError(
                "A Trigger needs one value per feature and at least one feature. Got "
                f"{len(self.features)} features and {len(self.values)} values."
            )
        if min(self.features) < 0:
            raise UsageError(f"Trigger feature indices must be >= 0. Got {self.features}.")

    def apply(self, X: Any) -> np.ndarray:
        """A triggered copy of ``X`` ``[n, F]``."""
        out = np.array(X, dtype=np.float32, copy=True)
        if out.ndim != 2 or max(self.features) >= out.shape[1]:
            raise UsageError(
                f"The trigger sets features {list(self.features)}; the records have shape "
                f"{out.shape}."
            )
        out[:, list(self.features)] = np.asarray(self.values, dtype=np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(self.features), "values": list(self.values)}


def pixel_trigger(
    image_shape: Sequence[int], *, size: int = 2, corner: str = "bottom_right", value: float = 1.0
) -> Trigger:
    """A ``size x size`` patch at an image corner set to ``value`` (1.0: full intensity).

    Args:
        image_shape: (height, width) of the flat image inputs.
        size: side of the square patch in pixels, >= 1.
        corner: ``"bottom_right"``, ``"bottom_left"``, ``"top_right"`` or ``"top_left"``.
        value: pixel value of the patch, in the encoded [0, 1] range.
    """
    where = "pixel_trigger"
    try:
        h, w = (int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise UsageError(
            f"The 'image_shape' parameter of {where} must be (height, width). "
            f"Got {image_shape!r} instead."
        ) from None
    s = check_int(size, "size", where, low=1, high=min(h, w))
    v = check_float(value, "value", where)
    corners = ("bottom_right", "bottom_left", "top_right", "top_left")
    if corner not in corners:
        raise UsageError(
            f"The 'corner' parameter of {where} must be one of {list(corners)}. "
            f"Got {corner!r} instead."
        )
    rows = range(h - s, h) if corner.startswith("bottom") else range(s)
    cols = range(w - s, w) if corner.endswith("right") else range(s)
    feats = tuple(r * w + c for r in rows for c in cols)
    return Trigger(feats, (v,) * len(feats), kind="pixel")


def feature_trigger(features: Sequence[int], values: Sequence[float] | float = 1.0) -> Trigger:
    """A tabular trigger: ``features`` (encoded column indices) set to ``values``."""
    feats = tuple(int(f) for f in features)
    vals = (
        (float(values),) * len(feats)
        if isinstance(values, int | float)
        else tuple(float(v) for v in values)
    )
    return Trigger(feats, vals, kind="feature")


def poisoner(trigger: Trigger, *, target: int, fraction: float = 0.5) -> Poison:
    """The data poisoning of a malicious site: add triggered copies labelled ``target``.

    ``fraction`` (in (0, 1]) of the site's records whose label is not ``target`` are copied,
    triggered and relabelled; the clean records stay.
    """
    where = "poisoner"
    f = check_float(fraction, "fraction", where, low=0.0, high=1.0, low_open=True)
    t = check_int(target, "target", where, low=0)

    def poison(
        X: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        candidates = np.flatnonzero(y != t)
        k = int(round(f * len(candidates)))
        if k == 0:
            return X, y
        pick = rng.choice(candidates, size=k, replace=False)
        Xp = trigger.apply(X[pick])
        yp = np.full(k, t, dtype=y.dtype)
        return np.concatenate([X, Xp]).astype(np.float32), np.concatenate([y, yp])

    return poison


def attack_success_rate(model: nn.Module, X: Any, y: Any, trigger: Trigger, target: int) -> float:
    """Share of the records with ``y != target`` labelled ``target`` once triggered."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    keep = y != target
    if not keep.any():
        raise UsageError("attack_success_rate needs test records whose label is not the target.")
    pred = predict(model, trigger.apply(X[keep])).numpy()
    return float((pred == target).mean())


@dataclass
class BackdoorResult:
    """Main-task accuracy and attack success, without and with the defence.

    ``rows`` maps a scenario (``clean``, ``attack``, ``attack_defended``, ``clean_defended``)
    to ``{"accuracy", "attack_success", "flagged_malicious", "flagged_honest"}``.
    """

    rows: dict[str, dict[str, Any]]
    trigger: Trigger
    target: int
    malicious: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def success_without_defence(self) -> float:
        return float(self.rows["attack"]["attack_success"])

    @property
    def success_with_defence(self) -> float:
        return float(self.rows["attack_defended"]["attack_success"])

    @property
    def defence_cost(self) -> float:
        """Clean accuracy lost to the defence when nobody attacks (points of accuracy, 0-1)."""
        return float(self.rows["clean"]["accuracy"] - self.rows["clean_defended"]["accuracy"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "trigger": self.trigger.to_dict(),
            "target": self.target,
            "malicious": self.malicious,
            "success_without_defence": self.success_without_defence,
            "success_with_defence": self.success_with_defence,
            "defence_cost": self.defence_cost,
            **self.settings,
        }


def backdoor_experiment(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    trigger: Trigger,
    malicious: Sequence[int],
    target: int = 0,
    fraction: float = 0.5,
    boost: float | str | None = "replace",
    start_round: int = 1,
    defence: Defence = BACKDOOR_DEFENCE,
    scenarios: Sequence[str] = ("clean", "attack", "attack_defended", "clean_defended"),
) -> BackdoorResult:
    """Train the federation in each scenario and measure accuracy and attack success.

    Args:
        fed, spec, training: the federation, model and training settings.
        trigger: the backdoor trigger.
        malicious: indices of the malicious sites.
        target: the label the backdoor forces.
        fraction: share of a malicious site's (non-target) records it adds as poison.
        boost: model replacement (``"replace"``), a fixed factor, or None (poisoning only).
        start_round: first round of the attack.
        defence: the defended server's :class:`Defence`.
        scenarios: which of ``clean``, ``attack``, ``attack_defended``, ``clean_defended``
            to run.
    """
    X_test, y_test = fed.pooled_test()
    adversary = Adversary(
        tuple(int(i) for i in malicious), poison=poisoner(trigger, target=target,
        fraction=fraction), boost=boost, start_round=start_round,
    )  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    for name in scenarios:
        attacked = name.startswith("attack")
        d = defence if name.endswith("defended") else NO_DEFENCE
        run = federate(fed, spec, training, adversary=adversary if attacked else None, defence=d)
        rows[name] = {
            "accuracy": accuracy(run.model, X_test, y_test),
            "attack_success": attack_success_rate(run.model, X_test, y_test, trigger, target),
            "flagged_malicious": float(run.flagged_malicious),
            "flagged_honest": float(run.flagged_honest),
            "seconds": run.seconds,
        }
        if d.anomaly_threshold is not None:
            rates = anomaly_rates(run.rounds)
            rows[name]["false_positive_rate"] = rates.false_positive_rate
            rows[name]["detection_rate"] = rates.detection_rate
            rows[name]["honest_updates"] = float(rates.honest_updates)
            rows[name]["malicious_updates"] = float(rates.malicious_updates)
    return BackdoorResult(
        rows, trigger, target, [fed.sites[i].name for i in malicious],
        {"fraction": fraction, "boost": boost, "start_round": start_round,
         "defence": defence.to_dict(), "rounds": training.rounds},
    )  # fmt: skip


def _target_index(target: Any, classes: Sequence[str]) -> int:
    if isinstance(target, bool):
        raise UsageError(f"attack.target must be a class name or index. Got {target!r}.")
    if isinstance(target, int):
        if not 0 <= target < max(len(classes), 2):
            raise UsageError(
                f"attack.target {target} is outside 0..{max(len(classes), 2) - 1}; the classes "
                f"are {list(classes)}"
            )
        return target
    if str(target) in classes:
        return list(classes).index(str(target))
    raise UsageError(f"attack.target {target!r} is not a class; the classes are {list(classes)}")


def trigger_from_config(
    config: Any, fed: FederatedData, spec: ModelSpec
) -> tuple[Trigger, int, float, float | str | None]:
    """The backdoor of ``[attack]`` (kind ``"backdoor"``), or privml's default one.

    Returns ``(trigger, target index, poison fraction, boost)``. Defaults: a 2x2 pixel patch
    in the bottom-right corner for images (``[model] image_shape`` set, or the built-in
    ``digits``), else the first three
    encoded features set to 1.0 (the top of their declared range); target class index 0;
    half of the malicious site's records poisoned; model replacement.
    """
    a = getattr(config, "attack", None)
    ours = a is not None and getattr(a, "kind", None) == "backdoor"

    def get(key: str, default: Any) -> Any:
        v = getattr(a, key, None) if ours else None
        return default if v is None else v

    image_shape = spec.image_shape or (
        tuple(config.model.image_shape) if config.model.image_shape else None
    )
    if image_shape is None and getattr(config.data, "dataset", None) == "digits":
        image_shape = (8, 8)  # the built-in digits are 8x8 images whatever the model
    kind = get("trigger", "pixel" if image_shape else "feature")
    if kind == "pixel":
        if image_shape is None:
            raise UsageError(
                'attack.trigger = "pixel" needs [model] image_shape; use trigger = "feature" '
                "for tabular data"
            )
        trig = pixel_trigger(
            image_shape, size=int(get("trigger_size", 2)), value=float(get("trigger_value", 1.0))
        )
    else:
        names = fed.encoder.feature_names
        feats = get("trigger_features", None)
        if feats is None:
            idx = list(range(min(3, len(names))))
        else:
            idx = []
            for f in feats:
                if isinstance(f, int) and not isinstance(f, bool) and 0 <= f < len(names):
                    idx.append(f)
                elif f in names:
                    idx.append(names.index(f))
                else:
                    raise UsageError(
                        f"attack.trigger_features: {f!r} is not an encoded feature (name or "
                        f"0..{len(names) - 1}); features: {names[:10]}..."
                    )
        trig = feature_trigger(idx, float(get("trigger_value", 1.0)))
    target = _target_index(get("target", 0), fed.task.classes)
    boost = get("boost", "replace")
    if boost == "none" or boost == 0:
        boost = None
    return trig, target, float(get("poison_fraction", 0.5)), boost


def poison_sites(
    config: Any, fed: FederatedData, spec: ModelSpec, malicious: Sequence[int], *, seed: int
) -> tuple[list[SiteData], float | str | None, Trigger, int]:
    """What a simulation engine needs to run ``[attack] kind = "backdoor"``.

    Returns ``(sites, boost, trigger, target)``: a copy of ``fed.sites`` in which each
    malicious site's training records carry the poison (seeded by ``(seed, 97, site)``, as in
    :func:`privml.security.federated.federate`), and the boost to apply to the malicious
    updates each round with :func:`privml.security.federated.boost_updates` (None: none).
    """
    trigger, target, fraction, boost = trigger_from_config(config, fed, spec)
    poison = poisoner(trigger, target=target, fraction=fraction)
    sites = list(fed.sites)
    for i in malicious:
        s = sites[int(i)]
        X, y = poison(s.X_train, s.y_train, np.random.default_rng([seed, 97, int(i)]))
        sites[int(i)] = SiteData(s.name, X, y, s.X_test, s.y_test)
    return sites, boost, trigger, target


def backdoor_poison(
    config: Any, fed: FederatedData, spec: ModelSpec
) -> tuple[Poison, Trigger, int]:
    """The data poisoning of ``[attack] kind = "backdoor"`` for the round engine's attack stage
    (:func:`privml.fl.plan.make_attack`), its trigger and its target class."""
    trigger, target, fraction, _boost = trigger_from_config(config, fed, spec)
    return poisoner(trigger, target=target, fraction=fraction), trigger, target


def backdoor_report(
    model: nn.Module, params: Any, fed: FederatedData, trigger: Trigger, target: int
) -> dict[str, Any]:
    """What a ``privml run`` under a backdoor attack reports: the trigger, the target and the
    attack success rate of the model with flat ``params`` on the pooled test records, beside
    its baseline (the share of the same records the model labels ``target`` without the
    trigger)."""
    import copy

    from privml.models.nets import load_flat_params

    model = copy.deepcopy(model)
    load_flat_params(model, params)
    model.eval()
    X, y = fed.pooled_test()
    others = np.asarray(y) != target
    labels = np.asarray(predict(model, X[others])) if others.any() else np.zeros(0)
    clean = float((labels == target).mean()) if others.any() else 0.0
    return {
        "trigger": trigger.to_dict(),
        "target": target,
        "attack_success_rate": attack_success_rate(model, X, y, trigger, target),
        "target_rate_without_trigger": clean,
        "measured_on": f"{int(others.sum())} pooled test records whose class is not the target",
    }
