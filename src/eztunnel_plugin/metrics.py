"""Prometheus text-format metrics on a small asyncio HTTP endpoint (off by default)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from eztunnel_plugin import log
from eztunnel_plugin.config import Listen

if TYPE_CHECKING:
    from eztunnel_plugin.agent import Agent

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
    return "\n".join(lines) + "\n"


async def start(agent: Agent, listen: Listen) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.split()[1].decode() if len(request.split()) > 1 else ""
            if path == "/metrics":
                body, status = render(agent).encode(), "200 OK"
            else:
                body, status = b"not found\n", "404 Not Found"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, listen.host, listen.port)
    _log.info("metrics.listening", listen=str(listen))
    return server
