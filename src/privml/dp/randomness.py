"""Randomness of privacy mechanisms: unpredictable by default, reproducible only when asked loudly.

Every privacy-relevant random draw of private training -- the Gaussian noise of DP-SGD and
DP-FedAvg, the Poisson sampling of records and of clients, the noise of the private input
mean and of adaptive clipping -- comes from a :class:`NoiseSource`. (Query noise comes from
OpenDP's exact samplers, see :mod:`privml.dp.mechanisms`.)

Where the randomness comes from
    A secure source (:meth:`NoiseSource.fresh`, what every run uses) draws a fresh 256-bit
    master key from the operating system (``os.urandom``) when it is created. The key is never
    derived from the config, never written anywhere and never logged; the object refuses to
    be pickled. Each use gets its own stream: ``source.stream("dpsgd", round, site)`` derives
    a stream key with HMAC-SHA256 (stdlib ``hmac``) from the master key and the labels, and
    the stream's bits are the AES-256-CTR keystream of that key (``cryptography``, i.e.
    OpenSSL): a vetted cipher used as a keystream generator, nothing invented here. Knowing
    the config, the seed, the results and even every other stream's output tells an adversary
    nothing about a stream's next bits (the security of AES and HMAC).

From bits to numbers
    * Uniforms: 53-bit floats in [0, 1) from 64-bit words (two per AES block).
    * Gaussians: Box-Muller on one AES block per pair of normals. float32 (DP-SGD, whose
      gradient sums are float32): radius from a 56-bit uniform in (0, 1] (tail to 8.8 sigma),
      angle from 24 bits. float64 (DP-FedAvg, the private mean, adaptive clipping): radius
      from a 64-bit uniform (tail to 9.4 sigma), angle from 53 bits. The probability mass cut
      off in the tails is below 1e-17 per coordinate.
    * A stream is a fixed sequence: the i-th normal (or uniform) depends only on the stream's
      key and i, never on how the draws were grouped into calls (CTR mode is seekable), so a
      site's noise is the same whether it is drawn alone or batched with other sites.

What it does not protect against
    The Gaussian is computed in floating point. Floating-point implementations of continuous
    mechanisms can leak through the low-order bits of their outputs (Mironov 2012 for
    Laplace; Jin et al. 2022 for Box-Muller and other Gaussian samplers). privml's query
    mechanisms use OpenDP's exact discrete samplers for that reason; training noise is not
    hardened that way (Opacus's ``secure_mode`` needs ``torchcsprng``, absent for torch 2.13).

The reproducible switch (tests only)
    Tests that must repeat a private run exactly (e.g. comparing two engines) set the
    environment variable ``PRIVML_INSECURE_REPRODUCIBLE_NOISE=1`` (inherited by subprocesses),
    or wrap the code in ``with reproducible_noise():``. :func:`run_noise_source` then returns
    :meth:`NoiseSource.reproducible` keyed by the config's seed, warns with
    :class:`~privml.errors.InsecureOptionWarning`, and results.json's ``privacy`` says
    ``"reproducible_noise": true``: anyone who knows the seed can regenerate the noise and
    subtract it, so the epsilon reported does not hold.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from privml.errors import InsecureOptionWarning, UsageError

__all__ = [
    "ENV_VAR",
    "NoiseSource",
    "NoiseStream",
    "normal_rows",
    "reproducible_noise",
    "reproducible_noise_enabled",
    "run_noise_source",
]

#: The one switch that makes privacy noise reproducible (tests only; see the module docstring).
ENV_VAR = "PRIVML_INSECURE_REPRODUCIBLE_NOISE"

_CIPHER = "AES-256-CTR"
_BLOCK = 16
_CHUNK_BLOCKS = 256
_CHUNK_BYTES = _CHUNK_BLOCKS * _BLOCK
_PER_CHUNK = 2 * _CHUNK_BLOCKS  # normals (or uniforms) per chunk
_PIECE = 256  # chunks converted per vectorized pass (1 MiB of keystream)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_forced: contextvars.ContextVar[bool] = contextvars.ContextVar("privml_reproducible_noise")
_zeros = bytes(0)


def _zero_bytes(n: int) -> memoryview:
    """A read-only buffer of at least ``n`` zero bytes (the plaintext of the keystream)."""
    global _zeros
    if len(_zeros) < n:
        _zeros = bytes(max(n, 2 * len(_zeros), 1 << 16))
    return memoryview(_zeros)[:n]


def _keystream_into(key: bytes, first_block: int, n_blocks: int, out: memoryview) -> None:
    """Writes AES-256-CTR keystream blocks ``first_block .. first_block + n_blocks`` into ``out``.

    ``out`` must hold ``n_blocks * 16 + 15`` bytes (``cryptography``'s ``update_into``
    contract); only the first ``n_blocks * 16`` are written.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.CTR(first_block.to_bytes(16, "big"))).encryptor()
    enc.update_into(_zero_bytes(n_blocks * _BLOCK), out)


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.digest(key, b"privml-noise/1\x00" + label, "sha256")


