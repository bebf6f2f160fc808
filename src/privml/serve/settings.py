"""Settings of the prediction service: where the model and the state live, limits, TLS, auth.

The same :class:`ServeSettings` object drives the in-process app
(:func:`privml.serve.app.create_app`) and every worker process of ``privml serve --workers N``
(it travels to them as JSON in the ``PRIVML_SERVE_SETTINGS`` environment variable).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from privml.errors import UsageError

#: Environment variable carrying the settings to worker processes.
SETTINGS_ENV = "PRIVML_SERVE_SETTINGS"
#: Environment variable naming the folder under which default state folders are made.
STATE_HOME_ENV = "PRIVML_STATE_HOME"
SCHEMES = ("ckks", "paillier")


def state_home() -> Path:
    """``$PRIVML_STATE_HOME``, else ``$XDG_STATE_HOME/privml``, else ``~/.local/state/privml``."""
    env = os.environ.get(STATE_HOME_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "privml"


def default_state_dir(model_dir: str | os.PathLike[str]) -> Path:
    """The service's own state folder for the model folder ``model_dir``:
    ``<state home>/serve/<folder name>-<hash of its absolute path>``.

    It lives outside the run folder, so re-running ``privml run --out`` on that folder (which
    replaces it) never touches tokens or registered contexts; the same folder path always maps
    to the same state, so tokens outlive a retrained model.
    """
    resolved = Path(model_dir).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", resolved.name)[:40] or "model"
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return state_home() / "serve" / f"{slug}-{digest}"


def check_state_dir(state_dir: Path, model_dir: str | os.PathLike[str]) -> None:
    """Refuse a state folder inside the model's run folder (a new run would replace it)."""
    try:
        Path(state_dir).expanduser().resolve().relative_to(Path(model_dir).expanduser().resolve())
    except ValueError:
        return
    raise UsageError(
        f"The 'state_dir' parameter {str(state_dir)!r} is inside the model folder "
        f"{str(model_dir)!r}: re-running `privml run` there would replace it and lose every "
        "token and registered context. Use a folder outside it, or leave --state-dir out "
        f"(default {str(default_state_dir(model_dir))!r})."
    )


def _number(name: str, value: object, *, lo: float, hi: float, integer: bool = False) -> None:
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"The {name!r} parameter must be {kind}. Got {value!r} instead.")
    if integer and not isinstance(value, int):
        raise UsageError(f"The {name!r} parameter must be {kind}. Got {value!r} instead.")
    if not (math.isfinite(float(value)) and lo <= value <= hi):
        raise UsageError(
            f"The {name!r} parameter must be in [{lo:g}, {hi:g}]. Got {value!r} instead."
        )


