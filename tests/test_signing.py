"""Signed model artifacts: a run folder verifies; any change, another key, or no signature is
refused by `privml verify` (exit 4) and by every loader."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from privml.artifacts import load_model, save_model
from privml.cli import main
from privml.config import load_config
from privml.data.federation import load_federation
from privml.errors import CryptoError, SignatureError, UsageError
from privml.fl.engine import init_params
from privml.pipeline import model_spec
from privml.signing import (
    default_key_path,
    generate_signing_key,
    load_signing_key,
    sign_model_dir,
    verify_model_dir,
)


@pytest.fixture(autouse=True)
def _signing_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the user's real deployment key: every test gets its own key folder."""
    d = tmp_path_factory.mktemp("keys")
    monkeypatch.setenv("PRIVML_SIGNING_KEY", str(d / "signing-key.pem"))
    monkeypatch.delenv("PRIVML_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("PRIVML_SIGNING_PASSPHRASE", raising=False)


@pytest.fixture(scope="module")
def demo_parts():  # type: ignore[no-untyped-def]
    cfg = load_config(None)
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    _, params = init_params(spec, 0)
    return spec, params, fed


@pytest.fixture
def folder(tmp_path: Path, demo_parts) -> Path:  # type: ignore[no-untyped-def]
    spec, params, fed = demo_parts
    d = tmp_path / "run"
    d.mkdir()
    save_model(d, spec, params, fed.encoder, fed.task, config_hash="0" * 64)
    return d


def test_saved_models_are_signed_and_load(folder: Path) -> None:
    assert (folder / "model.sig").is_file()
    key = default_key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not str(key).startswith(str(folder))
    v = verify_model_dir(folder)
    assert v.trusted and set(v.files) == {"model.json", "model.pt"}
    model, *_ = load_model(folder)
    assert isinstance(model, torch.nn.Module)


def test_any_change_is_refused(folder: Path, tmp_path: Path) -> None:
    for name, change in [
        ("model.pt", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
        ("model.json", lambda b: b.replace(b'"privml_version"', b'"privml_version" ', 1)),
    ]:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(folder, copy)
        p = copy / name
        p.write_bytes(change(p.read_bytes()))
        if name == "model.json":  # keep the weights hash consistent: only the signature knows
            with pytest.raises(SignatureError, match="changed after signing"):
                load_model(copy)
        with pytest.raises((SignatureError, Exception)):
            load_model(copy)
        with pytest.raises(SignatureError):
            verify_model_dir(copy)
    forged = tmp_path / "forged"
    shutil.copytree(folder, forged)
    sig = json.loads((forged / "model.sig").read_text())
    sig["files"]["model.pt"] = "0" * 64
    (forged / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model_dir(forged)


def test_unsigned_or_foreign_key_is_refused(folder: Path, tmp_path: Path, monkeypatch) -> None:
    unsigned = tmp_path / "unsigned"
    shutil.copytree(folder, unsigned)
    (unsigned / "model.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        load_model(unsigned)
    # an attacker re-signs tampered weights with their own fresh key
    resigned = tmp_path / "resigned"
    shutil.copytree(folder, resigned)
    sign_model_dir(resigned, tmp_path / "attacker" / "k.pem")
    with pytest.raises(SignatureError, match="not trusted"):
        load_model(resigned)
    ok = verify_model_dir(resigned, require_trusted=False)
    assert not ok.trusted
    # a verifier that pins the attacker's key accepts it, and only it
    monkeypatch.setenv("PRIVML_TRUSTED_KEYS", str(tmp_path / "attacker" / "k.pub"))
    assert verify_model_dir(resigned).trusted
    with pytest.raises(SignatureError, match="not trusted"):
        verify_model_dir(folder)


def test_key_handling(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(CryptoError, match="inside the folder"):
        sign_model_dir(folder, folder / "key.pem")
    priv, pub = generate_signing_key(tmp_path / "k" / "key.pem", passphrase="s3cret")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and pub.is_file()
    with pytest.raises(UsageError, match="already exists"):
        generate_signing_key(priv)
    with pytest.raises(CryptoError, match="encrypted"):
        load_signing_key(priv)
    assert load_signing_key(priv, passphrase="s3cret") is not None
    with pytest.raises(CryptoError, match="cannot read"):
        load_signing_key(priv, passphrase="wrong")
    os.chmod(priv, 0o644)
    with pytest.raises(CryptoError, match="readable by others"):
        load_signing_key(priv, passphrase="s3cret")


def test_cli_verify_exit_codes(folder: Path, tmp_path: Path, capsys) -> None:
    main(["verify", str(folder)])
    assert "signature OK" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "model.pt").write_bytes(b"not the weights")
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(bad)])
    assert exc.value.code == 4
    assert "changed after signing" in capsys.readouterr().err
