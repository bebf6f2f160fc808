"""Client of the encrypted prediction service (``privml predict`` and :class:`PredictionClient`).

Steps, all on the client's side except the evaluation:

1. ``GET /v1/model``: the public schema and encoding, the task, and the key requirements.
2. Encode the patients' records locally with :class:`privml.data.encoding.Encoder` (the
   server's public schema; nothing is fitted on the data).
3. Create keys from the requirements, or reuse the ones made earlier for the same requirements
   (:class:`KeyRing`: ``~/.config/privml/keys`` by default, secret key encrypted under a
   passphrase, files mode 0600). Only the public context ever leaves the machine.
4. Register the public context once (``POST /v1/contexts``; skipped while the server still has
   it, redone if it expired).
5. Encrypt the features in batches, ``POST /v1/predict``, decrypt the encrypted logits.
6. Probabilities (sigmoid or softmax) and labels, beside an id column.

Never send decrypted scores back to the server: with CKKS, a ciphertext and its exact
decryption leak information about the secret key (Li and Micciancio, Eurocrypt 2021; see
docs/threat-model.md).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import shutil
import ssl
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import httpx
except ImportError:  # an optional extra is missing: say which, and how to install it
    from privml.extras import require

    require("serve", "The prediction client (privml predict)")
    raise
import numpy as np
import pandas as pd

from privml.data.encoding import Encoder, Task
from privml.data.loading import NA_VALUES
from privml.errors import CryptoError, DataError, InsecureOptionWarning, PrivmlError, UsageError
from privml.he.api import (
    KeyPair,
    decrypt_scores,
    encrypt_features,
    keygen,
    load_public,
    load_scores,
    load_secret,
    paillier_ciphertext_count,
)
from privml.he.ckks import CKKSPublicContext, CKKSSecretKey
from privml.he.paillier import PaillierPublicKey, PaillierSecretKey
from privml.he.stored_pool import PrepareReport, StoredPaillierPool
from privml.serve.settings import is_loopback
from privml.serve.tokens import write_private_atomic

KEYS_DIR_ENV = "PRIVML_KEYS_DIR"
PASSPHRASE_ENV = "PRIVML_KEY_PASSPHRASE"
TOKEN_ENV = "PRIVML_TOKEN"
#: Retries of a request refused with 429 (rate limit) before giving up.
MAX_RATE_RETRIES = 5
#: The stored Paillier randomness, in a key pair's folder.
POOL_FILE = "pool.bin"
#: The in-memory pool is topped up only after this many seconds without a query...
REFILL_QUIET_S = 0.05
#: ... unless fewer than this fraction of its target is left.
REFILL_LOW_WATER = 0.25

PassphraseSource = str | Callable[[bool], str] | None


class OutOfRangeWarning(UserWarning):
    """Input values outside the schema's declared bounds were clipped (``--clip``)."""


