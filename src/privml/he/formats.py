"""Byte formats for everything the HE layer sends over a wire or writes to disk.

Every object travels in one envelope::

    magic   8 bytes   b"PRIVMLHE"
    version 1 byte    1
    kind    1 byte    what the body is (see :class:`Kind`)
    hlen    4 bytes   big-endian length of the header
    header  hlen      UTF-8 JSON object; ``header["parts"]`` lists the byte length of each part
    body    ...       the parts, concatenated

The layout lets a server reject bad input before it touches a cryptographic library: the total
size is checked against a limit first, then the magic, version and kind, then the header (size,
JSON, declared part lengths that must add up to the body exactly). Only then are the parts handed
to SEAL or parsed as Paillier integers, which run their own checks.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

from privml.errors import CryptoError

MAGIC = b"PRIVMLHE"
VERSION = 1
_PREFIX = struct.Struct(">8sBBI")
#: Largest JSON header accepted, in bytes.
MAX_HEADER_BYTES = 1 << 16
#: Default size limit for a public context (CKKS Galois keys are the bulk), in bytes.
MAX_CONTEXT_BYTES = 64 << 20
#: Default size limit for any other envelope, in bytes.
MAX_MESSAGE_BYTES = 256 << 20


class Kind(IntEnum):
    """What an envelope holds. The number is part of the format: never renumber."""

    CKKS_PUBLIC = 1
    CKKS_FEATURES = 2
    CKKS_SCORES = 3
    PAILLIER_PUBLIC = 4
    PAILLIER_FEATURES = 5
    PAILLIER_SCORES = 6
    CKKS_UPDATE = 7
    CKKS_AGGREGATE = 8
    PAILLIER_UPDATE = 9
    PAILLIER_AGGREGATE = 10
    REQUIREMENTS = 11
    SECRET_KEY = 20


def pack(kind: Kind, header: dict[str, Any], parts: list[bytes]) -> bytes:
    """Serialize one envelope. ``header`` must be JSON-serializable; ``parts`` are raw bytes."""
    h = dict(header)
    h["parts"] = [len(p) for p in parts]
    hb = json.dumps(h, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(hb) > MAX_HEADER_BYTES:
        raise CryptoError(f"envelope header is {len(hb)} bytes, above the {MAX_HEADER_BYTES} limit")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, int(kind), len(hb)), hb, *parts])


def peek_kind(data: bytes) -> Kind:
    """The kind of an envelope, after checking magic and version only."""
    _check_bytes(data, "data")
    if len(data) < _PREFIX.size:
        raise CryptoError(
            f"truncated message: {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, kind, _ = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CryptoError(
            "not a privml HE message (bad magic bytes); expected data produced by privml.he"
        )
    if version != VERSION:
        raise CryptoError(f"unsupported privml HE format version {version}; expected {VERSION}")
    try:
        return Kind(kind)
    except ValueError:
        raise CryptoError(f"unknown privml HE message kind {kind}") from None


def unpack(
    data: bytes, *, expected: Kind | tuple[Kind, ...], max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[Kind, dict[str, Any], list[bytes]]:
    """Parse and validate an envelope; return ``(kind, header, parts)``.

    Raises :class:`CryptoError` when the data is too large, truncated, of another kind, or its
    header is malformed.
    """
    _check_bytes(data, "data")
    data = bytes(data)
    if len(data) > max_bytes:
        raise CryptoError(
            f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit; raise max_bytes "
            "if this size is expected"
        )
    kind = peek_kind(data)
    wanted = expected if isinstance(expected, tuple) else (expected,)
    if kind not in wanted:
        names = " or ".join(k.name for k in wanted)
        raise CryptoError(f"expected a {names} message, got {kind.name}")
    _, _, _, hlen = _PREFIX.unpack_from(data)
    if hlen > MAX_HEADER_BYTES:
        raise CryptoError(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
    start = _PREFIX.size
    if len(data) < start + hlen:
        raise CryptoError("truncated message: the header is cut short")
    try:
        header = json.loads(data[start : start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CryptoError(f"malformed message header: {exc}") from None
    if not isinstance(header, dict):
        raise CryptoError("malformed message header: not a JSON object")
    lengths = header.get("parts")
    if not isinstance(lengths, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths
    ):
        raise CryptoError("malformed message header: 'parts' must be a list of byte lengths")
    body = memoryview(data)[start + hlen :]
    if sum(lengths) != len(body):
        raise CryptoError(
            f"truncated or padded message: header declares {sum(lengths)} body bytes, "
            f"found {len(body)}"
        )
    parts: list[bytes] = []
    off = 0
    for n in lengths:
        parts.append(bytes(body[off : off + n]))
        off += n
    return kind, header, parts


def require(header: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    """Fetch ``header[key]`` and check its type, raising :class:`CryptoError` otherwise."""
    if key not in header:
        raise CryptoError(f"malformed {what}: missing field {key!r}")
    value = header[key]
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise CryptoError(f"malformed {what}: field {key!r} has type bool")
    if not isinstance(value, typ):
        raise CryptoError(
            f"malformed {what}: field {key!r} has type {type(value).__name__}, "
            f"expected {typ.__name__ if isinstance(typ, type) else typ}"
        )
    return value


def _check_bytes(data: object, name: str) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"The {name!r} parameter must be bytes. Got {type(data).__name__} instead.")
