"""kvd.bench: benchmarks that measure kvd against the limits in the same run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


def run_and_report(name: str, measure: Callable[[], dict], as_json: bool) -> int:
    """Run a benchmark; print its result (JSON or key: value lines); one line and 1 on failure."""
    try:
        result = measure()
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvd bench {name}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
