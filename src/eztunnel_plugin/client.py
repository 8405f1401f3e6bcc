"""CLI commands that talk to a running agent's API and print readable tables (or JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eztunnel_plugin import selftest
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _dump(msg: Any) -> str:
    return json_format.MessageToJson(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _call(args: argparse.Namespace, fn: Callable[[pb_grpc.InspectorStub], Any]) -> Any:
    with grpc.insecure_channel(args.grpc_addr) as channel:
        return fn(pb_grpc.InspectorStub(channel))


def _guard(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A down agent is a one-line error, not a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "ERROR"
            details = e.details() if hasattr(e, "details") else str(e)
            print(
                f"eztunnel-plugin: cannot reach the agent at {args.grpc_addr}: {code}: {details}",
                file=sys.stderr,
            )
            return 1

    return wrapped


def selftest_rows(s: Any) -> list[tuple[str, str]]:
    """The kernel self-test in `status`: the decision, why, and each check without and with
    the SK_SKB workaround."""
    if not s.HasField("selftest"):
        return [("self-test", "not decided yet")]
    t = s.selftest
    listed = " (known to lose epoll wakeups without the workaround)" if t.kernel_listed else ""
    rows = [
        ("self-test", t.decision),
        ("self-test reason", t.reason),
        ("self-test kernel", f"{t.kernel}{listed}"),
        ("self-test ran in", f"{t.environment} ({t.duration_seconds:.2f} s)"),
    ]
    for name, plain, verdict in selftest.result_rows(t.checks):
        rows.append((f"  {name}", f"without workaround: {plain}; with it: {verdict}"))
    return rows


@_guard
def status(args: argparse.Namespace) -> int:
    s = _call(args, lambda stub: stub.GetStatus(pb.GetStatusRequest(), timeout=args.timeout))
    if args.json:
        print(_dump(s))
        return 0
    rows = [
        ("version", s.version),
        ("node", s.node or "-"),
        ("kernel", s.kernel),
        ("ready", s.ready),
        ("splicing enabled", s.enabled),
        ("bpffs", s.bpffs),
        ("cgroup", s.cgroup),
        ("programs attached", ", ".join(s.programs_attached) or "-"),
        ("reused pins", s.reused_pins),
        ("capture ports", ", ".join(map(str, s.capture_ports)) or "-"),
        ("backlog limit", human_bytes(s.backlog_limit_bytes)),
        ("endpoint source", s.endpoint_source),
        ("uptime", f"{s.uptime_seconds:.0f} s"),
        ("addresses refused", s.addresses_refused),
    ]
    rows += selftest_rows(s)
    if s.endpoint_source.startswith("file:"):
        rows.append(("source error", s.source_error or "-"))
    if s.endpoint_source == "xds":
        x = s.xds
        rows += [
            ("xds address", x.address),
            ("xds connected", x.connected),
            ("xds complete", x.complete),
            ("xds stale", x.stale),
            ("xds nacks", x.nacks),
            ("xds reconnects", x.reconnects),
            ("xds last error", x.last_error or "-"),
        ]
        rows += [
            (
                f"  {t.type_url.rsplit('/', 1)[-1]}",
                f"{t.resources} resources, last ACKed nonce {t.last_acked_nonce or '-'}",
            )
            for t in x.types
        ]
    print(table(("field", "value"), rows))
    return 0


@_guard
def endpoints(args: argparse.Namespace) -> int:
    r = _call(
        args, lambda stub: stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=args.timeout)
    )
    if args.json:
        print(_dump(r))
        return 0
    # The columns of `istioctl ztunnel-config workloads`, plus the map's own word.
    rows = sorted(
        (e.namespace or "-", e.name or "-", e.ip, e.node or "-", e.protocol or "-",
         "yes" if e.in_map else "NO")
        for e in r.endpoints
    )  # fmt: skip
    print(table(("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "IN MAP"), rows))
    if r.unexpected_in_map:
        print(f"in the map but not desired: {', '.join(r.unexpected_in_map)}")
    return 0


def _flow_pages(stub: pb_grpc.InspectorStub, timeout: float) -> list[Any]:
    flows: list[Any] = []
    token = ""
    for _ in range(10_000):  # bounded: pages of 1000 cover any sockhash
        page = stub.ListFlows(
            pb.ListFlowsRequest(page_size=1000, page_token=token), timeout=timeout
        )
        flows.extend(page.flows)
        token = page.next_page_token
        if not token:
            break
    return flows


def _all_flows(args: argparse.Namespace) -> list[Any]:
    with grpc.insecure_channel(args.grpc_addr) as channel:
        return _flow_pages(pb_grpc.InspectorStub(channel), args.timeout)


def _flows_table(flows: Sequence[Any]) -> str:
    return table(
        ("CLIENT", "SERVER", "RULE", "C->S", "S->C", "VIA TCP C->S/S->C", "STATE", "NETNS"),
        [
            (
                f.client,
                f.server,
                f.rule,
                human_bytes(f.bytes_client_to_server),
                human_bytes(f.bytes_server_to_client),
                f"{human_bytes(f.tcp_bytes_client_to_server)}/"
                f"{human_bytes(f.tcp_bytes_server_to_client)}",
                f"{f.client_state}/{f.server_state}",
                "same" if f.client_netns_cookie == f.server_netns_cookie else "cross",
            )
            for f in flows
        ],
    )


@_guard
def flows(args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return watch(args)
    rounds = 0
    while True:
        current = _all_flows(args)
        if args.json:
            print(json.dumps([json.loads(_dump(f)) for f in current]))
        else:
            print(f"{len(current)} spliced flows at {time.strftime('%H:%M:%S')}")
            print(_flows_table(current))
        rounds += 1
        if not args.watch or (args.limit and rounds >= args.limit):
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


# ---- flows --watch: the live view ----------------------------------------------------------
#
# Rates come from two successive polls (GetStats + every ListFlows page): a flow's
# bytes/s is its byte count's growth since the previous poll, a counter's rate its
# delta. The Flow fields summed per direction are every integer field naming `bytes`
# and the direction, so bytes a flow sends through TCP count once the API reports them.


def _byte_fields(direction: str) -> tuple[str, ...]:
    ints = (FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_UINT32)
    return tuple(
        f.name
        for f in pb.Flow.DESCRIPTOR.fields
        if "bytes" in f.name and direction in f.name and f.cpp_type in ints
    )


C2S_FIELDS = _byte_fields("client_to_server")
S2C_FIELDS = _byte_fields("server_to_client")

# Counter rates shown under the flows, each only when the agent has the counter.
RATE_COUNTERS: tuple[tuple[str, str], ...] = (
    ("pairs", "new pairs"),
    ("backlog_fallbacks", "fallbacks to TCP"),
    ("resumes", "resumes from TCP"),
    ("unspliced", "sockets back on TCP for good"),
    ("tainted", "tainted sockets"),
    ("bytes_redirected", "bytes spliced"),
    ("bytes_tcp_paired", "bytes through TCP (paired)"),
)


@dataclass(frozen=True)
class Poll:
    """One look at the agent: when (monotonic), its flows and its counters."""

    at: float
    flows: Sequence[Any]
    counters: Mapping[str, int]


@dataclass(frozen=True)
class FlowRate:
    flow: Any
    total: int  # bytes both ways so far
    c2s: float | None  # bytes/s since the previous poll; None on the first
    s2c: float | None

    @property
    def rate(self) -> float | None:
        return None if self.c2s is None or self.s2c is None else self.c2s + self.s2c


@dataclass(frozen=True)
class WatchView:
    """What one refresh shows."""

    refresh: int
    clock: str
    seconds: float | None  # since the previous poll; None on the first
    flows: list[FlowRate]  # fastest first
    rules: list[tuple[str, int, float | None]]  # rule, active pairs, new pairs/s
    rates: list[tuple[str, str, float | None]]  # counter, label, per second
    error: str = ""  # the last poll failed: the view shows the previous one

    def top(self) -> FlowRate | None:
        return self.flows[0] if self.flows else None


def _bytes(flow: Any, fields: Sequence[str]) -> int:
    return sum(int(getattr(flow, name)) for name in fields)


def _key(flow: Any) -> tuple[int, int]:
    return (flow.client_socket_cookie, flow.server_socket_cookie)


def _per_second(now: int, before: int | None, seconds: float | None) -> float | None:
    # None: no earlier poll, or the count went down (the maps were recreated).
    if before is None or seconds is None or seconds <= 0 or now < before:
        return None
    return (now - before) / seconds


def compare(prev: Poll | None, cur: Poll, refresh: int, clock: str = "") -> WatchView:
    """The view of `cur`, with rates against `prev` (a flow new since then: from 0)."""
    seconds = None if prev is None else cur.at - prev.at
    before = {} if prev is None else {_key(f): f for f in prev.flows}
    rows: list[FlowRate] = []
    for f in cur.flows:
        c2s, s2c = _bytes(f, C2S_FIELDS), _bytes(f, S2C_FIELDS)
        old = before.get(_key(f))
        old_c2s = 0 if prev is not None and old is None else None
        old_s2c = old_c2s
        if old is not None:
            old_c2s, old_s2c = _bytes(old, C2S_FIELDS), _bytes(old, S2C_FIELDS)
        rows.append(
            FlowRate(f, c2s + s2c, _per_second(c2s, old_c2s, seconds),
                     _per_second(s2c, old_s2c, seconds))
        )  # fmt: skip
    rows.sort(key=lambda r: (r.rate if r.rate is not None else -1.0, r.total), reverse=True)
    pc = {} if prev is None else prev.counters
    active: dict[str, int] = {}
    for f in cur.flows:
        active[f.rule] = active.get(f.rule, 0) + 1
    names = set(active) | {k.removeprefix("pairs_") for k in cur.counters if k.startswith("pairs_")}
    rules = [
        (r, active.get(r, 0), _per_second(cur.counters.get(f"pairs_{r}", 0),
                                          pc.get(f"pairs_{r}"), seconds))
        for r in sorted(names)
    ]  # fmt: skip
    rates = [
        (name, label, _per_second(cur.counters[name], pc.get(name), seconds))
        for name, label in RATE_COUNTERS
        if name in cur.counters
    ]
    return WatchView(refresh, clock, seconds, rows, rules, rates)


def _rate_text(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return "-"
    if unit == "B/s":
        return f"{human_bytes(round(value))}/s"
    return f"{value:.1f}{unit}"


def plain_line(v: WatchView) -> str:
    """One refresh as one line of plain text (no terminal: logs, pipes)."""
    parts = [f"{v.clock} {len(v.flows)} spliced flows"]
    if v.rules:
        parts[0] += " (" + ", ".join(f"{r} {n}" for r, n, _ in v.rules) + ")"
    rates = [
        f"{label} {_rate_text(rate, 'B/s' if name.startswith('bytes') else '/s')}"
        for name, label, rate in v.rates
    ]
    if rates:
        parts.append(", ".join(rates))
    top = v.top()
    if top is not None:
        parts.append(
            f"top {top.flow.client} -> {top.flow.server} {top.flow.rule} "
            f"{_rate_text(top.rate, 'B/s')}"
        )
    if v.error:
        parts.append(f"error: {v.error}")
    return " | ".join(parts)


def render(v: WatchView, top: int, interval: float) -> Any:
    """The live view as a rich renderable: a header, pairs by rule, counter rates and the
    fastest `top` flows."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble(
        ("eztunnel-plugin flows", "bold"),
        f"  {v.clock}  refresh {v.refresh}, every {interval:g} s  ",
        (f"{len(v.flows)} spliced flows", "bold"),
    )
    parts: list[Any] = [head]
    if v.error:
        parts.append(Text(f"cannot reach the agent: {v.error} (retrying)", style="bold red"))
    rules = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("RULE", "ACTIVE PAIRS", "NEW PAIRS/S"):
        rules.add_column(title, justify="left" if title == "RULE" else "right")
    for rule, n, rate in v.rules:
        rules.add_row(rule, str(n), _rate_text(rate, ""))
    rates = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    rates.add_column("COUNTER")
    rates.add_column("PER SECOND", justify="right")
    for name, label, rate in v.rates:
        rates.add_row(label, _rate_text(rate, "B/s" if name.startswith("bytes") else ""))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(rules, rates)
    parts.append(grid)
    flows_t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("CLIENT", "SERVER", "RULE", "C->S/S", "S->C/S", "TOTAL", "STATE"):
        flows_t.add_column(title, justify="right" if "/" in title or title == "TOTAL" else "left",
                           no_wrap=True)  # fmt: skip
    for r in v.flows[:top]:
        f = r.flow
        flows_t.add_row(f.client, f.server, f.rule, _rate_text(r.c2s, "B/s"),
                        _rate_text(r.s2c, "B/s"), human_bytes(r.total),
                        f"{f.client_state}/{f.server_state}")  # fmt: skip
    parts.append(flows_t)
    shown = min(top, len(v.flows))
    parts.append(Text(f"{shown} of {len(v.flows)} flows, fastest first. Ctrl-C quits.",
                      style="dim"))  # fmt: skip
    return Group(*parts)