@dataclass(frozen=True)
class Limits:
    """Per-request and per-token limits of the service.

    Attributes:
        max_body_bytes: largest request body accepted, in bytes (413 above). A public context of
            the demo model is about 0.13 MB (0.17 MB in base64), a 1,000-patient CKKS batch about
            2 MB (2.6 MB in base64).
        max_batch: most patients in one prediction request (422 above).
        max_contexts_per_token: registered contexts one token may hold at once (403 above; a
            context is about 1-10 MB of server disk).
        rate_requests: sustained requests per second per token (token bucket; bursts of
            ``2 * rate_requests``). Counts every authenticated ``/v1`` request.
        rate_patients: sustained patients per second per token on ``/v1/predict`` (token bucket;
            bursts of ``max(2 * rate_patients, max_batch)``). Rate limits slow down a client
            that queries the model to copy it; they cannot prevent it (docs/serve.md).
        context_ttl_s: a registered context unused for this many seconds expires (the client
            registers it again).
        body_timeout_s: a request body not received completely within this many seconds is
            refused with 408.
        header_timeout_s: a connection whose request headers are not complete within this many
            seconds (from the connection, or from the first byte of a later request) is
            closed, before any authentication.
        eval_timeout_s: longest evaluation of one request; past it the request is answered 503
            and its work stopped at the next patient or chunk.
        eval_workers: threads evaluating requests (default: one per core); the event loop only
            parses headers, authenticates and routes, so health checks stay responsive.
        patient_budget: default lifetime budget of a token, in patients (None: no limit; a
            token's own budget, set with ``tokens add --budget``, takes precedence).
        output_resolution: standard deviation of the noise flooding on every returned score
            (logit units; default 2**-20): coarser scores reveal less per answer.
    """

    max_body_bytes: int = 32 << 20
    max_batch: int = 8192
    max_contexts_per_token: int = 16
    rate_requests: float = 100.0
    rate_patients: float = 20_000.0
    context_ttl_s: float = 7 * 86400.0
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    eval_timeout_s: float = 60.0
    eval_workers: int = 0
    patient_budget: int | None = None
    output_resolution: float = 2.0**-20

    def validate(self) -> Limits:
        _number("max_body_bytes", self.max_body_bytes, lo=4096, hi=1 << 31, integer=True)
        _number("max_batch", self.max_batch, lo=1, hi=1 << 20, integer=True)
        _number("max_contexts_per_token", self.max_contexts_per_token, lo=1, hi=1 << 16,
                integer=True)
        _number("rate_requests", self.rate_requests, lo=0.01, hi=1e9)
        _number("rate_patients", self.rate_patients, lo=0.01, hi=1e12)
        _number("context_ttl_s", self.context_ttl_s, lo=1.0, hi=10 * 365 * 86400.0)
        _number("body_timeout_s", self.body_timeout_s, lo=0.1, hi=3600.0)
        _number("header_timeout_s", self.header_timeout_s, lo=0.1, hi=3600.0)
        _number("eval_timeout_s", self.eval_timeout_s, lo=0.1, hi=86400.0)
        _number("eval_workers", self.eval_workers, lo=0, hi=256, integer=True)
        if self.patient_budget is not None:
            _number("patient_budget", self.patient_budget, lo=1, hi=1 << 62, integer=True)
        _number("output_resolution", self.output_resolution, lo=2.0**-30, hi=1.0)
        return self

    @property
    def workers(self) -> int:
        """Evaluation threads: ``eval_workers``, or one per core."""
        return self.eval_workers or max(1, os.cpu_count() or 1)

    @property
    def burst_requests(self) -> float:
        return 2.0 * self.rate_requests

    @property
    def burst_patients(self) -> float:
        return max(2.0 * self.rate_patients, float(self.max_batch))


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``privml serve`` needs.

    Attributes:
        model_dir: a run folder written by ``privml run`` (model.json + model.pt).
        state_dir: tokens, registered contexts, rate-limit state and budgets (default
            :func:`default_state_dir`, outside the run folder); shared by all worker
            processes, kept across restarts and retrained models.
        host, port: where to listen. Binding anything but a loopback address without TLS is
            refused unless ``allow_plaintext`` (bearer tokens would cross the network in clear).
        tls_cert, tls_key: PEM certificate chain and private key; both or neither.
        workers: uvicorn worker processes (they share ``state_dir``).
        auth: require bearer tokens (``privml serve tokens add NAME``). ``False`` is for local
            demos only and is announced with an :class:`InsecureOptionWarning`.
        schemes: HE schemes to accept; ``None`` = every scheme the model supports (CKKS always,
            Paillier for logistic regression).
        limits: see :class:`Limits`.
        allow_plaintext: allow a non-loopback bind without TLS (a TLS-terminating proxy in front).
    """

    model_dir: Path
    state_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    workers: int = 1
    auth: bool = True
    schemes: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)
    allow_plaintext: bool = False

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        return default_state_dir(self.model_dir)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def validate(self) -> ServeSettings:
        """Check every field; raise :class:`UsageError` naming the first bad one."""
        if not isinstance(self.model_dir, str | Path) or not str(self.model_dir):
            raise UsageError(f"The 'model' parameter must be a folder. Got {self.model_dir!r}.")
        if not Path(self.model_dir).is_dir():
            raise UsageError(
                f"The 'model' parameter must be a run folder written by `privml run`. "
                f"{str(self.model_dir)!r} is not a folder."
            )
        if not isinstance(self.host, str) or not self.host or len(self.host) > 255:
            raise UsageError(f"The 'host' parameter must be a host name or address. Got "
                             f"{self.host!r} instead.")
        _number("port", self.port, lo=0, hi=65535, integer=True)
        _number("workers", self.workers, lo=1, hi=64, integer=True)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError(
                "The 'tls_cert' and 'tls_key' parameters go together: pass both "
                "--tls-cert and --tls-key, or neither."
            )
        for name, p in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if p is not None and not Path(p).is_file():
                raise UsageError(f"The {name!r} parameter must be a PEM file. {str(p)!r} does "
                                 "not exist.")
        if self.schemes is not None:
            bad = [s for s in self.schemes if s not in SCHEMES]
            if bad or not self.schemes:
                raise UsageError(
                    f"The 'schemes' parameter must list schemes among {list(SCHEMES)}. "
                    f"Got {list(self.schemes)} instead."
                )
        if not self.tls and not self.allow_plaintext and not is_loopback(self.host):
            raise UsageError(
                f"The 'host' parameter {self.host!r} is not a loopback address and TLS is off: "
                "bearer tokens and model metadata would cross the network in clear. Pass "
                "--tls-cert/--tls-key (or --allow-plaintext behind a TLS-terminating proxy)."
            )
        if not isinstance(self.limits, Limits):
            raise UsageError(f"The 'limits' parameter must be Limits. Got {self.limits!r}.")
        self.limits.validate()
        check_state_dir(self.resolved_state_dir, self.model_dir)
        return self

    def to_json(self) -> str:
        d = asdict(self)
        for k in ("model_dir", "state_dir", "tls_cert", "tls_key"):
            d[k] = None if d[k] is None else str(d[k])
        d["schemes"] = None if self.schemes is None else list(self.schemes)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        d: dict[str, Any] = json.loads(text)
        for k in ("model_dir", "state_dir", "tls_cert", "tls_key"):
            d[k] = None if d.get(k) is None else Path(d[k])
        d["schemes"] = None if d.get("schemes") is None else tuple(d["schemes"])
        d["limits"] = Limits(**d.get("limits", {}))
        return cls(**d)

    def with_(self, **changes: Any) -> ServeSettings:
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
