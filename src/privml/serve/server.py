"""Running the service on uvicorn (``privml serve``)."""

from __future__ import annotations

import copy
import logging
import logging.config
import os
from typing import Any

from privml.serve.settings import SETTINGS_ENV, ServeSettings

log = logging.getLogger("privml.serve")


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging setup plus privml's service loggers, all on stderr.

    uvicorn's own access log is off (it would print query strings); privml's access log has the
    method, path, status, token name and time, and never a header or a body.
    """
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    lvl = level.upper()
    cfg["loggers"]["uvicorn"]["level"] = lvl
    for name in ("privml.serve", "privml.serve.access"):
        cfg["loggers"][name] = {"handlers": ["default"], "level": lvl, "propagate": False}
    return cfg


def app_from_env() -> Any:
    """App factory for worker processes: settings come from ``PRIVML_SERVE_SETTINGS``."""
    from privml.serve.app import create_app

    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the service with `privml serve`")
    return create_app(ServeSettings.from_json(text))


def run_server(settings: ServeSettings, *, log_level: str = "info") -> None:
    """Serve until interrupted. The model is loaded and compiled before the port opens, so a
    bad model folder fails here with a clear error rather than in a worker."""
    from privml.extras import require

    require("serve", "The prediction service (privml serve)")
    import uvicorn

    from privml.serve.app import create_app

    settings = settings.validate()
    logging.config.dictConfig(log_config(log_level))
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": log_config(log_level),
        "access_log": False,
        "server_header": False,
        "timeout_keep_alive": 15,
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
    uvicorn.run(
        "privml.serve.server:app_from_env", factory=True, workers=settings.workers, **common
    )
