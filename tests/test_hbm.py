"""The HBM tier: a daemon-owned GPU pool when CUDA is present, a clear log line when not.

The pool's own code also runs on torch's CPU device here (the Tier contract in
tests/test_tiers_contract.py covers read/write/allocate); these tests cover what is
particular to HBM: no torch or no CUDA -> HbmUnavailable, device views that kvd.native
gathers into, and `kvd serve --hbm-bytes` on a machine without CUDA.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from kvd.tiers.hbm import HbmPool, HbmUnavailable


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_without_torch_the_pool_is_unavailable_with_the_reason():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from kvd.tiers.hbm import HbmPool, HbmUnavailable\n"
        "try:\n    HbmPool(1 << 20)\nexcept HbmUnavailable as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "torch is not installed" in res.stdout


@pytest.mark.skipif(_has_cuda(), reason="CUDA is present: the pool is made")
def test_without_cuda_the_pool_is_unavailable():
    pytest.importorskip("torch")
    with pytest.raises(HbmUnavailable, match="no CUDA device"):
        HbmPool(1 << 20)


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="multiple of page_bytes"):
        HbmPool(1000, 4096, device="cpu")
    with pytest.raises(ValueError, match="multiple of page_bytes"):
        HbmPool(0, 4096, device="cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_slots_are_device_views_that_native_gathers_into(device):
    torch = pytest.importorskip("torch")
    from kvd.native import PagedKv

    pool = HbmPool(64 * 4096, device=device)
    caches = [torch.randn(2, 6, 4, 2, 8, device=device).to(torch.bfloat16) for _ in range(3)]
    paged = PagedKv(caches)
    slots = pool.allocate_many(paged.slot_bytes, 3)
    assert len(slots) == 3
    paged.gather([5, 1, 3], pool.pool, [s.offset for s in slots])
    out = bytearray(paged.slot_bytes)
    pool.read_into(slots[1], paged.slot_bytes, out)
    want = b"".join(c[:, 1].contiguous().view(torch.uint8).cpu().numpy().tobytes() for c in caches)
    assert bytes(out) == want
    view = pool.view(slots[2])
    assert view.device == pool.pool.device and view.numel() == slots[2].length
    assert pool.check() == []
    pool.free(slots[2])
    with pytest.raises(ValueError, match="not allocated"):
        pool.view(slots[2])
    pool.close()
    assert "pool is released" in pool.check()
    with pytest.raises(ValueError, match="released"):
        pool.read_into(slots[0], 1, bytearray(1))


def test_serve_with_hbm_bytes_without_cuda_logs_why_and_serves(daemon_factory):
    d = daemon_factory(extra=["--hbm-bytes", "1GiB"]).start()
    with d.client() as c:
        assert c.register_namespace("m", 16, 4096)
        assert c.store("m", [1], [b"x" * 4096]) == 1
        assert c.load("m", [1]) == [b"x" * 4096]
    log = d.log()
    if _has_cuda():
        assert "HBM tier: 1073741824 bytes on cuda" in log
    else:
        lines = [line for line in log.splitlines() if "no HBM tier" in line]
        assert len(lines) == 1 and "no HBM tier: CUDA not available (" in lines[0], log


def test_serve_rejects_an_unaligned_hbm_size_with_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--hbm-bytes", "1000", "--socket", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["kvd serve: --hbm-bytes must be 0 (no HBM tier) or a multiple of 4096 bytes"]


def test_serve_rejects_an_unknown_hbm_device_with_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--hbm-bytes", "1MiB", "--hbm-device", "tpu",
         "--socket", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["kvd serve: --hbm-device must be cuda, cuda:N or cpu, got 'tpu'"]


# -- sharing the pool with engines ------------------------------------------------------------

OPEN_AND_READ = """
import sys
from kvd.tiers.hbm_share import OpenedPool, PoolHandle
kind, size, pool_id, path, ipc, bus, offset, n = sys.argv[1:]
handle = PoolHandle(kind, int(size), bytes.fromhex(pool_id), path, bytes.fromhex(ipc), bus)
pool = OpenedPool(handle)
t = pool.tensor
sys.stdout.write(t[int(offset) : int(offset) + int(n)].cpu().numpy().tobytes().hex())
t[int(offset)] = 0x5A  # the daemon must see what an engine writes
if t.is_cuda:
    import torch
    torch.cuda.synchronize(t.device)
