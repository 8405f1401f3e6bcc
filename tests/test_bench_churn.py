"""The churn and memory probes of the benchmarks (bench/churn.py, bench/pooled.py) measure
what they claim: BPF run time per program, TIME_WAIT flushed, skmem read signed, an
unenrolled run pairs nothing and puts the endpoints back. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from eztunnel_lab import netlab, traffic
from eztunnel_lab.bench import churn, pooled
from eztunnel_lab.netlab import Lab
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.bpf.maps import Dataplane
from tests.conftest import enroll, wait_for, wait_line

SS_OUT = (
    "0      0               10.240.0.11:39490          10.240.0.12:9200 \n"
    "\t skmem:(r0,rb131072,t0,tb3939840,f4294967040,w0,o0,bl0,d0)\n"
    "0      0      [::ffff:10.240.0.12]:9200  [::ffff:10.240.0.11]:39490\n"
    "\t skmem:(r1000,rb131072,t0,tb3939840,f3096,w512,o0,bl0,d0)\n"
)


def test_skmem_is_read_signed_and_per_family() -> None:
    count, buffers, objects = pooled.parse_skmem(SS_OUT, {"TCP": 2000, "TCPv6": 2500})
    assert count == 2
    # f4294967040 is -256 (an overdrawn reserve), never +4 GiB
    assert buffers == (0 - 256 + 0) + (1000 + 3096 + 512)
    assert objects == 2000 + 2500


def test_kernel_memory_difference() -> None:
    held = pooled.Kernel(sockets=10, buffers=3 << 20, objects=1 << 20, maps=1 << 20, psocks=0)
    before = pooled.Kernel(sockets=2, buffers=1 << 20, objects=0, maps=0, psocks=0)
    d = held - before
    assert d.fields() == (8, 2 << 20, 1 << 20, 1 << 20, 0)
    assert d.total_mb == 4.0
    assert "8 sockets" in d.text() and "BPF maps 1.00 MB" in d.text()


def test_bpf_cost_per_connection() -> None:
    before = {"ez_sockops": (1_000, 10), "ez_msg": (0, 0)}
    after = {"ez_sockops": (101_000, 110), "ez_msg": (40_000, 20)}
    cost = churn.bpf_cost(before, after, 10, {"ack_callbacks": 30})
    assert cost.us_per_conn == pytest.approx(14.0)  # (100,000 + 40,000) ns / 10
    assert cost.per_prog["ez_sockops"] == (10.0, 1000.0)
    assert cost.per_prog["ez_msg"] == (2.0, 2000.0)
    assert cost.rtt_callbacks == 3.0
    assert "14.0 us of BPF per connection" in cost.text()
    assert churn.bpf_cost(before, after, 0, {}).us_per_conn == 0.0


def test_psock_size_comes_from_the_kernel() -> None:
    size = pooled.psock_bytes()
    assert size >= 512 and size & (size - 1) == 0  # a kmalloc bucket, never a guess of 0


@dataclass
class _Node:
    """What pooled.unenrolled needs of a node: its data plane."""

    lab: Lab

    def dataplane(self) -> Dataplane:
        return Dataplane.open(self.lab.bpffs)


@pytest.fixture
def conns_server(two_pods: Lab) -> Iterator[int]:
    port, lab = 9310, two_pods
    b = lab.pods[1]
    lab.spawn(b, traffic.command("conns", "server", "--port", str(port)), stdout=subprocess.DEVNULL)
    netlab.wait_listening(b.name, [port], 10)
    yield port


@pytest.fixture
def two_pods(lab: Lab) -> Lab:
    lab.add_pod()
    lab.add_pod()
    return lab


def _time_wait(lab: Lab, netns: str) -> int:
    return len(lab.exec(netns, "ss", "-tanH", "state", "time-wait").stdout.splitlines())


@pytest.mark.kernel
def test_churn_probes_on_a_spliced_pair(two_pods: Lab, dp: Dataplane, conns_server: int) -> None:
    lab = two_pods
    a, b = lab.pods
    enroll(dp, a, b)
    with churn.bpf_stats():
        r0 = churn.prog_runs(lab.bpffs)
        c0 = dp.counters.read()
        result = churn.run_churn(lab, a, lab.cgroup, b.ip4, conns_server, 1.0)
        r1 = churn.prog_runs(lab.bpffs)
    conns = int(result["conns"])
    assert conns > 0
    moved = {k: v - c0.get(k, 0) for k, v in dp.counters.read().items()}
    assert moved["pairs"] >= conns  # every churned connection was spliced
    cost = churn.bpf_cost(r0, r1, conns, moved)
    runs, ns = cost.per_prog["ez_sockops"]
    assert runs >= 2 and ns > 0  # both ends' sock_ops ran, and were timed
    assert cost.per_prog["ez_msg"][0] >= 1  # the byte each way went through sk_msg
    assert cost.us_per_conn > 0
    # Without the stats fd the kernel stops timing: run time no longer grows.
    idle = churn.prog_runs(lab.bpffs)
    churn.run_churn(lab, a, lab.cgroup, b.ip4, conns_server, 0.3)
    after = churn.prog_runs(lab.bpffs)
    assert after["ez_sockops"][0] == idle["ez_sockops"][0]
    # Every churned connection left a TIME_WAIT socket in the client: flushed, none stay
    # (a last close may still reach TIME_WAIT after a flush: flush again, bounded).
    assert _time_wait(lab, a.name) > 0

    def flushed() -> bool:
        churn.flush_time_wait(lab, a.name)
        return _time_wait(lab, a.name) == 0

    wait_for(flushed, timeout=5.0, what="no TIME_WAIT socket left after a flush")


@pytest.mark.kernel
def test_unenrolled_pairs_nothing_and_restores(
    two_pods: Lab, dp: Dataplane, conns_server: int
) -> None:
    lab = two_pods
    a, b = lab.pods
    enroll(dp, a, b)
    want = dp.endpoints.read_all()
    node = _Node(lab)
    with pooled.unenrolled(node):  # type: ignore[arg-type]
        assert dp.endpoints.read_all() == {}
        c0 = dp.counters.read()["pairs"]
        result = churn.run_churn(lab, a, lab.cgroup, b.ip4, conns_server, 0.5)
        assert int(result["conns"]) > 0
        assert dp.counters.read()["pairs"] == c0
    assert dp.endpoints.read_all() == want
    # ... also when the measurement inside fails
    with pytest.raises(RuntimeError), pooled.unenrolled(node):  # type: ignore[arg-type]
        raise RuntimeError("measurement failed")
    assert dp.endpoints.read_all() == want
    assert want[a.ip4] & layout.EP_ENROLLED


@pytest.mark.kernel
def test_socket_memory_counts_held_bytes_and_maps(two_pods: Lab, dp: Dataplane) -> None:
    """A connection whose reader never reads holds what was sent in the reader's receive
    queue: the probe sees both sockets and at least those bytes; the data plane's map
    memory grows once the pair is in the SOCKHASH."""
    lab = two_pods
    a, b = lab.pods
    netns = [a.name, b.name]
    before = pooled.kernel_memory(lab, netns)
    hold = (
        "import socket,time; ls=socket.create_server(('0.0.0.0',9320)); "
        "print('listening',flush=True); c,_=ls.accept(); time.sleep(30)"
    )
    srv = lab.spawn(b, [sys.executable, "-c", hold], stdout=subprocess.PIPE)
    wait_line(srv, "listening")
    send = (
        f"import socket,time; s=socket.create_connection(('{b.ip4}',9320)); "
        "s.sendall(b'x' * 65536); print('sent',flush=True); time.sleep(30)"
    )
    cli = lab.spawn(a, [sys.executable, "-c", send], stdout=subprocess.PIPE)
    wait_line(cli, "sent")
    deadline = time.monotonic() + 5
    while True:  # the bytes reach the reader's queue within moments
        held = pooled.kernel_memory(lab, netns) - before
        if held.buffers >= 65536 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert held.sockets == 2
    assert held.buffers >= 65536
    assert held.objects >= 2 * 2000  # two TCP socket structs (about 2.3 KB each)
    assert held.maps == 0 and held.psocks == 0  # nothing enrolled: nothing in the maps

    enroll(dp, a, b)
    srv2 = lab.spawn(
        b, [sys.executable, "-c", hold.replace("9320", "9321")], stdout=subprocess.PIPE
    )
    wait_line(srv2, "listening")
    cli2 = lab.spawn(
        a, [sys.executable, "-c", send.replace("9320", "9321")], stdout=subprocess.PIPE
    )
    wait_line(cli2, "sent")
    spliced = pooled.kernel_memory(lab, netns) - before
    assert spliced.sockets == 4
    assert spliced.psocks == 2 * pooled.psock_bytes()  # the spliced pair, in the SOCKHASH


def test_interleaved_slices_every_kind_in_turn() -> None:
    """Kinds take turns slice by slice, and each kind's rate is its connections over the
    time its own slices took."""
    order: list[str] = []
    rates = {"baseline": 100.0, "plugin": 50.0}

    def one(kind: str, secs: float) -> churn.Churn:
        order.append(kind)
        conns = int(rates[kind] * secs)
        return churn.Churn(rates[kind], conns, 10.0, conns if kind == "plugin" else 0, {})

    got = churn._interleaved(one, ["baseline", "plugin"], 3.0)
    assert order == ["baseline", "plugin"] * churn.SLICES
    assert got["baseline"].per_second == pytest.approx(100.0)
    assert got["plugin"].per_second == pytest.approx(50.0)
    assert got["plugin"].conns == 150 and got["plugin"].pairs == 150
    assert got["baseline"].cpu_us_per_conn == pytest.approx(10.0)
