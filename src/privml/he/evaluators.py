"""Compile a trained privml model into an encrypted evaluator.

Supported: logistic regression (``kind="logistic"``: one linear layer, any number of outputs) on
CKKS and Paillier, and a one-hidden-layer MLP with a polynomial activation (``"square"`` or
``"poly2"``) on CKKS.

CKKS layouts (how the client lays its values out in the slots):

* ``replicated`` (one patient): feature ``i`` goes to slots ``Hp*i + j`` for ``j < Hp``, the
  block of ``Ip*Hp`` slots repeated over all slots. The answer is one ciphertext per output
  whose **constant coefficient** carries the score: it equals the real part of the mean of all
  slots, so the server's sum over the features (and, for the MLP, over the hidden units) comes
  from the polynomial structure instead of rotations. Every other coefficient of the answer is
  a one-time pad (:mod:`privml.he.protect`): a crafted ciphertext gets back one number per
  output, not one per slot or block.
* ``columns`` (many patients): one ciphertext per feature, patients in the slots (for the linear
  model, two patients per slot: real and imaginary parts). No rotations, no Galois keys; the
  weights are plaintext scalars. Every slot is a patient, and the request is counted as the
  capacity of its ciphertexts (:func:`charged_patients`).

MLP: with the activation ``f(h) = a*h**2 + b*h + c``, output ``k`` is
``sum_j W2[k,j] f(h_j) + b2[k] = sum_j s_kj u_kj**2 + const_k`` where
``u_kj = sqrt(|a W2[k,j]|) (h_j + b/(2a))`` is linear in the input and ``s_kj`` is the sign of
``a W2[k,j]``. The server folds ``sqrt(|a W2|)`` and the shift into the first layer and puts
``u_kj`` in a real slot when ``s_kj > 0`` and ``i * u_kj`` (imaginary) when ``s_kj < 0``: squaring
then gives ``s_kj u_kj**2`` directly. The whole network costs one plaintext multiplication,
``log2(Ip)`` rotations and one squaring (multiplicative depth 2), which keeps the ring at
N = 8192.
"""

from __future__ import annotations

import functools
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from phe import paillier as phe
from tenseal import sealapi as seal
from torch import nn

from privml.errors import CryptoError, PrivmlError, UsageError
from privml.he import protect
from privml.he.ckks import (
    CKKSCiphertexts,
    CKKSProfile,
    CKKSPublicContext,
    _Runtime,
)
from privml.he.packing import SlotCodec
from privml.he.paillier import (
    PaillierCiphertexts,
    PaillierPublicKey,
    PaillierRandomnessPool,
    linear_combination,
    rerandomize,
)
from privml.he.protect import (
    DEFAULT_RESOLUTION,
    STATISTICAL_SECURITY_BITS,
    CKKSAnswerPool,
    MaskSpec,
)
from privml.he.requirements import EvaluatorRequirements
from privml.models.nets import POLYNOMIAL_ACTIVATIONS, ModelSpec, Poly2, Square

#: f(h) = a h^2 + b h + c for each polynomial activation of privml.models.nets.
ACTIVATION_POLY: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 0.0, 0.0),
    "poly2": (0.125, 0.5, 0.25),
}
_ACT_CLASSES: dict[str, type[nn.Module]] = {"square": Square, "poly2": Poly2}

#: Default upper limit on a CKKS public context (the issue's budget: 10 MB).
DEFAULT_MAX_CONTEXT_BYTES = 10_000_000
_N_LINEAR = 4096
_N_MLP = 8192
_HOW_TO_TRAIN = (
    'train an HE-compatible model: set `[model] activation = "square"` (or "poly2") with one '
    "hidden layer, e.g. `hidden = [16]`"
)


class EvaluationTimeout(PrivmlError, TimeoutError):
    """An evaluation ran past the deadline it was given (the service's per-request limit)."""

    exit_code = 1


def _seal_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an exception raised inside SEAL during evaluation into a :class:`CryptoError`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PrivmlError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise CryptoError(f"homomorphic evaluation failed: {exc}") from None

    return wrapper


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bits(x: float) -> int:
    """Smallest k >= 0 with |x| < 2**k."""
    x = abs(float(x))
    return 0 if x < 1.0 else math.floor(math.log2(x)) + 1


# --------------------------------------------------------------------------------------------
# Model extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    W: np.ndarray  # (K, d)
    b: np.ndarray  # (K,)


@dataclass(frozen=True)
class _MLP:
    W1: np.ndarray  # (H, d)
    b1: np.ndarray
    W2: np.ndarray  # (K, H)
    b2: np.ndarray
    activation: str


def _as_array(p: Any, name: str) -> np.ndarray:
    arr = p.detach().cpu().double().numpy().copy()
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"the model's {name} contains NaN or infinite values; retrain it")
    return arr


