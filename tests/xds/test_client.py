"""Protocol conformance of XdsClient against FakeIstiod over real gRPC on 127.0.0.1,
and the versions it keeps for what its handlers accepted."""

from __future__ import annotations

import ast
import asyncio
import datetime
import inspect
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from eztunnel_lab.fake_istiod import FakeIstiod, make_resource
from eztunnel_plugin import xds
from eztunnel_plugin.errors import ConnectError
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.state.workloads import WorkloadState
from eztunnel_plugin.xds.client import Subscription, XdsClient, XdsConfig, node_id
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE
from eztunnel_plugin.xds.updater import state_watches
from tests.state.testlib import NODE
from tests.xds.testlib import (
    authz_res,
    bad_addr_res,
    plain_config,
    resources,
    run,
    stack,
    wl_res,
    workload,
)


def watches() -> list[Subscription]:
    """Handlers for a state nobody looks at (connection tests)."""
    return state_watches(WorkloadState(NODE))


ENV = {
    "POD_NAME": "ztunnel-abc",
    "POD_NAMESPACE": "istio-system",
    "INSTANCE_IP": "10.1.2.3",
    "NODE_NAME": NODE,
    "ISTIO_META_CLUSTER_ID": "cluster-7",
    "ISTIO_META_ENABLE_HBONE": "true",
    "ISTIO_METAJSON_LABELS": '{"app": "eztunnel"}',
    "XDS_HEADER_X_TENANT": "blue",
    "UNRELATED": "x",
}


def test_config_from_env_defaults() -> None:
    c = XdsConfig.from_env({})
    assert c.target == "istiod.istio-system.svc:15012"
    assert c.tls_server_name() == "istiod.istio-system.svc"
    assert c.root_cert == "/var/run/secrets/istio/root-cert.pem"
    assert c.token_file == "/var/run/secrets/tokens/istio-token"
    assert c.cluster_id == "Kubernetes" and not c.plaintext
    assert c.keepalive_time_s >= 15 and c.max_receive_bytes == 200 * 1024 * 1024
    assert c.node_id == "ztunnel~1.1.1.1~.~.svc.cluster.local"
    c = XdsConfig.from_env(
        {"XDS_ADDRESS": "https://istiod-rev.ns.svc:15012", "AUTH_TOKEN": "static:static-token"}
    )
    assert c.target == "istiod-rev.ns.svc:15012" and c.tls_server_name() == "istiod-rev.ns.svc"
    assert c.token == "static-token" and c.token_file is None
    assert "static-token" not in repr(c)
    # anything else is a file, even one that does not exist (config.py then refuses it)
    c = XdsConfig.from_env({"AUTH_TOKEN": "/var/run/secrets/tokens/istio-tokne"})
    assert c.token is None and c.token_file == "/var/run/secrets/tokens/istio-tokne"
    assert XdsConfig.from_env({"XDS_ADDRESS": "127.0.0.1:15012"}).tls_server_name() == (
        "istiod.istio-system.svc"
    )


