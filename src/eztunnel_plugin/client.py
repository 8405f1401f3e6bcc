"""CLI commands that talk to a running agent's API and print readable tables (or JSON)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
    print(
        table(
            ("IP", "IN MAP", "NAMESPACE", "NAME", "WORKLOAD UID"),
            [
                (
                    e.ip,
                    "yes" if e.in_map else "NO",
                    e.namespace or "-",
                    e.name or "-",
                    e.workload_uid or "-",
                )
                for e in r.endpoints
            ],
        )
    )
    if r.unexpected_in_map:
        print(f"in the map but not desired: {', '.join(r.unexpected_in_map)}")
    return 0


def _all_flows(args: argparse.Namespace) -> list[Any]:
    flows: list[Any] = []
    token = ""
    with grpc.insecure_channel(args.grpc_addr) as channel:
        stub = pb_grpc.InspectorStub(channel)
        for _ in range(10_000):  # bounded: pages of 1000 cover any sockhash
            page = stub.ListFlows(
                pb.ListFlowsRequest(page_size=1000, page_token=token), timeout=args.timeout
            )
            flows.extend(page.flows)
            token = page.next_page_token
            if not token:
                break
    return flows


def _flows_table(flows: Sequence[Any]) -> str:
    return table(
        ("CLIENT", "SERVER", "RULE", "C->S", "S->C", "STATE", "NETNS"),
        [
            (
                f.client,
                f.server,
                f.rule,
                human_bytes(f.bytes_client_to_server),
                human_bytes(f.bytes_server_to_client),
                f"{f.client_state}/{f.server_state}",
                "same" if f.client_netns_cookie == f.server_netns_cookie else "cross",
            )
            for f in flows
        ],
    )


@_guard
def flows(args: argparse.Namespace) -> int:
    rounds = 0
    while True:
        current = _all_flows(args)
        if args.json:
            print(json.dumps([json.loads(_dump(f)) for f in current]))
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            stamp = time.strftime("%H:%M:%S")
            print(f"{len(current)} spliced flows at {stamp}")
            print(_flows_table(current))
        rounds += 1
        if not args.watch or (args.limit and rounds >= args.limit):
            return 0
        sys.stdout.flush()
        time.sleep(args.interval)


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
