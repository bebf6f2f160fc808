"""Precomputed randomness of the service, refilled in the background while the server is idle.

Every answer needs query-independent randomness that is expensive to make: for CKKS the answer
masks and encryptions of zero of :mod:`privml.he.protect` (about 1 ms each at N = 4096), for
Paillier the re-randomizing encryptions of zero (``r**n mod n**2``, 30-80 ms at 3072 bits).
:class:`PoolKeeper` keeps a pool per recently used key and a daemon thread that refills them
one element at a time; a request takes what it needs (one addition online) and computes on the
spot only when a pool runs dry (counted as a miss).

**Refills wait for quiet.** Making an element costs far more CPU than using one (a CKKS mask
takes ten times the evaluation of one patient, and holds Python's GIL inside SEAL), so the
refill thread works only when no request is in flight and none has ended for ``quiet_s``; a
burst of requests is served from the pool without competing with its own refill. A pool that
falls below ``low_water`` of its target is refilled at once, busy or not (a miss would cost the
request more than the competition does).

**Pools are warm before the first query.** Registering a context (``POST /v1/contexts``) or
checking that it is still registered (``GET /v1/contexts/{key_id}``, which every client does
before its first prediction) asks the thread to load the key and fill its pool.

Pools live in this process only: elements are never shared between workers or written anywhere
(reuse would break their security).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("privml.serve")

#: Pools kept per process (least recently used dropped first).
MAX_POOLS = 8
#: Single-patient answers each pool is kept ready for.
POOL_PATIENTS = 32
#: Seconds without a request in flight before the refill thread works.
QUIET_S = 0.05
#: Fraction of its target below which a pool is refilled even while requests are in flight.
LOW_WATER = 0.25

#: ``loader()`` -> ``(public material, evaluator)`` or None (the key is gone).
Loader = Callable[[], "tuple[Any, Any] | None"]


class PoolKeeper:
    """Answer pools per key id, with a background refill thread that yields to requests."""

    def __init__(self, *, patients: int = POOL_PATIENTS, max_pools: int = MAX_POOLS,
                 quiet_s: float = QUIET_S, low_water: float = LOW_WATER) -> None:
        self.patients = patients
        self.max_pools = max_pools
        self.quiet_s = quiet_s
        self.low_water = low_water
        self._pools: OrderedDict[str, Any] = OrderedDict()
        self._warm: OrderedDict[str, Loader] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight = 0
        self._last_end = 0.0

    # -- requests ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Marks a request in flight: the refill thread waits until the server is quiet."""
        with self._lock:
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1
                self._last_end = time.monotonic()
            self._wake.set()

    def get(self, key_id: str, public: Any, evaluator: Any) -> Any:
        """The pool for ``key_id`` (made empty on first use, then filled in the background)."""
        with self._lock:
            pool = self._pools.get(key_id)
            if pool is not None:
                self._pools.move_to_end(key_id)
                return pool
            if public.scheme == "paillier":
                from privml.he.paillier import PaillierRandomnessPool

                pool = PaillierRandomnessPool(
                    public, size=0, target=self.patients * evaluator.requirements.n_outputs
                )
            else:
                pool = evaluator.make_pool(public, patients=self.patients, chunks=2, fill=False)
            self._pools[key_id] = pool
            self._warm.pop(key_id, None)
            while len(self._pools) > self.max_pools:
                self._pools.popitem(last=False)
        self.start()
        self._wake.set()
        return pool

    def warm(self, key_id: str, loader: Loader) -> None:
        """Fill the pool of ``key_id`` ahead of its first request (``loader`` runs on the
        refill thread: it parses the stored context)."""
        with self._lock:
            if key_id in self._pools:
                self._pools.move_to_end(key_id)
                return
            self._warm[key_id] = loader
            self._warm.move_to_end(key_id)
            while len(self._warm) > self.max_pools:
                self._warm.popitem(last=False)
        self.start()
        self._wake.set()

    def kick(self) -> None:
        """Ask the refill thread to look again (after a request used some elements)."""
        self._wake.set()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per key id (16 hex digits): elements ready and misses so far (for tests and logs)."""
        with self._lock:
            pools = list(self._pools.items())
        return {k[:16]: {"ready": len(p), "misses": int(p.misses)} for k, p in pools}

    # -- the refill thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="privml-pools", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _quiet_for(self) -> float:
        """Seconds until the server counts as quiet (0: quiet now)."""
        with self._lock:
            if self._inflight:
                return self.quiet_s
            return max(0.0, self._last_end + self.quiet_s - time.monotonic())

    def _next_warm(self) -> tuple[str, Loader] | None:
        with self._lock:
            if not self._warm:
                return None
            return self._warm.popitem(last=True)  # the latest request first

    def _step(self) -> float:
        """Do one piece of work; returns how long to sleep before the next (0: go on)."""
        with self._lock:
            pools = list(reversed(self._pools.values()))  # the most recently used first
        low = [p for p in pools if p.deficit() and p.below(self.low_water)]
        wait = self._quiet_for()
        if low:
            low[0].top_up(1)
            return 0.0
        if wait > 0:
            return wait
        item = self._next_warm()
        if item is not None:
            key_id, loader = item
            loaded = loader()
            if loaded is not None:
                self.get(key_id, *loaded)
            return 0.0
        for pool in pools:
            if pool.deficit() > 0:
                pool.top_up(1)
                return 0.0
        return 5.0

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            import gmpy2

            gmpy2.get_context().allow_release_gil = True  # Paillier powmod off the GIL
        while not self._stop.is_set():
            try:
                pause = self._step()
            except Exception as exc:  # noqa: BLE001 - a broken pool must not kill the thread
                log.error("answer pool refill failed: %s", type(exc).__name__)
                pause = 1.0
            if pause > 0:
                self._wake.wait(timeout=pause)
                self._wake.clear()
