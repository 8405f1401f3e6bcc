"""The pairing never splices a socket to anything but its own TCP peer (issue 9).

Each test sets up what a review found could make the pairing pick the wrong
socket, then asserts real outcomes: bytes written on a socket reach only its TCP
peer, and the pairing table (by SO_COOKIE) never ties a socket to a stranger.

- A captured connection whose source port NAT remapped onto an idle socket's
  endpoint (the capture rule matched the idle socket by endpoint alone).
- A cross-netns key made ambiguous by two claimants, whose first owner closes
  and publishes again (the ambiguity marker went with the owner).
- A cross-netns tuple forged from another netns, with IP_TRANSPARENT or with
  TCP_REPAIR (which "connects" with chosen sequence numbers, sending nothing).

Where an attack needs the real connection half-open (its connect() returned,
its server has not seen the final ACK yet), the server's netns drops the
client's pure ACKs until the attacker is in place: TCP retransmits the SYN-ACK,
so the handshake completes once the rule is gone. This is deterministic and
needs no qdisc (this kernel has no netem).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.bpf.maps import Dataplane

from ..conftest import enroll
from .tools.pairlab import Arena, pairs_of
from .tools.sockd import SockD

pytestmark = pytest.mark.kernel

SERVER_PORT = 9000
VIP = "10.96.0.10"  # a service address, DNATed inside the client's netns


@pytest.fixture
def arena(lab: Lab) -> Iterator[Arena]:
    world = Arena(lab)
    try:
        yield world
    finally:
        world.close()


def tagged(what: str) -> bytes:
    return f"{what}:{os.urandom(8).hex()}".encode()


def send(d: SockD, sock: dict[str, Any], data: bytes) -> None:
    d.call("send", id=sock["id"], data=data.hex())


def receive(d: SockD, want: dict[int, int], timeout: float = 2.0) -> dict[int, bytes]:
    """What arrived on each socket: up to `want` bytes plus anything already queued."""
    got = d.call("recv_many", want={str(k): n for k, n in want.items()}, timeout=timeout)
    return {int(k): bytes.fromhex(v["data"]) for k, v in got.items() if k != "ok"}


def hold_final_ack(
    arena: Arena, server: Pod, client_ip: str, client_port: int
) -> Callable[[], None]:
    """Keep the server half-open: drop the client's pure ACKs; returns the undo."""
    rule = ["INPUT", "-p", "tcp", "-s", client_ip, "--sport", str(client_port),
            "--dport", str(SERVER_PORT), "--tcp-flags", "ALL", "ACK", "-j", "DROP"]  # fmt: skip
    arena.iptables(server.name, "-A", *rule)
    return lambda: arena.iptables(server.name, "-D", *rule)


def assert_half_open(d: SockD, listener: int) -> None:
    # The attack's window is real: the server's socket is not established yet.
    assert not d.call("pending", id=listener)["pending"], "handshake completed too early"


def assert_never_tied(dp: Dataplane, cookie: int, strangers: set[int]) -> None:
    tied = pairs_of(dp, cookie)
    assert not tied & strangers, f"socket {cookie} paired with a stranger: {dp.sockinfo.flows()}"


# 1. --------------------------------------------------------------------------


