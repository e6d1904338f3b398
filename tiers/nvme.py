"""NVMe tier: preallocated slab files, 4 KiB-aligned direct I/O, a checksum per slot, and a
RocksDB manifest written only after the data it names is durable.

On-disk layout of ``directory``::

    slab-0000.dat, slab-0001.dat, ...   slab_bytes each (the last one may be smaller)
    manifest/                           RocksDB (rocksdict, raw bytes keys and values)

The tier's address space is the concatenation of the slabs at stride ``slab_bytes``: slab
``k`` covers bytes ``[k * slab_bytes, k * slab_bytes + size_k)``. The allocator gets one
region per slab, so a slot never straddles two files.

RocksDB keyspaces (prefixes keep them apart):

- ``b/<key>``  manifest entry for a block: slot, nbytes, checksum, caller's meta;
- ``m/<key>``  caller's side metadata (:meth:`NvmeStore.meta_put`);
- ``s/...``    the store's own records (the slab layout).

Crash safety (``kill -9`` at any instant, and power loss): a block's bytes are written and
``fdatasync``'d before its manifest entry is put, and the entry carries the xxh3-64 of the
block's ``nbytes`` real bytes. After a restart :meth:`NvmeStore.recover` serves only
entries whose bytes still hash to that checksum, and every read re-verifies it, so a torn
write, a stale entry resurrected by a lost delete, or a slot reused for other data can
cost a cache miss but never returns wrong bytes.

All sizes and offsets are bytes.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from kvd.tiers.alloc import ExtentAllocator, Slot
from kvd.tiers.base import Buffer, CorruptBlockError, Tier, byte_view
from kvd.tiers.health import CHECKSUM, TierHealth
from kvd.tiers.io import REAL_IO, FileIO

log = logging.getLogger("kvd.tiers.nvme")

ALIGN = 4096  # direct I/O: file offsets, lengths and memory addresses are multiples of this
DEFAULT_SLAB_BYTES = 1 << 30
# Per-thread bounce buffer for callers whose memory is not ALIGN-aligned; bigger blocks go
# through it in chunks, so memory stays bounded whatever the block size.
_BOUNCE_BYTES = 1 << 20
_ZEROS = bytes(ALIGN)
_VERIFY_THREADS = 8  # recovery is I/O bound: overlap reads, the hash is the cheap part

_MANIFEST = b"b/"
_META = b"m/"
_LAYOUT_KEY = b"s/layout"

# Manifest value: format version, slot offset, slot length, nbytes, checksum; then meta.
_ENTRY = struct.Struct("<BQQQQ")
_ENTRY_VERSION = 1
# Layout record: format version, slab_bytes, page_bytes.
_LAYOUT = struct.Struct("<BQQ")
_LAYOUT_VERSION = 1

_SLAB_NAME = re.compile(r"slab-(\d{4,})\.dat")


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """A durable block: ``nbytes`` real bytes at ``slot`` hashing to ``checksum``.

    ``key`` and ``meta`` are opaque to the store (the core encodes namespace, hash and
    parent in them). ``checksum`` is ``xxhash.xxh3_64_intdigest`` of the first ``nbytes``.
    """

    key: bytes
    slot: Slot
    nbytes: int
    checksum: int
    meta: bytes


@dataclass(frozen=True, slots=True)
class _Written:
    """What a completed, fdatasync'd write left in a slot (kept in memory per slot)."""

    length: int  # slot length, bytes
    nbytes: int
    checksum: int


def _encode_entry(entry: ManifestEntry) -> bytes:
    head = _ENTRY.pack(
        _ENTRY_VERSION, entry.slot.offset, entry.slot.length, entry.nbytes, entry.checksum
    )
    return head + entry.meta


def _decode_entry(key: bytes, value: bytes) -> ManifestEntry:
    """Raises ValueError for a value this code did not write."""
    if len(value) < _ENTRY.size:
        raise ValueError("manifest value too short")
    version, offset, length, nbytes, checksum = _ENTRY.unpack_from(value, 0)
    if version != _ENTRY_VERSION:
        raise ValueError(f"manifest entry version {version}")
    return ManifestEntry(key, Slot(offset, length), nbytes, checksum, bytes(value[_ENTRY.size :]))


