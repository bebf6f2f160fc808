"""Writing and reading run folders: results.json, model.pt, model.json, report.html.

A run folder is written into a temporary sibling folder and moved into place only when every
file is complete, so a failed or interrupted run never leaves a half-written folder and never
damages an earlier run's results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from privml.data.encoding import Encoder, Task
from privml.errors import DataError, SignatureError, UsageError
from privml.models.nets import ModelSpec, build_model, load_flat_params

MODEL_FORMAT = "privml-model/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strict_json(data: Any) -> Any:
    """``data`` made strict-JSON-able: NaN and +-Infinity become ``null`` (JSON has no such
    numbers; ``json.dumps`` would write the non-standard tokens ``NaN`` / ``Infinity``), numpy
    scalars and arrays become numbers and lists, tuples lists, anything else unknown its str."""
    if isinstance(data, bool) or data is None or isinstance(data, str | int):
        return data
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {str(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    if hasattr(data, "tolist") and callable(data.tolist):  # numpy scalars and arrays, tensors
        return strict_json(data.tolist())
    return str(data)


def dumps_json(data: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``data`` (see :func:`strict_json`); never ``NaN`` or ``Infinity``."""
    return json.dumps(strict_json(data), indent=indent, allow_nan=False)


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as strict JSON (non-finite numbers as ``null``)."""
    path.write_text(dumps_json(data) + "\n")


def model_metadata(
    spec: ModelSpec, encoder: Encoder, task: Task, *, config_hash: str, weights_sha256: str
) -> dict[str, Any]:
    from privml import __version__

    return {
        "format": MODEL_FORMAT,
        "privml_version": __version__,
        "architecture": spec.to_dict(),
        "task": task.to_dict(),
        "encoding": encoder.to_dict(),
        "config_hash": config_hash,
        "weights_sha256": weights_sha256,
    }


def save_model(
    folder: Path,
    spec: ModelSpec,
    params: torch.Tensor,
    encoder: Encoder,
    task: Task,
    *,
    config_hash: str,
    feature_map: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model.pt`` (a state dict) and ``model.json`` (everything to rebuild and encode),
    signed in ``model.sig`` (:mod:`privml.signing`).

    ``feature_map`` records a fixed feature map (e.g. HOG) the weights were trained on; such a
    model is kept for the record but :func:`load_model` refuses it, since the loaders
    (service, audit, verify) do not apply feature maps yet.
    """
    model = build_model(spec)
    load_flat_params(model, params)
    torch.save(model.state_dict(), folder / "model.pt")
    meta = model_metadata(
        spec,
        encoder,
        task,
        config_hash=config_hash,
        weights_sha256=sha256_file(folder / "model.pt"),
    )
    if feature_map is not None:
        meta["feature_map"] = feature_map
    write_json(folder / "model.json", meta)
    # sign weights + metadata with the deployment's Ed25519 key (model.sig).
    from privml.signing import sign_model_dir

    sign_model_dir(folder)
    return meta


#: Largest model.json / model.pt a loader reads (the weights of a 500M-parameter model).
MAX_MODEL_JSON_BYTES = 64 * 1024**2
MAX_MODEL_WEIGHTS_BYTES = 2 * 1024**3


