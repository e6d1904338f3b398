"""Trace replay: request traces (Mooncake, Bailian, kvd's agentic format), the agentic workload
generator, and `kvd replay`, which runs a trace through the daemon's own core."""
