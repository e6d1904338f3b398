"""Engine connectors: thin adapters that translate an engine's KV-cache calls into kvd client calls.

``kvd.connector.vllm.KvdConnector`` is vLLM's (0.32 and 0.33) ``KVConnectorBase_V1``; it
imports vLLM and torch, which this package does not need otherwise. ``kvd.connector.plan``
holds the scheduler side's bookkeeping (which blocks to load and save, session hints) without
vLLM, and ``kvd.connector.paged`` the worker side's copies between paged caches and blocks.
"""
