"""llm-d's KV indexer (llm-d-kv-cache) as the tests' model of a router that reads kvd's events.

Written from llm-d's documented and coded format, not from its code:

- **Decoding** (its vLLM adapter): a message is ``(topic, seq, payload)``; the topic
  ``kv@<pod>@<model>`` split on ``@`` into exactly three parts; the payload a msgpack array
  ``[ts, events, rank?]``; each event a positional array whose first element is its tag —
  ``BlockStored``: ``[tag, block_hashes, parent, token_ids, block_size, lora_id?, medium?,
  lora_name?, extra_keys?, ...]``, ``BlockRemoved``: ``[tag, block_hashes, medium?, ...]``,
  ``AllBlocksCleared``. A map-encoded event fails to decode, and so does its whole message.
- **Keys** (its token processor): a chain of FNV-64a hashes over the canonical CBOR of
  ``[parent, tokens, extra]``; the chain starts at ``FNV-64a(CBOR([FNV-64a(seed), null,
  model]))``; tokens are cut into blocks of the indexer's block size, a partial block dropped.
- **Index** (its event pool and in-memory index): a ``BlockStored`` whose parent is not 0
  and not known as an engine key is dropped; otherwise its tokens give request keys
  (continuing from the parent's request key), engine keys map to request keys by the ratio
  of their counts, and the pod's entry for the lower-cased medium (default ``gpu``) is added
  to every request key. Without tokens, it is a location update: known engine keys get the
  entry. ``BlockRemoved`` drops the pod's entry of that medium from the engine key's request
  keys (forgetting the engine key once none has an entry left); ``AllBlocksCleared`` drops
  every entry of the pod.
- **Scoring** (its longest-prefix scorer): per pod, the sum over the consecutive prefix of
  request keys it has of its highest medium weight on each key (default weights gpu 1.0,
  cpu 0.8, any other medium 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
DEFAULT_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}


def fnv64a(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit CBOR's 64-bit lengths")


def cbor(value) -> bytes:
    """Canonical CBOR (RFC 8949 4.2.1) of None, unsigned ints, text, lists and str-keyed maps."""
    if value is None:
        return b"\xf6"
    if isinstance(value, bool):
        raise TypeError("booleans are not used by llm-d's keys")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("llm-d's keys hold unsigned integers only")
        return _head(0, value)
    if isinstance(value, str):
        data = value.encode()
        return _head(3, len(data)) + data
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        # Go's canonical mode: keys ordered by encoded length, then bytewise
        items = sorted(((cbor(k), cbor(v)) for k, v in value.items()), key=lambda kv: (len(kv[0]), kv[0]))
        return _head(5, len(items)) + b"".join(k + v for k, v in items)
    raise TypeError(f"cannot encode {type(value).__name__}")


@dataclass
class TokenKeys:
    """llm-d's request keys: ``block_size`` tokens a key, chained from ``seed`` and the model."""

    block_size: int = 16
    seed: str = ""

    def _hash(self, parent: int, tokens: list[int] | None, extra) -> int:
        return fnv64a(cbor([parent, tokens, extra]))

    def root(self, model: str) -> int:
        return self._hash(fnv64a(self.seed.encode()), None, model)

    def keys(self, parent: int | None, tokens: list[int], model: str) -> list[int]:
        """Keys of ``tokens``'s whole blocks, continuing from request key ``parent`` (None:
        the model's root). Text only: no multimodal extra."""
        prefix = self.root(model) if parent is None else parent
        out = []
        for lo in range(0, len(tokens) - self.block_size + 1, self.block_size):
            prefix = self._hash(prefix, tokens[lo : lo + self.block_size], None)
            out.append(prefix)
        return out


class DecodeError(ValueError):
    pass


def parse_topic(topic: bytes) -> tuple[str, str]:
    parts = topic.decode().split("@")
    if len(parts) != 3:
        return topic.decode(), ""
    return parts[1], parts[2]


