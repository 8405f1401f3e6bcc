"""The agent against the fake istiod, end to end: xDS -> state -> BPF map -> spliced flows,
and the inspection API through the real grpcurl."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from eztunnel_lab.netlab import Lab, Pod, wait_listening

from .conftest import PY, finish_hold, hold_client, hold_server, wait_for, wait_line
from .test_agent import AgentProc, free_port

pytestmark = pytest.mark.kernel

NODE = "node-1"
ENV = {"POD_NAME": "eztunnel-abc", "POD_NAMESPACE": "istio-system", "INSTANCE_IP": "10.0.0.1"}


def workload(pod: Pod, name: str, node: str = NODE, protocol: str = "HBONE") -> dict[str, object]:
    return {
        "uid": f"Kubernetes//Pod/default/{name}",
        "name": name,
        "namespace": "default",
        "addresses": [pod.ip4, pod.ip6],
        "node": node,
        "tunnel_protocol": protocol,
        "service_account": name,
    }


class Istiod:
    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.addr = f"127.0.0.1:{free_port()}"
        self.push([])
        self.proc = subprocess.Popen(
            [PY, "-m", "eztunnel_lab", "fake-istiod", "--workloads", str(path),
             "--listen", self.addr, "--poll-interval", "0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            port = int(self.addr.rsplit(":", 1)[1])
            wait_listening(None, [port], proc=self.proc, what="fake istiod listening")
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def push(self, workloads: list[dict[str, object]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"workloads": workloads, "services": [],
                                       "authorizations": []}))  # fmt: skip
        tmp.replace(self.path)


@pytest.fixture
def istiod(lab: Lab, tmp_path: Path) -> Iterator[Istiod]:
    server = Istiod(lab, tmp_path / "workloads.yaml")
    yield server
    server.proc.kill()
    server.proc.wait(timeout=10)


@pytest.fixture
def agent(lab: Lab, istiod: Istiod) -> Iterator[AgentProc]:
    proc = AgentProc(lab, "--xds-address", istiod.addr, "--xds-plaintext",
                     "--node-name", NODE, env=ENV)  # fmt: skip
    yield proc
    proc.stop()


def enrolled(agent: AgentProc) -> dict[str, bool]:
    eps = agent.cli_json("endpoints")["endpoints"]
    return {e["ip"]: e.get("in_map", False) for e in eps}


def test_enrolment_follows_istiod_and_flows_splice(
    lab: Lab, istiod: Istiod, agent: AgentProc
) -> None:
    a, b, c = lab.add_pod(), lab.add_pod(), lab.add_pod()
    agent.wait_serving()  # an empty mesh is a complete snapshot too
    assert enrolled(agent) == {}
    # c is on another node and a sidecar-less non-mesh workload: never enrolled.
    istiod.push([workload(a, "a"), workload(b, "b"), workload(c, "c", node="node-2")])
    wait_for(lambda: len(enrolled(agent)) == 4, what="a and b enrolled")
    assert all(enrolled(agent).values())
    status = agent.cli_json("status")
    assert status["xds"]["connected"] is True
    assert status["xds"]["complete"] is True
    types = {t["type_url"]: t for t in status["xds"]["types"]}
    assert types["type.googleapis.com/istio.workload.Address"]["last_acked_nonce"]
    listed = agent.cli_json("endpoints")["endpoints"]
    assert {(e["name"], e["workload_uid"], e["node"], e["protocol"]) for e in listed} == {
        ("a", "Kubernetes//Pod/default/a", NODE, "HBONE"),
        ("b", "Kubernetes//Pod/default/b", NODE, "HBONE"),
    }

    hold_server(lab, b, "0.0.0.0", 9000)
    flow = hold_client(lab, a, b.ip4, 9000)
    table = agent.cli("flows").stdout
    assert f"{b.ip4}:9000" in table and "cross_mirror" in table
    assert int(agent.cli_json("stats")["counters"]["pairs"]) == 1

    # b leaves the mesh: un-enrolled, new flows are no longer spliced, the live one goes on.
    istiod.push([workload(a, "a"), workload(b, "b", protocol="NONE")])
    wait_for(lambda: set(enrolled(agent)) == {a.ip4, a.ip6}, what="b un-enrolled")
    late = hold_client(lab, a, b.ip4, 9000)
    assert int(agent.cli_json("stats")["counters"]["pairs"]) == 1
    finish_hold(late, rounds=1)
    finish_hold(flow, rounds=2)


def spliced_pair(
    lab: Lab, istiod: Istiod, agent: AgentProc
) -> tuple[Pod, Pod, subprocess.Popen[bytes]]:
    """Two pods istiod enrolls, and a live connection a -> b:9000 between them."""
    a, b = lab.add_pod(), lab.add_pod()
    istiod.push([workload(a, "a"), workload(b, "b")])
    agent.wait_serving()
    wait_for(lambda: len(enrolled(agent)) == 4, what="enrolled")
    hold_server(lab, b, "0.0.0.0", 9000)
    return a, b, hold_client(lab, a, b.ip4, 9000)


def test_restart_keeps_flows_and_reconverges(lab: Lab, istiod: Istiod, agent: AgentProc) -> None:
    a, _b, flow = spliced_pair(lab, istiod, agent)

    agent.proc.kill()
    agent.proc.wait(timeout=10)
    istiod.push([workload(a, "a")])  # b removed while no agent runs
    assert flow.stdin is not None
    flow.stdin.write(b"x\n")
    flow.stdin.flush()
    wait_line(flow, "round 1")

    agent.start()
    agent.wait_serving()
    wait_for(lambda: set(enrolled(agent)) == {a.ip4, a.ip6}, what="stale entries removed")
    raw = agent.cli_json("endpoints")
    assert raw.get("unexpected_in_map", []) == []
    assert len(agent.cli_json("flows")) == 1
    finish_hold(flow, rounds=2)


def test_health_not_serving_until_first_snapshot(lab: Lab, tmp_path: Path) -> None:
    # No istiod at this address: the agent loads BPF but must never become ready.
    agent = AgentProc(lab, "--xds-address", f"127.0.0.1:{free_port()}", "--xds-plaintext",
                      "--node-name", NODE, env=ENV)  # fmt: skip
    try:
        wait_for(lambda: agent.cli("status", check=False).returncode == 0, what="API up")
        r = agent.cli("health", check=False)
        assert r.returncode == 1 and "NOT_SERVING" in r.stdout
        status = agent.cli_json("status")
        assert status["ready"] is False and status["xds"]["connected"] is False
        assert status["xds"]["last_error"]
    finally:
        agent.stop()


# ---- grpcurl ---------------------------------------------------------------------------


GRPCURL = shutil.which("grpcurl") or str(Path(PY).parent / "grpcurl")


def grpcurl(addr: str, *rest: str, flags: tuple[str, ...] = ()) -> str:
    """grpcurl -plaintext [flags] ADDR [rest...] (list, describe SYMBOL, or METHOD)."""
    r = subprocess.run([GRPCURL, "-plaintext", *flags, addr, *rest], capture_output=True,
                       text=True, timeout=30, check=False)  # fmt: skip
    assert r.returncode == 0, f"grpcurl {rest}: {r.stderr}"
    return r.stdout


def test_grpcurl_reflection_and_every_method(lab: Lab, istiod: Istiod, agent: AgentProc) -> None:
    a, b, flow = spliced_pair(lab, istiod, agent)

    services = grpcurl(agent.addr, "list").split()
    assert {"eztunnel.v1.Inspector", "grpc.health.v1.Health"} <= set(services)
    assert "eztunnel.v1.Admin" not in services  # state changes: the admin socket only
    desc = grpcurl(agent.addr, "describe", "eztunnel.v1.Inspector")
    for method in ("GetStatus", "ListEndpoints", "ListFlows", "GetStats", "WatchEvents"):
        assert f"rpc {method}" in desc
    assert "SetEnabled" not in desc

    def call(method: str, body: str = "{}") -> Any:
        out = grpcurl(agent.addr, f"eztunnel.v1.Inspector/{method}", flags=("-d", body))
        return json.loads(out) if out.strip() else {}

    assert call("GetStatus")["node"] == NODE
    assert {e["ip"] for e in call("ListEndpoints")["endpoints"]} == {a.ip4, a.ip6, b.ip4, b.ip6}
    page = call("ListFlows", '{"page_size": 1}')
    assert len(page["flows"]) == 1 and page["flows"][0]["rule"] == "cross_mirror"
    stats = call("GetStats")
    assert int(stats["counters"]["pairs"]) == 1
    assert "no_peer" in stats["not_paired_reasons"]

    # The kill switch: on the admin socket, with reflection there too.
    unix = ("-unix",)
    admin = str(agent.admin)
    assert {"eztunnel.v1.Admin", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        grpcurl(admin, "list", flags=unix).split()
    )
    assert "rpc SetEnabled" in grpcurl(admin, "describe", "eztunnel.v1.Admin", flags=unix)
    off = grpcurl(admin, "eztunnel.v1.Admin/SetEnabled", flags=(*unix, "-d", '{"enabled": false}'))
    assert json.loads(off) == {}  # false is the default value
    assert call("GetStatus").get("enabled", False) is False
    on = grpcurl(admin, "eztunnel.v1.Admin/SetEnabled", flags=(*unix, "-d", '{"enabled": true}'))
    assert json.loads(on)["enabled"] is True
    assert call("GetStatus")["enabled"] is True

    # WatchEvents: a stream that shows the next enrolment as it happens.
    watch = subprocess.Popen(
        [GRPCURL, "-plaintext", "-max-time", "15", "-d", "{}", agent.addr,
         "eztunnel.v1.Inspector/WatchEvents"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        c = lab.add_pod()
        wait_line(watch, '  "kind": "watch.started"', timeout=15)
        istiod.push([workload(a, "a"), workload(b, "b"), workload(c, "c")])
        line = wait_line(watch, '  "kind": "endpoint.enrolled"', timeout=15)
        assert line
    finally:
        watch.kill()
        watch.wait(timeout=10)
    finish_hold(flow, rounds=1)


def test_stale_feed_turns_health_off_and_back(lab: Lab, istiod: Istiod) -> None:
    a = lab.add_pod()
    server = istiod  # the fixture kills it even if the test fails before we do
    server.push([workload(a, "a")])
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProc(lab, "--xds-address", server.addr, "--xds-plaintext", "--node-name", NODE,
                      "--xds-stale-after", "1", "--metrics-listen", metrics,
                      env={**ENV, "AUTH_TOKEN": "static:s3cr3t-token-value"})  # fmt: skip
    try:
        agent.wait_serving()
        body = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
        assert "eztunnel_ready 1.0" in body and 'eztunnel_pairs_total{rule="capture"}' in body
        assert "eztunnel_endpoints_enrolled 2.0" in body and "eztunnel_xds_connected 1.0" in body

        server.proc.kill()
        server.proc.wait(timeout=10)
        wait_for(lambda: agent.cli("health", check=False).returncode == 1, timeout=15,
                 what="NOT_SERVING while stale")  # fmt: skip
        status = agent.cli_json("status")
        assert status["xds"]["stale"] is True and status["xds"]["connected"] is False
        assert set(enrolled(agent)) == {a.ip4, a.ip6}  # live state kept, nothing flushed

        restarted = subprocess.Popen(server.proc.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for(lambda: agent.cli("health", check=False).returncode == 0, timeout=30,
                     what="SERVING again after reconnect")  # fmt: skip
        finally:
            restarted.kill()
            restarted.wait(timeout=10)
    finally:
        log = agent.terminate()
        agent.stop()
    assert '"event": "xds.stale"' in log  # JSON logs, one event per state change
    assert "s3cr3t-token-value" not in log
