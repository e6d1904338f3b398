"""`make gpu-check`: everything CUDA in kvd, in one run on a GPU machine, into one JSON report.

A GPU machine is lent here rarely, for minutes, and reaches nothing outside it (no PyPI), so
the check installs nothing from a network. Its steps, each with its own timeout, all within
one budget (default 450 s, inside the 8 minutes a lent H100 gives):

- ``probe``: the GPU's name (nvidia-smi), torch and its CUDA build, CuPy.
- ``install``: what kvd needs that this Python lacks, from a local wheelhouse (``var/wheels``,
  filled by ``make gpu-wheels`` on a machine with PyPI) with ``pip --no-index --target``
  into ``var/gpu-site``; kvd itself is copied there when it is not installed (its packages as
  pyproject.toml maps them: ``tiers/`` as ``kvd.tiers``, ...). Children run with that folder
  on PYTHONPATH and PYTHONSAFEPATH=1, so the checkout's ``kvd/`` does not shadow the copy.
- ``gpu_tests``: every ``gpu``-marked test (``pytest -m gpu`` over the files that mark one),
  with KVD_GPU=1; a gpu test that skips on a GPU machine fails the step.
- ``bench_connector``: ``kvd bench connector --device cuda --json``.
- ``bench_datapath``: ``kvd bench datapath --json``, with ``--hbm`` when the command has that
  option; its ``parts.hbm`` says which.

The report (default ``var/gpu-check/report.json``) is written whatever happens: each step's
status (passed, failed, skipped), its reason, seconds, command, return code and the tail of its
output when it failed; the GPU's name; each bench's JSON under ``figures``. Full logs lie
beside it. Exit status: 0 when no step failed (also without a CUDA device: then every step is
"skipped: no CUDA device" and one line says so), 1 when a step failed, 2 without a CUDA device
under ``--require-gpu``.

``python -m kvd.bench.gpu_check wheels`` (``make gpu-wheels``) fills the wheelhouse: kvd's
dependencies and the test plugins, at the versions installed here, for the GPU image's Python
(3.12, manylinux x86-64), except numpy and pytest, which the image has (its torch and CuPy were
built against its numpy).

This module imports only the standard library at its top: it must run before kvd's
dependencies are installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORT_DIR = ROOT / "var" / "gpu-check"
SITE_DIR = ROOT / "var" / "gpu-site"
WHEELHOUSES = (ROOT / "var" / "wheels", ROOT / "var" / "wheels-cupy")

BUDGET_S = 450  # all steps together: 8 minutes of a lent H100 less the machine's start
TIMEOUTS_S = {"probe": 60, "install": 120, "gpu_tests": 180, "bench_connector": 150, "bench_datapath": 180}
STEPS = ("probe", "install", "gpu_tests", "bench_connector", "bench_datapath")
MIN_STEP_S = 10  # a step with less of the budget left is skipped, not started
TAIL_CHARS = 4000

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
NO_DEVICE = "no CUDA device"

# Needed by the gpu-marked tests beyond kvd's own dependencies.
TEST_REQUIREMENTS = ("pytest>=8", "pytest-timeout>=2.3")
# Left out of the wheelhouse: the device image's torch and CuPy were built against its numpy;
# its pytest comes with the plugins and dependencies it was installed with.
IMAGE_PROVIDES = ("numpy", "pytest")
# Platforms of the device image's wheels (pip matches manylinux_2_N exactly).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

_PROBE = r"""
import json, shutil, subprocess
out = {"nvidia_smi": None, "torch": None, "torch_cuda": None, "cuda_available": False, "gpu": None,
       "cupy": None, "cupy_devices": None, "problems": []}
