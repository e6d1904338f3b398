"""The README's tour runs as written against a real daemon (``KVD_ADDR`` names it, as a
user's shell would; the daemon stands in for `make serve`): its shell commands and its Python
in order, then what it says `kvctl sessions` shows. The Python blocks of docs/api.md run too."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: the tour's .venv/bin
FENCED = re.compile(r"^```(python|sh)\n(.*?)^```", flags=re.S | re.M)


def tour() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the README's tour, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index("## A five-minute tour")
    section = text[start : text.index("\n## ", start + 1)]
    return FENCED.findall(section)


def python_blocks(path: Path) -> list[str]:
    return [body for lang, body in FENCED.findall(path.read_text()) if lang == "python"]


def run_line(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    if argv[0].startswith(".venv/bin/"):
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_the_tour_has_its_steps():
    langs = [lang for lang, _ in tour()]
    assert langs.count("python") == 1 and langs.count("sh") == 3, langs
    text = "\n".join(body for _, body in tour())
    assert "kvctl status" in text and "kvd replay" in text and "--plot" in text and "vllm serve" in text


def test_the_tour_runs_as_written(daemon, tmp_path):
    (tmp_path / "var").mkdir()  # `make serve` made it
    env = {"KVD_ADDR": daemon.address, "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    printed = []
    for lang, body in tour():
        if lang == "python":
            script = tmp_path / "tour.py"
            script.write_text(body)
            r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path, env=env)
            assert r.returncode == 0, r.stderr
            printed += r.stdout.splitlines()
            continue
        for line in body.splitlines():
            if line.startswith("vllm "):  # needs vLLM and a model: tests/test_vllm_e2e.py runs the connector
                break
            r = run_line(line, tmp_path, env)
            assert r.returncode == 0, f"{line}\n{r.stderr}"
            if "kvctl status" in line:
                assert "\ntiers:\n" in r.stdout and "\nnamespaces:\n" in r.stdout
            if "kvd replay" in line:
                assert "\nlegend:\n" in r.stdout and "belady" in r.stdout
    assert printed == ["['dram', 'dram', 'dram']"]
    assert (tmp_path / "var" / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # "Now kvctl sessions shows agent-1 paused on pytest, holding its 3 blocks."
    r = run_line(".venv/bin/kvctl sessions", tmp_path, env)
    row = next(line.split() for line in r.stdout.splitlines() if " agent-1 " in line)
    assert row[2:4] == ["tool_pause", "pytest"] and row[7] == "3", r.stdout


def test_the_api_page_python_runs_as_written(daemon, tmp_path):
    script = tmp_path / "api.py"
    script.write_text("\n\n".join(python_blocks(REPO / "docs" / "api.md")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"KVD_ADDR": daemon.address, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [daemon.address, "{'dram': 48}"]
