"""`kvd serve` start-up failures, each against the real CLI: one line naming the flag, exit 2,
and nothing left behind (no arena in --shm-dir, no socket); a second daemon on a live socket
refuses to start and leaves the first one serving."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
from conftest import DaemonProcess


def serve(tmp_path, *flags: str, sock=None) -> subprocess.CompletedProcess:
    sock = sock or tmp_path / "k.sock"
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(sock), "--shm-dir", str(tmp_path / "shm"),
         "--nvme-dir", str(tmp_path / "nvme"), "--dram-bytes", "8MiB", "--nvme-bytes", "16MiB", *flags],
        capture_output=True, text=True, timeout=120,
    )


def assert_refused(r: subprocess.CompletedProcess, flag: str) -> None:
    """Exit 2, and the last line (after the daemon's own log lines, if it got that far) names
    the flag; no traceback."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"kvd serve: {flag}"), r.stderr
    assert all(" kvd." in line or line.startswith("E") for line in lines[:-1]), r.stderr  # log lines only
    assert "Traceback" not in r.stderr


def leftovers(tmp_path) -> list[str]:
    """What a failed start may not leave: arena files, sockets."""
    shm = tmp_path / "shm"
    found = [p.name for p in shm.iterdir()] if shm.exists() else []
    found += [p.name for p in tmp_path.rglob("*") if p.is_socket()]
    return found


def test_a_socket_path_too_long_for_unix_is_refused_before_anything(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    r = serve(tmp_path, sock=deep / "k.sock")
    assert_refused(r, "--socket")
    assert "longer than the 107 bytes" in r.stderr
    assert leftovers(tmp_path) == []


def test_an_unwritable_socket_directory_is_refused(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere: a file where the directory should be does the same job
        (tmp_path / "run").write_text("")
        sock = tmp_path / "run" / "k.sock"
    else:
        (tmp_path / "run").mkdir(mode=0o500)
        sock = tmp_path / "run" / "k.sock"
    r = serve(tmp_path, sock=sock)
    assert_refused(r, "--socket")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name, flags, flag", [
    ("bad certificate", ["--tcp", "127.0.0.1:0"], "--tcp"),
    ("metrics port in use", [], "--metrics-port"),
    ("tcp port in use", [], "--tcp"),
])
def test_a_port_or_certificate_that_fails_at_bind_leaves_nothing(tmp_path, name, flags, flag):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        if name == "bad certificate":
            (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
            (tmp_path / "key.pem").write_text("junk")
            flags = ["--tcp", "127.0.0.1:0", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
        elif name == "metrics port in use":
            flags = ["--metrics-port", str(busy), "--metrics-host", "127.0.0.1"]
        else:
            flags = ["--tcp", f"127.0.0.1:{busy}", "--tcp-insecure"]
        r = serve(tmp_path, *flags)
    finally:
        holder.close()
    assert_refused(r, flag)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--slab-bytes", "0"], "--slab-bytes must be a whole number of pages"),
    (["--slab-bytes", "5000"], "--slab-bytes must be a whole number of pages"),
    (["--nvme-bytes", "5000"], "--nvme-bytes must be 0 (no NVMe tier) or a whole number of pages"),
])
def test_sizes_that_are_not_pages_are_refused(tmp_path, flags, message):
    r = serve(tmp_path, *flags)
    assert_refused(r, message.split()[0])
    assert message in r.stderr
    env = {**os.environ, "KVD_SLAB_BYTES": "0"}
    r = subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", "config", "print"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("kvd config: --slab-bytes must be a whole number of pages")


def test_an_nvme_dir_that_is_a_file_names_the_flag(tmp_path):
    (tmp_path / "nvme").write_text("")
    r = serve(tmp_path)
    assert_refused(r, "--nvme-dir")
    assert "not a directory" in r.stderr and leftovers(tmp_path) == []


def test_a_second_daemon_on_a_live_socket_refuses_and_the_first_keeps_serving(tmp_path):
    (tmp_path / "one").mkdir()
    first = DaemonProcess(tmp_path / "one").start()
    try:
        with first.client() as c:
            c.register_namespace("m", 16, 4096)
            c.store("m", [1], [b"x" * 4096])
        arena = sorted(first.shm_dir.glob("kvd-arena-*"))
        assert len(arena) == 1
        r = subprocess.run(
            [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(first.socket),
             "--shm-dir", str(first.shm_dir), "--nvme-dir", str(tmp_path / "other-nvme"), "--dram-bytes", "8MiB"],
            capture_output=True, text=True, timeout=120,
        )
        assert_refused(r, "--socket")
        assert f"another kvd daemon (pid {first.proc.pid}) serves it" in r.stderr
        # The first daemon still has its socket and its arena, and serves the same bytes.
        assert stat.S_ISSOCK(first.socket.stat().st_mode)
        with first.client() as c:
            assert c.load("m", [1]) == [b"x" * 4096]
        assert sorted(first.shm_dir.glob("kvd-arena-*")) == arena
    finally:
        first.stop()
    # Once the first is gone, a daemon starts on that socket.
    again = DaemonProcess(tmp_path / "one").start()
    again.stop()
