"""Bulk copies of many byte runs: the compiled helper (``kvd.native._copy``) or numpy.

Three calls, the same in both implementations; every size and offset is in bytes, every
buffer a C-contiguous object with the buffer protocol (``dst``/``dsts`` writable):

- ``copy_runs(dst, dst_offsets, src, src_offsets, lengths)``: run ``i`` copies
  ``src[src_offsets[i] : + lengths[i]]`` to ``dst[dst_offsets[i] :]``;
- ``scatter(dst, offsets, srcs)``: each whole ``srcs[i]`` to ``dst[offsets[i] :]``;
- ``gather(src, offsets, dsts)``: each whole ``dsts[i]`` from ``src[offsets[i] :]``.

A run outside its buffer, or offsets and runs of different counts, raise ValueError before
any byte moves. Runs must not overlap one another's destinations (what lands there is then
undefined). Both release the GIL while bytes move.

The compiled helper streams large runs past the cache with non-temporal stores, as a bulk
memcpy does (docs/decisions.md, "Data path at the machine's limit"): at 256 KiB a run it
copies at ~0.9x the machine's bulk memcpy where numpy's slice copies reach ~0.6x. It is built
by ``pip install`` (native/_copy.c); where it is missing (no compiler, another platform) or
``KVD_NATIVE_COPY=numpy`` is set, numpy does the copies. :data:`BACKEND` says which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np


def _bytes(buf, writable: bool) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("the destination buffer is read-only")
    return arr


def _check(i: int, off: int, n: int, size: int, what: str) -> None:
    if off < 0 or n < 0 or off + n > size:
        raise ValueError(f"run {i}: [{off}, {off + n}) is outside the {size}-byte {what}")


def _counts(n: int, **seqs: Sequence[int]) -> None:
    for name, seq in seqs.items():
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {name.replace('_', ' ')} for {n} runs")


class NumpyCopy:
    """The fallback: numpy slice copies, runs adjacent in both buffers joined first."""

    name = "numpy"

    @staticmethod
    def copy_runs(dst, dst_offsets: Sequence[int], src, src_offsets: Sequence[int], lengths: Sequence[int]) -> None:
        d, s = _bytes(dst, True), _bytes(src, False)
        n = len(lengths)
        _counts(n, destination_offsets=dst_offsets, source_offsets=src_offsets)
        runs = []
        for i, (do, so, ln) in enumerate(zip(dst_offsets, src_offsets, lengths)):
            do, so, ln = int(do), int(so), int(ln)
            _check(i, do, ln, d.size, "destination")
            _check(i, so, ln, s.size, "source")
            if runs and runs[-1][0] + runs[-1][2] == do and runs[-1][1] + runs[-1][2] == so:
                runs[-1][2] += ln
            else:
                runs.append([do, so, ln])
        for do, so, ln in runs:
            d[do : do + ln] = s[so : so + ln]

    @staticmethod
    def scatter(dst, offsets: Sequence[int], srcs: Sequence) -> None:
        d = _bytes(dst, True)
        for off, a in _placed(d, offsets, [_bytes(s, False) for s in srcs], "destination"):
            d[off : off + a.size] = a

    @staticmethod
    def gather(src, offsets: Sequence[int], dsts: Sequence) -> None:
        s = _bytes(src, False)
        for off, a in _placed(s, offsets, [_bytes(d, True) for d in dsts], "source"):
            a[:] = s[off : off + a.size]


def _placed(one: np.ndarray, offsets: Sequence[int], many: list[np.ndarray], what: str) -> list:
    """(offset, array) pairs of ``many`` placed in ``one``, every one checked first."""
    _counts(len(many), offsets=offsets)
    pairs = [(int(off), a) for off, a in zip(offsets, many)]
    for i, (off, a) in enumerate(pairs):
        _check(i, off, a.size, one.size, what)
    return pairs


def _compiled() -> ModuleType | None:
    if os.environ.get("KVD_NATIVE_COPY", "").lower() == "numpy":
        return None
    try:
        from kvd.native import _copy
    except ImportError:
        return None
    return _copy


class CompiledCopy:
    """The compiled helper's calls (in :data:`IMPLEMENTATIONS` when the module imports)."""

    name = "c"

    def __init__(self, module: ModuleType) -> None:
        self.copy_runs = module.copy_runs
        self.scatter = module.scatter
        self.gather = module.gather
        self.stream = module.STREAM  # how it streams large runs: "avx512 non-temporal", ...


_module = _compiled()
IMPLEMENTATIONS: dict[str, object] = {"numpy": NumpyCopy()}
if _module is not None:
    IMPLEMENTATIONS["c"] = CompiledCopy(_module)
_active = IMPLEMENTATIONS.get("c", IMPLEMENTATIONS["numpy"])
BACKEND: str = _active.name  # "c" (the compiled helper) or "numpy"
copy_runs = _active.copy_runs
scatter = _active.scatter
gather = _active.gather
