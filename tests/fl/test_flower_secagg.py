"""SecAgg+ on the Flower engine (Flower's own SecAggPlusWorkflow and secaggplus_mod), over the
in-memory grid of test_flower_coordinator.py: every message goes through Flower's own
serialization, and the grid keeps every reply the coordinator could pull, i.e. everything
the server side receives. The real deployment (SuperLink, SuperNodes, a SuperNode killed
mid-round) is in test_flower_deploy_secagg.py.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from privml.errors import ConfigError
from privml.fl.flower.server_app import Coordinator
from privml.fl.flower.site import SiteRuntime, site_names
from tests.fl.fake_grid import FakeGrid
from tests.fl.test_churn import simulate_missing
from tests.fl.test_flower_coordinator import (  # noqa: F401 (fixtures)
    _config,
    _grid,
    one_torch_thread,
    task_identity,
)

CLIP = 50.0  # above every demo update's norm: nothing is clipped, the sum is the plain one


def _secagg(rounds: int = 3, **training: Any) -> Any:
    return _config(rounds, secure_aggregation="secagg+", max_update_norm=CLIP, **training)


@pytest.fixture(scope="module")
def runtimes() -> dict[str, SiteRuntime]:
    cfg = _secagg()
    return {name: SiteRuntime(cfg, name) for name in site_names(cfg)}


def _tolerance(cfg: Any, rounds: int) -> float:
    """What quantization may move a parameter by over ``rounds`` rounds: a few quantization
    steps of the clipping range per round (each of 3 sites rounds each coordinate by at most
    one step of 2 c / T, the average divides by a total weight of about 2)."""
    t = cfg.training
    step = 2 * CLIP / t.secagg_quantization_range
    return 10 * 3 * step * rounds


def _vectors(msg: Message) -> Iterable[np.ndarray]:
    """Every numeric vector in a message: arrays, ``np.save``/Flower array bytes, int lists."""
    if not msg.has_content():  # an error reply
        return
    for rec in msg.content.array_records.values():
        for arr in rec.values():
            yield np.asarray(arr.numpy(), dtype=np.float64).ravel()
    for rec in msg.content.config_records.values():
        for value in rec.values():
            items = value if isinstance(value, list) else [value]
            if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                yield np.asarray(items, dtype=np.float64)
                continue
            for v in items:
                if isinstance(v, bytes):
                    with contextlib.suppress(ValueError, OSError, EOFError):
                        arr = np.load(io.BytesIO(v), allow_pickle=False)
                        yield np.asarray(arr, dtype=np.float64).ravel()


def _true_updates(grid: FakeGrid, runtimes: dict[str, SiteRuntime]) -> list[np.ndarray]:
    """Each site's true update of each round, recomputed from the training requests sent."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    out = []
    by_node = {node: ctx.node_config["site"] for node, (_, ctx) in grid.nodes.items()}
    for msg in grid.sent:
        if "fitins.config" not in msg.content.config_records:
            continue
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        params = parameters_to_ndarrays(ins.parameters)[0]
        rt = runtimes[by_node[msg.metadata.dst_node_id]]
        out.append(rt.train(params, rnd=int(ins.config["round"])))
    return out


#: Bound on |correlation| between a received vector and a true update. A masked vector is
#: uniform, independent of the update: for 31 parameters |r| > 0.85 has probability 1.4e-9
#: (t-distribution, 29 degrees of freedom), under 2e-7 over the at most 81 pairs a test
#: compares (0.8 gave 5e-6); an unmasked update correlates above 0.99 (the control below).
MAX_CORRELATION = 0.85


def _max_correlation(replies: list[Message], updates: list[np.ndarray]) -> float:
    n = updates[0].size
    worst = 0.0
    for msg in replies:
        for v in _vectors(msg):
            if v.size != n or np.ptp(v) == 0:
                continue
            for u in updates:
                worst = max(worst, abs(float(np.corrcoef(v, u)[0, 1])))
    return worst


