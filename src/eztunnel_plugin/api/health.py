"""Readiness and liveness over HTTP, as ztunnel serves them (port 15021, /healthz/ready):
kubelet probes them with httpGet, so no probe starts a process in the container.

- READY (`/healthz/ready`): 200 once the kernel self-test decided and the data plane is
  attached as it decided (or deliberately not at all), the first complete snapshot is
  applied, and while the xDS feed is fresh; 503 otherwise, with the reason on one line.
- LIVE (`/healthz/live`): 200 whenever the agent's event loop answers. A stale feed is
  not a reason to restart the agent (restarting would not bring istiod back, and the
  pinned data plane keeps working either way).

Nothing else is served (404): the port only says what kubelet may know. The gRPC health
service (grpc.health.v1 on the inspection API) reports the same readiness.
"""

from __future__ import annotations

import asyncio
from typing import Final

from eztunnel_plugin import log
from eztunnel_plugin.api import httpd
from eztunnel_plugin.api.view import AgentView
from eztunnel_plugin.config import Listen

READY: Final = "/healthz/ready"
LIVE: Final = "/healthz/live"
DEFAULT_PORT: Final = 15021  # ztunnel's readiness port

_log = log.get(__name__)


def readiness(view: AgentView) -> tuple[bool, str]:
    """(ready, why) as the readiness probe reports it."""
    if view.selftest is None:
        return False, "starting: the kernel self-test has not decided yet"
    if view.stale:
        return False, "the xDS feed is stale"
    if not view.ready:
        return False, "starting: the first complete snapshot is not applied yet"
    return True, "ready"


async def start(view: AgentView, listen: Listen) -> asyncio.Server:
    async def handle(path: str) -> httpd.Reply:
        if path == LIVE:
            return httpd.Reply(200, b"alive\n")
        if path == READY:
            ok, why = readiness(view)
            return httpd.Reply(200 if ok else 503, f"{why}\n".encode())
        return httpd.refused(404)

    server = await httpd.start(handle, listen, "health")
    _log.info("health.listening", listen=str(listen), paths=[READY, LIVE])
    return server
