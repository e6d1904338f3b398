"""NvmeStore specifics (checksums, manifest, recovery, layout, buffered fallback,
concurrency) and the DRAM arena's shared mapping as clients see it."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from kvd.media import Slot
from kvd.tiers import CorruptBlockError
from kvd.tiers.dram import HEADER_BYTES, DramArena, open_arena
from kvd.tiers.nvme import ManifestEntry, NvmeStore

PAGE = 4096
LOGGER = "kvd.tiers.nvme"


def ok(t: NvmeStore | DramArena) -> None:
    assert t.check() == []


def open_store(directory: Path, pages: int = 16, slab_pages: int = 4) -> NvmeStore:
    return NvmeStore(directory, pages * PAGE, slab_bytes=slab_pages * PAGE, page_bytes=PAGE)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "nvme"


@pytest.fixture
def store(store_dir: Path) -> Iterator[NvmeStore]:
    s = open_store(store_dir)
    yield s
    s.close()


def put_block(s: NvmeStore, key: bytes, nbytes: int, seed: int) -> tuple[ManifestEntry, bytes]:
    """Allocate, write durably and persist one block; returns its entry and bytes."""
    data = random.Random(seed).randbytes(nbytes)
    slot = s.allocate(nbytes)
    assert slot is not None
    [checksum] = s.write_many([(slot, data)])
    entry = ManifestEntry(key, slot, nbytes, checksum, b"meta:" + key)
    s.persist([entry])
    return entry, data


def corrupt(s_dir: Path, slab_bytes: int, slot: Slot, at: int = 0) -> None:
    """Flip one byte of ``slot`` on disk with ordinary buffered I/O."""
    k, within = divmod(slot.offset, slab_bytes)
    with open(s_dir / f"slab-{k:04d}.dat", "r+b") as f:
        f.seek(within + at)
        byte = f.read(1)
        f.seek(within + at)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def read_back(s: NvmeStore, entry: ManifestEntry) -> bytes:
    out = bytearray(entry.nbytes)
    s.read_into(entry.slot, entry.nbytes, out)
    return bytes(out)


def o_direct_refused(directory: str) -> bool:
    probe = os.path.join(directory, ".kvd-odirect-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        return exc.errno == errno.EINVAL
    else:
        os.close(fd)
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


# -- layout -----------------------------------------------------------------------------


def test_slab_files_cover_capacity(tmp_path: Path) -> None:
    s = NvmeStore(tmp_path, 10 * PAGE + 100, slab_bytes=4 * PAGE, page_bytes=PAGE)
    try:
        assert s.capacity_bytes == 10 * PAGE  # rounded down to whole pages
        sizes = [p.stat().st_size for p in s.slab_paths]
        assert [p.name for p in s.slab_paths] == ["slab-0000.dat", "slab-0001.dat", "slab-0002.dat"]
        assert sizes == [4 * PAGE, 4 * PAGE, 2 * PAGE]
        # Slab k starts at k * slab_bytes in the address space; no slot straddles slabs.
        assert s.allocate(5 * PAGE) is None
        slots = [s.allocate(4 * PAGE), s.allocate(4 * PAGE), s.allocate(2 * PAGE)]
        assert sorted(x.offset for x in slots if x) == [0, 4 * PAGE, 8 * PAGE]
        ok(s)
    finally:
        s.close()


def test_bad_geometry_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        NvmeStore(tmp_path / "a", PAGE - 1, slab_bytes=PAGE)
    with pytest.raises(ValueError):
        NvmeStore(tmp_path / "b", 4 * PAGE, slab_bytes=PAGE + 512)
    with pytest.raises(ValueError):
        NvmeStore(tmp_path / "c", 4 * PAGE, slab_bytes=4 * PAGE, page_bytes=512)


def test_direct_io_on_a_filesystem_that_supports_it(store: NvmeStore, store_dir: Path) -> None:
    assert store.direct_io == (not o_direct_refused(str(store_dir)))


def test_second_store_on_same_directory_refused(store: NvmeStore, store_dir: Path) -> None:
    with pytest.raises(OSError):
        open_store(store_dir)


# -- checksums --------------------------------------------------------------------------


def test_write_many_returns_xxh3_of_real_bytes(store: NvmeStore) -> None:
    blocks = [random.Random(i).randbytes(n) for i, n in enumerate([1, PAGE, 5000, 3 * PAGE])]
    slots = [store.allocate(len(b)) for b in blocks]
    sums = store.write_many([(s, b) for s, b in zip(slots, blocks)])
    assert sums == [xxhash.xxh3_64_intdigest(b) for b in blocks]
    ok(store)
    for s, b in zip(slots, blocks):
        out = bytearray(len(b))
        store.read_into(s, len(b), out)
        assert out == b


def test_write_many_validates_before_any_io(store: NvmeStore) -> None:
    a, b = store.allocate(PAGE), store.allocate(PAGE)
    store.write(a, b"keep")
    with pytest.raises(ValueError):
        store.write_many([(b, b"x"), (a, bytes(PAGE + 1))])
    with pytest.raises(ValueError):
        store.write_many([(b, b"x"), (b, b"y")])
    out = bytearray(4)
    store.read_into(a, 4, out)  # untouched, still verifies
    assert out == b"keep"
    ok(store)


def test_corrupted_bytes_on_disk_raise(store: NvmeStore, store_dir: Path) -> None:
    entry, data = put_block(store, b"k", 5000, seed=1)
    assert read_back(store, entry) == data
    corrupt(store_dir, store.slab_bytes, entry.slot, at=4500)  # in the padded tail page
    with pytest.raises(CorruptBlockError):
        read_back(store, entry)
    ok(store)


def test_corruption_past_nbytes_is_padding_and_harmless(store: NvmeStore, store_dir: Path) -> None:
    entry, data = put_block(store, b"k", 5000, seed=2)
    corrupt(store_dir, store.slab_bytes, entry.slot, at=6000)
    assert read_back(store, entry) == data


def test_read_of_never_written_slot_raises(store: NvmeStore) -> None:
    slot = store.allocate(PAGE)
    with pytest.raises(CorruptBlockError):
        store.read_into(slot, 10, bytearray(10))


def test_read_with_wrong_size_raises(store: NvmeStore) -> None:
    entry, _ = put_block(store, b"k", 3000, seed=3)
    with pytest.raises(ValueError):
        store.read_into(entry.slot, 2999, bytearray(3000))


def test_truncated_slab_is_corruption_and_reported(store: NvmeStore, store_dir: Path) -> None:
    entry, _ = put_block(store, b"k", 3 * PAGE, seed=4)
    os.truncate(store_dir / "slab-0000.dat", PAGE)
    with pytest.raises(CorruptBlockError):
        read_back(store, entry)
    assert any("bytes, expected" in p for p in store.check())


def test_blocks_larger_than_bounce_buffer(tmp_path: Path) -> None:
    # 1.5 MiB + change: the unaligned path goes through the 1 MiB bounce in two chunks.
    nbytes = (3 << 19) + 1234
    s = NvmeStore(tmp_path, 4 << 20, slab_bytes=2 << 20)
    try:
        data = random.Random(5).randbytes(nbytes)
        slot = s.allocate(nbytes)
        s.write(slot, data)  # bytes: never page aligned
        out = bytearray(nbytes)
        s.read_into(slot, nbytes, out)
        assert out == data
        aligned = memoryview(mmap.mmap(-1, nbytes))
        s.read_into(slot, nbytes, aligned)
        assert aligned == data
        ok(s)
    finally:
        s.close()


# -- manifest ---------------------------------------------------------------------------


def test_persist_requires_a_durable_matching_write(store: NvmeStore) -> None:
    slot = store.allocate(100)
    unwritten = ManifestEntry(b"a", slot, 100, 123, b"")
    with pytest.raises(ValueError):
        store.persist([unwritten])
    [checksum] = store.write_many([(slot, bytes(100))])
    with pytest.raises(ValueError):
        store.persist([ManifestEntry(b"a", slot, 100, checksum ^ 1, b"")])
    with pytest.raises(ValueError):
        store.persist([ManifestEntry(b"a", slot, 99, checksum, b"")])
    good = ManifestEntry(b"a", slot, 100, checksum, b"")
    # All or nothing: a bad entry in the batch keeps the good one out too.
    with pytest.raises(ValueError):
        store.persist([good, unwritten])
    ok(store)
    store.free(slot)
    with pytest.raises(ValueError):
        store.persist([good])  # freed: the write no longer vouches for the slot


def test_recover_returns_exactly_the_persisted_entries(store_dir: Path) -> None:
    s = open_store(store_dir)
    persisted = {}
    for i, n in enumerate([10, PAGE, 5000, 2 * PAGE + 1]):
        entry, data = put_block(s, b"key%d" % i, n, seed=10 + i)
        persisted[entry.key] = (entry, data)
    # Written and durable but never persisted: must not come back.
    stray = s.allocate(3 * PAGE)
    s.write(stray, b"not in the manifest")
    forgotten, _ = put_block(s, b"gone", 100, seed=99)
    s.forget([b"gone"])
    s.free(forgotten.slot)
    ok(s)
    assert s.manifest_size() == len(persisted)
    assert s.entries() == sorted((e for e, _ in persisted.values()), key=lambda e: e.key)
    s.close()

    s = open_store(store_dir)
    try:
        got = s.recover()
        ok(s)
        assert sorted(e.key for e in got) == sorted(persisted)
        for e in got:
            assert e == persisted[e.key][0]
            assert s.space.is_allocated(e.slot)
            assert read_back(s, e) == persisted[e.key][1]
        assert s.used_bytes == sum(e.slot.length for e in got)
        assert not s.space.is_allocated(stray)
        # The stray block's pages are free again: the remaining space is one run.
        assert s.allocate(3 * PAGE) is not None
        ok(s)
        with pytest.raises(RuntimeError):
            s.recover()
    finally:
        s.close()


def test_recover_must_precede_allocation(store: NvmeStore) -> None:
    store.allocate(PAGE)
    with pytest.raises(RuntimeError):
        store.recover()


def test_recover_drops_corrupted_entry(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = open_store(store_dir)
    good, good_data = put_block(s, b"good", 3000, seed=1)
    bad, _ = put_block(s, b"bad", 3000, seed=2)
    s.close()
    corrupt(store_dir, 4 * PAGE, bad.slot, at=17)

    s = open_store(store_dir)
    assert s.manifest_size() == 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = s.recover()
    assert got == [good]
    assert s.entries() == [good] and s.manifest_size() == 1
    assert read_back(s, good) == good_data
    assert not s.space.is_allocated(bad.slot)
    assert any("dropped 1 manifest entries" in r.getMessage() for r in caplog.records)
    ok(s)
    s.close()

    s = open_store(store_dir)  # the bad entry was deleted from the manifest
    try:
        assert s.recover(verify=False) == [good]
        ok(s)
    finally:
        s.close()


def test_recover_without_verify_still_verifies_on_read(store_dir: Path) -> None:
    s = open_store(store_dir)
    entry, _ = put_block(s, b"k", 3000, seed=1)
    s.close()
    corrupt(store_dir, 4 * PAGE, entry.slot)
    s = open_store(store_dir)
    try:
        assert s.recover(verify=False) == [entry]
        with pytest.raises(CorruptBlockError):
            read_back(s, entry)
    finally:
        s.close()


def test_recover_drops_entries_outside_a_shrunk_capacity(store_dir: Path) -> None:
    s = open_store(store_dir, pages=16)
    kept = put_block(s, b"a", 4 * PAGE, seed=1)[0]  # slab 0
    lost = [put_block(s, b"b%d" % i, 4 * PAGE, seed=2 + i)[0] for i in range(3)]  # slabs 1-3
    s.close()
    s = open_store(store_dir, pages=6)  # slab 0 whole, slab 1 cut to 2 pages, 2-3 gone
    try:
        assert sorted(p.name for p in store_dir.glob("slab-*.dat")) == [
            "slab-0000.dat",
            "slab-0001.dat",
        ]
        assert s.recover() == [kept]
        assert s.used_bytes == kept.slot.length
        assert len(lost) == 3 and s.allocate(2 * PAGE) == Slot(4 * PAGE, 2 * PAGE)
        ok(s)
    finally:
        s.close()


def test_recover_keeps_one_of_two_entries_sharing_a_slot(store: NvmeStore, store_dir: Path) -> None:
    entry, data = put_block(store, b"one", 500, seed=1)
    twin = ManifestEntry(b"two", entry.slot, entry.nbytes, entry.checksum, b"")
    store.persist([twin])
    assert any("share pages" in p for p in store.check())
    store.close()
    s = open_store(store_dir)
    try:
        got = s.recover()
        assert len(got) == 1 and got[0].slot == entry.slot
        assert read_back(s, got[0]) == data
        ok(s)
    finally:
        s.close()


def test_layout_change_wipes_manifest_and_slabs(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = open_store(store_dir, pages=16, slab_pages=4)
    put_block(s, b"k", 1000, seed=1)
    s.meta_put(b"geometry", b"g1")
    s.close()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = open_store(store_dir, pages=16, slab_pages=8)
    try:
        assert any("laid out differently" in r.getMessage() for r in caplog.records)
        assert s.recover() == []
        assert [p.stat().st_size for p in s.slab_paths] == [8 * PAGE, 8 * PAGE]
        assert sorted(p.name for p in store_dir.glob("slab-*.dat")) == [
            "slab-0000.dat",
            "slab-0001.dat",
        ]
        # The slabs were recreated: no trace of the old block's bytes.
        assert (store_dir / "slab-0000.dat").read_bytes()[:1000] == bytes(1000)
        assert s.meta_get(b"geometry") == b"g1"  # side metadata is not about slab layout
        ok(s)
    finally:
        s.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = open_store(store_dir, pages=16, slab_pages=8)  # same layout: no warning
    s.close()
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_meta_survives_reopen_and_stays_out_of_the_manifest(store_dir: Path) -> None:
    s = open_store(store_dir)
    s.meta_put(b"ns/a", b"1")
    s.meta_put(b"ns/b", b"2")
    s.meta_put(b"other", b"3")
    s.meta_put(b"ns/c", b"x")
    s.meta_delete(b"ns/c")
    entry, _ = put_block(s, b"ns/a", 10, seed=1)  # same key text in the manifest keyspace
    s.close()
    s = open_store(store_dir)
    try:
        assert s.meta_items(b"ns/") == [(b"ns/a", b"1"), (b"ns/b", b"2")]
        assert s.meta_items() == [(b"ns/a", b"1"), (b"ns/b", b"2"), (b"other", b"3")]
        assert s.meta_get(b"other") == b"3"
        assert s.meta_get(b"ns/c") is None
        assert s.recover() == [entry]
    finally:
        s.close()


# -- buffered fallback ------------------------------------------------------------------


def _fallback_roundtrip(s: NvmeStore) -> None:
    data = random.Random(3).randbytes(5000)
    slot = s.allocate(5000)
    [checksum] = s.write_many([(slot, data)])
    s.persist([ManifestEntry(b"k", slot, 5000, checksum, b"")])
    out = bytearray(5000)
    s.read_into(slot, 5000, out)
    assert out == data
    aligned = memoryview(mmap.mmap(-1, 5000))
    s.read_into(slot, 5000, aligned)
    assert aligned == data
    ok(s)


def test_buffered_fallback_when_open_refuses_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = open_store(tmp_path, pages=12, slab_pages=4)  # 3 slabs, still one warning
    try:
        assert s.direct_io is False
        warnings = [r for r in caplog.records if r.name == LOGGER]
        assert len(warnings) == 1 and "O_DIRECT" in warnings[0].getMessage()
        _fallback_roundtrip(s)
    finally:
        s.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_buffered_fallback_on_tmpfs(caplog: pytest.LogCaptureFixture) -> None:
    if not o_direct_refused("/dev/shm"):
        pytest.skip("this kernel's tmpfs accepts O_DIRECT")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="kvd-test-")
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            s = open_store(Path(d), pages=12, slab_pages=4)
        try:
            assert s.direct_io is False
            assert len([r for r in caplog.records if r.name == LOGGER]) == 1
            _fallback_roundtrip(s)
        finally:
            s.close()
    finally:
        shutil.rmtree(d)


# -- concurrency ------------------------------------------------------------------------


def test_concurrent_writes_and_reads_from_four_threads(tmp_path: Path) -> None:
    s = NvmeStore(tmp_path, 64 * PAGE, slab_bytes=16 * PAGE)
    try:
        per_thread = 12
        jobs = []
        rng = random.Random(42)
        for _thread in range(4):
            mine = []
            for _ in range(per_thread):
                n = rng.randint(1, 5000)
                mine.append((s.allocate(n), rng.randbytes(n)))
            jobs.append(mine)
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def writer(mine: list[tuple[Slot, bytes]], batched: bool) -> None:
            try:
                barrier.wait()
                if batched:
                    s.write_many(mine)
                else:
                    for slot, data in mine:
                        # Aligned source half the time: both I/O paths race each other.
                        if len(data) % 2:
                            s.write(slot, data)
                        else:
                            src = memoryview(mmap.mmap(-1, len(data)))
                            src[:] = data
                            s.write(slot, src)
                barrier.wait()
                for slot, data in mine:
                    out = bytearray(len(data))
                    s.read_into(slot, len(data), out)
                    if out != data:
                        raise AssertionError(f"{slot} read back wrong bytes")
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(jobs[t], t % 2 == 0)) for t in range(4)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        ok(s)
    finally:
        s.close()


# -- crash safety -----------------------------------------------------------------------

_CRASH_CHILD = """
import random, sys
from kvd.tiers.nvme import ManifestEntry, NvmeStore
s = NvmeStore(sys.argv[1], 48 * 4096, slab_bytes=16 * 4096)
live = [(e.key, e.slot) for e in s.recover()]
i = int(sys.argv[2])
while True:
    n = 1 + (i * 7919) % 9000
    slot = s.allocate(n)
    while slot is None:
        key, old = live.pop(0)
        print("forgetting", key.decode(), flush=True)
        s.forget([key])
        s.free(old)
        slot = s.allocate(n)
    [checksum] = s.write_many([(slot, random.Random(i).randbytes(n))])
    s.persist([ManifestEntry(b"%d" % i, slot, n, checksum, b"%d" % n)])
    live.append((b"%d" % i, slot))
    print("put", i, flush=True)
    i += 1
