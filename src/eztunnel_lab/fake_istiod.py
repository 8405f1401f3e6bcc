"""A local istiod for development and tests: a real grpc.aio delta-ADS server.

It serves workloads, services and authorizations from YAML (field names as in the
protos, enums by name, addresses as text), behaves like istiod on the stream (a full
response to each initial request, removals computed from initial_resource_versions,
1.31-style content-hash versions, pushes of differences, stale ACK nonces ignored,
no re-push on NACK) and can be driven in-process: set the resource set, inject bad
resources or whole responses, close streams, send GOAWAY, and read back everything
each client sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import itertools
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import yaml
from google.protobuf import any_pb2, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from eztunnel_plugin import log
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2, discovery_pb2_grpc
from eztunnel_plugin.pb.istio.security import authorization_pb2 as authz_pb
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE

_log = log.get(__name__)

Resources = dict[str, dict[str, Any]]  # type_url -> name -> envoy Resource


class ConfigError(ValueError):
    """The YAML does not describe valid resources."""


# --- YAML -> protos -------------------------------------------------------------
def _ip_bytes(value: Any, where: str) -> str:
    """A YAML address (text IP, or !!binary raw bytes) as the base64 json_format wants."""
    if isinstance(value, bytes):
        raw = value
    else:
        try:
            raw = ipaddress.ip_address(str(value)).packed
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an IP address") from None
    return base64.b64encode(raw).decode()


def _bytes_as_ips(d: Any, desc: Descriptor, where: str) -> Any:
    """Walk d along desc and turn every bytes field given as text into IP bytes."""
    if not isinstance(d, Mapping):
        return d
    return {
        key: _field_value(desc.fields_by_name.get(key), v, f"{where}.{key}") for key, v in d.items()
    }


def _field_value(f: FieldDescriptor | None, value: Any, where: str) -> Any:
    if f is None:
        return value  # json_format reports unknown fields
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        vf = f.message_type.fields_by_name["value"]
        if vf.message_type is not None and isinstance(value, Mapping):
            return {k: _bytes_as_ips(v, vf.message_type, where) for k, v in value.items()}
        return value
    if f.type == FieldDescriptor.TYPE_BYTES:
        if f.is_repeated and isinstance(value, list):
            return [_ip_bytes(v, where) for v in value]
        return value if value is None else _ip_bytes(value, where)
    if f.message_type is not None:
        if f.is_repeated and isinstance(value, list):
            return [_bytes_as_ips(v, f.message_type, where) for v in value]
        return _bytes_as_ips(value, f.message_type, where)
    return value


def _parse(item: Any, cls: Any, where: str) -> Any:
    msg = cls()
    try:
        json_format.ParseDict(_bytes_as_ips(item, cls.DESCRIPTOR, where), msg)
    except json_format.ParseError as e:
        raise ConfigError(f"{where}: {e}") from None
    return msg


def make_resource(name: str, type_url: str, message: Any, version: str | None = None) -> Any:
    """An envoy Resource for message, versioned by content hash like istiod 1.31."""
    value = message.SerializeToString(deterministic=True)
    body = any_pb2.Any(type_url=type_url, value=value)
    v = version if version is not None else hashlib.sha256(value).hexdigest()[:16]
    return discovery_pb2.Resource(name=name, version=v, resource=body)


def workload_resource(w: Any) -> Any:
    return make_resource(w.uid, ADDRESS_TYPE, wl_pb.Address(workload=w))


def service_resource(s: Any) -> Any:
    return make_resource(f"{s.namespace}/{s.hostname}", ADDRESS_TYPE, wl_pb.Address(service=s))


def authorization_resource(a: Any) -> Any:
    return make_resource(f"{a.namespace}/{a.name}", AUTHORIZATION_TYPE, a)


def resources_from_document(doc: Any) -> Resources:
    """Parse the YAML document format (workloads/services/authorizations lists)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError("top level must be a mapping")
    unknown = set(doc) - {"workloads", "services", "authorizations"}
    if unknown:
        raise ConfigError(f"unknown top-level keys: {sorted(unknown)}")
    out: Resources = {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}

    def add(type_url: str, res: Any, where: str) -> None:
        if res.name in out[type_url]:
            raise ConfigError(f"{where}: duplicate resource name {res.name!r}")
        out[type_url][res.name] = res

    for i, item in enumerate(doc.get("workloads") or []):
        w = _parse(item, wl_pb.Workload, f"workloads[{i}]")
        if not w.uid:
            raise ConfigError(f"workloads[{i}]: uid is required")
        add(ADDRESS_TYPE, workload_resource(w), f"workloads[{i}]")
    for i, item in enumerate(doc.get("services") or []):
        s = _parse(item, wl_pb.Service, f"services[{i}]")
        if not s.hostname:
            raise ConfigError(f"services[{i}]: hostname is required")
        add(ADDRESS_TYPE, service_resource(s), f"services[{i}]")
    for i, item in enumerate(doc.get("authorizations") or []):
        a = _parse(item, authz_pb.Authorization, f"authorizations[{i}]")
        if not a.name:
            raise ConfigError(f"authorizations[{i}]: name is required")
        add(AUTHORIZATION_TYPE, authorization_resource(a), f"authorizations[{i}]")
    return out