def _poll(stub: pb_grpc.InspectorStub, timeout: float) -> Poll:
    at = time.monotonic()
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=timeout)
    return Poll(at, _flow_pages(stub, timeout), dict(stats.counters))


def _rpc_error(e: grpc.RpcError) -> str:
    code = e.code().name if hasattr(e, "code") else "ERROR"
    return f"{code}: {e.details() if hasattr(e, 'details') else e}"


def watch(args: argparse.Namespace) -> int:
    """flows --watch: in place on a terminal (rich), one plain line per refresh elsewhere.

    The first poll must succeed (a down agent is the usual one-line error); a later
    failure is shown and the view keeps polling."""
    tty = sys.stdout.isatty()
    with grpc.insecure_channel(args.grpc_addr) as channel:
        stub = pb_grpc.InspectorStub(channel)
        prev = _poll(stub, args.timeout)
        view = compare(None, prev, 1, time.strftime("%H:%M:%S"))
        if not tty:
            return _watch_plain(args, stub, prev, view)
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(render(view, args.top, args.interval), console=console, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:  # fmt: skip
            for refresh in _refreshes(args, view.refresh):
                prev, view = _next(stub, args, prev, view, refresh)
                live.update(render(view, args.top, args.interval), refresh=True)
    return 0


def _watch_plain(
    args: argparse.Namespace, stub: pb_grpc.InspectorStub, prev: Poll, view: WatchView
) -> int:
    print(plain_line(view), flush=True)
    for refresh in _refreshes(args, view.refresh):
        prev, view = _next(stub, args, prev, view, refresh)
        print(plain_line(view), flush=True)
    return 0


def _refreshes(args: argparse.Namespace, done: int) -> Iterator[int]:
    """Refresh numbers after `done`, each after the interval (until --limit, or Ctrl-C)."""
    refresh = done
    while not args.limit or refresh < args.limit:
        time.sleep(args.interval)
        refresh += 1
        yield refresh


def _next(
    stub: pb_grpc.InspectorStub, args: argparse.Namespace, prev: Poll, view: WatchView, n: int
) -> tuple[Poll, WatchView]:
    clock = time.strftime("%H:%M:%S")
    try:
        cur = _poll(stub, args.timeout)
    except grpc.RpcError as e:
        return prev, dataclasses.replace(view, refresh=n, clock=clock, error=_rpc_error(e))
    return cur, compare(prev, cur, n, clock)


@_guard
def stats(args: argparse.Namespace) -> int:
    s = _call(args, lambda stub: stub.GetStats(pb.GetStatsRequest(), timeout=args.timeout))
    if args.json:
        print(_dump(s))
        return 0
    main = [(k, v) for k, v in s.counters.items() if not k.startswith("np_")]
    print(table(("COUNTER", "VALUE"), main))
    print()
    print(table(("NOT PAIRED BECAUSE", "SOCKETS"), sorted(s.not_paired_reasons.items())))
    return 0


def _admin_problem(path: str, timeout: float) -> str | None:
    """Why the admin socket can't be used, in words (gRPC's errors don't say)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return f"no admin socket at {path}: is the agent running on this node?"
    except PermissionError:
        return f"permission denied on {path}: changing the agent's state needs root"
    except ConnectionRefusedError:
        return f"nothing serves {path}: is the agent running on this node?"
    except OSError as e:
        return f"cannot connect to {path}: {e.strerror or e}"
    finally:
        probe.close()
    return None


def _switch(enabled: bool) -> Callable[[argparse.Namespace], int]:
    """enable / disable: the admin socket, where the agent knows who asks."""

    def run(args: argparse.Namespace) -> int:
        path = str(args.admin_socket)
        problem = _admin_problem(path, args.timeout)
        if problem:
            print(f"eztunnel-plugin: {problem}", file=sys.stderr)
            return 1
        try:
            with grpc.insecure_channel(f"unix:{path}") as channel:
                r = pb_grpc.AdminStub(channel).SetEnabled(
                    pb.SetEnabledRequest(enabled=enabled), timeout=args.timeout
                )
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "ERROR"
            details = e.details() if hasattr(e, "details") else str(e)
            what = "the agent refused" if code == "PERMISSION_DENIED" else f"{path}: {code}"
            print(f"eztunnel-plugin: {what}: {details}", file=sys.stderr)
            return 1
        print(_dump(r) if args.json else f"splicing {'enabled' if r.enabled else 'disabled'}")
        return 0 if r.enabled == enabled else 1

    return run


def health(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(args.grpc_addr) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # its stubs lack the methods
            r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"not healthy: {e.code().name}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(name)
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": status,
    "endpoints": endpoints,
    "flows": flows,
    "stats": stats,
    "enable": _switch(True),
    "disable": _switch(False),
    "health": health,
}