"""


def test_kill_9_at_any_moment_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A child stores blocks (evicting old ones) until SIGKILLed mid-flight; afterwards
    every acknowledged, unevicted block is recovered, and everything recovered verifies.
    Three rounds on one directory, so recovery also follows a recovered-then-killed run."""
    rng = random.Random(9)
    put: set[int] = set()  # persist() returned
    evicting: set[int] = set()  # forget() may have run
    start = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        lines: list[str] = []
        acked, target = 0, rng.randint(40, 120)  # kill at a different moment each round
        while acked < target:
            line = child.stdout.readline()
            assert line, "child died on its own"
            lines.append(line)
            acked += line.startswith("put")
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.read().splitlines()  # whatever it printed before dying
        child.wait()
        for line in lines:
            verb, num = line.split()
            (put if verb == "put" else evicting).add(int(num))

        s = NvmeStore(tmp_path, 48 * PAGE, slab_bytes=16 * PAGE)
        try:
            got = s.recover()
            ok(s)
            keys = {int(e.key) for e in got}
            assert put - evicting <= keys
            for e in got:
                assert read_back(s, e) == random.Random(int(e.key)).randbytes(int(e.meta))
        finally:
            s.close()
        start = max(put | keys) + 1000


# -- DRAM arena, as clients map it ------------------------------------------------------


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[DramArena]:
    a = DramArena(tmp_path / "arena.shm", 8 * PAGE)
    yield a
    a.close()


