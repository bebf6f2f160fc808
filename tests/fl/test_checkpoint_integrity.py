"""Attacks on checkpoints: an interrupted run's files are signed with the deployment's key and
bound to the run and the round, so a tampered, truncated, re-signed or foreign checkpoint is
refused (exit 4, naming the file), and `privml run --resume` never signs what it did not verify.

What is detected, and what is not (docs/reliability.md):
* any change to a byte of a checkpoint or run record, including the issue's tamper (params += 5,
  header round = 1, same archive keys): refused;
* truncation anywhere, or bytes appended: refused;
* a checkpoint re-signed with another key, or written by another deployment: refused;
* a checkpoint copied from another run (even of the same config and data): refused;
* an older checkpoint of the same run put back (replay): accepted; the rounds after it are
  recomputed deterministically, so the run ends with exactly the uninterrupted run's model.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privml.config import parse_config
from privml.errors import SignatureError
from privml.fl import checkpoint as ck
from privml.fl.engine import RoundRecord
from privml.pipeline import run
from privml.signing import deployment_key, generate_signing_key
from tests.test_cli import cli

ROUNDS = 6


def _cfg(seed: int = 0):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "iid"},
            "training": {"rounds": ROUNDS, "local_epochs": 1, "lr": 4.0, "seed": seed,
                         "server_optimizer": "adam", "server_lr": 0.3},  # fmt: skip
            "audit": {"enabled": False},
            "output": {"html": False},
        },
        name="integrity",
    )


class Crash(RuntimeError):
    pass


def _crash_after(n: int):  # type: ignore[no-untyped-def]
    def on_round(rec: RoundRecord) -> None:
        if rec.round == n:
            raise Crash(f"simulated crash after round {n}")

    return on_round


def _interrupted(folder: Path, after: int = 3, seed: int = 0) -> Path:
    """A run killed after round ``after``; returns its .partial folder."""
    with pytest.raises(Crash):
        run(_cfg(seed), out_dir=folder, on_round=_crash_after(after))
    partial = ck.partial_dir(folder)
    assert ck.checkpoint_round(partial / "checkpoint") == after
    return partial


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole") / "run"
    run(_cfg(), out_dir=out)
    return torch.load(out / "model.pt", weights_only=True)


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the envelope, as an attacker sees it --------------------------------------------------


def _split(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    n = len(ck.MAGIC)
    (hlen,) = struct.unpack(">I", data[n : n + 4])
    header = json.loads(data[n + 4 : n + 4 + hlen])
    sig = data[n + 4 + hlen : n + 4 + hlen + 64]
    return header, sig, data[n + 4 + hlen + 64 :]


def _join(header: dict[str, Any], sig: bytes, payload: bytes) -> bytes:
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return ck.MAGIC + struct.pack(">I", len(hb)) + hb + sig + payload


def _resign(header: dict[str, Any], payload: bytes, key: Ed25519PrivateKey) -> bytes:
    import hashlib

    header = {**header, "payload_sha256": hashlib.sha256(payload).hexdigest(),
              "payload_bytes": len(payload)}  # fmt: skip
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    signed = ck.MAGIC + struct.pack(">I", len(hb)) + hb
    return signed + key.sign(signed) + payload


def _arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _refused_by_cli(
    capsys: pytest.CaptureFixture[str], folder: Path, fragment: str, file: Path
) -> None:
    code, out, err = cli(capsys, "run", "--resume", folder)
    assert code == 4, err
    assert out == "" and "Traceback" not in err
    assert str(file) in err and fragment in err, err
    assert not folder.exists()  # nothing was signed
    code, _, err = cli(capsys, "verify", folder)
    assert code == 2 and "not found" in err, err


# ---- the attacks --------------------------------------------------------------------------


def test_the_reported_tamper_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill after round 3; rewrite the checkpoint with params += 5 and round = 1, same keys."""
    folder = tmp_path / "X"
    state = _interrupted(folder) / "checkpoint" / ck.STATE_FILE
    header, sig, payload = _split(state.read_bytes())
    arrays = _arrays(payload)
    arrays["params"] = arrays["params"] + 5
    forged = _npz(arrays)
    import hashlib

    header.update(round=1, payload_sha256=hashlib.sha256(forged).hexdigest(),
                  payload_bytes=len(forged))  # fmt: skip
    state.write_bytes(_join(header, sig, forged))
    _refused_by_cli(capsys, folder, "does not verify", state)


