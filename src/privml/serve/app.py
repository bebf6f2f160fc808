"""The encrypted prediction service: a FastAPI app.

Endpoints (all JSON; binary values travel as standard base64):

* ``GET /v1/model``: public schema and encoding, task, architecture sizes, model hash, and for
  each accepted HE scheme the evaluator's key requirements.
* ``POST /v1/contexts`` ``{"context": b64}``: register a public context (CKKS) or public key
  (Paillier) made from those requirements; returns its ``key_id`` (201, or 200 if it was
  registered already). ``GET`` / ``DELETE /v1/contexts/{key_id}``: look one up, forget it.
* ``POST /v1/predict`` ``{"key_id": hex, "ciphertexts": b64}``: encrypted features in, encrypted
  logits out (``{"scores": b64, ...}``), under the client's key.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (model compiled, state writable),
  ``GET /openapi.json``.

``/v1`` requires ``Authorization: Bearer <token>`` unless the server runs with
``--insecure-no-auth``. Authentication, the per-token request rate limit and the body size and
time limits are enforced by :class:`_Guard` *before* a request body is read or parsed, so an
unauthenticated client cannot make the server buffer or parse anything.

Errors: every refusal is ``{"error": code, "field": name-or-null, "message": text}`` with a 4xx
status. Nothing that arrives is ever echoed back or logged: the access log has the method, the
path, the status, the token's *name* and the time; an unexpected exception is logged as its type
and code location only (never its message, which could quote input).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import math
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

try:
    from fastapi import FastAPI, Path, Request, Security
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # an optional extra is missing: say which, and how to install it
    from privml.extras import require

    require("serve", "The prediction service (privml serve)")
    raise

from privml.errors import CryptoError, InsecureOptionWarning, PrivmlError
from privml.he import formats
from privml.he.api import PublicMaterial, load_features, load_public
from privml.he.ckks import CKKSProfile, CKKSPublicContext
from privml.he.evaluators import CKKSLinearEvaluator, EvaluationTimeout, charged_patients
from privml.he.paillier import DEFAULT_KEY_BITS, PaillierPublicKey
from privml.serve.model import API_VERSION, ServedModel
from privml.serve.pools import PoolKeeper
from privml.serve.settings import ServeSettings
from privml.serve.store import BudgetExhaustedError, ContextQuotaError, StateStore
from privml.serve.tokens import MAX_TOKEN_CHARS, TokenStore

log = logging.getLogger("privml.serve")
access_log = logging.getLogger("privml.serve.access")

ANONYMOUS = "anonymous"
#: Single-patient CKKS requests of a linear model with at most this many patients are evaluated
#: on the event loop: about a millisecond of work, less than handing it to a worker thread and
#: back costs (two thread wake-ups, each a wait for the GIL and for a core on a busy machine).
INLINE_MAX_PATIENTS = 4
#: Parsed public contexts kept in memory per worker process (a CKKS context is ~2-20 MB).
CONTEXT_CACHE_SIZE = 32
_KEY_ID_PATTERN = r"^[0-9a-f]{64}$"
_SCHEME_OF_KIND = {
    formats.Kind.CKKS_PUBLIC: "ckks",
    formats.Kind.PAILLIER_PUBLIC: "paillier",
}
_FEATURES_OF_SCHEME = {
    "ckks": formats.Kind.CKKS_FEATURES,
    "paillier": formats.Kind.PAILLIER_FEATURES,
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ApiError(Exception):
    """A refusal: HTTP ``status``, machine-readable ``code``, the offending ``field``."""

    def __init__(
        self,
        status: int,
        code: str,
        field: str | None,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.code, "field": self.field, "message": self.message},
            status_code=self.status,
            headers=self.headers,
        )


# ------------------------------------------------------------------------------------------
# Wire models (they define /openapi.json)
# ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorResponse(_Strict):
    error: str = Field(description="machine-readable code, e.g. 'invalid_ciphertext'")
    field: str | None = Field(description="the request field at fault, if any")
    message: str = Field(description="what is wrong and how to fix it")


class ContextRequest(_Strict):
    context: str = Field(
        min_length=1,
        description="base64 of a privml envelope of kind 1 (CKKS public context: parameters, "
        "public key, the evaluation keys the requirements list) or 4 (Paillier public key), "
        "made from GET /v1/model's requirements; never the secret key. Byte layout: "
        "docs/wire-format.md",
    )


class ContextResponse(_Strict):
    key_id: str = Field(description="SHA-256 of the public material; send it with predictions")
    scheme: str
    size_bytes: int
    created: float = Field(description="registration time, Unix seconds")
    expires_at: float = Field(description="expiry if unused until then, Unix seconds")
    new: bool = Field(description="false if this context was registered already")


class PredictRequest(_Strict):
    key_id: str = Field(pattern=_KEY_ID_PATTERN, description="from POST /v1/contexts")
    ciphertexts: str = Field(
        min_length=1,
        description="base64 of a privml envelope of kind 2 (CKKS features, one patient per "
        "ciphertext or column-packed) or 5 (Paillier features) under the registered key; "
        "docs/wire-format.md",
    )


class PredictResponse(_Strict):
    key_id: str
    n_patients: int
    scores: str = Field(description="base64 of a privml envelope of kind 3 or 6: the encrypted "
                        "logits under the same key; docs/wire-format.md says how to read "
                        "them")
    model_hash: str


class ModelResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    api_version: str
    model: dict[str, Any]
    encoding: dict[str, Any]
    schemes: dict[str, Any]
    limits: dict[str, Any]
    auth: bool


class HealthResponse(_Strict):
    status: str = Field(description="always 'ok' while the process answers")


class ReadyResponse(_Strict):
    status: str = Field(description="'ready'")
    model_hash: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (400, "malformed request"),
        (401, "missing, unknown or revoked bearer token"),
        (403, "quota of registered contexts reached, or the token's patient budget used up"),
        (404, "unknown key id"),
        (408, "request body too slow"),
        (413, "request body too large"),
        (422, "invalid field (named in the error)"),
        (429, "rate limit; see Retry-After"),
        (503, "all evaluation workers busy, or the evaluation exceeded its time limit"),
    )
}


# ------------------------------------------------------------------------------------------
# Service state
# ------------------------------------------------------------------------------------------


@dataclass
class _Service:
    settings: ServeSettings
    served: ServedModel
    tokens: TokenStore
    store: StateStore
    cache: OrderedDict[str, PublicMaterial]
    executor: ThreadPoolExecutor
    max_pending: int
    pools: PoolKeeper
    pending: int = 0
    next_sweep: float = 0.0
    cache_lock: threading.Lock = field(default_factory=threading.Lock)

    def public_material(self, key_id: str, scheme: str) -> PublicMaterial | None:
        with self.cache_lock:
            pub = self.cache.get(key_id)
            if pub is not None:
                self.cache.move_to_end(key_id)
                return pub
        blob = self.store.read_blob(key_id)
        if blob is None:
            return None
        try:
            pub = _load_quietly(blob, self.settings.limits.max_body_bytes)
        except CryptoError:  # a damaged state file: make the client register again
            log.warning("stored context %s... failed validation; ignoring it", key_id[:16])
            return None
        self._remember(key_id, pub)
        return pub

    def warm(self, key_id: str, scheme: str) -> None:
        """Have the pool thread load this context and fill its answer pool."""
        ev = self.served.evaluators.get(scheme)
        if ev is None:
            return

        def load() -> tuple[PublicMaterial, Any] | None:
            pub = self.public_material(key_id, scheme)
            if pub is None or pub.requirements != ev.requirements.normalized:
                return None
            return pub, ev

        self.pools.warm(key_id, load)

    def _remember(self, key_id: str, pub: PublicMaterial) -> None:
        with self.cache_lock:
            self.cache[key_id] = pub
            self.cache.move_to_end(key_id)
            while len(self.cache) > CONTEXT_CACHE_SIZE:
                self.cache.popitem(last=False)

    async def run(self, fn: Callable[[float], Any], *, inline: bool = False) -> Any:
        """Run ``fn(deadline)`` on an evaluation thread, off the event loop (``inline``: here,
        for work too small to be worth the hand-off, see :data:`INLINE_MAX_PATIENTS`).

        Requests queue for the workers (in arrival order) up to ``max_pending`` in flight;
        beyond that, 503 ``busy`` with Retry-After. The time limit counts from arrival: a
        request that waited and then overruns it gets 503 ``evaluation_timeout`` (the
        evaluators stop at their next patient or chunk)."""
        limit = self.settings.limits.eval_timeout_s
        if inline:
            try:
                return fn(time.monotonic() + limit)
            except EvaluationTimeout:
                raise ApiError(
                    503, "evaluation_timeout", None,
                    f"the evaluation exceeded this server's limit of {limit:g} s; send fewer "
                    "patients per request",
                ) from None
        if self.pending >= self.max_pending:
            raise ApiError(
                503, "busy", None,
                f"{self.pending} requests are already queued for this server's evaluation "
                "workers; retry after 1 s",
                headers={"Retry-After": "1"},
            )
        self.pending += 1
        try:
            deadline = time.monotonic() + limit
            fut = asyncio.get_running_loop().run_in_executor(self.executor, fn, deadline)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), limit + 2.0)
            except (TimeoutError, EvaluationTimeout):
                raise ApiError(
                    503, "evaluation_timeout", None,
                    f"the evaluation exceeded this server's limit of {limit:g} s; send fewer "
                    "patients per request",
                ) from None
        finally:
            self.pending -= 1

    def maybe_sweep(self) -> None:
        now = time.monotonic()
        if now >= self.next_sweep:
            self.next_sweep = now + 60.0
            self.store.expire(ttl_s=self.settings.limits.context_ttl_s, force=False)


def _release_gil_in_bigint_math() -> None:
    """Let gmpy2's modular exponentiations (Paillier) run without Python's GIL in this thread,
    so the event loop keeps answering while a worker evaluates (gmpy2 contexts are per thread)."""
    with contextlib.suppress(ImportError, AttributeError):
        import gmpy2

        gmpy2.get_context().allow_release_gil = True


def _load_quietly(blob: bytes, max_bytes: int) -> PublicMaterial:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pub = load_public(blob, max_bytes=max_bytes)
    weak = [w for w in caught if issubclass(w.category, InsecureOptionWarning)]
    if weak or (isinstance(pub, PaillierPublicKey) and pub.key_bits < DEFAULT_KEY_BITS):
        bits = pub.key_bits if isinstance(pub, PaillierPublicKey) else "?"
        raise CryptoError(
            f"The 'key_bits' of the Paillier key must be >= {DEFAULT_KEY_BITS} for 128-bit "
            f"security. Got {bits} instead; generate the key with key_bits={DEFAULT_KEY_BITS}."
        )
    return pub


def _b64(value: str, field: str) -> bytes:
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            422,
            "invalid_base64",
            field,
            f"The {field!r} field must be standard base64 (RFC 4648, with padding, no "
            f"newlines): {exc}",
        ) from None


def _first_difference(got: Any, want: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want), key=str):
            if k not in got:
                return f"{path}.{k}", "(missing)", want[k]
            if k not in want:
                return f"{path}.{k}", got[k], "(absent)"
            d = _first_difference(got[k], want[k], f"{path}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return path, got, want
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            d = _first_difference(g, w, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    if type(got) is not type(want) or got != want:
        return path, got, want
    return None


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 120 else s[:117] + "..."


def check_can_evaluate(pub: PublicMaterial, required: dict[str, Any]) -> None:
    """Refuse public material that cannot evaluate the model, naming the parameter.

    The requirements the context declares must equal the model's, and (CKKS) every profile the
    model needs must be present with exactly the declared parameters and evaluation keys (a
    context whose header and keys disagree is refused here, not at prediction time).
    """
    declared = json.loads(json.dumps(pub.requirements))
    diff = _first_difference(declared, required, "requirements")
    if diff is not None:
        where, got, want = diff
        raise CryptoError(
            f"this context cannot evaluate the model: its {where} is {_short(got)} but the "
            f"model needs {_short(want)}; generate keys from GET /v1/model "
            "(schemes.<scheme>.requirements)"
        )
    if isinstance(pub, CKKSPublicContext):
        needed = {p["name"]: CKKSProfile.from_dict(p) for p in required["profiles"]}
        extra = sorted(set(pub.profiles) - set(needed))
        if extra:
            raise CryptoError(
                f"this context carries profiles {extra} the model does not use; generate keys "
                "from GET /v1/model"
            )
        for name, prof in needed.items():
            rt = pub.profiles.get(name)
            if rt is None:
                raise CryptoError(f"this context lacks the CKKS profile {name!r} the model needs")
            if rt.profile != prof:
                d = _first_difference(rt.profile.to_dict(), prof.to_dict(), f"profile {name!r}")
                where = d[0] if d else f"profile {name!r}"
                raise CryptoError(
                    f"this context cannot evaluate the model: {where} differs from the "
                    "model's requirements"
                )


# ------------------------------------------------------------------------------------------
# The guard: limits, auth, rate limit, error containment, access log (pure ASGI)
# ------------------------------------------------------------------------------------------


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[::-1])


class _Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], *, service: _Service) -> None:
        self.app = app
        self.service = service

    def _authenticate(self, scope: Scope) -> str:
        svc = self.service
        if not svc.settings.auth:
            return ANONYMOUS
        header = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v
                break
        if not header:
            raise ApiError(
                401, "unauthorized", "Authorization",
                "missing bearer token: send 'Authorization: Bearer <token>' (the server's "
                "operator creates one with `privml serve tokens add NAME`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = header.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise ApiError(
                401, "unauthorized", "Authorization",
                "the Authorization header must be 'Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        name = svc.tokens.verify(token)
        if name is None:
            raise ApiError(
                401, "unauthorized", "Authorization",
                "unknown or revoked token; ask the server's operator for a valid one",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = str(scope.get("path", ""))[:200]
        state: dict[str, Any] = {"status": 0, "owner": "-"}
        scope.setdefault("state", {})

        async def send_logged(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                state["status"] = int(msg["status"])
            await send(msg)

        try:
            if path.startswith(f"/{API_VERSION}/"):
                with self.service.pools.serving():  # background refills wait meanwhile
                    await self._handle(scope, receive, send_logged, path, state)
            else:
                await self._handle(scope, receive, send_logged, path, state)
        except Exception as exc:  # never a traceback with request data, never a crash
            log.error("internal error %s at %s", type(exc).__name__, _where(exc))
            if not state["status"]:
                await _send_json(
                    send_logged, 500,
                    {"error": "internal", "field": None, "message": "internal server error"},
                )
        finally:
            access_log.info(
                "%s %s %s owner=%s %.1fms", scope.get("method", "?"), path, state["status"],
                state["owner"], (time.perf_counter() - t0) * 1e3,
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str,
                      state: dict[str, Any]) -> None:
        svc = self.service
        limits = svc.settings.limits
        try:
            if path.startswith(f"/{API_VERSION}/"):
                owner = self._authenticate(scope)
                state["owner"] = owner
                scope["state"]["owner"] = owner
                wait = svc.store.take(
                    owner, "requests", 1.0, rate=limits.rate_requests, burst=limits.burst_requests
                )
                if wait:
                    raise ApiError(
                        429, "rate_limited", None,
                        f"more than {limits.rate_requests:g} requests per second for token "
                        f"{owner!r}; retry after {math.ceil(wait)} s",
                        headers={"Retry-After": str(math.ceil(wait))},
                    )
            body = await self._read_body(scope, receive)
        except ApiError as exc:
            await _send_json(
                send, exc.status, {"error": exc.code, "field": exc.field, "message": exc.message},
                exc.headers,
            )
            return
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limits = self.service.settings.limits
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise ApiError(400, "bad_request", "Content-Length",
                                   "Content-Length is not a number") from None
                if declared > limits.max_body_bytes:
                    raise ApiError(
                        413, "body_too_large", "body",
                        f"the request body is {declared} bytes, more than this server's limit "
                        f"of {limits.max_body_bytes}; send fewer patients per request",
                    )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        chunks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise ApiError(
                    408, "body_timeout", "body",
                    f"the request body did not arrive within {limits.body_timeout_s:g} s",
                ) from None
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise ApiError(
                    413, "body_too_large", "body",
                    f"the request body exceeds this server's limit of {limits.max_body_bytes} "
                    "bytes; send fewer patients per request",
                )
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


# ------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "path", "query", "header")]
    return ".".join(parts) or ("body" if loc and loc[0] == "body" else None)


def create_app(settings: ServeSettings, *, served: ServedModel | None = None) -> FastAPI:
    """Build the service for ``settings`` (validated here).

    Args:
        settings: see :class:`ServeSettings`.
        served: an already loaded model (tests, benchmarks); default: load ``settings.model_dir``.

    With ``settings.auth`` False an :class:`InsecureOptionWarning` is issued: anyone who can
    reach the port can use the model and fill the server's disk with contexts.
    """
    settings = settings.validate()
    if served is None:
        served = ServedModel.load(settings.model_dir, schemes=settings.schemes,
                                  resolution=settings.limits.output_resolution)
    state_dir = settings.resolved_state_dir
    lim = settings.limits
    svc = _Service(
        settings=settings,
        served=served,
        tokens=TokenStore(state_dir),
        store=StateStore(state_dir),
        cache=OrderedDict(),
        executor=ThreadPoolExecutor(max_workers=lim.workers, thread_name_prefix="privml-eval",
                                    initializer=_release_gil_in_bigint_math),
        max_pending=max(64, 16 * lim.workers),
        pools=PoolKeeper(),
    )
    svc.store.expire(ttl_s=settings.limits.context_ttl_s)
    recent: dict[str, str] = {}
    for rec in sorted(svc.store.records(), key=lambda r: r.last_used, reverse=True):
        if len(recent) < svc.pools.max_pools:
            recent.setdefault(rec.key_id, rec.scheme)
    for key_id, scheme in reversed(list(recent.items())):  # the most recent warmed first
        svc.warm(key_id, scheme)
    if not settings.auth:
        msg = (
            "AUTHENTICATION IS OFF (--insecure-no-auth): anyone who can reach "
            f"{settings.host}:{settings.port} can query the model and register contexts. Use "
            "this for local demos only."
        )
        log.warning(msg)
        warnings.warn(msg, InsecureOptionWarning, stacklevel=2)
    elif svc.tokens.count_active() == 0:
        log.warning(
            "no active API token: every /v1 request will be refused; create one with "
            "`privml serve tokens add NAME --state-dir %s`", state_dir
        )

    info = served.public_info()
    info["limits"] = {
        "max_body_bytes": lim.max_body_bytes,
        "max_batch": lim.max_batch,
        "max_contexts_per_token": lim.max_contexts_per_token,
        "rate_requests_per_s": lim.rate_requests,
        "rate_patients_per_s": lim.rate_patients,
        "context_ttl_s": lim.context_ttl_s,
        "patient_budget": lim.patient_budget,
        "eval_timeout_s": lim.eval_timeout_s,
        "patients_counted_as": "the capacity of the request's ciphertexts: one per "
        "single-patient ciphertext, every slot of a column-packed chunk, per_ct per Paillier "
        "ciphertext",
    }
    info["auth"] = settings.auth

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.pools.stop()
        svc.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        lifespan=lifespan,
        title="privml encrypted prediction service",
        version=API_VERSION,
        description=(
            "Predictions on homomorphically encrypted patient features: the server never sees "
            "a feature value or a score, the client never receives the weights. See "
            "docs/serve.md."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.service = svc
    bearer = HTTPBearer(auto_error=False, description="`privml serve tokens add NAME`")
    secured = [Security(bearer)]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        field = _field_of(loc)
        kind = str(first.get("type", ""))
        if kind == "json_invalid":
            return ApiError(400, "invalid_json", "body",
                            "the request body is not valid JSON").response()
        msg = str(first.get("msg", "invalid value"))
        more = f" ({len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return ApiError(422, "invalid_field", field,
                        f"field {field!r}: {msg}{more}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not parse the body (depth, encoding, ...)
            return ApiError(400, "invalid_json", "body",
                            "the request body is not valid UTF-8 JSON within the parser's "
                            "limits").response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, code, None, str(exc.detail),
                        headers=dict(exc.headers or {})).response()

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz() -> HealthResponse:
        """Liveness: the process answers (evaluation runs on worker threads, never here)."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, tags=["health"],
             responses={503: {"model": ErrorResponse, "description": "not ready"}})
    async def readyz() -> Response:
        """Readiness: model compiled, state folder writable."""
        try:
            svc.store.check()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.error("state folder not writable: %s", type(exc).__name__)
            return ApiError(503, "not_ready", None, "the state folder is not writable").response()
        return JSONResponse({"status": "ready", "model_hash": served.hash})

    @app.get("/v1/model", response_model=ModelResponse, responses=_ERRORS,
             dependencies=secured, tags=["model"])
    async def model_info() -> dict[str, Any]:
        """Public schema and encoding, task, model hash, accepted schemes and key requirements."""
        return info

    def _owner(request: Request) -> str:
        return str(request.state.owner)

    @app.post("/v1/contexts", response_model=ContextResponse, status_code=201,
              responses={200: {"model": ContextResponse, "description": "already registered"},
                         **_ERRORS},
              dependencies=secured, tags=["contexts"])
    async def register(body: ContextRequest, request: Request) -> JSONResponse:
        """Register a public context (CKKS) or public key (Paillier); returns its key id."""
        owner = _owner(request)
        blob = _b64(body.context, "context")
        try:
            kind = formats.peek_kind(blob)
        except CryptoError as exc:
            raise ApiError(422, "invalid_context", "context", str(exc)) from None
        scheme = _SCHEME_OF_KIND.get(kind)
        if scheme is None:
            raise ApiError(
                422, "invalid_context", "context",
                f"expected a public context or public key, got a {kind.name} message (never "
                "send a secret key)",
            )
        ev = served.evaluators.get(scheme)
        if ev is None:
            raise ApiError(
                422, "scheme_not_accepted", "context",
                f"this server does not accept {scheme!r}; it accepts {sorted(served.evaluators)}",
            )
        def parse(_deadline: float) -> PublicMaterial:
            try:
                pub = _load_quietly(blob, lim.max_body_bytes)
                check_can_evaluate(pub, ev.requirements.normalized)
            except CryptoError as exc:
                raise ApiError(422, "invalid_context", "context", str(exc)) from None
            return pub

        pub = await svc.run(parse)  # SEAL parses and validates every key: CPU work
        svc.maybe_sweep()
        try:
            rec, created = svc.store.register(
                owner, pub.key_id, scheme, blob,
                max_per_owner=lim.max_contexts_per_token, ttl_s=lim.context_ttl_s,
            )
        except ContextQuotaError as exc:
            raise ApiError(403, "context_quota", "context", str(exc)) from None
        svc._remember(pub.key_id, pub)
        svc.pools.warm(pub.key_id, lambda: (pub, ev))  # answers precomputed before queries
        log.info("context %s... (%s, %d bytes) registered by %s", pub.key_id[:16], scheme,
                 len(blob), owner)
        payload = ContextResponse(
            key_id=rec.key_id, scheme=rec.scheme, size_bytes=rec.size_bytes, created=rec.created,
            expires_at=rec.expires_at(lim.context_ttl_s), new=created,
        )
        return JSONResponse(payload.model_dump(), status_code=201 if created else 200)

    KeyIdPath = Path(pattern=_KEY_ID_PATTERN, description="key id from POST /v1/contexts")

    @app.get("/v1/contexts/{key_id}", response_model=ContextResponse, responses=_ERRORS,
             dependencies=secured, tags=["contexts"])
    async def get_context(request: Request, key_id: str = KeyIdPath) -> ContextResponse:
        """Is this context registered (for this token) and when does it expire?"""
        rec = svc.store.lookup(_owner(request), key_id, ttl_s=lim.context_ttl_s)
        if rec is None:
            raise ApiError(404, "unknown_key_id", "key_id",
                           "no such context for this token (never registered, deleted or "
                           "expired); register it with POST /v1/contexts")
        svc.warm(key_id, rec.scheme)  # a client checks this before its first prediction
        return ContextResponse(
            key_id=rec.key_id, scheme=rec.scheme, size_bytes=rec.size_bytes, created=rec.created,
            expires_at=rec.expires_at(lim.context_ttl_s), new=False,
        )

    @app.delete("/v1/contexts/{key_id}", status_code=204, responses=_ERRORS,
                dependencies=secured, tags=["contexts"])
    async def delete_context(request: Request, key_id: str = KeyIdPath) -> Response:
        """Forget a registered context."""
        if not svc.store.delete(_owner(request), key_id):
            raise ApiError(404, "unknown_key_id", "key_id", "no such context for this token")
        return Response(status_code=204)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS,
              dependencies=secured, tags=["predict"])
    async def predict(body: PredictRequest, request: Request) -> JSONResponse:
        """Evaluate the model on encrypted features; returns encrypted logits."""
        owner = _owner(request)
        svc.maybe_sweep()
        rec = svc.store.lookup(owner, body.key_id, ttl_s=lim.context_ttl_s)
        if rec is None:
            raise ApiError(404, "unknown_key_id", "key_id",
                           "no such context for this token (never registered, deleted or "
                           "expired); register it with POST /v1/contexts")
        data = _b64(body.ciphertexts, "ciphertexts")
        ev = served.evaluators[rec.scheme]
        packing = "columns"
        try:
            _, header, _ = formats.unpack(
                data, expected=_FEATURES_OF_SCHEME[rec.scheme], max_bytes=lim.max_body_bytes
            )
            n = formats.require(header, "n_rows", int, "encrypted features")
            if rec.scheme == "paillier":
                formats.require(header, "per_ct", int, "encrypted features")
            else:
                packing = formats.require(header, "packing", str, "encrypted features")
                if packing not in ("replicated", "columns"):
                    raise CryptoError(f"unsupported packing {packing!r}")
        except CryptoError as exc:
            raise ApiError(422, "invalid_ciphertext", "ciphertexts", str(exc)) from None
        if not 1 <= n <= lim.max_batch:
            raise ApiError(
                422, "batch_too_large" if n > 0 else "invalid_ciphertext", "ciphertexts",
                f"the batch declares {n} patients; this server takes 1 to {lim.max_batch} per "
                "request",
            )
        inline = (rec.scheme == "ckks" and packing == "replicated"
                  and n <= INLINE_MAX_PATIENTS and isinstance(ev, CKKSLinearEvaluator))
        # counted by what the ciphertexts can carry, not by what the header declares
        charged = charged_patients(rec.scheme, header, ev.requirements.normalized)
        wait = svc.store.take(owner, "patients", float(charged), rate=lim.rate_patients,
                              burst=max(lim.burst_patients, float(charged)))
        if wait:
            raise ApiError(
                429, "rate_limited", None,
                f"more than {lim.rate_patients:g} patients per second for token {owner!r}; "
                f"retry after {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        budget = svc.tokens.budget(owner)
        if budget is None:
            budget = lim.patient_budget

        def work(deadline: float) -> dict[str, Any]:
            pub = svc.public_material(body.key_id, rec.scheme)
            if pub is None or pub.requirements != ev.requirements.normalized:
                # gone from disk, damaged, or registered for an earlier model of this folder
                raise ApiError(404, "unknown_key_id", "key_id",
                               "this context is not registered for the model served now; "
                               "register it again with POST /v1/contexts")
            try:
                feats = load_features(data, pub, max_bytes=lim.max_body_bytes)
            except PrivmlError as exc:  # the ciphertexts are at fault
                raise ApiError(422, "invalid_ciphertext", "ciphertexts", str(exc)) from None
            try:  # booked before anything is computed or returned
                svc.store.spend(owner, charged, budget=budget)
            except BudgetExhaustedError as exc:
                raise ApiError(403, "budget_exhausted", None, str(exc)) from None
            pool = svc.pools.get(body.key_id, pub, ev)
            try:
                out = ev.predict(feats, pool=pool, deadline=deadline)  # type: ignore[arg-type]
                if isinstance(pub, PaillierPublicKey):
                    payload = out.to_bytes(pub.ciphertext_bytes)  # type: ignore[call-arg]
                else:
                    payload = out.to_bytes()
            except EvaluationTimeout:
                raise
            except PrivmlError as exc:  # CryptoError, UsageError: the ciphertexts are at fault
                raise ApiError(422, "invalid_ciphertext", "ciphertexts", str(exc)) from None
            finally:
                svc.pools.kick()
            return {
                "key_id": body.key_id,
                "n_patients": n,
                "scores": binascii.b2a_base64(payload, newline=False).decode("ascii"),
                "model_hash": served.hash,
            }

        return JSONResponse(await svc.run(work, inline=inline))

    app.add_middleware(_Guard, service=svc)
    return app
