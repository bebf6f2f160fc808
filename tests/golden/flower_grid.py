"""The Flower coordinator and the sites' ClientApps over the in-memory grid, on the golden data."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from privml.config import parse_config
from privml.fl.flower import site as site_module
from privml.fl.flower.client_app import make_client_app
from privml.fl.flower.server_app import Coordinator
from privml.fl.flower.site import SiteRuntime
from tests.fl.fake_grid import FakeGrid
from tests.golden.cases import BASE, _federation

N_SITES = 4


def flower_config(training: dict[str, Any]) -> Any:
    return parse_config(
        {
            "data": {
                "target": "target",
                "sites": [{"name": f"site_{i}", "path": f"site_{i}.csv"} for i in range(N_SITES)],
            },
            "training": {**BASE, **training},
            "inference": {"encrypted": False},
        }
    )


def run_flower_in_memory(training: dict[str, Any]) -> Any:
    """Train ``training`` over the golden data's first sites with the Flower coordinator."""
    fed = _federation("bc", N_SITES)
    by_name = {s.name: (s, i) for i, s in enumerate(fed.sites)}

    def load_site(config: Any, site: str) -> Any:
        s, i = by_name[site]
        return s, fed.encoder, fed.task, i

    cfg = flower_config(training)
    mp = pytest.MonkeyPatch()
    mp.setattr(site_module, "load_site", load_site)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    try:
        nodes = {}
        for i, s in enumerate(fed.sites):
            rt = SiteRuntime(cfg, s.name)
            app = make_client_app(lambda _ctx, _rt=rt: _rt)
            nodes[100 + i] = (app, Context(42, 100 + i, {"site": s.name}, RecordDict(), {}))
        return Coordinator(FakeGrid(nodes), cfg).run().result
    finally:
        torch.set_num_threads(before)
        TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None  # type: ignore[assignment]
        mp.undo()


__all__ = ["flower_config", "run_flower_in_memory"]
