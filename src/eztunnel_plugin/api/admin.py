"""The admin socket: `eztunnel.v1.Admin` (state changes), root only, every caller identified.

gRPC Python cannot tell who is at the other end of a unix socket: `context.peer()`
is just "unix:". So the public socket is served by a small relay. It accepts a
connection, reads the caller's credentials from the kernel (SO_PEERCRED), connects
to the real gRPC server on a private socket from a client socket bound to a path
of its own, and relays bytes both ways. The gRPC server sees that path as the
peer and maps it back to the credentials. A caller it cannot identify, or that is
not root, changes nothing.

On disk: `<dir>/admin.sock` (0600) in `<dir>` (0700), and `<dir>/.admin.sock.d/`
(0700) with the gRPC server's socket and the relay's client paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from eztunnel_plugin import log
from eztunnel_plugin.api.view import AdminView
from eztunnel_plugin.errors import AdminSocketError
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

DEFAULT_SOCKET = Path("/var/run/eztunnel/admin.sock")
SERVICE = "eztunnel.v1.Admin"
MAX_CONNECTIONS = 64
CONNECT_TIMEOUT_S = 5.0
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, without its NUL
_CLIENT_NAME_MAX = len("c") + 12  # the relay's client paths: c1, c2, ...

_log = log.get(__name__)


@dataclass(frozen=True)
class Caller:
    """Who is at the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int  # 0 when the caller is outside the agent's pid namespace
    uid: int
    gid: int

    def comm(self) -> str:
        """The caller's command name, if it still runs (for the log only)."""
        try:
            return Path(f"/proc/{self.pid}/comm").read_text().strip() if self.pid else ""
        except OSError:
            return ""


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid, uid, gid)


def private_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.d"


def path_problem(path: Path) -> str | None:
    """Why `path` can't be the admin socket, or None."""
    text = str(path)
    if not _SAFE_PATH.fullmatch(text):
        # The relay's paths come back from gRPC as peer strings: keep them plain.
        return f"{text!r} must be an absolute path of letters, digits and . _ / -"
    longest = len(os.fsencode(private_dir(path))) + 1 + _CLIENT_NAME_MAX
    if longest > _SUN_PATH_MAX:
        return f"{text} is too long: unix socket paths under it need {_SUN_PATH_MAX} bytes at most"
    return None


def allowed(caller: Caller) -> bool:
    """Root, or the agent's own user (the same thing in production)."""
    return caller.uid in (0, os.geteuid())


# ---- files -------------------------------------------------------------------------


def _own_names(path: Path) -> set[str]:
    return {path.name, f".{path.name}.new", private_dir(path).name}


