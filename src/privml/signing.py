"""Signed model artifacts: Ed25519 signatures (``cryptography``) over a model's weights and
metadata, checked by every loader.

What is signed: a canonical JSON statement naming the SHA-256 of ``model.json`` (architecture,
encoding, task, config hash, and itself the SHA-256 of the weights) and of ``model.pt`` (the
weights), and the signing key's id. It is written next to them as ``model.sig`` with the
signature and the public key. Changing one byte of either file, of the statement, or signing
with another key makes verification fail, and :func:`privml.artifacts.load_model` then refuses
the model with :class:`~privml.errors.SignatureError` (``privml`` exits with code 4). An
unsigned model is refused the same way.

Keys (see docs/security.md):

* The **signing key** is generated once per deployment (:func:`generate_signing_key`,
  ``privml keygen``, or automatically the first time a model is saved) at
  ``$PRIVML_SIGNING_KEY`` or else ``$XDG_CONFIG_HOME/privml/signing-key.pem``
  (``~/.config/privml/signing-key.pem``), PKCS#8 PEM, file mode 0600, optionally encrypted
  with the passphrase in ``$PRIVML_SIGNING_PASSPHRASE``. It never goes into a run folder:
  signing refuses a key stored inside the folder it signs, and loading refuses a key file
  readable by group or others (as ssh does).
* The **public key** is written beside it (``signing-key.pub``) and embedded in every
  ``model.sig``. A signature only proves origin when checked against a key the verifier
  trusts: loaders trust the keys listed in ``$PRIVML_TRUSTED_KEYS`` (public key files,
  separated by ``os.pathsep``), else the deployment's own key; ``privml verify DIR
  --public-key FILE`` pins one explicitly. A folder signed by any other key is refused,
  even when its embedded key verifies its own signature (anyone can sign with a fresh key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privml.errors import CryptoError, SignatureError, UsageError

__all__ = [
    "SIGNATURE_FILE",
    "SIGNATURE_FORMAT",
    "SIGNED_FILES",
    "Verified",
    "default_key_path",
    "deployment_key",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "sign_model_dir",
    "trusted_keys",
    "verify_model_dir",
]

SIGNATURE_FORMAT = "privml-signature/1"
SIGNATURE_FILE = "model.sig"
SIGNED_FILES: tuple[str, ...] = ("model.json", "model.pt")
_PUB_SUFFIX = ".pub"
_MAX_SIG_BYTES = 64 * 1024
_SIG_FIELDS = frozenset({"format", "algorithm", "key_id", "public_key", "files", "signature"})


def default_key_path() -> Path:
    """The deployment's signing key: ``$PRIVML_SIGNING_KEY`` or the user config folder."""
    env = os.environ.get("PRIVML_SIGNING_KEY")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "privml" / "signing-key.pem"


def public_key_path(key_path: Path) -> Path:
    """Where the public key of ``key_path`` is written (``signing-key.pub``)."""
    return key_path.with_suffix(_PUB_SUFFIX)


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(_raw(pub)).hexdigest()[:16]


