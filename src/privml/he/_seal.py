"""Thin helpers over Microsoft SEAL as bundled with TenSEAL (``tenseal.sealapi``).

TenSEAL's high-level ``Context`` cannot generate Galois keys for chosen rotation steps (it makes
all of them: 35 MB at N = 8192), so the CKKS backend drives SEAL through the bindings TenSEAL
ships. Those bindings serialize only to file paths; :func:`save_bytes` and :func:`load_bytes`
go through an anonymous in-memory file (``memfd_create``), so no key or ciphertext touches a disk.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from tenseal import sealapi as seal

from privml.errors import CryptoError

#: HomomorphicEncryption.org security standard (Albrecht et al. 2018, table for ternary secrets):
#: the largest total coefficient-modulus bit count for 128-bit classical security, by ring degree.
HE_STANDARD_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: SEAL primes are at most 60 bits.
MAX_PRIME_BITS = 60
MIN_PRIME_BITS = 17


class _Scratch(threading.local):
    fd: int = -1
    path: str = ""
    pid: int = -1


_scratch = _Scratch()


def _scratch_file() -> tuple[int, str]:
    """A per-thread, per-process anonymous in-memory file and a path SEAL can open."""
    if _scratch.fd >= 0 and _scratch.pid == os.getpid():
        return _scratch.fd, _scratch.path
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("privml-he", getattr(os, "MFD_CLOEXEC", 0))
        path = f"/proc/self/fd/{fd}"
    else:  # pragma: no cover - non-Linux fallback: an unlinked file in a private temp dir
        fd, path = tempfile.mkstemp(prefix="privml-he-")
    _scratch.fd, _scratch.path, _scratch.pid = fd, path, os.getpid()
    return fd, path


def save_bytes(obj: Any) -> bytes:
    """Serialize a SEAL object (ciphertext, key, parameters) with SEAL's own format."""
    fd, path = _scratch_file()
    obj.save(path)
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, 0)
    return data


def load_bytes(obj: Any, data: bytes, context: Any | None, what: str) -> Any:
    """Load SEAL-serialized ``data`` into ``obj``; SEAL validates it against ``context``.

    Any failure (truncated, corrupted, foreign parameters) becomes a :class:`CryptoError`.
    """
    fd, path = _scratch_file()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    try:
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    except (RuntimeError, ValueError, TypeError, OSError, MemoryError) as exc:
        raise CryptoError(
            f"invalid {what}: SEAL rejected it ({exc}); it is corrupted, truncated or was made "
            "with other encryption parameters"
        ) from None
    finally:
        os.ftruncate(fd, 0)
    return obj


def check_security(poly_modulus_degree: int, coeff_bits: Iterable[int], *, what: str) -> None:
    """Refuse CKKS parameters below 128-bit security (HomomorphicEncryption.org standard)."""
    bits = list(coeff_bits)
    n = poly_modulus_degree
    if isinstance(n, bool) or not isinstance(n, int) or n not in HE_STANDARD_128:
        raise CryptoError(
            f"The 'poly_modulus_degree' of {what} must be one of {sorted(HE_STANDARD_128)}. "
            f"Got {n!r} instead."
        )
    if len(bits) < 2:
        raise CryptoError(
            f"The coefficient modulus of {what} needs at least 2 primes (data + special). "
            f"Got {bits} instead."
        )
    for b in bits:
        if (
            isinstance(b, bool)
            or not isinstance(b, int)
            or not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS
        ):
            raise CryptoError(
                f"Each coefficient-modulus prime of {what} must have {MIN_PRIME_BITS} to "
                f"{MAX_PRIME_BITS} bits. Got {bits} instead."
            )
    total = sum(bits)
    limit = HE_STANDARD_128[n]
    if total > limit:
        raise CryptoError(
            f"Insecure CKKS parameters for {what}: a {total}-bit coefficient modulus at "
            f"poly_modulus_degree {n} is below 128-bit security (the HomomorphicEncryption.org "
            f"standard allows at most {limit} bits at N={n}). Use fewer or smaller primes, or "
            f"N={2 * n} (at most {HE_STANDARD_128.get(2 * n, 'n/a')} bits)."
        )


