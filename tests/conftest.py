"""Suite-wide fixtures: nothing a test does may touch the user's real configuration."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _absl_handler_on_the_real_stderr() -> None:
    """absl (dp-accounting's logging) makes its handler at import on the ``sys.stderr`` of that
    moment, which under pytest is a capture buffer; a later ``logging.config.dictConfig`` in the
    test process (a library's logging setup) shuts every handler down and absl's closes that
    buffer, breaking the capture of every later test.
    Pointed at the real stderr, absl's handler leaves it open (it never closes sys.stderr)."""
    try:
        import absl.logging
    except ImportError:
        return
    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_handler_on_the_real_stderr()


def _hypothesis_replays_fixed_examples() -> None:
    """Every property test replays the same derandomized examples, so a CI result never
    depends on the draw (as the fuzz harness does, tests/fuzz/hostile.py); tests that pass
    their own ``@settings`` inherit it. ``PRIVML_HYPOTHESIS_EXPLORE=1`` draws new examples
    (for a local search, not for CI)."""
    import os

    from hypothesis import settings

    settings.register_profile("privml-fixed", derandomize=True, database=None)
    settings.register_profile("privml-explore", derandomize=False)
    explore = os.environ.get("PRIVML_HYPOTHESIS_EXPLORE", "") not in ("", "0")
    settings.load_profile("privml-explore" if explore else "privml-fixed")


_hypothesis_replays_fixed_examples()


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point privml's per-user files (model signing key, key rings, service state) into a
    temporary folder.

    ``save_model`` signs every run folder with the deployment's Ed25519 key, created on first
    use under ``$XDG_CONFIG_HOME/privml``; without this the suite would write a key into the
    home directory of whoever runs it. Tests that need their own key still set
    ``PRIVML_SIGNING_KEY`` themselves.
    """
    home = tmp_path_factory.mktemp("xdg-config")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CONFIG_HOME", str(home))
    # the prediction service's default state folders (tokens, contexts) too
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
    mp.delenv("PRIVML_STATE_HOME", raising=False)
    mp.setenv("PRIVML_SIGNING_KEY", str(Path(home) / "privml" / "signing-key.pem"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_user_data(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the per-user privacy ledger (``$XDG_DATA_HOME/privml``) into a fresh folder.

    The default ledger is one file per user; every test gets its own, so no test spends from
    the real user's budget or from another test's (a budget belongs to the records, and the
    suite runs the same built-in datasets many times). Returns the folder.
    """
    data = tmp_path_factory.mktemp("xdg-data")
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    return data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding slow tests run first (each module's tests stay together and in order).

    With ``-n 2`` the workers take tests from one list; a long test drawn last keeps one worker
    busy while the other idles, and slow-first (longest-processing-time-first scheduling) keeps
    the end of the run short. Module order is otherwise unchanged, and a module's tests stay
    contiguous, so its module-scoped fixtures (live deployments) start once.
    """
    slow_modules = {item.module.__name__ for item in items
                    if item.module is not None and item.get_closest_marker("slow")}  # fmt: skip
    items.sort(key=lambda item: 0 if item.module is not None
               and item.module.__name__ in slow_modules else 1)  # fmt: skip
