"""Regenerate the Python gRPC stubs of ``proto/kvd/v1`` into ``kvd/v1`` (``make proto``).

The stubs are committed; ``tests/test_proto_stubs.py`` regenerates them into a temporary
folder and fails when the committed copies drift from the .proto files. grpcio-tools is a
development dependency pinned in pyproject.toml, so the output is reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "kvd" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc; stubs land in ``out_root/kvd/v1``. Returns the generated files."""
    from grpc_tools import protoc  # development dependency

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_root / "kvd" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    generated = generate(REPO)
    for path in generated:
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
