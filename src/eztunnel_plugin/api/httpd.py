"""A tiny bounded HTTP server for the agent's plain-text endpoints (metrics, health).

One GET per connection, answered and closed (`Connection: close`), as Prometheus and
kubelet's probes use them. Any client stays bounded: the request line and each header by
size (431 past MAX_LINE), headers by count (431), connections by number (503 past
MAX_CONNECTIONS, then no reply at all past twice that) and each connection by time. It
never sends a traceback: a handler's bug is one log line and a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from eztunnel_plugin import log
from eztunnel_plugin.config import Listen
from eztunnel_plugin.errors import RequestRefused

MAX_LINE: Final = 8192  # request line, and each header line
MAX_HEADERS: Final = 64
MAX_CONNECTIONS: Final = 16
CONNECTION_DEADLINE_S: Final = 5.0
BUSY_DEADLINE_S: Final = 1.0  # to tell a connection past the bound that it is refused
DRAIN_MAX: Final = 1 << 20  # request bytes read and dropped after a reply, at most
TEXT: Final = "text/plain; charset=utf-8"

REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

_log = log.get(__name__)


@dataclass(frozen=True)
class Reply:
    status: int  # one of REASONS
    body: bytes
    content_type: str = TEXT


Handler = Callable[[str], Awaitable[Reply]]  # the request's path (no query) -> the reply


def refused(status: int) -> Reply:
    """The reply to a refused request: its reason, lower case, as the body."""
    return Reply(status, f"{REASONS[status].lower()}\n".encode())


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise RequestRefused(431) from None
    except asyncio.IncompleteReadError:
        raise RequestRefused(400) from None


async def request_path(reader: asyncio.StreamReader) -> str:
    """The path of a GET request; the headers are read (bounded) and ignored."""
    parts = (await _line(reader)).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise RequestRefused(400)
    for _ in range(MAX_HEADERS):
        if (await _line(reader)).strip() == b"":
            break
    else:
        raise RequestRefused(431)
    if parts[0] != "GET":
        raise RequestRefused(405)
    return parts[1].split("?", 1)[0]


def response(reply: Reply) -> bytes:
    head = (
        f"HTTP/1.0 {reply.status} {REASONS[reply.status]}\r\n"
        f"Content-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + reply.body


async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply) -> None:
    writer.write(response(reply))
    await writer.drain()
    if writer.can_write_eof():
        # Read what the client still sends before closing: closing with unread
        # bytes resets the connection, and the reset can beat the reply.
        writer.write_eof()
        drained = 0
        while drained < DRAIN_MAX and (chunk := await reader.read(65536)):
            drained += len(chunk)


async def start(
    handler: Handler,
    listen: Listen,
    name: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    deadline_s: float = CONNECTION_DEADLINE_S,
) -> asyncio.Server:
    """Serve `handler` on `listen`; `name` prefixes the log events (`<name>.error`)."""
    active = 0  # connections being served
    refusing = 0  # connections being told 503

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await handler(await request_path(reader))
        except RequestRefused as r:
            reply = refused(r.status)
        await send(reader, writer, reply)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, refusing
        if active >= max_connections and refusing >= max_connections:
            writer.close()  # past both bounds: no reply at all
            return
        busy = active >= max_connections
        if busy:
            refusing += 1
        else:
            active += 1
        try:
            async with asyncio.timeout(BUSY_DEADLINE_S if busy else deadline_s):
                if busy:
                    await send(reader, writer, Reply(503, b"too many connections\n"))
                else:
                    await serve(reader, writer)
        except (TimeoutError, OSError):
            pass  # the client is gone or too slow: nothing more to say
        except Exception as e:  # a bug: one line, and no traceback any client could trigger
            _log.error(f"{name}.error", error=f"{type(e).__name__}: {e}")
        finally:
            if busy:
                refusing -= 1
            else:
                active -= 1
            with contextlib.suppress(OSError):
                writer.close()

    return await asyncio.start_server(handle, listen.host, listen.port, limit=MAX_LINE)
