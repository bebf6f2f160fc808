"""``run_encrypted_inference_check``: the ``encrypted_inference`` section of results.json."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.errors import UsageError
from privml.he.api import (
    decrypt_scores,
    encrypt_features,
    keygen,
    load_features,
    load_public,
    load_scores,
)
from privml.he.evaluators import DEFAULT_MAX_CONTEXT_BYTES, compile_model
from privml.he.paillier import DEFAULT_KEY_BITS, PaillierPublicKey, PaillierRandomnessPool
from privml.models.nets import ModelSpec


def _reference(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """The plaintext model evaluated in float64 (so the figure is the HE error, not float32's)."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(torch.as_tensor(X, dtype=torch.float64)).numpy()


def run_encrypted_inference_check(
    model: nn.Module,
    spec: ModelSpec,
    X_test: Any,
    *,
    scheme: str = "ckks",
    n_single: int | None = None,
    batch_n: int | None = None,
    key_bits: int = DEFAULT_KEY_BITS,
    max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
) -> dict[str, Any]:
    """Encrypt ``X_test``, evaluate the compiled model on it, and report what it cost.

    Runs the whole protocol in one process, client and server each with their own objects
    (the server only sees the public context and ciphertexts, loaded back from bytes).

    Args:
        model, spec: a trained privml model and its ``ModelSpec``.
        X_test: encoded test features, shape ``(n, n_features)``, values in [0, 1].
        scheme: ``"ckks"`` or ``"paillier"`` (logistic models only).
        n_single: single-patient queries timed (default 20 for CKKS, 3 for Paillier).
        batch_n: patients in the throughput batch (default: ``X_test`` tiled to fill two CKKS
            column chunks, or one Paillier ciphertext's slots).
        key_bits: Paillier modulus size.

    Returns:
        A JSON-ready dict: ``scheme``, ``model``, ``parameters``, ``n``, ``max_abs_error`` (vs the
        plaintext model in float64), ``agreement`` (fraction of identical predicted classes),
        ``single_query_latency_ms`` (median, encrypt -> evaluate -> decrypt in process) and
        ``single_query_latency_ms_serialized`` (the same with every message serialized and
        validated), ``batch_throughput_per_s`` (end to end, ``batch_n`` patients),
        ``public_context_bytes`` and ``ciphertext_bytes`` (one query, one result, one batch per
        patient), ``keygen_s``.
    """
    X = np.asarray(X_test, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1:
        raise UsageError(
            f"The 'X_test' parameter must be a non-empty 2-D array. Got shape {X.shape}."
        )
    n = X.shape[0]
    ev = compile_model(model, spec, scheme=scheme, max_context_bytes=max_context_bytes)
    t0 = time.perf_counter()
    keys = keygen(scheme=scheme, requirements=ev.requirements, key_bits=key_bits)
    keygen_s = time.perf_counter() - t0
    public_bytes = keys.public.to_bytes()
    server_public = load_public(public_bytes)
    ref = _reference(model, X)

    # accuracy on the whole test set (batched, through bytes as a server would see them)
    feats = encrypt_features(keys, X, packing="columns")
    out = ev.predict(load_features(feats.to_bytes(), server_public))  # type: ignore[arg-type]
    got = decrypt_scores(keys.secret, out.to_bytes())
    err = float(np.max(np.abs(got - ref)))
    if ref.shape[1] == 1:
        agree = float(np.mean((got[:, 0] > 0) == (ref[:, 0] > 0)))
    else:
        agree = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))

    # single-patient latency
    is_paillier = scheme == "paillier"
    n_single = n_single if n_single is not None else (3 if is_paillier else 20)
    rows = [X[i % n] for i in range(n_single + 1)]
    client_pool = None
    t0 = time.perf_counter()
    if is_paillier:
        assert isinstance(keys.public, PaillierPublicKey)
        client_pool = PaillierRandomnessPool(keys.public, size=spec.n_features * (2 * n_single + 2))
    # the server's precomputed answer masks / encryptions of zero (offline work)
    server_pool = ev.make_pool(server_public, patients=2 * n_single + 2)  # type: ignore[arg-type]
    pool_s = time.perf_counter() - t0
    kw: dict[str, Any] = {"pool": client_pool} if is_paillier else {}
    skw: dict[str, Any] = {"pool": server_pool}
    single_ms, single_ser_ms = [], []
    q_bytes = r_bytes = 0
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        ct = encrypt_features(keys, row, packing="replicated", **kw)
        res = ev.predict(ct, **skw)  # type: ignore[arg-type]
        decrypt_scores(keys.secret, res)
        t1 = time.perf_counter()
        ct = encrypt_features(keys, row, packing="replicated", compact=not is_paillier, **kw)
        qb = ct.to_bytes()
        rb = ev.predict_bytes(qb, server_public, **skw)  # type: ignore[arg-type]
        decrypt_scores(keys.secret, load_scores(rb, keys.secret))
        t2 = time.perf_counter()
        if i == 0:  # warm-up: plaintext caches
            q_bytes, r_bytes = len(qb), len(rb)
            continue
        single_ms.append((t1 - t0) * 1e3)
        single_ser_ms.append((t2 - t1) * 1e3)

    # batch throughput
    if batch_n is None:
        batch_n = _default_batch(ev.requirements.data, keys.public)
    Xb = X[np.arange(batch_n) % n]
    t0 = time.perf_counter()
    bf = encrypt_features(keys, Xb, packing="columns")
    bout = ev.predict(bf)  # type: ignore[arg-type]
    decrypt_scores(keys.secret, bout)
    batch_s = time.perf_counter() - t0
    batch_bytes = len(bf.to_bytes())

    return {
        "scheme": scheme,
        "model": ev.requirements.data["model"],
        "parameters": _parameters(ev.requirements.data, keys.public),
        "n": n,
        "max_abs_error": err,
        "agreement": agree,
        "single_query_latency_ms": statistics.median(single_ms),
        "single_query_latency_ms_serialized": statistics.median(single_ser_ms),
        "n_single": n_single,
        "batch_throughput_per_s": batch_n / batch_s,
        "batch_n": batch_n,
        "public_context_bytes": len(public_bytes),
        "ciphertext_bytes": {
            "single_query": q_bytes,
            "single_result": r_bytes,
            "batch_per_patient": batch_bytes / batch_n,
        },
        "keygen_s": keygen_s,
        "randomness_pool_precompute_s": pool_s,
    }