def test_secagg_on_flower_equals_the_plain_run_and_hides_every_update(
    runtimes: dict[str, SiteRuntime],
) -> None:
    cfg = next(iter(runtimes.values())).config
    grid = _grid(runtimes)
    res = Coordinator(grid, cfg).run().result
    plain = simulate_missing(_config(3), {})
    # (a) the model of the plain run, within the quantization error
    np.testing.assert_allclose(res.params.numpy(), plain.params.numpy(), rtol=0,
                               atol=_tolerance(cfg, 3))  # fmt: skip
    assert res.metrics["accuracy"] == pytest.approx(plain.metrics["accuracy"], abs=0.01)
    assert [r.clients for r in res.history] == [3, 3, 3]
    assert all(r.skipped is None for r in res.history)
    sa = res.extra["federation"]["secure_aggregation"]
    assert sa["implementation"] == "flower" and sa["parameters"]["threshold"] == 2
    # (b) what the server received: no vector correlates with any site's true update, and
    # the masked vectors are spread over the whole modulus (a plain quantized vector stays
    # below the quantization range)
    updates = _true_updates(grid, runtimes)
    assert len(updates) == 9
    assert _max_correlation(grid.delivered, updates) < MAX_CORRELATION
    masked = [v for m in grid.delivered for v in _vectors(m) if v.size == updates[0].size]
    assert len(masked) == 9
    assert all(v.max() > cfg.training.secagg_quantization_range * 16 for v in masked)
    # positive control: the same detector reads the plain engine's replies at once
    plain_grid = _grid({n: SiteRuntime(_config(1), n) for n in runtimes})
    Coordinator(plain_grid, _config(1)).run()
    plain_updates = _true_updates_plain(plain_grid)
    assert _max_correlation(plain_grid.delivered, plain_updates) > 0.99


def _true_updates_plain(grid: FakeGrid) -> list[np.ndarray]:
    from privml.fl.flower import protocol as P

    return [u for m in grid.delivered
            if (u := P.unpack(m.content, P.RESULT, P.UPDATE)) is not None]  # fmt: skip


def _dropping(runtimes: dict[str, SiteRuntime], gone: dict[str, tuple[int, str]]) -> FakeGrid:
    """A grid where site -> (round, stage): the site's SuperNode dies when that stage's
    request of that round reaches it (no reply, offline from then on)."""
    box: list[FakeGrid] = []
    rounds: dict[int, int] = {}

    def tamper(site: str, received: Message, reply: Message) -> Message | None:
        node = received.metadata.dst_node_id
        if node in box[0].offline:
            return None
        sent = box[0].sent[-1]  # as sent: Flower's mod pops the stage from what it reads
        cfgs = sent.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = cfgs.get(Key.STAGE) if cfgs is not None else None
        if stage == Stage.SETUP:
            rounds[node] = int(received.metadata.group_id)
        if site in gone and (rounds.get(node), stage) == gone[site]:
            box[0].offline.add(node)
            return None
        return reply

    grid = _grid(runtimes, tamper=tamper)
    box.append(grid)
    return grid


@pytest.mark.parametrize(
    ("stage", "clients", "recovered", "missed"),
    [
        # gone before sending its key shares: nobody masked with it, it is left out
        (Stage.SHARE_KEYS, [3, 2, 2], [0, 0, 0], {2: {2}, 3: {2}}),
        # gone after its key shares, before its masked vector: the others' pairwise masks
        # with it are rebuilt from its mask-key shares
        (Stage.COLLECT_MASKED_VECTORS, [3, 2, 2], [0, 1, 0], {2: {2}, 3: {2}}),
        # gone after its masked vector: its self mask is rebuilt from its seed's shares and
        # its update is in the sum
        (Stage.UNMASK, [3, 3, 2], [0, 1, 0], {3: {2}}),
    ],
)
def test_a_site_gone_mid_round_is_recovered_from_shares(
    runtimes: dict[str, SiteRuntime], stage: str, clients: list[int], recovered: list[int],
    missed: dict[int, set[int]],
) -> None:  # fmt: skip
    """hospital_c's SuperNode dies at a stage of round 2 (no reply, offline from then on):
    the round completes with what SecAgg+ can recover, round 3 runs without it, and the
    model equals the simulation in which it missed the same rounds."""
    cfg = next(iter(runtimes.values())).config
    grid = _dropping(runtimes, {"hospital_c": (2, stage)})
    res = Coordinator(grid, cfg, liveness_interval=0.05).run().result
    assert [r.skipped for r in res.history] == [None, None, None]
    assert [r.clients for r in res.history] == clients
    sa = res.extra["federation"]["secure_aggregation"]
    assert [r["recovered"] for r in sa["per_round"]] == recovered
    ref = simulate_missing(_config(3), missed)
    np.testing.assert_allclose(res.params.numpy(), ref.params.numpy(), rtol=0,
                               atol=_tolerance(cfg, 3))  # fmt: skip