def _is_aligned(mv: memoryview) -> bool:
    return np.frombuffer(mv, dtype=np.uint8).ctypes.data % ALIGN == 0


def _vectored_all(io, fd: int, views: list[memoryview], offset: int, reading: bool) -> None:
    """Run ``io`` (a FileIO's pwritev, or preadv when ``reading``) until every byte of
    ``views`` moved, resuming after short transfers."""
    while views:
        done = io(fd, views, offset)
        if done <= 0:
            if reading:
                # The slab is shorter than the slot: truncated behind our back; data is gone.
                raise CorruptBlockError(f"slab file ends before offset {offset}")
            raise OSError(errno.EIO, "pwritev made no progress")
        offset += done
        while views and done >= views[0].nbytes:
            done -= views[0].nbytes
            views = views[1:]
        if done:
            views = [views[0][done:], *views[1:]]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


class NvmeStore(Tier):
    """Slab files plus a RocksDB manifest; see the module docstring for the layout.

    ``capacity_bytes`` is rounded down to whole pages (ValueError if less than one page);
    ``page_bytes`` must be a power-of-two multiple of 4096 and ``slab_bytes`` a positive
    multiple of ``page_bytes``.

    Thread safety: reads and writes of *different* slots may run concurrently from any
    number of threads (pread/pwrite are positional, the shared dicts are locked, and each
    thread has its own bounce buffer). Concurrent I/O on the same slot, or ``free``/
    ``close`` racing I/O, is a caller bug.
    """

    name = "nvme"

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        slab_bytes: int = DEFAULT_SLAB_BYTES,
        page_bytes: int = 4096,
        direct_io: bool = True,
        io: FileIO | None = None,
        health: TierHealth | None = None,
    ) -> None:
        """``direct_io`` False asks for buffered I/O + fdatasync from the start (no warning):
        for filesystems known to refuse O_DIRECT, and for tests of that path. ``io`` is the
        file layer every slab and manifest write goes through (the real one by default; a
        :class:`kvd.tiers.faults.FaultyIO` in tests). ``health`` hears every I/O failure and
        success (:attr:`health`; a fresh :class:`TierHealth` by default)."""
        if page_bytes <= 0 or page_bytes & (page_bytes - 1) or page_bytes % ALIGN:
            raise ValueError(
                f"page_bytes must be a power of two multiple of {ALIGN}, got {page_bytes}"
            )
        if slab_bytes <= 0 or slab_bytes % page_bytes:
            raise ValueError(
                f"slab_bytes must be a positive multiple of {page_bytes}, got {slab_bytes}"
            )
        capacity = capacity_bytes - capacity_bytes % page_bytes
        if capacity < page_bytes:
            raise ValueError(f"capacity_bytes {capacity_bytes} is less than one page")
        self._dir = Path(directory)
        self._slab_bytes = slab_bytes
        self._page_bytes = page_bytes
        full, rest = divmod(capacity, slab_bytes)
        self._slab_sizes = [slab_bytes] * full + ([rest] if rest else [])
        self._lock = threading.Lock()
        self._io = io if io is not None else REAL_IO
        self.health = health if health is not None else TierHealth("nvme")
        self._written: dict[int, _Written] = {}  # slot offset -> last durable write
        self._local = threading.local()  # per-thread bounce buffer
        self._fds: list[int] = []
        self._inodes: list[int] = []
        self._db: Rdict | None = None
        self._recovered = False
        self.direct_io = direct_io
        self.space = ExtentAllocator(
            [(k * slab_bytes, size) for k, size in enumerate(self._slab_sizes)], page_bytes
        )
        self._sync = WriteOptions()
        self._sync.sync = True

        self._dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open_db()
            wipe = self._reconcile_layout()
            self._open_slabs(wipe)
        except BaseException:
            self._release()
            raise

    # -- properties -----------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def slab_bytes(self) -> int:
        return self._slab_bytes

    @property
    def page_bytes(self) -> int:
        return self._page_bytes

    @property
    def slab_paths(self) -> list[Path]:
        return [self._slab_path(k) for k in range(len(self._slab_sizes))]

    # -- bookkeeping ----------------------------------------------------------------------
    def free(self, slot: Slot) -> None:
        """Return ``slot`` and forget its checksum. Its manifest entry, if any, stays (a
        stale entry fails verification once the slot is reused); call :meth:`forget`."""
        with self._lock:
            self.space.free(slot)
            self._written.pop(slot.offset, None)

    # -- data -----------------------------------------------------------------------------
    def write(self, slot: Slot, data: Buffer) -> None:
        """Write ``data`` to ``slot`` and fdatasync; durable on return. No manifest entry."""
        self.write_many([(slot, data)])

    def write_many(self, items: list[tuple[Slot, Buffer]]) -> list[int]:
        """Write each block, then one fdatasync per touched slab file; durable on return.

        Returns the checksums (same order as ``items``) to put in :class:`ManifestEntry`.
        Raises ValueError before any I/O if a slot is unallocated, repeated, or too small.
        On OSError, none of the slots in ``items`` has a usable recorded write.
        """
        plan: list[tuple[Slot, memoryview]] = []
        seen: set[int] = set()
        with self._lock:
            for slot, data in items:
                if not self.space.is_allocated(slot):
                    raise ValueError(f"{slot} is not allocated")
                src = self._fitting(slot, data)
                if slot.offset in seen:
                    raise ValueError(f"{slot} appears twice in one batch")
                seen.add(slot.offset)
                plan.append((slot, src))
            # The old contents are being overwritten: until the new write is durable, the
            # slot has no checksum that could vouch for it.
            for slot, _ in plan:
                self._written.pop(slot.offset, None)
        checksums = [xxhash.xxh3_64_intdigest(src) for _, src in plan]
        touched: set[int] = set()
        try:
            for k, within, members in self._runs(plan):
                views = [plan[i][1] for i in members]
                if len(views) == 1:
                    self._write_bytes(self._fds[k], within, views[0])
                else:
                    self._pwritev_all(self._fds[k], views, within)
                touched.add(k)
        except OSError as exc:
            self.health.fault("write", exc)
            raise
        self._sync_files(sorted(touched), self._io.fdatasync)
        self.health.ok("write")
        with self._lock:
            for (slot, src), checksum in zip(plan, checksums):
                if self.space.is_allocated(slot):
                    self._written[slot.offset] = _Written(slot.length, src.nbytes, checksum)
        return checksums

    def read_into(self, slot: Slot, nbytes: int, out: Buffer) -> None:
        """Read the first ``nbytes`` of ``slot`` into ``out`` and verify the checksum.

        Raises CorruptBlockError when no durable write is recorded for the slot or the
        bytes do not hash to the recorded checksum; ValueError when ``nbytes`` differs
        from the recorded size or ``out`` is too small/read-only. After any exception the
        first ``nbytes`` of ``out`` are undefined (possibly partly overwritten).
        """
        with self._lock:
            rec = self._written.get(slot.offset)
        if rec is None or rec.length != slot.length:
            raise CorruptBlockError(f"{slot}: no durable write recorded")
        if nbytes != rec.nbytes:
            raise ValueError(f"{slot} holds {rec.nbytes} bytes, asked for {nbytes}")
        dst = byte_view(out, writable=True)
        if dst.nbytes < nbytes:
            raise ValueError(f"output buffer holds {dst.nbytes} bytes, need {nbytes}")
        dst = dst[:nbytes]
        k, within = self._locate(slot)
        try:
            self._read_bytes(self._fds[k], within, dst)
        except (OSError, CorruptBlockError) as exc:
            self.health.fault("read", exc)
            raise
        if xxhash.xxh3_64_intdigest(dst) != rec.checksum:
            self.health.fault("read", CHECKSUM, f"{slot}: checksum mismatch")
            raise CorruptBlockError(f"{slot}: checksum mismatch")
        self.health.ok("read")

    def read_many(self, items: list[tuple[Slot, int, Buffer]]) -> list[Exception | None]:
        """:meth:`read_into` for a batch: ``(slot, nbytes, out)`` each; None where it verified.

        Adjacent slots of one file whose buffers are whole, aligned slots are read with one
        preadv (one large I/O instead of many small ones); every block is still checked
        against its own checksum. Returns, per item, None or the exception read_into would
        have raised (CorruptBlockError, ValueError, OSError).
        """
        results: list[Exception | None] = [None] * len(items)
        with self._lock:
            records = [self._written.get(slot.offset) for slot, _, _ in items]
        views: list[memoryview | None] = []
        for i, (slot, nbytes, out) in enumerate(items):
            rec = records[i]
            try:
                if rec is None or rec.length != slot.length:
                    raise CorruptBlockError(f"{slot}: no durable write recorded")
                if nbytes != rec.nbytes:
                    raise ValueError(f"{slot} holds {rec.nbytes} bytes, asked for {nbytes}")
                dst = byte_view(out, writable=True)
                if dst.nbytes < nbytes:
                    raise ValueError(f"output buffer holds {dst.nbytes} bytes, need {nbytes}")
            except (CorruptBlockError, ValueError) as exc:
                results[i] = exc
                views.append(None)
                continue
            views.append(dst[:nbytes])
        readable = [i for i, v in enumerate(views) if v is not None]
        runs = self._runs([(items[i][0], views[i]) for i in readable])
        for k, within, positions in runs:
            members = [readable[p] for p in positions]
            try:
                if len(members) == 1:
                    self._read_bytes(self._fds[k], within, views[members[0]])
                else:
                    self._preadv_all(self._fds[k], [views[i] for i in members], within)
            except (CorruptBlockError, OSError) as exc:
                self.health.fault("read", exc)
                for i in members:
                    results[i] = exc
                continue
            for i in members:
                if xxhash.xxh3_64_intdigest(views[i]) != records[i].checksum:
                    results[i] = CorruptBlockError(f"{items[i][0]}: checksum mismatch")
                    self.health.fault("read", CHECKSUM, f"{items[i][0]}: checksum mismatch")
        if runs and not any(isinstance(r, (OSError, CorruptBlockError)) for r in results):
            self.health.ok("read")
        return results

    # -- manifest -------------------------------------------------------------------------
    def persist(self, entries: list[ManifestEntry]) -> None:
        """Put ``entries`` in the manifest in one synced WriteBatch.

        Raises ValueError (writing nothing) if any entry's slot lacks a durable write of
        exactly ``nbytes`` bytes with ``checksum``: the manifest only names durable data.
        The caller must not persist two keys for one slot (:meth:`check` reports it).
        """
        batch = WriteBatch(raw_mode=True)
        with self._lock:
            for entry in entries:
                if not isinstance(entry.key, bytes) or not isinstance(entry.meta, bytes):
                    raise ValueError("manifest key and meta must be bytes")
                rec = self._written.get(entry.slot.offset)
                if rec != _Written(entry.slot.length, entry.nbytes, entry.checksum):
                    raise ValueError(
                        f"{entry.slot}: no durable write of {entry.nbytes} bytes with "
                        f"checksum {entry.checksum:#x}"
                    )
                batch.put(_MANIFEST + entry.key, _encode_entry(entry))
        if not batch.is_empty():
            self._write_manifest(batch, self._sync)

    def forget(self, keys: list[bytes]) -> None:
        """Delete manifest entries (one WriteBatch). Not synced: an entry resurrected by a
        power loss points at bytes that no longer verify, or at identical bytes. A failed
        delete is recorded in :attr:`health` and otherwise ignored, for the same reason:
        the stale entry can cost a miss after a restart, never a wrong byte."""
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(_MANIFEST + key)
        if not batch.is_empty():
            try:
                self._write_manifest(batch)
            except OSError:
                pass  # recorded (and logged once) by _write_manifest

    def sync(self) -> None:
        """Make everything written so far durable: the slabs fsynced, the manifest's
        memtable flushed to its files and its write-ahead log synced (a drain ends so)."""
        self._sync_files(range(len(self._fds)), self._io.fsync)
        db = self._db_handle()
        db.flush(True)
        db.flush_wal(True)

    def entries(self) -> list[ManifestEntry]:
        """Every decodable manifest entry, in key order (O(entries); for audits/admin)."""
        found = []
        for key, value in self._scan(_MANIFEST):
            try:
                found.append(_decode_entry(key, value))
            except ValueError:
                continue  # check() reports it; recover() deletes it
        return found

    def manifest_size(self) -> int:
        """Number of manifest keys, decodable or not (O(entries))."""
        return sum(1 for _ in self._scan(_MANIFEST))

    def recover(self, verify: bool = True) -> list[ManifestEntry]:
        """Rebuild the slot map from the manifest of a reopened directory.

        Must run once, before any allocate or write (RuntimeError otherwise). Entries that
        do not decode, have a bad length, lie outside the current slabs, fail their
        checksum (when ``verify``) or overlap an entry already kept are deleted from the
        manifest. Returns the kept entries in key order; their slots are allocated and
        their checksums recorded as durable writes.
        """
        with self._lock:
            if self._recovered:
                raise RuntimeError("recover() already ran")
            if self.space.used_bytes or self._written:
                raise RuntimeError("recover() must run before any allocate or write")
            self._recovered = True
        candidates: list[ManifestEntry] = []
        dropped: dict[str, list[bytes]] = {}
        for key, value in self._scan(_MANIFEST):
            try:
                entry = _decode_entry(key, value)
            except ValueError:
                dropped.setdefault("undecodable", []).append(key)
                continue
            if not self._fits_layout(entry):
                dropped.setdefault("bad slot", []).append(key)
                continue
            candidates.append(entry)

        if verify and candidates:
            ok = self._verify_all(candidates)
            dropped["checksum"] = [e.key for e, good in zip(candidates, ok) if not good]
            candidates = [e for e, good in zip(candidates, ok) if good]

        # Reserve in address order so overlap resolution does not depend on key order.
        kept: set[bytes] = set()
        with self._lock:
            for entry in sorted(candidates, key=lambda e: (e.slot.offset, e.key)):
                try:
                    self.space.reserve(entry.slot)
                except ValueError:
                    dropped.setdefault("overlap", []).append(entry.key)
                    continue
                self._written[entry.slot.offset] = _Written(
                    entry.slot.length, entry.nbytes, entry.checksum
                )
                kept.add(entry.key)

        doomed = [key for keys in dropped.values() for key in keys]
        if doomed:
            batch = WriteBatch(raw_mode=True)
            for key in doomed:
                batch.delete(_MANIFEST + key)
            self._write_manifest(batch, self._sync)
            log.warning(
                "nvme recovery in %s dropped %d manifest entries (%s)",
                self._dir,
                len(doomed),
                ", ".join(f"{why}: {len(keys)}" for why, keys in dropped.items() if keys),
            )
        return [e for e in candidates if e.key in kept]

    # -- side metadata --------------------------------------------------------------------
    def meta_put(self, key: bytes, value: bytes) -> None:
        """Durably store ``value`` under ``key`` in the side keyspace (synced write)."""
        batch = WriteBatch(raw_mode=True)
        batch.put(_META + key, value)
        self._write_manifest(batch, self._sync)

    def meta_get(self, key: bytes) -> bytes | None:
        return self._db_handle().get(_META + key)

    def meta_delete(self, key: bytes) -> None:
        batch = WriteBatch(raw_mode=True)
        batch.delete(_META + key)
        self._write_manifest(batch, self._sync)

    def meta_items(self, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Side entries whose key starts with ``prefix``, in key order (prefix kept)."""
        return list(self._scan(_META, prefix))

    # -- health ---------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Allocator, checksum records, manifest and slab files agree. O(entries)."""
        problems = [f"allocator: {p}" for p in self.space.check()]
        if self._db is None:
            return problems + ["store is closed"]
        with self._lock:
            written = dict(self._written)
            allocated = {s.offset: s.length for s in self.space.allocated()}
        for offset, rec in written.items():
            if allocated.get(offset) != rec.length:
                problems.append(f"checksum recorded for unallocated slot at {offset}")
        slots: list[tuple[int, int, bytes]] = []
        for key, value in self._scan(_MANIFEST):
            try:
                entry = _decode_entry(key, value)
            except ValueError as exc:
                problems.append(f"manifest entry {key!r}: {exc}")
                continue
            slots.append((entry.slot.offset, entry.slot.end, key))
            if allocated.get(entry.slot.offset) != entry.slot.length:
                hint = "" if self._recovered else " (recover() not run?)"
                problems.append(f"manifest entry {key!r}: {entry.slot} not allocated{hint}")
            elif written.get(entry.slot.offset) != _Written(
                entry.slot.length, entry.nbytes, entry.checksum
            ):
                problems.append(f"manifest entry {key!r} disagrees with the recorded write")
        slots.sort()
        for (_, end_a, key_a), (start_b, _, key_b) in zip(slots, slots[1:]):
            if start_b < end_a:
                problems.append(f"manifest entries {key_a!r} and {key_b!r} share pages")
        for k, size in enumerate(self._slab_sizes):
            path = self._slab_path(k)
            try:
                st = os.stat(path)
            except OSError as exc:
                problems.append(f"slab {path}: {exc}")
                continue
            if st.st_ino != self._inodes[k]:
                problems.append(f"slab {path} was replaced by another file")
            if st.st_size != size:
                problems.append(f"slab {path} is {st.st_size} bytes, expected {size}")
        return problems

    def close(self) -> None:
        """Close the slab files and the manifest. Idempotent; I/O in flight is a bug."""
        self._release()

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ----------------------------------------------------------------------------
    def _open_db(self) -> Rdict:
        path = self._dir / "manifest"
        try:
            # Namespace names and hashes are the tenants' business, as slab bytes are (0600):
            # the manifest's directory is the daemon's alone, whatever the umask.
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)
            return Rdict(str(path), Options(raw_mode=True))
        except Exception as exc:  # rocksdict raises bare Exception (e.g. LOCK held)
            raise OSError(f"cannot open manifest {path}: {exc}") from exc

    def _reconcile_layout(self) -> bool:
        """Record the layout; True when an existing directory had another one (wiped)."""
        db = self._db_handle()
        want = _LAYOUT.pack(_LAYOUT_VERSION, self._slab_bytes, self._page_bytes)
        have = db.get(_LAYOUT_KEY)
        if have == want:
            return False
        if have is None and not any(True for _ in self._scan(_MANIFEST)):
            db.put(_LAYOUT_KEY, want, self._sync)
            return False
        log.warning(
            "nvme store %s was laid out differently (%s); wiping manifest and slab files",
            self._dir,
            self._describe_layout(have),
        )
        # Manifest first: a crash mid-wipe leaves the old layout key, so the next open
        # wipes again; never entries pointing into re-laid-out slabs.
        db.delete_range(_MANIFEST, _MANIFEST[:-1] + bytes([_MANIFEST[-1] + 1]), self._sync)
        for path in self._existing_slabs().values():
            path.unlink()
        db.put(_LAYOUT_KEY, want, self._sync)
        return True

    @staticmethod
    def _describe_layout(raw: bytes | None) -> str:
        if raw is None:
            return "no layout record"
        if len(raw) != _LAYOUT.size:
            return "unreadable layout record"
        _, slab, page = _LAYOUT.unpack(raw)
        return f"slab_bytes={slab}, page_bytes={page}"

    def _existing_slabs(self) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for path in self._dir.iterdir():
            m = _SLAB_NAME.fullmatch(path.name)
            if m:
                found[int(m.group(1))] = path
        return found

    def _open_slabs(self, wiped: bool) -> None:
        changed = wiped
        # Slabs beyond the current capacity hold only blocks that recover() drops anyway.
        for k, path in self._existing_slabs().items():
            if k >= len(self._slab_sizes):
                path.unlink()
                changed = True
        for k, size in enumerate(self._slab_sizes):
            changed |= self._size_slab(self._slab_path(k), size)
        if changed:
            _fsync_dir(self._dir)
        flags = os.O_RDWR | os.O_CLOEXEC
        o_direct = getattr(os, "O_DIRECT", 0)
        for k in range(len(self._slab_sizes)):
            path = self._slab_path(k)
            fd = -1
            if self.direct_io and o_direct:
                try:
                    fd = self._io.open(path, flags | o_direct)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            if fd < 0:
                if self.direct_io:
                    self.direct_io = False
                    log.warning(
                        "filesystem under %s refuses O_DIRECT; using buffered I/O + fdatasync",
                        self._dir,
                    )
                fd = self._io.open(path, flags)
            self._fds.append(fd)
            self._inodes.append(os.fstat(fd).st_ino)

    @staticmethod
    def _size_slab(path: Path, size: int) -> bool:
        """Create/resize one slab to ``size`` bytes, blocks reserved. True if it changed.

        Done through a buffered descriptor: glibc emulates posix_fallocate with small
        writes where the filesystem lacks fallocate, and those fail under O_DIRECT.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            before = os.fstat(fd).st_size
            if before > size:
                os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            if before != size:
                os.fsync(fd)
                return True
            return False
        finally:
            os.close(fd)

    def _release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            self._io.close(fd)
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # -- internals ------------------------------------------------------------------------
    def _pwritev_all(self, fd: int, views: list[memoryview], offset: int) -> None:
        _vectored_all(self._io.pwritev, fd, views, offset, reading=False)

    def _preadv_all(self, fd: int, views: list[memoryview], offset: int) -> None:
        _vectored_all(self._io.preadv, fd, views, offset, reading=True)

    def _sync_files(self, slabs, sync) -> None:
        """``sync`` (the io's fdatasync or fsync) each slab file of ``slabs``; a failure is
        recorded as a ``sync`` fault and raised."""
        try:
            for k in slabs:
                sync(self._fds[k])
        except OSError as exc:
            self.health.fault("sync", exc)
            raise
        self.health.ok("sync")

    def _write_manifest(self, batch: WriteBatch, options: WriteOptions | None = None) -> None:
        """Apply ``batch`` to the manifest through the io; a failure is recorded as a
        ``manifest`` fault and raised (OSError)."""
        try:
            self._io.write_batch(self._db_handle(), batch, options)
        except OSError as exc:
            self.health.fault("manifest", exc)
            raise
        self.health.ok("manifest")

    def _db_handle(self) -> Rdict:
        if self._db is None:
            raise ValueError("store is closed")
        return self._db

    def _slab_path(self, k: int) -> Path:
        return self._dir / f"slab-{k:04d}.dat"

    def _locate(self, slot: Slot) -> tuple[int, int]:
        """(slab index, byte offset within that slab file) of a slot."""
        if not self._fds:
            raise ValueError("store is closed")
        k, within = divmod(slot.offset, self._slab_bytes)
        return k, within

    def _fits_layout(self, entry: ManifestEntry) -> bool:
        slot, pb = entry.slot, self._page_bytes
        if slot.offset < 0 or slot.length <= 0 or slot.offset % pb or slot.length % pb:
            return False
        if not 0 <= entry.nbytes <= slot.length:
            return False
        k, within = divmod(slot.offset, self._slab_bytes)
        return k < len(self._slab_sizes) and within + slot.length <= self._slab_sizes[k]

    def _scan(self, space: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key without ``space``, value) for keys under ``space + prefix``, in order."""
        it = self._db_handle().iter()
        start = space + prefix
        it.seek(start)
        while it.valid():
            key = it.key()
            if not key.startswith(start):
                break
            yield key[len(space) :], it.value()
            it.next()

    def _bounce(self) -> memoryview:
        view = getattr(self._local, "bounce", None)
        if view is None:
            # An anonymous mapping is page-aligned, as O_DIRECT requires.
            view = memoryview(mmap.mmap(-1, _BOUNCE_BYTES))
            self._local.bounce = view
        return view

    def _runs(self, pairs: list[tuple[Slot, memoryview]]) -> list[tuple[int, int, list[int]]]:
        """Group I/Os into runs of adjacent slots of one file: (file, offset, indexes).

        A run's views move back to back in one pwritev/preadv: one large I/O instead of
        many small ones. Only whole slots join a run (a short block would shift the next
        one off its slot), and under direct I/O only page-aligned buffers; anything else
        stands alone and goes through the padding path.
        """
        runs: list[tuple[int, int, list[int]]] = []
        end = None
        for i in sorted(range(len(pairs)), key=lambda i: pairs[i][0].offset):
            slot, view = pairs[i]
            k, within = self._locate(slot)
            whole = view.nbytes == slot.length and (not self.direct_io or _is_aligned(view))
            if whole and end == (k, within) and len(runs[-1][2]) < _IOV_MAX:
                runs[-1][2].append(i)
            else:
                runs.append((k, within, [i]))
            end = (k, within + slot.length) if whole else None
        return runs

    def _write_bytes(self, fd: int, within: int, src: memoryview) -> None:
        """Write ``src`` at ``within``; under O_DIRECT the last partial 4 KiB is zero-padded."""
        n = src.nbytes
        if n == 0:
            return
        if not self.direct_io:
            self._pwritev_all(fd, [src], within)
            return
        body = n - n % ALIGN
        tail = n - body
        if _is_aligned(src):
            # Hot path: the aligned body goes straight from the caller's memory; only the
            # sub-page tail is copied, into the bounce buffer, to pad it to 4 KiB.
            views = [src[:body]] if body else []
            if tail:
                bounce = self._bounce()
                bounce[:tail] = src[body:]
                bounce[tail:ALIGN] = _ZEROS[: ALIGN - tail]
                views.append(bounce[:ALIGN])
            self._pwritev_all(fd, views, within)
            return
        bounce = self._bounce()
        for pos in range(0, n, _BOUNCE_BYTES):
            chunk = min(_BOUNCE_BYTES, n - pos)
            padded = -(-chunk // ALIGN) * ALIGN
            bounce[:chunk] = src[pos : pos + chunk]
            bounce[chunk:padded] = _ZEROS[: padded - chunk]
            self._pwritev_all(fd, [bounce[:padded]], within + pos)

    def _read_bytes(self, fd: int, within: int, dst: memoryview) -> None:
        """Fill ``dst`` from ``within``, never touching memory past ``dst``."""
        n = dst.nbytes
        if n == 0:
            return
        if not self.direct_io:
            self._preadv_all(fd, [dst], within)
            return
        body = n - n % ALIGN
        tail = n - body
        if _is_aligned(dst):
            views = [dst[:body]] if body else []
            bounce = self._bounce() if tail else None
            if bounce is not None:
                views.append(bounce[:ALIGN])
            self._preadv_all(fd, views, within)
            if bounce is not None:
                dst[body:] = bounce[:tail]
            return
        pos = 0
        for chunk in self._read_chunks(fd, within, n):
            dst[pos : pos + chunk.nbytes] = chunk
            pos += chunk.nbytes

    def _read_chunks(self, fd: int, within: int, n: int) -> Iterator[memoryview]:
        """``n`` bytes from ``within`` as successive views of this thread's bounce buffer
        (each valid until the next one is produced)."""
        bounce = self._bounce()
        for pos in range(0, n, _BOUNCE_BYTES):
            chunk = min(_BOUNCE_BYTES, n - pos)
            padded = -(-chunk // ALIGN) * ALIGN
            self._preadv_all(fd, [bounce[:padded]], within + pos)
            yield bounce[:chunk]

    def _verify_one(self, entry: ManifestEntry) -> bool:
        k, within = divmod(entry.slot.offset, self._slab_bytes)
        digest = xxhash.xxh3_64()
        try:
            for chunk in self._read_chunks(self._fds[k], within, entry.nbytes):
                digest.update(chunk)
        except (OSError, CorruptBlockError) as exc:
            log.warning("nvme recovery: reading %s failed: %s", entry.slot, exc)
            return False
        return digest.intdigest() == entry.checksum

    def _verify_all(self, entries: list[ManifestEntry]) -> list[bool]:
        workers = min(_VERIFY_THREADS, len(entries))
        # Strided shares, one per worker: bounded memory however many entries there are.
        shares = [entries[w::workers] for w in range(workers)]
        with ThreadPoolExecutor(workers, thread_name_prefix="kvd-nvme-verify") as pool:
            results = list(pool.map(lambda share: [self._verify_one(e) for e in share], shares))
        ok = [False] * len(entries)
        for w, share_ok in enumerate(results):
            ok[w::workers] = share_ok
        return ok