def test_arena_header_fields(arena: DramArena) -> None:
    raw = arena.path.read_bytes()
    assert len(raw) == arena.file_bytes == HEADER_BYTES + 8 * PAGE
    magic, version, arena_id, capacity, page = struct.unpack_from("<8sI16sQI", raw, 0)
    assert magic == b"KVDARENA"
    assert version == 1
    assert arena_id == arena.arena_id and len(arena_id) == 16
    assert capacity == 8 * PAGE
    assert page == PAGE
    assert stat.S_IMODE(arena.path.stat().st_mode) == 0o660
    # Slot offsets are file offsets past the header.
    slot = arena.allocate(1)
    assert slot == Slot(HEADER_BYTES, PAGE)
    ok(arena)


def test_client_mapping_shares_bytes_both_ways(arena: DramArena) -> None:
    client = open_arena(arena.path, expected_arena_id=arena.arena_id)
    try:
        assert client.arena_id == arena.arena_id
        slot = arena.allocate(3 * PAGE)
        daemon_view = arena.view(slot)
        assert daemon_view.nbytes == slot.length
        client_view = client.view(slot.offset, slot.length)

        daemon_view[:5] = b"hello"
        assert bytes(client_view[:5]) == b"hello"
        client_view[PAGE : PAGE + 6] = b"client"
        out = bytearray(PAGE + 6)
        arena.read_into(slot, PAGE + 6, out)
        assert out[PAGE:] == b"client"
        arena.write(slot, b"again")
        assert bytes(client_view[:5]) == b"again"
        ok(arena)

        daemon_view.release()
        client_view.release()
    finally:
        client.close()


