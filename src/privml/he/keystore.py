"""Secret keys at rest: passphrase-encrypted (scrypt + AES-256-GCM), written with mode 0600.

A secret key never leaves memory unencrypted: :func:`seal_secret` derives a 256-bit key from
the passphrase with scrypt (RFC 7914; memory-hard, so guessing costs memory as well as time)
and encrypts the key material with AES-256-GCM (authenticated: a wrong passphrase or a modified
file is detected, not silently decrypted to garbage). The envelope header (algorithm, scrypt
cost, salt, nonce, key id) is bound to the ciphertext as associated data.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from privml.errors import CryptoError, UsageError
from privml.he import formats

#: scrypt cost N (2**17, r=8, p=1: OWASP's recommendation; 128 MiB of memory, ~0.3 s).
DEFAULT_SCRYPT_N = 1 << 17
MIN_SCRYPT_N = 1 << 14
_SCRYPT_R = 8
_SCRYPT_P = 1
MIN_PASSPHRASE_CHARS = 8


def _check_passphrase(passphrase: object) -> bytes:
    if not isinstance(passphrase, str | bytes):
        raise TypeError(
            f"The 'passphrase' parameter must be a str. Got {type(passphrase).__name__} instead."
        )
    raw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if len(raw) < MIN_PASSPHRASE_CHARS:
        raise UsageError(
            f"The 'passphrase' parameter must have at least {MIN_PASSPHRASE_CHARS} characters. "
            f"Got {len(raw)} instead."
        )
    return raw


def _kdf(passphrase: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=_SCRYPT_R, p=_SCRYPT_P).derive(passphrase)


def derive_subkey(secret_material: bytes, *, salt: bytes, info: bytes) -> bytes:
    """A 256-bit AES key for data as sensitive as a secret key, derived from that key's own
    material with HKDF-SHA256 (RFC 5869): opening such data takes the secret key, which is
    sealed under the passphrase (scrypt + AES-256-GCM), so it has the secret key's protection
    without a second scrypt derivation. ``salt``: random, per file; ``info``: what it is for."""
    if len(secret_material) < 32:
        raise CryptoError("secret key material too short to derive a key from")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(
        secret_material
    )


def seal_secret(
    payload: bytes,
    *,
    passphrase: str,
    meta: dict[str, Any],
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> bytes:
    """Encrypt secret key material under ``passphrase``; ``meta`` (public) travels in the header."""
    raw = _check_passphrase(passphrase)
    if isinstance(scrypt_n, bool) or not isinstance(scrypt_n, int):
        raise TypeError(f"The 'scrypt_n' parameter must be an int. Got {scrypt_n!r} instead.")
    if scrypt_n < MIN_SCRYPT_N or scrypt_n & (scrypt_n - 1):
        raise UsageError(
            f"The 'scrypt_n' parameter must be a power of two >= {MIN_SCRYPT_N}. "
            f"Got {scrypt_n} instead."
        )
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    header = {
        "kdf": {
            "name": "scrypt",
            "n": scrypt_n,
            "r": _SCRYPT_R,
            "p": _SCRYPT_P,
            "salt": salt.hex(),
        },
        "aead": {"name": "AES-256-GCM", "nonce": nonce.hex()},
        "meta": meta,
    }
    aad = formats.pack(formats.Kind.SECRET_KEY, header, [])
    ct = AESGCM(_kdf(raw, salt, scrypt_n)).encrypt(nonce, payload, aad)
    return formats.pack(formats.Kind.SECRET_KEY, header, [ct])


def open_secret(blob: bytes, *, passphrase: str) -> tuple[dict[str, Any], bytes]:
    """Decrypt a blob made by :func:`seal_secret`; return ``(meta, payload)``.

    A wrong passphrase or a modified blob raises :class:`CryptoError`.
    """
    raw = _check_passphrase(passphrase)
    _, header, parts = formats.unpack(blob, expected=formats.Kind.SECRET_KEY)
    what = "secret key file"
    kdf = formats.require(header, "kdf", dict, what)
    aead = formats.require(header, "aead", dict, what)
    meta = formats.require(header, "meta", dict, what)
    if kdf.get("name") != "scrypt" or aead.get("name") != "AES-256-GCM" or len(parts) != 1:
        raise CryptoError("unsupported secret key file: expected scrypt + AES-256-GCM")
    try:
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        salt, nonce = bytes.fromhex(kdf["salt"]), bytes.fromhex(aead["nonce"])
    except (KeyError, TypeError, ValueError):
        raise CryptoError("malformed secret key file header") from None
    if (r, p) != (_SCRYPT_R, _SCRYPT_P) or not MIN_SCRYPT_N <= n <= 1 << 22 or len(nonce) != 12:
        raise CryptoError("unsupported scrypt or AES-GCM parameters in the secret key file")
    clean = {k: v for k, v in header.items() if k != "parts"}
    aad = formats.pack(formats.Kind.SECRET_KEY, clean, [])
    try:
        payload = AESGCM(_kdf(raw, salt, n)).decrypt(nonce, parts[0], aad)
    except InvalidTag:
        raise CryptoError(
            "cannot decrypt the secret key: wrong passphrase, or the file was modified"
        ) from None
    return meta, payload


def peek_meta(blob: bytes) -> dict[str, Any]:
    """The public metadata of an encrypted secret key blob, without decrypting it."""
    _, header, _ = formats.unpack(blob, expected=formats.Kind.SECRET_KEY)
    meta = formats.require(header, "meta", dict, "secret key file")
    return dict(meta)


def write_private_file(path: str | os.PathLike[str], data: bytes, *, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` with permissions 0600 (owner read/write only)."""
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{p} already exists; pass overwrite=True to replace the secret key file"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask and ignored for existing files
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd >= 0:
            os.close(fd)
    return p


def read_private_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"secret key file {p} does not exist")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise CryptoError(
            f"secret key file {p} is readable by other users (mode {mode:o}); "
            f"run `chmod 600 {p}` and rotate the key if others may have read it"
        )
    return p.read_bytes()


class SealedSecretFile:
    """Mixin for secret keys: ``save`` writes ``to_encrypted_bytes`` to a 0600 file.

    The class provides ``to_encrypted_bytes(*, passphrase, scrypt_n) -> bytes``.
    """

    def to_encrypted_bytes(self, *, passphrase: str, scrypt_n: int = DEFAULT_SCRYPT_N) -> bytes:
        raise TypeError(f"{type(self).__name__} does not define to_encrypted_bytes")

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: str,
        overwrite: bool = False,
        scrypt_n: int = DEFAULT_SCRYPT_N,
    ) -> None:
        """Write the secret key to ``path``, encrypted under ``passphrase``, file mode 0600."""
        write_private_file(
            path,
            self.to_encrypted_bytes(passphrase=passphrase, scrypt_n=scrypt_n),
            overwrite=overwrite,
        )
