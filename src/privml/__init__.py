"""privml: federated, differentially private, homomorphically served machine learning.

    import privml

    result = privml.run("study.toml")      # a path, a dict shaped like the TOML, or a Config
    result.to_frame()                      # per-site and pooled metrics (pandas)
    privml.load_run("runs/study-...")      # the same from a run folder

Names are imported on first use, so ``import privml`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from privml.api import Metrics, RunResult, load_run, run
    from privml.config import Config, load_config

_WHERE = {
    "run": "privml.api",
    "load_run": "privml.api",
    "RunResult": "privml.api",
    "Metrics": "privml.api",
    "Config": "privml.config",
    "load_config": "privml.config",
}

__all__ = ["Config", "Metrics", "RunResult", "__version__", "load_config", "load_run", "run"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'privml' has no attribute {name!r}")