def test_open_arena_rejects_wrong_id_and_non_arenas(arena: DramArena, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arena id"):
        open_arena(arena.path, expected_arena_id=bytes(16))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * (HEADER_BYTES + PAGE))
    with pytest.raises(ValueError, match="not a kvd arena"):
        open_arena(junk)
    short = tmp_path / "short"
    short.write_bytes(b"KVDARENA")
    with pytest.raises(ValueError):
        open_arena(short)


def test_client_view_bounds(arena: DramArena) -> None:
    with open_arena(arena.path) as client:
        with pytest.raises(ValueError):
            client.view(0, 16)  # the header is not data
        with pytest.raises(ValueError):
            client.view(arena.file_bytes - PAGE, PAGE + 1)
        v = client.view(arena.file_bytes - PAGE, PAGE)
        assert v.nbytes == PAGE
        v.release()


def test_arena_view_requires_allocated_slot(arena: DramArena) -> None:
    with pytest.raises(ValueError):
        arena.view(Slot(HEADER_BYTES, PAGE))


def test_arena_close_refuses_while_views_live_then_unlinks(tmp_path: Path) -> None:
    a = DramArena(tmp_path / "a.shm", 4 * PAGE)
    v = a.view(a.allocate(10))
    with pytest.raises(BufferError):
        a.close()
    ok(a)  # still open and intact
    v.release()
    a.close()
    assert not (tmp_path / "a.shm").exists()
    a.close()  # idempotent


