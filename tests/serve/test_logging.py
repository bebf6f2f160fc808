"""The service's logging setup touches only its own loggers."""

from __future__ import annotations

import io
import logging

from privml.serve.server import SERVICE_LOGGERS, configure_logging


def test_configuring_the_service_logs_leaves_the_programs_own_handlers_open() -> None:
    # logging.config.dictConfig (what uvicorn does with a log_config) closes every handler of
    # the process; a program embedding run_server would lose its own logs
    buf = io.StringIO()
    mine = logging.StreamHandler(buf)
    app_log = logging.getLogger("embedding.app")
    app_log.addHandler(mine)
    app_log.setLevel(logging.INFO)
    root_before = list(logging.getLogger().handlers)
    try:
        configure_logging("info")
        configure_logging("warning")  # a second call replaces its handlers, never adds
        app_log.info("still here")
        assert "still here" in buf.getvalue()
        assert logging.getLogger().handlers == root_before
        for name in SERVICE_LOGGERS:
            kinds = [type(h).__name__ for h in logging.getLogger(name).handlers]
            assert kinds.count("_ServiceHandler") == (0 if name == "uvicorn.error" else 1), name
        assert logging.getLogger("privml.serve").level == logging.WARNING
    finally:
        app_log.removeHandler(mine)
        configure_logging("info")
