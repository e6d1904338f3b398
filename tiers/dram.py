"""DRAM tier: a shared-memory arena of fixed-size pages that local clients map directly.

The daemon creates one file (normally on tmpfs, ``/dev/shm``) laid out as::

    [0, HEADER_BYTES)                         header page (see ArenaHeader)
    [HEADER_BYTES, HEADER_BYTES + capacity)   data pages, handed out as Slots

A Slot's ``offset`` is the byte offset *in the file*, so the gRPC control plane only ships
``(offset, length)`` pairs and a client that mapped the same file (:func:`open_arena`) reads
and writes the block bytes in place: no copy through the socket.

Invariants:
- the header page is written once at creation and never changes while the arena lives;
- the file is exactly ``HEADER_BYTES + capacity_bytes`` bytes;
- every slot the allocator hands out lies inside the data pages (the allocator's only
  region starts at HEADER_BYTES).

All sizes are bytes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvd.native import copy as native_copy
from kvd.tiers.alloc import ExtentAllocator, Slot
from kvd.tiers.base import Buffer, Tier, byte_view
from kvd.tiers.health import TierHealth

HEADER_BYTES = 4096
ARENA_MAGIC = b"KVDARENA"
ARENA_VERSION = 1

# magic, version (u32), arena_id (16 bytes), capacity_bytes (u64), page_bytes (u32).
_HEADER = struct.Struct("<8sI16sQI")

# MAP_POPULATE faults every page in at map time, so the first block copy does not pay for
# page faults; it is Linux-only, hence the fallback to plain MAP_SHARED.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True, slots=True)
class ArenaHeader:
    """The arena file's first page. ``capacity_bytes`` and ``page_bytes`` are bytes."""

    version: int
    arena_id: bytes  # 16 bytes, uuid4; changes every time a daemon creates the arena
    capacity_bytes: int
    page_bytes: int

    def pack(self) -> bytes:
        return _HEADER.pack(
            ARENA_MAGIC, self.version, self.arena_id, self.capacity_bytes, self.page_bytes
        )

    @classmethod
    def unpack(cls, raw: Buffer, *, source: str) -> ArenaHeader:
        """Parse and validate a header. Raises ValueError naming ``source`` on garbage."""
        if len(raw) < _HEADER.size:
            raise ValueError(f"{source}: too short to hold an arena header")
        magic, version, arena_id, capacity, page = _HEADER.unpack_from(raw, 0)
        if magic != ARENA_MAGIC:
            raise ValueError(f"{source}: not a kvd arena (magic {magic!r})")
        if version != ARENA_VERSION:
            raise ValueError(
                f"{source}: arena version {version}, this code speaks {ARENA_VERSION}"
            )
        return cls(version, arena_id, capacity, page)


def _map_file(fd: int, length: int) -> mmap.mmap:
    return mmap.mmap(
        fd, length, flags=_MAP_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )


def _touch_pages(mm: mmap.mmap) -> None:
    """Write every page once at start-up.

    tmpfs hands out fallocated pages still to be zeroed on first touch; without this the
    first store into each page pays a fault, and the first pass through the arena runs
    at a fraction of memcpy speed.
    """
    zeros = np.zeros(1 << 20, dtype=np.uint8)
    arr = np.frombuffer(mm, dtype=np.uint8)
    try:
        for off in range(0, arr.size, zeros.size):
            chunk = arr[off : off + zeros.size]
            chunk[:] = zeros[: chunk.size]
    finally:
        del arr


