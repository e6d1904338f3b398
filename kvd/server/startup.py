"""What stands between `kvd serve` and a second daemon, and how a start-up failure is told.

A daemon holds ``<socket>.lock`` (an exclusive ``flock``; the file holds its pid) from before
it touches anything until it exits, so a second daemon on the same socket (and so the same
arena, which is named after the socket) refuses to start instead of taking the socket over.
The lock file stays after the daemon exits: removing it could let two daemons, started as
the first one exits, lock two different files.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StartupError(Exception):
    """A failure before the daemon serves, naming the flag to change: `kvd serve` prints it
    on one line and exits 2."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag} {message}")
        self.flag = flag


class SocketLock:
    """The exclusive hold of one socket path by one daemon."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, socket: Path) -> SocketLock:
        """Lock ``socket``'s lock file (creating the socket's directory); StartupError when
        another daemon holds it (naming its pid) or the directory is not writable."""
        path = socket.with_name(socket.name + ".lock")
        try:
            socket.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError("--socket", f"{socket}: cannot write in {socket.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                "--socket", f"{socket}: another kvd daemon (pid {pid}) serves it; stop that one or choose another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