def _passphrase(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None:
        env = os.environ.get("PRIVML_SIGNING_PASSPHRASE")
        return env.encode() if env else None
    return passphrase.encode() if isinstance(passphrase, str) else passphrase


def _write_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` and ``mode`` atomically; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and fails if the key exists: no race, no overwrite
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def generate_signing_key(
    path: str | Path | None = None,
    *,
    passphrase: str | bytes | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create the deployment's Ed25519 signing key (mode 0600) and its public key file.

    Args:
        path: where to write the private key (default :func:`default_key_path`).
        passphrase: encrypt the key with it (default ``$PRIVML_SIGNING_PASSPHRASE``; none).
        overwrite: replace an existing key (models signed with the old key will no longer
            verify against the new one unless the old public key stays trusted).

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        UsageError: a key exists at ``path`` and ``overwrite`` is False.
    """
    p = Path(path).expanduser() if path is not None else default_key_path()
    if p.exists() and not overwrite:
        raise UsageError(
            f"a signing key already exists at {str(p)!r}; keep it (models it signed verify "
            "only against it) or pass overwrite=True / --force to replace it"
        )
    if overwrite and p.exists():
        p.unlink()
    _create_key(p, _passphrase(passphrase))
    return p, public_key_path(p)


def _create_key(p: Path, pw: bytes | None) -> None:
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(pw) if pw else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    if not _write_exclusive(p, pem, 0o600):
        return  # another process created it first: keep theirs
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = public_key_path(p)
    if pub_path.exists():
        pub_path.unlink()
    _write_exclusive(pub_path, pub, 0o644)


def load_signing_key(
    path: str | Path | None = None, *, passphrase: str | bytes | None = None
) -> Ed25519PrivateKey:
    """Read the Ed25519 signing key; refuses a key file readable by group or others.

    Raises:
        CryptoError: missing, unprotected, wrong passphrase, or not an Ed25519 key.
    """
    p = Path(path).expanduser() if path is not None else default_key_path()
    if not p.is_file():
        raise CryptoError(
            f"no signing key at {str(p)!r}; create one with `privml keygen` (or set "
            "PRIVML_SIGNING_KEY to an existing key)"
        )
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise CryptoError(
            f"the signing key {str(p)!r} is readable by others (mode {mode:o}); run "
            f"`chmod 600 {p}` -- a private key must be readable by its owner only"
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=_passphrase(passphrase))
    except TypeError:
        raise CryptoError(
            f"the signing key {str(p)!r} is encrypted: set PRIVML_SIGNING_PASSPHRASE"
        ) from None
    except ValueError as exc:
        raise CryptoError(f"cannot read the signing key {str(p)!r}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"{str(p)!r} is not an Ed25519 private key")
    return key


_KEY_CACHE: dict[tuple[str, int, int, int, bytes | None], Ed25519PrivateKey] = {}


def deployment_key(
    key_path: str | Path | None = None, *, create: bool = True
) -> Ed25519PrivateKey:
    """The deployment's signing key (:func:`load_signing_key`), created on first use when
    ``create``; kept in memory while its file is unchanged, so signing every round of a run
    reads (and decrypts) it once.

    Raises:
        CryptoError: as :func:`load_signing_key`.
    """
    kp = Path(key_path).expanduser() if key_path is not None else default_key_path()
    pw = _passphrase(None)
    if create and not kp.exists():
        _create_key(kp, pw)
    try:
        st = kp.stat()
    except OSError:
        return load_signing_key(kp)  # raises the documented CryptoError
    ident = (str(kp.resolve()), st.st_ino, st.st_mtime_ns, st.st_size, pw)
    key = _KEY_CACHE.get(ident)
    if key is None:
        key = load_signing_key(kp)
        _KEY_CACHE.clear()
        _KEY_CACHE[ident] = key
    return key


def load_public_key(source: str | Path | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes, or 32 raw bytes.

    Raises:
        CryptoError: unreadable or not an Ed25519 public key.
    """
    try:
        if isinstance(source, bytes):
            data = source
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise CryptoError(f"public key file {str(path)!r} not found")
            data = path.read_bytes()
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"not a public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError("the public key is not an Ed25519 key")
    return key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _statement(files: dict[str, str], kid: str) -> bytes:
    body = {"format": SIGNATURE_FORMAT, "algorithm": "Ed25519", "key_id": kid, "files": files}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _inside(child: Path, parent: Path) -> bool:
    try:
        from privml.safe_io import resolve_path

        resolve_path(child).relative_to(resolve_path(parent))
    except ValueError:
        return False
    return True


def sign_model_dir(
    folder: str | Path,
    key_path: str | Path | None = None,
    *,
    passphrase: str | bytes | None = None,
    create: bool = True,
) -> dict[str, Any]:
    """Sign ``folder``'s ``model.json`` and ``model.pt``; write ``model.sig``.

    Args:
        folder: a folder holding the model files.
        key_path: the signing key (default :func:`default_key_path`).
        passphrase: the key's passphrase (default ``$PRIVML_SIGNING_PASSPHRASE``).
        create: generate the deployment key if none exists yet (mode 0600).

    Returns:
        The contents written to ``model.sig``.

    Raises:
        DataError-like SignatureError: model files missing.
        CryptoError: key problems, or a key stored inside ``folder``.
    """
    d = Path(folder)
    kp = Path(key_path).expanduser() if key_path is not None else default_key_path()
    if _inside(kp, d):
        raise CryptoError(
            f"the signing key {str(kp)!r} lies inside the folder being signed; keep it outside "
            "every run folder (default ~/.config/privml/signing-key.pem)"
        )
    missing = [n for n in SIGNED_FILES if not (d / n).is_file()]
    if missing:
        raise SignatureError(f"cannot sign {str(d)!r}: {', '.join(missing)} not found")
    if create and not kp.exists():
        _create_key(kp, _passphrase(passphrase))
    key = load_signing_key(kp, passphrase=passphrase)
    pub = key.public_key()
    kid = key_id(pub)
    files = {n: _sha256(d / n) for n in SIGNED_FILES}
    sig = key.sign(_statement(files, kid))
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "Ed25519",
        "key_id": kid,
        "public_key": base64.b64encode(_raw(pub)).decode(),
        "files": files,
        "signature": base64.b64encode(sig).decode(),
    }
    (d / SIGNATURE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def trusted_keys() -> list[Ed25519PublicKey]:
    """The verifier's trust anchors: ``$PRIVML_TRUSTED_KEYS`` files, else the deployment key.

    The deployment key's public half is read from ``signing-key.pub`` beside the private key
    (or derived from the private key when only it exists and is unencrypted). Empty when
    neither is available.
    """
    env = os.environ.get("PRIVML_TRUSTED_KEYS")
    if env:
        return [load_public_key(p) for p in env.split(os.pathsep) if p.strip()]
    kp = default_key_path()
    pub = public_key_path(kp)
    if pub.is_file():
        return [load_public_key(pub)]
    if kp.is_file():
        try:
            return [load_signing_key(kp).public_key()]
        except CryptoError:
            return []
    return []


@dataclass(frozen=True)
class Verified:
    """A verified signature: who signed and what."""

    folder: str
    key_id: str
    files: dict[str, str]
    trusted: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def verify_model_dir(
    folder: str | Path,
    *,
    public_keys: Sequence[str | Path | bytes | Ed25519PublicKey] | None = None,
    require_trusted: bool = True,
) -> Verified:
    """Check ``folder``'s ``model.sig`` against its model files and a trusted key.

    Args:
        folder: the run folder.
        public_keys: the keys to trust (paths, PEM or raw bytes, or key objects); default
            :func:`trusted_keys`.
        require_trusted: refuse a signature by a key outside the trusted ones (default). With
            False, a valid signature by the embedded key is accepted and reported
            ``trusted=False`` (integrity only: anyone can sign with a fresh key).

    Raises:
        UsageError: ``folder`` is not an existing folder (exit code 2: not found).
        SignatureError: no signature, a changed file, a bad signature (also one too large or
            too deeply nested to read), an untrusted key, or no trusted key configured.
    """
    from privml.safe_io import check_regular_file, read_json_bounded

    d = Path(folder)
    if not d.is_dir():
        what = "is not a folder" if d.exists() else "not found"
        raise UsageError(f"{str(d)!r} {what}: pass a run folder written by `privml run`")
    sig_path = d / SIGNATURE_FILE
    if not os.path.lexists(sig_path):
        raise SignatureError(
            f"{str(d)!r} has no {SIGNATURE_FILE}: the model is unsigned and is refused. Sign it "
            f"with `privml sign {d}` if you trust where it came from."
        )
    check_regular_file(sig_path, what="signature file", error=SignatureError)
    doc = read_json_bounded(
        sig_path, max_bytes=_MAX_SIG_BYTES, what="signature file", max_depth=4,
        error=SignatureError,
    )
    try:
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            raise TypeError("expected an object with a 'files' object")
        if set(doc) != _SIG_FIELDS:
            odd = sorted(set(doc) ^ _SIG_FIELDS)
            raise ValueError(f"unexpected or missing fields {odd}")
        if doc["algorithm"] != "Ed25519":
            raise ValueError(f"unsupported algorithm {doc['algorithm']!r}")
        kid = doc["key_id"]
        fmt = doc["format"]
        if not isinstance(kid, str) or not isinstance(fmt, str):
            raise TypeError("key_id and format must be strings")
        files = {}
        for k, v in doc["files"].items():
            if not isinstance(v, str):
                raise TypeError(f"the digest of {k!r} must be a string")
            files[k] = v
        signature = base64.b64decode(doc["signature"], validate=True)
        embedded = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(doc["public_key"], validate=True)
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{str(sig_path)!r} is not a valid privml signature: {exc}") from None
    if fmt != SIGNATURE_FORMAT or sorted(files) != sorted(SIGNED_FILES):
        raise SignatureError(
            f"{str(sig_path)!r}: unsupported signature format {fmt!r} or file list "
            f"{sorted(files)}"
        )
    if key_id(embedded) != kid:
        raise SignatureError(f"{str(sig_path)!r}: the key id does not match the embedded key")
    if public_keys is None:
        anchors = trusted_keys()
    else:
        anchors = [
            k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in public_keys
        ]
    trusted = any(_raw(k) == _raw(embedded) for k in anchors)
    if require_trusted and not trusted:
        if not anchors:
            raise SignatureError(
                f"{str(d)!r} is signed by key {kid}, but no trusted public key is configured: "
                "set PRIVML_TRUSTED_KEYS to the deploying party's public key file (or pass "
                "--public-key to privml verify)"
            )
        known = ", ".join(key_id(k) for k in anchors)
        raise SignatureError(
            f"{str(d)!r} is signed by key {kid}, which is not trusted here (trusted: {known}); "
            "refusing the model. Add the signer's public key to PRIVML_TRUSTED_KEYS only if "
            "you trust it."
        )
    try:
        embedded.verify(signature, _statement(files, kid))
    except InvalidSignature:
        raise SignatureError(
            f"{str(sig_path)!r}: the signature does not verify; the signature file was altered"
        ) from None
    for name, digest in files.items():
        p = d / name
        if not os.path.lexists(p):
            raise SignatureError(f"{str(d)!r}: signed file {name} is missing")
        check_regular_file(p, what="signed file", error=SignatureError)
        if _sha256(p) != digest:
            raise SignatureError(
                f"{str(p)!r} was changed after signing (SHA-256 differs); refusing the model"
            )
    return Verified(str(d), kid, files, trusted)
