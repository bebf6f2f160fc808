"""Worker processes for the ledger concurrency tests (spawned; import only the ledger).

Kept out of the test module so a spawned child imports the standard library and
``privml.dp.ledger`` only, which keeps 40 concurrent processes fast on two cores.
"""

from __future__ import annotations

import os
from typing import Any


def query_worker(
    path: str, index: int, barrier: Any, results: Any, records: list[int] | None = None
) -> None:
    """One query process: wait for the others, charge 0.1, then 'release' (report the id).

    With ``records``, the site's budget is kept per record (the worker's own record set)."""
    from privml.dp.ledger import PrivacyLedger
    from privml.errors import BudgetExceededError

    ledger = PrivacyLedger(
        path, dataset="heart", budget_epsilon=1.5, budget_delta=0.0,
        records=None if records is None else {"a": records},
    )  # fmt: skip
    barrier.wait()
    try:
        record = ledger.charge(site="a", epsilon=0.1, label=f"mean(age) #{index}")
    except BudgetExceededError:
        results.put((index, None))
        return
    results.put((index, record.id))  # released only after the charge committed


def charge_forever(path: str, released_path: str) -> None:
    """Charges and 'releases' in a loop until killed; each release is fsync'ed to a file."""
    from privml.dp.ledger import PrivacyLedger

    ledger = PrivacyLedger(path, dataset="heart", budget_epsilon=1e6, budget_delta=0.0)
    with open(released_path, "a", encoding="utf-8") as out:
        i = 0
        while True:
            record = ledger.charge(site="a", epsilon=0.01, label=f"q{i}", metadata={"i": i})
            out.write(f"{record.id}\n")
            out.flush()
            os.fsync(out.fileno())
            i += 1
