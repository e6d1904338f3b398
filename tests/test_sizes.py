from __future__ import annotations

import pytest

from kvd.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "text,nbytes",
    [("4096", 4096), ("256KiB", 256 << 10), ("1GiB", 1 << 30), ("1.5 GiB", 3 << 29), ("4G", 4 << 30), ("2MB", 2_000_000)],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "12XB", "GiB", "-1", "1..5GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_format_size():
    assert format_size(1 << 30) == "1.0 GiB" and format_size(100) == "100 B"
