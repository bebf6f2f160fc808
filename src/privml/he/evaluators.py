"""Compile a trained privml model into an encrypted evaluator.

Supported: logistic regression (``kind="logistic"``: one linear layer, any number of outputs) on
CKKS and Paillier, and a one-hidden-layer MLP with a polynomial activation (``"square"`` or
``"poly2"``) on CKKS.

CKKS layouts (how the client lays its values out in the slots):

* ``replicated`` (one patient): feature ``i`` goes to slots ``R*i + r`` for ``r < R``, the
  pattern repeated over all slots. The server multiplies by the weights laid out the same way and
  sums over ``i`` with log2(I) rotations. Because every vector is periodic over the whole slot
  ring, each rotate-and-add window covers every feature exactly once, so **every slot ends up
  holding a complete result**: no slot holds a partial sum of the weights, and decryption reveals
  the scores and nothing else, without a masking multiplication.
* ``columns`` (many patients): one ciphertext per feature, patients in the slots (for the linear
  model, two patients per slot: real and imaginary parts). No rotations, no Galois keys; the
  weights are plaintext scalars.

MLP: with the activation ``f(h) = a*h**2 + b*h + c``, output ``k`` is
``sum_j W2[k,j] f(h_j) + b2[k] = sum_j s_kj u_kj**2 + const_k`` where
``u_kj = sqrt(|a W2[k,j]|) (h_j + b/(2a))`` is linear in the input and ``s_kj`` is the sign of
``a W2[k,j]``. The server folds ``sqrt(|a W2|)`` and the shift into the first layer and puts
``u_kj`` in a real slot when ``s_kj > 0`` and ``i * u_kj`` (imaginary) when ``s_kj < 0``: squaring
then gives ``s_kj u_kj**2`` directly. The whole network costs one plaintext multiplication and one
squaring (multiplicative depth 2), which keeps the ring at N = 8192.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from phe import paillier as phe
from tenseal import sealapi as seal
from torch import nn

from privml.errors import CryptoError, PrivmlError, UsageError
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
    rerandomize,
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


class _CKKSBase(ABC):
    requirements: EvaluatorRequirements
    _cache: dict[Any, dict[str, Any]]

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

    def predict_bytes(
        self, data: bytes, public: CKKSPublicContext, *, max_bytes: int | None = None
    ) -> bytes:
        """Load features from bytes (validated against ``public``), evaluate, serialize scores."""
        feats = CKKSCiphertexts.from_bytes(data, public, role="features", max_bytes=max_bytes)
        return self.predict(feats).to_bytes()

    @abstractmethod
    def predict(self, features: CKKSCiphertexts) -> CKKSCiphertexts:
        """Evaluate the model on encrypted features (each subclass's circuit)."""


@dataclass
class CKKSLinearEvaluator(_CKKSBase):
    """Logistic regression (any number of outputs) on CKKS. Returns encrypted logits."""

    W: np.ndarray
    b: np.ndarray
    requirements: EvaluatorRequirements
    _cache: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    scheme = "ckks"

    @_seal_errors
    def predict(self, features: CKKSCiphertexts) -> CKKSCiphertexts:
        """Evaluate the model on encrypted features; the result is encrypted under the same key."""
        feats = self._check_features(features)
        if feats.packing == "replicated":
            return self._scores(feats, self._replicated(feats), False)
        return self._scores(feats, self._columns(feats), True)

    def _replicated(self, feats: CKKSCiphertexts) -> list[Any]:
        lay = self.requirements.data["layouts"]["replicated"]
        rt = feats.holder.runtime(lay["profile"])  # type: ignore[union-attr]
        K, d = self.W.shape
        Ip, Kp = int(lay["Ip"]), int(lay["Kp"])
        cache = self._plains(rt)
        rescale = bool(lay.get("rescale", True))
        if "w" not in cache:
            block = np.zeros((Ip, Kp))
            block[:d, :K] = self.W.T
            vec = np.tile(block.ravel(), rt.slots // (Ip * Kp))
            # With a rescale, encode at the scale of the prime it drops: the result keeps the
            # input scale. Without, at the declared weight scale.
            w_scale = float(rt.primes[-1]) if rescale else 2.0 ** int(lay["w_scale_bits"])
            cache["w"] = rt.encode(vec, 0, w_scale)
        steps = [Kp << m for m in range(int(math.log2(Ip)))]
        out = []
        ev = rt.evaluator
        for ct in feats.cts:
            r = seal.Ciphertext()
            ev.multiply_plain(ct, cache["w"], r)
            if rescale:
                ev.rescale_to_next_inplace(r)
            self._rotate_sum(rt, r, steps)
            bkey = ("b", float(r.scale))
            if bkey not in cache:
                bias = np.zeros(Kp)
                bias[:K] = self.b
                cache[bkey] = rt.encode(
                    np.tile(bias, rt.slots // Kp), rt.level_of(r), float(r.scale)
                )
            ev.add_plain_inplace(r, cache[bkey])
            out.append(r)
        return out

    def _columns(self, feats: CKKSCiphertexts) -> list[Any]:
        lay = self.requirements.data["layouts"]["columns"]
        rt = feats.holder.runtime(lay["profile"])  # type: ignore[union-attr]
        K, d = self.W.shape
        cache = self._plains(rt)
        w_scale = 2.0 ** int(lay["w_scale_bits"])
        x_scale = 2.0 ** int(lay["scale_bits"])
        if "wc" not in cache:
            cache["wc"] = [
                [rt.encode_scalar(self.W[k, i], 0, w_scale) for i in range(d)] for k in range(K)
            ]
            cache["bc"] = []
            for k in range(K):
                pt = seal.Plaintext()
                # complex packing: the bias goes to both the real and the imaginary half
                rt.encoder.encode(
                    complex(self.b[k], self.b[k]), rt.levels[0], x_scale * w_scale, pt
                )
                cache["bc"].append(pt)
        cap = 2 * rt.slots
        n_chunks = math.ceil(feats.n_rows / cap)
        ev = rt.evaluator
        out: list[Any] = []
        for k in range(K):
            for c in range(n_chunks):
                acc = None
                for i in range(d):
                    t = seal.Ciphertext()
                    ev.multiply_plain(feats.cts[i * n_chunks + c], cache["wc"][k][i], t)
                    if acc is None:
                        acc = t
                    else:
                        ev.add_inplace(acc, t)
                ev.add_plain_inplace(acc, cache["bc"][k])
                out.append(acc)
        return out


@dataclass
class CKKSMLPEvaluator(_CKKSBase):
    """One-hidden-layer MLP with a polynomial activation on CKKS. Returns encrypted logits."""

    model: _MLP
    requirements: EvaluatorRequirements
    _cache: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    scheme = "ckks"

    def __post_init__(self) -> None:
        m = self.model
        a, b, c = ACTIVATION_POLY[m.activation]
        self._shift = b / (2 * a)
        self._amp = np.sqrt(np.abs(a * m.W2))  # (K, H)
        self._neg = (a * m.W2) < 0  # (K, H)
        self._const = m.b2 + m.W2.sum(axis=1) * (c - b * b / (4 * a))  # (K,)

    @_seal_errors
    def predict(self, features: CKKSCiphertexts) -> CKKSCiphertexts:
        """Evaluate the MLP on encrypted features; the result is encrypted under the same key."""
        feats = self._check_features(features)
        if feats.packing == "replicated":
            return self._scores(feats, self._replicated(feats), False)
        return self._scores(feats, self._columns(feats), False)

    def _replicated(self, feats: CKKSCiphertexts) -> list[Any]:
        lay = self.requirements.data["layouts"]["replicated"]
        rt = feats.holder.runtime(lay["profile"])  # type: ignore[union-attr]
        m = self.model
        H, d = m.W1.shape
        K = m.W2.shape[0]
        Ip, Hp, Kp = int(lay["Ip"]), int(lay["Hp"]), int(lay["Kp"])
        R = Hp * Kp
        cache = self._plains(rt)
        phase = np.where(self._neg, 1j, 1.0)  # (K, H)
        if "w" not in cache:
            block = np.zeros((Ip, Hp, Kp), dtype=np.complex128)
            # slot R*i + Kp*j + k holds phase_kj * amp_kj * W1[j, i]
            block[:d, :H, :K] = m.W1.T[:, :, None] * (self._amp * phase).T[None, :, :]
            cache["w"] = rt.encode(
                np.tile(block.ravel(), rt.slots // (Ip * R)), 0, float(rt.primes[-1])
            )
        ev = rt.evaluator
        steps_i = [R << s for s in range(int(math.log2(Ip)))]
        steps_j = [Kp << s for s in range(int(math.log2(Hp)))]
        out = []
        for ct in feats.cts:
            r = seal.Ciphertext()
            ev.multiply_plain(ct, cache["w"], r)
            ev.rescale_to_next_inplace(r)
            self._rotate_sum(rt, r, steps_i)
            k1 = ("b1", float(r.scale))
            if k1 not in cache:
                bias = np.zeros((Hp, Kp), dtype=np.complex128)
                bias[:H, :K] = ((m.b1 + self._shift)[None, :] * self._amp * phase).T
                cache[k1] = rt.encode(
                    np.tile(bias.ravel(), rt.slots // R), rt.level_of(r), float(r.scale)
                )
            ev.add_plain_inplace(r, cache[k1])
            ev.square_inplace(r)
            ev.relinearize_inplace(r, rt.relin)
            ev.rescale_to_next_inplace(r)
            self._rotate_sum(rt, r, steps_j)
            k2 = ("c", float(r.scale))
            if k2 not in cache:
                const = np.zeros(Kp)
                const[:K] = self._const
                cache[k2] = rt.encode(
                    np.tile(const, rt.slots // Kp), rt.level_of(r), float(r.scale)
                )
            ev.add_plain_inplace(r, cache[k2])
            out.append(r)
        return out

    def _columns(self, feats: CKKSCiphertexts) -> list[Any]:
        lay = self.requirements.data["layouts"]["columns"]
        rt = feats.holder.runtime(lay["profile"])  # type: ignore[union-attr]
        m = self.model
        H, d = m.W1.shape
        K = m.W2.shape[0]
        cache = self._plains(rt)
        top_scale = float(rt.primes[-1])
        if "wc" not in cache:
            cache["wc"] = [
                [
                    [rt.encode_scalar(self._amp[k, j] * m.W1[j, i], 0, top_scale) for i in range(d)]
                    for j in range(H)
                ]
                for k in range(K)
            ]
        ev = rt.evaluator
        n_chunks = math.ceil(feats.n_rows / rt.slots)
        out: list[Any] = []
        for k in range(K):
            for c in range(n_chunks):
                total: Any = None
                for j in range(H):
                    u: Any = None
                    for i in range(d):
                        t = seal.Ciphertext()
                        ev.multiply_plain(feats.cts[i * n_chunks + c], cache["wc"][k][j][i], t)
                        if u is None:
                            u = t
                        else:
                            ev.add_inplace(u, t)
                    ev.rescale_to_next_inplace(u)
                    ev.add_plain_inplace(
                        u,
                        rt.encode_scalar(
                            self._amp[k, j] * (m.b1[j] + self._shift), 1, float(u.scale)
                        ),
                    )
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
                ev.add_plain_inplace(total, rt.encode_scalar(self._const[k], 2, float(total.scale)))
                out.append(total)
        return out


@dataclass
class PaillierLinearEvaluator:
    """Logistic regression on Paillier: fixed-point weights times encrypted fixed-point inputs.

    The result is re-randomized (multiplied by a fresh encryption of zero) before it leaves the
    server: otherwise a client that knows the randomness of its own ciphertexts could recover
    the weights from the result's randomness (see docs/threat-model.md).
    """

    Wq: list[list[int]]
    bq: list[int]
    requirements: EvaluatorRequirements

    scheme = "paillier"

    def predict(
        self, features: PaillierCiphertexts, *, pool: PaillierRandomnessPool | None = None
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
        n_chunks = math.ceil(features.n_rows / features.per_ct)
        codec = SlotCodec(slot_bits=features.slot_bits, slots=features.per_ct, digit_bound=1)
        out: list[int] = []
        for k, row in enumerate(self.Wq):
            for c in range(n_chunks):
                rows = min(features.per_ct, features.n_rows - c * features.per_ct)
                (bias,) = codec.pack([self.bq[k]] * rows)
                acc = phe.EncryptedNumber(pk, pk.raw_encrypt(bias % pk.n, r_value=1))
                for i, w in enumerate(row):
                    if w:
                        acc = acc + phe.EncryptedNumber(pk, features.cts[i * n_chunks + c]) * w
                out.append(rerandomize(public, acc.ciphertext(be_secure=False), pool))
        return PaillierCiphertexts(
            role="scores",
            key_id=features.key_id,
            packing="columns",
            n_rows=features.n_rows,
            n_cols=len(self.Wq),
            slot_bits=features.slot_bits,
            per_ct=features.per_ct,
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
    ) -> bytes:
        feats = PaillierCiphertexts.from_bytes(data, public, role="features", max_bytes=max_bytes)
        return self.predict(feats, pool=pool).to_bytes(public.ciphertext_bytes)


Evaluator = CKKSLinearEvaluator | CKKSMLPEvaluator | PaillierLinearEvaluator


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
        public_key: include a public encryption key in CKKS contexts (lets parties without the
            secret key encrypt; costs ~0.1-0.5 MB).
        max_context_bytes: upper bound on the CKKS public context (Galois keys are dropped and
            rotations composed from the remaining ones until it fits).
        scale_bits: CKKS input scale (log2); default 30 (linear) or 40 (MLP).
        x_frac_bits, w_frac_bits: Paillier fixed-point precision of inputs and weights (bits).

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
    parsed = extract_model(model, spec)
    x_bound = float(x_bound)
    if scheme == "paillier":
        if isinstance(parsed, _MLP):
            raise UsageError(
                "Paillier is only additively homomorphic, so it evaluates linear models only "
                '(`[model] kind = "logistic"`); use scheme="ckks" for an MLP'
            )
        return _compile_paillier(parsed, x_bound, x_frac_bits, w_frac_bits)
    if isinstance(parsed, _Linear):
        return _compile_ckks_linear(parsed, x_bound, public_key, scale_bits)
    return _compile_ckks_mlp(parsed, x_bound, public_key, max_context_bytes, scale_bits)


def _compile_ckks_linear(
    lin: _Linear, x_bound: float, public_key: bool, scale_bits: int | None
) -> CKKSLinearEvaluator:
    K, d = lin.W.shape
    bound = float(np.max(np.abs(lin.b) + x_bound * np.abs(lin.W).sum(axis=1)))
    bbits = _bits(bound)
    Ip, Kp = _next_pow2(d), _next_pow2(K)
    steps = tuple(Kp << m for m in range(int(math.log2(Ip))))
    sx = scale_bits or 30
    room = 60 - 2 - bbits - sx  # weight-scale bits left in one 60-bit prime
    base = {
        "scheme": "ckks",
        "model": "linear",
        "n_features": d,
        "n_outputs": K,
        "x_bound": x_bound,
    }
    if room >= 20 and Ip * Kp <= _N_LINEAR // 2:
        # Common case: one 60-bit data prime holds input scale x weight scale x output bound.
        # No rescale: encryption, rotations and the product all run at one prime, and the
        # rotations' key-switching noise is negligible at the product's scale (~2**52).
        sw = min(24, room)
        main = CKKSProfile("main", _N_LINEAR, (60, 49), steps, relin=False, public_key=public_key)
        reqs = {
            **base,
            "profiles": [main.to_dict()],
            "layouts": {
                "replicated": {
                    "profile": "main",
                    "scale_bits": sx,
                    "w_scale_bits": sw,
                    "rescale": False,
                    "Ip": Ip,
                    "Hp": 1,
                    "Kp": Kp,
                },
                "columns": {
                    "profile": "main",
                    "scale_bits": sx,
                    "w_scale_bits": sw,
                    "complex": True,
                },
            },
        }
        return CKKSLinearEvaluator(
            W=lin.W, b=lin.b, requirements=EvaluatorRequirements.from_dict(reqs)
        )
    # Large outputs: one patient is multiplied at two primes and rescaled by a 25-bit prime, the
    # rotations run at the remaining one; a batch uses its own parameters.
    n = _N_LINEAR
    w_bits = 25
    q0 = sx + bbits + 2
    special = min(60, 109 - q0 - w_bits)
    if q0 > 60 or special < q0 or Ip * Kp > n // 2:
        n, sx, w_bits = 8192, scale_bits or 36, 30
        q0 = sx + bbits + 2
        special = 60
        if Ip * Kp > n // 2:
            raise UsageError(
                f"{d} features x {K} outputs do not fit the CKKS slots; reduce the model"
            )
    if q0 > 60:
        raise UsageError(
            f"the model's outputs can reach {bound:.3g} on inputs within +/-{x_bound:g}, "
            "too large for precise CKKS evaluation; retrain with weight decay (smaller weights)"
        )
    single = CKKSProfile(
        "single", n, (q0, w_bits, special), steps, relin=False, public_key=public_key
    )
    bx, bw = 30, min(24, 60 - 30 - bbits - 2)
    if bw >= 16:
        batch = CKKSProfile("batch", 4096, (60, 49), (), relin=False, public_key=public_key)
    else:
        bx, bw = 36, 24
        batch = CKKSProfile("batch", 8192, (60, 60, 49), (), relin=False, public_key=public_key)
    reqs = {
        **base,
        "profiles": [single.to_dict(), batch.to_dict()],
        "layouts": {
            "replicated": {
                "profile": "single",
                "scale_bits": sx,
                "rescale": True,
                "Ip": Ip,
                "Hp": 1,
                "Kp": Kp,
            },
            "columns": {"profile": "batch", "scale_bits": bx, "w_scale_bits": bw, "complex": True},
        },
    }
    return CKKSLinearEvaluator(W=lin.W, b=lin.b, requirements=EvaluatorRequirements.from_dict(reqs))


def _compile_ckks_mlp(
    m: _MLP, x_bound: float, public_key: bool, budget: int, scale_bits: int | None
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
    delta = scale_bits or 40
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
    Ip, Hp, Kp = _next_pow2(d), _next_pow2(H), _next_pow2(K)
    R = Hp * Kp
    if Ip * R > n // 2:
        raise UsageError(
            f"an MLP {d}-{H}-{K} needs {Ip * R} slots, more than the {n // 2} available; use fewer "
            "features, hidden units or outputs"
        )
    steps_i = [R << s for s in range(int(math.log2(Ip)))]
    steps_j = [Kp << s for s in range(int(math.log2(Hp)))]
    bits = (q0, delta, delta, special)

    def size_of(keys: Sequence[int]) -> int:
        return CKKSProfile(
            "main", n, bits, tuple(keys), relin=True, public_key=public_key
        ).estimated_public_bytes()

    # rotations over i run with two data primes left, over j with one: weight 2 and 1
    keys = choose_galois_keys([(steps_i, 2.0), (steps_j, 1.0)], size_of, budget)
    main = CKKSProfile("main", n, bits, tuple(keys), relin=True, public_key=public_key)
    reqs = {
        "scheme": "ckks",
        "model": "mlp",
        "n_features": d,
        "n_outputs": K,
        "x_bound": x_bound,
        "activation": m.activation,
        "profiles": [main.to_dict()],
        "layouts": {
            "replicated": {"profile": "main", "scale_bits": delta, "Ip": Ip, "Hp": Hp, "Kp": Kp},
            "columns": {"profile": "main", "scale_bits": delta, "complex": False},
        },
    }
    return CKKSMLPEvaluator(model=m, requirements=EvaluatorRequirements.from_dict(reqs))


def _compile_paillier(lin: _Linear, x_bound: float, fx: int, fw: int) -> PaillierLinearEvaluator:
    for name, v in (("x_frac_bits", fx), ("w_frac_bits", fw)):
        if isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 40:
            raise UsageError(
                f"The {name!r} parameter must be an int in [8, 40]. Got {v!r} instead."
            )
    Wq = np.rint(lin.W * 2.0**fw).astype(object)
    bq = [int(v) for v in np.rint(lin.b * 2.0 ** (fx + fw)).tolist()]
    wq_rows = [[int(v) for v in row] for row in Wq.tolist()]
    x_digit = math.floor(x_bound * 2**fx + 0.5)
    out_digit = max(abs(bq[k]) + x_digit * sum(abs(w) for w in wq_rows[k]) for k in range(len(bq)))
    slot_bits = max(out_digit, x_digit).bit_length() + 2
    reqs = {
        "scheme": "paillier",
        "model": "linear",
        "n_features": int(lin.W.shape[1]),
        "n_outputs": int(lin.W.shape[0]),
        "x_bound": x_bound,
        "x_frac_bits": fx,
        "w_frac_bits": fw,
        "slot_bits": slot_bits,
        "out_digit_bound": out_digit,
    }
    return PaillierLinearEvaluator(
        Wq=wq_rows, bq=bq, requirements=EvaluatorRequirements.from_dict(reqs)
    )