def test_capture_remapped_onto_idle_socket_endpoint(lab: Lab, dp: Dataplane, arena: Arena) -> None:
    a, b, c = lab.add_pod(), lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)  # c is outside the mesh: W, A's socket towards it, stays unpaired
    idle_port, client_port = 40500, 40600
    arena.iptables(a.name, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", b.ip4,
                   "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15001")  # fmt: skip
    # What a TIME_WAIT conntrack entry does to a reused source port, made deterministic.
    arena.iptables(a.name, "-t", "nat", "-A", "POSTROUTING", "-p", "tcp", "-s", a.ip4,
                   "--sport", str(client_port), "-j", "SNAT",
                   "--to-source", f"{a.ip4}:{idle_port}")  # fmt: skip
    ad, cd = arena.sockd(a), arena.sockd(c)
    quiet = cd.call("listen", host="0.0.0.0", port=7000)["id"]  # speaks only when spoken to
    proxy = ad.call("listen", host="0.0.0.0", port=15001)["id"]

    w = ad.call("connect", host=c.ip4, port=7000, src=a.ip4, sport=idle_port)
    wc = cd.call("accept", id=quiet)
    k = ad.call("connect", host=b.ip4, port=8080, src=a.ip4, sport=client_port)
    kp = ad.call("accept", id=proxy)
    assert kp["remote"] == [a.ip4, idle_port], "the remap did not happen; the test proves nothing"

    greeting = tagged("proxy-greeting")
    send(ad, kp, greeting)
    got = receive(ad, {k["id"]: len(greeting), w["id"]: 0})
    assert got[w["id"]] == b"", "the idle socket received the proxy's bytes"
    assert got[k["id"]] == greeting
    request, idle_data = tagged("client-request"), tagged("idle-socket-data")
    send(ad, k, request)
    send(ad, w, idle_data)
    got = receive(ad, {kp["id"]: len(request)})
    assert got[kp["id"]] == request, "the proxy received bytes of another connection"
    assert receive(cd, {wc["id"]: len(idle_data)})[wc["id"]] == idle_data

    assert_never_tied(dp, w["cookie"], {kp["cookie"]})
    assert_never_tied(dp, kp["cookie"], {w["cookie"]})
    # The handshake identifies the captured connection despite the remap.
    flows = {(f.active_cookie, f.passive_cookie): f.rule for f in dp.sockinfo.flows()}
    assert flows.get((k["cookie"], kp["cookie"])) is layout.Rule.CAPTURE, dp.sockinfo.flows()


# 2. --------------------------------------------------------------------------


def test_ambiguity_survives_the_owner_closing(lab: Lab, dp: Dataplane, arena: Arena) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    # The attacker's netns holds both victims' addresses on its own lo; its server
    # end is in a cgroup our programs never see, so its client stays unpaired.
    x = arena.netns("atk")
    for ip in (a.ip4, b.ip4):
        lab.ip(x, "addr", "add", f"{ip}/32", "dev", "lo")
    accomplice, atk = arena.sockd(x, cgroup=arena.blind_cgroup()), arena.sockd(x)
    accomplice.call("listen", host=b.ip4, port=SERVER_PORT)
    ad, bd = arena.sockd(a), arena.sockd(b)
    listener = bd.call("listen", host="0.0.0.0", port=SERVER_PORT)["id"]
    sport = 40700
    tuple_: dict[str, Any] = {"host": b.ip4, "port": SERVER_PORT, "src": a.ip4, "sport": sport}

    x1 = atk.call("connect", **tuple_)  # first claimant of A:p -> B:9000
    release = hold_final_ack(arena, b, a.ip4, sport)
    try:
        real = ad.call("connect", **tuple_)  # second claimant: the key is ambiguous now
        assert_half_open(bd, listener)
        atk.call("close", id=x1["id"])
        x2 = atk.call("connect", **tuple_)  # publishes the same key again
        assert_half_open(bd, listener)
    finally:
        release()
    rb = bd.call("accept", id=listener, timeout=10)
    assert rb["remote"] == [a.ip4, sport]

    greeting = tagged("server-greeting")
    send(bd, rb, greeting)
    assert receive(atk, {x2["id"]: 0})[x2["id"]] == b"", "the attacker read the server's bytes"
    assert receive(ad, {real["id"]: len(greeting)})[real["id"]] == greeting
    injected, request = tagged("attacker"), tagged("client-request")
    atk.submit("send", id=x2["id"], data=injected.hex())
    atk.result()  # may fail on plain TCP: its peer is the accomplice
    send(ad, real, request)
    assert receive(bd, {rb["id"]: len(request)})[rb["id"]] == request

    assert_never_tied(dp, rb["cookie"], {x1["cookie"], x2["cookie"]})
    assert pairs_of(dp, rb["cookie"]) <= {real["cookie"]}


