"""Connection load: churn (new connections per second) and many held connections.

    python -m eztunnel_lab.traffic.conns server --port 9200
    python -m eztunnel_lab.traffic.conns churn --connect 10.240.0.12 --port 9200 \\
        --concurrency 16 --seconds 3
    python -m eztunnel_lab.traffic.conns hold --connect 10.240.0.12 --port 9200 \\
        --conns 2000 --seconds 10

The server (dual stack) echoes whatever it reads. `churn`: workers each loop connect,
send one byte, read it back, close, for the time given; prints connections per second.
`hold`: opens every connection (at most 64 connects at a time), prints `{"held": N}`
once all are open, then every second each sends 64 bytes and reads them back, until
the time is up; prints how many stayed intact. `echo` + `pingpong`: a blocking 64-byte
ping-pong (sockperf 3.7 has no IPv6), one-way p50/p99 in microseconds (half the round
trip; includes the interpreter's own ~10 us). Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import sys
import threading
import time


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    sock = socket.create_server(
        ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=4096
    )
    server = await asyncio.start_server(_echo, sock=sock)
    print(json.dumps({"listening": port}), flush=True)
    async with server:
        await server.serve_forever()


def _echo_blocking(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


def echo(port: int) -> None:
    ls = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_echo_blocking, args=(conn,), daemon=True).start()


def pingpong(host: str, port: int, seconds: float, size: int = 64) -> dict[str, object]:
    msg = b"q" * size
    rtts: list[float] = []
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(rtts) < 10_000_000:
            t = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                if not chunk:
                    return {"ok": False, "error": "EOF"}
                got += len(chunk)
            rtts.append(time.perf_counter() - t)
    q = statistics.quantiles(rtts, n=100)
    return {"ok": True, "n": len(rtts), "p50": q[49] / 2 * 1e6, "p99": q[98] / 2 * 1e6}


async def _one_churn(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"x")
        await writer.drain()
        if await reader.readexactly(1) != b"x":
            raise ValueError("wrong echo")
    finally:
        writer.close()


async def churn(host: str, port: int, concurrency: int, seconds: float) -> dict[str, object]:
    done = errors = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(_one_churn(host, port), 10)
                done += 1
            except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"ok": errors == 0, "conns": done, "errors": errors, "per_second": done / elapsed}


async def hold(host: str, port: int, conns: int, seconds: float) -> dict[str, object]:
    gate = asyncio.Semaphore(64)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failed = 0

    async def open_one() -> None:
        nonlocal failed
        async with gate:
            try:
                opened.append(await asyncio.wait_for(asyncio.open_connection(host, port), 15))
            except (OSError, TimeoutError):
                failed += 1

    await asyncio.gather(*(open_one() for _ in range(conns)))
    print(json.dumps({"held": len(opened)}), flush=True)
    payload = b"p" * 64
    broken = 0
    deadline = time.monotonic() + seconds

    async def tick(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
        reader, writer = pair
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload)) == payload

    while time.monotonic() < deadline:
        started = time.monotonic()
        results = await asyncio.gather(
            *(asyncio.wait_for(tick(p), 10) for p in opened), return_exceptions=True
        )
        broken = sum(1 for r in results if r is not True)
        if broken:
            break
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    for _, writer in opened:
        writer.close()
    intact = len(opened) - broken
    ok = failed == 0 and broken == 0
    return {"ok": ok, "held": len(opened), "intact": intact, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conns")
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("server", "echo"):
        s = sub.add_parser(name)
        s.add_argument("--port", type=int, required=True)
    for name in ("churn", "hold", "pingpong"):
        c = sub.add_parser(name)
        c.add_argument("--connect", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--seconds", type=float, default=3.0)
        if name == "churn":
            c.add_argument("--concurrency", type=int, default=16)
        elif name == "hold":
            c.add_argument("--conns", type=int, default=2000)
    args = p.parse_args(argv)
    _raise_fd_limit()
    if args.mode == "server":
        asyncio.run(serve(args.port))
        return 0
    if args.mode == "echo":
        echo(args.port)
        return 0
    if args.mode == "pingpong":
        print(json.dumps(pingpong(args.connect, args.port, args.seconds)), flush=True)
        return 0
    if args.mode == "churn":
        if not 1 <= args.concurrency <= 1024:
            print("conns: --concurrency must be 1..1024", file=sys.stderr)
            return 2
        result = asyncio.run(churn(args.connect, args.port, args.concurrency, args.seconds))
    else:
        if not 1 <= args.conns <= 20000:
            print("conns: --conns must be 1..20000", file=sys.stderr)
            return 2
        result = asyncio.run(hold(args.connect, args.port, args.conns, args.seconds))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
