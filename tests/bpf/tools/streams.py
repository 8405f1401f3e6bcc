"""Byte-for-byte stream traffic for the resumable-splice tests, one connection at a time.

Every byte i of a direction is the lab's pattern byte at phase + i (eztunnel_lab.traffic.mesh,
which also holds the many-connection mesh); readers check each byte in order and report
one JSON line. Readers and writers come in the kinds the tests need:
how a reader reads (epoll, blocking, MSG_WAITALL, SO_RCVLOWAT, select, asyncio,
splice(2)), how fast (a byte rate, bursts with stalls), and how a writer writes
(send, sendfile, bursts). Every loop is bounded by a deadline. Standard library and the
lab's pattern, but for repeat-server (the agent's TCP_REPAIR rebuild).

    streams.py server PORT [--mode M] [--rate B/s] ...      (reader, prints its result)
    streams.py client HOST PORT --total N [--sendfile] ...  (writer)
    streams.py chat-server PORT ... / chat-client HOST PORT ...  (bulk bursts + ping-pong)
    streams.py trap-server PORT / trap-client HOST PORT  (a reader asleep in tcp_recvmsg)
    streams.py repeat-server PORT --back N / repeat-client HOST PORT  (a partial retransmission)
"""

from __future__ import annotations

import argparse
import array
import asyncio
import fcntl
import json
import os
import select
import selectors
import socket
import struct
import sys
import tempfile
import termios
import time
from typing import Any

from eztunnel_lab.traffic import mesh
from eztunnel_lab.traffic.mesh import SERVER_PHASE, expect, first_bad, whence

Json = dict[str, Any]


