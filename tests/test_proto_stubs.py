"""The committed stubs in kvd/v1 are exactly what `make proto` generates from proto/kvd/v1."""

from __future__ import annotations

from pathlib import Path

from kvd.v1.generate import REPO, generate, proto_files


def test_stubs_match_the_proto_files(tmp_path: Path):
    generated = generate(tmp_path)
    assert generated, "protoc generated nothing"
    committed_dir = REPO / "kvd" / "v1"
    for path in generated:
        committed = committed_dir / path.name
        assert committed.exists(), f"{path.name} is generated but not committed: run `make proto`"
        assert committed.read_text() == path.read_text(), f"kvd/v1/{path.name} drifted from proto/: run `make proto`"
    stale = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a .proto file: {sorted(stale)}"


def test_every_proto_has_the_versioned_package():
    for proto in proto_files():
        assert "package kvd.v1;" in proto.read_text(), proto
