"""Key generation policy, public/secret separation, and secret keys at rest."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.he import formats
from privml.he._seal import HE_STANDARD_128, save_bytes
from privml.he.ckks import CKKSProfile
from privml.he.paillier import PaillierPublicKey, check_key_bits

FAST_SCRYPT = 1 << 14  # the minimum; the default (2**17) costs 128 MiB and ~0.5 s per save/load


# -- CKKS security bounds ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "limit"), sorted(HE_STANDARD_128.items())[2:5])
def test_ckks_bounds_are_the_he_standard(n: int, limit: int) -> None:
    assert {4096: 109, 8192: 218, 16384: 438}[n] == limit
    ok = CKKSProfile("p", n, _split(limit))
    ok.validate()
    with pytest.raises(CryptoError, match=f"below 128-bit security.*at most {limit} bits at N={n}"):
        CKKSProfile("p", n, _split(limit + 1)).validate()


def _split(total: int) -> tuple[int, ...]:
    k = -(-total // 60)
    base, extra = divmod(total, k)
    return tuple(base + (1 if i < extra else 0) for i in range(k))


@pytest.mark.parametrize(
    ("profile", "match"),
    [
        (CKKSProfile("p", 3000, (30, 30)), "must be one of"),
        (CKKSProfile("p", 4096, (109,)), "at least 2 primes"),
        (CKKSProfile("p", 4096, (61, 40)), "17 to 60 bits"),
        (CKKSProfile("p", 4096, (40, 40), galois_steps=(0,)), "invalid Galois step 0"),
        (CKKSProfile("p", 4096, (40, 40), galois_steps=(2048,)), "invalid Galois step 2048"),
        (CKKSProfile("Bad Name", 4096, (40, 40)), "invalid CKKS profile name"),
    ],
)
def test_ckks_profile_validation(profile: CKKSProfile, match: str) -> None:
    with pytest.raises(CryptoError, match=match):
        profile.validate()


def test_insecure_requirements_refused_at_keygen(ckks_linear) -> None:
    reqs = ckks_linear.ev.requirements.to_dict()
    reqs["profiles"][0]["coeff_bits"] = [60, 30, 30]  # 120 bits at N=4096
    with pytest.raises(CryptoError, match="below 128-bit security"):
        he.keygen(scheme="ckks", requirements=reqs)


def test_ckks_keygen_needs_requirements() -> None:
    with pytest.raises(UsageError, match="requirements=evaluator.requirements"):
        he.keygen(scheme="ckks")


# -- Paillier key sizes ----------------------------------------------------------------------


def test_paillier_key_sizes() -> None:
    with pytest.raises(CryptoError, match="must be >= 2048"):
        check_key_bits(1024)
    with pytest.warns(InsecureOptionWarning, match="112-bit"):
        check_key_bits(2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_key_bits(3072) == 3072
    with pytest.raises(CryptoError, match="multiple of 256"):
        check_key_bits(3000)
    with pytest.raises(TypeError):
        check_key_bits("3072")


def test_received_paillier_key_checked() -> None:
    small = 1000000016000000063  # far below 2048 bits
    blob = formats.pack(
        formats.Kind.PAILLIER_PUBLIC,
        {"key_id": "x", "requirements": {}},
        [small.to_bytes(8, "big")],
    )
    with pytest.raises(CryptoError, match="at least 2048 bits are required"):
        PaillierPublicKey.from_bytes(blob)
    even = (1 << 2047) + 2
    blob = formats.pack(
        formats.Kind.PAILLIER_PUBLIC,
        {"key_id": "x", "requirements": {}},
        [even.to_bytes(256, "big")],
    )
    with pytest.raises(CryptoError, match="not a valid Paillier modulus"):
        PaillierPublicKey.from_bytes(blob)


# -- public material carries no secret -----------------------------------------------------


def test_ckks_public_context_has_no_secret(ckks_linear) -> None:
    keys = ckks_linear.keys
    pub = keys.public.to_bytes()
    _, header, _ = formats.unpack(pub, expected=formats.Kind.CKKS_PUBLIC, max_bytes=1 << 26)
    items = {i for e in header["layout"] for i in e["items"]}
    assert items <= {"params", "public_key", "galois"}
    for name, sk in keys.secret.secret_keys.items():
        raw = save_bytes(sk)
        assert raw[16:80] not in pub, name  # SEAL header excluded
    loaded = he.load_public(pub)
    assert not hasattr(loaded, "secret_keys")
    with pytest.raises(TypeError, match="must be a secret key"):
        he.decrypt_scores(loaded, b"")  # type: ignore[arg-type]


def test_paillier_public_has_no_secret(paillier_linear) -> None:
    keys = paillier_linear.keys
    pub = keys.public.to_bytes()
    p = int(keys.secret.key.p)
    assert p.to_bytes((p.bit_length() + 7) // 8, "big") not in pub
    assert len(pub) < 1024


# -- secret keys at rest -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning")
@pytest.mark.parametrize("setup", ["ckks_linear", "paillier_linear"])
def test_secret_key_file(setup: str, request: pytest.FixtureRequest, tmp_path: Path, data) -> None:
    s = request.getfixturevalue(setup)
    path = tmp_path / "client.key"
    s.keys.secret.save(path, passphrase="correct horse battery", scrypt_n=FAST_SCRYPT)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    blob = path.read_bytes()
    if setup == "paillier_linear":
        p = int(s.keys.secret.key.p)
        assert p.to_bytes((p.bit_length() + 7) // 8, "big") not in blob
    else:
        for sk in s.keys.secret.secret_keys.values():
            assert save_bytes(sk)[16:80] not in blob

    loaded = he.load_secret(path, passphrase="correct horse battery")
    assert loaded.key_id == s.keys.secret.key_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        out = s.ev.predict(he.encrypt_features(s.keys, data.X_test[:3]))
    np.testing.assert_allclose(
        he.decrypt_scores(loaded, out), he.decrypt_scores(s.keys.secret, out), atol=1e-9
    )

    with pytest.raises(CryptoError, match="wrong passphrase"):
        he.load_secret(path, passphrase="wrong horse battery")
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    path.write_bytes(bytes(tampered))
    with pytest.raises(CryptoError, match="wrong passphrase, or the file was modified"):
        he.load_secret(path, passphrase="correct horse battery")
    os.chmod(path, 0o644)
    with pytest.raises(CryptoError, match="readable by other users"):
        he.load_secret(path, passphrase="correct horse battery")


def test_secret_file_policy(ckks_linear, tmp_path: Path) -> None:
    path = tmp_path / "k"
    secret = ckks_linear.keys.secret
    with pytest.raises(UsageError, match="at least 8 characters"):
        secret.save(path, passphrase="short", scrypt_n=FAST_SCRYPT)
    with pytest.raises(UsageError, match="power of two"):
        secret.save(path, passphrase="long enough", scrypt_n=1000)
    secret.save(path, passphrase="long enough", scrypt_n=FAST_SCRYPT)
    with pytest.raises(UsageError, match="overwrite=True"):
        secret.save(path, passphrase="long enough", scrypt_n=FAST_SCRYPT)
    os.chmod(path, 0o666)
    secret.save(path, passphrase="long enough", overwrite=True, scrypt_n=FAST_SCRYPT)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "key_id" in repr(secret) and "SecretKey" in repr(secret)


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("layouts", "replicated", "Ip"), 3, "bad replicated layout"),
        (("layouts", "replicated", "Ip"), 1 << 20, r"Ip must be an int in \[1, 2048\]"),
        (("layouts", "replicated", "Hp"), 256, "exceeds the slots"),
        (("layouts", "columns", "profile"), "nope", "names no profile"),
        (("layouts", "columns", "scale_bits"), 70, "scale_bits must be an int"),
        (("n_features",), 0, "n_features must be an int"),
    ],
)
def test_malicious_requirements_refused(
    ckks_linear, path: tuple[str, ...], value: object, match: str
) -> None:
    """A client validates what a server asks it to generate."""
    reqs = ckks_linear.ev.requirements.to_dict()
    node = reqs
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(CryptoError, match=match):
        he.keygen(scheme="ckks", requirements=reqs)