def fionread(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
    return buf[0]


def emit(result: Json) -> None:
    print(json.dumps(result), flush=True)


def listen(port: int) -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(8)
    emit({"listening": port})
    return ls


def blocking_timeout(s: socket.socket, seconds: float) -> None:
    """A truly blocking socket (it sleeps inside recvmsg and sendmsg), woken at least every
    `seconds`. Python's settimeout() would poll() instead, another kind of reader, and make
    sends non-blocking, whose partial pushes the kernel finishes without a verdict."""
    s.settimeout(None)
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def connect(a: argparse.Namespace) -> socket.socket:
    s = socket.create_connection((a.host, a.port), timeout=a.timeout)
    blocking_timeout(s, a.timeout)
    return s


# ---- the reader -------------------------------------------------------------------------


class Reader:
    """Reads one direction and checks it; paces itself to `rate` bytes/s and stalls."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.got = 0
        self.bad = -1
        self.reads = 0
        self.short_waitall = 0
        self.short_lowat = 0
        self.max_fionread = 0
        self.t0 = time.monotonic()

    def take(self, s: socket.socket, data: bytes | memoryview) -> None:
        n = len(data)
        if self.bad < 0:
            self.bad = first_bad(data, self.a.phase + self.got)
        self.got += n
        self.reads += 1
        more = self.got < self.a.expect  # not the stream's last bytes
        if self.a.mode == "waitall" and n < self.a.rsize and more:
            self.short_waitall += 1
        if self.a.mode == "rcvlowat" and n < self.a.lowat and more:
            self.short_lowat += 1
        self.max_fionread = max(self.max_fionread, fionread(s))
        self.pace()

    def pace(self) -> None:
        if self.a.rate:
            ahead = self.got / self.a.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(min(ahead, 1.0))

    def stall(self, before: int) -> None:
        a = self.a
        if a.stall_every and before // a.stall_every != self.got // a.stall_every:
            time.sleep(a.stall_ms / 1000)

    def result(self, eof: bool) -> Json:
        return {
            "mode": self.a.mode,
            "bytes": self.got,
            "want": self.a.expect,
            "first_bad": self.bad,
            "eof": eof,
            "ok": self.bad < 0 and self.got == self.a.expect and eof,
            "reads": self.reads,
            "short_waitall": self.short_waitall,
            "short_lowat": self.short_lowat,
            "max_fionread": self.max_fionread,
            "secs": round(time.monotonic() - self.t0, 3),
        }


def read_sync(conn: socket.socket, a: argparse.Namespace, deadline: float) -> Json:
    r = Reader(a)
    buf = bytearray(a.rsize)
    mv = memoryview(buf)
    sel: selectors.BaseSelector | None = None
    if a.mode in ("epoll", "select"):
        conn.setblocking(False)
        sel = selectors.EpollSelector() if a.mode == "epoll" else selectors.SelectSelector()
        sel.register(conn, selectors.EVENT_READ)
    else:
        blocking_timeout(conn, 1)
    if a.mode == "rcvlowat":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, a.lowat)
    eof = False
    error = ""
    while time.monotonic() < deadline and r.got < a.expect + 1:
        before = r.got
        try:
            if sel is not None:
                if not sel.select(timeout=0.5):
                    continue
                n = conn.recv_into(mv, a.rsize)
            elif a.mode == "waitall":
                n = conn.recv_into(mv, min(a.rsize, max(1, a.expect - r.got)), socket.MSG_WAITALL)
            else:
                n = conn.recv_into(mv, a.rsize)
        except (BlockingIOError, TimeoutError, InterruptedError):
            continue
        except ConnectionResetError:
            error = "reset"
            break
        if n == 0:
            eof = True
            break
        r.take(conn, mv[:n])
        r.stall(before)
    res = r.result(eof)
    res["error"] = error
    return res


def read_splice(conn: socket.socket, a: argparse.Namespace, deadline: float) -> Json:
    """splice(2) from the socket into a pipe until EOF, then recv() what is left. splice
    reads the TCP receive queue only, so redirected bytes queued before it are skipped;
    they stay in the socket, and recv() returns them afterwards."""
    blocking_timeout(conn, 1)
    rd, wr = os.pipe()
    spliced = bytearray()
    eof = False
    while time.monotonic() < deadline:
        try:
            n = os.splice(conn.fileno(), wr, a.rsize)
        except OSError as e:
            if e.errno in (11, 4):  # EAGAIN (the SO_RCVTIMEO tick), EINTR
                continue
            raise
        if n == 0:
            eof = True
            break
        left = n
        while left:
            chunk = os.read(rd, left)
            spliced += chunk
            left -= len(chunk)
    conn.setblocking(False)
    after = bytearray()
    try:
        while chunk := conn.recv(1 << 20):
            after += chunk
    except BlockingIOError:
        pass
    # Where the spliced bytes start in the stream: right after what recv() found.
    start = len(after)
    ok = eof and bytes(after) == expect(0, start) and first_bad(bytes(spliced), start) < 0
    return {
        "mode": "splice",
        "bytes": len(spliced) + len(after),
        "want": a.expect,
        "spliced": len(spliced),
        "recv_after": len(after),
        "eof": eof,
        "ok": ok and start + len(spliced) == a.expect,
        "first_bad": -1 if ok else 0,
    }


async def read_async(conn: socket.socket, a: argparse.Namespace, deadline: float) -> Json:
    r = Reader(a)
    conn.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=conn)
    eof = False
    while time.monotonic() < deadline and r.got < a.expect + 1:
        before = r.got
        try:
            chunk = await asyncio.wait_for(reader.read(a.rsize), deadline - time.monotonic())
        except TimeoutError:
            break
        if not chunk:
            eof = True
            break
        if r.bad < 0:
            r.bad = first_bad(chunk, a.phase + r.got)
        r.got += len(chunk)
        r.reads += 1
        r.max_fionread = max(r.max_fionread, fionread(conn))
        if a.rate:
            ahead = r.got / a.rate - (time.monotonic() - r.t0)
            if ahead > 0:
                await asyncio.sleep(min(ahead, 1.0))
        if a.stall_every and before // a.stall_every != r.got // a.stall_every:
            await asyncio.sleep(a.stall_ms / 1000)
    writer.close()
    return r.result(eof)


def server(a: argparse.Namespace) -> int:
    ls = listen(a.port)
    ls.settimeout(a.timeout)
    deadline = time.monotonic() + a.timeout
    conn, _ = ls.accept()
    if a.hold_ms:  # let the writer get ahead before the first read
        time.sleep(a.hold_ms / 1000)
    probe: Json = {}
    if a.probe:  # what FIONREAD says with both queues full, and with only TCP bytes left
        probe["fionread_both"] = fionread(conn)
        conn.setblocking(False)
        head = bytearray()
        while len(head) < probe["fionread_both"]:
            head += conn.recv(probe["fionread_both"] - len(head))
        probe["fionread_tcp_only"] = fionread(conn)
        probe["tcp_queued"] = len(conn.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        probe["head_ok"] = bytes(head) == expect(a.phase, len(head))
        a.expect -= len(head)
        a.phase += len(head)
    if a.mode == "asyncio":
        res = asyncio.run(read_async(conn, a, deadline))
    elif a.mode == "splice":
        res = read_splice(conn, a, deadline)
    else:
        res = read_sync(conn, a, deadline)
    res.update(probe)
    if a.reply and res["ok"]:  # the peer half-closed: answer on the other direction
        conn.setblocking(True)
        conn.sendall(expect(SERVER_PHASE, a.reply))
    emit(res)
    conn.close()
    return 0 if res["ok"] else 1


# ---- the writer -------------------------------------------------------------------------


def client(a: argparse.Namespace) -> int:
    s = connect(a)
    deadline = time.monotonic() + a.timeout
    sent = 0
    if a.sendfile:
        with tempfile.TemporaryFile() as f:  # the whole stream, from the page cache
            while sent < a.total:
                n = min(8 << 20, a.total - sent)
                f.write(expect(sent, n))
                sent += n
            f.flush()
            sent = 0
            while sent < a.total and time.monotonic() < deadline:
                n = min(a.burst or a.total, a.total - sent)
                sent += s.sendfile(f, sent, n)
                if a.burst:
                    time.sleep(a.pause_ms / 1000)
    else:
        in_burst = 0
        while sent < a.total and time.monotonic() < deadline:
            n = min(a.wsize, a.total - sent)
            s.sendall(expect(a.phase + sent, n))
            sent += n
            in_burst += n
            if a.burst and in_burst >= a.burst:
                in_burst = 0
                time.sleep(a.pause_ms / 1000)
    if a.rst:  # abort: an RST instead of a FIN, whatever is queued
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        emit({"sent": sent})
        return 0
    s.shutdown(socket.SHUT_WR)
    blocking_timeout(s, max(1.0, deadline - time.monotonic()))
    reply = bytearray()
    eagain = 0  # a blocking read of a SOCKHASH socket may say EAGAIN (docs/dataplane.md)
    while time.monotonic() < deadline:  # the reader's close ends it
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            eagain += 1
            continue
        except OSError:
            break
        if not chunk:
            break
        reply += chunk
    emit({"sent": sent, "reply": len(reply), "eagain": eagain,
          "reply_ok": first_bad(bytes(reply), SERVER_PHASE) < 0})  # fmt: skip
    s.close()
    return 0


# ---- bulk bursts and ping-pong on one keep-alive connection ------------------------------


def chat_server(a: argparse.Namespace) -> int:
    """Per round: read a burst (checked), then answer `pings` requests of `msg` bytes."""
    ls = listen(a.port)
    ls.settimeout(a.timeout)
    conn, _ = ls.accept()
    deadline = time.monotonic() + a.timeout
    conn.settimeout(a.timeout)  # waits in poll(), as event-driven servers do
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    got = sent = 0
    bad = -1
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    ok = True
    for _ in range(a.rounds):
        for want in [a.burst_bytes] + [a.msg] * a.pings:
            end = got + want
            while got < end and time.monotonic() < deadline:
                n = conn.recv_into(mv, min(len(buf), end - got))
                if n == 0:
                    ok = False
                    break
                if bad < 0:
                    bad = first_bad(mv[:n], got)
                got += n
            if got < end:
                ok = False
                break
            if want == a.msg:
                conn.sendall(expect(SERVER_PHASE + sent, a.msg))
                sent += a.msg
        if not ok:
            break
    emit({"bytes": got, "sent": sent, "first_bad": bad, "ok": ok and bad < 0})
    conn.close()
    return 0


def chat_client(a: argparse.Namespace) -> int:
    """Per round: a burst of `burst_bytes`, then `pings` request/response exchanges, timed."""
    s = connect(a)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + a.timeout
    sent = got = 0
    bad = -1
    rtts: list[list[float]] = []
    buf = bytearray(a.msg)
    mv = memoryview(buf)
    for _ in range(a.rounds):
        end = sent + a.burst_bytes
        while sent < end and time.monotonic() < deadline:
            n = min(1 << 20, end - sent)
            s.sendall(expect(sent, n))
            sent += n
        times = []
        for _ in range(a.pings):
            t = time.perf_counter()
            s.sendall(expect(sent, a.msg))
            sent += a.msg
            have = 0
            while have < a.msg:
                n = s.recv_into(mv[have:], a.msg - have)
                if n == 0:
                    raise EOFError("server closed during a ping-pong")
                have += n
            times.append(time.perf_counter() - t)
            if bad < 0:
                bad = first_bad(mv, SERVER_PHASE + got)
            got += a.msg
        rtts.append(times)
    s.close()
    emit({"sent": sent, "got": got, "first_bad": bad, "rtts": rtts})
    return 0


# ---- small requests, bulk responses into a slow reader -------------------------------------


def rr_server(a: argparse.Namespace) -> int:
    ls = listen(a.port)
    ls.settimeout(a.timeout)
    conn, _ = ls.accept()
    blocking_timeout(conn, a.timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    got = sent = 0
    bad = -1
    for _ in range(a.rounds):
        req = b""
        while len(req) < a.msg:
            chunk = conn.recv(a.msg - len(req))
            if not chunk:
                raise EOFError("client closed mid-request")
            req += chunk
        if bad < 0:
            bad = first_bad(req, got)
        got += a.msg
        end = sent + a.resp
        while sent < end:
            n = min(256 * 1024, end - sent)
            conn.sendall(expect(SERVER_PHASE + sent, n))
            sent += n
    emit({"got": got, "sent": sent, "first_bad": bad})
    conn.close()
    return 0


def rr_client(a: argparse.Namespace) -> int:
    """Requests of `msg` bytes, each answered by `resp` bytes it reads at `rate` bytes/s."""
    s = connect(a)
    s.settimeout(a.timeout)  # waits in poll(), as event-driven clients do
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = got = 0
    bad = -1
    t0 = time.monotonic()
    for _ in range(a.rounds):
        s.sendall(expect(sent, a.msg))
        sent += a.msg
        end = got + a.resp
        while got < end:
            chunk = s.recv(min(64 * 1024, end - got))
            if not chunk:
                raise EOFError("server closed mid-response")
            if bad < 0:
                bad = first_bad(chunk, SERVER_PHASE + got)
            got += len(chunk)
            ahead = got / a.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(min(ahead, 1.0))
    s.close()
    emit({"sent": sent, "got": got, "first_bad": bad, "ok": bad < 0})
    return 0


# ---- a reader asleep inside tcp_recvmsg_locked when a resume becomes possible -------------

TRAP_A, TRAP_B, TRAP_C = 200 * 1024, 1000, 300 * 1024


def trap_server(a: argparse.Namespace) -> int:
    """Read all but the last 5,000 TCP bytes of the first part, then one MSG_WAITALL read
    of 200,000 bytes: it takes the TCP path and sleeps in sk_wait_data, which waits for
    the TCP queue only. A resume while it sleeps would stall it and reorder the stream."""
    ls = listen(a.port)
    ls.settimeout(a.timeout)
    conn, _ = ls.accept()
    blocking_timeout(conn, 8)
    time.sleep(0.5)
    got = bytearray()
    deadline = time.monotonic() + a.timeout
    while len(got) < TRAP_A - 5000 and time.monotonic() < deadline:
        got += conn.recv(TRAP_A - 5000 - len(got))
    t = time.monotonic()
    try:
        w = conn.recv(200000, socket.MSG_WAITALL)
    except (TimeoutError, BlockingIOError):
        w = b""
    waited = time.monotonic() - t
    got += w
    total = TRAP_A + TRAP_B + TRAP_C
    try:
        while len(got) < total and time.monotonic() < deadline:
            d = conn.recv(1 << 20)
            if not d:
                break
            got += d
    except (TimeoutError, BlockingIOError):
        pass
    bad = first_bad(bytes(got), 0)
    emit(
        {
            "bytes": len(got),
            "want": total,
            "waitall_got": len(w),
            "waitall_secs": round(waited, 2),
            "first_bad": bad,
            "ok": bad < 0 and len(got) == total,
        }
    )
    return 0


def trap_client(a: argparse.Namespace) -> int:
    s = connect(a)
    off = 0
    while off < TRAP_A:  # falls back past the limit; the last part goes through TCP
        k = min(65536, TRAP_A - off)
        s.sendall(expect(off, k))
        off += k
    time.sleep(1.5)  # the reader takes all but 5,000 bytes, then sleeps in MSG_WAITALL
    s.sendall(expect(off, TRAP_B))  # the first message that may resume
    off += TRAP_B
    time.sleep(0.2)
    end = off + TRAP_C
    while off < end:
        k = min(65536, end - off)
        s.sendall(expect(off, k))
        off += k
    time.sleep(3)
    s.close()
    emit({"sent": off})
    return 0


# ---- a segment that repeats bytes its receiver already has (a partial retransmission) ------

REPEAT_BASE, REPEAT_MORE, REPEAT_TAIL = 60_000, 200, 5_000


def repeat_server(a: argparse.Namespace) -> int:
    """Send REPEAT_BASE bytes; once acknowledged, rebuild the socket with TCP_REPAIR
    `--back` bytes behind and send [BASE - back, BASE + MORE) as one segment (the receiver
    already has its first `back` bytes); on a line "tail" on stdin, REPEAT_TAIL more and a
    FIN. Prints "listening", then "sent"."""
    from eztunnel_plugin.tcprepair import rebuild_behind, wait_acked

    lsock = socket.create_server(("0.0.0.0", a.port))
    emit({"listening": a.port})
    lsock.settimeout(a.timeout)
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(expect(0, REPEAT_BASE))
    if not wait_acked(conn, a.timeout):
        raise SystemExit(f"{REPEAT_BASE} bytes not acknowledged in {a.timeout:g} s")
    conn = rebuild_behind(conn, a.back)
    conn.sendall(expect(REPEAT_BASE - a.back, a.back + REPEAT_MORE))
    emit({"sent": a.back + REPEAT_MORE})
    ready, _, _ = select.select([sys.stdin], [], [], a.timeout)
    if ready and sys.stdin.readline().strip() == "tail":
        conn.sendall(expect(REPEAT_BASE + REPEAT_MORE, REPEAT_TAIL))
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(a.timeout)
    while conn.recv(1 << 16):  # until the client closes
        pass
    return 0


def repeat_client(a: argparse.Namespace) -> int:
    """Read and check every byte; after BASE + MORE send one byte (unpaired, the socket then
    goes to TCP for good and leaves the sockhash); report what came."""
    total = REPEAT_BASE + REPEAT_MORE + REPEAT_TAIL
    s = socket.create_connection((a.host, a.port), timeout=a.timeout)
    got, sent_byte = bytearray(), False
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline and len(got) <= total:
        try:
            chunk = s.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
        if not sent_byte and len(got) >= REPEAT_BASE + REPEAT_MORE:
            s.sendall(b"x")
            sent_byte = True
    bad = first_bad(bytes(got[:total]), 0)
    out: Json = {"received": len(got), "expected": total, "bad_at": bad}
    if bad >= 0:
        out["bad"] = whence(bytes(got), bad, 0)
    emit(out)
    s.close()
    return 0


# ---- command line -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="streams.py")
    sub = ap.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("port", type=int)
    srv.add_argument("--mode", default="epoll",
                     choices=["epoll", "select", "block", "waitall", "rcvlowat", "asyncio",
                              "splice"])  # fmt: skip
    srv.add_argument("--expect", type=int, required=True)
    srv.add_argument("--rsize", type=int, default=256 * 1024)
    srv.add_argument("--rate", type=float, default=0.0, help="bytes per second (0: no limit)")
    srv.add_argument("--stall-every", type=int, default=0)
    srv.add_argument("--stall-ms", type=float, default=0.0)
    srv.add_argument("--lowat", type=int, default=1)
    srv.add_argument("--hold-ms", type=float, default=0.0)
    srv.add_argument("--probe", action="store_true", help="FIONREAD before reading")
    srv.add_argument("--reply", type=int, default=0, help="bytes to send back after EOF")
    srv.add_argument("--phase", type=int, default=0)
    srv.add_argument("--timeout", type=float, default=60.0)
    cli = sub.add_parser("client")
    cli.add_argument("host")
    cli.add_argument("port", type=int)
    cli.add_argument("--total", type=int, required=True)
    cli.add_argument("--wsize", type=int, default=256 * 1024)
    cli.add_argument("--burst", type=int, default=0)
    cli.add_argument("--pause-ms", type=float, default=0.0)
    cli.add_argument("--sendfile", action="store_true")
    cli.add_argument("--rst", action="store_true")
    cli.add_argument("--phase", type=int, default=0)
    cli.add_argument("--timeout", type=float, default=60.0)
    for name in ("chat-server", "chat-client"):
        c = sub.add_parser(name)
        if name == "chat-client":
            c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--rounds", type=int, default=10)
        c.add_argument("--burst-bytes", type=int, default=64 << 20)
        c.add_argument("--pings", type=int, default=50)
        c.add_argument("--msg", type=int, default=1024)
        c.add_argument("--timeout", type=float, default=120.0)
    for name in ("rr-server", "rr-client"):
        c = sub.add_parser(name)
        if name == "rr-client":
            c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--rounds", type=int, default=8)
        c.add_argument("--msg", type=int, default=1024)
        c.add_argument("--resp", type=int, default=4 << 20)
        c.add_argument("--rate", type=float, default=50e6)
        c.add_argument("--timeout", type=float, default=60.0)
    for name in ("mesh-server", "mesh-client"):
        c = sub.add_parser(name)
        if name == "mesh-client":
            c.add_argument("host")
        mesh.add_arguments(c)
    for name in ("trap-server", "trap-client"):
        c = sub.add_parser(name)
        if name == "trap-client":
            c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--timeout", type=float, default=30.0)
    for name in ("repeat-server", "repeat-client"):
        c = sub.add_parser(name)
        if name == "repeat-client":
            c.add_argument("host")
        c.add_argument("port", type=int)
        if name == "repeat-server":
            c.add_argument("--back", type=int, default=100, help="bytes the segment repeats")
        c.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args(argv)
    roles = {
        "server": server,
        "client": client,
        "chat-server": chat_server,
        "chat-client": chat_client,
        "rr-server": rr_server,
        "rr-client": rr_client,
        "mesh-server": mesh.server,
        "mesh-client": mesh.client,
        "trap-server": trap_server,
        "trap-client": trap_client,
        "repeat-server": repeat_server,
        "repeat-client": repeat_client,
    }
    return roles[a.role](a)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
