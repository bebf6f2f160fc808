"""The client's key ring (files, modes, reuse, passphrase) and its input checks; the command
line of tokens and of the server's options."""

from __future__ import annotations

import json
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.serve.client import KeyRing, PredictionClient, default_keys_dir
from privml.serve.model import ServedModel
from tests.serve.conftest import PASSPHRASE, Trained, trusting


@pytest.fixture(scope="module")
def reqs(trained: Trained, signing_key: Path) -> dict:
    with trusting(signing_key):
        served = ServedModel.load(trained.folder, schemes=("ckks",))
    return served.evaluators["ckks"].requirements.to_dict()


def test_keys_are_created_once_private_and_reused(tmp_path: Path, reqs: dict) -> None:
    ring = KeyRing(tmp_path / "keys", passphrase=PASSPHRASE)
    keys, created = ring.get("ckks", reqs)
    assert created
    folder = ring.path_for("ckks", reqs)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    for name in ("secret.key", "public.bin", "meta.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key_id"] == keys.public.key_id and meta["requirements"] == reqs
    # the secret key is not in the clear on disk
    from privml.he import _seal

    for sk in keys.secret.secret_keys.values():  # type: ignore[union-attr]
        assert _seal.save_bytes(sk)[64:96] not in (folder / "secret.key").read_bytes()
    # a second key ring (a later run) loads the same keys, and they work together
    again, created = KeyRing(tmp_path / "keys", passphrase=PASSPHRASE).get("ckks", reqs)
    assert not created and again.public.key_id == keys.public.key_id
    x = np.full((1, int(reqs["n_features"])), 0.25)
    ct = he.encrypt_features(again, x)
    assert ct.key_id == keys.public.key_id
    # other requirements: other keys
    other = json.loads(json.dumps(reqs))
    other["layouts"]["columns"]["scale_bits"] += 1
    assert ring.path_for("ckks", other) != folder


def test_wrong_passphrase_missing_passphrase_and_loose_modes_are_refused(
    tmp_path: Path, reqs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    KeyRing(tmp_path, passphrase=PASSPHRASE).get("ckks", reqs)
    with pytest.raises(CryptoError, match="wrong passphrase"):
        KeyRing(tmp_path, passphrase="not the passphrase").get("ckks", reqs)
    monkeypatch.delenv("PRIVML_KEY_PASSPHRASE", raising=False)
    with pytest.raises(UsageError, match="PRIVML_KEY_PASSPHRASE"):
        KeyRing(tmp_path).get("ckks", reqs)
    secret = KeyRing(tmp_path).path_for("ckks", reqs) / "secret.key"
    secret.chmod(0o644)
    with pytest.raises(CryptoError, match="readable by other users"):
        KeyRing(tmp_path, passphrase=PASSPHRASE).get("ckks", reqs)
    asked: list[bool] = []
    secret.chmod(0o600)

    def ask(new: bool) -> str:
        asked.append(new)
        return PASSPHRASE

    KeyRing(tmp_path, passphrase=ask).get("ckks", reqs)
    assert asked == [False]


def test_default_keys_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRIVML_KEYS_DIR", str(tmp_path / "k"))
    assert default_keys_dir() == tmp_path / "k"
    monkeypatch.delenv("PRIVML_KEYS_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_keys_dir() == tmp_path / "cfg" / "privml" / "keys"


def test_client_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'server'"):
        PredictionClient("ftp://x", keys_dir=tmp_path)
    with pytest.raises(UsageError, match="'scheme'"):
        PredictionClient("http://127.0.0.1:1", scheme="rsa", keys_dir=tmp_path)
    with pytest.raises(UsageError, match="'batch_size'"):
        PredictionClient("http://127.0.0.1:1", batch_size=0, keys_dir=tmp_path)
    with pytest.warns(InsecureOptionWarning, match="plain HTTP"):
        PredictionClient("http://hospital.example", keys_dir=tmp_path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PredictionClient("http://127.0.0.1:1", keys_dir=tmp_path).close()
    from privml.serve.client import ServiceError

    with PredictionClient("http://127.0.0.1:1", keys_dir=tmp_path, timeout=2) as c, \
            pytest.raises(ServiceError, match="cannot reach"):
        c.info()


def test_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from privml.cli import main
    from privml.serve.tokens import TokenStore

    state = tmp_path / "state"
    main(["serve", "tokens", "add", "clinic-a", "--state-dir", str(state)])
    token = capsys.readouterr().out.strip()
    assert TokenStore(state).verify(token) == "clinic-a"
    main(["serve", "tokens", "list", "--state-dir", str(state), "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed] == ["clinic-a"] and token not in json.dumps(listed)
    main(["serve", "tokens", "revoke", "clinic-a", "--state-dir", str(state)])
    assert TokenStore(state).verify(token) is None
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "tokens", "revoke", "clinic-a", "--state-dir", str(state)])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "tokens", "add", "x"])  # neither --model nor --state-dir
    assert exit_.value.code == 2


def test_serve_command_refuses_bad_options(trained: Trained, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from privml.cli import main

    for argv, needle in (
        (["serve"], "--model"),
        (["serve", "--model", str(trained.folder), "--host", "0.0.0.0"], "TLS"),
        (["serve", "--model", str(trained.folder), "--tls-cert", str(tmp_path / "c.pem")],
         "tls_cert"),
        (["serve", "--model", str(tmp_path)], "model.json"),
        (["serve", "--model", str(trained.folder), "--schemes", "rsa"], "schemes"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert needle in capsys.readouterr().err, argv
