"""The file layer under the NVMe tier: every data and manifest write goes through one object.

:class:`NvmeStore` moves bytes only through a :class:`FileIO`: positional vectored reads and
writes, data syncs, and RocksDB write batches (the manifest). :class:`OsFileIO` is the real
thing, a thin layer over ``os.*`` and rocksdict. The seam exists so that tests and chaos runs
can put :class:`kvd.tiers.faults.FaultyIO` in its place and make the medium fail the way real
disks do (ENOSPC, EIO, torn or slow writes, a manifest that cannot be written) without
patching the OS.

Contract of every method: it does exactly one operation and raises OSError (with an errno)
when the medium fails. Units: offsets and sizes are bytes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

from rocksdict import Rdict, WriteBatch, WriteOptions

Views = Sequence[memoryview]


class FileIO(Protocol):
    """What the NVMe tier asks of its files and manifest database."""

    def open(self, path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
        """os.open: a file descriptor."""
        ...

    def close(self, fd: int) -> None: ...

    def pwritev(self, fd: int, views: Views, offset: int) -> int:
        """Write ``views`` back to back at ``offset``; the bytes written (may be short)."""
        ...

    def preadv(self, fd: int, views: Views, offset: int) -> int:
        """Fill ``views`` from ``offset``; the bytes read (0 at end of file)."""
        ...

    def fdatasync(self, fd: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def write_batch(self, db: Rdict, batch: WriteBatch, options: WriteOptions | None = None) -> None:
        """Apply a manifest write batch atomically (synced when ``options.sync``)."""
        ...


class OsFileIO:
    """The real file layer: ``os.*`` calls and rocksdict writes, nothing added.

    rocksdict reports a failed write with a bare Exception; it is raised here as
    ``OSError(EIO)`` so that the tier sees one kind of medium failure.
    """

    def open(self, path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwritev(self, fd: int, views: Views, offset: int) -> int:
        return os.pwritev(fd, views, offset)

    def preadv(self, fd: int, views: Views, offset: int) -> int:
        return os.preadv(fd, views, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def write_batch(self, db: Rdict, batch: WriteBatch, options: WriteOptions | None = None) -> None:
        try:
            if options is None:
                db.write(batch)
            else:
                db.write(batch, options)
        except OSError:
            raise
        except Exception as exc:  # rocksdict: bare Exception for an I/O error of RocksDB's
            raise OSError(errno.EIO, f"manifest write failed: {exc}") from exc


REAL_IO = OsFileIO()
