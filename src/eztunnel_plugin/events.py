"""A small in-process event bus for the WatchEvents stream (bounded, never blocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    kind: str
    fields: dict[str, str]
    time: float = field(default_factory=time.time)


class EventBus:
    """Fan-out to subscribers; a slow subscriber loses its oldest events, not the agent."""

    def __init__(self, queue_size: int = 1024) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._queue_size = queue_size

    def publish(self, kind: str, **fields: object) -> None:
        event = Event(kind, {k: str(v) for k, v in fields.items()})
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        q: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)
