"""Delta ADS client for istiod's workload feed, speaking it the way ztunnel does.

One bidirectional stream on
/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources:
wildcard subscriptions for Address then Authorization, ACK/NACK per response with its
nonce, partial acceptance, removals, and reconnects that resend every held name in
initial_resource_versions (with "" versions, so the server resends everything and a
held name it neither resends nor removes is stale and dropped).

The client is the wire only: it decodes each response through the Decoder of its type
(xds.decode) and hands the records to that type's Handler (xds.handler), which returns
what it refused. Resource versions are the client's: kept per type for the names
accepted, resent on reconnect, never stored with the records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from eztunnel_plugin import log
from eztunnel_plugin.errors import ConnectError, ProtocolError
from eztunnel_plugin.pb.envoy.config.core.v3 import base_pb2
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2_grpc
from eztunnel_plugin.pb.envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    Resource,
)
from eztunnel_plugin.xds.decode import Decoder
from eztunnel_plugin.xds.handler import Handler, Rejection
from eztunnel_plugin.xds.types import SUBSCRIBED_TYPES

_log = log.get(__name__)

DEFAULT_ADDRESS: Final = "istiod.istio-system.svc:15012"
DEFAULT_SERVER_NAME: Final = "istiod.istio-system.svc"
DEFAULT_ROOT_CERT: Final = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_FILE: Final = "/var/run/secrets/tokens/istio-token"
MAX_RECEIVE_BYTES: Final = 200 * 1024 * 1024  # ztunnel's limit; istiod pushes can be huge
MAX_NACK_DETAIL: Final = 4096
# Strings from the server that we echo or log are bounded: istiod's nonces are UUIDs
# and type URLs short, so anything near these limits is a broken or hostile server.
MAX_NONCE: Final = 1024
MAX_TYPE_URL: Final = 1024
MAX_SERVER_TEXT: Final = 512  # error details and the like, in logs and the status API
MAX_TOKEN_BYTES: Final = 64 * 1024
STATIC_TOKEN_PREFIX: Final = "static:"  # AUTH_TOKEN=static:<token>; anything else is a file

# Node metadata values: what a protobuf Struct holds (ISTIO_METAJSON_* are JSON).
Json: TypeAlias = str | int | float | bool | list["Json"] | dict[str, "Json"] | None


def bounded(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """text cut to limit characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_token(token: str, what: str) -> str:
    """token if it can go in an authorization header; else ConnectError naming what."""
    if not token:
        raise ConnectError(f"{what} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ConnectError(f"{what} holds characters a header cannot carry")
    return token


def read_token(path: str) -> str:
    """The bearer token in path (surrounding whitespace dropped); ConnectError if unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise ConnectError(f"cannot read token file {path}: {e.strerror}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ConnectError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    return check_token(raw.decode("latin-1").strip(), f"token file {path}")


def node_id(instance_ip: str, pod_name: str, pod_namespace: str) -> str:
    """ztunnel's node id; istiod parses type~ip~id~domain."""
    return f"ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"


def node_metadata_from_env(env: Mapping[str, str]) -> dict[str, Json]:
    """The metadata ztunnel sends: NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, ISTIO_META_*."""
    meta: dict[str, Json] = {}
    for key, value in env.items():
        if key.startswith("ISTIO_META_") and len(key) > 11:
            meta[key[11:]] = value
    for key, value in env.items():
        if key.startswith("ISTIO_METAJSON_") and len(key) > 15:
            try:
                meta[key[15:]] = json.loads(value)
            except ValueError:
                _log.warning("xds.bad_metajson", key=key)
    meta["NAME"] = env.get("POD_NAME", "")
    meta["NAMESPACE"] = env.get("POD_NAMESPACE", "")
    meta["INSTANCE_IPS"] = env.get("INSTANCE_IP", "1.1.1.1")
    meta["NODE_NAME"] = env.get("NODE_NAME", "")
    return meta


@dataclass(frozen=True)
class XdsConfig:
    """How to reach istiod and who we say we are. from_env() reads ztunnel's variables."""

    node_id: str
    node_metadata: Mapping[str, Json]
    address: str = DEFAULT_ADDRESS
    plaintext: bool = False  # tests and local development only
    root_cert: str | None = DEFAULT_ROOT_CERT  # None or "SYSTEM": system roots
    server_name: str | None = None  # None: the address host, or istiod.istio-system.svc for IPs
    token_file: str | None = DEFAULT_TOKEN_FILE  # re-read on every (re)connect
    token: str | None = field(default=None, repr=False)  # static token, when no file
    cluster_id: str = "Kubernetes"
    headers: Sequence[tuple[str, str]] = ()
    types: Sequence[str] = SUBSCRIBED_TYPES
    keepalive_time_s: float = 30.0  # istiod enforces >= 15 s between pings
    keepalive_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    max_receive_bytes: int = MAX_RECEIVE_BYTES
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 15.0
    fast_retry_s: float = 0.01  # after GOAWAY / transport closing, like ztunnel
    healthy_stream_s: float = 1.0  # a stream that lived this long resets the backoff
    send_versions: bool = False  # True: send server versions (istiod 1.31 may skip resends)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> XdsConfig:
        """ztunnel's variables from env (default os.environ), then overrides (field=value:
        loosely typed keywords from the command line, checked by the constructor)."""
        env = os.environ if env is None else env
        base = cls(
            node_id=node_id(
                env.get("INSTANCE_IP", "1.1.1.1"),
                env.get("POD_NAME", ""),
                env.get("POD_NAMESPACE", ""),
            ),
            node_metadata=node_metadata_from_env(env),
            address=env.get("XDS_ADDRESS", DEFAULT_ADDRESS),
            cluster_id=env.get("ISTIO_META_CLUSTER_ID") or env.get("CLUSTER_ID") or "Kubernetes",
            headers=tuple(
                (k[11:].lower(), v)
                for k, v in sorted(env.items())
                if k.startswith("XDS_HEADER_") and len(k) > 11
            ),
        )
        kw: dict[str, Any] = {}
        if "XDS_ROOT_CA" in env:
            kw["root_cert"] = env["XDS_ROOT_CA"]
        if "ALT_XDS_HOSTNAME" in env:
            kw["server_name"] = env["ALT_XDS_HOSTNAME"]
        auth = env.get("AUTH_TOKEN")
        # A file path, or static:<token>. ztunnel takes any path that does not exist
        # for a static token, so a typo there sends the path itself as the token.
        if auth and auth.startswith(STATIC_TOKEN_PREFIX):
            kw["token_file"], kw["token"] = None, auth[len(STATIC_TOKEN_PREFIX) :]
        elif auth:
            kw["token_file"] = auth
        kw.update(overrides)
        return replace(base, **kw)

    @property
    def target(self) -> str:
        for scheme in ("https://", "http://"):
            if self.address.startswith(scheme):
                return self.address[len(scheme) :]
        return self.address

    def tls_server_name(self) -> str:
        """The name the server certificate must carry (istiod's SANs are *.svc)."""
        if self.server_name:
            return self.server_name
        host = self.target.rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return DEFAULT_SERVER_NAME if host == "localhost" else host
        return DEFAULT_SERVER_NAME


def _system_roots() -> str | None:
    """The OS CA bundle (None: gRPC's bundled roots)."""
    import ssl  # only here: the agent runs without it (lazyssl.py)

    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class XdsStats:
    connected: bool = False  # a stream is up and has delivered a response
    acked_nonce: dict[str, str] = field(default_factory=dict)  # type -> last ACKed nonce
    streams: int = 0
    responses: int = 0
    protocol_errors: int = 0
    acks: int = 0
    nacks: int = 0
    stale_dropped: int = 0
    last_error: str = ""
    last_delay_s: float = 0.0
    last_response_at: float = 0.0  # time.perf_counter()
    first_response_at: float = 0.0  # of the current (last) stream


def _nack_detail(rejected: Sequence[tuple[str, str]]) -> str:
    parts: list[str] = []
    size = 0
    for i, (name, reason) in enumerate(rejected):
        part = bounded(f"{name}: {reason}", MAX_NACK_DETAIL // 2)
        if size + len(part) > MAX_NACK_DETAIL:
            parts.append(f"... and {len(rejected) - i} more")
            break
        parts.append(part)
        size += len(part) + 2
    return "; ".join(parts)


def _protocol_problem(resp: DeltaDiscoveryResponse) -> str:
    """Why a response must not be handled at all ("" if it may). Never echoes it whole."""
    if len(resp.nonce) > MAX_NONCE:
        return f"nonce of {len(resp.nonce)} characters (limit {MAX_NONCE}): {resp.nonce[:64]!r}..."
    if len(resp.type_url) > MAX_TYPE_URL:
        return f"type_url of {len(resp.type_url)} characters (limit {MAX_TYPE_URL})"
    return ""


M = TypeVar("M", bound=Message)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of one response's resources and removals."""

    accepted: dict[str, str]  # name -> version: now held by the handler
    removed: frozenset[str]  # names handed over as removals
    rejected: list[Rejection]  # decode failures, then the handler's refusals


class Subscription(Protocol):
    """One subscribed type as the client sees it (ztunnel's RawHandler)."""

    @property
    def type_url(self) -> str: ...

    def apply(self, resources: Sequence[Resource], removals: Iterable[str]) -> Applied: ...

    def synced(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Watch(Generic[M, R]):
    """A Handler bound to the Decoder of its type (ztunnel's HandlerWrapper)."""

    decoder: Decoder[M, R]
    handler: Handler[R]

    @property
    def type_url(self) -> str:
        return self.decoder.type_url

    def apply(self, resources: Sequence[Resource], removals: Iterable[str]) -> Applied:
        decoded = self.decoder.decode(resources)
        removed = frozenset(removals) - decoded.records.keys()  # sent again: it stays
        refused = list(self.handler.handle(decoded.records, removed))
        # A refused update keeps the handler's previous record, so its previous version.
        names = {r.name for r in refused}
        accepted = {n: v for n, v in decoded.versions.items() if n not in names}
        return Applied(accepted, removed, [*decoded.rejected, *refused])

    def synced(self) -> None:
        self.handler.synced()


EventHook = Callable[[str, dict[str, object]], None]


class XdsClient:
    """Feeds one handler per subscribed type from istiod; run() until cancelled.

    on_event(kind, fields) hears xds.connected (first response on a stream),
    xds.disconnected, xds.synced (every type applied once) and xds.nack.
    """

    def __init__(
        self,
        config: XdsConfig,
        watches: Iterable[Subscription],
        *,
        on_event: EventHook | None = None,
    ) -> None:
        self.config = config
        self._watches = {w.type_url: w for w in watches}
        missing = [t for t in config.types if t not in self._watches]
        if missing:
            raise ValueError(f"no handler for subscribed type {missing[0]}")
        self.stats = XdsStats()
        self.synced = asyncio.Event()  # every subscribed type applied once
        self._synced_types: set[str] = set()
        # type -> name -> the version the server sent: what the handlers hold
        self._versions: dict[str, dict[str, str]] = {t: {} for t in config.types}
        self._on_event = on_event

    def held(self, type_url: str) -> dict[str, str]:
        """Names held for type_url -> the server version each came with."""
        return dict(self._versions.get(type_url, {}))

    def _event(self, kind: str, **fields: object) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, fields)
            except Exception as e:  # an observer must not break the feed
                _log.error("xds.event_hook_failed", kind=kind, error=repr(e))

    # --- connection -------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        c = self.config
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", c.max_receive_bytes),
            ("grpc.keepalive_time_ms", int(c.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # A fresh connection per channel: never inherit the one istiod just GOAWAY-ed.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if c.plaintext:
            return grpc.aio.insecure_channel(c.target, options=options)
        if c.root_cert == "":
            raise ConnectError("root cert is empty: give a file, or SYSTEM for the OS roots")
        # Re-read on every connect: the istio-ca-root-cert ConfigMap can rotate.
        path = c.root_cert if c.root_cert and c.root_cert != "SYSTEM" else _system_roots()
        roots = None
        if path:
            try:
                roots = Path(path).read_bytes()
            except OSError as e:
                raise ConnectError(f"cannot read root cert {path}: {e.strerror}") from None
        options.append(("grpc.ssl_target_name_override", c.tls_server_name()))
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(c.target, creds, options=options)

    def _call_metadata(self) -> list[tuple[str, str]]:
        c = self.config
        token = c.token
        if c.token_file:
            token = read_token(c.token_file)  # an empty file is an error, never an empty header
        elif token is not None:
            check_token(token, "the static token")
        md = [("clusterid", c.cluster_id)]
        if token is not None:
            md.insert(0, ("authorization", f"Bearer {token}"))
        md.extend(c.headers)
        return md

    async def _wait_ready(self, channel: grpc.aio.Channel) -> None:
        s = grpc.ChannelConnectivity
        state = channel.get_state(try_to_connect=True)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                while state != s.READY:
                    if state in (s.TRANSIENT_FAILURE, s.SHUTDOWN):
                        raise ConnectError(f"channel {state.name.lower()}")
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            raise ConnectError("connect timeout") from None

    def _initial_request(self, type_url: str, versions: Mapping[str, str]) -> DeltaDiscoveryRequest:
        node = base_pb2.Node(id=self.config.node_id)
        meta = struct_pb2.Struct()
        meta.update(dict(self.config.node_metadata))
        node.metadata.CopyFrom(meta)
        req = DeltaDiscoveryRequest(type_url=type_url, node=node)
        req.initial_resource_versions.update(versions)
        return req

    # --- the stream -------------------------------------------------------------
    async def run_stream(self) -> bool:
        """One stream until it ends; True if the server ended it cleanly (EOF).

        Raises grpc.aio.AioRpcError or ConnectError otherwise.
        """
        channel = self._channel()
        call = None
        try:
            await self._wait_ready(channel)
            stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(metadata=self._call_metadata())
            self.stats.streams += 1
            sent: dict[str, dict[str, str]] = {}
            for type_url in self.config.types:
                held = self._versions[type_url]
                sent[type_url] = (
                    dict(held) if self.config.send_versions else dict.fromkeys(held, "")
                )
                await call.write(self._initial_request(type_url, sent[type_url]))
            _log.info("xds.stream_started", target=self.config.target, stream=self.stats.streams)
            first = True
            while True:
                resp = await call.read()
                if not isinstance(resp, DeltaDiscoveryResponse):  # grpc.aio.EOF
                    return True
                problem = _protocol_problem(resp)
                if problem:
                    self.stats.protocol_errors += 1
                    _log.warning("xds.protocol_error", problem=problem)
                    raise ProtocolError(problem)
                self.stats.last_response_at = time.perf_counter()
                if first:
                    first = False
                    self.stats.connected = True
                    self.stats.first_response_at = self.stats.last_response_at
                    _log.info("xds.connected", target=self.config.target, stream=self.stats.streams)
                    self._event("xds.connected", target=self.config.target)
                reply = self._handle(resp, sent)
                # A full snapshot decodes to megabytes: never hold it across the next read.
                del resp
                await call.write(reply)
        finally:
            self.stats.connected = False
            if call is not None:
                call.cancel()
            await channel.close()

    def _handle(
        self, resp: DeltaDiscoveryResponse, sent: dict[str, dict[str, str]]
    ) -> DeltaDiscoveryRequest:
        """Apply one response; return its ACK or NACK.

        run_stream has checked the lengths of the nonce and type_url (_protocol_problem).
        """
        self.stats.responses += 1
        type_url = resp.type_url
        reply = DeltaDiscoveryRequest(type_url=type_url, response_nonce=resp.nonce)
        watch = self._watches.get(type_url)
        if watch is None or type_url not in self.config.types:
            reply.error_detail.message = f"unsubscribed type {type_url[:256]}"
            self.stats.nacks += 1
            _log.warning("xds.nack", type_url=type_url[:256], reason="unsubscribed type")
            self._event("xds.nack", type_url=type_url[:256], rejected=len(resp.resources))
            return reply
        removed = list(resp.removed_resources)
        initial = sent.pop(type_url, None)  # first response of this type on this stream
        if initial:
            # The server resends what we sent with "" or removes it; the rest is stale.
            mentioned = {r.name for r in resp.resources}
            mentioned.update(removed)
            stale = [n for n, v in initial.items() if not v and n not in mentioned]
            if stale:
                self.stats.stale_dropped += len(stale)
                _log.info("xds.stale_dropped", type_url=type_url, count=len(stale))
                removed.extend(stale)
        result = watch.apply(resp.resources, removed)
        held = self._versions[type_url]
        for name in result.removed:
            held.pop(name, None)
        held.update(result.accepted)
        if initial is not None:
            watch.synced()
            self._synced_types.add(type_url)
            if self._synced_types.issuperset(self.config.types) and not self.synced.is_set():
                self.synced.set()
                self._event("xds.synced")
        _log.debug(
            "xds.response",
            type_url=type_url,
            nonce=resp.nonce,
            resources=len(resp.resources),
            removed=len(removed),
            rejected=len(result.rejected),
            held=len(held),
        )
        if result.rejected:
            reply.error_detail.message = _nack_detail(result.rejected)
            self.stats.nacks += 1
            _log.warning(
                "xds.nack",
                type_url=type_url,
                nonce=resp.nonce,
                rejected=len(result.rejected),
                detail=reply.error_detail.message[:512],
            )
        else:
            self.stats.acks += 1
            self.stats.acked_nonce[type_url] = resp.nonce
        return reply

    # --- forever ----------------------------------------------------------------
    async def run(self) -> None:
        """Keep a stream up until cancelled: fast retry after a healthy stream or a
        GOAWAY-style close, exponential backoff with jitter otherwise."""
        c = self.config
        if c.plaintext and (c.token is not None or c.token_file):
            _log.warning(
                "xds.token_in_cleartext",
                note="--xds-plaintext: the bearer token goes to istiod unencrypted",
                target=c.target,
            )
        failures = 0
        fast_budget = 3
        while True:
            started = time.monotonic()
            responses_before = self.stats.responses
            normal = broken = False
            try:
                normal = await self.run_stream()
                self.stats.last_error = "server closed the stream"
            except ConnectError as e:
                self.stats.last_error = bounded(str(e))
            except ProtocolError as e:
                self.stats.last_error = bounded(f"protocol error: {e}")
                broken = True  # however long the stream lived: back off
            except grpc.aio.AioRpcError as e:
                code = e.code()
                self.stats.last_error = bounded(f"{code.name}: {e.details()}")
                normal = code in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            except Exception as e:  # never let a bug end the feed; back off and retry
                self.stats.last_error = bounded(f"internal error: {e!r}")
                _log.exception("xds.stream_failed")
            healthy = (
                not broken
                and self.stats.responses > responses_before
                and time.monotonic() - started >= c.healthy_stream_s
            )
            if healthy:
                failures, fast_budget = 0, 3
            if healthy or (normal and fast_budget > 0):
                fast_budget -= 0 if healthy else 1
                delay = c.fast_retry_s
            else:
                failures += 1
                delay = min(c.backoff_max_s, c.backoff_initial_s * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
            self.stats.last_delay_s = delay
            self._event("xds.disconnected", error=self.stats.last_error[:512], retry_s=delay)
            _log.info(
                "xds.stream_ended",
                error=self.stats.last_error[:512],
                retry_s=round(delay, 3),
                failures=failures,
            )
            await asyncio.sleep(delay)
