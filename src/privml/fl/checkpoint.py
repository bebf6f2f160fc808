"""Server checkpoints: the federation's state after each round, written atomically.

A federated run's server state is small and complete: the global parameters, the server
optimizer's state (:class:`privml.fl.server_opt.ServerOptState`), the previous round's
aggregated update (centered clipping's centre) and the number of rounds done. Nothing random
needs saving: every generator is seeded from ``(seed, round, site)``, so a run resumed from the
checkpoint of round ``r`` computes rounds ``r + 1, ...`` exactly as an uninterrupted run does.

Layout of an interrupted run (``privml run`` writes it next to the run folder it will create)::

    runs/demo-20250101-120000.partial/
        run.json              the resolved config that started the run (and its hash)
        checkpoint/state.npz  the server state after the last completed round

``state.npz`` is one numpy archive (no pickles) replaced with ``os.replace`` after a complete
write and ``fsync``, so a crash leaves either the previous round's checkpoint or the new one,
never a torn file. When the run finishes, the run folder is moved into place and the
``.partial`` folder is removed.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import ConfigError, DataError, PrivmlError, UsageError
from privml.fl.server_opt import ServerOptState

if TYPE_CHECKING:
    from privml.config import Config

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "ServerState",
    "checkpoint_round",
    "load_checkpoint",
    "locate_partial_run",
    "partial_dir",
    "read_run_config",
    "save_checkpoint",
    "write_run_config",
]

CHECKPOINT_FORMAT = "privml-checkpoint/1"
PARTIAL_RUN_FORMAT = "privml-partial-run/1"
STATE_FILE = "state.npz"
RUN_FILE = "run.json"
PARTIAL_SUFFIX = ".partial"


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
    """A loaded checkpoint: the server state, the fingerprint of the run that wrote it and
    that run's bookkeeping (``meta``: round history, update counts, ...; JSON data)."""

    state: ServerState
    fingerprint: str
    meta: dict[str, Any]


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(
    folder: Path, state: ServerState, *, fingerprint: str, meta: dict[str, Any]
) -> Path:
    """Atomically write ``state`` (and ``meta``, JSON data) to ``folder/state.npz``.

    Args:
        folder: the checkpoint folder; created if missing.
        state: the server state after round ``state.round``.
        fingerprint: identifies what the run computes (config, data, model); resuming checks it.
        meta: JSON-serialisable bookkeeping to restore with the state (round history, ...).

    Returns:
        The path of the written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "format": CHECKPOINT_FORMAT,
        "round": int(state.round),
        "fingerprint": fingerprint,
        "meta": meta,
    }
    arrays: dict[str, NDArray[Any]] = {
        "header": np.array(json.dumps(header)),
        "params": np.asarray(state.params, dtype=np.float32),
        **{f"opt_{k}": v for k, v in state.opt.as_arrays().items()},
    }
    if state.center is not None:
        arrays["center"] = np.asarray(state.center, dtype=np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    path = folder / STATE_FILE
    _atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(folder: Path, *, fingerprint: str | None = None) -> Checkpoint:
    """Read ``folder/state.npz``; with ``fingerprint``, refuse a checkpoint of another run.

    Raises:
        UsageError: no checkpoint in ``folder``.
        DataError: the file is damaged or not a privml checkpoint.
        ConfigError: the checkpoint was written by a run with another config, data or model.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UsageError(
            f"No checkpoint at {str(path)!r}: the run stopped before its first round finished. "
            "Start it again without --resume."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"].item()))
            params = np.array(z["params"], dtype=np.float32)
            opt = ServerOptState.from_arrays({k: z[f"opt_{k}"] for k in ("kind", "step", "m", "v")})
            center = np.array(z["center"], dtype=np.float64) if "center" in z.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DataError(
            f"Checkpoint {str(path)!r} is damaged or not a privml checkpoint ({exc}). "
            "Start the run again without --resume."
        ) from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"Checkpoint {str(path)!r} has format {header.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT!r}; it was written by another privml version."
        )
    rnd = header.get("round")
    problems = []
    if not isinstance(rnd, int) or rnd < 1:
        problems.append(f"round {rnd!r} is not an integer >= 1")
    if params.ndim != 1 or params.shape != opt.m.shape:
        problems.append(f"params {params.shape} and optimizer state {opt.m.shape} disagree")
    if not np.isfinite(params).all():
        problems.append("params contain NaN or Inf")
    if center is not None and center.shape != params.shape:
        problems.append(f"center {center.shape} does not match params {params.shape}")
    if problems:
        raise DataError([f"Checkpoint {str(path)!r}: {p}" for p in problems])
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"checkpoint {str(path)!r} was written by a run with another configuration, data "
            "or model; resume with the same config and data, or start a new run"
        )
    state = ServerState(round=int(rnd), params=params, opt=opt, center=center)  # type: ignore[arg-type]
    return Checkpoint(state=state, fingerprint=str(header["fingerprint"]), meta=header["meta"])


def checkpoint_round(folder: Path) -> int | None:
    """The round of the checkpoint in ``folder`` if it holds a readable one, else None."""
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
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        partial, final = path, path.with_name(path.name[: -len(PARTIAL_SUFFIX)])
    else:
        final, partial = path, partial_dir(path)
    if not (partial / RUN_FILE).is_file():
        if final.is_dir() and (final / "results.json").is_file():
            raise UsageError(
                f"The run at {str(final)!r} already finished; there is nothing to resume."
            )
        raise UsageError(
            f"No interrupted run at {str(path)!r}: expected {str(partial / RUN_FILE)!r}. "
            "Pass the run folder (or its .partial folder) that an interrupted `privml run` left."
        )
    return final, partial


def write_run_config(partial: Path, config: Config) -> None:
    """Record the resolved config that starts the run in ``partial/run.json``."""
    partial = Path(partial)
    partial.mkdir(parents=True, exist_ok=True)
    body = {
        "format": PARTIAL_RUN_FORMAT,
        "config": config.resolved(),
        "config_hash": config.config_hash(),
        "source": str(config.source) if config.source else None,
    }
    _atomic_write_bytes(partial / RUN_FILE, (json.dumps(body, indent=2) + "\n").encode())


def read_run_config(partial: Path) -> Config:
    """The config an interrupted run started with (from ``partial/run.json``).

    Raises:
        DataError: the file is unreadable or its config does not hash to the recorded value.
        ConfigError: the recorded config no longer validates (e.g. after a privml upgrade).
    """
    from privml.config import parse_config

    path = Path(partial) / RUN_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{str(path)!r} is unreadable ({exc}); start a new run.") from None
    if not isinstance(body, dict) or body.get("format") != PARTIAL_RUN_FORMAT:
        raise DataError(f"{str(path)!r} is not a privml interrupted-run record.")
    raw = dict(body["config"])
    src = body.get("source")
    config = parse_config(
        raw, name=str(raw.get("name", "privml")), source=Path(src) if src else None
    )
    if config.config_hash() != body.get("config_hash"):
        raise DataError(
            f"The config recorded in {str(path)!r} does not match its hash; the file was "
            "edited or written by another privml version. Start a new run."
        )
    return config