def _chunks_into(key: bytes, first: int, count: int, out: memoryview) -> None:
    """Keystream chunks ``first .. first + count`` of ``key`` (4 KiB each) into ``out``."""
    _keystream_into(key, first * _CHUNK_BLOCKS, count * _CHUNK_BLOCKS, out)


class NoiseStream:
    """One stream of random numbers, for one use (e.g. DP-SGD noise of one site in one round).

    Get it from :meth:`NoiseSource.stream`. ``normal`` and ``random`` draw from two independent
    keystreams and each keeps its own position, so both may be used on one stream.

    Layout (fixed, so the i-th draw never depends on how draws were grouped into calls): the
    keystream is cut into chunks of 256 AES blocks. A normal chunk gives 512 normals: its 256
    blocks are read as four planes of 256 32-bit words (radius high and low bits, angle high
    and low bits), and normals ``0..255`` of the chunk are ``r cos(theta)`` of its 256 pairs,
    ``256..511`` their ``r sin(theta)``. A uniform chunk gives 512 uniforms, one per 64-bit
    word.
    """

    __slots__ = ("_key", "_label", "_kn_", "_ku_", "_pos_n", "_pos_u", "secure")

    def __init__(self, key: bytes, *, secure: bool, label: bytes = b"") -> None:
        self._key = key
        self._label = label
        self._kn_: bytes | None = None
        self._ku_: bytes | None = None
        self._pos_n = 0
        self._pos_u = 0
        self.secure = secure

    @property
    def _kn(self) -> bytes:
        if self._kn_ is None:
            self._kn_ = _derive(self._key, self._label + b"\x00normal")
        return self._kn_

    @property
    def _ku(self) -> bytes:
        if self._ku_ is None:
            self._ku_ = _derive(self._key, self._label + b"\x00uniform")
        return self._ku_

    def __repr__(self) -> str:
        kind = "secure" if self.secure else "reproducible-insecure"
        return f"NoiseStream({kind}, normals drawn={self._pos_n}, uniforms drawn={self._pos_u})"

    def __reduce__(self) -> Any:
        raise TypeError("a NoiseStream holds a secret key and cannot be pickled")

    def normal(self, n: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The next ``n`` standard normal draws, as a 1-D tensor of ``dtype``."""
        return normal_rows([self], n, dtype=dtype)[0]

    def random(self, size: int | tuple[int, ...]) -> np.ndarray:
        """The next uniforms in [0, 1) (float64, 53 random bits each) with shape ``size``.

        Has the signature of ``numpy.random.Generator.random`` for the ``size`` argument, so
        code written for a numpy generator (e.g. Poisson sampling) takes a stream unchanged.
        """
        shape = (int(size),) if isinstance(size, int | np.integer) else tuple(map(int, size))
        n = int(math.prod(shape))
        if n < 0 or any(d < 0 for d in shape):
            raise UsageError(
                f"The 'size' parameter of NoiseStream.random must be >= 0. Got {size!r}."
            )
        pos = self._pos_u
        self._pos_u = pos + n
        if n == 0:
            return np.zeros(shape)
        c0, c1 = pos // _PER_CHUNK, (pos + n - 1) // _PER_CHUNK + 1
        buf = bytearray((c1 - c0) * _CHUNK_BYTES + _BLOCK)
        _chunks_into(self._ku, c0, c1 - c0, memoryview(buf))
        words = np.frombuffer(buf, dtype="<u8", count=(c1 - c0) * _PER_CHUNK)
        u = (words >> np.uint64(11)).astype(np.float64)
        u *= 2.0**-53
        skip = pos - c0 * _PER_CHUNK
        return u[skip : skip + n].reshape(shape)


def _box_muller(buf: bytearray, chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """``[chunks, 512]`` normals from ``chunks`` keystream chunks (see :class:`NoiseStream`)."""
    w = np.frombuffer(buf, dtype="<u4", count=chunks * 4 * _CHUNK_BLOCKS)
    w = w.reshape(chunks, 4, _CHUNK_BLOCKS)
    if dtype == torch.float32:
        # u1 = hi24 * 2^-24 + (lo32 + 1) * 2^-56 in (0, 1]; theta from 24 bits
        u1 = torch.from_numpy((w[:, 0] >> np.uint32(8)).astype(np.float32)).mul_(2.0**-24)
        lo = torch.from_numpy(w[:, 1].astype(np.float32)).add_(1.0)
        u1.add_(lo, alpha=2.0**-56)
        theta = torch.from_numpy((w[:, 2] >> np.uint32(8)).astype(np.float32))
        theta.mul_(2.0 * math.pi * 2.0**-24)
    else:
        # u1 = hi32 * 2^-32 + (lo32 + 1) * 2^-64 in (0, 1]; theta from 64 bits (53 kept)
        u1 = torch.from_numpy(w[:, 0].astype(np.float64)).mul_(2.0**-32)
        u1.add_(torch.from_numpy(w[:, 1].astype(np.float64)).add_(1.0), alpha=2.0**-64)
        theta = torch.from_numpy(w[:, 2].astype(np.float64)).mul_(2.0**-32)
        theta.add_(torch.from_numpy(w[:, 3].astype(np.float64)), alpha=2.0**-64)
        theta.mul_(2.0 * math.pi)
        u1.clamp_(max=1.0)  # rounding of the 64-bit sum may reach 1 + ulp
    radius = u1.log_().mul_(-2.0).sqrt_()  # float32: u1 <= 1 by construction
    z = torch.empty(chunks, 2, _CHUNK_BLOCKS, dtype=dtype)
    torch.cos(theta, out=z[:, 0])
    torch.sin(theta, out=z[:, 1])
    z.mul_(radius[:, None, :])
    return z.reshape(chunks, _PER_CHUNK)


def normal_rows(
    streams: Sequence[NoiseStream], n: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The next ``n`` normals of every stream, as ``[len(streams), n]``, in one computation.

    The same numbers as stacking ``s.normal(n)`` for each stream. The work is done in pieces
    of at most 256 chunks (1 MiB of keystream) whatever the streams: few calls for many
    small streams, cache-sized buffers for large ones.
    """
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"normal draws are float32 or float64. Got dtype={dtype}.")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise UsageError(f"The 'n' parameter of normal_rows must be an int >= 0. Got {n!r}.")
    n = int(n)
    out = torch.empty(len(streams), n, dtype=dtype)
    if not streams or n == 0:
        return out
    # (row, stream, first chunk, chunk count), cut so that no piece exceeds _PIECE chunks
    pending: list[tuple[int, NoiseStream, int, int]] = []
    filled = 0
    needed = sum((s._pos_n + n - 1) // _PER_CHUNK + 1 - s._pos_n // _PER_CHUNK for s in streams)
    buf = bytearray(min(_PIECE, needed) * _CHUNK_BYTES + _BLOCK)
    view = memoryview(buf)

    def flush() -> None:
        nonlocal filled
        z = _box_muller(buf, filled, dtype)
        at = 0
        for row, s, c0, nc in pending:
            lo = max(c0 * _PER_CHUNK, s._pos_n)
            hi = min((c0 + nc) * _PER_CHUNK, s._pos_n + n)
            base = at * _PER_CHUNK - c0 * _PER_CHUNK
            out[row, lo - s._pos_n : hi - s._pos_n] = z.view(-1)[base + lo : base + hi]
            at += nc
        pending.clear()
        filled = 0

    for row, s in enumerate(streams):
        c = s._pos_n // _PER_CHUNK
        c_end = (s._pos_n + n - 1) // _PER_CHUNK + 1
        while c < c_end:
            k = min(c_end - c, _PIECE - filled)
            _chunks_into(
                s._kn, c, k, view[filled * _CHUNK_BYTES : (filled + k) * _CHUNK_BYTES + _BLOCK]
            )
            pending.append((row, s, c, k))
            filled += k
            c += k
            if filled == _PIECE:
                flush()
    if filled:
        flush()
    for s in streams:
        s._pos_n += n
    return out


class NoiseSource:
    """Where a run's privacy-relevant randomness comes from. Create one per run.

    Use :meth:`fresh` (a fresh OS-random key) for anything released; :meth:`reproducible`
    only in tests, through :func:`run_noise_source` and the switch. ``stream(*labels)``
    returns a new :class:`NoiseStream` for each distinct label tuple (same labels, same
    stream, starting from its first draw).
    """

    __slots__ = ("_key", "secure", "seed")

    def __init__(self, key: bytes, *, secure: bool, seed: int | None = None) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise UsageError("A NoiseSource needs a 32-byte key.")
        self._key = key
        self.secure = secure
        self.seed = seed

    @classmethod
    def fresh(cls) -> NoiseSource:
        """A secure source keyed by 32 fresh bytes from the operating system's CSPRNG."""
        return cls(os.urandom(32), secure=True)

    @classmethod
    def reproducible(cls, seed: int) -> NoiseSource:
        """INSECURE: a source whose every draw is a function of ``seed`` (tests only; warns)."""
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TypeError(
                f"The 'seed' parameter of NoiseSource.reproducible must be an int. Got {seed!r}."
            )
        warnings.warn(
            f"privacy noise and sampling are reproducible from the seed {int(seed)} "
            f"({ENV_VAR} or reproducible_noise()): anyone who knows the seed can regenerate "
            "and subtract the noise, so no epsilon reported for this run holds. For tests only.",
            InsecureOptionWarning,
            stacklevel=2,
        )
        key = hashlib.sha256(
            b"privml insecure reproducible noise/1\x00" + str(int(seed)).encode()
        ).digest()
        return cls(key, secure=False, seed=int(seed))

    def __repr__(self) -> str:
        if self.secure:
            return "NoiseSource(secure: fresh OS-random key, AES-256-CTR)"
        return f"NoiseSource(INSECURE reproducible from seed {self.seed})"

    def __reduce__(self) -> Any:
        raise TypeError("a NoiseSource holds a secret key and cannot be pickled")

    def stream(self, *labels: str | int) -> NoiseStream:
        """The stream for ``labels`` (e.g. ``("dpsgd", round, site)``); str and int labels."""
        for x in labels:
            if isinstance(x, bool) or not isinstance(x, str | int | np.integer):
                raise TypeError(f"NoiseSource.stream labels must be str or int. Got {x!r}.")
        blob = json.dumps([x if isinstance(x, str) else int(x) for x in labels]).encode()
        return NoiseStream(self._key, secure=self.secure, label=b"stream\x00" + blob)

    def describe(self) -> dict[str, Any]:
        """What results.json says about this source (never the key)."""
        if self.secure:
            return {
                "kind": "csprng",
                "reproducible": False,
                "generator": f"{_CIPHER} keystream (cryptography/OpenSSL) under a 256-bit key "
                "drawn from os.urandom for this run, never derived from the config and never "
                "stored; one HMAC-SHA256-derived stream per use",
                "gaussian": "Box-Muller in floating point (not hardened against floating-point "
                "attacks, Mironov 2012; Jin et al. 2022)",
            }
        return {
            "kind": "reproducible-insecure",
            "reproducible": True,
            "generator": f"{_CIPHER} keystream under a key derived from the seed {self.seed} "
            f"({ENV_VAR}); anyone who knows the seed can regenerate the noise",
            "gaussian": "Box-Muller in floating point",
        }


def reproducible_noise_enabled() -> bool:
    """Whether the reproducible-noise switch is on (context manager, else the environment).

    Raises:
        UsageError: the environment variable holds something other than 1/true/yes/on or
            0/false/no/off (a typo must not silently pick one of the two).
    """
    forced = _forced.get(None)
    if forced is not None:
        return forced
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UsageError(
        f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not understood; set it to 1 (reproducible, "
        "INSECURE noise for tests) or unset it."
    )


@contextmanager
def reproducible_noise(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`run_noise_source` makes reproducible (INSECURE) sources.

    The Python twin of ``PRIVML_INSECURE_REPRODUCIBLE_NOISE=1``, for tests; ``enabled=False``
    forces secure noise inside the block whatever the environment says.
    """
    token = _forced.set(bool(enabled))
    try:
        yield
    finally:
        _forced.reset(token)


def run_noise_source(seed: int) -> NoiseSource:
    """The noise source of one run: secure, unless the reproducible switch is on.

    Args:
        seed: the config's training seed; used only when the switch is on (then with an
            :class:`~privml.errors.InsecureOptionWarning`).
    """
    if reproducible_noise_enabled():
        return NoiseSource.reproducible(seed)
    return NoiseSource.fresh()
