"""The one worker thread every map read of the API and metrics runs on.

One worker: a burst of requests queues up instead of running many map reads at
once, and the event loop (xDS, health) never waits on bpf(2). Past `max_waiting`
a read is refused (ReaderBusy) rather than queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from eztunnel_plugin.errors import ReaderBusy

MAX_WAITING_READS = 32

_T = TypeVar("_T")


class Reader:
    """Map reads for the API and metrics, on one worker thread off the event loop."""

    def __init__(self, max_waiting: int = MAX_WAITING_READS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ez-reader")
        self._max = max_waiting
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Reads running or queued."""
        return self._waiting

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._waiting >= self._max:
            raise ReaderBusy(f"{self._waiting} map reads are waiting already")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Wait for the read in progress (the maps must outlive it); drop queued ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)