@pytest.mark.parametrize(
    "edit",
    ["payload_byte", "header_byte", "signature_byte", "payload_only_params", "round_only"],
)
def test_any_edit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    folder = tmp_path / "X"
    state = _interrupted(folder) / "checkpoint" / ck.STATE_FILE
    data = bytearray(state.read_bytes())
    header, sig, payload = _split(bytes(data))
    hstart = len(ck.MAGIC) + 4
    if edit == "payload_byte":
        data[-100] ^= 1
        fragment = "altered"
    elif edit == "header_byte":
        data[hstart + 5] ^= 1
        fragment = "does not verify"
    elif edit == "signature_byte":
        data[hstart + len(json.dumps(header, sort_keys=True, separators=(",", ":"))) + 3] ^= 1
        fragment = "does not verify"
    elif edit == "payload_only_params":  # the header left exactly as signed
        arrays = _arrays(payload)
        arrays["params"] = arrays["params"] + 5
        forged = _npz(arrays)
        data = bytearray(_join(header, sig, forged))
        fragment = "altered" if len(forged) == len(payload) else "truncated"
    else:
        header["round"] = 1
        data = bytearray(_join(header, sig, payload))
        fragment = "does not verify"
    state.write_bytes(bytes(data))
    _refused_by_cli(capsys, folder, fragment, state)


def test_a_checkpoint_re_signed_with_another_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "X"
    state = _interrupted(folder) / "checkpoint" / ck.STATE_FILE
    header, _, payload = _split(state.read_bytes())
    arrays = _arrays(payload)
    arrays["params"] = arrays["params"] + 5
    attacker = Ed25519PrivateKey.generate()
    state.write_bytes(_resign(header, _npz(arrays), attacker))
    _refused_by_cli(capsys, folder, "signed by another key", state)


def test_the_run_record_is_signed_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Editing the recorded config (here: more rounds) is refused like a checkpoint edit."""
    folder = tmp_path / "X"
    record = _interrupted(folder) / ck.RUN_FILE
    header, sig, payload = _split(record.read_bytes())
    body = json.loads(payload)
    body["config"]["training"]["rounds"] = 600
    record.write_bytes(_join(header, sig, json.dumps(body).encode()))
    _refused_by_cli(capsys, folder, "truncated", record)


def test_a_checkpoint_from_another_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs of the same config and data: swapping their checkpoints is refused (run id)."""
    a = _interrupted(tmp_path / "A", after=2)
    b = _interrupted(tmp_path / "B", after=4)
    mine = b / "checkpoint" / ck.STATE_FILE
    mine.write_bytes((a / "checkpoint" / ck.STATE_FILE).read_bytes())
    _refused_by_cli(capsys, tmp_path / "B", "belongs to another run", mine)
    # and a run record copied over, so the ids agree, breaks nothing: that folder is run A
    # itself, moved (a legitimate rename), and it resumes to run A's model


@pytest.mark.parametrize("cut", ["magic", "length", "header", "signature", "payload", "append"])
def test_truncation_and_appended_bytes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: str
) -> None:
    folder = tmp_path / "X"
    state = _interrupted(folder) / "checkpoint" / ck.STATE_FILE
    data = state.read_bytes()
    header, _, _ = _split(data)
    hlen = len(json.dumps(header, sort_keys=True, separators=(",", ":")))
    n = len(ck.MAGIC)
    at = {"magic": 5, "length": n + 2, "header": n + 4 + hlen // 2,
          "signature": n + 4 + hlen + 30, "payload": len(data) - 7}  # fmt: skip
    state.write_bytes(data + b"\0" if cut == "append" else data[: at[cut]])
    fragment = {"magic": "not a signed privml file", "length": "not a signed privml file",
                "append": "extra bytes"}.get(cut, "truncated")  # fmt: skip
    _refused_by_cli(capsys, folder, fragment, state)