class DramArena(Tier):
    """The daemon's side of the shared-memory arena (it creates, owns and removes the file).

    ``capacity_bytes`` must be a positive multiple of ``page_bytes``, and ``page_bytes`` a
    power of two dividing HEADER_BYTES (so data pages start page-aligned in the file).

    Thread safety: allocate/free are serialized by a lock; copies into and out of distinct
    slots may run concurrently (a copy into a slot another thread is reading is a caller
    bug, as for any shared memory).
    """

    name = "dram"

    def __init__(
        self, path: str | Path, capacity_bytes: int, page_bytes: int = 4096
    ) -> None:
        if page_bytes <= 0 or page_bytes & (page_bytes - 1) or HEADER_BYTES % page_bytes:
            raise ValueError(
                f"page_bytes must be a power of two dividing {HEADER_BYTES}, got {page_bytes}"
            )
        if capacity_bytes <= 0 or capacity_bytes % page_bytes:
            raise ValueError(
                f"capacity_bytes must be a positive multiple of {page_bytes}, "
                f"got {capacity_bytes}"
            )
        self._path = Path(path)
        # Faults the daemon sees in this tier (no free slot for a store or a promotion).
        self.health = TierHealth("dram")
        self._file_bytes = HEADER_BYTES + capacity_bytes
        self._lock = threading.Lock()
        self.space = ExtentAllocator([(HEADER_BYTES, capacity_bytes)], page_bytes)
        self._header = ArenaHeader(ARENA_VERSION, uuid.uuid4().bytes, capacity_bytes, page_bytes)

        # A stale file from a crashed daemon may still be mapped by old clients; unlinking
        # (rather than truncating) leaves their mapping valid and gives us a fresh inode.
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        try:
            os.fchmod(fd, 0o660)  # the umask may have stripped group access
            # On tmpfs this reserves every page now, so an undersized /dev/shm fails here
            # with ENOSPC instead of SIGBUS on some later copy.
            os.posix_fallocate(fd, 0, self._file_bytes)
            self._mm = _map_file(fd, self._file_bytes)
            self._inode = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            os.unlink(self._path)
            raise
        os.close(fd)  # the mapping keeps its own reference to the file
        _touch_pages(self._mm)
        self._mm[: _HEADER.size] = self._header.pack()
        self._mv = memoryview(self._mm)
        self._closed = False

    # -- properties -----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def arena_id(self) -> bytes:
        return self._header.arena_id

    @property
    def page_bytes(self) -> int:
        return self._header.page_bytes

    @property
    def file_bytes(self) -> int:
        """Size of the shared file in bytes: HEADER_BYTES + capacity_bytes."""
        return self._file_bytes

    @property
    def header(self) -> ArenaHeader:
        return self._header

    @property
    def address(self) -> int:
        """The address of the file's first byte in this process (a slot's bytes start at
        ``address + slot.offset``): for a transfer engine that reads and writes slots in
        place. Valid until :meth:`close`."""
        anchor = ctypes.c_char.from_buffer(self._mm)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor  # releases the buffer export at once, so close() still can unmap

    # -- data -----------------------------------------------------------------------------
    def view(self, slot: Slot) -> memoryview:
        """A writable, zero-copy view of exactly ``slot.length`` bytes of the arena.

        The view pins the mapping: :meth:`close` raises BufferError until every view handed
        out is released (``view.release()`` or dropped). Raises ValueError when ``slot`` is
        not allocated.
        """
        self._require_allocated(slot)
        return self._mv[slot.offset : slot.end]

    def write(self, slot: Slot, data: Buffer) -> None:
        """Copy ``data`` (at most ``slot.length`` bytes) to the start of ``slot``."""
        self._require_allocated(slot)
        src = self._fitting(slot, data)
        self._mv[slot.offset : slot.offset + src.nbytes] = src

    def read_into(self, slot: Slot, nbytes: int, out: Buffer) -> None:
        """Copy the first ``nbytes`` of ``slot`` into ``out`` (no checksums in DRAM)."""
        self._require_allocated(slot)
        if not 0 <= nbytes <= slot.length:
            raise ValueError(f"nbytes {nbytes} outside {slot}")
        dst = byte_view(out, writable=True)
        if dst.nbytes < nbytes:
            raise ValueError(f"output buffer holds {dst.nbytes} bytes, need {nbytes}")
        dst[:nbytes] = self._mv[slot.offset : slot.offset + nbytes]

    # -- health ---------------------------------------------------------------------------
    def check(self) -> list[str]:
        problems = [f"allocator: {p}" for p in self.space.check()]
        if self._closed:
            return problems + ["arena is closed"]
        try:
            on_file = ArenaHeader.unpack(self._mv[:HEADER_BYTES], source=str(self._path))
        except ValueError as exc:
            problems.append(f"header damaged: {exc}")
        else:
            if on_file != self._header:
                problems.append(f"header changed: {on_file} != {self._header}")
        try:
            st = os.stat(self._path)
        except OSError as exc:
            problems.append(f"arena file missing: {exc}")
        else:
            if st.st_ino != self._inode:
                problems.append(f"{self._path} was replaced by another file")
            if st.st_size != self._file_bytes:
                problems.append(f"arena file is {st.st_size} bytes, expected {self._file_bytes}")
        for slot in self.space.allocated():
            if slot.offset < HEADER_BYTES or slot.end > self._file_bytes:
                problems.append(f"{slot} lies outside the data pages")
        return problems

    def close(self) -> None:
        """Unmap and unlink the arena. Idempotent.

        Raises BufferError (leaving the arena open and intact, so the call can be retried)
        while any memoryview from :meth:`view` is still alive: unmapping under a live view
        would turn its next access into a segfault, so mmap refuses.
        """
        if self._closed:
            return
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            self._mv = memoryview(self._mm)
            raise BufferError(
                "DramArena.close(): views returned by view() are still alive; release them"
            ) from None
        self._closed = True
        try:
            # Only remove the file if it is still ours (a newer daemon may have replaced it).
            if os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> DramArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_allocated(self, slot: Slot) -> None:
        if self._closed:
            raise ValueError("arena is closed")
        if not self.space.is_allocated(slot):
            raise ValueError(f"{slot} is not allocated")


