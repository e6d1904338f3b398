"""Structured logs of a real daemon (--log-format json), request ids on failed calls, and
the log settings' errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import grpc
import pytest

from kvd.client import ClientError
from kvd.server.logs import JsonFormatter, new_request_id
from kvd.v1 import engine_pb2, engine_pb2_grpc


def json_lines(d) -> list[dict]:
    lines = [line for line in d.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_carry_the_callers_request_id_of_a_failed_call(daemon_factory, wait_until):
    d = daemon_factory(nvme="0", extra=["--log-format", "json"]).start()
    with grpc.insecure_channel(d.address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Lookup(engine_pb2.LookupRequest(namespace="nope", hashes=[1]), metadata=[("x-request-id", "req-123")])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "req-123") in info.value.trailing_metadata()
    line = wait_until(lambda: next((x for x in json_lines(d) if x.get("request_id") == "req-123"), None))
    assert line["level"] == "INFO" and line["logger"] == "kvd.server"
    assert (line["method"], line["code"]) == ("Engine/Lookup", "NOT_FOUND")
    assert line["msg"] == "Engine/Lookup: NOT_FOUND: namespace 'nope' is not registered"
    assert any(x["msg"].startswith("kvd serving on unix:") for x in json_lines(d))
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in json_lines(d))


def test_without_an_id_the_daemon_makes_one_and_the_client_sees_it(daemon_factory, wait_until):
    d = daemon_factory(nvme="0").start()  # text logs
    with d.client() as c:
        with pytest.raises(ClientError) as info:
            c.lookup("nope", [1])
    rid = info.value.request_id
    assert rid and len(rid) == 16
    wait_until(lambda: f"Engine/Lookup: NOT_FOUND: namespace 'nope' is not registered [request {rid}]" in d.log())


def test_an_insane_request_id_is_replaced():
    assert new_request_id([("x-request-id", "ok-1.2:3")]) == "ok-1.2:3"
    for bad in ("", "a" * 65, "has space", "new\nline"):
        assert new_request_id([("x-request-id", bad)]) != bad


def test_the_json_formatter_keeps_tracebacks_and_extras():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info(),
            extra={"method": "Admin/Check", "code": "INTERNAL", "request_id": "r1"},
        )
    out = json.loads(JsonFormatter().format(record))
    assert (out["msg"], out["method"], out["code"], out["request_id"]) == ("failed x", "Admin/Check", "INTERNAL", "r1")
    assert "RuntimeError: boom" in out["exc"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--log-format", "xml"], {}, "kvd serve: --log-format must be one of text, json, got 'xml'"),
        (["--log-level", "LOUD"], {}, "kvd serve: --log-level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
        ([], {"KVD_LOG_FORMAT": "yaml"}, "kvd serve: --log-format must be one of text, json, got 'yaml'"),
    ],
)
def test_bad_log_settings_exit_2_with_one_line(tmp_path, args, env, message):
    import os

    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"),
         "--nvme-bytes", "0", "--shm-dir", str(tmp_path / "shm"), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert (r.returncode, r.stderr.splitlines()) == (2, [message])
