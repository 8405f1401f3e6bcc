"""Byte-for-byte integrity traffic: asyncio (epoll) clients and servers.

Each connection: the client sends a header and `c2s` bytes of a seeded random
stream, half-closes (SHUT_WR) and keeps reading; the server reads to EOF while
it sends `s2c` bytes of its own stream, then a trailer with the SHA-256 of what
it received and of what it sent, then closes. The client checks both digests,
that EOF came exactly where expected, and that nothing stalled past a deadline.

    python -m eztunnel_lab.traffic.flowcheck server --bind 0.0.0.0 --port 9000
    python -m eztunnel_lab.traffic.flowcheck client --connect 10.0.0.11 --port 9000 --conns 64
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator

MAGIC = b"EZFC"
HEADER = struct.Struct("=4sQQQ")  # magic, c2s, s2c, seed
CHUNK = 256 * 1024


async def _stream(seed: int, size: int) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left:
        n = min(CHUNK, left)
        left -= n
        yield rng.randbytes(n)


async def _send(writer: asyncio.StreamWriter, seed: int, size: int) -> bytes:
    digest = hashlib.sha256()
    async for chunk in _stream(seed, size):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    return digest.digest()


async def _recv(
    reader: asyncio.StreamReader, size: int, delay: float = 0.0, chunk_size: int = CHUNK
) -> bytes:
    """Read exactly `size` bytes; a delay per read makes a slow reader (backpressure)."""
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = await reader.read(min(chunk_size, left))
        if not chunk:
            raise EOFError(f"EOF with {left} of {size} bytes missing")
        digest.update(chunk)
        left -= len(chunk)
        if delay:
            await asyncio.sleep(delay)
    return digest.digest()


async def _expect_eof(reader: asyncio.StreamReader) -> None:
    extra = await reader.read(1)
    if extra:
        raise ValueError("bytes after the expected end of stream")
    if await reader.read(1):  # EOF is sticky: delivered once, never data after it
        raise ValueError("data after EOF")


# ---- server -------------------------------------------------------------------


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, chunk_size: int
) -> None:
    try:
        magic, c2s, s2c, seed = HEADER.unpack(await reader.readexactly(HEADER.size))
        if magic != MAGIC:
            raise ValueError("bad header")
        recv_task = asyncio.create_task(_recv(reader, c2s, delay, chunk_size))
        sent = await _send(writer, seed ^ 0x5A5A, s2c)
        received = await recv_task
        await _expect_eof(reader)
        writer.write(received + sent)
        await writer.drain()
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError) as e:
        print(f"server: connection failed: {e!r}", file=sys.stderr, flush=True)
    finally:
        writer.close()


async def serve(bind: str, port: int, delay: float, chunk_size: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, delay, chunk_size),
        bind or None,
        port,
        backlog=1024,
        limit=CHUNK,
    )
    print(json.dumps({"listening": port}), flush=True)
    async with server:
        await server.serve_forever()


# ---- client -------------------------------------------------------------------


def sizes(count: int, lo: int, hi: int, rng: random.Random) -> list[tuple[int, int]]:
    """Log-uniform sizes, always including both extremes in each direction."""

    def pick() -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    out = [(pick(), pick()) for _ in range(count)]
    if count >= 2:
        out[0] = (lo, hi)
        out[1] = (hi, lo)
    return out


async def _one(
    args: argparse.Namespace, c2s: int, s2c: int, seed: int, bind_port: int | None
) -> int:
    host, port = args.connect, args.port
    local = ("", bind_port) if bind_port else None
    reader, writer = await asyncio.open_connection(host, port, limit=CHUNK, local_addr=local)
    try:
        writer.write(HEADER.pack(MAGIC, c2s, s2c, seed))
        recv_task = asyncio.create_task(_recv(reader, s2c, args.read_delay, args.read_chunk))
        sent = await _send(writer, seed, c2s)
        writer.write_eof()  # half-close: the server keeps sending
        received = await recv_task
        trailer = await reader.readexactly(64)
        await _expect_eof(reader)
        if trailer[:32] != sent:
            raise ValueError(f"server received different bytes ({c2s} sent)")
        if trailer[32:] != received:
            raise ValueError(f"client received different bytes ({s2c} expected)")
        return c2s + s2c
    finally:
        writer.close()


async def client(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    plan = sizes(args.conns, args.min_size, args.max_size, rng)
    gate = asyncio.Semaphore(args.concurrency)
    errors: list[str] = []

    async def guarded(i: int, c2s: int, s2c: int) -> int:
        async with gate:
            try:
                bind = args.bind_port + i if args.bind_port else None
                return await _one(args, c2s, s2c, args.seed + i, bind)
            except Exception as e:
                errors.append(f"conn {i} ({c2s}/{s2c} bytes): {e!r}")
                return 0

    start = time.monotonic()
    tasks = [guarded(i, c, s) for i, (c, s) in enumerate(plan)]
    try:
        moved = await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    except TimeoutError:
        return {"ok": False, "errors": [f"stalled: not done after {args.timeout} s"]}
    return {
        "ok": not errors,
        "conns": len(plan),
        "bytes": sum(moved),
        "seconds": round(time.monotonic() - start, 3),
        "errors": errors[:10],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flowcheck", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", default="", help="address (default: all, IPv4 and IPv6)")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--conns", type=int, default=1)
    c.add_argument("--concurrency", type=int, default=64)
    c.add_argument("--min-size", type=int, default=1)
    c.add_argument("--max-size", type=int, default=1 << 20)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--bind-port", type=int, default=0, help="first fixed source port")
    c.add_argument("--timeout", type=float, default=60.0)
    for cmd in (s, c):
        cmd.add_argument("--read-delay", type=float, default=0.0, help="seconds between reads")
        cmd.add_argument("--read-chunk", type=int, default=CHUNK, help="bytes per read")
    args = p.parse_args(argv)
    if args.cmd == "server":
        socket.setdefaulttimeout(None)
        asyncio.run(serve(args.bind, args.port, args.read_delay, args.read_chunk))
        return 0
    result = asyncio.run(client(args))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
