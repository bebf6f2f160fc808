"""Running the service on uvicorn (``privml serve``)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from privml.serve.settings import SETTINGS_ENV, ServeSettings

log = logging.getLogger("privml.serve")

#: Python's thread switch interval in a serving process, seconds (CPython's default: 0.005). A
#: thread that wants the GIL waits this long before it asks the holder to let go, so with the
#: default every hand-off between the event loop and an evaluation thread could wait 5 ms behind
#: the pool thread making an answer mask inside SEAL (docs/benchmarks_serve.md).
SWITCH_INTERVAL_S = 0.0005


def tune_process() -> None:
    """Settings of a serving process (called by the commands that serve, never on import)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


#: Loggers the service configures; nothing else in the process is touched.
SERVICE_LOGGERS = ("uvicorn", "uvicorn.error", "privml.serve", "privml.serve.access")
LOG_LEVEL_ENV = "PRIVML_SERVE_LOG_LEVEL"


class _ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` attaches (so a second call replaces, not adds)."""


def configure_logging(level: str = "info") -> None:
    """uvicorn's log format on stderr for uvicorn's and privml's service loggers, and nothing else.

    Not ``logging.config.dictConfig`` (which uvicorn uses when handed a ``log_config``): that
    shuts down and removes every handler of the process, so a program that embeds
    :func:`run_server` would lose its own logging. uvicorn's own access log is off (it would
    print query strings); privml's access log has the method, path, status, token name and time,
    and never a header or a body.
    """
    from uvicorn.logging import DefaultFormatter

    lvl = level.upper()
    for name in SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _ServiceHandler)]:
            logger.removeHandler(h)
        if name == "uvicorn.error":  # propagates to "uvicorn", as in uvicorn's own setup
            logger.setLevel(lvl)
            continue
        handler = _ServiceHandler(sys.stderr)
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
        logger.addHandler(handler)
        logger.setLevel(lvl)
        logger.propagate = False


def header_timeout_protocol(seconds: float) -> Any:
    """uvicorn's httptools protocol, closing a connection whose request headers do not arrive
    within ``seconds`` (from the connection, or from the first byte of each later request).

    uvicorn itself only times out idle keep-alive connections: a client that opens a connection
    and sends headers slowly (or never finishes them) would otherwise hold it, unauthenticated,
    for as long as it likes. The body is then bounded by the app's own body timeout."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closed a connection whose request headers took over %gs", seconds)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def __getattr__(name: str) -> Any:
    """``privml.serve.server:HeaderTimeoutProtocol`` for uvicorn's worker processes (their
    settings arrive in ``PRIVML_SERVE_SETTINGS``)."""
    if name == "HeaderTimeoutProtocol":
        text = os.environ.get(SETTINGS_ENV)
        seconds = ServeSettings.from_json(text).limits.header_timeout_s if text else 10.0
        return header_timeout_protocol(seconds)
    raise AttributeError(name)


def app_from_env() -> Any:
    """App factory for worker processes: settings come from ``PRIVML_SERVE_SETTINGS``."""
    from privml.serve.app import create_app

    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the service with `privml serve`")
    tune_process()
    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    return create_app(ServeSettings.from_json(text))


def run_server(settings: ServeSettings, *, log_level: str = "info") -> None:
    """Serve until interrupted. The model is loaded and compiled before the port opens, so a
    bad model folder fails here with a clear error rather than in a worker."""
    from privml.extras import require

    require("serve", "The prediction service (privml serve)")
    import uvicorn

    from privml.serve.app import create_app

    settings = settings.validate()
    tune_process()
    configure_logging(log_level)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # configure_logging, here and in each worker (app_from_env)
        "log_level": log_level,
        "access_log": False,
        "server_header": False,
        "timeout_keep_alive": 15,
        "http": header_timeout_protocol(settings.limits.header_timeout_s),
        "timeout_graceful_shutdown": 10,  # then open connections are closed, not waited for
        "ssl_certfile": str(settings.tls_cert) if settings.tls_cert else None,
        "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None,
    }
    app = create_app(settings)  # validates the model, the state folder and the options
    scheme = "https" if settings.tls else "http"
    log.info(
        "serving model %s... (%s) on %s://%s:%d with %d worker(s); state in %s",
        app.state.service.served.hash[:16], ", ".join(sorted(app.state.service.served.evaluators)),
        scheme, settings.host, settings.port, settings.workers, settings.resolved_state_dir,
    )
    if settings.workers == 1:
        uvicorn.run(app, **common)
        return
    del app
    os.environ[SETTINGS_ENV] = settings.to_json()
    os.environ[LOG_LEVEL_ENV] = log_level
    common["http"] = "privml.serve.server:HeaderTimeoutProtocol"
    uvicorn.run(
        "privml.serve.server:app_from_env", factory=True, workers=settings.workers, **common
    )
