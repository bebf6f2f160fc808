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
#: Deepest nesting of arrays and objects accepted in a header (privml's own headers use 4).
MAX_HEADER_DEPTH = 16


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
    header = loads_bounded(data[start : start + hlen], what="message header")
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


def json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` in JSON text, outside strings (a linear scan: no
    recursion, so a hostile document cannot exhaust the stack before it is measured)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in raw:
        if in_str:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def loads_bounded(
    raw: bytes, *, what: str, max_bytes: int = MAX_HEADER_BYTES, max_depth: int = MAX_HEADER_DEPTH
) -> Any:
    """Parse UTF-8 JSON received from another party, with a size and a nesting-depth limit.

    Raises :class:`CryptoError` (never RecursionError or UnicodeDecodeError) for anything that is
    not valid JSON within the limits; NaN and infinities are refused too.
    """
    if len(raw) > max_bytes:
        raise CryptoError(f"malformed {what}: {len(raw)} bytes, above the {max_bytes}-byte limit")
    depth = json_depth(raw)
    if depth > max_depth:
        raise CryptoError(
            f"malformed {what}: nested {depth} levels deep, above the limit of {max_depth}"
        )

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CryptoError(f"malformed {what}: {exc}") from None


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
