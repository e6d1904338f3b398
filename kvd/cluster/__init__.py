"""The cluster tier: a Mooncake Store that every node's daemon reads and writes.

- ``values``: keys (namespace and hash) and the value format (a checksummed header);
- ``backend``: the store's interface and its Mooncake implementation (blocking calls);
- ``health``: the tier's states and their transitions, as a table;
- ``tier``: the daemon's side — puts in the background, lookups that continue past the
  node's own tiers, loads that bring blocks into DRAM — on a thread of its own, bounded.
"""