def _prepare_dir(path: Path) -> None:
    """The socket's directory: created 0700; an existing one must be safe to use.

    A directory holding nothing but our own files is tightened to 0700. Any other
    one (say /run) is used as it is when only its owner, the agent's user, may
    change it: the 0600 socket alone keeps others out, and nobody else can
    replace it with a socket of their own.
    """
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise AdminSocketError(f"cannot create {directory}: {e.strerror}") from e
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise AdminSocketError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise AdminSocketError(
            f"{directory} belongs to uid {st.st_uid}; the admin socket needs a directory "
            f"of uid {os.geteuid()}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and set(os.listdir(directory)) <= _own_names(path):
        os.chmod(directory, 0o700)
    elif mode & 0o022:
        raise AdminSocketError(
            f"{directory} (mode {mode:04o}) may be changed by other users; "
            "put the admin socket in a directory of its own"
        )


def _remove_stale(path: Path) -> None:
    """A socket file nobody serves any more is replaced; a live one is not ours to take."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AdminSocketError(f"{path} exists and is not a socket; remove it first")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _log.info("admin.stale_socket_removed", path=str(path))
        return
    except OSError as e:
        raise AdminSocketError(f"cannot check the existing {path}: {e.strerror}") from e
    finally:
        probe.close()
    raise AdminSocketError(f"{path} is served by another process (another agent?)")


def _bind_public(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind under a temporary name, make it 0600, then move it into place: the socket
    is never reachable with looser permissions."""
    tmp = path.with_name(f".{path.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        sock.listen(MAX_CONNECTIONS)
        st = os.stat(path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise AdminSocketError(f"cannot listen on {path}: {e.strerror}") from e
    return sock, (st.st_dev, st.st_ino)


# ---- the relay ------------------------------------------------------------------------


async def _pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, abort: Callable[[], None]
) -> None:
    """One direction; an end of stream is passed on, an error ends both directions."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        abort()


class Relay:
    """Accepts on the public socket; each connection reaches the gRPC server from a
    client path of its own, which `caller()` maps back to the kernel's credentials."""

    def __init__(self, upstream: Path, private: Path) -> None:
        self._upstream = upstream
        self._private = private
        self._callers: dict[str, Caller] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    def caller(self, peer: str) -> Caller | None:
        """The credentials behind a gRPC peer string ("unix:<client path>")."""
        if not peer.startswith("unix:"):
            return None
        return self._callers.get(peer.removeprefix("unix:"))

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= MAX_CONNECTIONS:
            _log.warning("admin.busy", connections=len(self._tasks))
            writer.close()
            return
        self._tasks.add(task)
        client = str(self._private / f"c{next(self._ids)}")
        up: socket.socket | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                caller = peer_credentials(writer.get_extra_info("socket"))
            except OSError as e:
                _log.warning("admin.unidentified", error=str(e))  # served nothing at all
                raise
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.setblocking(False)
            up.bind(client)
            self._callers[client] = caller  # before connect: the first request may be quick
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(up, str(self._upstream)), CONNECT_TIMEOUT_S)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
            up = None  # the writer owns it now
            both = (writer, up_writer)

            def abort() -> None:
                for w in both:
                    w.close()

            await asyncio.gather(_pipe(reader, up_writer, abort), _pipe(up_reader, writer, abort))
        except (OSError, TimeoutError) as e:
            _log.debug("admin.connection_ended", error=str(e))
        finally:
            self._tasks.discard(task)
            self._callers.pop(client, None)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            if up is not None:
                up.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(client)


# ---- the service --------------------------------------------------------------------


class Admin(pb_grpc.AdminServicer):
    def __init__(self, view: AdminView, relay: Relay) -> None:
        self.view = view
        self.relay = relay

    async def _authorize(self, context: Any, method: str) -> Caller:
        caller = self.relay.caller(context.peer())
        if caller is None:
            _log.warning("admin.denied", method=method, reason="caller not identified")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the caller could not be identified; nothing was changed",
            )
        assert caller is not None
        if not allowed(caller):
            _log.warning(
                "admin.denied", method=method, uid=caller.uid, gid=caller.gid,
                pid=caller.pid, comm=caller.comm(),
            )  # fmt: skip
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"uid {caller.uid} may not change the agent's state: root only",
            )
        return caller

    async def SetEnabled(
        self, request: pb.SetEnabledRequest, context: Any
    ) -> pb.SetEnabledResponse:
        caller = await self._authorize(context, "SetEnabled")
        was = self.view.set_enabled(request.enabled, uid=caller.uid, pid=caller.pid)
        if was is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "data plane not loaded yet")
        _log.warning(
            "killswitch.set", enabled=request.enabled, was=was, uid=caller.uid,
            gid=caller.gid, pid=caller.pid, comm=caller.comm(),
        )  # fmt: skip
        dp = self.view.dataplane()
        return pb.SetEnabledResponse(enabled=dp is not None and dp.enabled)


class AdminServer:
    """The relay on the public socket and the gRPC server behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._private = private_dir(path)
        self._server: grpc.aio.Server | None = None
        self._relay: Relay | None = None
        self._inode: tuple[int, int] | None = None
        self._made_private = False

    @property
    def relay(self) -> Relay:
        assert self._relay is not None
        return self._relay

    async def start(self, view: AdminView) -> None:
        path = self.path
        problem = path_problem(path)
        if problem:
            raise AdminSocketError(problem)
        _prepare_dir(path)
        _remove_stale(path)
        if self._private.is_symlink() or self._private.exists():
            shutil.rmtree(self._private)  # a dead agent's; the directory is ours alone
        self._private.mkdir(mode=0o700)
        self._made_private = True
        upstream = self._private / "grpc.sock"
        self._relay = Relay(upstream, self._private)
        server = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(Admin(view, self._relay), server)
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server)
        try:
            server.add_insecure_port(f"unix:{upstream}")
        except RuntimeError as e:
            raise AdminSocketError(f"cannot listen on {upstream}: {e}") from e
        self._server = server
        await server.start()
        sock, self._inode = _bind_public(path)
        await self._relay.start(sock)
        _log.info("admin.listening", socket=str(path))

    async def stop(self, grace: float) -> None:
        # The public name goes first: no new caller gets in while we stop.
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        if self._relay is not None:
            await self._relay.stop()
        if self._server is not None:
            await self._server.stop(grace)
        if self._made_private:  # never another live agent's
            shutil.rmtree(self._private, ignore_errors=True)


async def start(view: AdminView, path: Path) -> AdminServer:
    server = AdminServer(path)
    try:
        await server.start(view)
    except BaseException:
        await server.stop(0)
        raise
    return server