def load_yaml(text: str) -> Resources:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}") from None
    return resources_from_document(doc)


# --- the server -----------------------------------------------------------------
@dataclass
class StreamRecord:
    """Everything one client stream did, for tests."""

    id: int
    peer: str
    metadata: dict[str, str]
    requests: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    ignored_nonces: list[str] = field(default_factory=list)  # stale ACK/NACKs
    closed: bool = False

    @property
    def initial_requests(self) -> list[Any]:
        return [r for r in self.requests if not r.response_nonce]

    @property
    def nacks(self) -> list[Any]:
        return [r for r in self.requests if r.response_nonce and r.HasField("error_detail")]

    @property
    def acks(self) -> list[Any]:
        return [r for r in self.requests if r.response_nonce and not r.HasField("error_detail")]


_CLOSE = object()


@dataclass
class _Stream:
    record: StreamRecord
    out: asyncio.Queue[Any]
    held: dict[str, dict[str, str]] = field(default_factory=dict)  # type -> name -> version
    last_nonce: dict[str, str] = field(default_factory=dict)


class FakeIstiod(discovery_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """In-process delta-ADS server. start() it, then drive it."""

    def __init__(
        self,
        resources: Resources | None = None,
        *,
        honor_versions: bool = True,
        send_removals: bool = True,
        expected_token: str | None = None,
        max_connection_age_s: float | None = None,
    ) -> None:
        self.resources: Resources = {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}
        if resources:
            for t, items in resources.items():
                self.resources[t] = dict(items)
        self.honor_versions = honor_versions  # istiod 1.31: skip resources the client holds
        self.send_removals = send_removals  # False: a server that ignores initial versions
        self.expected_token = expected_token
        self.max_connection_age_s = max_connection_age_s
        self.records: list[StreamRecord] = []
        self.port = 0
        self._streams: dict[int, _Stream] = {}
        self._server: grpc.aio.Server | None = None
        self._listen = "127.0.0.1:0"
        self._tls: tuple[bytes, bytes] | None = None
        self._nonces = itertools.count(1)
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()

    # --- lifecycle --------------------------------------------------------------
    async def start(self, listen: str | None = None, tls: tuple[bytes, bytes] | None = None) -> int:
        """Listen on listen (host:port, port 0 picks one); tls is (cert PEM, key PEM)."""
        if listen is not None:
            self._listen = listen
        if tls is not None:
            self._tls = tls
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 200 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", 100),
            ]
        server = grpc.aio.server(options=options)
        discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        if self._tls is not None:
            creds = grpc.ssl_server_credentials([(self._tls[1], self._tls[0])])
            port: int = server.add_secure_port(self._listen, creds)
        else:
            port = server.add_insecure_port(self._listen)
        if port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server
        self.port = port
        self._listen = f"{self._listen.rsplit(':', 1)[0]}:{port}"
        _log.info("fake_istiod.listening", address=self._listen, tls=self._tls is not None)
        return port

    async def stop(self, grace: float = 0.1) -> None:
        """Shut down: GOAWAY to every client, then end open streams with UNAVAILABLE."""
        server, self._server = self._server, None
        if server is None:
            return
        stopping = asyncio.ensure_future(server.stop(grace))
        await asyncio.sleep(0)  # let the GOAWAY go out first
        self.close_streams(grpc.StatusCode.UNAVAILABLE, "server shutting down")
        await stopping

    async def goaway(self, grace: float = 0.05) -> None:
        """Send GOAWAY on every connection (a server shutdown), then listen again."""
        await self.stop(grace)
        await self.start()

    @property
    def address(self) -> str:
        return self._listen

    # --- driving ----------------------------------------------------------------
    def set_resources(self, resources: Resources) -> None:
        """Replace the whole resource set and push the differences."""
        self.resources = {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}
        for t, items in resources.items():
            self.resources[t] = dict(items)
        self.push()

    def update(self, type_url: str, add: Iterable[Any] = (), remove: Iterable[str] = ()) -> None:
        """Add or replace Resources (possibly malformed ones) and remove names; push."""
        items = self.resources.setdefault(type_url, {})
        for name in remove:
            items.pop(name, None)
        for res in add:
            items[res.name] = res
        self.push()

    def push(self) -> None:
        """Send each stream what changed since it was last told (istiod's delta push)."""
        for st in self._streams.values():
            for type_url in list(st.held):
                self._push_diff(st, type_url)

    def push_raw(self, response: Any) -> None:
        """Send a hand-made response to every stream (nonce assigned if empty)."""
        for st in self._streams.values():
            resp = discovery_pb2.DeltaDiscoveryResponse()
            resp.CopyFrom(response)
            if not resp.nonce:
                resp.nonce = self._nonce()
            st.last_nonce[resp.type_url] = resp.nonce
            st.out.put_nowait(resp)

    def close_streams(
        self,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        details: str = "transport is closing",
    ) -> None:
        """End every active stream with this status."""
        for st in self._streams.values():
            st.out.put_nowait((_CLOSE, code, details))

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until predicate() holds; it is re-checked after every stream event."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- protocol ---------------------------------------------------------------
    def _nonce(self) -> str:
        return f"n{next(self._nonces)}"

    def _send(self, st: _Stream, type_url: str, res: list[Any], removed: list[str]) -> None:
        resp = discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url,
            nonce=self._nonce(),
            system_version_info=str(len(st.record.responses) + 1),
            resources=res,
            removed_resources=removed,
        )
        resp.control_plane.identifier = "fake-istiod"
        st.last_nonce[type_url] = resp.nonce
        st.out.put_nowait(resp)

    def _push_diff(self, st: _Stream, type_url: str) -> None:
        current = self.resources.get(type_url, {})
        held = st.held[type_url]
        changed = [r for n, r in current.items() if held.get(n) != r.version or n not in held]
        removed = [n for n in held if n not in current]
        if not changed and not removed:
            return
        st.held[type_url] = {n: r.version for n, r in current.items()}
        self._send(st, type_url, changed, removed)

    def _on_request(self, st: _Stream, req: Any) -> None:
        t = req.type_url
        if req.response_nonce:
            if req.response_nonce != st.last_nonce.get(t):
                st.record.ignored_nonces.append(req.response_nonce)  # istiod: stale, ignore
            return  # ACK or NACK: istiod records it and does not re-push
        if t in st.held:
            return  # a later spontaneous request; wildcard subscriptions have nothing to change
        current = self.resources.get(t, {})
        client = dict(req.initial_resource_versions)
        send = [
            r
            for n, r in current.items()
            if not (self.honor_versions and r.version and client.get(n) == r.version)
        ]
        removed = [n for n in client if n not in current] if self.send_removals else []
        st.held[t] = {n: r.version for n, r in current.items()}
        self._send(st, t, send, removed)

    # A coroutine that answers through context.write() (grpc.aio accepts that for a
    # stream) rather than the async generator the stub declares.
    async def DeltaAggregatedResources(  # type: ignore[override]
        self, request_iterator: Any, context: Any
    ) -> None:
        md = {
            k: (v if isinstance(v, str) else v.decode()) for k, v in context.invocation_metadata()
        }
        if self.expected_token is not None and md.get("authorization") != (
            f"Bearer {self.expected_token}"
        ):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failure")
        rec = StreamRecord(next(self._ids), context.peer(), md)
        st = _Stream(rec, asyncio.Queue())
        self.records.append(rec)
        self._streams[rec.id] = st
        await self._notify()

        async def reader() -> None:
            async for req in request_iterator:
                rec.requests.append(req)
                self._on_request(st, req)
                await self._notify()
            st.out.put_nowait(None)  # client half-closed

        task = asyncio.create_task(reader())
        try:
            while True:
                item = await st.out.get()
                if item is None:
                    return
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await context.abort(item[1], item[2])
                await context.write(item)
                rec.responses.append(item)
                await self._notify()
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            self._streams.pop(rec.id, None)
            rec.closed = True
            await self._notify()