def load_model(folder: Path) -> tuple[torch.nn.Module, ModelSpec, Encoder, Task, dict[str, Any]]:
    """Load a saved model, checking its signature before reading anything else.

    Order: the Ed25519 signature (``model.sig``) must verify against a trusted key
    (:class:`SignatureError`, exit code 4); then ``model.json`` and ``model.pt`` are read once,
    with size limits, and their bytes must be the ones signed (so a file swapped after the check
    is refused too); only then is ``model.json`` parsed (bounded nesting) and the weights
    loaded, which must match the ``weights_sha256`` in ``model.json`` and the architecture.
    """
    import hashlib
    import io

    from privml.safe_io import loads_json_bounded, read_bytes_bounded
    from privml.signing import verify_model_dir

    folder = Path(folder)
    meta_path, weights = folder / "model.json", folder / "model.pt"
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} not found: pass a run folder written by `privml run`")
    for p in (meta_path, weights):
        if not os.path.lexists(p):
            raise DataError(f"{str(p)!r} not found: pass a run folder written by `privml run`")
    verified = verify_model_dir(folder)
    meta_bytes = read_bytes_bounded(meta_path, max_bytes=MAX_MODEL_JSON_BYTES, what="model file")
    weight_bytes = read_bytes_bounded(
        weights, max_bytes=MAX_MODEL_WEIGHTS_BYTES, what="model weights"
    )
    for name, data in (("model.json", meta_bytes), ("model.pt", weight_bytes)):
        if hashlib.sha256(data).hexdigest() != verified.files.get(name):
            raise SignatureError(
                f"{str(folder / name)!r} changed while it was being loaded; refusing the model"
            )
    meta = loads_json_bounded(meta_bytes, what=f"{str(meta_path)!r}")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{str(meta_path)!r}: unknown model format {got!r}")
    fmap = meta.get("feature_map")
    if fmap is not None:
        name = fmap.get("name", "?") if isinstance(fmap, dict) else "?"
        raise DataError(
            f"{str(folder)!r} holds a model trained on the {name!r}"
            " feature map, which the model loaders do not apply yet; serve or audit a model "
            'trained with [model] features = "none"'
        )
    if hashlib.sha256(weight_bytes).hexdigest() != meta.get("weights_sha256"):
        raise DataError(
            f"{str(weights)!r} does not match the weights_sha256 in model.json: the weights were "
            "changed or replaced after the run; refusing them (re-run `privml run` to get a "
            "consistent folder)"
        )
    try:
        spec = ModelSpec.from_dict(meta["architecture"])
        model = build_model(spec)
        state = torch.load(io.BytesIO(weight_bytes), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        enc = Encoder.from_dict(meta["encoding"])
        t = meta["task"]
        task = Task(t["kind"], t["target"], tuple(t["classes"]))
    except (
        KeyError, TypeError, ValueError, AttributeError, RuntimeError, EOFError,
        pickle.UnpicklingError,
    ) as exc:  # fmt: skip
        raise DataError(
            f"{str(folder)!r}: model.json and model.pt do not fit together "
            f"({type(exc).__name__}: {exc}); re-run `privml run` to get a consistent folder"
        ) from None
    model.eval()
    return model, spec, enc, task, meta


RUN_MARKER = ".privml-run"
RUN_MARKER_FORMAT = "privml-run-folder/1"
_MARKER_MAX_BYTES = 1 << 20


def _marker_files(folder: Path) -> set[str] | None:
    """The files privml wrote into ``folder`` (from its marker), or None if it has no valid
    marker. Read with a size limit; a marker that is not ours counts as none."""
    from privml.safe_io import read_json_bounded

    try:
        doc = read_json_bounded(folder / RUN_MARKER, max_bytes=_MARKER_MAX_BYTES, what="marker")
    except (DataError, OSError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != RUN_MARKER_FORMAT:
        return None
    files = doc.get("files")
    if not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str)}


def _written_by_privml(folder: Path) -> tuple[bool, list[str]]:
    """``(has_marker, foreign)``: whether ``folder`` carries privml's marker, and the entries
    in it that privml did not write (never replaced, even with ``force``)."""
    listed = _marker_files(folder)
    if listed is None:
        return False, []
    foreign = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == RUN_MARKER or (p.is_dir() and not p.is_symlink()):
            continue
        if rel not in listed or p.is_symlink() or not p.is_file():
            foreign.append(rel)
    return True, foreign