def extract_model(model: nn.Module, spec: ModelSpec) -> _Linear | _MLP:
    """Read the weights of a privml model after checking it matches ``spec`` and is HE-friendly."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}."
        )
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"The 'spec' parameter must be a ModelSpec. Got {type(spec).__name__}.")
    layers = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    if spec.kind == "cnn":
        raise UsageError(
            "CNN models are not supported for encrypted inference; use `[model] kind = "
            '"logistic"` or an MLP with a polynomial activation'
        )
    if spec.kind == "logistic":
        if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
            raise UsageError(
                "a 'logistic' model must be Sequential(Linear); rebuild it with build_model"
            )
        lin = layers[0]
        _check_dims(lin, spec.n_features, spec.n_outputs, "the linear layer")
        return _Linear(W=_as_array(lin.weight, "weights"), b=_bias(lin, spec.n_outputs))
    if spec.kind != "mlp":
        raise UsageError(f"unknown model kind {spec.kind!r}")
    if spec.activation not in POLYNOMIAL_ACTIVATIONS:
        raise UsageError(
            f"an MLP with activation {spec.activation!r} cannot be evaluated under homomorphic "
            f"encryption (it is not a polynomial): {_HOW_TO_TRAIN}"
        )
    if len(spec.hidden) != 1 or len(layers) != 3:
        raise UsageError(
            f"encrypted inference supports MLPs with exactly one hidden layer; got hidden="
            f"{list(spec.hidden)}. Train with e.g. `[model] hidden = [16]`"
        )
    first, act, second = layers
    if not isinstance(first, nn.Linear) or not isinstance(second, nn.Linear):
        raise UsageError("an 'mlp' model must be Sequential(Linear, activation, Linear)")
    if not isinstance(act, _ACT_CLASSES[spec.activation]):
        raise UsageError(
            f"the model's activation module is {type(act).__name__}, not the "
            f"{spec.activation!r} its spec declares: {_HOW_TO_TRAIN}"
        )
    _check_dims(first, spec.n_features, spec.hidden[0], "the hidden layer")
    _check_dims(second, spec.hidden[0], spec.n_outputs, "the output layer")
    return _MLP(
        W1=_as_array(first.weight, "hidden weights"),
        b1=_bias(first, spec.hidden[0]),
        W2=_as_array(second.weight, "output weights"),
        b2=_bias(second, spec.n_outputs),
        activation=spec.activation,
    )


def _check_dims(lin: nn.Linear, n_in: int, n_out: int, what: str) -> None:
    if lin.in_features != n_in or lin.out_features != n_out:
        raise UsageError(
            f"{what} maps {lin.in_features} -> {lin.out_features} values but the spec says "
            f"{n_in} -> {n_out}"
        )


def _bias(lin: nn.Linear, n_out: int) -> np.ndarray:
    if lin.bias is None:
        return np.zeros(n_out)
    return _as_array(lin.bias, "bias")


# --------------------------------------------------------------------------------------------
# Rotation planning
# --------------------------------------------------------------------------------------------


def decompose_step(step: int, keys: Sequence[int]) -> list[int]:
    """Write a rotation ``step`` as a sum of available key steps (greedy, largest first)."""
    out = []
    rest = step
    avail = sorted(keys, reverse=True)
    while rest:
        k = next((k for k in avail if k <= rest), None)
        if k is None:
            raise CryptoError(f"no Galois keys to compose a rotation by {step} from {sorted(keys)}")
        out.append(k)
        rest -= k
    return out


def choose_galois_keys(
    families: Sequence[tuple[Sequence[int], float]],
    size_of: Callable[[Sequence[int]], int],
    budget: int,
) -> list[int]:
    """Pick Galois keys for the needed rotation ``families`` so the context fits in ``budget``.

    Each family is ``(steps, weight)`` (weight: cost of one rotation at the level it runs at).
    Start from one key per needed step; while the estimated context is too large, drop the key
    whose removal adds the least weighted rotation cost (it is then composed from smaller
    keys). The smallest step of each family is always kept.
    """
    keys = sorted({s for steps, _ in families for s in steps})
    protected = {min(steps) for steps, _ in families if steps}

    def cost(ks: Sequence[int]) -> float:
        return sum(w * len(decompose_step(s, ks)) for steps, w in families for s in steps)

    while size_of(keys) > budget:
        cands = [k for k in keys if k not in protected]
        if not cands:
            raise CryptoError(
                f"the public context would need about {size_of(keys) / 1e6:.1f} MB even with the "
                f"fewest Galois keys, above max_context_bytes={budget}; raise the limit or use a "
                "smaller model"
            )
        drop = min(cands, key=lambda k: (cost([x for x in keys if x != k]), -k))
        keys = [x for x in keys if x != drop]
    return keys


# --------------------------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------------------------


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise EvaluationTimeout(
            "the evaluation exceeded its time limit; send fewer patients per request"
        )


class _CKKSBase(ABC):
    requirements: EvaluatorRequirements
    resolution: float
    _cache: dict[Any, dict[str, Any]]

    scheme = "ckks"

    def _check_features(self, features: object) -> CKKSCiphertexts:
        if not isinstance(features, CKKSCiphertexts) or features.role != "features":
            raise UsageError(
                "The 'features' parameter must be CKKS-encrypted features from "
                "privml.he.encrypt_features or load_features."
            )
        holder = features.holder
        if holder is None:
            raise UsageError("these encrypted features are not linked to a public context")
        if holder.requirements != self.requirements.normalized:
            raise CryptoError(
                "these features were encrypted under keys made for another evaluator (different "
                "model shape or parameters); generate keys from this evaluator's requirements"
            )
        layout = self.requirements.data["layouts"].get(features.packing)
        if layout is None or features.profile != layout["profile"]:
            raise CryptoError(f"unsupported packing {features.packing!r} for this evaluator")
        if features.packing == "columns" and features.complex_packed != bool(layout["complex"]):
            raise CryptoError("column-packed features use the wrong (real/complex) slot packing")
        if features.n_cols != self.requirements.n_features:
            raise CryptoError(
                f"features have {features.n_cols} columns; the model takes "
                f"{self.requirements.n_features}"
            )
        rt = holder.runtime(layout["profile"])
        expected = 2.0 ** int(layout["scale_bits"])
        for ct in features.cts:
            if rt.level_of(ct) != 0 or abs(float(ct.scale) / expected - 1.0) > 1e-9:
                raise CryptoError(
                    "encrypted features are not at the top level with the declared scale "
                    f"2**{layout['scale_bits']}; encrypt them with privml.he.encrypt_features"
                )
        return features

    def _plains(self, rt: _Runtime) -> dict[Any, Any]:
        key = (rt.profile.name, rt.level_keys[0])
        if key not in self._cache:
            self._cache[key] = {}
        return self._cache[key]

    @staticmethod
    def _rotate_sum(rt: _Runtime, ct: Any, steps: Sequence[int]) -> None:
        keys = rt.profile.galois_steps
        ev = rt.evaluator
        if steps and rt.galois is None:
            raise CryptoError(
                "the public context has no Galois keys; it was not made for this evaluator"
            )
        for step in steps:
            src = ct
            for k in decompose_step(step, keys):
                dst = seal.Ciphertext()
                ev.rotate_vector(src, k, rt.galois, dst)
                src = dst
            ev.add_inplace(ct, src)

    def _scores(
        self, features: CKKSCiphertexts, cts: list[Any], complex_packed: bool
    ) -> CKKSCiphertexts:
        return CKKSCiphertexts(
            role="scores",
            key_id=features.key_id,
            profile=features.profile,
            packing=features.packing,
            n_rows=features.n_rows,
            n_cols=self.requirements.n_outputs,
            complex_packed=complex_packed,
            cts=cts,
            holder=features.holder,
        )

    # -- answer protection -------------------------------------------------------------------

    def _layout_rt(self, public: Any, packing: str) -> tuple[dict[str, Any], _Runtime]:
        lay = self.requirements.data["layouts"][packing]
        return lay, public.runtime(lay["profile"])

    @abstractmethod
    def answer_specs(self, public: CKKSPublicContext) -> dict[str, dict[MaskSpec, int]]:
        """Per packing, the precomputed elements one ciphertext of input needs (a pool's
        recipe): ``{"replicated": {spec: count per patient}, "columns": {spec: count per
        chunk}}``."""

    def make_pool(self, public: CKKSPublicContext, *, patients: int = 8,
                  chunks: int = 1, fill: bool = True) -> CKKSAnswerPool:
        """A pool of answer masks for ``public``, sized for ``patients`` single-patient queries
        and ``chunks`` column chunks (precomputed now unless ``fill=False``)."""
        sizes: dict[MaskSpec, int] = {}
        specs = self.answer_specs(public)
        for spec, n in specs.get("replicated", {}).items():
            sizes[spec] = sizes.get(spec, 0) + n * patients
        for spec, n in specs.get("columns", {}).items():
            sizes[spec] = sizes.get(spec, 0) + n * chunks
        return CKKSAnswerPool(public, sizes, fill=fill)

    def predict_bytes(
        self,
        data: bytes,
        public: CKKSPublicContext,
        *,
        pool: CKKSAnswerPool | None = None,
        max_bytes: int | None = None,
        deadline: float | None = None,
    ) -> bytes:
        """Load features from bytes (validated against ``public``), evaluate, serialize scores."""
        feats = CKKSCiphertexts.from_bytes(data, public, role="features", max_bytes=max_bytes)
        return self.predict(feats, pool=pool, deadline=deadline).to_bytes()

    @abstractmethod
    def predict(
        self,
        features: CKKSCiphertexts,
        *,
        pool: CKKSAnswerPool | None = None,
        deadline: float | None = None,
    ) -> CKKSCiphertexts:
        """Evaluate the model on encrypted features (each subclass's circuit)."""


def _score_sigma(resolution: float, scale: float, factor: float) -> float:
    """Flooding of the constant coefficient: the client multiplies it by ``factor / scale``."""
    return resolution * scale / factor


def _flood_sigma(resolution: float, scale: float, n: int) -> float:
    """Flooding of every coefficient so that each real slot value gets ``resolution``."""
    return resolution * scale / math.sqrt(n / 2)


@dataclass
class CKKSLinearEvaluator(_CKKSBase):
    """Logistic regression (any number of outputs) on CKKS. Returns encrypted logits.

    One patient (``replicated``): one plaintext product per output, the bias as a constant, and
    the answer protection of :mod:`privml.he.protect`; the score is the constant coefficient (the
    mean of the slots), so no rotation and no Galois key is needed. Batches (``columns``): one
    plaintext-scalar product per feature, every slot a patient, re-randomized and flooded.
    """

    W: np.ndarray
    b: np.ndarray
    requirements: EvaluatorRequirements
    resolution: float = DEFAULT_RESOLUTION
    _cache: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    def _scale_after(self, rt: _Runtime, lay: dict[str, Any]) -> tuple[int, float]:
        """(level, scale) of the product: one prime dropped by a rescale when the layout has
        one (the weights are then encoded at that prime's size)."""
        sx = 2.0 ** int(lay["scale_bits"])
        if lay.get("rescale"):
            return 1, sx * float(rt.primes[-1]) / float(rt.primes[-1])
        return 0, sx * 2.0 ** int(lay["w_scale_bits"])

    def answer_specs(self, public: CKKSPublicContext) -> dict[str, dict[MaskSpec, int]]:
        K = self.requirements.n_outputs
        out: dict[str, dict[MaskSpec, int]] = {}
        lay, rt = self._layout_rt(public, "replicated")
        level, scale = self._scale_after(rt, lay)
        sig = _score_sigma(self.resolution, scale, float(lay["score_factor"]))
        out["replicated"] = {MaskSpec("score", lay["profile"], level, sig): K}
        lay, rt = self._layout_rt(public, "columns")
        level, scale = self._scale_after(rt, lay)
        out["columns"] = {MaskSpec("flood", lay["profile"], level,
                                   _flood_sigma(self.resolution, scale, rt.n)): K}
        return out

    @_seal_errors
    def predict(
        self,
        features: CKKSCiphertexts,
        *,
        pool: CKKSAnswerPool | None = None,
        deadline: float | None = None,
    ) -> CKKSCiphertexts:
        """Evaluate the model on encrypted features; the result is encrypted under the same key.

        ``pool``: precomputed answer masks for this key (:meth:`make_pool`); without one they are
        computed on the spot (about a millisecond each)."""
        feats = self._check_features(features)
        if pool is not None:
            pool.check_key(feats.holder)
        if feats.packing == "replicated":
            return self._scores(feats, self._replicated(feats, pool, deadline), False)
        return self._scores(feats, self._columns(feats, pool, deadline), True)

    def _replicated(self, feats: CKKSCiphertexts, pool: CKKSAnswerPool | None,
                    deadline: float | None) -> list[Any]:
        lay, rt = self._layout_rt(feats.holder, "replicated")
        K, d = self.W.shape
        Ip, factor = int(lay["Ip"]), float(lay["score_factor"])
        rescale = bool(lay.get("rescale"))
        cache = self._plains(rt)
        level, scale = self._scale_after(rt, lay)
        spec = MaskSpec("score", lay["profile"], level, _score_sigma(self.resolution, scale,
                                                                     factor))
        if "w" not in cache:
            w_scale = float(rt.primes[-1]) if rescale else 2.0 ** int(lay["w_scale_bits"])
            cache["w"] = []
            for k in range(K):
                block = np.zeros(Ip)
                block[:d] = self.W[k]
                cache["w"].append(rt.encode(np.tile(block, rt.slots // Ip), 0, w_scale))
            # the bias enters the mean of the slots: b / factor in every slot (a constant)
            cache["b"] = [rt.encode_scalar(self.b[k] / factor, level, scale) for k in range(K)]
        ev = rt.evaluator
        out = []
        for ct in feats.cts:
            _check_deadline(deadline)
            for k in range(K):
                r = seal.Ciphertext()
                ev.multiply_plain(ct, cache["w"][k], r)
                if rescale:
                    ev.rescale_to_next_inplace(r)
                ev.add_plain_inplace(r, _at_scale(rt, cache["b"][k], r))
                protect.apply(rt, r, spec, pool)
                out.append(r)
        return out

    def _columns(self, feats: CKKSCiphertexts, pool: CKKSAnswerPool | None,
                 deadline: float | None) -> list[Any]:
        lay, rt = self._layout_rt(feats.holder, "columns")
        K, d = self.W.shape
        rescale = bool(lay.get("rescale"))
        cache = self._plains(rt)
        level, scale = self._scale_after(rt, lay)
        spec = MaskSpec("flood", lay["profile"], level,
                        _flood_sigma(self.resolution, scale, rt.n))
        if "wc" not in cache:
            w_scale = float(rt.primes[-1]) if rescale else 2.0 ** int(lay["w_scale_bits"])
            cache["wc"] = [
                [rt.encode_scalar(self.W[k, i], 0, w_scale) for i in range(d)] for k in range(K)
            ]
            cache["bc"] = []
            for k in range(K):
                pt = seal.Plaintext()
                # complex packing: the bias goes to both the real and the imaginary half
                rt.encoder.encode(complex(self.b[k], self.b[k]), rt.levels[level], scale, pt)
                cache["bc"].append(pt)
        cap = 2 * rt.slots
        n_chunks = math.ceil(feats.n_rows / cap)
        ev = rt.evaluator
        out: list[Any] = []
        for k in range(K):
            for c in range(n_chunks):
                _check_deadline(deadline)
                acc = None
                for i in range(d):
                    t = seal.Ciphertext()
                    ev.multiply_plain(feats.cts[i * n_chunks + c], cache["wc"][k][i], t)
                    if acc is None:
                        acc = t
                    else:
                        ev.add_inplace(acc, t)
                if rescale:
                    ev.rescale_to_next_inplace(acc)
                ev.add_plain_inplace(acc, _at_scale(rt, cache["bc"][k], acc))
                protect.apply(rt, acc, spec, pool)
                out.append(acc)
        return out


def _at_scale(rt: _Runtime, pt: Any, ct: Any) -> Any:
    """``pt`` with its scale metadata set to ``ct``'s (equal up to floating-point rounding)."""
    if abs(float(pt.scale) / float(ct.scale) - 1.0) > 1e-9:
        raise CryptoError("internal error: plaintext and ciphertext scales differ")
    pt.scale = float(ct.scale)
    return pt


@dataclass
class CKKSMLPEvaluator(_CKKSBase):
    """One-hidden-layer MLP with a polynomial activation on CKKS. Returns encrypted logits.

    One patient: per output, one plaintext product (the first layer, folded with the output
    weights), a re-randomization, ``log2(Ip)`` rotations, the squaring and the answer
    protection; the output is the constant coefficient (the mean over the slots sums the
    hidden units). Batches: slot-wise, every slot a patient.
    """

    model: _MLP
    requirements: EvaluatorRequirements
    resolution: float = DEFAULT_RESOLUTION
    noise_bound: float = 0.0
    _cache: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m = self.model
        a, b, c = ACTIVATION_POLY[m.activation]
        self._shift = b / (2 * a)
        self._amp = np.sqrt(np.abs(a * m.W2))  # (K, H)
        self._neg = (a * m.W2) < 0  # (K, H)
        self._const = m.b2 + m.W2.sum(axis=1) * (c - b * b / (4 * a))  # (K,)

    @property
    def flood_resolution(self) -> float:
        """Standard deviation of the flooding on an output: the declared resolution, or more
        where the weight-dependent noise of the squaring needs it (``2**(lambda/4)`` times it,
        see :mod:`privml.he.protect`)."""
        return max(self.resolution, self.noise_bound * 2.0 ** (STATISTICAL_SECURITY_BITS / 4))

    def _scales(self, rt: _Runtime, lay: dict[str, Any]) -> tuple[float, float]:
        delta = 2.0 ** int(lay["scale_bits"])
        s1 = delta * float(rt.primes[-1]) / float(rt.primes[-1])
        return s1, s1 * s1 / float(rt.primes[-2])

    def answer_specs(self, public: CKKSPublicContext) -> dict[str, dict[MaskSpec, int]]:
        K, H = self._amp.shape
        res = self.flood_resolution
        lay, rt = self._layout_rt(public, "replicated")
        _, s2 = self._scales(rt, lay)
        name = lay["profile"]
        out = {"replicated": {
            MaskSpec("rerand", name, 1): K,
            MaskSpec("score", name, 2, _score_sigma(res, s2, float(lay["score_factor"]))): K,
        }}
        lay, rt = self._layout_rt(public, "columns")
        _, s2 = self._scales(rt, lay)
        out["columns"] = {
            MaskSpec("rerand", lay["profile"], 1): K * H,
            MaskSpec("flood", lay["profile"], 2, _flood_sigma(res, s2, rt.n)): K,
        }
        return out

    @_seal_errors
    def predict(
        self,
        features: CKKSCiphertexts,
        *,
        pool: CKKSAnswerPool | None = None,
        deadline: float | None = None,
    ) -> CKKSCiphertexts:
        """Evaluate the MLP on encrypted features; the result is encrypted under the same key."""
        feats = self._check_features(features)
        if pool is not None:
            pool.check_key(feats.holder)
        if feats.packing == "replicated":
            return self._scores(feats, self._replicated(feats, pool, deadline), False)
        return self._scores(feats, self._columns(feats, pool, deadline), False)

    def _replicated(self, feats: CKKSCiphertexts, pool: CKKSAnswerPool | None,
                    deadline: float | None) -> list[Any]:
        lay, rt = self._layout_rt(feats.holder, "replicated")
        m = self.model
        H, d = m.W1.shape
        K = m.W2.shape[0]
        Ip, Hp = int(lay["Ip"]), int(lay["Hp"])
        factor = float(lay["score_factor"])
        cache = self._plains(rt)
        s1, s2 = self._scales(rt, lay)
        rerand = MaskSpec("rerand", lay["profile"], 1)
        score = MaskSpec("score", lay["profile"], 2,
                         _score_sigma(self.flood_resolution, s2, factor))
        phase = np.where(self._neg, 1j, 1.0)  # (K, H)
        if "w" not in cache:
            cache["w"], cache["b1"], cache["c"] = [], [], []
            for k in range(K):
                block = np.zeros((Ip, Hp), dtype=np.complex128)
                # slot Hp*i + j holds phase_kj * amp_kj * W1[j, i]
                block[:d, :H] = m.W1.T * (self._amp[k] * phase[k])[None, :]
                cache["w"].append(
                    rt.encode(np.tile(block.ravel(), rt.slots // (Ip * Hp)), 0,
                              float(rt.primes[-1]))
                )
                bias = np.zeros(Hp, dtype=np.complex128)
                bias[:H] = (m.b1 + self._shift) * self._amp[k] * phase[k]
                cache["b1"].append(rt.encode(np.tile(bias, rt.slots // Hp), 1, s1))
                cache["c"].append(rt.encode_scalar(self._const[k] / factor, 2, s2))
        ev = rt.evaluator
        steps = [Hp << s for s in range(int(math.log2(Ip)))]
        out = []
        for ct in feats.cts:
            for k in range(K):
                _check_deadline(deadline)
                r = seal.Ciphertext()
                ev.multiply_plain(ct, cache["w"][k], r)
                ev.rescale_to_next_inplace(r)
                # pseudo-random c1 before key switching: its noise cannot depend on the weights
                protect.apply(rt, r, rerand, pool)
                self._rotate_sum(rt, r, steps)
                ev.add_plain_inplace(r, _at_scale(rt, cache["b1"][k], r))
                ev.square_inplace(r)
                ev.relinearize_inplace(r, rt.relin)
                ev.rescale_to_next_inplace(r)
                ev.add_plain_inplace(r, _at_scale(rt, cache["c"][k], r))
                protect.apply(rt, r, score, pool)
                out.append(r)
        return out

    def _columns(self, feats: CKKSCiphertexts, pool: CKKSAnswerPool | None,
                 deadline: float | None) -> list[Any]:
        lay, rt = self._layout_rt(feats.holder, "columns")
        m = self.model
        H, d = m.W1.shape
        K = m.W2.shape[0]
        cache = self._plains(rt)
        s1, s2 = self._scales(rt, lay)
        rerand = MaskSpec("rerand", lay["profile"], 1)
        flood = MaskSpec("flood", lay["profile"], 2,
                         _flood_sigma(self.flood_resolution, s2, rt.n))
        top_scale = float(rt.primes[-1])
        if "wc" not in cache:
            cache["wc"] = [
                [
                    [rt.encode_scalar(self._amp[k, j] * m.W1[j, i], 0, top_scale) for i in range(d)]
                    for j in range(H)
                ]
                for k in range(K)
            ]
            cache["bc"] = [
                [rt.encode_scalar(self._amp[k, j] * (m.b1[j] + self._shift), 1, s1)
                 for j in range(H)]
                for k in range(K)
            ]
            cache["cc"] = [rt.encode_scalar(self._const[k], 2, s2) for k in range(K)]
        ev = rt.evaluator
        n_chunks = math.ceil(feats.n_rows / rt.slots)
        out: list[Any] = []
        for k in range(K):
            for c in range(n_chunks):
                total: Any = None
                for j in range(H):
                    _check_deadline(deadline)
                    u: Any = None
                    for i in range(d):
                        t = seal.Ciphertext()
                        ev.multiply_plain(feats.cts[i * n_chunks + c], cache["wc"][k][j][i], t)
                        if u is None:
                            u = t
                        else:
                            ev.add_inplace(u, t)
                    ev.rescale_to_next_inplace(u)
                    ev.add_plain_inplace(u, _at_scale(rt, cache["bc"][k][j], u))
                    protect.apply(rt, u, rerand, pool)
                    ev.square_inplace(u)
                    ev.relinearize_inplace(u, rt.relin)
                    ev.rescale_to_next_inplace(u)
                    if total is None:
                        total = u
                        if self._neg[k, j]:
                            ev.negate_inplace(total)
                    elif self._neg[k, j]:
                        ev.sub_inplace(total, u)
                    else:
                        ev.add_inplace(total, u)
                ev.add_plain_inplace(total, _at_scale(rt, cache["cc"][k], total))
                protect.apply(rt, total, flood, pool)
                out.append(total)
        return out


@dataclass
class PaillierLinearEvaluator:
    """Logistic regression on Paillier: fixed-point weights times encrypted fixed-point inputs.

    Before an answer leaves the server, its plaintext gets, per patient slot, uniform flooding
    noise in ``[-F, F]`` (the declared resolution), an offset, and a one-time pad above the
    ``per_ct * slot_bits`` bits the answer may occupy (``rho * 2**M`` with ``rho`` uniform);
    then it is re-randomized (multiplied by a fresh encryption of zero). A crafted input (for
    example ``2**(64 (i+1))`` for feature ``i``, beyond the input bounds, invisible to the
    server) therefore decodes to at most ``M`` low bits of the result, with flooding: no more
    than the patients the ciphertext is counted as. Without the re-randomization a client that
    knows its own randomness could recover the weights from the result's (docs/threat-model.md).
    """

    Wq: list[list[int]]
    bq: list[int]
    requirements: EvaluatorRequirements
    flood: int = 1

    scheme = "paillier"

    @property
    def resolution(self) -> float:
        """Half-width of the uniform flooding on every score, logit units."""
        d = self.requirements.data
        return self.flood / 2.0 ** (int(d["x_frac_bits"]) + int(d["w_frac_bits"]))

    def make_pool(self, public: PaillierPublicKey, *, patients: int = 8,
                  fill: bool = True) -> PaillierRandomnessPool:
        """Encryptions of zero for ``patients`` single-patient answers (one per output)."""
        size = patients * len(self.Wq) if fill else 0
        return PaillierRandomnessPool(public, size=size)

    def predict(
        self,
        features: PaillierCiphertexts,
        *,
        pool: PaillierRandomnessPool | None = None,
        deadline: float | None = None,
    ) -> PaillierCiphertexts:
        """Evaluate on encrypted features. ``pool``: precomputed encryptions of zero under the
        client's key for the final re-randomization (else computed on the spot)."""
        if not isinstance(features, PaillierCiphertexts) or features.role != "features":
            raise UsageError(
                "The 'features' parameter must be Paillier-encrypted features from "
                "privml.he.encrypt_features or load_features."
            )
        public = features.holder
        if not isinstance(public, PaillierPublicKey):
            raise UsageError("these encrypted features are not linked to a Paillier public key")
        req = self.requirements.data
        if features.n_cols != req["n_features"] or features.slot_bits != req["slot_bits"]:
            raise CryptoError(
                "these features were encoded for another evaluator (feature count or slot width "
                "differ); encrypt them with this evaluator's requirements"
            )
        pk = public.key
        per_ct, slot_bits = features.per_ct, features.slot_bits
        n_chunks = math.ceil(features.n_rows / per_ct)
        codec = SlotCodec(slot_bits=slot_bits, slots=per_ct, digit_bound=1)
        width = per_ct * slot_bits  # bits the answer may occupy (checked <= key_bits - 2)
        pad_range = max(1, (pk.n >> width) - 1)
        out: list[int] = []
        for k, row in enumerate(self.Wq):
            for c in range(n_chunks):
                _check_deadline(deadline)
                rows = min(per_ct, features.n_rows - c * per_ct)
                (bias,) = codec.pack([self.bq[k]] * rows)
                acc = phe.EncryptedNumber(pk, pk.raw_encrypt(bias % pk.n, r_value=1))
                terms = [features.cts[i * n_chunks + c] for i in range(len(row))]
                acc = acc + phe.EncryptedNumber(pk, linear_combination(public, terms, row))
                (noise,) = codec.pack(
                    [secrets.randbelow(2 * self.flood + 1) - self.flood for _ in range(per_ct)]
                )
                blind = noise + (1 << (width - 1)) + (secrets.randbelow(pad_range) << width)
                acc = acc + phe.EncryptedNumber(pk, pk.raw_encrypt(blind % pk.n, r_value=1))
                out.append(rerandomize(public, acc.ciphertext(be_secure=False), pool))
        return PaillierCiphertexts(
            role="scores",
            key_id=features.key_id,
            packing="columns",
            n_rows=features.n_rows,
            n_cols=len(self.Wq),
            slot_bits=slot_bits,
            per_ct=per_ct,
            cts=out,
            holder=public,
        )

    def predict_bytes(
        self,
        data: bytes,
        public: PaillierPublicKey,
        *,
        pool: PaillierRandomnessPool | None = None,
        max_bytes: int | None = None,
        deadline: float | None = None,
    ) -> bytes:
        feats = PaillierCiphertexts.from_bytes(data, public, role="features", max_bytes=max_bytes)
        out = self.predict(feats, pool=pool, deadline=deadline)
        return out.to_bytes(public.ciphertext_bytes)


Evaluator = CKKSLinearEvaluator | CKKSMLPEvaluator | PaillierLinearEvaluator


def charged_patients(
    scheme: str, header: dict[str, Any], requirements: dict[str, Any], key_bits: int = 0
) -> int:
    """Patients a prediction request is counted as: what its ciphertexts can carry.

    CKKS one-patient layout: one per ciphertext (an answer carries one number per output).
    CKKS columns: every slot of every chunk (4,096 per chunk for the linear model), however
    many rows the header declares. Paillier: ``per_ct`` per ciphertext chunk. ``header`` is the
    envelope header of the encrypted features (sizes checked by the caller's parser).
    """
    n = int(header["n_rows"])
    if scheme == "paillier":
        per_ct = max(1, int(header.get("per_ct", 1)))
        return math.ceil(n / per_ct) * per_ct
    packing = header.get("packing")
    if packing == "replicated":
        return n
    lay = requirements["layouts"]["columns"]
    prof = next(p for p in requirements["profiles"] if p["name"] == lay["profile"])
    cap = prof["poly_modulus_degree"] // 2 * (2 if lay["complex"] else 1)
    return math.ceil(n / cap) * cap


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


def compile_model(
    model: nn.Module,
    spec: ModelSpec,
    *,
    scheme: str = "ckks",
    x_bound: float = 1.0,
    public_key: bool = True,
    max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
    scale_bits: int | None = None,
    x_frac_bits: int = 20,
    w_frac_bits: int = 20,
    resolution: float = DEFAULT_RESOLUTION,
) -> Evaluator:
    """Compile a trained privml model into an encrypted evaluator.

    Args:
        model: the ``torch.nn.Sequential`` built by ``privml.models.nets.build_model(spec)``.
        spec: its ``ModelSpec``. ``kind="logistic"`` works on both schemes; ``kind="mlp"`` with
            one hidden layer and ``activation="square"`` or ``"poly2"`` on CKKS only.
        scheme: ``"ckks"`` (TenSEAL/SEAL) or ``"paillier"`` (phe).
        x_bound: declared bound on input magnitudes, ``|x_i| <= x_bound`` (privml's encoder puts
            every feature in [0, 1], so 1.0). The parameters are sized for the worst case over
            this box, so no valid input can overflow; the client's encryption checks it.
        public_key: kept for compatibility; CKKS contexts always carry the public key, which the
            server needs to re-randomize its answers.
        max_context_bytes: upper bound on the CKKS public context (Galois keys are dropped and
            rotations composed from the remaining ones until it fits).
        scale_bits: CKKS input scale (log2); default 30 (linear) or 40 (MLP).
        x_frac_bits, w_frac_bits: Paillier fixed-point precision of inputs and weights (bits).
        resolution: standard deviation of the noise flooding on every returned score (logit
            units, default ``2**-20``): what an answer can reveal is capped at this resolution
            (docs/threat-model.md). Larger values return coarser scores ("rounded scores").

    Returns:
        An evaluator whose ``requirements`` the server publishes to key holders, and whose
        ``predict(features)`` maps encrypted features to encrypted logits.
    """
    if scheme not in ("ckks", "paillier"):
        raise UsageError(
            f"The 'scheme' parameter must be 'ckks' or 'paillier'. Got {scheme!r} instead."
        )
    if isinstance(x_bound, bool) or not isinstance(x_bound, int | float) or not 0 < x_bound < 1e6:
        raise UsageError(
            f"The 'x_bound' parameter must be a number in (0, 1e6). Got {x_bound!r} instead."
        )
    if not isinstance(max_context_bytes, int) or max_context_bytes < 100_000:
        raise UsageError(
            "The 'max_context_bytes' parameter must be an int >= 100000. "
            f"Got {max_context_bytes!r} instead."
        )
    if scale_bits is not None and (not isinstance(scale_bits, int) or not 20 <= scale_bits <= 50):
        raise UsageError(
            f"The 'scale_bits' parameter must be an int in [20, 50]. Got {scale_bits!r} instead."
        )
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int | float)
        or not math.isfinite(resolution)
        or not 2.0**-30 <= resolution <= 1.0
    ):
        raise UsageError(
            "The 'resolution' parameter must be a number in [2**-30, 1] (logit units). "
            f"Got {resolution!r} instead."
        )
    parsed = extract_model(model, spec)
    x_bound = float(x_bound)
    if scheme == "paillier":
        if isinstance(parsed, _MLP):
            raise UsageError(
                "Paillier is only additively homomorphic, so it evaluates linear models only "
                '(`[model] kind = "logistic"`); use scheme="ckks" for an MLP'
            )
        return _compile_paillier(parsed, x_bound, x_frac_bits, w_frac_bits, float(resolution))
    if isinstance(parsed, _Linear):
        return _compile_ckks_linear(parsed, x_bound, scale_bits, float(resolution))
    return _compile_ckks_mlp(parsed, x_bound, max_context_bytes, scale_bits, float(resolution))


def _compile_ckks_linear(
    lin: _Linear, x_bound: float, scale_bits: int | None, resolution: float
) -> CKKSLinearEvaluator:
    K, d = lin.W.shape
    bound = float(np.max(np.abs(lin.b) + x_bound * np.abs(lin.W).sum(axis=1)))
    bbits = _bits(bound)
    Ip = _next_pow2(d)
    sx = scale_bits or 30
    room = 60 - 2 - bbits - sx  # weight-scale bits left in one 60-bit prime
    base = {
        "scheme": "ckks",
        "model": "linear",
        "n_features": d,
        "n_outputs": K,
        "x_bound": x_bound,
        "answer": "mean",
    }
    if Ip > _N_LINEAR // 2 and Ip > 4096:
        raise UsageError(f"{d} features do not fit the CKKS slots; reduce the model")
    if room >= 20 and Ip <= _N_LINEAR // 2:
        # Common case: one 60-bit data prime holds input scale x weight scale x output bound;
        # no rescale, no rotation: one plaintext product per output.
        sw = min(24, room)
        main = CKKSProfile("main", _N_LINEAR, (60, 49), (), relin=False, public_key=True)
        layouts: dict[str, Any] = {
            "replicated": {"profile": "main", "scale_bits": sx, "w_scale_bits": sw,
                           "rescale": False, "Ip": Ip, "Hp": 1, "score_factor": Ip},
            "columns": {"profile": "main", "scale_bits": sx, "w_scale_bits": sw,
                        "rescale": False, "complex": True},
        }
    else:
        # Large outputs: the weights are encoded at the size of a second prime, which the
        # product drops again (rescale): the result keeps the input scale.
        sx = min(scale_bits or 30, 58 - bbits)
        if sx < 20:
            raise UsageError(
                f"the model's outputs can reach {bound:.3g} on inputs within +/-{x_bound:g}, "
                "too large for precise CKKS evaluation; retrain with weight decay (smaller "
                "weights)"
            )
        n = 8192
        if Ip > n // 2:
            raise UsageError(f"{d} features do not fit the CKKS slots; reduce the model")
        main = CKKSProfile("main", n, (60, 60, 60), (), relin=False, public_key=True)
        layouts = {
            "replicated": {"profile": "main", "scale_bits": sx, "rescale": True, "Ip": Ip,
                           "Hp": 1, "score_factor": Ip},
            "columns": {"profile": "main", "scale_bits": sx, "rescale": True, "complex": True},
        }
    reqs = {**base, "profiles": [main.to_dict()], "layouts": layouts}
    return CKKSLinearEvaluator(W=lin.W, b=lin.b, requirements=EvaluatorRequirements.from_dict(reqs),
                               resolution=resolution)


#: Assumed standard deviation (coefficient units) of the weight-independent noise a ciphertext
#: carries before the MLP's squaring (re-randomization, rotations, rescaling); checked against
#: measurements in the tests.
MLP_PRE_SQUARE_NOISE = 2.0**12


def _compile_ckks_mlp(
    m: _MLP, x_bound: float, budget: int, scale_bits: int | None, resolution: float
) -> CKKSMLPEvaluator:
    H, d = m.W1.shape
    K = m.W2.shape[0]
    a, b, c = ACTIVATION_POLY[m.activation]
    shift = b / (2 * a)
    amp = np.sqrt(np.abs(a * m.W2))
    hb = np.abs(m.b1 + shift) + x_bound * np.abs(m.W1).sum(axis=1)  # bound on |h_j + shift|
    ub = amp * hb[None, :]  # bound on |u_kj|
    const = m.b2 + m.W2.sum(axis=1) * (c - b * b / (4 * a))
    out_b = np.abs(const) + (ub**2).sum(axis=1)
    bbits = _bits(max(float(out_b.max()), float((ub**2).max()), 1.0))
    # The largest scale the first prime allows (at most 47 bits): the squaring's
    # weight-dependent noise, which the flooding must cover, shrinks with the scale.
    delta = scale_bits or min(47, 58 - bbits)
    q0 = delta + bbits + 2
    if q0 > 60:
        delta, q0 = 60 - bbits - 2, 60
    if delta < 30:
        raise UsageError(
            f"the MLP's outputs can reach {float(out_b.max()):.3g} on inputs within "
            f"+/-{x_bound:g}, too "
            "large for precise CKKS evaluation; retrain with weight decay or fewer hidden units"
        )
    n = _N_MLP
    special = min(60, 218 - q0 - 2 * delta)
    Ip, Hp = _next_pow2(d), _next_pow2(H)
    if Ip * Hp > n // 2:
        raise UsageError(
            f"an MLP {d}-{H}-{K} needs {Ip * Hp} slots, more than the {n // 2} available; use "
            "fewer features or hidden units"
        )
    steps_i = [Hp << s for s in range(int(math.log2(Ip)))]
    bits = (q0, delta, delta, special)

    def size_of(keys: Sequence[int]) -> int:
        return CKKSProfile(
            "main", n, bits, tuple(keys), relin=True, public_key=True
        ).estimated_public_bytes()

    keys = choose_galois_keys([(steps_i, 1.0)], size_of, budget) if steps_i else []
    main = CKKSProfile("main", n, bits, tuple(keys), relin=True, public_key=True)
    reqs = {
        "scheme": "ckks",
        "model": "mlp",
        "n_features": d,
        "n_outputs": K,
        "x_bound": x_bound,
        "activation": m.activation,
        "answer": "mean",
        "profiles": [main.to_dict()],
        "layouts": {
            "replicated": {"profile": "main", "scale_bits": delta, "Ip": Ip, "Hp": Hp,
                           "score_factor": Hp},
            "columns": {"profile": "main", "scale_bits": delta, "complex": False},
        },
    }
    # Weight-dependent noise of the squaring: 2 * M * e, where e is the weight-independent
    # noise (std MLP_PRE_SQUARE_NOISE) and M the hidden pre-activations (bounded by ub on the
    # declared input box); in output units after the client's factor Hp (see the threat model).
    dep = 2.0 * MLP_PRE_SQUARE_NOISE * math.sqrt(Hp * float((ub**2).sum(axis=1).max())) / 2.0**delta
    return CKKSMLPEvaluator(model=m, requirements=EvaluatorRequirements.from_dict(reqs),
                            resolution=resolution, noise_bound=dep)


def _compile_paillier(
    lin: _Linear, x_bound: float, fx: int, fw: int, resolution: float
) -> PaillierLinearEvaluator:
    for name, v in (("x_frac_bits", fx), ("w_frac_bits", fw)):
        if isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 40:
            raise UsageError(
                f"The {name!r} parameter must be an int in [8, 40]. Got {v!r} instead."
            )
    Wq = np.rint(lin.W * 2.0**fw).astype(object)
    bq = [int(v) for v in np.rint(lin.b * 2.0 ** (fx + fw)).tolist()]
    wq_rows = [[int(v) for v in row] for row in Wq.tolist()]
    x_digit = math.floor(x_bound * 2**fx + 0.5)
    out_exact = max(abs(bq[k]) + x_digit * sum(abs(w) for w in wq_rows[k]) for k in range(len(bq)))
    # Published: a power of two above the worst-case output (never the exact bound, which is
    # |b| + sum |w| and would hand out a function of the weights), plus the flooding.
    out_bits = max(1, out_exact.bit_length())
    flood = max(1, 1 << max(0, round(fx + fw + math.log2(resolution))))
    digit_bound = (1 << out_bits) + flood
    slot_bits = max(digit_bound, x_digit).bit_length() + 2
    reqs = {
        "scheme": "paillier",
        "model": "linear",
        "n_features": int(lin.W.shape[1]),
        "n_outputs": int(lin.W.shape[0]),
        "x_bound": x_bound,
        "x_frac_bits": fx,
        "w_frac_bits": fw,
        "slot_bits": slot_bits,
        "out_digit_bound": digit_bound,
        "answer": "padded",
    }
    return PaillierLinearEvaluator(
        Wq=wq_rows, bq=bq, requirements=EvaluatorRequirements.from_dict(reqs), flood=flood
    )
