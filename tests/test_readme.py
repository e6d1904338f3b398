"""Every Python block of README.md, run as written, in order, against a real daemon
(``KVD_ADDR`` names it, as a user's shell would)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


def test_every_python_block_of_the_readme_runs_as_written(daemon, tmp_path):
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(python_blocks()))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"KVD_ADDR": daemon.address, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["['dram', 'dram', 'dram']", daemon.address, "{'dram': 48}"]
