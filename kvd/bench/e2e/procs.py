"""The processes of one end-to-end run: started in sessions of their own, awaited on an HTTP
readiness URL, stopped by process group, their Prometheus metrics scraped.

Every wait is bounded; a process that exits while awaited is an error naming its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    """One child process, its output in ``log``."""

    name: str
    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        out = open(self.log, "wb")
        try:
            self.popen = subprocess.Popen(
                list(self.argv), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                cwd=self.cwd, start_new_session=True,
            )
        finally:
            out.close()
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_http(self, url: str, timeout_s: float) -> None:
        """Until ``url`` answers 200; RuntimeError if the process exits or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} while starting; see {self.log}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)  # polling a starting server, bounded by the deadline
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout_s:.0f} s; see {self.log}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; waits for the exit."""
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace_s)
        except ProcessLookupError:
            pass
        # Children that left the group's leader behind (vLLM's engine core) go too.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """A Prometheus endpoint's samples, summed over labels other than those kept in the key:
    ``name`` -> value for every sample, and ``name{label=value}`` for the ``source`` and
    ``state`` labels (prompt tokens by source, for one). Histogram buckets and ``_created``
    timestamps are left out."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            for label in ("source", "state"):
                if label in sample.labels:
                    key = f"{sample.name}{{{label}={sample.labels[label]}}}"
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Counter increases between two scrapes (a sample new in ``after`` counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
