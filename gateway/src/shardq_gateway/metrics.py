"""The gateway's Prometheus metrics: requests, latency, upstream errors, retries, topology.

Counters live in plain dicts bumped by the hot path (no locks: one event loop);
a collector turns them into metric families when ``/metrics`` is scraped.
Names: ``shardq_gateway_`` prefix, base units, ``_total`` counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from shardq.wire.commands import TABLE
from shardq_server.buckets import Buckets
from shardq_server.limits import DROP_REASONS
from shardq_server.running import build_info

if TYPE_CHECKING:
    from .main import Gateway

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                   1.0, 5.0, 30.0)
_KNOWN = frozenset(TABLE)


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Buckets] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.refreshes = 0
        #: client connections closed or refused for a limit, by reason (docs/limits.md)
        self.drops: dict[str, int] = {}

    def request(self, cmd: str | None, ok: bool, started: float) -> None:
        name = cmd if cmd in _KNOWN else "other"
        key = (name, "ok" if ok else "error")
        self.requests[key] = self.requests.get(key, 0) + 1
        buckets = self.latency.get(name)
        if buckets is None:
            buckets = self.latency[name] = Buckets(LATENCY_BUCKETS)
        buckets.observe(time.perf_counter() - started)

    def upstream_error(self, node: str, reason: str) -> None:
        key = (node, reason)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def dropped(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


class GatewayCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        m = self.gateway.router.metrics
        requests = CounterMetricFamily("shardq_gateway_requests", "Requests by command and outcome",
                                       labels=["command", "outcome"])
        for (cmd, outcome), count in sorted(m.requests.items()):
            requests.add_metric([cmd, outcome], float(count))
        yield requests
        yield build_info()
        latency = HistogramMetricFamily("shardq_gateway_request_duration_seconds",
                                        "Time from a request's line to its answer",
                                        labels=["command"])
        for cmd, b in sorted(m.latency.items()):
            latency.add_metric([cmd], b.family_buckets(), sum_value=b.sum)
        yield latency
        errors = CounterMetricFamily("shardq_gateway_upstream_errors",
                                     "Connections to nodes lost or refused",
                                     labels=["node", "reason"])
        counts = dict(m.upstream_errors)
        for link in self.gateway.router.members:  # every node from 0, so rate() sees the first
            for reason in ("unreachable", "timeout", "closed"):
                counts.setdefault((link.name, reason), 0)
        for (node, reason), count in sorted(counts.items()):
            errors.add_metric([node, reason], float(count))
        yield errors
        retries = CounterMetricFamily("shardq_gateway_retries", "Requests retried, by reason",
                                      labels=["reason"])
        for reason in ("MOVED", "TRYAGAIN", "timeout"):
            retries.add_metric([reason], float(m.retries.get(reason, 0)))
        yield retries
        yield CounterMetricFamily("shardq_gateway_topology_refreshes",
                                  "Topologies adopted after the first", value=float(m.refreshes))
        yield GaugeMetricFamily("shardq_gateway_topology_epoch", "Epoch of the gateway's topology",
                                value=float(max(0, self.gateway.router.epoch)))
        yield GaugeMetricFamily("shardq_gateway_connections", "Open client connections",
                                value=float(len(self.gateway.sessions)))
        yield GaugeMetricFamily(
            "shardq_gateway_connection_buffered_bytes", "Bytes held for client connections: "
            "lines waiting, requests in flight, answers not yet sent",
            value=float(sum(s.backlog_bytes + s.unsent() for s in self.gateway.sessions)))
        dropped = CounterMetricFamily(
            "shardq_gateway_connections_dropped", "Client connections closed or refused for a "
            "limit, by reason (docs/limits.md)", labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], float(m.drops.get(reason, 0)))
        yield dropped
        yield CounterMetricFamily("shardq_gateway_internal_errors",
                                  "Requests answered Internal: an unexpected exception (a bug)",
                                  value=float(self.gateway.router.causes.count))


def registry_for(gateway: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
