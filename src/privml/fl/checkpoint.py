"""Server checkpoints: the federation's state after each round, written atomically and signed.

A federated run's server state is small and complete: the global parameters, the server
optimizer's state (:class:`privml.fl.server_opt.ServerOptState`), the previous round's
aggregated update (centered clipping's centre) and the number of rounds done. Nothing random
needs saving: every generator is seeded from ``(seed, round, site)``, so a run resumed from the
checkpoint of round ``r`` computes rounds ``r + 1, ...`` exactly as an uninterrupted run does.

Layout of an interrupted run (``privml run`` writes it next to the run folder it will create;
folders mode 0700, files 0600, whatever the umask)::

    runs/demo-20250101-120000.partial/
        run.signed               the resolved config that started the run, and the run's id
        checkpoint/state.signed  the server state after the last completed round

Integrity: both files are signed with the deployment's Ed25519 key
(:func:`privml.signing.deployment_key`, the key that signs models), and a
resumed run is signed again only after they verify, so a checkpoint cannot smuggle weights
into a signed model. Each file is one envelope::

    b"PRIVML-SIGNED/1\n"  | header length (4 bytes, big endian, <= 64 KiB) | header (JSON)
    | Ed25519 signature of everything before it (64 bytes) | payload

The signature is checked before anything but the bounded header is read, and before the header
is parsed. The header names what the file is (``kind``), the run's random id, the round, the
run's fingerprint (config, data and model) and the SHA-256 and length of the payload (a numpy
archive without pickles for a checkpoint; the config JSON for a run record). So a checkpoint
edited in any byte, truncated, re-signed with another key, or copied from another run (even of
the same config) is refused (:class:`~privml.errors.SignatureError`, exit code 4). An *older*
checkpoint of the same run is accepted: it resumes from that round, and since every round is
recomputed deterministically, the run ends with the same model as an uninterrupted one.

Files are replaced with ``os.replace`` after a complete write and ``fsync``, so a crash leaves
either the previous round's checkpoint or the new one, never a torn file. When the run
finishes, the run folder is moved into place and the ``.partial`` folder is removed.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import (
    ConfigError,
    CryptoError,
    DataError,
    PrivmlError,
    SignatureError,
    UsageError,
)
from privml.fl.server_opt import ServerOptState

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privml.config import Config

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "RunRecord",
    "ServerState",
    "checkpoint_round",
    "has_checkpoint",
    "load_checkpoint",
    "locate_partial_run",
    "partial_dir",
    "read_run_config",
    "read_run_record",
    "save_checkpoint",
    "write_run_config",
]

CHECKPOINT_FORMAT = "privml-checkpoint/2"
PARTIAL_RUN_FORMAT = "privml-partial-run/2"
STATE_FILE = "state.signed"
RUN_FILE = "run.signed"
PARTIAL_SUFFIX = ".partial"
#: Files of the unsigned format privml wrote before checkpoints were signed.
LEGACY_STATE_FILE = "state.npz"
LEGACY_RUN_FILE = "run.json"

MAGIC = b"PRIVML-SIGNED/1\n"
_SIG_BYTES = 64
MAX_HEADER_BYTES = 64 * 1024
#: Largest payload accepted (a checkpoint of a 500M-parameter model with Adam moments).
MAX_PAYLOAD_BYTES = 16 * 1024**3
_MAX_META_DEPTH = 16


@dataclass(frozen=True)
class ServerState:
    """The federation server's state between rounds.

    Attributes:
        round: number of rounds completed (0 before the first round).
        params: the global model, flat float32 ``[n_params]``.
        opt: the server optimizer's state (moments, step count).
        center: the previous round's aggregated update, float64 ``[n_params]`` (the centre of
            centered clipping), or None before any update was aggregated.
    """

    round: int
    params: NDArray[np.float32]
    opt: ServerOptState
    center: NDArray[np.float64] | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint: the server state, the fingerprint of the run that wrote
    it, that run's bookkeeping (``meta``: round history, update counts, ...; JSON data) and the
    id of the run it belongs to (None for a checkpoint outside a run folder)."""

    state: ServerState
    fingerprint: str
    meta: dict[str, Any]
    run_id: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """What ``run.signed`` records: the run's random id and the config that started it."""

    run_id: str
    config: Config
    path: Path