# 3. --------------------------------------------------------------------------


@pytest.mark.parametrize("forge", ["transparent", "repair"])
def test_forged_cross_netns_tuple(lab: Lab, dp: Dataplane, arena: Arena, forge: str) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    enroll(dp, a, b)
    # A reaches B through a service VIP (kube-proxy's DNAT in A): A's own socket is
    # A:p -> VIP:80, so B's accepted socket (A:p -> B:9000) has no real cross-netns
    # candidate and the forged one is all the pairing can find.
    lab.ip(a.name, "route", "add", "10.96.0.0/16", "dev", "eth0")
    arena.iptables(a.name, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", VIP,
                   "--dport", "80", "-j", "DNAT",
                   "--to-destination", f"{b.ip4}:{SERVER_PORT}")  # fmt: skip
    x = arena.netns("atk")
    atk = arena.sockd(x)
    ad, bd = arena.sockd(a), arena.sockd(b)
    listener = bd.call("listen", host="0.0.0.0", port=SERVER_PORT)["id"]
    sniffer = bd.call("sniff_start", ifname="eth0")["id"]
    sport = 40800
    forged: dict[str, Any] = {"host": b.ip4, "port": SERVER_PORT, "src": a.ip4, "sport": sport}
    if forge == "transparent":
        # Only B's address is local to the attacker; A's is taken with IP_TRANSPARENT
        # and replies to it come back through a marked local route (as TPROXY does).
        lab.ip(x, "addr", "add", f"{b.ip4}/32", "dev", "lo")
        lab.ip(x, "rule", "add", "fwmark", "0x1", "lookup", "100")
        lab.ip(x, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        accomplice = arena.sockd(x, cgroup=arena.blind_cgroup())
        accomplice.call("listen", host=b.ip4, port=SERVER_PORT, mark=1)
    else:
        for ip in (a.ip4, b.ip4):  # the repaired socket's packets stay in its netns
            lab.ip(x, "addr", "add", f"{ip}/32", "dev", "lo")

    release = hold_final_ack(arena, b, a.ip4, sport)
    try:
        real = ad.call("connect", host=VIP, port=80, src=a.ip4, sport=sport)
        assert_half_open(bd, listener)
        if forge == "transparent":
            fake = atk.call("connect", **forged, transparent=True, mark=1)
        else:
            # The strongest forgery: the real handshake's own sequence numbers.
            isn = bd.call("handshake_seqs", id=sniffer, client_port=sport,
                          server_port=SERVER_PORT)  # fmt: skip
            assert {"client", "server"} <= isn.keys(), isn
            fake = atk.call("repair_connect", **forged, snd_seq=isn["client"] + 1,
                            rcv_seq=isn["server"] + 1)  # fmt: skip
        assert_half_open(bd, listener)
    finally:
        release()
    rb = bd.call("accept", id=listener, timeout=10)
    assert rb["remote"] == [a.ip4, sport]

    greeting = tagged("server-greeting")
    send(bd, rb, greeting)
    assert receive(atk, {fake["id"]: 0})[fake["id"]] == b"", "the forger read the server's bytes"
    assert receive(ad, {real["id"]: len(greeting)})[real["id"]] == greeting
    injected, request = tagged("forged"), tagged("client-request")
    atk.submit("send", id=fake["id"], data=injected.hex())
    atk.result()  # on plain TCP it goes nowhere that matters
    send(ad, real, request)
    assert receive(bd, {rb["id"]: len(request)})[rb["id"]] == request

    assert_never_tied(dp, rb["cookie"], {fake["cookie"]})
    assert_never_tied(dp, fake["cookie"], {rb["cookie"]})
