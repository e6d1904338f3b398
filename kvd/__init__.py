"""kvd: a session-aware KV-cache manager daemon for agentic LLM serving."""

__version__ = "0.1.0"
