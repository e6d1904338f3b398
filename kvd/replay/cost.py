"""The replay's cost model: what moving and computing KV bytes takes, per token and per link.

Defaults: 131,072 KV bytes per token (Llama-3.1-8B in bf16), prefill 12,000 tokens/s, decode
12 ms/token, the HBM pool to the engine 1,000 GB/s (a device-to-device copy), DRAM->HBM and
HBM->DRAM 25 GB/s, NVMe->DRAM 6 GB/s, DRAM->NVMe 3 GB/s; the cluster tier (a Mooncake Store
every node reads, `kvd replay --nodes N --cluster SIZE`) to DRAM 3.3 GB/s and DRAM to it
0.42 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
CLUSTER_LINKS = ("cluster_to_dram_gbps", "dram_to_cluster_gbps")  # the fields only a cluster tier uses


@dataclass(frozen=True)
class CostModel:
    """Bytes per token, tokens per second, seconds per token, GB/s (1e9 bytes) per link."""

    bytes_per_token: int = 131_072
    prefill_tokens_per_s: float = 12_000.0
    decode_s_per_token: float = 0.012
    hbm_read_gbps: float = 1000.0
    dram_to_hbm_gbps: float = 25.0
    hbm_to_dram_gbps: float = 25.0
    nvme_to_dram_gbps: float = 6.0
    dram_to_nvme_gbps: float = 3.0
    # A Mooncake Store over TCP, measured on one host: a get reads 3.3 GB/s; a put, one value
    # at a time (as a node puts its blocks), writes 0.42 GB/s.
    cluster_to_dram_gbps: float = 3.3
    dram_to_cluster_gbps: float = 0.42

    def link_gbps(self, src: str, dst: str) -> float:
        table = {
            ("dram", "hbm"): self.dram_to_hbm_gbps,
            ("hbm", "dram"): self.hbm_to_dram_gbps,
            ("nvme", "dram"): self.nvme_to_dram_gbps,
            ("dram", "nvme"): self.dram_to_nvme_gbps,
            ("cluster", "dram"): self.cluster_to_dram_gbps,
            ("dram", "cluster"): self.dram_to_cluster_gbps,
        }
        if (src, dst) in table:
            return table[(src, dst)]
        # Tiers with one absent between them: the path through DRAM, one hop after the other.
        via = [(src, "dram"), ("dram", dst)]
        return 1.0 / sum(1.0 / table[hop] for hop in via)

    def load_s_per_byte(self, tier: str, top: str) -> float:
        """Seconds per byte to bring a block held in ``tier`` into the engine's HBM."""
        if tier == "hbm":
            return 1.0 / (self.hbm_read_gbps * GB)
        if tier == "dram":
            return 1.0 / (self.dram_to_hbm_gbps * GB)
        below = self.cluster_to_dram_gbps if tier == "cluster" else self.nvme_to_dram_gbps
        return 1.0 / (below * GB) + 1.0 / (self.dram_to_hbm_gbps * GB)