class ServiceError(PrivmlError, RuntimeError):
    """The server refused a request or could not be reached.

    ``status`` is the HTTP status (0 when there was no answer), ``code`` and ``field`` come from
    the server's JSON error.
    """

    def __init__(self, message: str, *, status: int = 0, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.exit_code = 2 if 400 <= status < 500 else 1


def _error_code(r: Any) -> str | None:
    try:
        doc = r.json()
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def default_keys_dir() -> Path:
    """``$PRIVML_KEYS_DIR``, else ``$XDG_CONFIG_HOME/privml/keys``, else
    ``~/.config/privml/keys``."""
    env = os.environ.get(KEYS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "privml" / "keys"


def requirements_fingerprint(scheme: str, requirements: dict[str, Any]) -> str:
    """Identifies the keys a set of requirements calls for (same requirements, same keys)."""
    blob = json.dumps({"scheme": scheme, "requirements": requirements}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class KeyRing:
    """The client's key pairs, one per (scheme, evaluator requirements), in ``folder``.

    Each key pair lives in ``folder/<fingerprint>/``: ``secret.key`` (encrypted under the
    passphrase with scrypt + AES-256-GCM by :mod:`privml.he.keystore`), ``public.bin`` (the
    public context, to register again without regenerating) and ``meta.json``. Folders are
    mode 0700 and files 0600; a secret key file readable by others is refused.

    Args:
        folder: default :func:`default_keys_dir`.
        passphrase: the passphrase, or a callable ``f(new: bool) -> str`` asked only when a key
            must be created (``new=True``) or read; default ``$PRIVML_KEY_PASSPHRASE``.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, *,
                 passphrase: PassphraseSource = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_keys_dir()
        self._passphrase = passphrase
        self._loaded: dict[str, KeyPair] = {}

    def _get_passphrase(self, new: bool) -> str:
        src = self._passphrase
        if callable(src):
            value = src(new)
        elif src is not None:
            value = src
        else:
            value = os.environ.get(PASSPHRASE_ENV, "")
            if not value:
                raise UsageError(
                    "a passphrase protects the secret key on disk: pass passphrase=... or set "
                    f"{PASSPHRASE_ENV}"
                )
        if not isinstance(value, str):
            raise UsageError(f"The 'passphrase' must be a str. Got {type(value).__name__}.")
        return value

    def path_for(self, scheme: str, requirements: dict[str, Any]) -> Path:
        return self.folder / requirements_fingerprint(scheme, requirements)

    def get(self, scheme: str, requirements: dict[str, Any]) -> tuple[KeyPair, bool]:
        """The key pair for ``requirements``: loaded if it exists, else generated and saved.

        Returns ``(keys, created)``.
        """
        fp = requirements_fingerprint(scheme, requirements)
        if fp in self._loaded:
            return self._loaded[fp], False
        final = self.folder / fp
        created = False
        if not (final / "secret.key").is_file():
            self._create(scheme, requirements, final)
            created = True
        keys = self._load(final, scheme)
        self._loaded[fp] = keys
        return keys, created

    def _create(self, scheme: str, requirements: dict[str, Any], final: Path) -> None:
        passphrase = self._get_passphrase(True)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        keys = keygen(scheme=scheme, requirements=requirements)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.folder))  # mode 0700
        try:
            keys.secret.save(tmp / "secret.key", passphrase=passphrase)
            write_private_atomic(tmp / "public.bin", keys.public.to_bytes())
            meta = {"scheme": scheme, "key_id": keys.public.key_id, "created": time.time(),
                    "requirements": requirements}
            write_private_atomic(tmp / "meta.json", json.dumps(meta, indent=2).encode())
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "secret.key").is_file():  # not a concurrent creation: a failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, folder: Path, scheme: str) -> KeyPair:
        secret = load_secret(folder / "secret.key", passphrase=self._get_passphrase(False))
        public = load_public((folder / "public.bin").read_bytes())
        if public.key_id != secret.key_id or public.scheme != scheme:
            raise CryptoError(
                f"the key files in {str(folder)!r} do not belong together (public and secret key "
                "ids differ); delete that folder to generate new keys"
            )
        ok = (
            (isinstance(public, CKKSPublicContext) and isinstance(secret, CKKSSecretKey))
            or (isinstance(public, PaillierPublicKey) and isinstance(secret, PaillierSecretKey))
        )
        if not ok:
            raise CryptoError(f"the key files in {str(folder)!r} mix schemes; delete that folder")
        return KeyPair(public=public, secret=secret)


@dataclass(frozen=True)
class PredictionSummary:
    """What :meth:`PredictionClient.predict_csv` did."""

    n_patients: int
    n_requests: int
    out: Path
    model_hash: str
    key_id: str
    seconds: float
    #: from encoded features to decrypted scores, summed over the requests (encryption,
    #: HTTP round trips, decryption; not start-up, reading the input or writing the output)
    online_seconds: float = 0.0
    #: Paillier ciphertexts encrypted with precomputed randomness / computed on the spot
    precomputed: int = 0
    on_the_spot: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"n_patients": self.n_patients, "n_requests": self.n_requests,
                "out": str(self.out), "model_hash": self.model_hash, "key_id": self.key_id,
                "seconds": self.seconds, "online_seconds": self.online_seconds,
                "randomness": {"precomputed": self.precomputed, "on_the_spot": self.on_the_spot}}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


class PredictionClient:
    """Encrypted predictions from a privml server.

    Args:
        server: base URL, e.g. ``https://hospital.example:8443``.
        token: bearer token; default ``$PRIVML_TOKEN``. Sent only in the Authorization header.
        keys_dir: where key pairs are kept (default :func:`default_keys_dir`).
        passphrase: protects the secret keys on disk (see :class:`KeyRing`).
        scheme: ``"ckks"`` (default) or ``"paillier"``, among the server's accepted schemes.
        batch_size: patients per request (1 to the server's ``max_batch``).
        timeout: seconds per HTTP request.
        verify: TLS verification: True (system CAs), False (refused with a warning only for
            loopback), or the path of a CA certificate bundle.
        http_client: an ``httpx.Client`` to send requests with (tests inject one to record the
            traffic); the URL and the token are still taken from ``server`` and ``token``.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        keys_dir: str | os.PathLike[str] | None = None,
        passphrase: PassphraseSource = None,
        scheme: str = "ckks",
        batch_size: int = 1000,
        timeout: float = 120.0,
        verify: bool | str | os.PathLike[str] = True,
        http_client: httpx.Client | None = None,
    ) -> None:
        if not isinstance(server, str):
            raise UsageError(f"The 'server' parameter must be a URL. Got {server!r} instead.")
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                "The 'server' parameter must be an http:// or https:// URL, e.g. "
                f"https://hospital.example:8443. Got {server!r} instead."
            )
        if scheme not in ("ckks", "paillier"):
            raise UsageError(
                f"The 'scheme' parameter must be 'ckks' or 'paillier'. Got {scheme!r} instead."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(
                f"The 'batch_size' parameter must be an int >= 1. Got {batch_size!r} instead."
            )
        self.server = server.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if self.token is not None and (not self.token.isprintable() or " " in self.token):
            raise UsageError("The 'token' parameter must be the token printed by "
                             "`privml serve tokens add` (no spaces).")
        loop = is_loopback(parts.hostname)
        if parts.scheme == "http" and not loop:
            warnings.warn(
                f"{self.server} is plain HTTP to a remote host: the token and the model metadata "
                "cross the network unencrypted (the features and scores stay encrypted); use "
                "https://",
                InsecureOptionWarning,
                stacklevel=2,
            )
        if verify is False and not loop:
            warnings.warn("TLS certificate verification is off", InsecureOptionWarning,
                          stacklevel=2)
        self.scheme = scheme
        self.batch_size = batch_size
        self.keyring = KeyRing(keys_dir, passphrase=passphrase)
        self._own_http = http_client is None
        tls: Any = verify
        if isinstance(verify, str | os.PathLike):
            if not Path(verify).is_file():
                raise UsageError(f"The 'verify' parameter must be a CA certificate file or a "
                                 f"bool. {str(verify)!r} is not a file.")
            tls = ssl.create_default_context(cafile=str(verify))
        self.http = http_client or httpx.Client(timeout=timeout, verify=tls)
        self._info: dict[str, Any] | None = None
        self._registered: set[str] = set()
        self._pool: Any = None
        self._stored: StoredPaillierPool | None = None
        self._refill: Any = None
        self._busy = False
        self._last_query = 0.0
        #: seconds spent from encoded features to decrypted scores (encryption, the request,
        #: decryption), summed over requests: the online time
        self.online_seconds = 0.0
        #: Paillier ciphertexts encrypted with precomputed randomness and without
        self.randomness = {"precomputed": 0, "on_the_spot": 0}

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        refill = self._refill
        if refill is not None:
            refill[1].set()
            self._refill = None
        if self._own_http:
            self.http.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, separators=(",", ":")).encode()
        for attempt in range(MAX_RATE_RETRIES + 1):
            try:
                r = self.http.request(method, self.server + path, content=content,
                                      headers=headers)
            except httpx.HTTPError as exc:
                raise ServiceError(
                    f"cannot reach {self.server}: {type(exc).__name__}: {exc}"
                ) from None
            busy = r.status_code == 503 and _error_code(r) == "busy"
            if (r.status_code == 429 or busy) and attempt < MAX_RATE_RETRIES:
                try:
                    wait = float(r.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                time.sleep(min(max(wait, 0.05), 30.0))
                continue
            break
        if r.status_code >= 400:
            try:
                err = r.json()
                code, field, msg = err.get("error"), err.get("field"), err.get("message")
            except (ValueError, AttributeError):
                code, field, msg = None, None, r.text[:200]
            where = f" (field {field!r})" if field else ""
            raise ServiceError(
                f"{method} {path} refused with HTTP {r.status_code}{where}: {msg}",
                status=r.status_code, code=code, field=field,
            )
        if r.status_code == 204:
            return None
        try:
            return r.json()
        except ValueError:
            raise ServiceError(f"{method} {path}: the server's answer is not JSON",
                               status=r.status_code) from None

    # -- steps ------------------------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> dict[str, Any]:
        """``GET /v1/model`` (cached)."""
        if self._info is None or refresh:
            info = self._request("GET", "/v1/model")
            if not isinstance(info, dict) or not isinstance(info.get("schemes"), dict):
                raise ServiceError("GET /v1/model: unexpected answer (is this a privml server?)")
            self._info = info
        return self._info

    def requirements(self) -> dict[str, Any]:
        schemes = self.info()["schemes"]
        if self.scheme not in schemes:
            raise UsageError(
                f"the server does not accept scheme {self.scheme!r}; it accepts {sorted(schemes)}"
            )
        reqs = schemes[self.scheme].get("requirements")
        if not isinstance(reqs, dict):
            raise ServiceError("GET /v1/model: the scheme has no requirements")
        return reqs

    @property
    def encoder(self) -> Encoder:
        try:
            return Encoder.from_dict(self.info()["encoding"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"the server's public encoding is invalid: {exc}") from None

    @property
    def task(self) -> Task:
        try:
            t = self.info()["model"]["task"]
            return Task(str(t["kind"]), str(t["target"]), tuple(str(c) for c in t["classes"]))
        except (KeyError, TypeError) as exc:
            raise ServiceError(f"the server's task description is invalid: {exc}") from None

    def keys(self) -> KeyPair:
        """This model's key pair (created on first use; reused afterwards)."""
        keys, _ = self.keyring.get(self.scheme, self.requirements())
        return keys

    def register(self, *, force: bool = False) -> str:
        """Make sure the server holds our public context; returns its key id."""
        keys = self.keys()
        kid = keys.public.key_id
        if kid in self._registered and not force:
            return kid
        if not force:
            try:
                self._request("GET", f"/v1/contexts/{kid}")
                self._registered.add(kid)
                return kid
            except ServiceError as exc:
                if exc.status != 404:
                    raise
        blob = keys.public.to_bytes()
        res = self._request(
            "POST", "/v1/contexts",
            {"context": binascii.b2a_base64(blob, newline=False).decode("ascii")},
        )
        if not isinstance(res, dict) or res.get("key_id") != kid:
            raise ServiceError("POST /v1/contexts: the server returned another key id")
        self._registered.add(kid)
        return kid

    def prepare(self, patients: int) -> float:
        """Precompute the client's Paillier randomness for ``patients`` single-patient queries
        in memory (``r**n mod n**2`` per feature: the offline part of encryption); returns the
        seconds it took. Each element is used once; a background thread tops the pool up while
        the client is idle (never during a query, unless the pool runs low). CKKS needs no
        precomputation on the client. For a process that ends after its queries
        (``privml predict``), see :meth:`prepare_stored`."""
        if isinstance(patients, bool) or not isinstance(patients, int) or patients < 0:
            raise UsageError(f"The 'patients' parameter must be an int >= 0. Got {patients!r}.")
        if self.scheme != "paillier":
            return 0.0
        from privml.he.paillier import PaillierRandomnessPool

        t0 = time.perf_counter()
        keys = self.keys()
        assert isinstance(keys.public, PaillierPublicKey)
        per = int(self.requirements()["n_features"])
        if self._pool is None:
            self._pool = PaillierRandomnessPool(keys.public, size=0, target=patients * per)
        self._pool.target = max(self._pool.target, patients * per)
        self._pool.top_up()
        self._start_refill()
        return time.perf_counter() - t0

    def stored_pool(self) -> StoredPaillierPool | None:
        """The Paillier randomness kept on disk beside this model's secret key (``pool.bin``
        in the key folder; see :class:`privml.he.stored_pool.StoredPaillierPool`), or None
        for CKKS."""
        if self.scheme != "paillier":
            return None
        from privml.he.stored_pool import StoredPaillierPool

        keys = self.keys()
        assert isinstance(keys.secret, PaillierSecretKey)
        if self._stored is None:
            folder = self.keyring.path_for(self.scheme, self.requirements())
            self._stored = StoredPaillierPool(folder / POOL_FILE, keys.secret)
        return self._stored

    def prepare_stored(self, patients: int) -> PrepareReport | None:
        """Make sure randomness for ``patients`` single-patient Paillier queries is stored on
        disk (computing what is missing: the offline cost), sealed like the secret key; every
        later client process claims what it needs from it, each element once. Also asks the
        server to fill its own pool for this key. None for CKKS (nothing to precompute)."""
        if isinstance(patients, bool) or not isinstance(patients, int) or patients < 0:
            raise UsageError(f"The 'patients' parameter must be an int >= 0. Got {patients!r}.")
        stored = self.stored_pool()
        if stored is None:
            return None
        self.register()  # the server warms its pool for this key meanwhile
        return stored.prepare(patients * int(self.requirements()["n_features"]))

    def _start_refill(self) -> None:
        import threading

        pool = self._pool
        if pool is None or self._refill is not None:
            return
        stop = threading.Event()

        def run() -> None:
            import contextlib

            with contextlib.suppress(Exception):
                import gmpy2

                gmpy2.get_context().allow_release_gil = True
            while not stop.is_set():
                quiet = not self._busy and time.monotonic() - self._last_query >= REFILL_QUIET_S
                if pool.deficit() > 0 and (quiet or pool.below(REFILL_LOW_WATER)):
                    pool.top_up(1)
                else:
                    stop.wait(0.01 if pool.deficit() else 0.05)

        self._refill = (threading.Thread(target=run, name="privml-client-pool", daemon=True),
                        stop)
        self._refill[0].start()

    def _randomness(self, keys: KeyPair, n: int) -> Any:
        """The Paillier randomness for encrypting ``n`` patients: the in-memory pool, else a
        claim from the stored pool (exactly the elements this batch needs), else None."""
        if self._pool is not None:
            return self._pool
        stored = self.stored_pool()
        if stored is None or not stored.path.exists():
            return None
        assert isinstance(keys.public, PaillierPublicKey)
        return stored.claim(paillier_ciphertext_count(keys.public, n))

    def _predict_batch(self, X: np.ndarray) -> np.ndarray:
        keys = self.keys()
        kid = self.register()
        self._busy = True
        t0 = time.perf_counter()  # online: from encoded features to decrypted scores
        try:
            if self.scheme == "paillier":
                pool = self._randomness(keys, X.shape[0])
                misses = pool.misses if pool is not None else 0
                ct = encrypt_features(keys, X, pool=pool)
                used = len(ct.cts)
                fresh = used if pool is None else pool.misses - misses
                self.randomness["precomputed"] += used - fresh
                self.randomness["on_the_spot"] += fresh
            else:
                ct = encrypt_features(keys, X, compact=True)
            logits = self._exchange(keys, kid, ct, X.shape[0])
        finally:
            self._busy = False
            self._last_query = time.monotonic()
        self.online_seconds += time.perf_counter() - t0
        return logits

    def _exchange(self, keys: KeyPair, kid: str, ct: Any, n: int) -> np.ndarray:
        body = {
            "key_id": kid,
            "ciphertexts": binascii.b2a_base64(ct.to_bytes(), newline=False).decode("ascii"),
        }
        try:
            res = self._request("POST", "/v1/predict", body)
        except ServiceError as exc:
            if exc.status != 404 or exc.code != "unknown_key_id":
                raise
            self._registered.discard(kid)  # expired or deleted on the server: register again
            self.register(force=True)
            res = self._request("POST", "/v1/predict", body)
        if not isinstance(res, dict) or not isinstance(res.get("scores"), str):
            raise ServiceError("POST /v1/predict: unexpected answer")
        if res.get("n_patients") != n:
            raise ServiceError(
                f"POST /v1/predict: asked for {n} patients, got {res.get('n_patients')}"
            )
        try:
            data = binascii.a2b_base64(res["scores"], strict_mode=True)
            out = load_scores(data, keys.secret)
        except (binascii.Error, ValueError) as exc:
            raise ServiceError(f"POST /v1/predict: invalid encrypted scores: {exc}") from None
        logits = decrypt_scores(keys.secret, out)
        if logits.shape[0] != n:
            raise ServiceError("POST /v1/predict: the scores do not match the batch")
        return logits

    def _batches(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def predict_logits(self, X: Any, *, progress: bool = False) -> np.ndarray:
        """Encrypted evaluation of already encoded features ``X`` (n, n_features), values in
        [0, 1]; returns the decrypted logits (n, n_outputs)."""
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[0] < 1:
            raise UsageError(
                f"The 'X' parameter must have shape (n_patients, n_features). Got {arr.shape}."
            )
        limit = int(self.info().get("limits", {}).get("max_batch", self.batch_size))
        if self.batch_size > limit:
            raise UsageError(
                f"The 'batch_size' parameter ({self.batch_size}) exceeds the server's max_batch "
                f"of {limit}; use at most {limit}."
            )
        parts: list[np.ndarray] = []
        with _progress(progress, arr.shape[0]) as advance:
            for sl in self._batches(arr.shape[0]):
                parts.append(self._predict_batch(arr[sl]))
                advance(sl.stop - sl.start)
        return np.vstack(parts)

    def predict_proba(self, X: Any, *, progress: bool = False) -> np.ndarray:
        """Probabilities: shape (n,) of the positive class (binary) or (n, classes)."""
        z = self.predict_logits(X, progress=progress)
        return _sigmoid(z[:, 0]) if z.shape[1] == 1 else _softmax(z)

    def predict_frame(self, df: pd.DataFrame, *, id_column: str | None = None,
                      progress: bool = False, clip: bool = False,
                      source: str = "input") -> pd.DataFrame:
        """Encode ``df`` with the server's public schema, predict, and return a frame with the
        id column, the probabilities (``probability`` of ``classes[1]`` for a binary task, one
        ``p_<class>`` column per class otherwise) and the ``label``.

        Numeric values outside the schema's declared ``[min, max]`` are refused (the model was
        never trained there, and clipping would silently predict another patient), unless
        ``clip=True``: then they are clipped to the bounds with an :class:`OutOfRangeWarning`
        saying how many values in which columns. ``source`` names the input in messages."""
        if len(df) == 0:
            raise DataError(f"{source} has no rows")
        ids, id_name = _ids(df, id_column)
        self._check_ranges(df, clip=clip, source=source)
        try:
            X = self.encoder.transform(df, site=source)
        except DataError as exc:  # the encoder speaks of sites; here it is the user's file
            raise DataError([p.replace(f"site {source!r}", source) for p in exc.problems]) \
                from None
        task = self.task
        z = self.predict_logits(X, progress=progress)
        res = pd.DataFrame({id_name: ids})
        if z.shape[1] == 1:
            p = _sigmoid(z[:, 0])
            res["probability"] = p
            res["label"] = np.where(p >= 0.5, task.classes[-1], task.classes[0])
        else:
            p = _softmax(z)
            for k, c in enumerate(task.classes):
                res[f"p_{c}"] = p[:, k]
            res["label"] = [task.classes[k] for k in p.argmax(axis=1)]
        return res

    def _check_ranges(self, df: pd.DataFrame, *, clip: bool, source: str) -> None:
        from privml.data.loading import numeric_values

        problems: list[str] = []
        clipped: list[str] = []
        for col, spec in self.encoder.schema.items():
            if spec.type != "numeric" or col not in df.columns or spec.min is None \
                    or spec.max is None:
                continue
            v = numeric_values(df[col]).to_numpy()
            out = (v < spec.min) | (v > spec.max)
            if not out.any():
                continue
            rows = np.flatnonzero(out)
            shown = ", ".join(str(int(r) + 2) for r in rows[:5]) + (", ..." if rows.size > 5
                                                                    else "")
            what = (f"{source}, column {col!r}: {rows.size} value(s) outside the declared "
                    f"range [{spec.min:g}, {spec.max:g}] (lines {shown}; first {v[rows[0]]:g})")
            (clipped if clip else problems).append(what)
        if problems:
            raise DataError(
                [*problems, "the model never saw such values: fix them in the file, or pass "
                 "--clip (clip=True) to clip them to the bounds with a warning"]
            )
        for what in clipped:
            warnings.warn(f"{what}; clipped to the bounds (--clip)", OutOfRangeWarning,
                          stacklevel=3)

    def predict_csv(self, input: str | os.PathLike[str], out: str | os.PathLike[str], *,
                    id_column: str | None = None, progress: bool = True,
                    clip: bool = False) -> PredictionSummary:
        """Read a CSV of patients, predict them encrypted, write ``out`` (CSV) atomically."""
        t0 = time.perf_counter()
        online0, rnd0 = self.online_seconds, dict(self.randomness)
        src, dst = Path(input), Path(out)
        df = _read_csv(src)
        res = self.predict_frame(df, id_column=id_column, progress=progress, clip=clip,
                                 source=f"input file {str(src)!r}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                res.to_csv(fh, index=False, float_format="%.6f")
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        n = len(res)
        return PredictionSummary(
            n_patients=n,
            n_requests=-(-n // self.batch_size),
            out=dst,
            model_hash=str(self.info()["model"].get("hash")),
            key_id=self.keys().public.key_id,
            seconds=time.perf_counter() - t0,
            online_seconds=self.online_seconds - online0,
            precomputed=self.randomness["precomputed"] - rnd0["precomputed"],
            on_the_spot=self.randomness["on_the_spot"] - rnd0["on_the_spot"],
        )


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} not found")
    try:
        df = pd.read_csv(path, na_values=NA_VALUES, keep_default_na=False, dtype=object)
    except pd.errors.EmptyDataError:
        raise DataError(f"input file {str(path)!r} is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _ids(df: pd.DataFrame, id_column: str | None) -> tuple[list[Any], str]:
    if id_column is not None:
        if id_column not in df.columns:
            raise UsageError(
                f"The 'id_column' parameter must name a column of the input. Got {id_column!r}; "
                f"the columns are {list(df.columns)[:20]}."
            )
        return df[id_column].tolist(), id_column
    for c in df.columns:
        if c.lower() in ("id", "patient_id", "record_id"):
            return df[c].tolist(), c
    return list(range(1, len(df) + 1)), "row"


class _progress:
    """A rich progress bar over patients on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]encrypted predictions"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(stderr=True), transient=False,
        )
        self._bar.__enter__()
        task = self._bar.add_task("predict", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