# --------------------------------------------------------------------------------------------
# Signed envelopes
# --------------------------------------------------------------------------------------------


def _key(key: Ed25519PrivateKey | None) -> Ed25519PrivateKey:
    if key is not None:
        return key
    from privml.signing import deployment_key

    return deployment_key()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _private_dir(folder: Path) -> None:
    """Create ``folder`` (and missing parents) readable by the owner only, whatever the umask."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(folder.stat().st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) via a temporary file in the same folder and
    ``os.replace``: a reader sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask may only have narrowed it; be explicit
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _envelope(header: dict[str, Any], payload: bytes, key: Ed25519PrivateKey) -> bytes:
    import json

    from privml.signing import key_id

    header = {
        **header,
        "algorithm": "Ed25519",
        "key_id": key_id(key.public_key()),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
    }
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(hbytes) > MAX_HEADER_BYTES:  # pragma: no cover - headers are a few hundred bytes
        raise ValueError("checkpoint header too large")
    signed = MAGIC + struct.pack(">I", len(hbytes)) + hbytes
    return signed + key.sign(signed) + payload


def _read_envelope(
    path: Path, *, kind: str, what: str, key: Ed25519PrivateKey | None
) -> tuple[dict[str, Any], bytes]:
    """Verify and open a signed file: ``(header, payload)``.

    Order: refuse a special file; read the magic, the bounded header and the signature;
    verify the signature over them with the deployment's key (nothing is parsed before);
    parse the header; read exactly ``payload_bytes`` and check its SHA-256.

    Raises:
        SignatureError: anything that does not verify, naming ``path``.
    """
    from cryptography.exceptions import InvalidSignature

    from privml.safe_io import loads_json_bounded, open_regular
    from privml.signing import key_id

    shown = str(path)

    def refuse(why: str) -> SignatureError:
        return SignatureError(
            f"{what} {shown!r} {why}; it is refused (nothing was resumed or signed). "
            "Start the run again without --resume."
        )

    try:
        signer = _key(key)
    except CryptoError as exc:
        raise SignatureError(f"cannot verify {what} {shown!r}: {exc}") from None
    public = signer.public_key()
    with open_regular(path, what=what, error=lambda m: SignatureError(m)) as f:
        lead = f.read(len(MAGIC) + 4)
        if len(lead) < len(MAGIC) + 4 or lead[: len(MAGIC)] != MAGIC:
            raise refuse("is not a signed privml file (damaged, truncated or replaced)")
        (hlen,) = struct.unpack(">I", lead[len(MAGIC) :])
        if hlen > MAX_HEADER_BYTES:
            raise refuse(f"announces a {hlen:,}-byte header (limit {MAX_HEADER_BYTES:,})")
        hbytes = f.read(hlen)
        sig = f.read(_SIG_BYTES)
        if len(hbytes) != hlen or len(sig) != _SIG_BYTES:
            raise refuse("is truncated")
        try:
            public.verify(sig, lead + hbytes)
        except InvalidSignature:
            raise refuse(
                "does not verify against this deployment's signing key "
                f"({key_id(public)}): it was altered, truncated, or signed by another key"
            ) from None
        header = loads_json_bounded(
            hbytes, what=f"{what} {shown!r} header", max_depth=4, error=lambda m: refuse(m)
        )
        if not isinstance(header, dict) or header.get("kind") != kind:
            raise refuse(f"is not a {kind} (signed for another purpose)")
        size = header.get("payload_bytes")
        digest = header.get("payload_sha256")
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 0 <= size <= MAX_PAYLOAD_BYTES
            or not isinstance(digest, str)
        ):
            raise refuse("has a malformed signed header")
        h = hashlib.sha256()
        chunks = []
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            chunks.append(chunk)
            left -= len(chunk)
        if left or f.read(1):
            raise refuse("is truncated or has extra bytes after its signed content")
        if h.hexdigest() != digest:
            raise refuse("was altered after it was signed (its content does not match)")
    return header, b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint file (of this format or the unsigned older one)."""
    folder = Path(folder)
    return any(
        os.path.lexists(folder / name) for name in (STATE_FILE, LEGACY_STATE_FILE)
    )


