"""Model confidentiality against a client that crafts its ciphertexts.

The client holds the secret key, so it can encrypt anything (any slot vector, any polynomial,
values far outside the input box the server cannot check) and decrypt every coefficient of the
answer. Each attack below worked against the previous design (the whole model in one request);
each must now recover no more than one honest patient's score would give:

* CKKS: a "replicated" vector with the unit vector ``e_i`` in slot block ``i`` (all values <= 1)
  used to return the 30 weights and the bias to 8.6e-6 in one request;
* CKKS: a crafted polynomial packing two coefficients of the weight polynomial into one answer;
* Paillier: encrypting ``2**(64 (i + 1))`` for feature ``i`` used to return the bias exactly and
  every weight within 4.8e-7;
* Paillier: packing two features' weights into one answer with small multipliers.

The baseline is what one honest patient gives: one linear equation in the 31 unknowns; from it
an attacker can pin down at most one parameter (e.g. the bias, with ``x = 0``). The metric is
the root-mean-square error of the attacker's estimate of the 31 parameters, compared with the
best estimate after one honest answer (every weight unknown: estimate 0, the bias exact).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from tenseal import sealapi as seal

import privml.he as he
from privml.errors import InsecureOptionWarning
from privml.he import _seal
from privml.he.ckks import CKKSCiphertexts, decrypt_vectors, encrypt_vectors
from privml.he.paillier import PaillierCiphertexts


def _params(model) -> tuple[np.ndarray, float]:
    lin = model[0]
    return lin.weight.detach().double().numpy()[0], float(lin.bias.detach().double().numpy()[0])


def _honest_baseline_rmse(w: np.ndarray) -> float:
    """RMSE of the 31 parameters after one honest answer: the bias (from x = 0) is known, the
    weights are not (estimate 0)."""
    return float(np.sqrt(np.sum(w**2) / (w.size + 1)))


def _rmse(w_hat: np.ndarray, b_hat: float, w: np.ndarray, b: float) -> float:
    return float(np.sqrt((np.sum((w_hat - w) ** 2) + (b_hat - b) ** 2) / (w.size + 1)))


def coefficients(slots: np.ndarray, n: int) -> np.ndarray:
    """The real coefficients of a CKKS plaintext from its ``n/2`` decoded slots (SEAL's slot
    ``j`` is the evaluation at ``zeta**(3**j mod 2n)``), at the plaintext's scale."""
    idx = np.array([pow(3, j, 2 * n) for j in range(n // 2)])
    a = np.zeros(2 * n, dtype=np.complex128)
    a[idx] = slots
    return (2.0 / n) * np.real(np.fft.fft(a))[:n]


def _crafted_replicated(s, vec: np.ndarray) -> CKKSCiphertexts:
    """What a malicious client sends: any slot vector, encrypted at the declared level and
    scale (the only things the server can check)."""
    lay = s.ev.requirements.data["layouts"]["replicated"]
    cts = encrypt_vectors(s.keys.secret, lay["profile"], [vec], scale=2.0 ** lay["scale_bits"])
    return CKKSCiphertexts("features", s.keys.public.key_id, lay["profile"], "replicated", 1,
                           s.ev.requirements.n_features, False, cts, holder=s.server_public)


def _answer_slots(s, out) -> np.ndarray:
    (v,) = decrypt_vectors(s.keys.secret, out.profile, out.cts, complex_out=True)
    return v


# -- CKKS --------------------------------------------------------------------------------------


def test_ckks_unit_vectors_in_slot_blocks_recover_nothing(ckks_linear) -> None:
    """The issue's attack: e_i in block i (values <= 1). It used to read block i's score in
    slot Ip*i. Now the answer's slots are a one-time pad and the only number it carries is the
    mean, one linear function of the weights."""
    s = ckks_linear
    w, b = _params(s.model)
    lay = s.ev.requirements.data["layouts"]["replicated"]
    Ip, slots = lay["Ip"], s.keys.public.runtime(lay["profile"]).slots
    vec = np.zeros(slots)
    for i in range(w.size):
        vec[i * Ip + i] = 1.0
    v = _answer_slots(s, s.ev.predict(_crafted_replicated(s, vec)))
    # the old attack: block i's first slot would hold w_i + b
    per_block = np.array([v[i * Ip].real for i in range(w.size)])
    w_hat = per_block - np.median(per_block)
    b_hat = float(np.median(per_block))
    baseline = _honest_baseline_rmse(w)
    assert _rmse(w_hat, b_hat, w, b) > 10 * baseline  # worse than guessing: garbage
    # what the answer does carry: one number, factor * mean = Ip * sum_i w_i / slots + b, one
    # linear function of the parameters, like one honest patient's score
    assert lay["score_factor"] * v.mean().real == pytest.approx(
        Ip * w.sum() / slots + b, abs=1e-4
    )


def test_ckks_answer_coefficients_are_uniform_except_the_score(ckks_linear, data) -> None:
    """Every coefficient of the answer except the constant one is uniform modulo q (a
    Kolmogorov-Smirnov test against U(-1/2, 1/2)); the constant one is the score."""
    s = ckks_linear
    x = data.X_test[3]
    out = s.ev.predict(he.encrypt_features(s.keys, x))
    rt = s.keys.public.runtime(out.profile)
    scale, q = float(out.cts[0].scale), rt.primes[0]
    c = coefficients(_answer_slots(s, out), rt.n) * scale
    rest = c[1:] / q
    assert np.max(np.abs(rest)) <= 0.5 + 1e-6
    assert stats.kstest(rest, "uniform", args=(-0.5, 1.0)).pvalue > 1e-3
    factor = s.ev.requirements.data["layouts"]["replicated"]["score_factor"]
    w, b = _params(s.model)
    assert c[0] / scale * factor == pytest.approx(float(w @ x + b), abs=1e-5)


def test_ckks_crafted_polynomial_packing_gets_one_functional(ckks_linear) -> None:
    """A client that encrypts a polynomial of its choice, m = 1 + 2**30 X^(n-j) (far outside the
    input box), gets the constant coefficient of m * w_poly = W_0 - 2**30 W_j: two integer
    coefficients of the weight polynomial packed in one number. The flooding (a resolution of
    2**-20 on the score, about 2**29 coefficient units here) buries the low one: the answer
    carries one functional of the model, as an honest one does."""
    s = ckks_linear
    lay = s.ev.requirements.data["layouts"]["replicated"]
    rt = s.keys.secret.runtime(lay["profile"])
    n, q = rt.n, rt.primes[0]
    s.ev.predict(_crafted_replicated(s, np.zeros(rt.slots)))  # fills the server's plaintexts
    wpt = s.ev._plains(s.server_public.runtime(lay["profile"]))["w"][0]
    # integer coefficients of w_poly, read here only to score the attack
    w_coef = np.rint(coefficients(np.asarray(rt.encoder.decode_complex(wpt)), n)
                     * float(wpt.scale))
    j = int(np.argmax(np.abs(w_coef[1:]))) + 1
    msg = np.zeros((2, 1, n), dtype=np.uint64)
    msg[0, 0, 0] = 1
    msg[0, 0, n - j] = 1 << 30
    errors = []
    for _ in range(6):
        z = seal.Ciphertext()
        s.keys.secret.encryptor(lay["profile"]).encrypt_zero_symmetric(z)
        z.scale = 2.0 ** lay["scale_bits"]
        rt.evaluator.transform_from_ntt_inplace(z)
        rt.evaluator.add_inplace(
            z, _seal.coefficient_ciphertext(rt.context, rt.levels[0], msg, float(z.scale))
        )
        rt.evaluator.transform_to_ntt_inplace(z)
        feats = CKKSCiphertexts("features", s.keys.public.key_id, lay["profile"], "replicated",
                                1, s.ev.requirements.n_features, False, [z],
                                holder=s.server_public)
        out = s.ev.predict(feats)
        scale = float(out.cts[0].scale)
        c0 = round(coefficients(_answer_slots(s, out), n)[0] * scale)
        bias = round(s.ev.b[0] / lay["score_factor"] * scale)
        target = int(w_coef[0]) - (1 << 30) * int(w_coef[j]) + bias
        errors.append(abs(((c0 - target + q // 2) % q) - q // 2))  # error on W_0's estimate
    assert np.median(errors) > 8 * max(abs(w_coef[0]), 1 << 20)


def test_ckks_mlp_answer_hides_hidden_units(ckks_mlp, data) -> None:
    """The MLP's slots after squaring hold s_j u_j**2 per hidden unit; the answer keeps only
    their sum (the constant coefficient): the slots are uniform noise."""
    s = ckks_mlp
    out = s.ev.predict(he.encrypt_features(s.keys, data.X_test[0]))
    rt = s.keys.public.runtime(out.profile)
    c = coefficients(_answer_slots(s, out), rt.n) * float(out.cts[0].scale)
    rest = c[1:] / rt.primes[0]
    assert stats.kstest(rest, "uniform", args=(-0.5, 1.0)).pvalue > 1e-3


def test_mlp_pre_square_noise_assumption_holds(ckks_mlp, data) -> None:
    """The flooding of the MLP is sized from an assumed bound on the noise before the squaring
    (MLP_PRE_SQUARE_NOISE); the measured noise must stay well below it."""
    from privml.he import protect
    from privml.he.evaluators import MLP_PRE_SQUARE_NOISE
    from privml.he.protect import MaskSpec

    s = ckks_mlp
    lay = s.ev.requirements.data["layouts"]["replicated"]
    rt = s.server_public.runtime(lay["profile"])
    Ip, Hp = lay["Ip"], lay["Hp"]
    m = s.ev.model
    x = data.X_test[1]
    feats = he.load_features(he.encrypt_features(s.keys, x).to_bytes(), s.server_public)
    s.ev.predict(feats)
    cache = s.ev._plains(rt)
    r = seal.Ciphertext()
    rt.evaluator.multiply_plain(feats.cts[0], cache["w"][0], r)
    rt.evaluator.rescale_to_next_inplace(r)
    protect.apply(rt, r, MaskSpec("rerand", lay["profile"], 1), None)
    s.ev._rotate_sum(rt, r, [Hp << k for k in range(int(math.log2(Ip)))])
    (v,) = decrypt_vectors(s.keys.secret, lay["profile"], [r], complex_out=True)
    u = (m.W1 @ x) * s.ev._amp[0] * np.where(s.ev._neg[0], 1j, 1.0)
    block = np.tile(np.r_[u, np.zeros(Hp - u.size)], Ip)
    err = (v - np.tile(block, rt.slots // block.size)) * float(r.scale)
    coef_std = float(np.std(err.real)) / math.sqrt(rt.n / 2)
    assert coef_std < MLP_PRE_SQUARE_NOISE / 2


# -- Paillier ----------------------------------------------------------------------------------


def _crafted_paillier(s, ints: list[int]) -> PaillierCiphertexts:
    """One 'patient' whose feature i is the integer ints[i] (any size below n)."""
    reqs = s.ev.requirements.data
    pub = s.keys.public
    return PaillierCiphertexts("features", pub.key_id, "columns", 1, reqs["n_features"],
                               reqs["slot_bits"], 1, pub.encrypt_ints(ints), holder=pub)


def _raw_answer(s, out) -> int:
    return int(s.keys.secret.key.raw_decrypt(out.cts[0]))


def test_paillier_high_digit_encodings_recover_nothing(paillier_linear) -> None:
    """The issue's attack: x_i = 2**(64 (i+1)) puts each weight in its own 64-bit digit of the
    answer. The answer now holds only its low per_ct * slot_bits bits (with flooding) under a
    one-time pad: the weights are gone, the bias comes back only to the resolution."""
    s = paillier_linear
    w, b = _params(s.model)
    reqs = s.ev.requirements.data
    fx, fw = reqs["x_frac_bits"], reqs["w_frac_bits"]
    out = s.ev.predict(_crafted_paillier(s, [1 << (64 * (i + 1)) for i in range(w.size)]))
    raw = _raw_answer(s, out)
    # the old decoding: digit 0 = bias, digit i+1 = weight i (64-bit digits, 2**fw fixed point)
    digits, v = [], raw
    for _ in range(w.size + 1):
        d = v & ((1 << 64) - 1)
        d = d - (1 << 64) if d >= 1 << 63 else d
        digits.append(d)
        v = (v - d) >> 64
    w_hat = np.array(digits[1:], dtype=np.float64) / 2.0**fw
    b_hat = digits[0] / 2.0 ** (fx + fw)
    assert _rmse(w_hat, b_hat, w, b) > 10 * _honest_baseline_rmse(w)
    # the honest decoding gives the bias (x_i contributes nothing below the pad), to 2**-20
    got = he.decrypt_scores(s.keys.secret, out)[0, 0]
    assert got == pytest.approx(b, abs=8 * 2.0**-20)


def test_paillier_packing_two_weights_gets_one_functional(paillier_linear) -> None:
    """x_0 = 1.0 and x_k = 2**40 (k: the largest weight): w_0 + b lands in the low bits and w_k
    above them. The answer keeps slot_bits (49) bits: w_k's digit is under the one-time pad."""
    s = paillier_linear
    w, b = _params(s.model)
    reqs = s.ev.requirements.data
    fx, fw = reqs["x_frac_bits"], reqs["w_frac_bits"]
    k = int(np.argmax(np.abs(w[1:]))) + 1
    ints = [0] * w.size
    ints[0], ints[k] = 1 << fx, 1 << (fx + 40)
    raw = _raw_answer(s, s.ev.predict(_crafted_paillier(s, ints)))
    # where Wq_k * 2**(fx + 40) = w_k * 2**(fw + fx + 40) sits: read 32 bits, fw of them
    # fractional, as the attacker would
    digit = (raw >> (fx + 40)) & ((1 << 32) - 1)
    wk_hat = (digit - (1 << 32) if digit >= 1 << 31 else digit) / 2.0**fw
    assert abs(wk_hat - w[k]) > 0.5 * abs(w[k])


# -- what is published -------------------------------------------------------------------------


def _scaled(model, factor: float):
    import copy

    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(factor)
    return m


@pytest.mark.parametrize("scheme", ["ckks", "paillier"])
def test_requirements_reveal_only_a_power_of_two_bound(ckks_linear, scheme: str) -> None:
    """Two models whose worst-case outputs lie in the same power-of-two interval publish the
    same requirements: nothing finer than that bound (Paillier used to publish |b| + sum |w|
    exactly)."""
    model = ckks_linear.model
    w, b = _params(model)
    bound = abs(b) + np.abs(w).sum()
    lo, hi = 2.0 ** math.floor(math.log2(bound)), 2.0 ** math.ceil(math.log2(bound))
    f1, f2 = (lo * 1.01) / bound, (hi * 0.99) / bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        r1 = he.compile_model(_scaled(model, f1), ckks_linear.spec, scheme=scheme).requirements
        r2 = he.compile_model(_scaled(model, f2), ckks_linear.spec, scheme=scheme).requirements
    assert r1.to_dict() == r2.to_dict()
    if scheme == "paillier":
        assert r1.data["out_digit_bound"] != round(bound * 2.0**40)
