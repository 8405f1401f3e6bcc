"""Test peer for the pairing-proof tests: a connection that waits to be told what to do.

connect HOST PORT [--src IP] [--sport N]: connect (a --src is bound with
IP_TRANSPARENT), print "connected <cookie>", then for each stdin line:
"send" exchanges --size bytes with an echo server and prints "echoed",
"rst" closes with a reset (no TIME_WAIT) and exits. EOF closes normally.
repair SRC SPORT HOST PORT SND RCV: a TCP_REPAIR socket "connected" without a
handshake, its sequence numbers chosen (snd, rcv); prints "connected <cookie>"
and keeps it until stdin closes.
Exit status 0 only if every echo came back intact.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys

SO_COOKIE = 57
IP_TRANSPARENT = 19
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2


def cookie(s: socket.socket) -> int:
    value: int = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def echo(s: socket.socket, size: int) -> None:
    payload = os.urandom(size)
    s.sendall(payload)
    got = bytearray()
    while len(got) < size:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("EOF before the echo was complete")
        got += chunk
    if bytes(got) != payload:
        raise SystemExit("echo differs from what was sent")


def connect(host: str, port: int, src: str, sport: int, size: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if src:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    if src or sport:
        s.bind((src, sport))
    s.settimeout(30)
    s.connect((host, port))
    print("connected", cookie(s), flush=True)
    for line in sys.stdin:
        if line.strip() == "send":
            echo(s, size)
            print("echoed", flush=True)
        elif line.strip() == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            print("closed", flush=True)
            return
    s.close()
    print("closed", flush=True)


def repair(src: str, sport: int, host: str, port: int, snd: int, rcv: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)
    s.bind((src, sport))
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    s.setsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ, snd)
    s.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    s.setsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ, rcv)
    s.connect((host, port))  # no packet leaves: repair mode
    print("connected", cookie(s), flush=True)
    sys.stdin.read()
    s.close()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--src", default="")
    c.add_argument("--sport", type=int, default=0)
    c.add_argument("--size", type=int, default=65536)
    r = sub.add_parser("repair")
    for name in ("src", "sport", "host", "port", "snd", "rcv"):
        r.add_argument(name, type=str if name in ("src", "host") else int)
    a = p.parse_args()
    if a.mode == "connect":
        connect(a.host, a.port, a.src, a.sport, a.size)
    else:
        repair(a.src, a.sport, a.host, a.port, a.snd, a.rcv)


if __name__ == "__main__":
    main()
