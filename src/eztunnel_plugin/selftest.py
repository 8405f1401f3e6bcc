"""The kernel self-test: does splicing work on this kernel, and with or without the SK_SKB
workaround? The agent runs it at every start, before it attaches anything; `eztunnel-plugin
selftest` runs it on demand.

It loads the object the agent is about to attach, attaches it to a throwaway cgroup of the
agent's own (never the root cgroup) and, in a network namespace of its own, checks what
applications rely on: a spliced pair delivers every byte in order; edge-triggered epoll
reports EPOLLIN and EPOLLOUT under backpressure within READY_WITHIN_S (a writer that fills
its peer, a reader that drains it, through the redirect and the TCP fallback); sendfile into
a spliced socket; half-close (SHUT_WR reaches the peer as EOF, the other direction goes on);
FIONREAD counts what is readable, redirected bytes and TCP bytes of a socket in the
sockhash alike (docs/kernel.md, "Lost epoll wakeups", "Readers that bypass the redirect
queue"); a writer towards a reader that never reads is accepted no more than plain TCP's
buffers, the backlog limit and one message (bounded memory: neither the redirect queue nor
the verdict program escapes TCP's flow control); a segment that repeats bytes the
receiver has reaches its reader once (docs/kernel.md, "Repeated bytes on the verdict
path"; it rebuilds the sender with TCP_REPAIR, which needs CAP_NET_ADMIN, as the agent's
BPF programs do). Nothing is pinned: the programs, links and
maps live on the test process's fds and go when it exits. Its only enrolled address is a
random 127.x.y.z, so no other socket is ever in scope of the test programs, and pods are
never in its cgroup.

The decision, one of three (`decide`):
- ATTACH: every check passed without the workaround, on a kernel not in LOST_WAKEUP.
- ATTACH_WORKAROUND: every check passed with the no-op SK_SKB verdict attached, and the
  kernel is in LOST_WAKEUP (or its version is not recognised) or a check failed without it.
- NO_SPLICE: a check failed with the workaround too, or the test could not run. The agent
  then attaches nothing and pods stay on plain TCP.

The checks run in a child process (`python -m eztunnel_plugin.selftest`), like the loader:
it changes its own network namespace and cgroup, and libbpf never takes memory in the
long-running agent. The parent makes and removes the throwaway cgroup on every path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import platform
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from eztunnel_plugin import log, tcprepair
from eztunnel_plugin.api.view import SelftestCheck, SelftestStatus
from eztunnel_plugin.bpf import layout, maps, paths, syscalls
from eztunnel_plugin.errors import CheckFailed, DataplaneError, LoadError

# ---- the kernel table -------------------------------------------------------------------

# Kernels carrying commit 929e30f93125, which can lose the receive readiness (and FIONREAD)
# of sockets in a sockhash without an SK_SKB verdict program: the first affected release
# of each stable series, and every release from LOST_WAKEUP_ALL_FROM on.
LOST_WAKEUP: Final = ((6, 6, 128), (6, 12, 75), (6, 18, 14))
LOST_WAKEUP_ALL_FROM: Final = (6, 19)

ATTACH: Final = "attach"
ATTACH_WORKAROUND: Final = "attach_with_workaround"
NO_SPLICE: Final = "no_splice"

PLAIN: Final = "plain"  # sk_msg + sockops, as attached without the workaround
VERDICT: Final = "skb_verdict"  # ... plus the no-op SK_SKB stream verdict
CHECKS: Final = (
    "splice",
    "epoll",
    "sendfile",
    "half_close",
    "fionread",
    "unread_bounded",
    "repeated_bytes",
)

READY_WITHIN_S: Final = 1.0  # the lost-wakeup bug stalls readers for 20-80 s
CHILD_TIMEOUT_S: Final = 20.0  # the child's checks are bounded well below this
CGROUP_PREFIX: Final = "eztunnel-selftest-"
CHILD_MODULE: Final = "eztunnel_plugin.selftest"

_log = log.get(__name__)


def kernel_version(release: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a kernel release string (`6.18.44-fc-v1098`), or None."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def lost_wakeup_listed(release: str) -> bool | None:
    """Whether LOST_WAKEUP lists this kernel; None when its version is not recognised."""
    version = kernel_version(release)
    if version is None:
        return None
    if version[:2] >= LOST_WAKEUP_ALL_FROM:
        return True
    return any(version[:2] == first[:2] and version >= first for first in LOST_WAKEUP)


def check_name(check: str, variant: str) -> str:
    """Unique per variant: `epoll/plain`, `epoll/skb_verdict`."""
    return f"{check}/{variant}"


# ---- the decision -----------------------------------------------------------------------


def _failed(checks: Sequence[SelftestCheck]) -> list[SelftestCheck]:
    return [c for c in checks if not c.passed]


def _passed(checks: Sequence[SelftestCheck] | None) -> bool:
    return checks is not None and len(checks) == len(CHECKS) and not _failed(checks)


def _summary(checks: Sequence[SelftestCheck]) -> str:
    return "; ".join(f"{c.name.split('/')[0]}: {c.detail}" for c in _failed(checks))


def decide(
    release: str,
    results: Mapping[str, Sequence[SelftestCheck]],
    error: str = "",
    allow_workaround: bool = True,
) -> tuple[str, str]:
    """(decision, reason) from the checks of each variant run (PLAIN, VERDICT).
    allow_workaround=False (the agent's --refuse-workaround) turns ATTACH_WORKAROUND into
    NO_SPLICE."""
    if error:
        return NO_SPLICE, f"the self-test could not run: {error}"
    listed = lost_wakeup_listed(release)
    plain, verdict = results.get(PLAIN), results.get(VERDICT)
    if listed is False and _passed(plain):
        return ATTACH, "every check passed without the SK_SKB workaround"
    why = {
        True: f"kernel {release} is known to lose epoll wakeups without the SK_SKB workaround",
        None: f"kernel version {release!r} is not recognised",
        False: f"without the SK_SKB workaround: {_summary(plain or ())}",
    }[listed]
    if _passed(verdict):
        if not allow_workaround:
            return NO_SPLICE, (
                f"{why}; every check passed with it, but --refuse-workaround refuses it"
            )
        return ATTACH_WORKAROUND, f"{why}; every check passed with it"
    if verdict is None:
        return NO_SPLICE, f"{why}; the checks with the workaround did not run"
    return NO_SPLICE, f"{why}; with the workaround: {_summary(verdict)}"


def variants_for(release: str) -> list[str]:
    """What to run: PLAIN, then VERDICT if PLAIN fails (`?`: only then), or both on a listed
    or unrecognised kernel (the plain results are then for the record)."""
    return [PLAIN, VERDICT] if lost_wakeup_listed(release) is not False else [PLAIN, f"{VERDICT}?"]


# ---- the entry point (the parent) ---------------------------------------------------------


def run(
    obj: Path | None = None,
    *,
    allow_workaround: bool,
    kernel: str | None = None,
    inject: Sequence[str] = (),
    timeout: float = CHILD_TIMEOUT_S,
) -> SelftestStatus:
    """Run the self-test against `obj` (default: the packaged object) in a child process and
    decide. Never raises for what it finds: a test that cannot run decides NO_SPLICE.

    kernel: decide as if the running kernel had this release (tests). inject: checks to
    report failed without running them (`name` or `name/variant`; tests). allow_workaround:
    see decide(); no default, so that no caller gets the workaround by forgetting it."""
    release = kernel or platform.release()
    started = time.monotonic()
    results: dict[str, list[SelftestCheck]] = {}
    environment, error = "", ""
    try:
        obj = obj or paths.default_object()
        with _throwaway_cgroup() as (cgroup, join):
            environment, results = _run_child(
                obj, cgroup, join, variants_for(release), inject, timeout
            )
    except (DataplaneError, OSError) as e:
        error = str(e)
    decision, reason = decide(release, results, error, allow_workaround)
    checks = tuple(c for v in (PLAIN, VERDICT) for c in results.get(v, []))
    status = SelftestStatus(
        decision=decision,
        reason=reason,
        checks=checks,
        kernel=release,
        kernel_listed=lost_wakeup_listed(release) is True,
        environment=environment,
        duration_s=round(time.monotonic() - started, 3),
    )
    return status


def log_outcome(status: SelftestStatus) -> None:
    failed = [c.name for c in status.checks if not c.passed]
    fields = {
        "decision": status.decision,
        "reason": status.reason,
        "kernel": status.kernel,
        "failed": failed,
        "environment": status.environment,
        "duration_s": status.duration_s,
    }
    if status.decision == NO_SPLICE:
        _log.error("selftest.no_splice", **fields)
    else:
        _log.info("selftest.decided", **fields)


def _run_child(
    obj: Path,
    cgroup: Path,
    join: bool,
    variants: list[str],
    inject: Sequence[str],
    timeout: float,
) -> tuple[str, dict[str, list[SelftestCheck]]]:
    request = Request(str(obj), str(cgroup), join, variants, list(inject))
    argv = [sys.executable, "-m", CHILD_MODULE, json.dumps(dataclasses.asdict(request))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its pid
        proc.communicate(timeout=10)
        raise DataplaneError(f"its process did not finish in {timeout:g} s") from None
    lines = out.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if "error" in reply:
        raise DataplaneError(str(reply["error"]))
    if "results" not in reply:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise DataplaneError(f"its process failed (exit {proc.returncode}): {last}")
    results = {
        variant: [SelftestCheck(c["name"], bool(c["passed"]), str(c["detail"])) for c in checks]
        for variant, checks in reply["results"].items()
    }
    return str(reply.get("environment", "")), results


# ---- the throwaway cgroup (the parent makes and removes it) ------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def own_cgroup(proc_cgroup: str | None = None, mountinfo: str | None = None) -> Path:
    """This process's cgroup v2 directory, through a cgroup2 mount that shows it."""
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    rel = next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), None)
    if rel is None:
        raise DataplaneError("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")
    info = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    for line in info.splitlines():
        fields, _, rest = line.partition(" - ")
        if rest.split(" ", 1)[0] != "cgroup2":
            continue
        root, point = (_unescape(f) for f in fields.split()[3:5])
        if root in ("/", rel) or rel.startswith(root.rstrip("/") + "/"):
            inside = rel[len(root) :] if root != "/" else rel
            return Path(point) / inside.lstrip("/")
    raise DataplaneError(f"no cgroup2 mount shows this process's cgroup {rel}")


