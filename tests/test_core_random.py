"""Random operation sequences against tiny cores: ``KvCore.check()`` must hold after every
step, and no call may fail with anything but NoSpace (a refusal is an answer).

Each of 400 seeds draws tier sizes (1–5 blocks), write-behind on or off, and 300 operations:
stores of chains that branch from earlier ones, loads of any run of a chain, demotions,
write-behind and prefetches planned and landed (some failing, some corrupt) in any order,
a policy whose values, prefetches and demotion wishes change as it goes, and pins. Such
sequences reach the cases no hand-written test names, like an orphan dropped while a caller
holds its copy.
"""

from __future__ import annotations

import random

import pytest

from kvd.core.errors import NoSpace
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, LoadGrant, StoreGrant
from kvd.core.types import Outcome
from kvd.policies import LruPolicy, Prefetch
from kvd.tiers import ExtentAllocator

PAGE = 4096
NS = "m"


class Wandering(LruPolicy):
    """LRU whose prefetches, values and demotion wishes the test changes at random."""

    def __init__(self) -> None:
        super().__init__()
        self.due: dict[str, list[tuple[str, int]]] = {}
        self.value: dict[tuple[str, int], float] = {}
        self.not_kept: set[tuple[str, int]] = set()

    def prefetches(self, tier, now):
        due = self.due.get(tier)
        return iter([Prefetch(list(due))] if due else [])

    def priority(self, key, tier, now):
        return self.value.get(key, super().priority(key, tier, now))

    def worth_demoting(self, key, tier, now):
        return key not in self.not_kept


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = rng = random.Random(seed)
        sizes = {"dram": rng.randint(1, 4), "nvme": rng.randint(1, 5)}
        if rng.random() < 0.3:
            sizes["hbm"] = rng.randint(1, 3)
        spaces = {tier: ExtentAllocator([(0, n * PAGE)], PAGE) for tier, n in sizes.items()}
        self.policy = Wandering()
        self.core = KvCore(spaces, self.policy, lambda: 0.0, CoreConfig(write_behind=rng.random() < 0.7))
        self.core.register_namespace(NS, 16, PAGE)
        self.chains: list[list[int]] = []
        self.inflight = []
        self.next_hash = 1

    def chain(self) -> list[int]:
        rng = self.rng
        if self.chains and rng.random() < 0.5:
            return rng.choice(self.chains)
        base = rng.choice(self.chains)[: rng.randint(0, 3)] if self.chains and rng.random() < 0.6 else []
        chain = list(base)
        for _ in range(rng.randint(1, 4)):
            chain.append(self.next_hash)
            self.next_hash += 1
        self.chains.append(chain)
        return chain

    def step(self) -> None:
        rng, core, policy = self.rng, self.core, self.policy
        op = rng.random()
        if op < 0.3 or not self.chains:
            chain = self.chain()
            lo = rng.randint(0, len(chain) - 1)
            specs = [BlockSpec(h, chain[i - 1] if i else None, PAGE) for i, h in enumerate(chain)][lo:]
            grant = core.prepare_store(NS, specs)
            if isinstance(grant, StoreGrant):
                core.commit_store(grant.lease_id, abort=rng.random() < 0.05)
        elif op < 0.5:
            chain = rng.choice(self.chains)
            lo = rng.randint(0, len(chain) - 1)
            hashes = chain[lo : rng.randint(lo + 1, len(chain))]
            grant = core.prepare_load(NS, hashes)
            if isinstance(grant, LoadGrant):
                for transfer in grant.promotions + grant.awaiting:
                    if core.is_inflight(transfer):
                        core.complete_transfer(transfer, Outcome.OK if rng.random() < 0.95 else Outcome.ERROR)
                core.load_slots(grant.lease_id)
                core.complete_load(grant.lease_id)
        elif op < 0.6:
            self.inflight += core.take_demotions()
        elif op < 0.7:
            self.inflight += core.plan_write_behind(rng.randint(1, 4))
        elif op < 0.8:
            keys = [(NS, h) for h in rng.choice(self.chains)]
            policy.due = {rng.choice(core.tiers[:-1] or core.tiers): keys}
            for key in keys:
                if rng.random() < 0.3:
                    policy.value[key] = rng.choice([-1.0, 0.0, 1.0])
            self.inflight += core.plan_prefetch(rng.randint(1, 4))
        elif op < 0.95 and self.inflight:
            transfer = self.inflight.pop(rng.randrange(len(self.inflight)))
            if core.is_inflight(transfer):
                ok, corrupt = rng.random() < 0.9, rng.random() < 0.03
                core.complete_transfer(transfer, Outcome.OK if ok else Outcome.CORRUPT if corrupt else Outcome.ERROR)
        else:
            key = (NS, rng.choice(rng.choice(self.chains)))
            if rng.random() < 0.5:
                policy.not_kept.add(key)
            else:
                policy.not_kept.discard(key)
            if rng.random() < 0.1:
                core.pin(NS, [key[1]])


@pytest.mark.parametrize("seed", range(400))
def test_random_operations_keep_the_core_consistent(seed):
    run = Run(seed)
    for step in range(300):
        try:
            run.step()
        except NoSpace:
            pass  # a refusal is an answer; anything else is a bug
        problems = run.core.check()
        assert problems == [], f"seed {seed}, step {step}: {problems[:3]}"