def decode_payload(payload: bytes) -> list[tuple[str, list]]:
    """``[(tag, fields)]`` of one message; DecodeError where llm-d's adapter fails (the whole
    message is then dropped)."""
    batch = msgspec.msgpack.decode(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise DecodeError("the batch is not an array of [ts, events, ...]")
    out = []
    for raw in batch[1]:
        if not isinstance(raw, list) or not raw:
            raise DecodeError(f"an event is not a positional array: {type(raw).__name__}")
        tag = raw[0]
        if tag not in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            raise DecodeError(f"unknown event tag {tag!r}")
        if tag == "BlockStored" and len(raw) < 5:
            raise DecodeError("BlockStored needs at least 5 fields")
        if tag == "BlockRemoved" and len(raw) < 2:
            raise DecodeError("BlockRemoved needs at least 2 fields")
        out.append((tag, raw))
    return out


def _at(fields: list, i: int):
    return fields[i] if i < len(fields) else None


@dataclass
class Index:
    """The index one llm-d indexer keeps: engine key -> request keys, request key -> entries."""

    keys: TokenKeys = field(default_factory=TokenKeys)
    engine_to_request: dict[int, list[int]] = field(default_factory=dict)
    entries: dict[int, set[tuple[str, str]]] = field(default_factory=dict)  # request key -> {(pod, tier)}
    dropped: list[str] = field(default_factory=list)  # why messages or events were dropped

    def apply(self, topic: bytes, payload: bytes) -> None:
        pod, model = parse_topic(topic)
        try:
            events = decode_payload(payload)
        except (DecodeError, msgspec.DecodeError) as exc:
            self.dropped.append(f"message: {exc}")
            return
        for tag, f in events:
            if tag == "BlockStored":
                self._stored(pod, model, f)
            elif tag == "BlockRemoved":
                tier = (_at(f, 2) or "gpu").lower()
                for h in f[1]:
                    self._evict(h, (pod, tier))
            else:
                for held in self.entries.values():
                    held.difference_update({e for e in held if e[0] == pod})

    def _stored(self, pod: str, model: str, f: list) -> None:
        hashes, parent, tokens = f[1], f[2], f[3]
        tier = (_at(f, 6) or "gpu").lower()
        lora = _at(f, 7)
        model = lora or model
        parent_key = None
        if parent:  # 0 and nil both mean "no parent"
            known = self.engine_to_request.get(parent)
            if not known:
                self.dropped.append(f"parent {parent} unknown")
                return
            parent_key = known[-1]
        request_keys = self.keys.keys(parent_key, list(tokens), model)
        entry = (pod, tier)
        if not request_keys:
            if tokens:
                return  # a partial block: skipped
            for h in hashes:  # a location update
                for rk in self.engine_to_request.get(h, ()):
                    self.entries.setdefault(rk, set()).add(entry)
            return
        n = max(len(hashes), len(request_keys))
        mapping: dict[int, list[int]] = {}
        for i in range(n):
            mapping.setdefault(hashes[i * len(hashes) // n], []).append(request_keys[i * len(request_keys) // n])
        self.engine_to_request.update(mapping)
        for rk in request_keys:
            self.entries.setdefault(rk, set()).add(entry)

    def _evict(self, h: int, entry: tuple[str, str]) -> None:
        rks = self.engine_to_request.get(h)
        if not rks:
            return
        for rk in rks:
            held = self.entries.get(rk)
            if held is not None:
                held.discard(entry)
                if not held:
                    del self.entries[rk]
        if not any(self.entries.get(rk) for rk in rks):
            del self.engine_to_request[h]

    def score(self, tokens: list[int], model: str, weights: dict[str, float] | None = None) -> dict[str, float]:
        """Each pod's longest-prefix score for a prompt of ``tokens``."""
        weights = DEFAULT_WEIGHTS if weights is None else weights
        scores: dict[str, float] = {}
        active: set[str] | None = None
        for rk in self.keys.keys(None, tokens, model):
            best: dict[str, float] = {}
            for pod, tier in self.entries.get(rk, ()):
                best[pod] = max(best.get(pod, 0.0), weights.get(tier, 1.0))
            active = set(best) if active is None else active & set(best)
            if not active:
                break
            for pod in active:
                scores[pod] = scores.get(pod, 0.0) + best[pod]
        return scores

    def tiers(self, tokens: list[int], model: str, pod: str) -> list[set[str]]:
        """The tiers llm-d lists for ``pod`` on each request key of the prompt, in order."""
        return [{t for p, t in self.entries.get(rk, ()) if p == pod} for rk in self.keys.keys(None, tokens, model)]
