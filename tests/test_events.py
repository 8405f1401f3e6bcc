"""The event bus behind WatchEvents: fan-out, fields as text, bounded and never blocking."""

from __future__ import annotations

import asyncio

from eztunnel_plugin.events import Event, EventBus


def drain(queue: asyncio.Queue[Event]) -> list[Event]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_every_subscriber_gets_every_event_with_text_fields() -> None:
    async def main() -> None:
        bus = EventBus()
        async with bus.subscribe() as a, bus.subscribe() as b:
            bus.publish("endpoint.enrolled", ip="10.0.0.1", flags=1)
            bus.publish("xds.stale")
            for q in (a, b):
                got = drain(q)
                assert [(e.kind, e.fields) for e in got] == [
                    ("endpoint.enrolled", {"ip": "10.0.0.1", "flags": "1"}),
                    ("xds.stale", {}),
                ]
                assert got[0].time > 0

    asyncio.run(main())


def test_a_slow_subscriber_loses_its_oldest_events_and_nobody_blocks() -> None:
    async def main() -> None:
        bus = EventBus(queue_size=3)
        async with bus.subscribe() as q:
            for i in range(10):
                bus.publish("tick", n=i)  # never waits, though nobody reads
            assert [e.fields["n"] for e in drain(q)] == ["7", "8", "9"]

    asyncio.run(main())


def test_events_before_subscribing_or_after_leaving_are_not_seen() -> None:
    async def main() -> None:
        bus = EventBus()
        bus.publish("early")  # no subscriber: dropped, no error
        async with bus.subscribe() as q:
            bus.publish("during")
        bus.publish("late")
        assert [e.kind for e in drain(q)] == ["during"]
        async with bus.subscribe() as fresh:
            assert fresh.empty()

    asyncio.run(main())
