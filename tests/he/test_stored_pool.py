"""Precomputed Paillier randomness on disk: sealed like the secret key, each element handed out
once, across processes that race for it; copies, rollbacks and tampering are refused.

The attack: an observer of two ciphertexts that share their randomness ``r**n`` links them and
learns the difference of their plaintexts, ``c1 / c2 = 1 + n (m1 - m2) mod n**2``. The tests run
that observer over everything racing client processes encrypted, and over a deliberate reuse
(where it must succeed, or the check proves nothing).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
import pytest

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.he.paillier import PaillierRandomnessPool, PaillierSecretKey
from privml.he.stored_pool import StoredPaillierPool

PASS = "pool test passphrase"


@pytest.fixture(autouse=True)
def _quiet_2048() -> None:
    warnings.simplefilter("ignore", InsecureOptionWarning)


def linked(public: Any, c1: int, c2: int) -> int | None:
    """The observer's test: ``m1 - m2`` (mod n) if ``c1`` and ``c2`` share their randomness."""
    n, nsq = public.key.n, public.key.nsquare
    x = int(gmpy2.mpz(c1) * gmpy2.invert(c2, nsq) % nsq)
    return (x - 1) // n if (x - 1) % n == 0 else None


def _sealed(secret: PaillierSecretKey) -> bytes:
    return secret.to_encrypted_bytes(passphrase=PASS, scrypt_n=1 << 14)


def _claimer(path: str, sealed: bytes, chunk: int, start: Any, out: Any) -> None:
    """A client process: claims ``chunk`` elements at a time until the pool is empty."""
    warnings.simplefilter("ignore", InsecureOptionWarning)
    secret = PaillierSecretKey.from_encrypted_bytes(sealed, passphrase=PASS)
    pool = StoredPaillierPool(path, secret)
    start.wait(timeout=120)
    got: list[int] = []
    while True:
        claim = pool.claim(chunk)
        items = [claim.take() for _ in range(len(claim))]
        if not items:
            break
        got.extend(items)
    out.put(got)


def _encryptor(path: str, sealed: bytes, X: np.ndarray, start: Any, out: Any) -> None:
    """A client process encrypting one patient per request, randomness claimed from the pool
    (what ``privml predict`` does); reports the ciphertexts an observer would see."""
    warnings.simplefilter("ignore", InsecureOptionWarning)
    secret = PaillierSecretKey.from_encrypted_bytes(sealed, passphrase=PASS)
    pool = StoredPaillierPool(path, secret)
    start.wait(timeout=120)
    cts: list[int] = []
    misses = 0
    for x in X:
        claim = pool.claim(X.shape[1])
        cts.extend(he.encrypt_features(secret.public, x, pool=claim).cts)
        misses += claim.misses
    out.put((cts, misses))


def _run(target: Any, args_list: list[tuple[Any, ...]]) -> list[Any]:
    ctx = mp.get_context("fork")  # separate processes, like concurrent `privml predict` runs
    start = ctx.Barrier(len(args_list))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_prepare_and_claim(paillier_small, tmp_path: Path, small_data) -> None:
    s = paillier_small
    path = tmp_path / "keys" / "pool.bin"
    pool = StoredPaillierPool(path, s.keys.secret)
    assert pool.available() == 0 and len(pool.claim(3)) == 0  # no file: nothing to claim
    report = pool.prepare(12)
    assert report.made == 12 and report.available == 12 and report.cpu_s > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pool.prepare(10).made == 0  # already there
    claim = pool.claim(6)
    assert len(claim) == 6 and pool.available() == 6
    elems = [claim.take() for _ in range(6)]
    assert s.keys.secret.decrypt_ints(elems) == [0] * 6  # encryptions of zero
    assert len(set(elems)) == 6
    # they encrypt as well as fresh randomness: the model's scores come out right
    x = small_data.X_test[0]
    ct = he.encrypt_features(s.keys, x, pool=pool.claim(6))
    np.testing.assert_allclose(
        he.decrypt_scores(s.keys.secret, s.ev.predict(ct)),
        he.decrypt_scores(s.keys.secret, s.ev.predict(he.encrypt_features(s.keys, x))),
        atol=1e-5,
    )
    assert pool.available() == 0
    short = pool.claim(4)  # empty: computed on the spot, counted
    he.encrypt_features(s.keys, x[:6], pool=short)
    assert short.misses == 6
    with pytest.raises(UsageError):
        pool.claim(-1)
    # nothing of the elements is in the file in the clear
    pool.prepare(3)
    raw = path.read_bytes()
    last = pool.claim(3)
    for e in [last.take() for _ in range(3)]:
        assert e.to_bytes(s.keys.public.ciphertext_bytes, "big") not in raw