def is_root_cgroup(path: Path) -> bool:
    """The root of a cgroup v2 hierarchy has no cgroup.type (every other cgroup has one)."""
    return not (path / "cgroup.type").exists()


@contextlib.contextmanager
def _throwaway_cgroup(own: Path | None = None) -> Iterator[tuple[Path, bool]]:
    """(cgroup, join): a new cgroup under this process's own, which the child joins and this
    removes on every path. Where cgroupfs is read-only (a container), the container's own
    cgroup instead (never a root cgroup): only the agent's processes are in it, and the test
    programs only ever act on the child's 127.x.y.z sockets."""
    own = own or own_cgroup()
    _sweep_stale(own)
    path = own / f"{CGROUP_PREFIX}{os.getpid()}-{os.urandom(3).hex()}"
    try:
        path.mkdir()
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        if is_root_cgroup(own):
            raise DataplaneError(
                f"cannot make a cgroup under {own} ({os.strerror(e.errno)}), and that is a "
                "root cgroup, which the self-test never attaches to"
            ) from None
        yield own, False
        return
    try:
        yield path, True
    finally:
        _rmdir_cgroup(path)


def _sweep_stale(own: Path) -> None:
    """Throwaway cgroups of a process killed before it removed them (no such pid any more):
    removed, if empty (the kernel refuses to remove a cgroup with a process in it)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(own):
            m = re.fullmatch(rf"{CGROUP_PREFIX}(\d+)-[0-9a-f]+", entry.name)
            if m and entry.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)


def _rmdir_cgroup(path: Path, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:  # EBUSY while the exited child's task lingers a moment
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                _log.warning("selftest.cgroup_left", cgroup=str(path), error=str(e))
                return
            time.sleep(0.02)


# ---- the child: the environment ----------------------------------------------------------

CLONE_NEWNET: Final = 0x40000000
SO_COOKIE: Final = 57
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
KIB: Final = 1024
MIB: Final = 1 << 20

# unread_bounded: a small backlog limit keeps the check short; the writer stops at
# UNREAD_CAP times the bound (so the check can fail) or after UNREAD_WITHIN_S, and counts
# as blocked once no EPOLLOUT came for UNREAD_SETTLE_S.
UNREAD_LIMIT: Final = 256 * KIB
UNREAD_MSG: Final = 64 * KIB
UNREAD_SLACK: Final = MIB
UNREAD_CAP: Final = 4
UNREAD_WITHIN_S: Final = 0.3
# repeated_bytes: BASE bytes, then a segment from BACK bytes before their end to MORE after
# it; BACK is over 4095, the most one bpf_skb_adjust_room() call cuts in an sk_skb program.
REPEAT_BASE: Final = 64 * KIB
REPEAT_BACK: Final = 5000
REPEAT_MORE: Final = 200
PLAIN_ADDR: Final = "127.0.0.1"  # never enrolled: the repeat's sender stays unpaired
UNREAD_SETTLE_S: Final = 0.05


def _private_netns() -> bool:
    """A network namespace of this process's own, with loopback up; False where it may not
    make one (no CAP_SYS_ADMIN, as in the chart; a seccomp profile that refuses unshare):
    the test then stays on loopback in the netns it is in, on its random 127.x.y.z."""
    if syscalls.libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack_from("16sH", raw)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    return True


def _cookie(s: socket.socket) -> int:
    return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def _fionread(s: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0\0\0\0"))[0])


class Plane:
    """The loaded object's maps and programs (fds only: nothing pinned), attached to the
    throwaway cgroup one variant at a time."""

    def __init__(self, obj: Path, cgroup: Path) -> None:
        try:
            self.loaded = syscalls.load_object(obj)
        except LoadError as e:
            raise DataplaneError(f"loading {obj} failed: {e}") from e
        self.cgroup = cgroup
        self.links: list[int] = []
        m = self.loaded.map_fds
        try:
            self.config = maps.ConfigMap(m["ez_config"])
            self.endpoints = maps.EndpointMap(m["ez_endpoints"])
            self.counters = maps.CounterMap(m["ez_counters"])
            self.socks_fd = m["ez_socks"]
            self.sockinfo_fd = m["ez_sockinfo"]
            self.progs = {n: self.loaded.prog_fds[n] for n in ("ez_sockops", "ez_msg")}
            self.verdict = self.loaded.prog_fds.get("ez_skb_verdict")
        except KeyError as e:
            self.loaded.close()
            raise DataplaneError(f"{obj} is not an eztunnel object: it has no {e}") from None

    def attach(self, variant: str) -> None:
        """As the loader does: the map programs first, then sockops."""
        self.links.append(
            syscalls.link_create(self.progs["ez_msg"], self.socks_fd, syscalls.SK_MSG_VERDICT)
        )
        if variant == VERDICT:
            if self.verdict is None:
                raise DataplaneError("the object has no ez_skb_verdict program")
            self.links.append(
                syscalls.link_create(self.verdict, self.socks_fd, syscalls.SK_SKB_STREAM_VERDICT)
            )
        cg = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.links.append(
                syscalls.link_create(self.progs["ez_sockops"], cg, syscalls.CGROUP_SOCK_OPS)
            )
        finally:
            os.close(cg)

    def detach(self) -> None:
        """Closing an unpinned link's last fd detaches it."""
        for fd in reversed(self.links):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links.clear()

    def sock_state(self, cookie: int) -> layout.SockInfo | None:
        raw = syscalls.map_lookup(
            self.sockinfo_fd, struct.pack("=Q", cookie), ctypes.sizeof(layout.SockInfo)
        )
        return None if raw is None else layout.SockInfo.from_buffer_copy(raw)

    def close(self) -> None:
        self.detach()
        self.loaded.close()


