"""A simulated Istio ambient node: pods, istio-cni's in-pod rules, a ztunnel stand-in,
istiod, and (optionally) the agent, all inside namespaces and cgroups it creates.

    eztunnel-lab sim --pods 2 --check        # build, send traffic through it, report, remove

Layout (everything carries the lab's tag and is removed by close(), even on failure):

- node netns `ezn-<tag>` with a bridge; pod netns `ezp-<tag>-N` (10.240.0.1N) on it;
- cgroups under `<cgroup2>/eztest-<tag>/`: `pod-<name>` per pod (the apps),
  `ztunnel` (the stand-in, with simmark's sock_create program: mark 0x539),
  `agent` (eztunnel-plugin run), `istiod` (the fake istiod, not part of the node);
- in every pod netns the rules of istio-cni REDIRECT mode (inpod.py);
- the ztunnel stand-in in the node netns, listening inside every pod netns:
  `hbone` (default: eztunnel-hbone, HTTP/2 CONNECT in mutual TLS, pooled as ztunnel
  does; hbone.py) or `haproxy` (HAProxy, one TLS connection per flow; standin.py);
- the fake istiod and the agent in the node netns, on its private loopback (so
  the default ports never collide with anything on the host): istiod serves the
  pods as in-mesh workloads of this node; the agent attaches its programs to the
  lab's cgroup, which holds the pods and the stand-in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eztunnel_lab import counters, hbone, inpod, netlab, simmark, simpki, standin, traffic
from eztunnel_lab.netlab import Lab, Managed, Pod
from eztunnel_lab.standin import ProxyStat  # the field `standin` shadows the module
from eztunnel_plugin.bpf import loader
from eztunnel_plugin.bpf.maps import Dataplane

PY = sys.executable
AGENT_API = "127.0.0.1:15081"
ISTIOD_ADDR = "127.0.0.1:15010"
NAMESPACE = "default"
FLOWCHECK_PORT = 9000  # the integrity server of self_check and the demo
STANDIN_PORTS = (inpod.OUTBOUND_PORT, inpod.INBOUND_PLAINTEXT_PORT, inpod.INBOUND_PORT)
STANDINS = ("hbone", "haproxy")  # the first is the default: the one closer to ztunnel


class SimError(RuntimeError):
    """The simulated node could not be built or did not behave as ambient does."""


@dataclass
class SimPod:
    name: str  # workload name
    pod: Pod

    @property
    def uid(self) -> str:
        return f"Kubernetes//Pod/{NAMESPACE}/{self.name}"

    @property
    def netns(self) -> str:
        return self.pod.name

    @property
    def ip(self) -> str:
        return self.pod.ip4

    @property
    def cgroup(self) -> Path:
        return self.pod.cgroup


@dataclass
class AmbientNode(Managed):
    """One simulated ambient node. Use as a context manager (or call start/close)."""

    pod_names: Sequence[str] = ("client", "server")
    agent: bool = True  # start istiod + the agent in start(); else call start_agent()
    tag: str | None = None
    standin: str = STANDINS[0]
    hbone_settings: hbone.Settings = field(default_factory=hbone.Settings)
    ipv6_workloads: bool = False  # also give istiod the pods' IPv6 addresses (enrolled)
    lab: Lab = field(init=False)
    pods: list[SimPod] = field(default_factory=list)
    workdir: Path = field(init=False)
    proxy: subprocess.Popen[bytes] | None = None  # the stand-in's process
    istiod: subprocess.Popen[bytes] | None = None
    agent_proc: subprocess.Popen[bytes] | None = None
    _mark_link: int | None = None

    def __post_init__(self) -> None:
        if self.standin not in STANDINS:
            raise SimError(f"unknown stand-in {self.standin!r} (choose from {', '.join(STANDINS)})")
        self.lab = Lab(tag=self.tag) if self.tag else Lab()
        self.node_name = f"sim-node-{self.lab.tag}"
        # Created by start(), removed by close(): a node never started leaves nothing.
        self.workdir = Path(tempfile.gettempdir()) / f"ezsim-{self.lab.tag}"
        self.stats_socket = self.workdir / f"{self.standin}.sock"

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(mode=0o700)
        self.lab.start()
        self.lab.ip(self.lab.node, "addr", "add", "10.240.0.1/24", "dev", "br0")
        for name in self.pod_names:
            pod = SimPod(name, self.lab.add_pod(cgroup_name=f"pod-{name}"))
            inpod.install(pod.netns)
            self.pods.append(pod)
        self._start_standin()
        if self.agent:
            self.start_agent()

    def close(self) -> None:
        """Remove everything, whatever state start() reached. Never raises for leftovers
        it can still remove; the lab's own close() does the netns/cgroup/pin work."""
        with contextlib.suppress(Exception):
            self.stop_agent()
        if self._mark_link is not None:
            simmark.detach(self._mark_link)
            self._mark_link = None
        try:
            self.lab.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- the ztunnel stand-in ------------------------------------------------------

    @property
    def ztunnel_cgroup(self) -> Path:
        return self.lab.cgroup / "ztunnel"

    def _start_standin(self) -> None:
        if self.standin == "hbone":
            self._start_hbone()
        else:
            self._start_haproxy()

    def _start_hbone(self) -> None:
        ca = simpki.MeshCA.create(self.workdir / "pki")
        pods = [
            hbone.PodHbone(
                p.name,
                p.netns,
                ca.issue(p.name, NAMESPACE, p.name, p.ip),
                simpki.spiffe_id(NAMESPACE, p.name),
                (p.ip, p.pod.ip6),
            )
            for p in self.pods
        ]
        cfg = self.workdir / "hbone.cfg"
        cfg.write_text(hbone.config(pods, ca.ca_file, self.stats_socket, self.hbone_settings))
        binary = hbone.binary_path()
        # It sets SO_MARK on every socket itself, as ztunnel does (no simmark program).
        self.proxy = self._spawn_logged(
            "hbone", [str(binary), str(cfg)], self.lab.child_cgroup("ztunnel")
        )
        self.wait_until(
            lambda: (
                self.stats_socket.exists()
                and all(netlab.listening(p.netns, STANDIN_PORTS) for p in self.pods)
            ),
            15,
            "the stand-in's listeners",
            self.proxy,
        )

    def _start_haproxy(self) -> None:
        ca = simpki.MeshCA.create(self.workdir / "pki")
        tls = [
            standin.PodTls(p.name, p.netns, ca.issue(p.name, NAMESPACE, p.name, p.ip))
            for p in self.pods
        ]
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(standin.config(tls, ca.ca_file, self.stats_socket))
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise SimError(f"haproxy rejected {cfg}: {check.stderr.strip()}")
        cgroup = self.lab.child_cgroup("ztunnel")
        # Marks first: the listeners HAProxy opens at start must carry 0x539 too.
        self._mark_link = simmark.attach(cgroup)
        log = (self.workdir / "haproxy.log").open("wb")
        self.proxy = self.lab.spawn(
            self.lab.node,
            ["haproxy", "-db", "-f", str(cfg)],
            cgroup=cgroup,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_until(
            lambda: (
                self.stats_socket.exists()
                and all(netlab.listening(p.netns, STANDIN_PORTS) for p in self.pods)
            ),
            15,
            "the stand-in's listeners",
            self.proxy,
        )

    def standin_stats(self) -> dict[str, ProxyStat]:
        """Per hop ('out-<pod>', 'hbone-<pod>', 'in-<pod>', 'app-<pod>', ...): new
        connections (HBONE: streams), whichever stand-in runs."""
        if self.standin == "hbone":
            return hbone.stats(self.stats_socket)
        return standin.stats(self.stats_socket)

    def hbone_stats(self) -> dict[str, Any]:
        """The HBONE stand-in's every counter ({} for HAProxy)."""
        return hbone.raw_stats(self.stats_socket) if self.standin == "hbone" else {}

    def tunnels(self, src: str, dst: str) -> hbone.Tunnels | None:
        """src's pooled HBONE tunnels (None with HAProxy: one TLS connection per flow)."""
        doc = self.hbone_stats()
        return hbone.tunnels(doc, src, dst) if doc else None

    def release_idle_tunnels(self) -> int:
        """Close the HBONE pool's idle tunnels now (what 5 idle minutes would do)."""
        return hbone.release_idle(self.stats_socket) if self.standin == "hbone" else 0

    # ---- istiod and the agent ------------------------------------------------------

    @property
    def agent_cgroup(self) -> Path:
        return self.lab.cgroup / "agent"

    def workloads_yaml(self) -> str:
        return yaml.safe_dump(
            {
                "workloads": [
                    {
                        "uid": p.uid,
                        "name": p.name,
                        "namespace": NAMESPACE,
                        "addresses": [p.ip, p.pod.ip6] if self.ipv6_workloads else [p.ip],
                        "node": self.node_name,
                        "tunnel_protocol": "HBONE",
                        "service_account": p.name,
                    }
                    for p in self.pods
                ],
                "services": [],
                "authorizations": [],
            },
            sort_keys=False,
        )

    def start_agent(self) -> None:
        """Start the fake istiod (once) and `eztunnel-plugin run` as in production."""
        if self.istiod is None:
            wl = self.workdir / "workloads.yaml"
            wl.write_text(self.workloads_yaml())
            self.istiod = self._spawn_logged(
                "istiod",
                [
                    PY,
                    "-m",
                    "eztunnel_lab",
                    "fake-istiod",
                    "--workloads",
                    str(wl),
                    "--listen",
                    ISTIOD_ADDR,
                ],
                self.lab.child_cgroup("istiod"),
            )
        # The projected service-account token ztunnel's chart mounts (istiod ignores it
        # here, but the agent reads it exactly as in production).
        token = self.workdir / "istio-token"
        token.write_text("simulated-node-token\n")
        env = {
            **os.environ,
            "POD_NAME": "eztunnel-plugin-sim",
            "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": "10.240.0.1",
            "AUTH_TOKEN": str(token),
        }
        self.agent_proc = self._spawn_logged(
            "agent",
            [
                PY,
                "-m",
                "eztunnel_plugin",
                "run",
                "--bpffs",
                str(self.lab.bpffs),
                "--cgroup",
                str(self.lab.cgroup),
                "--grpc-listen",
                AGENT_API,
                "--log-format",
                "json",
                "--xds-address",
                ISTIOD_ADDR,
                "--xds-plaintext",
                "--node-name",
                self.node_name,
                "--admin-socket",  # the node's own, not the host's /var/run/eztunnel
                str(self.workdir / "admin.sock"),
            ],
            self.lab.child_cgroup("agent"),
            env=env,
        )
        self.wait_until(self._agent_ready, 60, "the agent to become ready", self.agent_proc)
        want = {p.ip for p in self.pods}
        self.wait_until(
            lambda: want <= set(self.enrolled()), 10, "every pod enrolled", self.agent_proc
        )

    def _agent_ready(self) -> bool:
        log = self.workdir / "agent.log"
        return log.exists() and '"agent.ready"' in log.read_text(errors="replace")

    def stop_agent(self) -> None:
        """SIGTERM the agent, then remove its pins and links (it keeps them by design)."""
        proc, self.agent_proc = self.agent_proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.lab.bpffs.exists():
            loader.uninstall(self.lab.bpffs)

    def dataplane(self) -> Dataplane:
        """The agent's pinned maps, opened read-write (close it after use)."""
        return Dataplane.open(self.lab.bpffs)

    def counters(self) -> dict[str, int]:
        if not (self.lab.bpffs / "ez_counters").exists():
            return {}
        with self.dataplane() as dp:
            return dp.counters.read()

    def enrolled(self) -> list[str]:
        if not (self.lab.bpffs / "ez_endpoints").exists():
            return []
        with self.dataplane() as dp:
            return sorted(dp.endpoints.read_all())

    def cli(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `eztunnel-plugin <argv> --grpc-addr <agent>` inside the node netns."""
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.lab.node,
                PY,
                "-m",
                "eztunnel_plugin",
                *argv,
                "--grpc-addr",
                AGENT_API,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # ---- helpers -----------------------------------------------------------------------

    def pod(self, name: str) -> SimPod:
        return next(p for p in self.pods if p.name == name)

    def spawn(self, pod: SimPod, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Run an app process in the pod's netns and cgroup."""
        return self.lab.spawn(pod.pod, argv, None, **kw)

    def flowcheck_server(self, pod: SimPod, port: int = FLOWCHECK_PORT) -> subprocess.Popen[bytes]:
        """Start a flowcheck server in the pod; return once it listens."""
        argv = traffic.command("flowcheck", "server", "--port", str(port))
        proc = self.spawn(pod, argv, stdout=subprocess.DEVNULL)
        self.wait_listening(pod.netns, [port], f"the flowcheck server in {pod.name}", proc)
        return proc

    def run_client(
        self,
        tool: str,
        src: SimPod,
        dst: SimPod,
        port: int,
        *args: str,
        timeout: float = 90,
        host: str | None = None,
    ) -> dict[str, Any]:
        """Traffic program `tool`'s client, src -> dst:port (`host`: another of dst's
        addresses, e.g. its IPv6 one), to its end: its JSON report, or
        {"ok": False, "error": ...} when it printed none."""
        addr = host or dst.ip
        argv = traffic.command(tool, "client", "--connect", addr, "--port", str(port), *args)
        proc = self.spawn(src, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        try:
            return traffic.report(out)
        except ValueError:
            tail = err.decode(errors="replace").strip()[-500:]
            why = f"{tool} client printed no report (exit {proc.returncode}): {tail}"
            return {"ok": False, "error": why}

    def _spawn_logged(
        self, name: str, argv: list[str], cgroup: Path, **kw: object
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            return self.lab.spawn(
                self.lab.node, argv, cgroup=cgroup, stdout=log, stderr=subprocess.STDOUT, **kw
            )

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_until(
        self,
        cond: Callable[[], bool],
        timeout: float,
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """netlab.wait_until, failing with the node's logs."""
        try:
            netlab.wait_until(cond, timeout, what, proc)
        except netlab.WaitError as e:
            raise SimError(f"{e}:\n{self._logs()}") from None

    def wait_listening(
        self,
        netns: str,
        ports: Iterable[int],
        what: str,
        proc: subprocess.Popen[bytes] | None = None,
        timeout: float = 15,
    ) -> None:
        """netlab.wait_listening, failing with the node's logs."""
        want = list(ports)
        self.wait_until(lambda: netlab.listening(netns, want), timeout, what, proc)

    def leftovers(self) -> list[str]:
        """What of this node still exists after close(): netns, cgroup, pins, work dir."""
        names = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        left = [line.split()[0] for line in names.splitlines() if self.lab.tag in line]
        left += [str(p) for p in (self.lab.cgroup, self.lab.bpffs, self.workdir) if p.exists()]
        return left

    def _logs(self) -> str:
        names = (self.standin, "istiod", "agent")
        return "\n".join(f"--- {n}.log\n{self.log_tail(n)}" for n in names)

    def parts(self) -> dict[str, Path]:
        """The cgroup of each part of the node: each pod's apps (by pod name: client,
        server), the stand-in, the agent."""
        out = {p.name: p.cgroup for p in self.pods}
        return out | {"ztunnel": self.ztunnel_cgroup, "agent": self.agent_cgroup}

    def cpu_usage_s(self) -> float:
        """CPU seconds used so far by the node: the pods' apps, the stand-in, the agent."""
        return sum(netlab.cgroups_cpu_us(self.parts()).values()) / 1e6

    def node_pids(self) -> list[int]:
        """Every process of the node (apps, stand-in, agent), for CPU pinning."""
        return [pid for cg in self.parts().values() for pid in netlab.cgroup_pids(cg)]


def check_path(
    before: dict[str, standin.ProxyStat],
    after: dict[str, standin.ProxyStat],
    src: str,
    dst: str,
    conns: int,
) -> dict[str, int]:
    """Raise unless every hop of the stand-in (out, hbone, in, app) saw >= conns new
    connections: a measurement that skipped the proxy must never count."""
    delta = standin.path_delta(before, after, src, dst)
    short = {hop: n for hop, n in delta.items() if n < conns}
    if short:
        raise SimError(
            f"traffic {src} -> {dst} did not go through the stand-in: "
            f"expected >= {conns} new connections per hop, got {delta}"
        )
    return delta


def set_affinity(pids: Sequence[int], cpus: set[int]) -> None:
    """Pin every thread of the processes (HAProxy and the agent are multi-threaded)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


# ---- `eztunnel-lab sim` ------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=2, help="number of pods (default %(default)s)")
    p.add_argument("--no-agent", action="store_true", help="plain ambient: no agent")
    p.add_argument(
        "--standin",
        choices=STANDINS,
        default=STANDINS[0],
        help="the ztunnel stand-in: hbone (HTTP/2 CONNECT in mTLS, pooled as ztunnel does; "
        "the default) or haproxy (one TLS connection per flow)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="istiod lists the pods' IPv6 addresses too, so the agent enrolls them",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="send verified traffic pod 1 -> pod 2, print what happened, exit",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="without --check: seconds to keep the node up (Ctrl-C ends sooner)",
    )


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("eztunnel-lab sim: needs root (namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    if not 2 <= args.pods <= 200:
        print("eztunnel-lab sim: --pods must be between 2 and 200", file=sys.stderr)
        return 2
    names = [f"pod{i + 1}" for i in range(args.pods)]
    try:
        node = AmbientNode(
            names, agent=not args.no_agent, standin=args.standin, ipv6_workloads=args.ipv6
        )
        with node:
            print(describe(node), flush=True)
            if args.check:
                return 0 if self_check(node) else 1
            _wait_for_signal(args.duration)
    except SimError as e:
        print(f"eztunnel-lab sim: {e}", file=sys.stderr)
        return 1
    print("simulated node removed", flush=True)
    return 0


def describe(node: AmbientNode) -> str:
    lines = [
        f"simulated ambient node {node.node_name} (node netns {node.lab.node}, "
        f"cgroup {node.lab.cgroup})"
    ]
    for p in node.pods:
        lines.append(f"  pod {p.name:<8} {p.ip:<13} netns {p.netns}  cgroup {p.cgroup.name}")
    assert node.proxy is not None
    cfg = node.workdir / ("hbone.cfg" if node.standin == "hbone" else "haproxy.cfg")
    lines.append(
        f"  ztunnel stand-in: {node.standin} pid {node.proxy.pid}, stats "
        f"{node.stats_socket}, config {cfg}"
    )
    if node.agent_proc is not None:
        lines.append(
            f"  agent: pid {node.agent_proc.pid}, API {AGENT_API} in netns "
            f"{node.lab.node}: ip netns exec {node.lab.node} eztunnel-plugin "
            f"status --grpc-addr {AGENT_API}"
        )
        lines.append(f"  enrolled: {', '.join(node.enrolled())}")
    return "\n".join(lines)


def self_check(node: AmbientNode) -> bool:
    """Pod 1 -> pod 2 with flowcheck (IPv4, and IPv6 with the hbone stand-in): data
    intact, the stand-in on the path (its counters), with hbone the flows pooled onto
    shared tunnels, and with the agent every hop spliced (capture, cross-netns mirror:
    one per tunnel, same-netns mirror)."""
    a, b = node.pods[0], node.pods[1]
    node.flowcheck_server(b)
    conns = 8
    ok = True
    hosts = [b.ip] + ([b.pod.ip6] if node.standin == "hbone" else [])
    for host in hosts:
        before, c0, t0 = node.standin_stats(), node.counters(), node.tunnels(a.name, b.name)
        result = node.run_client(
            "flowcheck",
            a,
            b,
            FLOWCHECK_PORT,
            *("--conns", str(conns), "--max-size", str(1 << 20), "--timeout", "60"),
            host=host,
        )
        print(f"flowcheck {a.name} -> {b.name} [{host}]:{FLOWCHECK_PORT}: {result}")
        hops = check_path(before, node.standin_stats(), a.name, b.name, conns)
        print(f"stand-in connections per hop (HBONE: streams): {hops}")
        ok = ok and bool(result["ok"])
        tunnels = conns  # HAProxy: one TLS connection per flow
        t1 = node.tunnels(a.name, b.name)
        if t0 is not None and t1 is not None:
            tunnels = t1.opened - t0.opened
            reused = t1.reused - t0.reused
            print(
                f"HBONE tunnels: {tunnels} opened, {reused} of {conns} streams on a pooled "
                f"one; streams per tunnel so far {t1.streams_per_tunnel:.1f}"
            )
            # Pooling: the flows shared tunnels (the pool may have had one already).
            ok = ok and tunnels <= 1 and tunnels + reused == conns
        if node.agent_proc is not None and (host == b.ip or node.ipv6_workloads):
            moved = counters.delta(c0, node.counters())
            pairs = {k: v for k, v in moved.items() if k.startswith("pairs") and v}
            print(f"spliced pairs: {pairs}")
            want = {rule: conns for rule in counters.HOP_RULES}
            want["pairs_cross_mirror"] = tunnels  # one per TLS connection
            ok = ok and all(pairs.get(k, 0) >= n for k, n in want.items())
    print("check passed" if ok else "check FAILED")
    return ok


def _wait_for_signal(seconds: float) -> None:
    stop = {"now": False}

    def handler(signum: int, frame: object) -> None:
        stop["now"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + seconds
        print(f"up for {seconds:.0f} s; Ctrl-C removes it sooner", flush=True)
        while not stop["now"] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