# --- command line ----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", required=True, type=Path, help="YAML file to serve (watched)")
    p.add_argument("--listen", default="127.0.0.1:15010", help="host:port to listen on")
    p.add_argument("--tls-cert", type=Path, help="server certificate PEM (TLS if given)")
    p.add_argument("--tls-key", type=Path, help="server private key PEM")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between file checks")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


async def watch_file(fake: FakeIstiod, path: Path, interval: float, stop: asyncio.Event) -> None:
    """Reload path when its mtime or size changes; a broken file keeps the last good set."""
    seen = _stamp(path)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        now = _stamp(path)
        if now == seen or now is None:
            continue
        seen = now
        try:
            fake.set_resources(load_yaml(path.read_text()))
        except (OSError, ConfigError) as e:
            _log.error("fake_istiod.reload_failed", path=str(path), error=str(e))
            continue
        _log.info(
            "fake_istiod.reloaded",
            path=str(path),
            addresses=len(fake.resources[ADDRESS_TYPE]),
            authorizations=len(fake.resources[AUTHORIZATION_TYPE]),
        )


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        _log.error("fake_istiod.bad_args", error="--tls-cert and --tls-key go together")
        return 2
    try:
        resources = load_yaml(args.workloads.read_text())
        tls = None
        if args.tls_cert is not None:
            tls = (args.tls_cert.read_bytes(), args.tls_key.read_bytes())
    except (OSError, ConfigError) as e:
        _log.error("fake_istiod.bad_input", error=str(e))
        return 2
    fake = FakeIstiod(resources)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await fake.start(args.listen, tls)
    except (OSError, RuntimeError) as e:
        _log.error("fake_istiod.listen_failed", address=args.listen, error=str(e))
        return 1
    try:
        await watch_file(fake, args.workloads, args.poll_interval, stop)
    finally:
        await fake.stop(0.5)
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))


if __name__ == "__main__":
    log.configure()
    _parser = argparse.ArgumentParser(prog="fake-istiod")
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
