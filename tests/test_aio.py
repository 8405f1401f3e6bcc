"""cancel_all: every task is cancelled and awaited; a task's own error ends with it."""

from __future__ import annotations

import asyncio

from eztunnel_plugin.aio import cancel_all


def test_cancels_and_waits_for_every_task() -> None:
    cleaned: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(name)

    async def main() -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(forever(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0)  # let them start
        await cancel_all(tasks)
        return tasks

    tasks = asyncio.run(main())
    assert sorted(cleaned) == ["a", "b", "c"]
    assert all(t.cancelled() for t in tasks)


def test_failed_and_finished_tasks_do_not_stop_the_others() -> None:
    async def boom() -> None:
        raise RuntimeError("broken")

    async def done() -> int:
        return 1

    async def main() -> tuple[asyncio.Task[None], asyncio.Task[int], asyncio.Task[None]]:
        failed = asyncio.create_task(boom())
        finished = asyncio.create_task(done())
        await asyncio.sleep(0.01)
        pending = asyncio.create_task(asyncio.sleep(3600))
        await cancel_all([failed, finished, pending])  # raises nothing
        return failed, finished, pending

    failed, finished, pending = asyncio.run(main())
    assert isinstance(failed.exception(), RuntimeError)
    assert finished.result() == 1
    assert pending.cancelled()