class ArenaMapping:
    """A client's mapping of an arena created by a daemon (no allocator, no ownership).

    Offsets are file offsets exactly as the daemon's Slots carry them. The client never
    unlinks the file; :meth:`close` only unmaps it (BufferError while views are alive).
    """

    def __init__(self, path: str | Path, expected_arena_id: bytes | None = None) -> None:
        self._path = Path(path)
        fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise ValueError(f"{self._path}: {size} bytes is too small for a kvd arena")
            mm = _map_file(fd, size)
        finally:
            os.close(fd)
        try:
            header = ArenaHeader.unpack(mm[: _HEADER.size], source=str(self._path))
            if size != HEADER_BYTES + header.capacity_bytes:
                raise ValueError(
                    f"{self._path}: file is {size} bytes but header says capacity "
                    f"{header.capacity_bytes} (+{HEADER_BYTES} header)"
                )
            if expected_arena_id is not None and header.arena_id != expected_arena_id:
                raise ValueError(
                    f"{self._path}: arena id {header.arena_id.hex()} is not the expected "
                    f"{bytes(expected_arena_id).hex()} (the daemon restarted or the path "
                    "points at another daemon's arena)"
                )
        except BaseException:
            mm.close()
            raise
        self._mm = mm
        self._mv = memoryview(mm)
        self._np: np.ndarray | None = None  # a numpy view for copies, made on first use
        self._pages: memoryview | None = None  # the data pages, for batched copies; on first use
        self._size = size
        self._header = header

    @property
    def path(self) -> Path:
        return self._path

    @property
    def arena_id(self) -> bytes:
        return self._header.arena_id

    @property
    def header(self) -> ArenaHeader:
        return self._header

    @property
    def file_bytes(self) -> int:
        return self._size

    @property
    def capacity_bytes(self) -> int:
        """Bytes of slot space (the file less its header page)."""
        return self._header.capacity_bytes

    def view(self, offset: int, length: int) -> memoryview:
        """Writable zero-copy view of ``[offset, offset + length)`` bytes of the data pages."""
        if length < 0 or offset < HEADER_BYTES or offset + length > self._size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the data pages "
                f"[{HEADER_BYTES}, {self._size})"
            )
        return self._mv[offset : offset + length]

    def copy_in(self, offset: int, data: Buffer) -> None:
        """Copy ``data`` into the arena at ``offset``. numpy does the copy with the GIL
        released, so a client's gRPC threads keep the pipeline moving meanwhile."""
        src = np.frombuffer(data, dtype=np.uint8)
        self._array(offset, src.size)[:] = src

    def copy_out(self, offset: int, out: Buffer) -> None:
        """Fill the writable buffer ``out`` from the arena at ``offset`` (GIL released)."""
        dst = np.frombuffer(out, dtype=np.uint8)
        dst[:] = self._array(offset, dst.size)

    def copy_in_many(self, offsets: list[int], datas: list[Buffer]) -> None:
        """Copy each ``datas[i]`` into the arena at file offset ``offsets[i]``, in one call
        of :mod:`kvd.native.copy` (GIL released; large batches streamed past the cache).
        ValueError, before any byte moves, for a range outside the data pages."""
        native_copy.scatter(self._data_pages(), [o - HEADER_BYTES for o in offsets], datas)

    def copy_out_many(self, offsets: list[int], outs: list[Buffer]) -> None:
        """Fill each writable ``outs[i]`` from the arena at file offset ``offsets[i]``, as
        :meth:`copy_in_many` (ValueError for a range outside the data pages)."""
        native_copy.gather(self._data_pages(), [o - HEADER_BYTES for o in offsets], outs)

    def _data_pages(self) -> memoryview:
        if self._pages is None:
            self._pages = self._mv[HEADER_BYTES:]
        return self._pages

    def _array(self, offset: int, length: int) -> np.ndarray:
        if length < 0 or offset < HEADER_BYTES or offset + length > self._size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the data pages "
                f"[{HEADER_BYTES}, {self._size})"
            )
        if self._np is None:
            self._np = np.frombuffer(self._mm, dtype=np.uint8)
        return self._np[offset : offset + length]

    def close(self) -> None:
        """Unmap. Raises BufferError while views are alive (they would dangle). Idempotent."""
        if self._mm.closed:
            return
        self._np = None
        if self._pages is not None:
            self._pages.release()
            self._pages = None
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            self._mv = memoryview(self._mm)
            raise BufferError(
                "ArenaMapping.close(): views returned by view() are still alive"
            ) from None

    def __enter__(self) -> ArenaMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_arena(path: str | Path, expected_arena_id: bytes | None = None) -> ArenaMapping:
    """Map an existing arena read/write for a client process.

    Raises ValueError when the file is not a kvd arena, has another version or size, or
    (when ``expected_arena_id`` is given) belongs to another incarnation of the daemon;
    OSError when it cannot be opened or mapped.
    """
    return ArenaMapping(path, expected_arena_id)
