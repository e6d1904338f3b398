"""Client behaviour that needs no special daemon set-up beyond the fixture."""

from __future__ import annotations

import os
import time

import pytest

from kvd.client import Client
from kvd.client.channel import grpc_target


@pytest.mark.parametrize(
    "address,target",
    [
        ("unix:///run/kvd.sock", "unix:///run/kvd.sock"),
        ("/run/kvd.sock", "unix:///run/kvd.sock"),
        ("localhost:7070", "localhost:7070"),
        ("[::1]:7070", "[::1]:7070"),
    ],
)
def test_addresses(address, target):
    assert grpc_target(address) == target


@pytest.mark.parametrize("address", ["nohost", ":80", "host:port"])
def test_bad_addresses(address):
    with pytest.raises(ValueError, match="neither"):
        grpc_target(address)


class StallingClient(Client):
    """Stalls between PrepareLoad and the copy until the daemon has expired the lease."""

    def _arena_for(self, arena_id):
        deadline = time.monotonic() + 30
        while self.status().leases and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the daemon for the expiry we are waiting for
        return super()._arena_for(arena_id)


def test_a_load_whose_lease_expired_mid_copy_reports_a_miss(daemon_factory):
    d = daemon_factory(extra=["--lease-seconds", "1"]).start()
    blocks = [os.urandom(4096) for _ in range(4)]
    with d.client() as c:
        c.register_namespace("m", 16, 4096)
        c.store("m", [1, 2, 3, 4], blocks)
    with StallingClient(d.address, pipeline_depth=1) as slow:
        assert slow.load("m", [1, 2, 3, 4]) == [None] * 4
    with d.client() as c:
        assert c.load("m", [1, 2, 3, 4]) == blocks
