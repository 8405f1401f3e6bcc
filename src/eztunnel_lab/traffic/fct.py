"""Flow completion time of short flows: connect, ask for N bytes, read to EOF, close.

    python -m eztunnel_lab.traffic.fct server --port 9100
    python -m eztunnel_lab.traffic.fct client --connect 10.240.0.12 --port 9100 \\
        --sizes 1024,10240 --count 100

The client times each flow from before connect() to the server's EOF (the server
closes right after sending) and prints one JSON line: per size, the sample count,
median and p90 in microseconds, and the bytes moved. Flows run one after another,
each size bounded in count and in seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time

REQUEST = struct.Struct("!Q")
MAX_SIZE = 8 << 20


def _serve_one(conn: socket.socket, payload: bytes) -> None:
    with conn:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw = b""
            while len(raw) < REQUEST.size:
                chunk = conn.recv(REQUEST.size - len(raw))
                if not chunk:
                    return
                raw += chunk
            (size,) = REQUEST.unpack(raw)
            conn.sendall(memoryview(payload)[: min(size, MAX_SIZE)])
        except OSError as e:
            print(f"fct server: {e!r}", file=sys.stderr, flush=True)


def serve(bind: str, port: int) -> None:
    ls = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(256)
    payload = bytes(range(256)) * (MAX_SIZE // 256)  # sent from memory, never regenerated
    print(json.dumps({"listening": port}), flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_one, args=(conn, payload), daemon=True).start()


def one_flow(host: str, port: int, size: int, timeout: float) -> float:
    """Seconds from connect() to EOF for one flow of `size` bytes; checks the length."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST.pack(size))
        got = 0
        buf = bytearray(1 << 20)
        while n := s.recv_into(buf):
            got += n
    elapsed = time.perf_counter() - start
    if got != size:
        raise ValueError(f"flow of {size} bytes delivered {got}")
    return elapsed


def measure(
    host: str, port: int, sizes: list[int], count: int, seconds: float
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        samples: list[float] = []
        deadline = time.monotonic() + seconds
        for _ in range(count):
            samples.append(one_flow(host, port, size, timeout=10.0) * 1e6)
            if time.monotonic() > deadline and len(samples) >= 5:
                break
        samples.sort()
        out[str(size)] = {
            "n": len(samples),
            "p50_us": statistics.median(samples),
            "p90_us": samples[int(0.9 * (len(samples) - 1))],
            "bytes": size * len(samples),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fct", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--sizes", default="1024,10240,102400,1048576")
    c.add_argument("--count", type=int, default=100, help="flows per size (at most)")
    c.add_argument("--seconds", type=float, default=3.0, help="time budget per size")
    args = p.parse_args(argv)
    if args.cmd == "server":
        serve(args.bind, args.port)
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if not sizes or not all(0 < n <= MAX_SIZE for n in sizes):
        p.error(f"--sizes: each between 1 and {MAX_SIZE} bytes")
    try:
        result = measure(args.connect, args.port, sizes, args.count, args.seconds)
    except (OSError, ValueError) as e:
        print(json.dumps({"ok": False, "error": repr(e)}), flush=True)
        return 1
    print(json.dumps({"ok": True, "sizes": result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
