"""Suite-wide fixtures: nothing a test does may touch the user's real configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


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