del t
pool.close()
"""


def _open_in_child(handle, offset: int, n: int) -> bytes:
    args = [handle.kind, str(handle.capacity_bytes), handle.pool_id.hex(), handle.path, handle.ipc.hex(),
            handle.pci_bus_id or "-", str(offset), str(n)]
    res = subprocess.run([sys.executable, "-c", OPEN_AND_READ, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return bytes.fromhex(res.stdout)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_another_process_opens_the_pool_and_shares_its_bytes(device, tmp_path):
    pytest.importorskip("torch")
    if device == "cuda":
        pytest.importorskip("cupy")
    pool = HbmPool(16 * 4096, device=device, share_path=tmp_path / "pool")
    handle = pool.handle()
    assert handle.kind == ("file" if device == "cpu" else "cuda_ipc") and handle.capacity_bytes == 16 * 4096
    slot = pool.allocate(3 * 4096)
    data = bytes(range(256)) * 48
    pool.write(slot, data)
    assert _open_in_child(handle, slot.offset, len(data)) == data
    out = bytearray(1)
    pool.read_into(slot, 1, out)
    assert out == b"\x5a"
    pool.close()
    assert list(tmp_path.iterdir()) == []  # a host pool's file goes with it


def test_a_pool_without_a_share_path_cannot_be_shared_and_bad_handles_are_refused(tmp_path):
    pytest.importorskip("torch")
    from kvd.tiers.hbm_share import OpenedPool, PoolHandle, PoolUnshareable

    with pytest.raises(PoolUnshareable, match="cannot be opened by engines: no shared-memory file"):
        HbmPool(4096, device="cpu").handle()
    with pytest.raises(ValueError, match="unknown pool kind 'rdma'"):
        OpenedPool(PoolHandle("rdma", 4096, b"x" * 16))
    pool = HbmPool(2 * 4096, device="cpu", share_path=tmp_path / "pool")
    wrong = PoolHandle("file", 4096, pool.handle().pool_id, path=pool.handle().path)
    with pytest.raises(ValueError, match="the daemon says 4096"):
        OpenedPool(wrong)
    pool.close()


# -- the daemon with an HBM tier (--hbm-device cpu: the pool in host memory) ----------------------

BLOCK = 256 * 1024


def hbm_daemon(daemon_factory, **kwargs):
    return daemon_factory(dram="2MiB", nvme="32MiB", extra=["--hbm-bytes", "1MiB", "--hbm-device", "cpu"], **kwargs)


def test_stores_land_in_hbm_cascade_down_and_load_back_from_every_tier(daemon_factory, kvctl):
    pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    blocks = [bytes([i]) * BLOCK for i in range(16)]  # 4 MiB: HBM holds 4, DRAM 8, NVMe the rest
    keys = list(range(1, 17))
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        assert c.store("m", keys, blocks) == 16
        tiers = c.lookup("m", keys)
        assert set(tiers) == {"hbm", "dram", "nvme"} and tiers.count("hbm") <= 4
        assert c.load("m", keys) == blocks
        outs = [bytearray(BLOCK) for _ in keys]
        assert c.load_into("m", keys, outs) == [True] * 16 and [bytes(o) for o in outs] == blocks
        assert c.check() == []
        status = {t.name: t for t in c.status().tiers}
        assert status["hbm"].capacity_bytes == 1 << 20 and status["hbm"].location == "cpu"
    assert "HBM tier: 1048576 bytes in host memory" in d.log()
    res = kvctl(d, "status")
    assert res.returncode == 0 and "hbm" in res.stdout


def test_slot_copies_get_the_pool_tensor_for_hbm_slots(daemon_factory):
    torch = pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    seen = []

    def write(pages, indexes, offsets):
        seen.append(type(pages).__name__)
        for i, off in zip(indexes, offsets):
            pages[off : off + BLOCK] = torch.full((BLOCK,), 40 + i, dtype=torch.uint8)

    got = {}

    def read(pages, indexes, offsets):
        for i, off in zip(indexes, offsets):
            got[i] = bytes(pages[off : off + BLOCK].numpy()) if isinstance(pages, torch.Tensor) else bytes(
                pages[off : off + BLOCK]
            )

    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        assert c.store_slots("m", [7, 8], BLOCK, write) == 2
        assert set(seen) == {"Tensor"}  # stores land in HBM: the pool itself, no arena view
        assert c.lookup("m", [7, 8]) == ["hbm", "hbm"]
        assert c.load_slots("m", [7, 8, 9], BLOCK, read) == [True, True, False]
        assert got == {0: bytes([40]) * BLOCK, 1: bytes([41]) * BLOCK}


def three_blocks_in_hbm(d) -> list[bytes]:
    """Store three blocks into a fresh HBM daemon: they are in HBM only (no write-behind)."""
    blocks = [bytes([i + 1]) * BLOCK for i in range(3)]
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [1, 2, 3], blocks)
        assert c.lookup("m", [1, 2, 3]) == ["hbm"] * 3
    return blocks


def test_sigterm_writes_hbm_only_blocks_to_nvme_and_a_restart_serves_them(daemon_factory):
    pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    blocks = three_blocks_in_hbm(d)
    assert d.kill(signal.SIGTERM) == 0
    assert not list(d.shm_dir.glob("kvd-hbm-*"))  # the pool's file went with the daemon
    d.start()
    with d.client() as c:
        assert c.lookup("m", [1, 2, 3]) == ["nvme"] * 3
        assert c.load("m", [1, 2, 3]) == blocks
        assert c.check() == []


def test_a_block_corrupt_on_nvme_is_not_promoted_into_hbm(daemon_factory):
    pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    marked = b"\xab" * BLOCK
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [1], [marked])
        c.store("m", list(range(100, 116)), [bytes([i]) * BLOCK for i in range(16)], parents=[None] * 16)
        c.sync()
        assert c.lookup("m", [1]) == ["nvme"]
        slab = next(p for p in d.nvme_dir.glob("slab-*") if marked in p.read_bytes())
        raw = bytearray(slab.read_bytes())
        at = raw.index(marked)
        raw[at + 100] ^= 0xFF
        slab.write_bytes(raw)
        assert c.load("m", [1]) == [None]  # missing, never wrong
        assert c.lookup("m", [1]) == []
        assert c.check() == []
    assert "failed its checksum on NVMe: dropped" in d.log()


def test_a_client_that_cannot_open_the_pool_goes_inline_and_loses_nothing(daemon_factory, caplog):
    pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    (pool_file,) = d.shm_dir.glob("kvd-hbm-*")
    assert pool_file.stat().st_mode & 0o777 == 0o660  # engines of the socket's group map it
    pool_file.rename(pool_file.with_name("moved"))  # an engine pod that does not see the pool
    blocks = [bytes([i + 1]) * BLOCK for i in range(6)]
    with d.client() as c:
        with caplog.at_level("WARNING", logger="kvd.client"):
            assert not c.shared_memory  # the arena alone would reach DRAM slots, not HBM ones
        assert [r.getMessage()[:48] for r in caplog.records] == ["kvd: cannot open the daemon's HBM pool, block by"]
        c.register_namespace("m", 16, BLOCK)
        assert c.store("m", list(range(1, 7)), blocks) == 6  # inline: the daemon writes HBM
        assert "hbm" in c.lookup("m", list(range(1, 7)))
        assert c.load("m", list(range(1, 7))) == blocks
        assert c.check() == []
    with d.client(shared_memory=True) as c, pytest.raises(Exception) as info:
        c.load("m", [1])
    assert "cannot open the daemon's HBM pool" in str(info.value) and "FAILED_PRECONDITION" in str(info.value)
    assert d.log().count("no HBM tier") == 0


def test_a_pool_engines_cannot_open_is_no_hbm_tier_with_one_log_line(tmp_path, caplog):
    pytest.importorskip("torch")
    from kvd.server import daemon as daemon_module
    from kvd.server.config import ServeConfig
    from kvd.tiers.hbm_share import PoolUnshareable

    class Unshareable(HbmPool):  # a CUDA pool made without CuPy behaves so
        def handle(self):
            raise PoolUnshareable("this cuda:0 pool cannot be opened by engines: a CUDA pool needs CuPy")

    config = ServeConfig(hbm_bytes=1 << 20, hbm_device="cpu", shm_dir=tmp_path)
    original = daemon_module.HbmPool
    daemon_module.HbmPool = Unshareable
    try:
        with caplog.at_level("WARNING", logger="kvd.daemon"):
            assert daemon_module.open_hbm(config) is None
    finally:
        daemon_module.HbmPool = original
    lines = [r.getMessage() for r in caplog.records if "HBM" in r.getMessage()]
    assert lines == ["no HBM tier: this cuda:0 pool cannot be opened by engines: a CUDA pool needs CuPy"]
    assert list(tmp_path.iterdir()) == []  # the pool made for nothing is released


def test_sync_writes_hbm_blocks_down_and_they_survive_a_kill(daemon_factory):
    pytest.importorskip("torch")
    d = hbm_daemon(daemon_factory).start()
    blocks = three_blocks_in_hbm(d)
    with d.client() as c:
        assert c.sync() == 0  # no write-behind from HBM: Sync writes them down before it answers
    d.kill()  # SIGKILL: what Sync reported durable must be there
    assert len(list(d.shm_dir.glob("kvd-hbm-*"))) == 1  # the killed daemon's pool file stays ...
    d.start()
    assert len(list(d.shm_dir.glob("kvd-hbm-*"))) == 1  # ... and the restarted one replaces it
    with d.client() as c:
        assert c.load("m", [1, 2, 3]) == blocks
