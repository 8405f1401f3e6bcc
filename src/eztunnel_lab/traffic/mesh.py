"""Many connections writing in bursts both ways at once, every byte checked (asyncio).

    python -m eztunnel_lab.traffic.mesh server PORT [--conns N --size B --burst B ...]
    python -m eztunnel_lab.traffic.mesh client HOST PORT [the same options]

Byte i of a direction is the pattern's byte (phase + i) mod P, P a prime, so no write size
aligns with it; each reader checks every byte in order and says where the first wrong one
came from (the pattern from another offset, or bytes not in it). Each side prints one JSON
line: connections, intact connections, ok, and the first reasons. Every wait is bounded by
--timeout. Standard library only. The resumable-splice tests' stream tools share the
pattern; `eztunnel-lab soak` runs this through the data plane.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys

P = 7_999_993  # pattern period: a prime, so no write size aligns with it
PAT = random.Random(11).randbytes(P)
PAT2 = PAT + PAT[: 8 << 20]
SERVER_PHASE = 3_000_001  # the server -> client direction's offset in the pattern


def expect(off: int, n: int) -> bytes:
    """The n pattern bytes at stream offset off (n <= 8 MiB)."""
    o = off % P
    return PAT2[o : o + n]


def first_bad(got: bytes | memoryview, off: int) -> int:
    """Stream offset of the first byte of `got` (at offset off) that is wrong, or -1."""
    if PAT2.startswith(got, off % P):  # a memcmp in place: no copy of either side
        return -1
    want = expect(off, len(got))
    return off + next(i for i in range(len(got)) if got[i] != want[i])


def whence(got: bytes, at: int, off: int) -> str:
    """What the wrong bytes at index `at` of `got` (stream offset `off` + at) are: the
    pattern from another offset (moved by how much), or bytes not in the pattern."""
    window = bytes(got[at : at + 32])
    o = PAT2.find(window) if len(window) == 32 else -1
    if o < 0:
        return "bytes that are not in the pattern"
    want = (off + at) % P
    return f"the pattern {(o - want + P // 2) % P - P // 2:+d} bytes away"


async def burst_writer(w: asyncio.StreamWriter, phase: int, a: argparse.Namespace) -> None:
    off = 0
    while off < a.size:
        n = min(a.burst, a.size - off)
        w.write(expect(phase + off, n))
        off += n
        await w.drain()
        await asyncio.sleep(a.pause_ms / 1000)
    w.write_eof()


async def checked_reader(
    r: asyncio.StreamReader, phase: int, a: argparse.Namespace, why: list[str]
) -> bool:
    got = 0
    while got < a.size:
        chunk = await r.read(64 * 1024)
        if not chunk:
            why.append(f"EOF after {got} of {a.size} bytes")
            return False
        bad = first_bad(chunk, phase + got)
        if bad >= 0:
            there = whence(chunk, bad - phase - got, phase + got)
            at = f"stream offset {bad - phase} (read of {len(chunk)} at {got})"
            why.append(f"wrong byte at {at}: {there}")
            return False
        got += len(chunk)
    if await r.read(1) != b"":  # EOF exactly at the end
        why.append("bytes after the end")
        return False
    return True


async def both_ways(
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
    out: int,
    inp: int,
    a: argparse.Namespace,
    why: list[str],
) -> bool:
    try:
        ok = await asyncio.wait_for(
            asyncio.gather(burst_writer(w, out, a), checked_reader(r, inp, a, why)), a.timeout
        )
    except (OSError, TimeoutError, EOFError) as e:
        why.append(repr(e))
        return False
    finally:
        # close() sends what the transport still buffers, then closes; wait for that, or the
        # loop ends first and drops the tail (the reader then gets EOF early).
        w.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(w.wait_closed(), a.timeout)
    return bool(ok[1])


def server(a: argparse.Namespace) -> int:
    async def run() -> None:
        done: list[bool] = []
        why: list[str] = []
        finished = asyncio.Event()

        async def one(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            done.append(await both_ways(r, w, SERVER_PHASE, 0, a, why))
            if len(done) == a.conns:
                finished.set()

        server = await asyncio.start_server(one, "0.0.0.0", a.port, backlog=a.conns)
        emit({"listening": a.port})
        async with server:
            await asyncio.wait_for(finished.wait(), a.timeout)
        emit({"conns": len(done), "ok_conns": sum(done), "ok": all(done), "why": why[:4]})

    asyncio.run(run())
    return 0


def client(a: argparse.Namespace) -> int:
    why: list[str] = []

    async def one() -> bool:
        try:
            r, w = await asyncio.open_connection(a.host, a.port)
        except OSError as e:
            why.append(repr(e))
            return False
        return await both_ways(r, w, 0, SERVER_PHASE, a, why)

    async def run() -> list[bool]:
        return list(await asyncio.gather(*(one() for _ in range(a.conns))))

    done = asyncio.run(run())
    emit({"conns": len(done), "ok_conns": sum(done), "ok": all(done), "why": why[:4]})
    return 0


def emit(result: dict[str, object]) -> None:
    print(json.dumps(result), flush=True)


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("port", type=int)
    c.add_argument("--conns", type=int, default=64)
    c.add_argument("--size", type=int, default=8 << 20, help="bytes each way per connection")
    c.add_argument("--burst", type=int, default=64 * 1024)
    c.add_argument("--pause-ms", type=float, default=1.0)
    c.add_argument("--timeout", type=float, default=90.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mesh", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    add_arguments(sub.add_parser("server"))
    c = sub.add_parser("client")
    c.add_argument("host")
    add_arguments(c)
    a = p.parse_args(argv)
    if a.conns < 1 or a.size < 1 or a.burst < 1 or a.timeout <= 0:
        p.error("--conns, --size, --burst and --timeout must be positive")
    return server(a) if a.role == "server" else client(a)


if __name__ == "__main__":
    sys.exit(main())
