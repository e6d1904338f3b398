"""Every CUDA kernel source kvd hands to CuPy compiles with nvcc for sm_90 (Hopper), no GPU needed.

CuPy compiles a RawKernel's source with NVRTC when it first runs, on the GPU machine, so a
syntax or type error would show only there. Here each source is taken exactly as the code
passes it to CuPy (a stand-in ``cupy`` module records the RawKernel call), compiled with
``nvcc --ptx`` (all warnings as errors), checked to define the kernel under the name CuPy looks
up (``extern "C"``), and assembled for sm_90. nvcc is on every machine of this project, CI's
included: without it the test skips outside CI and fails in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90"
KERNEL_CALL = re.compile(r"\b(RawKernel|RawModule|ElementwiseKernel|ReductionKernel)\s*\(")
# CuPy options (NVRTC's) that nvcc takes as they are
NVCC_OPTIONS = re.compile(r"^(-D\S+|-I\S+|--?std=c\+\+\d+|--use_fast_math|-use_fast_math|-lineinfo|--?device-debug|-G)$")


def _build_native_cuda():
    import kvd.native.cuda

    return kvd.native.cuda._kernel.__wrapped__()  # past functools.cache: a fresh RawKernel call


# Each source file that builds a CuPy kernel, and how to make it build them.
BUILDERS = {"native/cuda.py": _build_native_cuda}


class CompileError(Exception):
    pass


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(name="nvcc")
def nvcc_fixture() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on this machine: every machine of the project, CI's too, has it")
        pytest.skip("nvcc is not on this machine")
    return nvcc


def compile_kernel(nvcc: str, source: str, name: str, options: tuple[str, ...], workdir: Path) -> Path:
    """Compile ``source`` as CuPy would hand it to NVRTC; the cubin's path, or CompileError."""
    unknown = [o for o in options if not NVCC_OPTIONS.match(o)]
    if unknown:
        raise CompileError(f"options nvcc may not take as NVRTC does: {unknown} (extend NVCC_OPTIONS)")
    cu, ptx, cubin = (workdir / f"{name}{ext}" for ext in (".cu", ".ptx", ".cubin"))
    cu.write_text(source)
    steps = [
        [nvcc, f"-arch={ARCH}", "--ptx", "-Werror", "all-warnings", *options, "-o", str(ptx), str(cu)],
        [nvcc, f"-arch={ARCH}", "--cubin", "-o", str(cubin), str(ptx)],
    ]
    for i, cmd in enumerate(steps):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise CompileError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        if i == 0 and not re.search(rf"\.entry\s+{re.escape(name)}\s*\(", ptx.read_text()):
            raise CompileError(f"no kernel named {name!r} in the PTX (extern \"C\" __global__ missing?)")
    return cubin


class FakeCupy(types.ModuleType):
    """Stands in for cupy: records what each kernel constructor is given."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.kernels: list[dict] = []

        def raw_kernel(code, name, options=(), **kwargs):
            self.kernels.append({"kind": "RawKernel", "code": code, "name": name, "options": tuple(options),
                                 "kwargs": kwargs})
            return object()

        def unsupported(kind):
            def record(*args, **kwargs):
                raise AssertionError(f"cupy.{kind}: teach tests/test_cuda_sources.py to compile it")
            return record

        self.RawKernel = raw_kernel
        for kind in ("RawModule", "ElementwiseKernel", "ReductionKernel"):
            setattr(self, kind, unsupported(kind))


def kernel_files() -> set[str]:
    """Source files of kvd's packages that construct a CuPy kernel."""
    found = set()
    for top in ("kvd", "native", "tiers", "policies"):
        for path in (ROOT / top).rglob("*.py"):
            if KERNEL_CALL.search(path.read_text()):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def kernels_as_handed_to_cupy(monkeypatch) -> list[dict]:
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    for build in BUILDERS.values():
        build()
    return fake.kernels


def test_every_file_that_builds_a_kernel_has_a_builder_here():
    assert kernel_files() == set(BUILDERS), "a file builds CuPy kernels this test does not compile: add it to BUILDERS"


def test_kernel_sources_compile_for_sm_90(nvcc, tmp_path, monkeypatch):
    kernels = kernels_as_handed_to_cupy(monkeypatch)
    assert [k["name"] for k in kernels] == ["kvd_copy_runs"]
    for k in kernels:
        assert not k["kwargs"].get("backend") or k["kwargs"]["backend"] == "nvrtc"
        cubin = compile_kernel(nvcc, k["code"], k["name"], k["options"], tmp_path)
        assert cubin.stat().st_size > 0


def test_compile_helper_rejects_a_broken_source(nvcc, tmp_path, monkeypatch):
    (kernel,) = kernels_as_handed_to_cupy(monkeypatch)
    # a type error: an int4 stored through a char pointer
    broken = kernel["code"].replace("d4[i] = s4[i];", "dst[i] = s4[i];")
    assert broken != kernel["code"]
    with pytest.raises(CompileError, match="exited"):
        compile_kernel(nvcc, broken, kernel["name"], kernel["options"], tmp_path)
    with pytest.raises(CompileError, match="no kernel named"):
        compile_kernel(nvcc, kernel["code"], "kvd_copy_runs_renamed", kernel["options"], tmp_path)
