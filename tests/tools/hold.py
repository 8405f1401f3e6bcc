"""Test peer that keeps a connection open until told to close.

server: echo every byte back until EOF, then close.
client: connect (optionally from a fixed source), send N bytes, read them back,
print "held", then keep the connection until stdin closes; more rounds of N
bytes are exchanged for every line read on stdin. Exit status 0 only if every
byte came back intact.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def serve(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(64)
    print("listening", flush=True)
    while True:
        conn, _ = ls.accept()
        if os.fork() == 0:
            ls.close()
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.close()
            os._exit(0)
        conn.close()


def exchange(s: socket.socket, payload: bytes) -> None:
    s.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("EOF before the echo was complete")
        got += chunk
    if bytes(got) != payload:
        raise SystemExit("echo differs from what was sent")


def client(host: str, port: int, size: int, src: str, sport: int, mark: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    if src:  # spoofed source, as ztunnel's inbound leg does
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    if src or sport:
        s.bind((src, sport))
    s.connect((host, port))
    tag = f"{src}:{sport}->{host}:{port}".encode()
    exchange(s, (tag * (size // len(tag) + 1))[:size])
    print("held", flush=True)
    for rounds, _line in enumerate(sys.stdin, 1):
        exchange(s, os.urandom(size))
        print("round", rounds, flush=True)
    s.close()
    print("closed", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--src", default="", help="source address (IP_TRANSPARENT)")
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--mark", type=int, default=0)
    a = p.parse_args()
    if a.mode == "server":
        serve(a.host, a.port)
    else:
        client(a.host, a.port, a.size, a.src, a.sport, a.mark)


if __name__ == "__main__":
    main()
