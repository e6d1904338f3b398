"""The cluster tier's metrics, read from its status at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvd.cluster.health import ClusterState


class ClusterCollector:
    """kvd_cluster_* for one daemon's :class:`~kvd.cluster.tier.ClusterTier`."""

    def __init__(self, tier) -> None:
        self.tier = tier

    def collect(self) -> Iterable:
        status = self.tier.status()
        state = GaugeMetricFamily("kvd_cluster_state", "1 for the cluster tier's current state.", labels=["state"])
        for s in ClusterState:
            state.add_metric([s.value], int(status.state is s))
        yield state
        yield CounterMetricFamily(
            "kvd_cluster_state_changes", "Changes of the cluster tier's state.", value=self.tier.health.changes
        )
        yield GaugeMetricFamily(
            "kvd_cluster_published_blocks", "Blocks this node put in the cluster that it knows are there.",
            value=status.published_blocks,
        )
        yield GaugeMetricFamily(
            "kvd_cluster_pending_blocks", "Blocks queued for a put to the cluster.", value=status.pending_blocks
        )
        c = status.counters
        for name, help_, value in (
            ("kvd_cluster_put_blocks", "Blocks put to the cluster.", c.put_blocks),
            ("kvd_cluster_put_bytes", "Block bytes put to the cluster.", c.put_bytes),
            ("kvd_cluster_put_failed_blocks", "Blocks whose put failed.", c.put_failed),
            ("kvd_cluster_read_blocks", "Blocks read from the cluster into DRAM, checked.", c.got_blocks),
            ("kvd_cluster_read_bytes", "Block bytes read from the cluster.", c.got_bytes),
            ("kvd_cluster_read_failed_blocks", "Blocks a read did not get.", c.get_failed),
            ("kvd_cluster_corrupt_blocks", "Values read that failed their checks (served as misses).", c.corrupt),
            ("kvd_cluster_lookup_hits", "Blocks lookups found in the cluster past the node's own prefix.", c.lookup_hits),
            ("kvd_cluster_timeouts", "Cluster calls that overran their bound.", c.timeouts),
            ("kvd_cluster_gone_blocks", "Published blocks an audit found gone.", c.audited_gone),
        ):
            yield CounterMetricFamily(name, help_, value=value)
