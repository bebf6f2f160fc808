"""Precomputed randomness of the service, refilled in the background.

Every answer needs query-independent randomness that is expensive to make: for CKKS the answer
masks and encryptions of zero of :mod:`privml.he.protect` (about 1 ms each at N = 4096), for
Paillier the re-randomizing encryptions of zero (``r**n mod n**2``, about 10 ms at 3072 bits).
:class:`PoolKeeper` keeps a pool per recently used key and a daemon thread that refills them
one element at a time while the service is idle between requests; a request takes what it
needs (one addition online) and computes on the spot only when a pool runs dry (counted as a
miss). Pools live in this process only: elements are never shared between workers or written
anywhere (reuse would break their security).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Any

log = logging.getLogger("privml.serve")

#: Pools kept per process (least recently used dropped first).
MAX_POOLS = 8
#: Single-patient answers each pool is kept ready for.
POOL_PATIENTS = 32


class PoolKeeper:
    """Answer pools per key id, with a background refill thread."""

    def __init__(self, *, patients: int = POOL_PATIENTS, max_pools: int = MAX_POOLS) -> None:
        self.patients = patients
        self.max_pools = max_pools
        self._pools: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            while len(self._pools) > self.max_pools:
                self._pools.popitem(last=False)
        self.start()
        self._wake.set()
        return pool

    def kick(self) -> None:
        """Ask the refill thread to look again (after a request used some elements)."""
        self._wake.set()

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

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            import gmpy2

            gmpy2.get_context().allow_release_gil = True  # Paillier powmod off the GIL
        while not self._stop.is_set():
            with self._lock:
                pools = list(self._pools.values())
            busy = False
            for pool in pools:
                if self._stop.is_set():
                    return
                try:
                    if pool.deficit() > 0:
                        pool.top_up(1)
                        busy = True
                except Exception as exc:  # noqa: BLE001 - a broken pool must not kill the thread
                    log.error("answer pool refill failed: %s", type(exc).__name__)
            if not busy:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
