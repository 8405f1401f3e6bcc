"""Prometheus metrics: prometheus_client renders them, a small bounded asyncio listener serves them.

Istio's conventions: the chart serves them on port 15020 at /stats/prometheus (/metrics
answers too); every name starts with eztunnel_, counters end in _total and units are in
the names (_bytes, _seconds). One collector (AgentCollector) reads the agent's view on
every scrape. The whole scrape (collect and exposition) runs on the API's reader thread,
never on the event loop: it reads the BPF maps.

Why not prometheus_client's own server (start_http_server): it starts a thread per
connection, without a limit on connections or a deadline per connection, so a few idle
clients hold threads (and memory) for ever. The listener here (api/httpd.py, shared with
the health probes) stays bounded for any client: request line and headers by size and
count (431 past that), connections by number (503 past that) and each connection by time;
it never sends a traceback.

The agent imports this module only to serve metrics (--metrics-listen): prometheus_client
costs it about 3 MB resident; ssl, which its exposition module imports at import time,
would add 4 MB more, and stays unloaded (lazyssl.ssl_deferred). What the agent records
at rest is in api/readings.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from eztunnel_plugin import lazyssl, log
from eztunnel_plugin.api import httpd
from eztunnel_plugin.api.reader import Reader
from eztunnel_plugin.api.view import AgentView, LatencyHistogram
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.config import Listen
from eztunnel_plugin.errors import ReaderBusy

# prometheus_client pulls in ssl (its exposition module, http.client) and hashlib (under
# urllib.request) for features the agent never uses (a TLS server, pushing to a gateway):
# both stay unloaded until something uses them (lazyssl.py).
with lazyssl.hashlib_deferred(), lazyssl.ssl_deferred():
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import Collector, CollectorRegistry

PATHS: Final = ("/stats/prometheus", "/metrics")  # Istio's path, and the usual one

MAX_CONNECTIONS = httpd.MAX_CONNECTIONS  # the listener's bounds are api/httpd.py's

_log = log.get(__name__)


# ---- the series ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterFamily:
    """One counter family fed by BPF counters: each (counter, label value) is one sample."""

    name: str  # with _total
    help: str
    label: str  # "" for a family of one sample
    members: tuple[tuple[str, str], ...]  # (layout.Counter name, lower-case; label value)


def _np(*reasons: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"np_{r}", r) for r in reasons)


# Every BPF counter, by the family it feeds (tests check that none is left out). `pairs`
# is the sum of the per-rule ones, so it is not exported on its own.
BPF_FAMILIES: Final = (
    CounterFamily(
        "eztunnel_sockets_seen_total",
        "TCP sockets the sockops program saw established in the attached cgroup",
        "",
        (("sockets_seen", ""),),
    ),
    CounterFamily(
        "eztunnel_sockets_registered_total",
        "connecting sockets registered for pairing",
        "",
        (("active_registered", ""),),
    ),
    CounterFamily(
        "eztunnel_pairs_total",
        "socket pairs spliced, by the rule that matched them",
        "rule",
        tuple((f"pairs_{r.name.lower()}", r.name.lower()) for r in layout.Rule if r.value),
    ),
    CounterFamily(
        "eztunnel_not_paired_total",
        "sockets left on plain TCP at pairing time, by reason",
        "reason",
        tuple((c.name.lower(), c.name.lower()[3:]) for c in layout.Counter if c.name[:3] == "NP_"),
    ),
    CounterFamily(
        "eztunnel_paired_sent_bytes_total",
        "bytes spliced sockets sent: redirected to the peer socket, or through TCP "
        "(a fallback, or for good)",
        "path",
        (("bytes_redirected", "redirected"), ("bytes_tcp_paired", "tcp")),
    ),
    CounterFamily(
        "eztunnel_messages_total",
        "messages the sk_msg program saw: redirected to the peer socket, or passed to TCP",
        "path",
        (("msgs_redirected", "redirected"), ("msgs_passed", "tcp")),
    ),
    CounterFamily(
        "eztunnel_backlog_fallbacks_total",
        "directions of spliced pairs sent to TCP because the peer held too much unread",
        "",
        (("backlog_fallbacks", ""),),
    ),
    CounterFamily(
        "eztunnel_resumes_total",
        "directions of spliced pairs back from TCP to redirecting",
        "",
        (("resumes", ""),),
    ),
    CounterFamily(
        "eztunnel_resume_waits_total",
        "resume checks that found the direction not ready yet, by what it waits for",
        "reason",
        (("resume_wait_drain", "drain"), ("resume_wait_quiet", "quiet")),
    ),
    CounterFamily(
        "eztunnel_bypass_readers_total",
        "peers whose reader bypasses the redirect queue: their direction stays on TCP",
        "",
        (("bypass_readers", ""),),
    ),
    CounterFamily(
        "eztunnel_redirect_misses_total",
        "redirects that found the peer socket gone (the sender goes to TCP)",
        "",
        (("redirect_misses", ""),),
    ),
    CounterFamily(
        "eztunnel_sockets_tainted_total",
        "sockets sent to TCP for good",
        "",
        (("tainted", ""),),
    ),
    CounterFamily(
        "eztunnel_sockets_unspliced_total",
        "sockets on TCP for good that left the socket map (no sk_msg cost any more)",
        "",
        (("unspliced", ""),),
    ),
    CounterFamily(
        "eztunnel_sockets_closed_total",
        "tracked sockets closed",
        "",
        (("sockets_closed", ""),),
    ),
    CounterFamily(
        "eztunnel_ack_callbacks_total",
        "RTT callbacks run for sockets still in the socket map",
        "",
        (("ack_callbacks", ""),),
    ),
)
UNEXPORTED_COUNTERS: Final = frozenset({"pairs"})


def _histogram(name: str, help_: str, h: LatencyHistogram) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*h.bounds, None), h.counts, strict=True):
        running += count
        # `le` spelled as prometheus_client's own histograms spell it.
        buckets.append(("+Inf" if bound is None else repr(float(bound)), running))
    return HistogramMetricFamily(name, help_, buckets=buckets, sum_value=h.total_s)


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=float(value))


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


class AgentCollector(Collector):
    """The agent's series, read through its view on every scrape (blocking: map reads)."""

    def __init__(self, view: AgentView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        v = self._view
        # Plain fields first: single reads of the agent's fields and immutable records.
        info = InfoMetricFamily("eztunnel_agent", "the agent's version, kernel and node")
        info.add_metric(
            [], {"version": v.version, "kernel": v.kernel, "node": v.node,
                 "source": v.endpoint_source.split(":", 1)[0]},
        )  # fmt: skip
        yield info
        yield _gauge("eztunnel_ready", "1 once the first complete snapshot is in the map", v.ready)
        yield from self._selftest()
        yield from self._xds()
        source_file = v.endpoints_file()
        if source_file is not None:
            yield _counter(
                "eztunnel_endpoints_file_errors_total",
                "loads of the endpoints file that failed",
                source_file.errors,
            )
        yield _counter(
            "eztunnel_addresses_refused_total",
            "workload addresses never enrolled (loopback, multicast, link-local, ...)",
            v.addresses_refused,
        )
        yield _histogram(
            "eztunnel_push_to_map_duration_seconds",
            "from a push received (xDS response, endpoints file change) to the endpoint map "
            "holding it",
            v.push_to_map(),
        )
        # The maps: nothing while the data plane is not loaded.
        dp = v.dataplane()
        in_map = v.endpoints_in_map()
        counters = v.counters()
        active = v.active_pairs()
        if dp is None or in_map is None or counters is None or active is None:
            return
        yield _gauge("eztunnel_splicing_enabled", "the kill switch: 1 while splicing is on",
                     dp.enabled)  # fmt: skip
        yield _gauge("eztunnel_endpoints_enrolled", "entries in the BPF endpoint map", len(in_map))
        pairs = GaugeMetricFamily(
            "eztunnel_active_pairs", "socket pairs spliced now, by rule", labels=["rule"]
        )
        for rule, count in sorted(active.items()):
            pairs.add_metric([rule], count)
        yield pairs
        yield from bpf_counter_families(counters)

    def _selftest(self) -> Iterator[Metric]:
        st = self._view.selftest
        decision = GaugeMetricFamily(
            "eztunnel_selftest_decision",
            "the kernel self-test's decision at start (1 for the one taken; not_run before it)",
            labels=["decision"],
        )
        decision.add_metric([st.decision if st is not None else "not_run"], 1)
        yield decision
        checks = GaugeMetricFamily(
            "eztunnel_selftest_check_passed", "each check of the kernel self-test: 1 passed",
            labels=["check"],
        )  # fmt: skip
        for c in st.checks if st is not None else ():
            checks.add_metric([c.name], float(c.passed))
        yield checks

    def _xds(self) -> Iterator[Metric]:
        st = self._view.xds()
        if st is None:
            return
        yield _gauge("eztunnel_xds_connected", "1 while an xDS stream is up", st.connected)
        yield _gauge("eztunnel_xds_stale", "1 while the xDS feed is stale", st.stale)
        yield _counter("eztunnel_xds_nacks_total", "responses NACKed to istiod", st.nacks)
        yield _counter("eztunnel_xds_streams_total", "xDS streams opened", st.streams)
        yield _counter(
            "eztunnel_xds_reconnects_total",
            "xDS streams opened after the first",
            max(0, st.streams - 1),
        )
        yield _counter(
            "eztunnel_xds_protocol_errors_total",
            "streams dropped for breaking the protocol",
            st.protocol_errors,
        )
        held = GaugeMetricFamily(
            "eztunnel_xds_resources", "xDS resources held, by type", labels=["type"]
        )
        for t in st.types:
            held.add_metric([t.type_url.rsplit(".", 1)[-1]], t.resources)
        yield held


def bpf_counter_families(counters: dict[str, int]) -> Iterator[CounterMetricFamily]:
    """The BPF counters as BPF_FAMILIES; a counter no family names (a newer data plane's)
    still appears, as eztunnel_bpf_<name>_total."""
    named: set[str] = set(UNEXPORTED_COUNTERS)
    for f in BPF_FAMILIES:
        family = CounterMetricFamily(f.name, f.help, labels=[f.label] if f.label else [])
        for counter, value in f.members:
            named.add(counter)
            if counter in counters:
                family.add_metric([value] if f.label else [], counters[counter])
        yield family
    for counter in sorted(counters.keys() - named):
        yield _counter(f"eztunnel_bpf_{counter}_total", f"BPF counter {counter}", counters[counter])


def registry(view: AgentView) -> CollectorRegistry:
    """The agent's series and the process's own (memory, CPU, fds: process_*)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(view))
    ProcessCollector(registry=reg)
    return reg


def render(view: AgentView) -> bytes:
    """The metrics page (blocking: it reads the maps)."""
    return generate_latest(registry(view))


# ---- the HTTP listener ---------------------------------------------------------------------


async def start(view: AgentView, listen: Listen, map_reader: Reader) -> asyncio.Server:
    reg = registry(view)

    async def handle(path: str) -> httpd.Reply:
        if path not in PATHS:
            return httpd.refused(404)
        try:
            return httpd.Reply(
                200, await map_reader.run(generate_latest, reg), CONTENT_TYPE_PLAIN_0_0_4
            )
        except ReaderBusy:
            return httpd.Reply(503, b"busy\n")

    server = await httpd.start(handle, listen, "metrics")
    if not listen.loopback:
        _log.warning(
            "metrics.exposed", listen=str(listen), note="metrics are reachable from the network"
        )
    _log.info("metrics.listening", listen=str(listen), paths=list(PATHS))
    return server