class Checks:
    """The checks, each on spliced pairs of its own between two sockets bound to `addr`
    (an enrolled 127.x.y.z: the same-netns rule pairs them)."""

    def __init__(self, plane: Plane, addr: str) -> None:
        self.plane = plane
        self.addr = addr

    # ---- helpers ----------------------------------------------------------------------

    def pair(
        self, bufsize: int = 0, listen_on: str | None = None
    ) -> tuple[socket.socket, socket.socket]:
        """(client, accepted server socket), blocking with a timeout, buffers set if asked;
        the client on the enrolled address, the listener there too unless `listen_on`."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
            lst.bind((listen_on or self.addr, 0))
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                for s in (lst, client) if bufsize else ():
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
                lst.listen(4)
                lst.settimeout(READY_WITHIN_S)
                client.settimeout(READY_WITHIN_S)
                client.bind((self.addr, 0))
                client.connect(lst.getsockname())
                for _ in range(4):  # only our own client is expected on this address
                    server, peer = lst.accept()
                    if peer == client.getsockname():
                        break
                    server.close()
                else:
                    raise CheckFailed("another process connected to the test listener")
            except BaseException:
                client.close()
                raise
        server.settimeout(READY_WITHIN_S)
        return client, server

    def spliced_pair(self, bufsize: int = 0) -> tuple[socket.socket, socket.socket]:
        before = self.plane.counters.read()
        client, server = self.pair(bufsize)
        a, b = _cookie(client), _cookie(server)
        ia, ib = self.plane.sock_state(a), self.plane.sock_state(b)
        ok = ia is not None and ib is not None and ia.peer_cookie == b and ib.peer_cookie == a
        if ok and ia is not None and ib is not None:
            ok = ia.state == ib.state == layout.SockState.PAIRED
        if not ok:
            client.close()
            server.close()
            after = self.plane.counters.read()
            why = sorted(k[3:] for k, v in after.items() if k.startswith("np_") and v > before[k])
            raise CheckFailed(f"the pair was not spliced (not paired: {', '.join(why) or '?'})")
        return client, server

    def redirected(self, before: Mapping[str, int], at_least: int) -> None:
        got = self.plane.counters.read()["bytes_redirected"] - before["bytes_redirected"]
        if got < at_least:
            raise CheckFailed(f"{got} bytes went through the redirect, expected {at_least}")

    @staticmethod
    def receive(s: socket.socket, size: int, out: list[bytes] | None = None) -> tuple[bytes, bool]:
        """Up to `size` bytes: all of them, or what came before EOF, an error or a wait of
        READY_WITHIN_S; and whether EOF came. Also appended to `out` (for a thread)."""
        chunks: list[bytes] = []
        got, eof = 0, False
        deadline = time.monotonic() + READY_WITHIN_S * 4
        with contextlib.suppress(OSError):
            while got < size and time.monotonic() < deadline:
                chunk = s.recv(min(256 * KIB, size - got))
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
                got += len(chunk)
        data = b"".join(chunks)
        if out is not None:
            out.append(data)
        return data, eof

    def transfer(
        self,
        src: socket.socket,
        dst: socket.socket,
        data: bytes,
        send: Callable[[socket.socket, bytes], None] = socket.socket.sendall,
    ) -> None:
        """Send `data` from src (sendall, or `send`) while a thread reads it at dst."""
        out: list[bytes] = []
        reader = threading.Thread(target=self.receive, args=(dst, len(data), out), daemon=True)
        reader.start()
        try:
            send(src, data)
        finally:
            reader.join(READY_WITHIN_S * 5)
        got = out[0] if out else b""
        if len(got) != len(data):
            raise CheckFailed(f"{len(got)} of {len(data)} bytes arrived")
        if got != data:
            raise CheckFailed(f"{len(data)} bytes arrived, but not the bytes sent")

    # ---- the checks -------------------------------------------------------------------

    def splice(self) -> None:
        """A spliced pair's first message goes through the redirect; then 1 MiB each way
        arrives intact (partly through TCP, as backpressure decides)."""
        client, server = self.spliced_pair()
        with client, server:
            before = self.plane.counters.read()
            self.transfer(client, server, os.urandom(16 * KIB))
            self.redirected(before, 16 * KIB)  # one message always fits an empty queue
            self.transfer(client, server, os.urandom(MIB))
            self.transfer(server, client, os.urandom(MIB))

    def sendfile(self) -> None:
        """sendfile(2) from a file into a spliced socket: intact, through the redirect."""
        data = os.urandom(512 * KIB)
        fd = os.memfd_create("eztunnel-selftest")
        try:
            os.write(fd, data)
            client, server = self.spliced_pair()
            with client, server, open(fd, "rb", closefd=False) as f:
                before = self.plane.counters.read()

                def send(s: socket.socket, _: bytes) -> None:
                    sent = s.sendfile(f, 0, len(data))
                    if sent != len(data):
                        raise CheckFailed(f"sendfile sent {sent} of {len(data)} bytes")

                self.transfer(client, server, data, send)
                self.redirected(before, 1)
        finally:
            os.close(fd)

    def half_close(self) -> None:
        """SHUT_WR arrives as EOF right after the last byte; the other direction goes on."""
        client, server = self.spliced_pair()
        with client, server:
            up, down = os.urandom(64 * KIB), os.urandom(64 * KIB)
            client.sendall(up)
            client.shutdown(socket.SHUT_WR)
            got, eof = self.receive(server, len(up) + 1)  # one more: what follows is EOF
            if got != up or not eof:
                raise CheckFailed(
                    f"{len(got)} of {len(up)} bytes{'' if got == up[: len(got)] else ' (wrong)'}"
                    f", then {'EOF' if eof else 'no EOF'} after SHUT_WR"
                )
            server.sendall(down)
            back, _ = self.receive(client, len(down))
            if back != down:
                raise CheckFailed(f"after SHUT_WR, {len(back)} of {len(down)} bytes came back")
            server.shutdown(socket.SHUT_WR)
            if self.receive(client, 1) != (b"", True):
                raise CheckFailed("no EOF after the second SHUT_WR")

    def epoll(self, rounds: int = 4, fill_max: int = 32 * MIB) -> None:
        """Edge-triggered epoll, as Go's netpoller uses it, under backpressure: the writer
        writes until EAGAIN (the redirect falls back to TCP at a small backlog limit), then
        the reader must get EPOLLIN, drain everything, and the writer must get EPOLLOUT,
        each within READY_WITHIN_S. Every byte is checked."""
        self.plane.config.set_backlog_limit(64 * KIB)
        client, server = self.spliced_pair(bufsize=64 * KIB)
        stream = os.urandom(8 * MIB)
        written = read = 0
        with client, server, select.epoll() as wep, select.epoll() as rep:
            client.setblocking(False)
            server.setblocking(False)
            wep.register(client.fileno(), select.EPOLLOUT | select.EPOLLET)
            rep.register(server.fileno(), select.EPOLLIN | select.EPOLLET)
            wep.poll(0)  # the edge of registration: writable from the start
            for n in range(rounds):
                start = written
                while True:  # fill: the peer holds all it takes, then EAGAIN
                    if written - start > fill_max:
                        raise CheckFailed(
                            f"no backpressure: the writer never got EAGAIN in {fill_max >> 20} MiB"
                        )
                    pos = written % len(stream)
                    try:
                        written += client.send(stream[pos : pos + 64 * KIB])
                    except BlockingIOError:
                        break
                deadline = time.monotonic() + 5 * READY_WITHIN_S
                while read < written:  # drain: every byte written so far, edge by edge
                    if time.monotonic() > deadline:
                        raise CheckFailed(f"round {n}: {read} of {written} bytes in 5 s")
                    if not rep.poll(READY_WITHIN_S):
                        what = f"EPOLLIN (round {n}, {read} of {written} bytes read)"
                        raise CheckFailed(self._lost(server, select.POLLIN, what))
                    while True:  # edge-triggered: read until EAGAIN
                        try:
                            chunk = server.recv(256 * KIB)
                        except BlockingIOError:
                            break
                        if not chunk:
                            raise CheckFailed("EOF before the writer closed")
                        self._verify(stream, read, chunk)
                        read += len(chunk)
                if not wep.poll(READY_WITHIN_S):
                    raise CheckFailed(self._lost(client, select.POLLOUT, f"EPOLLOUT (round {n})"))

    @staticmethod
    def _verify(stream: bytes, at: int, chunk: bytes) -> None:
        pos = at % len(stream)
        want = stream[pos : pos + len(chunk)]
        want += stream[: len(chunk) - len(want)]  # the stream repeats
        if chunk != want:
            raise CheckFailed(f"bytes {at}..{at + len(chunk)} differ from those sent")

    @staticmethod
    def _lost(s: socket.socket, event: int, what: str) -> str:
        """Why an edge did not come: lost (level-triggered poll sees it) or never due."""
        p = select.poll()
        p.register(s.fileno(), event)
        if p.poll(0):
            return f"lost {what}: the socket was ready, no wakeup in {READY_WITHIN_S:g} s"
        return f"no {what} in {READY_WITHIN_S:g} s: the socket never became ready"

    def fionread(self) -> None:
        """FIONREAD counts redirected bytes, and, after the kill switch sends a spliced pair
        to TCP, the TCP bytes of a socket still in the sockhash (with their EPOLLIN)."""
        client, server = self.spliced_pair()
        with client, server, select.epoll() as ep:
            size = 16 * KIB  # one segment through TCP on loopback: all there at its EPOLLIN
            client.sendall(os.urandom(size))
            if (n := _fionread(server)) != size:
                raise CheckFailed(f"FIONREAD says {n} of {size} redirected bytes")
            self.receive(server, size)
            ep.register(server.fileno(), select.EPOLLIN | select.EPOLLET)
            self.plane.config.set_enabled(False)
            try:
                client.sendall(os.urandom(size))
                if not ep.poll(READY_WITHIN_S):
                    raise CheckFailed(self._lost(server, select.POLLIN, "EPOLLIN for TCP bytes"))
                if (n := _fionread(server)) != size:
                    raise CheckFailed(f"FIONREAD says {n} of {size} bytes that came through TCP")
            finally:
                self.plane.config.set_enabled(True)

    def unread_bounded(self, bound: int | None = None) -> None:
        """A writer towards a reader that never reads gets accepted no more than plain TCP
        holds (the reader's receive and the writer's send buffer), plus the backlog limit,
        plus one message: the redirect queue, and the verdict program's receive path,
        leave TCP's flow control in charge (docs/kernel.md, "No backpressure on ingress
        redirect"). Else every such connection holds kernel memory without bound.

        bound: judge against this instead of the computed bound (tests); the writer still
        stops where the computed one puts it."""
        limit = UNREAD_LIMIT
        self.plane.config.set_backlog_limit(limit)
        client, server = self.spliced_pair()
        with client, server, select.epoll() as wep:
            client.setblocking(False)
            wep.register(client.fileno(), select.EPOLLOUT)
            before = self.plane.counters.read()
            chunk = memoryview(bytes(UNREAD_MSG))
            rcv = snd = accepted = 0
            blocked = False

            def limits() -> int:
                """The bound: the largest buffers seen; a build without resume lets the
                queue grow to the reader's receive buffer (redirect_room)."""
                nonlocal rcv, snd
                rcv = max(rcv, server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
                snd = max(snd, client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
                return rcv + snd + max(limit, rcv) + UNREAD_MSG + UNREAD_SLACK

            computed = limits()
            started = time.monotonic()
            deadline = started + UNREAD_WITHIN_S
            while accepted <= UNREAD_CAP * computed and time.monotonic() < deadline:
                try:
                    accepted += client.send(chunk)
                except BlockingIOError:
                    computed = limits()  # buffers grow as TCP tunes them
                    if not wep.poll(UNREAD_SETTLE_S):
                        blocked = True
                        break
            elapsed = time.monotonic() - started
            computed = limits()
            after = self.plane.counters.read()
        redirected = after["bytes_redirected"] - before["bytes_redirected"]
        fallbacks = after["backlog_fallbacks"] - before["backlog_fallbacks"]
        judged = computed if bound is None else bound
        how = (
            f"{accepted} bytes accepted, bound {judged} ("
            + ("" if bound is None else f"given; computed {computed}: ")
            + f"buffers {rcv} + {snd}, queue {max(limit, rcv)}, message {UNREAD_MSG}, slack"
            f" {UNREAD_SLACK}); {redirected} bytes redirected, {fallbacks} fallbacks to TCP,"
            f" the writer {'blocked' if blocked else 'not blocked'} after {elapsed:.2f} s"
        )
        if accepted > judged:
            raise CheckFailed(f"a reader that never reads is not bounded: {how}")
        if redirected < UNREAD_MSG:  # else only plain TCP was measured
            raise CheckFailed(f"the direction was not spliced before the writer blocked: {how}")

    def repeated_bytes(self) -> None:
        """A segment that repeats bytes its receiver already has (a retransmission that
        starts before the receiver's rcv_nxt) reaches the reader once. TCP queues such a
        segment whole; the SK_SKB verdict gets it whole from the kernel and must cut the
        repeat (docs/kernel.md, "Repeated bytes on the verdict path"). The receiver is a
        connect() socket of the enrolled address whose peer is on a plain one: registered,
        in the sockhash, never paired, so its bytes come through TCP."""
        data = os.urandom(REPEAT_BASE + REPEAT_MORE)
        client, server = self.pair(listen_on=PLAIN_ADDR)
        with client, contextlib.ExitStack() as stack:
            stack.callback(server.close)  # the socket rebuild_behind did not replace, if so
            if self.plane.sock_state(_cookie(client)) is None:
                raise CheckFailed("the receiving socket was not registered")
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.sendall(data[:REPEAT_BASE])
            if not tcprepair.wait_acked(server, READY_WITHIN_S):
                raise CheckFailed(f"{REPEAT_BASE} bytes not acknowledged in {READY_WITHIN_S:g} s")
            behind = tcprepair.rebuild_behind(server, REPEAT_BACK)
            stack.enter_context(behind)
            behind.sendall(data[REPEAT_BASE - REPEAT_BACK :])  # one segment
            behind.shutdown(socket.SHUT_WR)
            got, eof = self.receive(client, len(data) + REPEAT_BACK + 1)
        if got == data and eof:
            return
        n = min(len(got), len(data))
        at = next((i for i in range(n) if got[i] != data[i]), n)
        raise CheckFailed(
            f"{len(got)} bytes for {len(data)} sent, wrong from byte {at}, "
            f"{'' if eof else 'no '}EOF (the segment repeated bytes "
            f"{REPEAT_BASE - REPEAT_BACK}..{REPEAT_BASE})"
        )


def _run_variant(plane: Plane, addr: str, variant: str, inject: set[str]) -> list[SelftestCheck]:
    checks = Checks(plane, addr)
    out = []
    plane.attach(variant)
    try:
        for name in CHECKS:
            full = check_name(name, variant)
            if name in inject or full in inject:
                out.append(SelftestCheck(full, False, "failure injected"))
                continue
            plane.config.reset(True)  # each check starts from the same config
            try:
                getattr(checks, name)()
                out.append(SelftestCheck(full, True, ""))
            except CheckFailed as e:
                out.append(SelftestCheck(full, False, str(e)))
            except OSError as e:  # a socket call failed: as much a finding
                out.append(SelftestCheck(full, False, f"{type(e).__name__}: {e}"))
    finally:
        plane.detach()
    return out


@dataclass(frozen=True)
class Request:
    """What the parent asks of the child (one JSON argument)."""

    object: str
    cgroup: str
    join: bool  # move into `cgroup` (a throwaway one), or already in it (the container's)
    variants: list[str]  # in order; `name?`: only if a variant before it failed a check
    inject: list[str]


def _child(req: Request) -> dict[str, object]:
    cgroup = Path(req.cgroup)
    if req.join:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    plane = Plane(Path(req.object), cgroup)
    results: dict[str, list[SelftestCheck]] = {}
    try:
        plane.config.reset(True)
        where = "a private netns" if _private_netns() else "the agent's netns, on loopback"
        rnd = os.urandom(3)  # not secrets: it loads libcrypto (hashlib) into the agent
        octets = (rnd[0] % 254 + 1, rnd[1], rnd[2] % 254 + 1)
        addr = "127.{}.{}.{}".format(*octets)
        plane.endpoints.put(addr, layout.EP_ENROLLED)
        for want in req.variants:
            variant = want.rstrip("?")
            if want.endswith("?") and not any(_failed(r) for r in results.values()):
                continue
            results[variant] = _run_variant(plane, addr, variant, set(req.inject))
    finally:
        plane.close()
    return {
        "environment": f"{where} ({addr}), cgroup {cgroup}",
        "results": {v: [dataclasses.asdict(c) for c in r] for v, r in results.items()},
    }


def _child_main(argv: list[str]) -> int:
    log.configure("console", "warning")
    try:
        reply = _child(Request(**json.loads(argv[0])))
    except (DataplaneError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(reply))
    return 0


# ---- how the results read (the `selftest` command, and `status`) ---------------------------


class CheckLike(Protocol):
    """A check's result: view.SelftestCheck, or the inspection API's message."""

    @property
    def name(self) -> str: ...

    @property
    def passed(self) -> bool: ...

    @property
    def detail(self) -> str: ...


def result_rows(checks: Iterable[CheckLike]) -> list[tuple[str, str, str]]:
    """(check, without the workaround, with it): `pass`, `FAIL: why`, or `-` (not run)."""
    by = {c.name: c for c in checks}

    def cell(name: str) -> str:
        c = by.get(name)
        return "-" if c is None else "pass" if c.passed else f"FAIL: {c.detail}"

    return [(n, cell(check_name(n, PLAIN)), cell(check_name(n, VERDICT))) for n in CHECKS]


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
