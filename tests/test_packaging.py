"""tiers/, policies/ and native/ import as kvd.tiers, kvd.policies, kvd.native, installed
editable (this test run) and as a wheel; the console scripts exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kvd.native
import kvd.policies
import kvd.tiers

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_top_level_folders():
    assert Path(kvd.tiers.__file__).parent == REPO / "tiers"
    assert Path(kvd.policies.__file__).parent == REPO / "policies"
    assert Path(kvd.native.__file__).parent == REPO / "native"


def test_the_wheel_carries_the_mapped_packages_and_scripts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kvd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("kvd/tiers/nvme.py", "kvd/policies/lru.py", "kvd/native/host.py", "kvd/v1/engine_pb2.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "kvd = kvd.cli.kvd_main:main" in text and "kvctl = kvd.cli.kvctl:main" in text


def test_console_scripts_are_on_path_of_the_venv():
    bindir = Path(sys.executable).parent
    assert (bindir / "kvd").exists() or shutil.which("kvd")
    assert (bindir / "kvctl").exists() or shutil.which("kvctl")