if shutil.which("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    out["nvidia_smi"] = [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []
try:
    import torch
    out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name(0)
except Exception as exc:
    out["problems"].append(f"torch: {type(exc).__name__}: {exc}")
try:
    import cupy
    out["cupy"] = cupy.__version__
    out["cupy_devices"] = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:
    out["problems"].append(f"cupy: {type(exc).__name__}: {exc}")
print(json.dumps(out))
"""

_KVD_IMPORTS = "import kvd.cli.kvd_main, kvd.native.cuda, kvd.tiers.hbm_share, kvd.connector.transfer"
# kvd itself installed (its dependencies aside): finds the packages without running them
_KVD_INSTALLED = ("import importlib.util as u, sys; "
                  "sys.exit(not all(u.find_spec(m) for m in ('kvd.native', 'kvd.tiers', 'kvd.policies')))")


@dataclass
class Step:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    reason: str | None = None
    seconds: float = 0.0
    timeout_s: float | None = None
    command: list[str] | None = None
    returncode: int | None = None
    tail: str | None = None
    log: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str) -> Step:
        self.status, self.reason = "skipped", reason
        return self

    def fail(self, reason: str) -> Step:
        self.status, self.reason = "failed", reason
        return self


@dataclass
class Ran:
    returncode: int | None  # None: killed at its timeout
    output: str
    seconds: float


def run_command(cmd: list[str], timeout_s: float, env: dict[str, str], log: Path | None = None) -> Ran:
    """Run ``cmd`` in a session of its own (a timeout kills its children too: daemons the tests
    start); stdout and stderr together, also written to ``log``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    ran = Ran(rc, out or "", time.monotonic() - t0)
    if log is not None:
        log.write_text(ran.output)
    return ran


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def record(step: Step, ran: Ran, cmd: list[str], log: Path | None) -> Step:
    """Fill ``step`` from a finished command: passed on exit 0, else failed with the tail."""
    step.command, step.returncode, step.seconds = cmd, ran.returncode, round(ran.seconds, 2)
    step.log = str(log) if log else None
    if ran.returncode is None:
        step.fail(f"timed out after {step.timeout_s:.0f}s")
    elif ran.returncode != 0:
        step.fail(f"exit status {ran.returncode}")
    else:
        step.status, step.reason = "passed", None
    if step.status == "failed":
        step.tail = tail(ran.output)
    return step


def child_env(site: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1", **extra)  # the checkout's kvd/ must not shadow an install
    if site is not None and site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------- requirements and wheels


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements() -> list[str]:
    """kvd's dependencies (pyproject.toml) and what the gpu-marked tests need beside them."""
    return [*_pyproject()["project"]["dependencies"], *TEST_REQUIREMENTS]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def requirement_name(req: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def walk(reqs: list[str], paths: list[str] | None = None, env: dict | None = None,
         skip: tuple[str, ...] = ()) -> list[tuple[str, str, str | None]]:
    """(requirement, name, version installed or None) for ``reqs`` and, through the installed
    distributions' metadata on ``paths``, their own requirements (markers evaluated in ``env``,
    default this Python's); names in ``skip`` and their requirements are left out. Without the
    packaging module: ``reqs`` alone."""
    from importlib import metadata

    dists = {}
    for dist in metadata.distributions(**({"path": paths} if paths is not None else {})):
        dists.setdefault(normalize(dist.metadata["Name"] or ""), dist)
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return [(r, n, dists[n].version if n in dists else None) for r in reqs if (n := requirement_name(r)) not in skip]
    env = {"extra": "", **(env or {})}
    seen: dict[str, tuple[str, str, str | None]] = {}
    todo = list(reqs)
    while todo:
        req = Requirement(todo.pop(0))
        name = normalize(req.name)
        if name in seen or name in skip or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        dist = dists.get(name)
        seen[name] = (str(req), name, dist.version if dist else None)
        todo.extend((dist.requires or []) if dist else [])
    return list(seen.values())


def satisfied(req: str, version: str | None) -> bool:
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging: present is enough
        return True
    return Requirement(req).specifier.contains(version, prereleases=True)


def unmet(reqs: list[str]) -> list[str]:
    """Names of the requirements (and theirs) this Python does not satisfy; the checkout
    (kvd.egg-info) is not looked in."""
    here = {"", os.getcwd(), str(ROOT)}
    return [name for req, name, version in walk(reqs, [p for p in sys.path if p not in here])
            if not satisfied(req, version)]


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-")[0])


def find_wheels(names: list[str], houses: tuple[Path, ...] | None = None) -> tuple[list[Path], list[str]]:
    """Wheels for ``names`` (normalized) in the wheelhouses; and the names without one."""
    have: dict[str, Path] = {}
    for house in WHEELHOUSES if houses is None else houses:
        for whl in sorted(house.glob("*.whl")) if house.is_dir() else []:
            have.setdefault(wheel_name(whl), whl)
    found = [have[n] for n in names if n in have]
    return found, [n for n in names if n not in have]


def stage_kvd(site: Path) -> None:
    """Copy kvd's packages into ``site`` as an install lays them out (package-dir of pyproject.toml)."""
    dirs = _pyproject()["tool"]["setuptools"]["package-dir"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.rmtree(site / "kvd", ignore_errors=True)
    shutil.copytree(ROOT / dirs["kvd"], site / "kvd", ignore=ignore)
    for package, src in dirs.items():
        if package != "kvd":
            shutil.copytree(ROOT / src, site / Path(*package.split(".")), ignore=ignore, dirs_exist_ok=True)


# ---------------------------------------------------------------- steps


class Check:
    def __init__(self, out: Path, budget_s: float, python: str = sys.executable) -> None:
        self.out, self.python = out, python
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s
        self.site: Path | None = None
        self.device: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self.kvd_imports = True

    def timeout(self, step: Step) -> bool:
        """Set the step's timeout from its own and the budget left; False when too little is left."""
        left = self.deadline - time.monotonic()
        step.timeout_s = round(min(TIMEOUTS_S[step.name], left), 1)
        if left < MIN_STEP_S:
            step.skip(f"out of the {self.budget_s:.0f}s budget")
            return False
        return True

    def probe(self, step: Step) -> Step:
        if not self.timeout(step):
            return step
        cmd = [self.python, "-c", _PROBE]
        ran = run_command(cmd, step.timeout_s, child_env(None))
        record(step, ran, [self.python, "-c", "<probe>"], None)
        if step.status == "failed":
            return step
        self.device = json.loads(ran.output.strip().splitlines()[-1])
        if not self.device["cuda_available"]:
            if self.device["nvidia_smi"]:
                why = "a CUDA build of torch" if self.device["torch"] else "torch"
                return step.fail(f"nvidia-smi lists {self.device['nvidia_smi'][0]} but torch sees no CUDA device"
                                 f" (this Python needs {why}; the device image's python3 has one)")
            return step.skip(NO_DEVICE)
        return step

    def unmet(self) -> list[str]:
        """Names of the requirements that the checked Python (plus the site folder) lacks."""
        env = child_env(self.site)
        del env["PYTHONSAFEPATH"]  # this module runs from the checkout, before kvd is installed
        ran = run_command([self.python, "-m", "kvd.bench.gpu_check", "unmet"], 60, env)
        if ran.returncode != 0:
            raise RuntimeError(f"listing unmet requirements failed: {tail(ran.output, 500)}")
        return json.loads(ran.output.strip().splitlines()[-1])

    def install(self, step: Step) -> Step:
        if not self.timeout(step):
            return step
        t0 = time.monotonic()
        self.site = SITE_DIR
        self.site.mkdir(parents=True, exist_ok=True)
        step.details = {"missing": [], "wheels": [], "no_wheel": []}
        log = self.out / "install.log"
        cupy = self.device.get("cupy") is None and find_wheels(["cupy_cuda12x", "cupy_cuda13x"])[0][:1]
        for _ in range(3):  # wheels installed bring requirements of their own to the metadata
            names = [n for n in self.unmet() if n not in step.details["no_wheel"]]
            wheels, no_wheel = find_wheels(names)
            if cupy:
                wheels, cupy = wheels + cupy, []
            step.details["missing"] += names
            step.details["no_wheel"] += no_wheel
            if not wheels:
                break
            step.details["wheels"] += [w.name for w in wheels]
            cmd = [self.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                   "--upgrade", "--target", str(self.site), *map(str, wheels)]
            ran = run_command(cmd, max(1.0, step.timeout_s - (time.monotonic() - t0)), child_env(None), log)
            record(step, ran, cmd, log)
            if step.status == "failed":
                self.kvd_imports = False
                return step
        problems = []
        if step.details["no_wheel"]:
            problems.append(f"no wheel in var/wheels for {', '.join(step.details['no_wheel'])} (run `make gpu-wheels`"
                            " where PyPI is reachable and carry var/wheels)")
        installed = run_command([self.python, "-c", _KVD_INSTALLED], 60, child_env(None))
        if installed.returncode != 0:
            stage_kvd(self.site)
            step.details["kvd"] = f"copied into {_shown(self.site)}"
        else:
            step.details["kvd"] = "installed"
        ran = run_command([self.python, "-c", _KVD_IMPORTS], 60, child_env(self.site))
        self.kvd_imports = ran.returncode == 0
        if not self.kvd_imports:
            last = ran.output.strip().splitlines()[-1:] or ["?"]
            problems.append(f"kvd does not import: {last[0]}")
            step.tail = tail(ran.output)
        if self.device.get("cupy") is None and not any(w.startswith("cupy") for w in step.details["wheels"]):
            problems.append("CuPy is missing (the cuda backend and the HBM pool's IPC sharing need it; the device"
                            " image has cupy-cuda13x)")
        step.seconds = round(time.monotonic() - t0, 2)
        if problems:
            return step.fail("; ".join(problems))
        step.status, step.reason = "passed", None
        return step

    def gpu_tests(self, step: Step) -> Step:
        if not self.timeout(step):
            return step
        files = gpu_test_files()
        xml = self.out / "gpu-tests.xml"
        cmd = [self.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *(str(f.relative_to(ROOT)) for f in files)]
        log = self.out / "gpu-tests.log"
        record(step, run_command(cmd, step.timeout_s, child_env(self.site, KVD_GPU="1"), log), cmd, log)
        if xml.exists():
            step.details = junit_counts(xml)
            skipped = step.details["skipped"]
            if step.status == "passed" and skipped:
                reasons = step.details["skip_reasons"]
                step.fail(f"{skipped} gpu tests skipped on a GPU machine: " + "; ".join(reasons[:5])
                          + ("; ..." if len(reasons) > 5 else ""))
                step.tail = tail(log.read_text())
        return step

    def bench(self, step: Step, args: list[str]) -> Step:
        if not self.timeout(step):
            return step
        cmd = [self.python, "-m", "kvd.cli.kvd_main", "bench", *args]
        log = self.out / f"{step.name}.log"
        ran = run_command(cmd, step.timeout_s, child_env(self.site), log)
        record(step, ran, cmd, log)
        if step.status == "passed":
            try:
                self.figures[step.name] = json.loads(ran.output[ran.output.index("{"):])
            except ValueError:
                step.fail("no JSON in the bench's output")
                step.tail = tail(ran.output)
        return step

    def bench_datapath(self, step: Step) -> Step:
        if not self.timeout(step):
            return step
        helped = run_command([self.python, "-m", "kvd.cli.kvd_main", "bench", "datapath", "--help"], 60,
                             child_env(self.site))
        hbm = has_option(helped.output, "--hbm")
        self.bench(step, ["datapath", "--json", *(["--hbm"] if hbm else [])])
        if hbm:
            step.details["parts"] = {"hbm": {"status": step.status}}
        else:
            step.details["parts"] = {"hbm": {"status": "skipped", "reason": "datapath has no --hbm"}}
        return step

    def run(self) -> list[Step]:
        steps = {name: Step(name) for name in STEPS}
        guard(steps["probe"], self.probe)
        if steps["probe"].status != "passed":
            why = steps["probe"].reason if steps["probe"].status == "skipped" else "probe failed"
            for name in STEPS[1:]:
                steps[name].skip(why)
            return list(steps.values())
        say(steps["probe"])
        say(guard(steps["install"], self.install))
        later = [("gpu_tests", self.gpu_tests),
                 ("bench_connector", lambda s: self.bench(s, ["connector", "--device", "cuda", "--json"])),
                 ("bench_datapath", self.bench_datapath)]
        for name, fn in later:
            if not self.kvd_imports:
                steps[name].skip("install failed: kvd does not import")
                continue
            say(guard(steps[name], fn))
        return list(steps.values())


def guard(step: Step, fn) -> Step:
    """Run one step; an exception of the check's own fails that step alone."""
    t0 = time.monotonic()
    try:
        fn(step)
    except Exception as exc:
        import traceback

        step.fail(f"gpu-check itself failed: {type(exc).__name__}: {exc}")
        step.tail = tail(traceback.format_exc())
        step.seconds = round(time.monotonic() - t0, 2)
    return step


def gpu_test_files() -> list[Path]:
    """Test files that mark a test ``gpu`` (collecting only these keeps other files' imports out)."""
    pattern = re.compile(r"mark\.gpu\b")
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text()))


def junit_counts(xml: Path) -> dict[str, Any]:
    root = ET.parse(xml).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": [], "failed_tests": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{name}: {case.find('skipped').get('message')}")
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        else:
            counts["passed"] += 1
    return counts


def has_option(help_text: str, option: str) -> bool:
    """Whether ``option`` itself (not ``--hbm-bytes`` for ``--hbm``) appears in a usage text."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def say(step: Step) -> None:
    extra = f": {step.reason}" if step.reason else ""
    print(f"gpu-check: {step.name} {step.status}{extra} ({step.seconds:.0f}s)", flush=True)


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def build_report(steps: list[Step], device: dict, figures: dict, started: float, code: int) -> dict:
    statuses = {s.status for s in steps}
    return {
        "status": "failed" if "failed" in statuses else "passed" if statuses == {"passed"} else
                  "skipped" if statuses == {"skipped"} else "partial",
        "exit_code": code,
        "gpu": device.get("gpu"),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "python": sys.executable,
        "device": device,
        "steps": [asdict(s) for s in steps],
        "figures": figures,
    }


def exit_code(steps: list[Step], require_gpu: bool) -> int:
    if any(s.status == "failed" for s in steps):
        return EXIT_FAILED
    if require_gpu and steps[0].reason == NO_DEVICE:
        return EXIT_NO_GPU
    return EXIT_OK


def check(out: Path, budget_s: float, require_gpu: bool) -> int:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out, budget_s)
    try:
        steps = c.run()
    except Exception as exc:  # the report is written whatever happens
        steps = [Step("probe").fail(f"gpu-check itself failed: {type(exc).__name__}: {exc}")]
    code = exit_code(steps, require_gpu)
    report = build_report(steps, c.device, c.figures, started, code)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if steps[0].reason == NO_DEVICE:
        print(f"gpu-check: {NO_DEVICE} here; every step skipped, report in {_shown(path)}")
    else:
        failed = [s.name for s in steps if s.status == "failed"]
        print(f"gpu-check: {report['status']} on {report['gpu'] or 'no GPU'}"
              f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; report in {_shown(path)}")
    return code


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- wheelhouse (make gpu-wheels)


def wheel_pins(python_version: str = "3.12") -> list[str]:
    """name==version, as installed here, of kvd's requirements and theirs (markers evaluated for
    the device image's Python) but those the image provides; a requirement as written where
    nothing is installed here."""
    env = {"python_version": python_version, "python_full_version": python_version + ".0"}
    return [f"{name}=={version}" if version else req for req, name, version in
            walk(requirements(), env=env, skip=IMAGE_PROVIDES)]


def download(pins: list[str], dest: Path, python_version: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest), *pins]
    return subprocess.run(cmd).returncode


def wheels(dest: Path, python_version: str, cupy: str | None) -> int:
    rc = download(wheel_pins(python_version), dest, python_version)
    if rc == 0 and cupy:
        rc = download([cupy], dest.with_name(dest.name + "-cupy"), python_version)
    for house in (dest, dest.with_name(dest.name + "-cupy")):
        files = sorted(house.glob("*.whl")) if house.is_dir() else []
        if files:
            mib = sum(f.stat().st_size for f in files) / 2**20
            print(f"{_shown(house)}: {len(files)} wheels, {mib:.1f} MiB")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvd.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPORT_DIR, help="folder of report.json and the logs")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for all steps together")
    p.add_argument("--require-gpu", action="store_true", help=f"exit {EXIT_NO_GPU} without a CUDA device")
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("wheels", help="download the wheelhouse the GPU machine installs from")
    w.add_argument("--dest", type=Path, default=WHEELHOUSES[0])
    w.add_argument("--python-version", default="3.12", help="the device image's Python (default 3.12)")
    w.add_argument("--cupy", metavar="PACKAGE", help="also download this CuPy wheel into DEST-cupy (over 100 MiB)")
    sub.add_parser("unmet", help="print the names of kvd's requirements this Python lacks (JSON)")
    args = p.parse_args(argv)
    if args.command == "unmet":
        print(json.dumps(unmet(requirements())))
        return 0
    if args.command == "wheels":
        return wheels(args.dest, args.python_version, args.cupy)
    return check(args.out, args.budget_s, args.require_gpu)


if __name__ == "__main__":
    sys.exit(main())
