"""`make gpu-check` (kvd.bench.gpu_check): the no-GPU path run for real, and the parts of the GPU
path that need no GPU — steps that fail or time out, the report written whatever happens, the
offline install's wheel matching and kvd's copy, the datapath step's --hbm detection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvd.bench import gpu_check as g

ROOT = Path(__file__).resolve().parents[1]


def _cuda_here() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_here(), reason="a CUDA device is here: make gpu-check would run the whole check")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_skips_every_step(tmp_path):
    r = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_ARGS=--out {tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("\n") == 1 and "no CUDA device" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "skipped" and report["exit_code"] == 0 and report["gpu"] is None
    assert [s["name"] for s in report["steps"]] == list(g.STEPS)
    assert all(s["status"] == "skipped" and s["reason"] == "no CUDA device" for s in report["steps"])


@pytest.mark.skipif(_cuda_here(), reason="a CUDA device is here")
def test_require_gpu_exits_2_without_a_device_and_still_writes_the_report(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvd.bench.gpu_check", "--require-gpu", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == g.EXIT_NO_GPU
    assert json.loads((tmp_path / "report.json").read_text())["exit_code"] == g.EXIT_NO_GPU


def _step(name: str, timeout_s: float) -> g.Step:
    step = g.Step(name)
    step.timeout_s = timeout_s
    return step


def test_a_failing_step_keeps_the_tail_of_its_output(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('x' * 10000); print('the end'); sys.exit(3)"]
    log = tmp_path / "s.log"
    step = g.record(_step("gpu_tests", 30), g.run_command(cmd, 30, dict(os.environ), log), cmd, log)
    assert (step.status, step.reason, step.returncode) == ("failed", "exit status 3", 3)
    assert step.tail.endswith("the end\n") and len(step.tail) <= g.TAIL_CHARS + 3
    assert len(log.read_text()) > 10000


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child-alive"
    # the child's own child would touch the marker after 3 s unless the whole group dies
    grandchild = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    t0 = time.monotonic()
    ran = g.run_command([sys.executable, "-c", code], 1, dict(os.environ))
    step = g.record(_step("bench_connector", 1), ran, ["..."], None)
    assert time.monotonic() - t0 < 10
    assert step.status == "failed" and step.reason == "timed out after 1s" and step.returncode is None
    time.sleep(3.5)  # past the grandchild's touch, had it survived
    assert not marker.exists()


def test_the_report_is_written_when_the_check_itself_breaks(tmp_path, monkeypatch):
    def broken(self):
        raise KeyError("boom")

    monkeypatch.setattr(g.Check, "run", broken)
    assert g.check(tmp_path, 60, require_gpu=False) == g.EXIT_FAILED
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == g.EXIT_FAILED
    assert "boom" in report["steps"][0]["reason"]


def test_any_failed_step_fails_the_check(tmp_path, monkeypatch):
    def mixed(self):
        return [g.Step("probe", status="passed"), g.Step("install", status="passed"),
                g.Step("gpu_tests").fail("exit status 1"), g.Step("bench_connector").skip("out of the 1s budget"),
                g.Step("bench_datapath").skip("out of the 1s budget")]

    monkeypatch.setattr(g.Check, "run", mixed)
    assert g.check(tmp_path, 60, require_gpu=True) == g.EXIT_FAILED
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert [s["status"] for s in report["steps"]] == ["passed", "passed", "failed", "skipped", "skipped"]


def test_a_step_with_too_little_budget_left_is_skipped(tmp_path):
    c = g.Check(tmp_path, budget_s=0)
    step = g.Step("gpu_tests")
    assert not c.timeout(step)
    assert step.status == "skipped" and "budget" in step.reason


def test_datapath_step_passes_hbm_only_when_the_command_has_it(tmp_path, monkeypatch):
    c = g.Check(tmp_path, budget_s=120)
    ran_with = []

    def bench(step, args):
        ran_with.append(args)
        step.status = "passed"
        return step

    monkeypatch.setattr(c, "bench", bench)
    step = c.bench_datapath(g.Step("bench_datapath"))
    usage = subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", "bench", "datapath", "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    if g.has_option(usage, "--hbm"):
        assert ran_with == [["datapath", "--json", "--hbm"]]
        assert step.details["parts"]["hbm"] == {"status": "passed"}
    else:
        assert ran_with == [["datapath", "--json"]]
        assert step.details["parts"]["hbm"] == {"status": "skipped", "reason": "datapath has no --hbm"}


def test_has_option_matches_the_option_alone():
    assert g.has_option("usage: datapath [-h] [--json] [--hbm]", "--hbm")
    assert g.has_option("  --hbm    also time the HBM tier", "--hbm")
    assert not g.has_option("usage: serve [--hbm-bytes SIZE] [--hbm-device DEV]", "--hbm")


def test_junit_counts_tells_passed_failed_and_skipped(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.t" name="a"/>'
        '<testcase classname="tests.t" name="b"><failure message="no"/></testcase>'
        '<testcase classname="tests.t" name="c"><skipped message="could not import cupy"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = g.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed_tests"] == ["tests.t::b"]
    assert counts["skip_reasons"] == ["tests.t::c: could not import cupy"]


def test_wheels_are_matched_by_normalized_name(tmp_path):
    for name in ("grpcio_health_checking-1.85.1-py3-none-any.whl", "PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl"):
        (tmp_path / name).touch()
    found, missing = g.find_wheels([g.requirement_name("grpcio-health-checking>=1.85"), "pyyaml", "rocksdict"],
                                   houses=(tmp_path,))
    assert [w.name for w in found] == ["grpcio_health_checking-1.85.1-py3-none-any.whl",
                                       "PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl"]
    assert missing == ["rocksdict"]


def test_wheelhouse_pins_kvds_requirements_and_theirs_but_not_the_images():
    from importlib import metadata

    pins = g.wheel_pins("3.12")
    names = {p.split("==")[0] for p in pins}
    assert f"grpcio=={metadata.version('grpcio')}" in pins
    assert {"rocksdict", "msgspec", "protobuf", "grpcio_health_checking", "pytest_timeout"} <= names
    assert "typing_extensions" in names  # grpcio's own requirement
    assert not names & {"numpy", "pytest", "torch", "cupy_cuda12x"}


def test_stage_kvd_lays_out_the_packages_as_an_install_does(tmp_path):
    g.stage_kvd(tmp_path)
    code = "import kvd.tiers, kvd.native, kvd.policies; print(kvd.tiers.__file__)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "kvd" / "tiers" / "__init__.py"
