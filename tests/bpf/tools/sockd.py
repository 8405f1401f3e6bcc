"""A socket daemon the pairing tests drive from outside, one per network namespace.

Run as a script inside a lab netns and cgroup; it reads one JSON request per
line on stdin and answers one JSON line on stdout: {"ok": true, ...} or
{"ok": false, "error": "..."}. Sockets are named by small integer handles, and
every answer about a socket carries its SO_COOKIE, the key of the pairing table.
Only the standard library is used, so a daemon starts in a few milliseconds.
`SockD` is the test-side client.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any

SO_COOKIE = 57
IP_TRANSPARENT = 19
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCP_REPAIR_OFF_NO_WP = -1
ETH_P_ALL = 0x0003  # only "all" taps see outgoing packets
ETH_P_IP = 0x0800
TCP_FLAG_SYN = 0x02
U32 = 1 << 32
NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

Json = dict[str, Any]


def cookie_of(s: socket.socket) -> int:
    value: int = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


class Daemon:
    def __init__(self) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.next_id = 1

    def _add(self, s: socket.socket) -> int:
        sid = self.next_id
        self.next_id += 1
        self.socks[sid] = s
        return sid

    def _describe(self, sid: int) -> Json:
        s = self.socks[sid]
        return {
            "id": sid,
            "cookie": cookie_of(s),
            "local": list(s.getsockname()[:2]),
            "remote": list(s.getpeername()[:2]),
        }

    @staticmethod
    def _new(host: str, mark: int, transparent: bool) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        return s

    def op_listen(self, host: str, port: int, mark: int = 0, transparent: bool = False) -> Json:
        s = self._new(host, mark, transparent)
        s.bind((host, port))
        s.listen(64)
        return {"id": self._add(s)}

    def op_connect(
        self,
        host: str,
        port: int,
        src: str = "",
        sport: int = 0,
        mark: int = 0,
        transparent: bool = False,
        timeout: float = 5.0,
    ) -> Json:
        s = self._new(host, mark, transparent)
        try:
            if src or sport:
                s.bind((src, sport))
            s.settimeout(timeout)
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return self._describe(self._add(s))

    def op_repair_connect(
        self,
        host: str,
        port: int,
        src: str,
        sport: int,
        snd_seq: int,
        rcv_seq: int,
    ) -> Json:
        """An "established" socket with the chosen tuple and sequence numbers, made
        without sending a packet (TCP_REPAIR, as checkpoint/restore does)."""
        s = self._new(host, 0, transparent=True)  # the source need not be local
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        for queue, seq in ((TCP_SEND_QUEUE, snd_seq), (TCP_RECV_QUEUE, rcv_seq)):
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            s.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", seq % U32))
        s.bind((src, sport))
        s.connect((host, port))
        # Out of repair mode without a window probe: a normal socket from here on.
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        return self._describe(self._add(s))

    def op_pending(self, id: int) -> Json:
        readable, _, _ = select.select([self.socks[id]], [], [], 0)
        return {"pending": bool(readable)}

    def op_accept(self, id: int, timeout: float = 5.0) -> Json:
        ls = self.socks[id]
        ls.settimeout(timeout)
        conn, _ = ls.accept()
        conn.settimeout(None)
        return self._describe(self._add(conn))

    def op_send(self, id: int, data: str) -> Json:
        self.socks[id].sendall(bytes.fromhex(data))
        return {}

    def op_send_many(self, data: dict[str, str]) -> Json:
        errors: dict[str, str] = {}
        for sid, payload in data.items():
            try:
                self.socks[int(sid)].sendall(bytes.fromhex(payload))
            except OSError as e:
                errors[sid] = type(e).__name__
        return {"errors": errors}

    def op_recv_many(self, want: dict[str, int], timeout: float) -> Json:
        """Read up to n bytes per socket until all have n, hit EOF or an error, or
        the time is up; then take whatever else is already queued (extra bytes)."""
        got = {sid: bytearray() for sid in want}
        done: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            waiting = [sid for sid in want if sid not in done and (len(got[sid]) < want[sid])]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            readable, _, _ = select.select([self.socks[int(s)] for s in waiting], [], [], left)
            for sid in waiting:
                if self.socks[int(sid)] in readable:
                    self._read_some(sid, got, done)
        for sid in want:  # extra bytes beyond what was expected, already queued
            if sid not in done:
                self._read_some(sid, got, done, block=False)
        return {sid: {"data": bytes(got[sid]).hex(), "end": done.get(sid, "")} for sid in want}

    def _read_some(
        self, sid: str, got: dict[str, bytearray], done: dict[str, str], block: bool = True
    ) -> None:
        s = self.socks[int(sid)]
        try:
            chunk = s.recv(65536) if block else s.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            done[sid] = type(e).__name__
            return
        if chunk:
            got[sid] += chunk
        else:
            done[sid] = "eof"

    def op_close(self, id: int, abort: bool = True) -> Json:
        s = self.socks.pop(id)
        if abort:  # RST, no TIME_WAIT: the same tuple can be used again at once
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return {}

    def op_close_all(self, keep: list[int] | None = None) -> Json:
        for sid in [sid for sid in self.socks if sid not in (keep or [])]:
            self.op_close(sid)
        return {}

    def op_sniff_start(self, ifname: str) -> Json:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        s.bind((ifname, ETH_P_ALL))
        return {"id": self._add(s)}

    def op_handshake_seqs(self, id: int, client_port: int, server_port: int) -> Json:
        """ISNs of the last SYN (client) and SYN-ACK (server) seen for the ports."""
        s = self.socks[id]
        isn: dict[str, int] = {}
        while select.select([s], [], [], 0)[0]:
            pkt, addr = s.recvfrom(65536)
            if addr[1] != ETH_P_IP or len(pkt) < 40 or pkt[9] != socket.IPPROTO_TCP:
                continue
            tcp = pkt[(pkt[0] & 0xF) * 4 :]
            sport, dport, seq = struct.unpack_from("!HHI", tcp)
            flags = tcp[13]
            if flags & TCP_FLAG_SYN and (sport, dport) == (client_port, server_port):
                isn["client"] = seq
            elif flags & TCP_FLAG_SYN and (sport, dport) == (server_port, client_port):
                isn["server"] = seq
        return isn

    @staticmethod
    def op_ct_flush() -> Json:
        """Flush this netns's IPv4 conntrack table (ctnetlink delete without a tuple)."""
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as nl:
            body = struct.pack("=BBH", socket.AF_INET, 0, 0)  # struct nfgenmsg
            kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
            head = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
            nl.send(head + body)
            err = struct.unpack_from("=i", nl.recv(4096), 16)[0]  # struct nlmsgerr
        if err:
            raise OSError(-err, os.strerror(-err))
        return {}

    def handle(self, req: Json) -> Json:
        op = getattr(self, f"op_{req.pop('op')}")
        try:
            result: Json = op(**req)
        except OSError as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": e.errno}
        except Exception as e:  # a bad request is an answer, never a dead daemon
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": None}
        return {"ok": True, **result}


def main() -> None:
    daemon = Daemon()
    for line in sys.stdin:
        answer = daemon.handle(json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class SockD:
    """Test side: one request at a time, or `submit` to several daemons then `result`."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.name = name
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout

    def submit(self, op: str, **args: Any) -> None:
        self._stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self._stdin.flush()

    def result(self, wait: float = 30.0) -> Json:
        readable, _, _ = select.select([self._stdout], [], [], wait)
        line = self._stdout.readline() if readable else b""
        if not line:
            raise AssertionError(f"sockd in {self.name} gave no answer (rc={self.proc.poll()})")
        answer: Json = json.loads(line)
        return answer

    def call(self, op: str, *, wait: float = 30.0, **args: Any) -> Json:
        """One request; a failed operation is an AssertionError naming it."""
        answer = self.try_call(op, wait=wait, **args)
        if not answer["ok"]:
            raise AssertionError(f"sockd {op} {args} in {self.name}: {answer['error']}")
        return answer

    def try_call(self, op: str, *, wait: float = 30.0, **args: Any) -> Json:
        self.submit(op, **args)
        return self.result(wait)


if __name__ == "__main__":
    main()
