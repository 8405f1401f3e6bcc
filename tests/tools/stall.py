"""A reader that stalls: how much does the writer get to queue?

server HOST PORT SECONDS: accept one connection, read nothing for SECONDS, then read
to EOF and print "read N SHA256".
client HOST PORT: write until a write blocks for 1 s (or 10 s pass), then half-close
and print "sent N SHA256", or "error ERRNO" if a write failed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(1)
        print("listening", flush=True)
        conn, _ = ls.accept()
        time.sleep(float(sys.argv[4]))
        digest, total = hashlib.sha256(), 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            total += len(data)
        print("read", total, digest.hexdigest(), flush=True)
        return
    s = socket.create_connection((host, port))
    s.settimeout(1.0)
    digest, sent, start = hashlib.sha256(), 0, time.monotonic()
    chunk = os.urandom(1 << 16)
    try:
        while time.monotonic() - start < 10:
            n = s.send(chunk)
            digest.update(chunk[:n])
            sent += n
    except TimeoutError:
        pass  # the reader's buffers are full: the writer is held back, as it should be
    except OSError as e:
        print("error", e.errno, flush=True)
        return
    s.settimeout(None)
    s.shutdown(socket.SHUT_WR)
    print("sent", sent, digest.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