def test_empty_garbage_and_legacy_checkpoints_are_refused_not_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "X"
    ckdir = _interrupted(folder) / "checkpoint"
    state = ckdir / ck.STATE_FILE
    for content in (b"", b"garbage" * 10, ck.MAGIC + b"\xff\xff\xff\xff"):
        state.write_bytes(content)
        code, _, err = cli(capsys, "run", "--resume", folder)
        assert code == 4 and "interrupted" not in err and str(state) in err, err
    state.unlink()
    (ckdir / ck.LEGACY_STATE_FILE).write_bytes(b"")  # the unsigned format of older versions
    code, _, err = cli(capsys, "run", "--resume", folder)
    assert code == 4 and "unsigned" in err and "interrupted" not in err, err
    assert not folder.exists()


def test_a_special_file_as_checkpoint_is_refused_without_blocking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "X"
    state = _interrupted(folder) / "checkpoint" / ck.STATE_FILE
    state.unlink()
    os.mkfifo(state)  # reading it would block forever
    code, _, err = cli(capsys, "run", "--resume", folder)
    assert code == 4 and "FIFO" in err, err
    state.unlink()
    state.symlink_to(state)  # a symbolic-link loop
    code, _, err = cli(capsys, "run", "--resume", folder)
    assert code == 4 and "loop" in err, err


def test_a_new_deployment_key_refuses_the_old_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "X"
    _interrupted(folder)
    monkeypatch.setenv("PRIVML_SIGNING_KEY", str(tmp_path / "new" / "key.pem"))
    generate_signing_key()
    code, _, err = cli(capsys, "run", "--resume", folder)
    assert code == 4 and "does not verify" in err and ck.RUN_FILE in err, err
    assert not folder.exists()


def test_a_validly_signed_but_hostile_header_is_refused(tmp_path: Path) -> None:
    """Even content signed with the right key is parsed with limits (deep nesting, types)."""
    key = deployment_key()
    state = tmp_path / ck.STATE_FILE
    for header in ({"kind": "checkpoint", "x": json.loads("[" * 200 + "]" * 200)},
                   {"kind": "checkpoint", "format": ck.CHECKPOINT_FORMAT, "round": True,
                    "fingerprint": "f", "run_id": None},
                   {"kind": "run"}):  # fmt: skip
        state.write_bytes(_resign(header, b"", key))
        with pytest.raises((SignatureError, ck.DataError)):
            ck.load_checkpoint(tmp_path)


def test_replaying_an_older_checkpoint_of_the_same_run_ends_with_the_same_model(
    tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    """Not detected, and harmless: the replayed rounds are recomputed exactly."""
    folder = tmp_path / "X"
    partial = ck.partial_dir(folder)
    state = partial / "checkpoint" / ck.STATE_FILE
    old: list[bytes] = []

    def keep_round_2_then_crash(rec: RoundRecord) -> None:
        if rec.round == 2:
            old.append(state.read_bytes())
        if rec.round == 5:
            raise Crash("after round 5")

    with pytest.raises(Crash):
        run(_cfg(), out_dir=folder, on_round=keep_round_2_then_crash)
    state.write_bytes(old[0])  # the attacker puts round 2 back
    out = run(_cfg(), resume=folder)
    assert out.results["federation"]["resumed_after_round"] == 2
    assert _same(_model(folder), whole)


def test_checkpoints_are_private_whatever_the_umask(tmp_path: Path) -> None:
    before = os.umask(0)
    try:
        partial = _interrupted(tmp_path / "X")
    finally:
        os.umask(before)
    for p in (partial, partial / "checkpoint"):
        assert (p.stat().st_mode & 0o777) == 0o700, oct(p.stat().st_mode)
    for p in (partial / ck.RUN_FILE, partial / "checkpoint" / ck.STATE_FILE):
        assert (p.stat().st_mode & 0o777) == 0o600, oct(p.stat().st_mode)


def test_a_verified_resume_ends_with_the_uninterrupted_model(
    tmp_path: Path, whole: dict[str, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "X"
    _interrupted(folder)
    code, _, err = cli(capsys, "run", "--resume", folder)
    assert code == 0, err
    assert _same(_model(folder), whole)
    code, _, err = cli(capsys, "verify", folder)
    assert code == 0, err


@pytest.fixture(autouse=True)
def _fresh_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test signs with its own deployment key (and trusts it for `privml verify`)."""
    monkeypatch.setenv("PRIVML_SIGNING_KEY", str(tmp_path / "deploy" / "signing-key.pem"))
    monkeypatch.delenv("PRIVML_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("PRIVML_SIGNING_PASSPHRASE", raising=False)
    yield
