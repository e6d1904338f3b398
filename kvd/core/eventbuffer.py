"""The last N events, for Watch streams that resume from a sequence number.

Pure and synchronous like the rest of the core. Sequence numbers are contiguous: the
buffer holds ``first_seq .. next_seq - 1``; older events have fallen out, and a reader
that asks for one of them must resynchronize from a snapshot.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable

from kvd.core.events import Event


class EventBuffer:
    def __init__(self, capacity: int, next_seq: int = 1) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._events: deque[Event] = deque(maxlen=capacity)
        self._next_seq = next_seq

    @property
    def next_seq(self) -> int:
        """The sequence number the next event will carry."""
        return self._next_seq

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (``next_seq`` when empty)."""
        return self._next_seq - len(self._events)

    def extend(self, events: Iterable[Event]) -> None:
        """Append events; ValueError if their sequence numbers do not continue the buffer's."""
        for event in events:
            if event.seq != self._next_seq:
                raise ValueError(f"event seq {event.seq} does not follow {self._next_seq - 1}")
            self._events.append(event)
            self._next_seq += 1

    def since(self, seq: int) -> list[Event] | None:
        """Events with sequence number ``>= seq``; None when some of them fell out."""
        if seq < self.first_seq:
            return None
        wanted = self._next_seq - seq
        if wanted <= 0:
            return []
        tail = list(itertools.islice(reversed(self._events), wanted))
        tail.reverse()
        return tail
