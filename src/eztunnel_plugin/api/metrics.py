"""Prometheus text-format metrics on a small asyncio HTTP endpoint (off by default).

Bounded for any client: request line and headers by size and count (431 past
that), connections by number (503 past that) and each connection by time. The
metrics themselves are read on the API's reader thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from eztunnel_plugin import log
from eztunnel_plugin.api.inspector import ReaderBusy, addresses_refused
from eztunnel_plugin.config import Listen

if TYPE_CHECKING:
    from eztunnel_plugin.agent import Agent

MAX_LINE = 8192  # request line, and each header line
MAX_HEADERS = 64
MAX_CONNECTIONS = 16
CONNECTION_DEADLINE_S = 5.0
DRAIN_MAX = 1 << 20  # request bytes read and dropped after a reply, at most

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

_log = log.get(__name__)


def render(agent: Agent) -> str:
    lines: list[str] = []

    def gauge(name: str, help_: str, value: float, kind: str = "gauge") -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

    gauge("eztunnel_ready", "1 when the first snapshot is applied", int(agent.ready))
    gauge("eztunnel_xds_stale", "1 while the xDS feed is stale", int(agent.stale))
    if agent.dp is not None:
        gauge("eztunnel_enabled", "kill switch state (1: splicing on)", int(agent.dp.enabled))
        gauge(
            "eztunnel_endpoints",
            "entries in the BPF endpoint map",
            len(agent.dp.endpoints.read_all()),
        )
        counters = agent.dp.counters()
        lines += [
            "# HELP eztunnel_bpf_total BPF counters summed over CPUs",
            "# TYPE eztunnel_bpf_total counter",
        ]
        lines += [f'eztunnel_bpf_total{{counter="{k}"}} {v}' for k, v in counters.items()]
    if agent.xds is not None:
        st = agent.xds.stats
        gauge("eztunnel_xds_connected", "1 while an xDS stream is up", int(st.connected))
        gauge("eztunnel_xds_nacks_total", "NACKs sent to istiod", st.nacks, "counter")
        gauge("eztunnel_xds_streams_total", "xDS streams opened", st.streams, "counter")
        gauge(
            "eztunnel_xds_protocol_errors_total",
            "streams dropped for breaking the protocol",
            st.protocol_errors,
            "counter",
        )
    if agent.static is not None:
        gauge(
            "eztunnel_endpoints_file_errors_total",
            "loads of the endpoints file that failed",
            agent.static.errors,
            "counter",
        )
    gauge(
        "eztunnel_addresses_refused_total",
        "workload addresses never enrolled (loopback, multicast, link-local, ...)",
        addresses_refused(agent),
        "counter",
    )
    return "\n".join(lines) + "\n"


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Refused(431) from None
    except asyncio.IncompleteReadError:
        raise _Refused(400) from None


async def _request_path(reader: asyncio.StreamReader) -> str:
    """The path of a GET request; the headers are read (bounded) and ignored."""
    parts = (await _line(reader)).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _Refused(400)
    for _ in range(MAX_HEADERS):
        if (await _line(reader)).strip() == b"":
            break
    else:
        raise _Refused(431)
    if parts[0] != "GET":
        raise _Refused(405)
    return parts[1].split("?", 1)[0]


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; version=0.0.4\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _reply(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: bytes
) -> None:
    writer.write(_response(status, body))
    await writer.drain()
    if writer.can_write_eof():
        # Read what the client still sends before closing: closing with unread
        # bytes resets the connection, and the reset can beat the reply.
        writer.write_eof()
        drained = 0
        while drained < DRAIN_MAX and (chunk := await reader.read(65536)):
            drained += len(chunk)


async def start(agent: Agent, listen: Listen) -> asyncio.Server:
    active = 0  # connections being served
    refusing = 0  # connections being told 503

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path = await _request_path(reader)
            if path != "/metrics":
                raise _Refused(404)
            body, status = (await agent.reader.run(render, agent)).encode(), 200
        except _Refused as r:
            body, status = f"{_REASONS[r.status].lower()}\n".encode(), r.status
        except ReaderBusy:
            body, status = b"busy\n", 503
        await _reply(reader, writer, status, body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, refusing
        if active >= MAX_CONNECTIONS and refusing >= MAX_CONNECTIONS:
            writer.close()  # past both bounds: no reply at all
            return
        busy = active >= MAX_CONNECTIONS
        if busy:
            refusing += 1
        else:
            active += 1
        try:
            async with asyncio.timeout(1.0 if busy else CONNECTION_DEADLINE_S):
                if busy:
                    await _reply(reader, writer, 503, b"too many connections\n")
                else:
                    await serve(reader, writer)
        except (TimeoutError, OSError):
            pass  # the client is gone or too slow: nothing more to say
        except Exception as e:  # a bug: one line, and no traceback any client could trigger
            _log.error("metrics.error", error=f"{type(e).__name__}: {e}")
        finally:
            if busy:
                refusing -= 1
            else:
                active -= 1
            with contextlib.suppress(OSError):
                writer.close()

    server = await asyncio.start_server(handle, listen.host, listen.port, limit=MAX_LINE)
    if not listen.loopback:
        _log.warning(
            "metrics.exposed", listen=str(listen), note="metrics are reachable from the network"
        )
    _log.info("metrics.listening", listen=str(listen))
    return server
