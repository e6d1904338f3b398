"""`kvd bench e2e`: aiperf replays an agentic-code trace through vLLM's OpenAI server with no
cache layer, with kvd (typed, lru) and with LMCache (see :mod:`kvd.bench.e2e.bench`)."""