def test_racing_processes_never_get_the_same_element(paillier_small, tmp_path: Path) -> None:
    s = paillier_small
    path = tmp_path / "pool.bin"
    StoredPaillierPool(path, s.keys.secret).prepare(90)
    sealed = _sealed(s.keys.secret)
    results = _run(_claimer, [(str(path), sealed, chunk) for chunk in (1, 2, 3, 5)])
    everything = [e for r in results for e in r]
    assert len(everything) == 90, [len(r) for r in results]
    assert len(set(everything)) == 90  # each element went to exactly one claim
    assert sum(1 for r in results if r) >= 2  # the processes did race for it
    assert s.keys.secret.decrypt_ints(everything[:5]) == [0] * 5


def test_no_two_ciphertexts_from_racing_clients_can_be_linked(
    paillier_small, tmp_path: Path, small_data
) -> None:
    """The observer who sees every ciphertext of two racing clients links none of them; the
    same observer links a deliberate reuse and reads ``m1 - m2`` from it."""
    s = paillier_small
    path = tmp_path / "pool.bin"
    X = small_data.X_test[:6]
    StoredPaillierPool(path, s.keys.secret).prepare(2 * X.size)
    sealed = _sealed(s.keys.secret)
    results = _run(_encryptor, [(str(path), sealed, X), (str(path), sealed, X)])
    assert [m for _, m in results] == [0, 0]  # every ciphertext from the pool
    cts = [c for r, _ in results for c in r]
    assert len(cts) == 2 * X.size
    pub = s.keys.public
    hits = [(i, j) for i in range(len(cts)) for j in range(i + 1, len(cts))
            if linked(pub, cts[i], cts[j]) is not None]
    assert hits == []
    # the control: one element used twice is linked, and gives the difference away
    e = StoredPaillierPool(path, s.keys.secret)
    e.prepare(1)
    elem = e.claim(1).take()
    reused = PaillierRandomnessPool.handover(pub, [elem, elem])
    c1, c2 = pub.encrypt_ints([1234, 1000], reused)
    assert linked(pub, c1, c2) == 234


def test_a_claim_is_gone_even_if_the_process_dies(paillier_small, tmp_path: Path) -> None:
    s = paillier_small
    path = tmp_path / "pool.bin"
    pool = StoredPaillierPool(path, s.keys.secret)
    pool.prepare(8)
    pid = os.fork()
    if pid == 0:  # claims, then dies before using anything
        StoredPaillierPool(path, s.keys.secret).claim(5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert pool.available() == 3


def test_copies_rollbacks_and_tampering_are_refused(paillier_small, tmp_path: Path) -> None:
    s = paillier_small
    path = tmp_path / "pool.bin"
    pool = StoredPaillierPool(path, s.keys.secret)
    pool.prepare(6)
    backup = tmp_path / "backup.bin"
    shutil.copy2(path, backup)
    pool.claim(2)
    # a backup restored over the pool would bring back used elements: refused
    os.replace(backup, path)
    with pytest.raises(CryptoError, match="copied or restored"):
        pool.claim(1)
    path.unlink()
    pool.prepare(6)
    pool.claim(2)
    # the cursor moved back by hand: the used records were erased
    with open(path, "r+b") as fh:
        fh.seek(16)
        fh.write((0).to_bytes(8, "big"))
    with pytest.raises(CryptoError, match="fails authentication"):
        pool.claim(1)
    path.unlink()
    pool.prepare(3)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1  # one bit of the last record
    path.write_bytes(bytes(raw))
    os.chmod(path, 0o600)
    with pytest.raises(CryptoError, match="fails authentication"):
        pool.claim(3)
    # another key's pool, and a pool others can read
    path.unlink()
    pool.prepare(2)
    other = he.keygen(scheme="paillier", requirements=s.ev.requirements, key_bits=2048)
    with pytest.raises(CryptoError, match="another key"):
        StoredPaillierPool(path, other.secret).claim(1)  # type: ignore[arg-type]
    os.chmod(path, 0o640)
    with pytest.raises(CryptoError, match="readable by other users"):
        pool.claim(1)