def test_arena_replaces_a_stale_file_and_gets_a_new_id(tmp_path: Path) -> None:
    path = tmp_path / "a.shm"
    path.write_bytes(b"stale")
    a = DramArena(path, 4 * PAGE)
    first_id = a.arena_id
    a.close()
    b = DramArena(path, 4 * PAGE)
    try:
        assert b.arena_id != first_id
        assert path.stat().st_size == HEADER_BYTES + 4 * PAGE
        ok(b)
    finally:
        b.close()


def test_arena_capacity_must_be_page_multiple(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DramArena(tmp_path / "a", 4 * PAGE + 1)
    with pytest.raises(ValueError):
        DramArena(tmp_path / "b", 0)
    with pytest.raises(ValueError):
        DramArena(tmp_path / "c", 4 * 8192, page_bytes=8192)  # header is one 4 KiB page


@pytest.mark.parametrize("direct_io", [True, False])
def test_batched_io_keeps_short_blocks_on_their_slots(tmp_path, direct_io):
    """write_many/read_many coalesce adjacent slots; blocks shorter than a slot must not."""
    store = NvmeStore(tmp_path / "nv", 1 << 20, slab_bytes=1 << 20, direct_io=direct_io)
    store.recover()
    assert store.direct_io is direct_io
    rng = random.Random(7)
    sizes = [8192, 5000, 8192, 100, 8192, 8192, 3]
    blocks = [rng.randbytes(n) for n in sizes]
    slots = [store.allocate(8192) for _ in sizes]
    store.write_many(list(zip(slots, blocks)))
    for slot, block in zip(slots, blocks):  # one at a time: no grouping to hide behind
        out = bytearray(len(block))
        store.read_into(slot, len(block), out)
        assert bytes(out) == block
    outs = [bytearray(n) for n in sizes]
    errors = store.read_many([(s, n, o) for s, n, o in zip(slots, sizes, outs)])
    assert errors == [None] * len(sizes)
    assert [bytes(o) for o in outs] == blocks
    assert store.check() == []
    store.close()


def test_only_the_daemon_reads_the_manifest_and_the_slabs(tmp_path):
    """Namespace names and hashes (the manifest) and KV bytes (the slabs) are not for other
    local users, whatever the umask."""
    old = os.umask(0o022)
    try:
        store = NvmeStore(tmp_path / "nv", 1 << 20, slab_bytes=1 << 20)
        store.recover()
        slot = store.allocate(8192)
        store.write_many([(slot, b"x" * 8192)])
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "nv" / "manifest").stat().st_mode) == 0o700
    slabs = [p for p in (tmp_path / "nv").iterdir() if p.is_file()]
    assert slabs and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in slabs)
