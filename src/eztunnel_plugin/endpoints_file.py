"""Static endpoints from a YAML file, instead of xDS (clusters without Istio, debugging).

    endpoints: ["10.0.0.10", "fd00::a"]

The file is re-read when it changes; a bad edit is logged and counted, the last good
set stays in force (nothing is half-applied), and the error is kept for the status
API until the next good load.

The file is input to a privileged agent, so it is read strictly: at most 1 MiB of
UTF-8, YAML without anchors or aliases (an alias bomb of a few hundred bytes expands
to gigabytes), nesting at most a few levels deep, exactly one key, string items, and
only unicast pod addresses (addr.refusal). Every error message is bounded in length.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from eztunnel_plugin import addr, log
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.errors import EndpointsFileError
from eztunnel_plugin.state.snapshot import Listener, Snapshot

if TYPE_CHECKING:
    import yaml

_log = log.get(__name__)

MAX_BYTES: Final = 1 << 20
MAX_ENDPOINTS: Final = layout.MAX_ENDPOINTS  # what the BPF map holds
MAX_NESTING: Final = 2  # the mapping and its list
MAX_ERROR: Final = 400  # characters of an error message
_SHOWN: Final = 60  # characters of a bad value quoted in a message
SETTLE_NS: Final = 2_000_000_000  # a file modified this recently is re-read on every poll


def _loader() -> type[yaml.SafeLoader] | type[yaml.CSafeLoader]:
    # yaml is imported on first use: only a static endpoints file needs it, and an
    # agent fed by xDS should not carry it.
    import yaml

    loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
        yaml, "CSafeLoader", yaml.SafeLoader
    )
    return loader


def _error(origin: str, problem: str) -> EndpointsFileError:
    text = f"{origin}: {problem}"
    if len(text) > MAX_ERROR:
        text = text[: MAX_ERROR - 3] + "..."
    return EndpointsFileError(text)


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _check_events(text: str, origin: str) -> None:
    """Refuse anchors, aliases, deep nesting and repeated top-level keys, from the
    parser's events: before anything is constructed."""
    depth = 0
    top_nodes = 0  # nodes started directly in the top mapping: key, value, key, ...
    keys: set[str] = set()
    documents = 0
    import yaml

    for event in yaml.parse(text, Loader=_loader()):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _error(origin, f"line {line}: YAML anchors and aliases are not allowed")
        if isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            continue
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _error(origin, f"line {line}: one YAML document only")
        if depth == 1 and isinstance(event, yaml.NodeEvent):
            if top_nodes % 2 == 0 and isinstance(event, yaml.ScalarEvent):
                if event.value in keys:
                    raise _error(origin, f"line {line}: key {_shown(event.value)} repeated")
                keys.add(event.value)
            top_nodes += 1
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise _error(origin, f"line {line}: nested too deeply")


def parse(text: str, origin: str = "endpoints file") -> frozenset[str]:
    """The canonical addresses text lists; raise EndpointsFileError on anything else."""
    import yaml

    try:
        _check_events(text, origin)
        doc = yaml.load(text, Loader=_loader())  # a safe loader; the events are checked
    except yaml.YAMLError as e:
        raise _error(origin, f"not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise _error(origin, "nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise _error(origin, 'expected a mapping with a list "endpoints"')
    extra = [k for k in doc if k != "endpoints"]
    if extra:
        raise _error(origin, f"unknown key {_shown(extra[0])}; the only key is endpoints")
    items = doc["endpoints"]
    if len(items) > MAX_ENDPOINTS:
        raise _error(origin, f"{len(items)} endpoints, the map holds {MAX_ENDPOINTS}")
    out: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _error(origin, f"endpoints[{i}] is not a string but {_shown(item)}")
        try:
            ip = addr.parse(item)
        except ValueError:
            raise _error(origin, f"endpoints[{i}]: {_shown(item)} is not an IP address") from None
        reason = addr.refusal(ip)
        if reason is not None:
            raise _error(origin, f"endpoints[{i}]: {ip} is {reason}, not a pod address")
        out.add(str(ip))
    return frozenset(out)


def read(path: Path) -> str:
    """The file's text: a regular file, at most MAX_BYTES, UTF-8."""
    try:
        # O_NONBLOCK: a FIFO must not hang the agent; fstat refuses it right after.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _error(str(path), e.strerror or str(e)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(str(path), "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise _error(str(path), e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise _error(str(path), f"larger than {MAX_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(str(path), f"not UTF-8 (byte {e.start})") from None


def load(path: Path) -> frozenset[str]:
    return parse(read(path), str(path))


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    # An atomic replace changes the inode; an in-place edit the mtime or the size.
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class StaticEndpoints:
    """A snapshot source for the reconciler, like WorkloadState but from a file.

    Incomplete (so the reconciler writes nothing) until one load has succeeded.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0
        self.endpoints: frozenset[str] = frozenset()
        self.loaded = False
        self.last_error = ""  # the last load's error; "" after a good load
        self.errors = 0  # bad loads so far
        self._signature: tuple[int, int, int, int] | None = None
        self._listeners: list[Listener] = []
        self.reload()

    @property
    def complete(self) -> bool:
        return self.loaded

    def snapshot(self) -> Snapshot:
        return Snapshot(self.version, self.loaded, self.endpoints)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _failed(self, message: str, *, new: bool = True) -> None:
        """Record a failed load; new: a fresh attempt (an edit), not the same state again."""
        if not new and message == self.last_error:
            return  # the file is still missing: once per problem, not per poll
        self.errors += 1
        _log.error("endpoints_file.invalid", error=message, kept=len(self.endpoints))
        self.last_error = message

    def reload(self) -> bool:
        """Re-read the file if it changed; True when the endpoint set changed.

        Never raises: whatever goes wrong is logged, counted and kept in last_error,
        and the last good set stays in force.
        """
        try:
            return self._reload()
        except Exception as e:  # a bug here must not end the watcher
            self._signature = None
            self._failed(f"{self.path}: internal error: {repr(e)[:200]}", new=False)
            return False

    def _reload(self) -> bool:
        try:
            sig = _signature(self.path.stat())
        except OSError as e:
            self._signature = None  # the same file coming back is a change
            self._failed(str(_error(str(self.path), e.strerror or str(e))), new=False)
            return False
        changed = sig != self._signature
        # File times tick in jiffies: an edit of the same size right after the last
        # one may keep its mtime, so a recently modified file is read again.
        if not changed and time.time_ns() - sig[2] > SETTLE_NS:
            return False
        try:
            new = load(self.path)
        except EndpointsFileError as e:
            self._signature = sig
            self._failed(str(e), new=changed)
            return False
        self._signature = sig
        if self.last_error:
            _log.info("endpoints_file.recovered", path=str(self.path))
        self.last_error = ""
        first = not self.loaded
        self.loaded = True
        if new == self.endpoints and not first:
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
