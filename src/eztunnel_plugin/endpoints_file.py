"""Static endpoints from a YAML file, instead of xDS (clusters without Istio, debugging).

    endpoints: ["10.0.0.10", "fd00::a"]

The file is re-read when it changes; a bad edit is logged and the last good set
stays in force (nothing is half-applied).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

import yaml

from eztunnel_plugin import log
from eztunnel_plugin.workload_state import Snapshot

_log = log.get(__name__)


class EndpointsFileError(ValueError):
    pass


def parse(text: str, origin: str = "endpoints file") -> frozenset[str]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EndpointsFileError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise EndpointsFileError(f'{origin}: expected a mapping with a list "endpoints"')
    out: set[str] = set()
    for item in doc["endpoints"]:
        try:
            out.add(str(ipaddress.ip_address(str(item))))
        except ValueError as e:
            raise EndpointsFileError(f"{origin}: {item!r} is not an IP address") from e
    return frozenset(out)


def load(path: Path) -> frozenset[str]:
    try:
        text = path.read_text()
    except OSError as e:
        raise EndpointsFileError(f"{path}: {e.strerror}") from e
    return parse(text, str(path))


class StaticEndpoints:
    """A snapshot source for the reconciler, like WorkloadState but from a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 1
        self.endpoints = load(path)  # the first read must succeed: errors are fatal here
        self._mtime = path.stat().st_mtime_ns
        self._listeners: list[Callable[[int], None]] = []

    @property
    def complete(self) -> bool:
        return True

    def snapshot(self) -> Snapshot:
        return Snapshot(self.version, True, self.endpoints)

    def subscribe(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def reload(self) -> bool:
        """Re-read the file if it changed; True when the endpoint set changed."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as e:
            _log.error("endpoints_file.unreadable", path=str(self.path), error=e.strerror)
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            new = load(self.path)
        except EndpointsFileError as e:
            _log.error("endpoints_file.invalid", error=str(e), kept=len(self.endpoints))
            return False
        if new == self.endpoints:
            return False
        self.endpoints = new
        self.version += 1
        _log.info("endpoints_file.reloaded", path=str(self.path), endpoints=len(new))
        for listener in self._listeners:
            listener(self.version)
        return True

    async def watch(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload()
