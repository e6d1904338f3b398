"""The HBM tier: a daemon-owned GPU pool when CUDA is present, a clear log line when not.

The pool's own code also runs on torch's CPU device here (the Tier contract in
tests/test_tiers_contract.py covers read/write/allocate); these tests cover what is
particular to HBM: no torch or no CUDA -> HbmUnavailable, device views that kvd.native
gathers into, and `kvd serve --hbm-bytes` on a machine without CUDA.
"""

from __future__ import annotations

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
