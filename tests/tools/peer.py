"""Test peer: tells each client the address it sees them connect from.

server HOST PORT: accept; send "<peer ip> <peer port>\n"; then echo until EOF.
client HOST PORT: connect, print the server's line, send "ping", expect it echoed.
sink HOST PORT: accept and never read (a stalled application).
flood HOST PORT MB: write up to MB megabytes without blocking; print how many MB the
kernel accepted before send() stopped making progress for 1 s (bounded to 10 s).
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time


def _serve_one(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def flood(host: str, port: int, megabytes: int) -> int:
    chunk = b"x" * (1 << 20)
    sent = 0
    with socket.create_connection((host, port), timeout=10) as s:
        s.setblocking(False)
        deadline = time.monotonic() + 10
        progress = time.monotonic()
        while sent < megabytes << 20 and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
                progress = time.monotonic()
            except OSError as e:
                if e.errno == errno.ENOMEM:
                    print(f"{sent >> 20} ENOMEM", flush=True)
                    return 0
                if e.errno != errno.EAGAIN:
                    raise
                if time.monotonic() - progress > 1.0:
                    break
                time.sleep(0.001)
        print(f"{sent >> 20}", flush=True)
    return 0


def main() -> int:
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "sink":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
        print("listening", flush=True)
        held = []
        while True:
            held.append(ls.accept()[0])
    if cmd == "flood":
        return flood(host, port, int(sys.argv[4]))
    if cmd == "server":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
        print("listening", flush=True)
        while True:
            conn, peer = ls.accept()
            threading.Thread(target=_serve_one, args=(conn, peer), daemon=True).start()
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        print(f.readline().decode().strip(), flush=True)
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                break
            got += chunk
        return 0 if got == b"ping" else 1


if __name__ == "__main__":
    sys.exit(main())
