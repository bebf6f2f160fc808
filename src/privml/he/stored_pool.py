"""Precomputed Paillier randomness on disk, each element handed out once across processes.

``privml predict`` is a new process for every run, so a pool kept in memory
(:class:`~privml.he.paillier.PaillierRandomnessPool`) would be computed while it runs, after the
features are known. :class:`StoredPaillierPool` keeps the expensive part of Paillier encryption,
``r**n mod n**2`` for fresh uniform ``r``, in a file beside the secret key: made offline
(``privml predict --prepare N``), claimed online by whichever process needs it.

**Protected like the secret key.** Whoever learns the ``r**n`` of a ciphertext decrypts it
(``c / r**n = 1 + n*m``). Every record is encrypted with AES-256-GCM under a key derived from the
secret key itself (HKDF-SHA256, :func:`privml.he.keystore.derive_subkey`): opening the pool takes
the secret key, which is sealed under the passphrase. Files are created with mode 0600, and a
pool file that group or others can read is refused.

**Never handed out twice.** Two ciphertexts that share ``r**n`` reveal the difference of their
plaintexts to anyone who sees both (``c1 / c2 = 1 + n (m1 - m2) mod n**2``), so:

* a claim holds an exclusive ``flock`` on the pool file, moves the cursor past the records it
  takes and makes that durable (``fdatasync``) before any element is decrypted or returned: two
  processes that race are serialized by the lock, and a crash after a claim loses the claimed
  elements, it never hands them out again;
* claimed records are overwritten with zeros, so a cursor moved back finds records that fail
  authentication;
* every record is authenticated with its index, the file's random id and the file's inode
  number: a record moved to another place, or a copy of the file (a backup restored, a key
  folder copied to another machine: both would bring back elements already used) fails to open,
  and the pool must be prepared again;
* refills write a new file and rename it over the old one while holding the old one's lock;
  a process that locked a file checks that the path still names it.

Not protected: a local attacker who can write the key folder and restores an old copy of the
pool file *in place* (same inode) could make elements be used twice; such an attacker can as
well replace the public key.

File layout (integers big-endian)::

    0      8   magic b"PRIVMLRP"
    8      1   version 1
    9      7   zero
    16     8   cursor: index of the next unused record
    24     8   count: records in the file
    32     4   record size: 12 + width + 16
    36     4   hlen
    40     hlen header, UTF-8 JSON: key_id, key_bits, width, file_id, kdf, aead
    4096 + i * record size: record i = 12-byte nonce || AES-256-GCM(element, ``width`` bytes)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privml.errors import CryptoError, UsageError
from privml.he.paillier import PaillierRandomnessPool, PaillierSecretKey

MAGIC = b"PRIVMLRP"
VERSION = 1
_FIXED = struct.Struct(">8sB7xQQII")
_CURSOR = struct.Struct(">Q")
DATA_OFFSET = 4096
_NONCE = 12
_TAG = 16
_AAD = b"privml-paillier-pool-v1"
#: Most elements one pool file may hold (about 800 bytes each at 3072 bits).
MAX_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PrepareReport:
    """What :meth:`StoredPaillierPool.prepare` did: elements made, and what they cost."""

    made: int
    available: int
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class _Header:
    cursor: int
    count: int
    record_size: int
    width: int
    file_id: bytes
    inode: int


class StoredPaillierPool:
    """Encryptions of zero under one Paillier key, in a sealed file, each used once.

    Args:
        path: the pool file (created by :meth:`prepare`; mode 0600).
        secret: the key the elements belong to (its public key makes them, its secret key
            seals them).
    """

    def __init__(self, path: str | os.PathLike[str], secret: PaillierSecretKey) -> None:
        if not isinstance(secret, PaillierSecretKey):
            raise TypeError("The 'secret' parameter must be a PaillierSecretKey.")
        self.path = Path(path)
        self.secret = secret
        self.public = secret.public
        self._width = self.public.ciphertext_bytes
        self._keys: dict[bytes, AESGCM] = {}
        #: elements this object handed out (claims) and made (prepare), for reports
        self.claimed = 0
        self.made = 0

    # -- reading the file ---------------------------------------------------------------------

    def _aead(self, file_id: bytes) -> AESGCM:
        aead = self._keys.get(file_id)
        if aead is None:
            aead = AESGCM(self.secret.subkey(salt=file_id, info=b"paillier-pool-v1"))
            self._keys[file_id] = aead
        return aead

    def _aad(self, h: _Header, index: int) -> bytes:
        return _AAD + h.file_id + h.inode.to_bytes(8, "big") + index.to_bytes(8, "big")

    def _header(self, fd: int) -> _Header:
        where = f"Paillier randomness pool {str(self.path)!r}"
        raw = os.pread(fd, DATA_OFFSET, 0)
        if len(raw) < _FIXED.size:
            raise CryptoError(f"{where} is truncated; delete it and prepare it again")
        magic, version, cursor, count, record_size, hlen = _FIXED.unpack_from(raw)
        if magic != MAGIC or version != VERSION or _FIXED.size + hlen > DATA_OFFSET:
            raise CryptoError(f"{where} is not a privml pool file (or of another version)")
        try:
            meta = json.loads(raw[_FIXED.size : _FIXED.size + hlen])
            key_id, width = str(meta["key_id"]), int(meta["width"])
            file_id = bytes.fromhex(meta["file_id"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise CryptoError(f"{where} has a malformed header; delete it") from None
        if key_id != self.secret.key_id:
            raise CryptoError(f"{where} belongs to another key ({key_id[:16]}...); delete it")
        if width != self._width or record_size != _NONCE + width + _TAG or len(file_id) != 16:
            raise CryptoError(f"{where} has a malformed header; delete it")
        if not 0 <= cursor <= count <= MAX_ELEMENTS:
            raise CryptoError(f"{where} has an invalid cursor; delete it")
        size = os.fstat(fd).st_size
        if size < DATA_OFFSET + count * record_size:
            raise CryptoError(f"{where} is truncated; delete it and prepare it again")
        return _Header(cursor, count, record_size, width, file_id, os.fstat(fd).st_ino)

    def _decrypt(self, h: _Header, first: int, blob: bytes) -> list[int]:
        aead = self._aead(h.file_id)
        out: list[int] = []
        rs = h.record_size
        for j in range(len(blob) // rs):
            rec = blob[j * rs : (j + 1) * rs]
            try:
                plain = aead.decrypt(rec[:_NONCE], rec[_NONCE:], self._aad(h, first + j))
            except InvalidTag:
                raise CryptoError(
                    f"Paillier randomness pool {str(self.path)!r}: record {first + j} fails "
                    "authentication (the file was modified, copied or restored from a copy, "
                    "which could hand out randomness already used); delete it and prepare the "
                    "pool again"
                ) from None
            out.append(int.from_bytes(plain, "big"))
        return out

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int | None]:
        """An exclusive lock on the pool file the path names now (None if there is none)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    continue  # replaced by a refill while we waited: lock the new file
                if st.st_mode & 0o077:
                    raise CryptoError(
                        f"Paillier randomness pool {str(self.path)!r} is readable by other users "
                        f"(mode {st.st_mode & 0o777:o}); delete it and prepare it again"
                    )
                yield fd
                return
            finally:
                os.close(fd)

    # -- public API ---------------------------------------------------------------------------

    def available(self) -> int:
        """Elements not yet handed out (0 when there is no pool file)."""
        with self._locked() as fd:
            if fd is None:
                return 0
            h = self._header(fd)
            return h.count - h.cursor

    def claim(self, count: int) -> PaillierRandomnessPool:
        """Take up to ``count`` elements for this process, atomically; returns them as an
        in-memory pool (it computes on the spot, counted as misses, what the file lacked).

        The claim is durable before anything is returned: no other process, and no later
        claim, can get the same elements, even after a crash."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError(f"The 'count' parameter must be an int >= 0. Got {count!r}.")
        items: list[int] = []
        with self._locked() as fd:
            if fd is not None and count:
                h = self._header(fd)
                take = min(count, h.count - h.cursor)
                if take:
                    os.pwrite(fd, _CURSOR.pack(h.cursor + take), 16)
                    os.fdatasync(fd)  # durable before any element is used
                    at = DATA_OFFSET + h.cursor * h.record_size
                    blob = os.pread(fd, take * h.record_size, at)
                    os.pwrite(fd, bytes(len(blob)), at)  # used records are gone
                    items = self._decrypt(h, h.cursor, blob)
        self.claimed += len(items)
        return PaillierRandomnessPool.handover(self.public, items)

    def prepare(self, total: int, *, threads: int | None = None) -> PrepareReport:
        """Make sure ``total`` elements are available: compute the missing ones (offline, on
        ``threads`` threads, default one per core; gmpy2 releases the GIL) and add them."""
        if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= MAX_ELEMENTS:
            raise UsageError(
                f"The 'total' parameter must be an int in [0, {MAX_ELEMENTS}]. Got {total!r}."
            )
        t0, c0 = time.perf_counter(), time.process_time()
        missing = max(0, total - self.available())
        new = _compute(self.public, missing, threads or os.cpu_count() or 1)
        with self._writer(), self._locked() as fd:
            kept: list[int] = []
            if fd is not None:
                h = self._header(fd)
                rest = os.pread(fd, (h.count - h.cursor) * h.record_size,
                                DATA_OFFSET + h.cursor * h.record_size)
                kept = self._decrypt(h, h.cursor, rest)
            self._write(kept + new)
            available = len(kept) + len(new)
        self.made += len(new)
        return PrepareReport(made=len(new), available=available,
                             wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)

    def discard(self) -> None:
        """Delete the pool file (its elements are never used)."""
        with self._writer(), self._locked() as fd:
            if fd is not None:
                self.path.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """Serializes the processes that rewrite the pool (claims only lock the pool file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, elements: list[int]) -> None:
        if len(elements) > MAX_ELEMENTS:
            raise UsageError(f"a pool holds at most {MAX_ELEMENTS} elements")
        fd, tmp = tempfile.mkstemp(prefix=".pool-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            file_id = secrets.token_bytes(16)
            width = self._width
            meta = json.dumps({
                "key_id": self.secret.key_id, "key_bits": self.public.key_bits, "width": width,
                "file_id": file_id.hex(), "kdf": "HKDF-SHA256 of the secret key",
                "aead": "AES-256-GCM",
            }, sort_keys=True, separators=(",", ":")).encode()
            rs = _NONCE + width + _TAG
            head = _FIXED.pack(MAGIC, VERSION, 0, len(elements), rs, len(meta)) + meta
            h = _Header(0, len(elements), rs, width, file_id, os.fstat(fd).st_ino)
            aead = self._aead(file_id)
            body = bytearray()
            for i, v in enumerate(elements):
                nonce = secrets.token_bytes(_NONCE)
                body += nonce + aead.encrypt(nonce, int(v).to_bytes(width, "big"),
                                             self._aad(h, i))
            with os.fdopen(fd, "wb") as fh:
                fd = -1
                fh.write(head.ljust(DATA_OFFSET, b"\0"))
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise


def _compute(public: object, count: int, threads: int) -> list[int]:
    """``count`` fresh ``r**n mod n**2`` (phe's ``raw_encrypt(0)``), on ``threads`` threads."""
    from privml.he.paillier import PaillierPublicKey

    assert isinstance(public, PaillierPublicKey)
    if count <= 0:
        return []

    def init() -> None:
        with contextlib.suppress(Exception):
            import gmpy2

            gmpy2.get_context().allow_release_gil = True

    def one(_: int) -> int:
        return int(public.key.raw_encrypt(0))

    if threads <= 1 or count == 1:
        return [one(i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=min(threads, count), initializer=init,
                            thread_name_prefix="privml-prepare") as ex:
        return list(ex.map(one, range(count)))

