"""Crash loop: concurrent writers and readers against a real daemon, killed with SIGKILL at
random moments 20 times and restarted each time.

What kvd promises, and what is checked after every restart:
- integrity: every block read back equals what was stored (a block whose store was cut
  short is missing, never wrong), during the run and after each restart;
- durability: every block stored before a ``Client.sync()`` that returned 0 pending (Sync:
  write-behind drained to NVMe, manifest synced) survives every later kill;
- consistency: ``Client.check()`` and the real ``kvctl check`` pass.

The kill moments are the test's input: a seeded random number of completed client calls,
observed through a condition variable. The retention policy is LRU and the NVMe tier has
room for every block, so nothing is ever dropped by choice: a durable block that is missing
is lost. (The typed policy drops an ended session's blocks on purpose; Sync waits for what
the policy keeps.)
"""

from __future__ import annotations

import random
import signal
import threading

import pytest

from kvd.bench.soak import block_data
from kvd.client import Client, ClientError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NS = "crash"
BLOCK = 16 << 10
KILLS = 20
WRITERS, READERS = 2, 2
PER_STORE = 4
SYNC_EVERY = 3  # stores between a writer's syncs
MAX_OPS = 400  # per round: a bound, never reached before the kill


class Ledger:
    """What the clients did, shared by their threads: ``stored`` (the store returned),
    ``durable`` (a sync that returned 0 began after the store returned), ``present`` (known
    held in this daemon's life: readers pick from it), every hash ever attempted."""

    def __init__(self, seed: int) -> None:
        self.lock = threading.Condition()
        self.rng = random.Random(seed)
        self.attempted: list[int] = []
        self.stored: set[int] = set()
        self.durable: set[int] = set()
        self.present: list[int] = []
        self.ops = 0
        self.killed = threading.Event()
        self.failures: list[str] = []

    def new_hashes(self, n: int) -> list[int]:
        with self.lock:
            out = [self.rng.getrandbits(64) for _ in range(n)]
            self.attempted += out
            return out

    def done_op(self) -> None:
        with self.lock:
            self.ops += 1
            self.lock.notify_all()

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
            self.lock.notify_all()


def writer(address: str, shm: bool, ledger: Ledger) -> None:
    """Store chains of PER_STORE blocks; every SYNC_EVERY stores, sync."""
    try:
        with Client(address, shared_memory=shm, timeout=30) as c:
            for n in range(MAX_OPS):
                if n % (SYNC_EVERY + 1) == SYNC_EVERY:
                    with ledger.lock:
                        covered = set(ledger.stored)
                    if c.sync(timeout_s=30) == 0:
                        with ledger.lock:
                            ledger.durable |= covered
                else:
                    hashes = ledger.new_hashes(PER_STORE)
                    c.store(NS, hashes, [block_data(h, BLOCK) for h in hashes])
                    with ledger.lock:
                        ledger.stored.update(hashes)
                        ledger.present += hashes
                ledger.done_op()
    except ClientError as exc:
        if not ledger.killed.is_set():
            ledger.fail(f"writer: {exc}")


def reader(address: str, shm: bool, ledger: Ledger, seed: int) -> None:
    """Load random blocks known to be held: each must be found, with its bytes."""
    rng = random.Random(seed)
    try:
        with Client(address, shared_memory=shm, timeout=30) as c:
            c.register_namespace(NS, 16, BLOCK)
            for _ in range(MAX_OPS):
                with ledger.lock:
                    # Nothing held yet (the first round): wait for a writer's first store.
                    ledger.lock.wait_for(lambda: ledger.present or ledger.killed.is_set(), timeout=30)
                    if ledger.killed.is_set():
                        return
                    pick = rng.sample(ledger.present, min(8, len(ledger.present)))
                for h, data in zip(pick, c.load(NS, pick)):
                    if data != block_data(h, BLOCK):
                        ledger.fail(f"reader: block {h:#x} {'missing' if data is None else 'wrong'} while held")
                ledger.done_op()
    except ClientError as exc:
        if not ledger.killed.is_set():
            ledger.fail(f"reader: {exc}")


def verify_after_restart(d, ledger: Ledger, kvctl) -> int:
    """Check every promise against the restarted daemon; returns the blocks held."""
    with d.client(timeout=60) as c:
        assert c.check() == []
        attempted = list(ledger.attempted)
        loaded: list[bytes | None] = []
        for lo in range(0, len(attempted), 64):  # batches the 8 MiB DRAM tier can pin
            loaded += c.load(NS, attempted[lo : lo + 64])
        held = {h for h, data in zip(attempted, loaded) if data is not None}
        wrong = [h for h, data in zip(attempted, loaded) if data is not None and data != block_data(h, BLOCK)]
        assert not wrong, f"{len(wrong)} blocks read back with bytes other than those stored"
        lost = ledger.durable - held
        assert not lost, f"{len(lost)} blocks acknowledged by sync() were lost"
        assert c.sync() == 0  # what was recovered is on NVMe: durable from here on
        assert c.check() == []
    r = kvctl(d, "check")
    assert (r.returncode, r.stdout) == (0, "ok: yes\nproblems: -\n"), r.stdout + r.stderr
    ledger.durable = set(held)
    ledger.stored = set(held)
    ledger.present = sorted(held)
    return len(held)


def test_twenty_kill9s_under_concurrent_writers_and_readers_lose_nothing_synced(daemon_factory, kvctl):
    d = daemon_factory(dram="8MiB", nvme="64MiB", extra=["--policy", "lru", "--log-level", "WARNING"]).start()
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
    ledger = Ledger(seed=7)
    kill_rng = random.Random(11)
    held_after: list[int] = []
    for round_no in range(KILLS):
        ledger.ops = 0
        ledger.killed.clear()
        threads = [
            threading.Thread(target=writer, args=(d.address, i % 2 == 0, ledger), name=f"writer-{i}")
            for i in range(WRITERS)
        ] + [
            threading.Thread(target=reader, args=(d.address, i % 2 == 1, ledger, 100 * round_no + i), name=f"reader-{i}")
            for i in range(READERS)
        ]
        for t in threads:
            t.start()
        kill_after = kill_rng.randint(4, 40)  # completed calls of all clients together
        with ledger.lock:
            reached = ledger.lock.wait_for(lambda n=kill_after: ledger.ops >= n or ledger.failures, timeout=60)
            ledger.killed.set()
        assert reached, f"round {round_no}: only {ledger.ops} calls in 60 s"
        assert d.kill() == -signal.SIGKILL
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), f"{t.name} hangs after the kill"
        assert not ledger.failures, f"round {round_no}: {ledger.failures[:5]}"
        d.start()
        held_after.append(verify_after_restart(d, ledger, kvctl))
    # The run did what it claims: blocks accumulated and most rounds made some durable.
    assert len(ledger.attempted) >= KILLS * PER_STORE
    assert held_after[-1] >= held_after[0] and held_after[-1] > 0
    assert d.log().count("Traceback") == 0, d.log()[-3000:]
