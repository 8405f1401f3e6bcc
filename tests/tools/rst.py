"""Abrupt close: the client resets the connection (SO_LINGER 0); report what the server sees.

server HOST PORT: accept one connection, read 1000 bytes, answer b"k", then read
until error or EOF and print "reset", "eof" or "timeout".
client HOST PORT: connect, send 1000 bytes, wait for b"k", close with RST.
"""

from __future__ import annotations

import socket
import struct
import sys


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if mode == "server":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)
        print("listening", flush=True)
        conn, _ = s.accept()
        got = b""
        while len(got) < 1000:
            got += conn.recv(1000 - len(got))
        conn.sendall(b"k")
        conn.settimeout(5)
        try:
            extra = conn.recv(100)
            print("eof" if not extra else f"data {extra!r}", flush=True)
        except ConnectionResetError:
            print("reset", flush=True)
        except TimeoutError:
            print("timeout", flush=True)
    else:
        s.connect((host, port))
        s.sendall(b"r" * 1000)
        assert s.recv(1) == b"k"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        print("closed", flush=True)


if __name__ == "__main__":
    main()