def _default_batch(reqs: Mapping[str, Any], public: Any) -> int:
    if reqs["scheme"] == "paillier":
        usable = public.key_bits - 2
        return max(1, usable // int(reqs["slot_bits"]))
    lay = reqs["layouts"]["columns"]
    prof = next(p for p in reqs["profiles"] if p["name"] == lay["profile"])
    cap = prof["poly_modulus_degree"] // 2 * (2 if lay["complex"] else 1)
    return 2 * cap if reqs["model"] == "linear" else cap


def _parameters(reqs: Mapping[str, Any], public: Any) -> dict[str, Any]:
    if reqs["scheme"] == "paillier":
        return {
            "key_bits": public.key_bits,
            "x_frac_bits": reqs["x_frac_bits"],
            "w_frac_bits": reqs["w_frac_bits"],
            "slot_bits": reqs["slot_bits"],
            "patients_per_ciphertext": (public.key_bits - 2) // int(reqs["slot_bits"]),
        }
    return {
        "profiles": reqs["profiles"],
        "layouts": reqs["layouts"],
        "security_bits": 128,
        "max_coeff_bits_check": {
            p["name"]: f"{sum(p['coeff_bits'])} <= {_limit(p['poly_modulus_degree'])}"
            for p in reqs["profiles"]
        },
    }


def _limit(n: int) -> int:
    from privml.he._seal import HE_STANDARD_128

    return HE_STANDARD_128[n]


__all__ = ["run_encrypted_inference_check"]