def _bound_run_id(
    folder: Path, run_id: str | None, key: Ed25519PrivateKey | None, *, cached: bool = False
) -> str | None:
    """The run a checkpoint folder belongs to: ``run_id``, else the id in the signed run
    record of the ``.partial`` folder around it, else None (a stand-alone folder). With
    ``cached`` (writing), a record already verified in this process is not verified again
    while its file is unchanged; reading always verifies."""
    if run_id is not None:
        return run_id
    record = Path(folder).parent / RUN_FILE
    if not os.path.lexists(record):
        return None
    try:
        st = record.stat()
        ident = (str(record.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        ident = None
    if cached and ident is not None and ident in _RUN_IDS:
        return _RUN_IDS[ident]
    header, _ = _read_envelope(record, kind="run", what="run record", key=key)
    rid = header.get("run_id")
    if not isinstance(rid, str):
        raise DataError(f"{str(record)!r} is not a run record this privml version can use.")
    if ident is not None:
        _RUN_IDS.clear()
        _RUN_IDS[ident] = rid
    return rid


_RUN_IDS: dict[tuple[str, int, int, int], str] = {}


def save_checkpoint(
    folder: Path,
    state: ServerState,
    *,
    fingerprint: str,
    meta: dict[str, Any],
    run_id: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Path:
    """Atomically write ``state`` (and ``meta``, JSON data) to ``folder/state.signed``, signed.

    Args:
        folder: the checkpoint folder; created (mode 0700) if missing.
        state: the server state after round ``state.round``.
        fingerprint: identifies what the run computes (config, data, model); resuming checks it.
        meta: JSON-serialisable bookkeeping to restore with the state (round history, ...).
        run_id: the run the checkpoint belongs to; default the id in the signed run record of
            the ``.partial`` folder around ``folder`` (none outside a run folder).
        key: the signing key; default the deployment's (created on first use).

    Returns:
        The path of the written file.
    """
    import json

    folder = Path(folder)
    signer = _key(key)
    rid = _bound_run_id(folder, run_id, signer, cached=True)
    _private_dir(folder)
    header = {
        "kind": "checkpoint",
        "format": CHECKPOINT_FORMAT,
        "run_id": rid,
        "round": int(state.round),
        "fingerprint": fingerprint,
    }
    arrays: dict[str, NDArray[Any]] = {
        "meta": np.array(json.dumps(meta)),
        "params": np.asarray(state.params, dtype=np.float32),
        **{f"opt_{k}": v for k, v in state.opt.as_arrays().items()},
    }
    if state.center is not None:
        arrays["center"] = np.asarray(state.center, dtype=np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path = folder / STATE_FILE
    _atomic_write_bytes(path, _envelope(header, buf.getvalue(), signer))
    legacy = folder / LEGACY_STATE_FILE
    if legacy.is_file():
        legacy.unlink()
    return path


def load_checkpoint(
    folder: Path,
    *,
    fingerprint: str | None = None,
    run_id: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Checkpoint:
    """Verify and read ``folder/state.signed``.

    The signature (the deployment's key) is checked before the file is parsed; the checkpoint
    must belong to the run (``run_id``, default the one recorded in the signed run record of
    the ``.partial`` folder around ``folder``) and, with ``fingerprint``, compute the same
    thing (config, data and model).

    Raises:
        UsageError: no checkpoint in ``folder``.
        SignatureError: the file does not verify (altered, truncated, another key, another
            run, the unsigned older format), naming it.
        ConfigError: the checkpoint was written by a run with another config, data or model.
        DataError: a verified file whose content privml cannot use (another privml version).
    """
    import json

    folder = Path(folder)
    path = folder / STATE_FILE
    if not os.path.lexists(path):
        if os.path.lexists(folder / LEGACY_STATE_FILE):
            raise SignatureError(
                f"Checkpoint {str(folder / LEGACY_STATE_FILE)!r} is unsigned (written by an "
                "older privml); it is refused. Start the run again without --resume."
            )
        raise UsageError(
            f"No checkpoint at {str(path)!r}: the run stopped before its first round finished. "
            "Start it again without --resume."
        )
    signer = _key(key)
    expected_run = _bound_run_id(folder, run_id, signer)
    header, payload = _read_envelope(path, kind="checkpoint", what="checkpoint", key=signer)
    shown = str(path)
    rnd = header.get("round")
    fp = header.get("fingerprint")
    rid = header.get("run_id")
    if (
        header.get("format") != CHECKPOINT_FORMAT
        or isinstance(rnd, bool)
        or not isinstance(rnd, int)
        or rnd < 1
        or not isinstance(fp, str)
        or not (rid is None or isinstance(rid, str))
    ):
        raise DataError(
            f"Checkpoint {shown!r} has a header this privml version cannot use "
            f"(format {header.get('format')!r}); start the run again without --resume."
        )
    if expected_run is not None and rid != expected_run:
        raise SignatureError(
            f"Checkpoint {shown!r} belongs to another run (run id {rid}, this run is "
            f"{expected_run}); it is refused. Resume the run that wrote it, or start again."
        )
    if fingerprint is not None and fp != fingerprint:
        raise ConfigError(
            f"checkpoint {shown!r} was written by a run with another configuration, data "
            "or model; resume with the same config and data, or start a new run"
        )
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"].item()))
            params = np.array(z["params"], dtype=np.float32)
            opt = ServerOptState.from_arrays({k: z[f"opt_{k}"] for k in ("kind", "step", "m", "v")})
            center = np.array(z["center"], dtype=np.float64) if "center" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RecursionError) as exc:
        raise DataError(
            f"Checkpoint {shown!r} verifies but cannot be read ({type(exc).__name__}: {exc}); "
            "start the run again without --resume."
        ) from None
    problems = []
    if not isinstance(meta, dict):
        problems.append("its bookkeeping is not a JSON object")
    if params.ndim != 1 or params.shape != opt.m.shape:
        problems.append(f"params {params.shape} and optimizer state {opt.m.shape} disagree")
    if not np.isfinite(params).all():
        problems.append("params contain NaN or Inf")
    if center is not None and center.shape != params.shape:
        problems.append(f"center {center.shape} does not match params {params.shape}")
    if problems:
        raise DataError([f"Checkpoint {shown!r}: {p}" for p in problems])
    state = ServerState(round=rnd, params=params, opt=opt, center=center)
    return Checkpoint(state=state, fingerprint=fp, meta=meta, run_id=rid)


def checkpoint_round(folder: Path) -> int | None:
    """The round of the checkpoint in ``folder`` if it holds one that verifies, else None."""
    try:
        return load_checkpoint(folder).state.round
    except (PrivmlError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# Interrupted run folders
# --------------------------------------------------------------------------------------------


def partial_dir(final: Path) -> Path:
    """The folder holding the checkpoints of the run that will be written to ``final``."""
    final = Path(final)
    return final.with_name(final.name + PARTIAL_SUFFIX)


def locate_partial_run(path: Path) -> tuple[Path, Path]:
    """``(final_dir, partial_dir)`` of an interrupted run, given either folder's path.

    Raises:
        UsageError: there is no interrupted run at ``path`` (the message says why).
        SignatureError: the folder holds an interrupted run of the unsigned older format.
    """
    from privml.safe_io import resolve_path

    path = Path(path)
    if not path.name:  # "", ".", "/": what folder is meant?
        path = resolve_path(path)
    if not path.name:
        raise UsageError(
            f"--resume {str(path)!r} names no run folder; pass the folder an interrupted "
            "`privml run` left (or its .partial folder)"
        )
    if path.name.endswith(PARTIAL_SUFFIX):
        partial, final = path, path.with_name(path.name[: -len(PARTIAL_SUFFIX)])
    else:
        final, partial = path, partial_dir(path)
    if not os.path.lexists(partial / RUN_FILE):
        if os.path.lexists(partial / LEGACY_RUN_FILE):
            raise SignatureError(
                f"The interrupted run in {str(partial)!r} was written by an older privml "
                "without signatures; it cannot be resumed safely. Delete that folder and start "
                "the run again."
            )
        if final.is_dir() and (final / "results.json").is_file():
            raise UsageError(
                f"The run at {str(final)!r} already finished; there is nothing to resume."
            )
        raise UsageError(
            f"No interrupted run at {str(path)!r}: expected {str(partial / RUN_FILE)!r}. "
            "Pass the run folder (or its .partial folder) that an interrupted `privml run` left."
        )
    return final, partial


def write_run_config(
    partial: Path, config: Config, *, key: Ed25519PrivateKey | None = None
) -> str:
    """Start a run's record: a fresh random run id and the resolved config, signed into
    ``partial/run.signed`` (``partial`` is created mode 0700). Returns the run id."""
    import json

    partial = Path(partial)
    signer = _key(key)
    _private_dir(partial)
    run_id = secrets.token_hex(16)
    body = {
        "config": config.resolved(),
        "config_hash": config.config_hash(),
        "source": str(config.source) if config.source else None,
    }
    header = {"kind": "run", "format": PARTIAL_RUN_FORMAT, "run_id": run_id}
    payload = (json.dumps(body, indent=2) + "\n").encode()
    _atomic_write_bytes(partial / RUN_FILE, _envelope(header, payload, signer))
    return run_id


def read_run_record(partial: Path, *, key: Ed25519PrivateKey | None = None) -> RunRecord:
    """Verify and read ``partial/run.signed``: the run id and the config it started with.

    Raises:
        SignatureError: the record does not verify (altered, truncated, another key).
        DataError: a verified record this privml version cannot use.
        ConfigError: the recorded config no longer validates (e.g. after a privml upgrade).
    """
    from privml.config import parse_config
    from privml.safe_io import loads_json_bounded

    path = Path(partial) / RUN_FILE
    header, payload = _read_envelope(path, kind="run", what="run record", key=key)
    run_id = header.get("run_id")
    body = loads_json_bounded(payload, what=f"run record {str(path)!r}")
    if (
        header.get("format") != PARTIAL_RUN_FORMAT
        or not isinstance(run_id, str)
        or not isinstance(body, dict)
        or not isinstance(body.get("config"), dict)
    ):
        raise DataError(
            f"{str(path)!r} is not a run record this privml version can use; start a new run."
        )
    raw = dict(body["config"])
    src = body.get("source")
    config = parse_config(
        raw,
        name=str(raw.get("name", "privml")),
        source=Path(src) if isinstance(src, str) and src else None,
    )
    if config.config_hash() != body.get("config_hash"):
        raise DataError(
            f"The config recorded in {str(path)!r} no longer hashes to its recorded value "
            "(written by another privml version). Start a new run."
        )
    return RunRecord(run_id=run_id, config=config, path=path)


def read_run_config(partial: Path) -> Config:
    """The config an interrupted run started with (verified; see :func:`read_run_record`)."""
    return read_run_record(partial).config