def test_initial_subscription_ack_and_headers(tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("tok-1\n")

    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1"), authz=[authz_res("ns", "p")]))
        await fake.start()
        cfg = XdsConfig.from_env(
            {**ENV, "XDS_ADDRESS": fake.address, "AUTH_TOKEN": str(token)}, plaintext=True
        )
        async with stack(fake, cfg, start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await fake.wait_for(lambda: len(fake.records[0].acks) == 2)
            rec = fake.records[0]
            assert rec.metadata["authorization"] == "Bearer tok-1"
            assert rec.metadata["clusterid"] == "cluster-7"
            assert rec.metadata["x_tenant"] == "blue"
            init = rec.initial_requests
            assert [r.type_url for r in init] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
            for r in init:
                assert (
                    r.node.id
                    == "ztunnel~10.1.2.3~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
                )
                meta = {k: v for k, v in r.node.metadata.fields.items()}
                assert {k: v.string_value for k, v in meta.items() if k != "LABELS"} == {
                    "NAME": "ztunnel-abc",
                    "NAMESPACE": "istio-system",
                    "INSTANCE_IPS": "10.1.2.3",
                    "NODE_NAME": NODE,
                    "CLUSTER_ID": "cluster-7",
                    "ENABLE_HBONE": "true",
                }
                assert meta["LABELS"].struct_value.fields["app"].string_value == "eztunnel"
                assert not r.resource_names_subscribe and not r.resource_names_unsubscribe
                assert not r.initial_resource_versions and not r.HasField("error_detail")
            # ACKs: type and nonce only; no node, no subscriptions, no error
            sent = {r.type_url: r.nonce for r in rec.responses}
            for ack in rec.acks:
                assert ack.response_nonce == sent[ack.type_url]
                assert not ack.HasField("node") and not ack.resource_names_subscribe
                assert not ack.initial_resource_versions
            assert rec.ignored_nonces == [] and not rec.nacks
            await s.settled()
            assert s.sink.entries == {"10.0.0.1": 1}
            assert s.client.stats.connected and s.client.stats.acked_nonce[ADDRESS_TYPE] == "n1"

    run(body())


def test_nack_partial_acceptance_then_fix() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            fake.update(
                ADDRESS_TYPE,
                add=[
                    wl_res("u/b", "10.0.0.2"),
                    bad_addr_res("u/c", b"\x0a\x00\x00"),
                    wl_res("u/d", "10.0.0.4", tunnel=wl.LEGACY_ISTIO_MTLS),
                ],
            )
            rec = fake.records[0]
            await fake.wait_for(lambda: len(rec.nacks) == 1)
            nack = rec.nacks[0]
            assert nack.type_url == ADDRESS_TYPE
            assert nack.response_nonce == rec.responses[-1].nonce
            assert nack.error_detail.code == 0  # as ztunnel: message only
            assert nack.error_detail.message == (
                "u/c: address 0: address has 3 bytes, want 4 or 16; "
                "u/d: unsupported tunnel protocol: LEGACY_ISTIO_MTLS"
            )
            assert not nack.HasField("node")
            await s.settled(lambda: "10.0.0.2" in s.sink.entries)
            assert set(s.state.workloads) == {"u/a", "u/b"}  # the good one was applied
            assert s.sink.entries == {"10.0.0.1": 1, "10.0.0.2": 1}
            fake.update(ADDRESS_TYPE, add=[wl_res("u/c", "10.0.0.3")])
            await fake.wait_for(lambda: len(rec.acks) == 3)
            await s.settled(lambda: "10.0.0.3" in s.sink.entries)
            assert s.client.stats.nacks == 1

    run(body())


def test_removals_and_unsubscribed_type() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.2")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await s.settled(lambda: len(s.sink.entries) == 2)
            fake.update(ADDRESS_TYPE, remove=["u/a"])
            await s.settled(lambda: "u/a" not in s.state.workloads)
            assert s.sink.entries == {"10.0.0.2": 1}
            assert list(fake.records[0].responses[-1].removed_resources) == ["u/a"]
            fake.push_raw(discovery_pb2.DeltaDiscoveryResponse(type_url="type.googleapis.com/x.Y"))
            rec = fake.records[0]
            await fake.wait_for(lambda: len(rec.nacks) == 1)
            assert rec.nacks[0].error_detail.message == "unsubscribed type type.googleapis.com/x.Y"
            assert s.sink.entries == {"10.0.0.2": 1}

    run(body())


def _reconnect_case(send_removals: bool) -> None:
    async def body() -> None:
        fake = FakeIstiod(
            resources(
                wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.2"), bad_addr_res("u/bad", b"")
            ),
            send_removals=send_removals,
        )
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await s.settled(lambda: len(s.sink.entries) == 2)
            await fake.stop()  # clients see GOAWAY / UNAVAILABLE
            fake.update(ADDRESS_TYPE, remove=["u/a"], add=[wl_res("u/c", "10.0.0.3")])
            await fake.start()
            await fake.wait_for(
                lambda: (
                    len(fake.records) == 2
                    and len(fake.records[1].acks) + len(fake.records[1].nacks) == 2
                )
            )
            second = fake.records[1]
            versions = {
                r.type_url: dict(r.initial_resource_versions) for r in second.initial_requests
            }
            # every held name, with "" versions; the rejected one is not held, so not listed
            assert versions == {ADDRESS_TYPE: {"u/a": "", "u/b": ""}, AUTHORIZATION_TYPE: {}}
            first_resp = next(r for r in second.responses if r.type_url == ADDRESS_TYPE)
            assert list(first_resp.removed_resources) == (["u/a"] if send_removals else [])
            await s.settled(lambda: "u/a" not in s.state.workloads)
            assert set(s.state.workloads) == {"u/b", "u/c"}
            assert s.sink.entries == {"10.0.0.2": 1, "10.0.0.3": 1}
            assert s.client.stats.stale_dropped == (0 if send_removals else 1)

    run(body())


def test_reconnect_sends_initial_resource_versions() -> None:
    _reconnect_case(send_removals=True)


def test_reconnect_drops_stale_state_without_server_removals() -> None:
    _reconnect_case(send_removals=False)


def test_send_versions_keeps_what_the_server_skips() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.2")))
        await fake.start()
        async with stack(fake, plain_config(fake.port, send_versions=True), start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            fake.close_streams()
            await fake.wait_for(lambda: len(fake.records) == 2 and len(fake.records[1].acks) == 2)
            init = fake.records[1].initial_requests[0]
            assert dict(init.initial_resource_versions) == {
                n: r.version for n, r in fake.resources[ADDRESS_TYPE].items()
            }
            assert len(fake.records[1].responses[0].resources) == 0  # istiod 1.31 skips them
            assert set(s.state.workloads) == {"u/a", "u/b"}  # and we keep them
            assert s.client.stats.stale_dropped == 0

    run(body())


def test_goaway_reconnects_immediately_without_losing_state() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await s.settled(lambda: bool(s.sink.entries))
            ops = len(s.sink.ops)
            await fake.goaway()
            await fake.wait_for(lambda: len(fake.records) == 2 and len(fake.records[1].acks) == 2)
            assert s.client.stats.last_delay_s == s.client.config.fast_retry_s
            assert s.client.stats.last_error.startswith("UNAVAILABLE")
            assert len(s.sink.ops) == ops  # nothing removed and re-added across the reconnect

    run(body())


def test_max_connection_age_goaway_like_istiod() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")), max_connection_age_s=0.3)
        async with stack(fake) as s:
            await fake.wait_for(
                lambda: len(fake.records) >= 3 and all(len(r.acks) == 2 for r in fake.records[:3]),
                timeout=10,
            )
            assert all(r.closed for r in fake.records[:2])  # the server aged them out
            assert s.state.workloads.keys() == {"u/a"} and s.sink.entries == {"10.0.0.1": 1}

    run(body())


def _make_ca(tmp: Path) -> tuple[Path, bytes, bytes, Path]:
    """A test CA, a server cert for istiod.istio-system.svc, and an unrelated CA."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("istiod.istio-system.svc")]),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test-root", ca_key, "test-root", ca_key, True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = cert("istiod", srv_key, "test-root", ca_key, False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = cert("other-root", other_key, "other-root", other_key, True)
    (tmp / "root-cert.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "other.pem").write_bytes(other.public_bytes(pem))
    key_pem = srv_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return tmp / "root-cert.pem", srv.public_bytes(pem), key_pem, tmp / "other.pem"


def test_tls_with_test_ca_and_rotating_bearer_token(tmp_path: Path) -> None:
    root, cert, key, other_root = _make_ca(tmp_path)
    token = tmp_path / "istio-token"
    token.write_text("first")

    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")), expected_token="first")
        await fake.start(tls=(cert, key))
        cfg = plain_config(fake.port, plaintext=False, root_cert=str(root), token_file=str(token))
        assert cfg.tls_server_name() == "istiod.istio-system.svc"  # the address is an IP
        async with stack(fake, cfg, start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            assert fake.records[0].metadata["authorization"] == "Bearer first"
            # the token rotates; the next connection must carry the new one
            token.write_text("second")
            fake.expected_token = "second"
            fake.close_streams()
            await fake.wait_for(lambda: len(fake.records) == 2)
            assert fake.records[1].metadata["authorization"] == "Bearer second"
            assert s.state.workloads.keys() == {"u/a"}

    run(body())

    async def untrusted() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        await fake.start(tls=(cert, key))
        state = WorkloadState(NODE)
        client = XdsClient(
            plain_config(fake.port, plaintext=False, root_cert=str(other_root)),
            state_watches(state),
        )
        with pytest.raises(Exception, match="channel transient_failure"):
            await client.run_stream()
        system = XdsClient(  # the OS bundle does not trust the test CA
            plain_config(fake.port, plaintext=False, root_cert="SYSTEM"), watches()
        )
        with pytest.raises(Exception, match="channel transient_failure"):
            await system.run_stream()
        plain = XdsClient(plain_config(fake.port), watches())  # plaintext to TLS
        with pytest.raises(Exception, match=r"transient_failure|UNAVAILABLE"):
            await plain.run_stream()
        assert fake.records == [] and not state.workloads
        await fake.stop()

    run(untrusted())


def test_oversized_message_is_refused_then_recovers() -> None:
    def big(uid: str, ip: str, size: int) -> Any:
        w = workload(uid, ip)
        w.extensions.add(name="pad", config=any_pb2.Any(type_url="x/y", value=b"\0" * size))
        return make_resource(uid, ADDRESS_TYPE, wl.Address(workload=w))

    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        await fake.start()
        cfg = plain_config(fake.port, max_receive_bytes=1024 * 1024)
        async with stack(fake, cfg, start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await s.settled(lambda: bool(s.sink.entries))
            version = s.state.version
            fake.update(ADDRESS_TYPE, add=[big("u/big", "10.0.0.2", 2 * 1024 * 1024)])
            for _ in range(500):
                if s.client.stats.last_error.startswith("RESOURCE_EXHAUSTED"):
                    break
                await asyncio.sleep(0.01)
            assert s.client.stats.last_error.startswith("RESOURCE_EXHAUSTED")
            assert s.state.version == version and s.sink.entries == {"10.0.0.1": 1}
            fake.update(ADDRESS_TYPE, remove=["u/big"], add=[wl_res("u/c", "10.0.0.3")])
            await s.settled(lambda: "10.0.0.3" in s.sink.entries)
            assert "u/big" not in s.state.workloads

        # the default limit takes what gRPC's 4 MiB default would refuse
        fake = FakeIstiod(resources(big("u/huge", "10.0.0.9", 5 * 1024 * 1024)))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            assert s.state.workloads.keys() == {"u/huge"}

    run(body())


def test_token_file_missing_backs_off(tmp_path: Path) -> None:
    async def body() -> None:
        fake = FakeIstiod()
        await fake.start()
        cfg = plain_config(fake.port, token_file=str(tmp_path / "missing"))
        async with stack(fake, cfg, start=False) as s:
            for _ in range(300):
                if s.client.stats.last_delay_s > s.client.config.fast_retry_s:
                    break
                await asyncio.sleep(0.01)
            assert "cannot read token file" in s.client.stats.last_error
            assert str(tmp_path) in s.client.stats.last_error
            assert fake.records == []

    run(body())


def test_node_id_format() -> None:
    assert node_id("10.0.0.5", "ztunnel-x", "istio-system") == (
        "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    )


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_handle_never_raises_on_decodable_garbage(raw: bytes) -> None:
    """Whatever decodes as a DeltaDiscoveryResponse gets an ACK or NACK, never an exception."""
    try:
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    except Exception:
        return  # gRPC would fail the stream; the client reconnects
    resp.type_url = ADDRESS_TYPE
    client = XdsClient(plain_config(1), watches())
    reply = client._handle(resp, {ADDRESS_TYPE: {}})
    assert reply.type_url == ADDRESS_TYPE and reply.response_nonce == resp.nonce


def test_backoff_grows_when_nothing_answers() -> None:
    async def body() -> None:
        client = XdsClient(plain_config(1, connect_timeout_s=0.5), watches())
        task = asyncio.create_task(client.run())
        delays: list[float] = []
        try:
            for _ in range(300):
                await asyncio.sleep(0.01)
                if client.stats.last_delay_s and (
                    not delays or delays[-1] != client.stats.last_delay_s
                ):
                    delays.append(client.stats.last_delay_s)
                if len(delays) >= 4:
                    break
        finally:
            task.cancel()
        assert len(delays) >= 4
        assert delays[3] > delays[0]  # exponential, with jitter in [0.5, 1] x
        assert max(delays) <= client.config.backoff_max_s
        assert (
            "transient_failure" in client.stats.last_error or "timeout" in client.stats.last_error
        )

    run(body())


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL])
def test_non_transport_errors_back_off(code: grpc.StatusCode) -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            fake.close_streams(code, "boom")
            await fake.wait_for(lambda: len(fake.records) == 2)
            assert s.client.stats.last_error == "INTERNAL: boom"
            # the stream was short (< healthy_stream_s) and the error is not a transport close
            assert s.client.stats.last_delay_s > s.client.config.fast_retry_s

    run(body())


# --- bounded strings from the server, tokens, TLS roots ------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("nonce", "N" * (20 << 20)), ("type_url", ADDRESS_TYPE + "/" + "x" * 4096)],
)
def test_oversize_nonce_or_type_url_drops_the_stream(field: str, value: str) -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            await s.settled(lambda: bool(s.sink.entries))
            bad = discovery_pb2.DeltaDiscoveryResponse(
                type_url=ADDRESS_TYPE, nonce="n-bad", resources=[wl_res("u/b", "10.0.0.2")]
            )
            setattr(bad, field, value)
            with capture_logs() as logs:
                fake.push_raw(bad)
                await fake.wait_for(
                    lambda: len(fake.records) == 2 and len(fake.records[1].acks) == 2, timeout=10
                )
            st = s.client.stats
            assert st.protocol_errors == 1 and st.nacks == 0
            assert st.last_error.startswith("protocol error:") and len(st.last_error) < 700
            assert st.last_delay_s > s.client.config.fast_retry_s  # backed off
            # never echoed: every request either stream sent is small
            for rec in fake.records:
                for req in rec.requests:
                    assert len(req.SerializeToString()) < 4096
            assert all(len(repr(e)) < 4096 for e in logs)
            assert "u/b" not in s.state.workloads and s.sink.entries == {"10.0.0.1": 1}

    run(body())


def test_server_error_details_are_bounded() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        async with stack(fake) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            fake.close_streams(grpc.StatusCode.INTERNAL, "boom " * 1000)
            await fake.wait_for(lambda: len(fake.records) == 2)
            err = s.client.stats.last_error
            assert err.startswith("INTERNAL: boom boom") and len(err) < 600
            assert err.endswith("... (5010 characters)")  # 10 of them: "INTERNAL: "

    run(body())


def test_plaintext_with_a_token_warns_once() -> None:
    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        await fake.start()
        with capture_logs() as logs:
            async with stack(fake, plain_config(fake.port, token="s3cr3t"), start=False) as s:
                await asyncio.wait_for(s.client.synced.wait(), 5)
                fake.close_streams()
                await fake.wait_for(
                    lambda: len(fake.records) == 2 and len(fake.records[1].acks) == 2
                )
        assert fake.records[1].metadata["authorization"] == "Bearer s3cr3t"
        warned = [e for e in logs if e["event"] == "xds.token_in_cleartext"]
        assert len(warned) == 1 and warned[0]["log_level"] == "warning"
        assert "s3cr3t" not in repr(logs)

        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        with capture_logs() as logs:
            async with stack(fake) as s:  # no token: nothing to warn about
                await asyncio.wait_for(s.client.synced.wait(), 5)
        assert not [e for e in logs if e["event"] == "xds.token_in_cleartext"]

    run(body())


def test_empty_token_file_at_reconnect_backs_off_and_sends_nothing(tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("tok-1")

    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1")))
        await fake.start()
        async with stack(fake, plain_config(fake.port, token_file=str(token)), start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            token.write_text("\n")  # a rotation caught half way
            fake.close_streams()
            for _ in range(300):
                if "is empty" in s.client.stats.last_error:
                    break
                await asyncio.sleep(0.01)
            assert s.client.stats.last_error == f"token file {token} is empty"
            assert s.client.stats.last_delay_s > s.client.config.fast_retry_s
            assert len(fake.records) == 1  # no stream went out without the header
            token.write_text("tok-2\n")
            await fake.wait_for(lambda: len(fake.records) == 2, timeout=10)
            assert fake.records[1].metadata["authorization"] == "Bearer tok-2"
            assert s.state.workloads.keys() == {"u/a"}

    run(body())


def test_empty_root_cert_is_a_connect_error() -> None:
    async def body() -> None:
        client = XdsClient(plain_config(1, plaintext=False, root_cert=""), watches())
        with pytest.raises(ConnectError, match="root cert is empty"):
            await client.run_stream()

    run(body())


# --- versions live in the client ---------------------------------------------------
def test_a_subscribed_type_without_a_handler_is_refused() -> None:
    only_address = [w for w in watches() if w.type_url == ADDRESS_TYPE]
    with pytest.raises(ValueError, match=f"no handler for subscribed type {AUTHORIZATION_TYPE}"):
        XdsClient(plain_config(1), only_address)
    XdsClient(plain_config(1, types=(ADDRESS_TYPE,)), only_address)  # not subscribed: fine


def response(nonce: str, *res: Any, removed: tuple[str, ...] = ()) -> Any:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE, nonce=nonce, resources=list(res), removed_resources=removed
    )


def versioned(res: Any, version: str) -> Any:
    res.version = version
    return res


def test_held_versions_follow_what_the_state_accepted() -> None:
    state = WorkloadState(NODE)
    client = XdsClient(plain_config(1), state_watches(state))
    sent: dict[str, dict[str, str]] = {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}
    client._handle(
        response(
            "n1",
            versioned(wl_res("u/a", "10.0.0.1"), "a1"),
            versioned(wl_res("u/b", "10.0.0.2"), "b1"),
            versioned(bad_addr_res("u/bad", b"\x00"), "x1"),  # rejected: never held
        ),
        sent,
    )
    assert client.held(ADDRESS_TYPE) == {"u/a": "a1", "u/b": "b1"}
    # b's update takes a's address: the state refuses it and keeps b1, so does the client
    reply = client._handle(
        response(
            "n2",
            versioned(wl_res("u/b", "10.0.0.1"), "b2"),
            versioned(wl_res("u/c", "10.0.0.3"), "c1"),
        ),
        sent,
    )
    assert reply.error_detail.message == "u/b: duplicate address 10.0.0.1: already held by u/a"
    assert client.held(ADDRESS_TYPE) == {"u/a": "a1", "u/b": "b1", "u/c": "c1"}
    assert state.workloads["u/b"].addresses == ("10.0.0.2",)
    # a decode failure of a held name keeps its old version too; removals drop theirs
    reply = client._handle(
        response("n3", versioned(bad_addr_res("u/a", b""), "a2"), removed=("u/c", "u/none")),
        sent,
    )
    assert reply.error_detail.message.startswith("u/a: address 0:")
    assert client.held(ADDRESS_TYPE) == {"u/a": "a1", "u/b": "b1"}
    # removed and resent in one response: it stays, at the new version
    client._handle(
        response("n4", versioned(wl_res("u/b", "10.0.0.2"), "b3"), removed=("u/b",)), sent
    )
    assert client.held(ADDRESS_TYPE) == {"u/a": "a1", "u/b": "b3"} and "u/b" in state.workloads
    client.held(ADDRESS_TYPE).clear()  # a copy: readers cannot change what is resent
    assert set(client.held(ADDRESS_TYPE)) == set(state.workloads)  # one view, two owners
    assert client.held(AUTHORIZATION_TYPE) == {}
    assert not client.synced.is_set()  # no first response of either type was marked


def test_reconnect_after_a_refused_update_sends_the_accepted_version() -> None:
    """send_versions: what the client sends back is the version the state holds, so a
    refused update (kept at its old version) is resent by the server, never skipped."""

    async def body() -> None:
        fake = FakeIstiod(resources(wl_res("u/a", "10.0.0.1"), wl_res("u/b", "10.0.0.2")))
        await fake.start()
        async with stack(fake, plain_config(fake.port, send_versions=True), start=False) as s:
            await asyncio.wait_for(s.client.synced.wait(), 5)
            accepted = {n: r.version for n, r in fake.resources[ADDRESS_TYPE].items()}
            assert s.client.held(ADDRESS_TYPE) == accepted
            fake.update(ADDRESS_TYPE, add=[wl_res("u/b", "10.0.0.1")])  # refused: a has it
            await fake.wait_for(lambda: len(fake.records[0].nacks) == 1)
            assert fake.resources[ADDRESS_TYPE]["u/b"].version != accepted["u/b"]
            fake.close_streams()
            await fake.wait_for(
                lambda: len(fake.records) == 2 and len(fake.records[1].initial_requests) == 2
            )
            init = fake.records[1].initial_requests[0]
            assert dict(init.initial_resource_versions) == accepted
            # the server resends b (its version differs) and it is refused again
            await fake.wait_for(lambda: len(fake.records[1].nacks) == 1)
            assert s.state.workloads["u/b"].addresses == ("10.0.0.2",)
            assert s.client.held(ADDRESS_TYPE) == accepted

    run(body())


def test_the_handling_code_has_no_any() -> None:
    """Messages are typed (mypy reads the generated stubs): typing.Any appears in xds/
    only for the loosely typed keyword overrides of XdsConfig.from_env."""
    allowed: set[int] = set()
    found = []
    for path in sorted(Path(inspect.getfile(xds)).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "from_env":
                allowed.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "Any" and id(node) not in allowed:
                found.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "Any":
                found.append(f"{path.name}:{node.lineno}")
    assert not found
    assert len(allowed) > 0  # the exemption still names a real function