def check_output_folder(
    final: Path, *, force: bool = False, protected: Iterable[Path] = (), option: str = "--out"
) -> None:
    """Refuse an output folder whose replacement could delete something the user owns.

    Refused: a path that exists and is not a plain folder (a file, a symlink, a device); a
    folder that is, or contains, one of the ``protected`` paths (site files, the config, the
    ledger, the signing key); a path below a file. An existing folder is replaced only with
    ``force``, and even then only if privml wrote it (its ``.privml-run`` marker lists every
    file in it).

    First, whatever a writer of ``final`` killed mid-write left behind is recovered
    (:func:`_remove_stale_temporaries`): the previous run is put back if it was moved aside.

    Raises:
        UsageError: the folder may not be written; the message says why and what to do.
    """
    final = Path(final)
    if final.name and final.parent.is_dir():
        _remove_stale_temporaries(final)
    shown = str(final)
    from privml.safe_io import resolve_path

    target = resolve_path(final)
    hit = [p for p in protected if (q := resolve_path(p)) == target or target in q.parents]
    if hit:
        what = "is" if any(resolve_path(p) == target for p in hit) else "contains"
        shown_hits = ", ".join(repr(str(p)) for p in hit[:4]) + (" ..." if len(hit) > 4 else "")
        raise UsageError(
            f"{option} {shown!r} {what} {shown_hits}, which privml reads (data, config, "
            f"ledger or key); writing the run there could destroy it. Choose a new folder, "
            f"e.g. {option} {str((final if what == 'contains' else final.parent) / 'runs')!r}"
        )
    for parent in [final, *final.parents]:
        if parent.is_symlink() and parent == final:
            raise UsageError(
                f"{option} {shown!r} is a symbolic link; give the real folder (or a new one)"
            )
        if parent.exists() and not parent.is_dir():
            if parent == final:
                raise UsageError(
                    f"{option} {shown!r} is a file, not a folder; privml never replaces a file "
                    "with a run folder. Choose a new folder name"
                )
            raise UsageError(
                f"{option} {shown!r} lies below {str(parent)!r}, which is a file, not a folder"
            )
    if not final.exists():
        return
    if not force:
        raise UsageError(
            f"{option} {shown!r} already exists; choose a new folder, or pass --force to "
            "replace it (only a run folder privml itself wrote is ever replaced)"
        )
    ours, foreign = _written_by_privml(final)
    if not ours:
        raise UsageError(
            f"{option} {shown!r} was not written by privml (no {RUN_MARKER} marker), so it is "
            "not replaced even with --force; choose a new folder"
        )
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        listed = ", ".join(foreign[:5]) + more
        raise UsageError(
            f"{option} {shown!r} holds files privml did not write ({listed}); it is not "
            "replaced even with --force. Move them away or choose a new folder"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Remove the temporary siblings (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) that a writer of
    ``final`` killed mid-write (SIGKILL, power loss) left behind: those whose process is gone.
    They are privml's own; a live writer's are left alone. A stale ``.old`` folder is the
    previous run, moved aside just before the writer died: it is put back if ``final`` is
    missing, and removed only if the new ``final`` is in place."""
    import re

    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)(?:-.*)?$")
    try:
        siblings = sorted(final.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not (final.exists() or final.is_symlink()):
            p.rename(final)  # the writer died between moving the old run aside and replacing it
        else:
            shutil.rmtree(p, ignore_errors=True)


def atomic_folder(final: Path, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """Create ``final`` by filling a temporary sibling folder, then renaming it into place.

    The new folder gets a ``.privml-run`` marker listing every file in it. If ``fill`` raises,
    the temporary folder is removed and ``final`` (if it existed) is left exactly as it was.
    An existing ``final`` is replaced only with ``force``, only if privml wrote it
    (:func:`check_output_folder`), and only after the new one is complete.

    Raises:
        UsageError: ``final`` exists and may not be replaced (checked before and after
            ``fill``).
    """
    final = Path(final)
    check_output_folder(final, force=force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        fill(tmp)
        files = sorted(
            p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()
        )
        marker = {"format": RUN_MARKER_FORMAT, "files": files}
        (tmp / RUN_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and not p.is_symlink():
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        if final.exists() or final.is_symlink():
            check_output_folder(final, force=force)  # nothing foreign appeared meanwhile
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
