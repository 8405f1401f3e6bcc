"""The API's reader: map reads run on one worker thread, a bounded number wait, and
close() lets the read in progress finish (the maps must outlive it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from eztunnel_plugin.api.reader import Reader
from eztunnel_plugin.errors import ReaderBusy


def test_reads_run_on_one_worker_thread_off_the_loop() -> None:
    reader = Reader()

    async def main() -> list[str]:
        return await asyncio.gather(*(reader.run(lambda: threading.current_thread().name)
                                      for _ in range(5)))  # fmt: skip

    try:
        names = asyncio.run(main())
    finally:
        reader.close()
    assert len(set(names)) == 1 and names[0].startswith("ez-reader")
    assert names[0] != threading.current_thread().name


def test_past_the_limit_a_read_is_refused_not_queued() -> None:
    reader = Reader(max_waiting=3)
    gate = threading.Event()

    async def main() -> None:
        held = [asyncio.ensure_future(reader.run(gate.wait, 30)) for _ in range(3)]
        for _ in range(1000):  # bounded: until all three wait
            if reader.waiting == 3:
                break
            await asyncio.sleep(0.01)
        assert reader.waiting == 3
        with pytest.raises(ReaderBusy, match="3 map reads are waiting already"):
            await reader.run(lambda: 1)
        gate.set()
        assert await asyncio.gather(*held) == [True, True, True]
        assert reader.waiting == 0
        assert await reader.run(lambda: 42) == 42

    try:
        asyncio.run(main())
    finally:
        gate.set()
        reader.close()


def test_an_error_in_a_read_reaches_the_caller_and_frees_its_slot() -> None:
    reader = Reader(max_waiting=1)

    def broken() -> None:
        raise OSError(9, "bad map fd")

    async def main() -> None:
        with pytest.raises(OSError, match="bad map fd"):
            await reader.run(broken)
        assert reader.waiting == 0
        assert await reader.run(lambda: "ok") == "ok"

    try:
        asyncio.run(main())
    finally:
        reader.close()


def test_close_waits_for_the_read_in_progress() -> None:
    reader = Reader()
    started, done = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        done.wait(0.3)  # bounded; close() must still wait for it to return
        done.set()

    loop = asyncio.new_event_loop()
    try:
        future = loop.create_task(reader.run(slow))
        loop.run_until_complete(asyncio.to_thread(started.wait, 10))
        reader.close()
        assert done.is_set()
        loop.run_until_complete(future)
    finally:
        loop.close()