def make_context(poly_modulus_degree: int, coeff_bits: Iterable[int], *, what: str) -> Any:
    """Build a SEAL CKKS context after the security check; SEAL re-checks at 128 bits."""
    bits = list(coeff_bits)
    check_security(poly_modulus_degree, bits, what=what)
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(poly_modulus_degree, bits))
    except (RuntimeError, ValueError) as exc:
        raise CryptoError(f"cannot build CKKS parameters for {what} from {bits}: {exc}") from None
    return context_from_parms(parms, what=what)


def context_from_parms(parms: Any, *, what: str) -> Any:
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise CryptoError(
            f"SEAL refused the parameters of {what} at 128-bit security: "
            f"{ctx.parameters_error_message()}"
        )
    return ctx


def parms_from_bytes(data: bytes, *, what: str) -> Any:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    load_bytes(parms, data, None, f"encryption parameters of {what}")
    if parms.scheme() != seal.SCHEME_TYPE.CKKS:
        raise CryptoError(f"the encryption parameters of {what} are not CKKS parameters")
    return parms


def coeff_bits_of(parms: Any) -> list[int]:
    return [int(m.bit_count()) for m in parms.coeff_modulus()]


def galois_elements(context: Any, steps: Iterable[int]) -> list[int]:
    """Galois elements for left-rotation ``steps`` (SEAL's own mapping)."""
    tool = context.key_context_data().galois_tool()
    return [int(e) for e in tool.get_elts_from_steps(list(steps))]


def data_primes(context: Any) -> list[int]:
    """The data-level primes of ``context`` (the special prime excluded), in chain order."""
    return [int(m.value()) for m in context.first_context_data().parms().coeff_modulus()]


def parms_ids(context: Any) -> list[Any]:
    """parms_id of each data level, from the top (all data primes) to the last (one prime)."""
    out = []
    cd = context.first_context_data()
    while cd is not None:
        out.append(cd.parms_id())
        cd = cd.next_context_data()
    return out


# --------------------------------------------------------------------------------------------
# SEAL's own serialization of a ciphertext in coefficient form
# --------------------------------------------------------------------------------------------

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, 0, size


@functools.lru_cache(maxsize=1)
def seal_version() -> tuple[int, int]:
    """(major, minor) of the SEAL serialization format the bundled SEAL writes."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    _, _, major, minor, _, _, _ = _SEAL_HEADER.unpack_from(save_bytes(parms))
    return int(major), int(minor)


def _seal_header(body_len: int) -> bytes:
    major, minor = seal_version()
    return _SEAL_HEADER.pack(_SEAL_MAGIC, 16, major, minor, 0, 0, 16 + body_len)


def coefficient_ciphertext(context: Any, parms_id: Any, polys: np.ndarray, scale: float) -> Any:
    """A SEAL ciphertext whose components are ``polys`` in coefficient (non-NTT) form.

    ``polys`` has shape ``(size, L, N)``: residues modulo the ``L`` primes of the level named by
    ``parms_id``. The object is built through SEAL's documented serialization (uncompressed:
    parms_id, NTT flag, size, degree, modulus count, scale, correction factor, then the data
    array) and loaded back by SEAL, which validates every residue against its prime. Used to
    add polynomials chosen coefficient by coefficient (the answer masks of
    :mod:`privml.he.protect`), which the Python bindings offer no other way to build.
    """
    arr = np.ascontiguousarray(polys, dtype="<u8")
    size, n_primes, n = arr.shape
    body = struct.pack("<4Q", *[int(v) for v in parms_id])
    body += struct.pack("<B", 0)  # not in NTT form
    body += struct.pack("<QQQdQ", size, n, n_primes, float(scale), 1)
    data = struct.pack("<Q", arr.size) + arr.tobytes()
    body += _seal_header(len(data)) + data
    return load_bytes(seal.Ciphertext(), _seal_header(len(body)) + body, context, "answer mask")