def test_beyond_the_threshold_the_round_is_skipped_never_a_wrong_sum(
    runtimes: dict[str, SiteRuntime],
) -> None:
    """Two of three sites die after masking in round 2: one share of each secret is left,
    below the threshold of 2; the round is skipped (the model does not move) and so is
    round 3 (one site left: nothing to hide a single update in)."""
    cfg = next(iter(runtimes.values())).config
    grid = _dropping(runtimes, {"hospital_b": (2, Stage.UNMASK),
                                "hospital_c": (2, Stage.UNMASK)})  # fmt: skip
    res = Coordinator(grid, cfg, liveness_interval=0.05).run().result
    assert [r.skipped for r in res.history] == [
        None, "secagg_too_few_shares", "secagg_too_few_sites"]  # fmt: skip
    assert res.extra["updates"]["skipped_rounds"] == {
        "secagg_too_few_shares": [2], "secagg_too_few_sites": [3]}  # fmt: skip
    one = simulate_missing(_config(1), {})
    np.testing.assert_allclose(res.params.numpy(), one.params.numpy(), rtol=0,
                               atol=_tolerance(cfg, 1))  # fmt: skip


class _LyingServer(FakeGrid):
    """A coordinator that rewrites its SecAgg+ requests before they leave (``edit``)."""

    edit: Any = None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        out = []
        for m in messages:
            cfgs = m.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfgs is not None and self.edit is not None:
                self.edit(cfgs)
            out.append(m)
        return super().push_messages(out)


def _lying(runtimes: dict[str, SiteRuntime], edit: Any) -> _LyingServer:
    base = _grid(runtimes)
    grid = _LyingServer(base.nodes)
    grid.edit = edit
    return grid


@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        ("threshold", "threshold"),
        ("modulus", "modulus"),
        ("weight", "max_weight"),
        ("both", "both as senders and as dropped"),
    ],
)
def test_sites_refuse_a_server_that_departs_from_the_protocol(
    runtimes: dict[str, SiteRuntime], lie: str, reason: str
) -> None:
    """A server that lowers the threshold (fewer colluders rebuild a secret), changes the
    modulus or the weight bound (wrap-around), or names a neighbour both as sender and as
    dropped in the unmask request (both of its secrets: its vector unmasked alone) is refused
    by every site; the round is skipped, nothing is unmasked."""
    cfg = next(iter(runtimes.values())).config

    def edit(cfgs: Any) -> None:
        stage = cfgs.get(Key.STAGE)
        if stage == Stage.SETUP and lie == "threshold":
            cfgs[Key.THRESHOLD] = 1
        elif stage == Stage.SETUP and lie == "modulus":
            cfgs[Key.MOD_RANGE] = 1 << 23
        elif stage == Stage.SETUP and lie == "weight":
            cfgs[Key.MAX_WEIGHT] = 1.0
        elif stage == Stage.UNMASK and lie == "both":
            active = list(cfgs[Key.ACTIVE_NODE_ID_LIST])
            cfgs[Key.DEAD_NODE_ID_LIST] = active[:1]

    grid = _lying(runtimes, edit)
    res = Coordinator(grid, cfg).run().result
    skip = "secagg_too_few_shares" if lie == "both" else "secagg_too_few_sites"
    assert [r.skipped for r in res.history] == [skip] * 3
    errors = [m.error.reason for m in grid.delivered if m.has_error()]
    assert len(errors) == 9 and all(reason in e for e in errors), errors


def test_what_flower_secagg_cannot_run_is_refused() -> None:
    with pytest.raises(ConfigError, match="above 2\\*\\*32"):
        _secagg(engine="flower", secagg_modulus=1 << 40)
    with pytest.raises(ConfigError, match="distributed DP"):
        raw = _secagg(engine="flower").resolved()
        raw["privacy"].update({"mode": "client", "epsilon": 1.0, "clip": 1.0})
        from privml.config import parse_config

        parse_config(raw)
    assert _secagg(engine="flower").training.engine == "flower"


def test_flower_masks_depend_on_32_bits_of_each_key() -> None:
    """The documented limit of Flower's implementation: its mask generator seeds NumPy's
    Mersenne Twister with the XOR of the key's 32-bit words, so two different 256-bit keys
    with the same fold give the same mask (2**32 candidates per mask, not 2**256)."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    rng = np.random.default_rng(0)
    k1 = rng.bytes(32)
    words = [int.from_bytes(k1[i : i + 4], "little") for i in range(0, 32, 4)]
    flip = 0x5A5A5A5A
    words[0] ^= flip
    words[1] ^= flip  # the XOR fold is unchanged
    k2 = b"".join(w.to_bytes(4, "little") for w in words)
    assert k1 != k2
    m1 = pseudo_rand_gen(k1, 1 << 32, [(1000,)])[0]
    m2 = pseudo_rand_gen(k2, 1 << 32, [(1000,)])[0]
    np.testing.assert_array_equal(m1, m2)
