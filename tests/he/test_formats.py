"""The envelope format rejects bad input before any cryptographic library sees it."""

from __future__ import annotations

import struct

import pytest

from privml.errors import CryptoError
from privml.he import formats
from privml.he.formats import Kind


def _blob() -> bytes:
    return formats.pack(Kind.CKKS_FEATURES, {"a": 1}, [b"xyz", b"", b"12345"])


def test_roundtrip() -> None:
    kind, header, parts = formats.unpack(_blob(), expected=Kind.CKKS_FEATURES)
    assert kind is Kind.CKKS_FEATURES
    assert header["a"] == 1
    assert parts == [b"xyz", b"", b"12345"]


@pytest.mark.parametrize("cut", [1, 5, 13, 20, -1])
def test_truncated(cut: int) -> None:
    blob = _blob()
    with pytest.raises(CryptoError, match="truncated|bad magic|malformed"):
        formats.unpack(blob[:cut], expected=Kind.CKKS_FEATURES)


def test_padded_body() -> None:
    with pytest.raises(CryptoError, match="truncated or padded"):
        formats.unpack(_blob() + b"\0", expected=Kind.CKKS_FEATURES)


def test_wrong_kind() -> None:
    with pytest.raises(CryptoError, match="expected a CKKS_SCORES message, got CKKS_FEATURES"):
        formats.unpack(_blob(), expected=Kind.CKKS_SCORES)


def test_bad_magic_and_version() -> None:
    blob = bytearray(_blob())
    blob[0] ^= 0xFF
    with pytest.raises(CryptoError, match="not a privml HE message"):
        formats.unpack(bytes(blob), expected=Kind.CKKS_FEATURES)
    blob = bytearray(_blob())
    blob[8] = 99
    with pytest.raises(CryptoError, match="version 99"):
        formats.unpack(bytes(blob), expected=Kind.CKKS_FEATURES)


def test_unknown_kind() -> None:
    blob = bytearray(_blob())
    blob[9] = 200
    with pytest.raises(CryptoError, match="unknown privml HE message kind 200"):
        formats.peek_kind(bytes(blob))


def test_size_limit_checked_first() -> None:
    with pytest.raises(CryptoError, match="exceeds the 10-byte limit"):
        formats.unpack(_blob(), expected=Kind.CKKS_FEATURES, max_bytes=10)


def test_header_lies() -> None:
    good = _blob()
    hlen = struct.unpack(">I", good[10:14])[0]
    header = good[14 : 14 + hlen].replace(b"[3,0,5]", b"[3,0,4]")
    bad = good[:14] + header + good[14 + hlen :]
    with pytest.raises(CryptoError, match="declares 7 body bytes, found 8"):
        formats.unpack(bad, expected=Kind.CKKS_FEATURES)
    junk = good[:10] + struct.pack(">I", 3) + b"{x]"
    with pytest.raises(CryptoError, match="malformed message header"):
        formats.unpack(junk, expected=Kind.CKKS_FEATURES)


def test_not_bytes() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        formats.unpack("text", expected=Kind.CKKS_FEATURES)  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", [17, 5000, 30000])
def test_deeply_nested_header_is_refused_without_recursion(depth: int) -> None:
    """A header nested thousands of levels deep (within the 64 KiB header limit) is a
    CryptoError naming the depth, never a RecursionError."""
    nested = ("[" * depth + "]" * depth).encode()
    hb = b'{"parts":[],"x":' + nested + b"}"
    hb = hb[: formats.MAX_HEADER_BYTES] if len(hb) > formats.MAX_HEADER_BYTES else hb
    prefix = struct.pack(">8sBBI", formats.MAGIC, formats.VERSION, int(Kind.CKKS_PUBLIC), len(hb))
    blob = prefix + hb
    with pytest.raises(CryptoError, match="nested|bytes, above"):
        formats.unpack(blob, expected=Kind.CKKS_PUBLIC)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b'{"a": NaN}', b'{"a": Infinity}', b"[1,"])
def test_bad_header_json_is_a_crypto_error(raw: bytes) -> None:
    with pytest.raises(CryptoError, match="malformed"):
        formats.loads_bounded(raw, what="header")
