"""A Knative revision, played live by the simulator, for the operator's autoscaling loop.

`agentkube rl serve-revision` runs `Simulator` in real time (or faster) under a trace, reads the target and
the warm-pod floor in force from the revision's PodAutoscaler in the real API server (its
`autoscaling.knative.dev/target` and `min-scale` annotations, which the operator sets and Knative's KPA
reads), and serves what Knative's queue-proxy and autoscaler would export, under their
Prometheus names and labels, on 127.0.0.1 for a real Prometheus to scrape. It stands in for Knative's
data plane where there is none (tests, demos); it exits by itself after `duration_s`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import kubernetes
from kubernetes.client import ApiException
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from agentkube.rl.knative import MIN_SCALE_ANNOTATION, TARGET_ANNOTATION
from agentkube.rl.simulator import IntervalStats, Simulator
from agentkube.rl.traces import WORKLOADS, Trace, evaluation_trace, load_burstgpt
from agentkube.rl.workloads import HELD_OUT_FAMILIES, held_out_trace

__all__ = ["LATENCY_BUCKETS_MS", "RevisionMetrics", "load_trace", "target_annotation", "min_scale_annotation",
           "serve_revision"]

# Knative's queue-proxy request latency buckets (milliseconds), as it exports them.
LATENCY_BUCKETS_MS = (5, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800, 900,
                      1000, 2000, 5000, 10000, 20000, 50000, 100000)
# How often the target is re-read from the API server (wall seconds); the KPA reads it on its 2 s tick.
TARGET_POLL_S = 1.0


class RevisionMetrics:
    """A prometheus-client collector with one revision's metrics under Knative's names and labels
    (`namespace_name`, `service_name`, `configuration_name`, `revision_name`)."""

    def __init__(self, namespace: str, service: str) -> None:
        # Knative names a Service's configuration after it and its first revision <configuration>-00001.
        self.labels = {"namespace_name": namespace, "service_name": service, "configuration_name": service,
                       "revision_name": f"{service}-00001"}
        self._lock = threading.Lock()
        self.requests = 0.0
        self.buckets = [0.0] * (len(LATENCY_BUCKETS_MS) + 1)  # per bucket (not cumulative); the last is +Inf
        self.latency_sum_ms = 0.0
        self.gauges: dict[str, float] = {}
        self.target: float | None = None

    def record(self, stats: IntervalStats, target: float | None) -> None:
        """Add one interval. The simulator scores latency per interval as a p95, so the interval's
        admitted requests are counted at that p95: the histogram's p95 over a minute is then close to
        the simulator's, which is what the policy was trained on."""
        knative = stats.metrics
        with self._lock:
            self.requests += stats.arrivals
            if stats.admitted:
                latency_ms = knative["revision_app_request_latencies"]
                index = next((i for i, le in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= le), len(LATENCY_BUCKETS_MS))
                self.buckets[index] += stats.admitted
                self.latency_sum_ms += latency_ms * stats.admitted
            self.gauges = {name: value for name, value in knative.items() if name.startswith("autoscaler_")}
            self.target = target

    def describe(self) -> list[Metric]:
        return []  # collected on demand only: the families exist once the first interval is recorded

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        with self._lock:  # one consistent snapshot per scrape
            requests, per_bucket, latency_sum_ms = self.requests, list(self.buckets), self.latency_sum_ms
            gauges, target = dict(self.gauges), self.target
        # Knative's OpenCensus exporter names its counter without `_total`; an untyped family keeps it.
        count = Metric("revision_app_request_count", "The number of requests that are routed to queue-proxy", "unknown")
        count.add_sample("revision_app_request_count", self.labels, requests)
        yield count
        cumulative, buckets = 0.0, []
        for le, n in zip([*map(str, LATENCY_BUCKETS_MS), "+Inf"], per_bucket, strict=True):
            cumulative += n
            buckets.append((le, cumulative))
        latencies = HistogramMetricFamily("revision_app_request_latencies", "The response time in millisecond", labels=names)
        latencies.add_metric(values, buckets, latency_sum_ms)
        yield latencies
        for name, value in gauges.items():
            gauge = GaugeMetricFamily(name, f"Knative's {name}", labels=names)
            gauge.add_metric(values, value)
            yield gauge
        seen = GaugeMetricFamily("agentkube_simulator_target", "The concurrency target the simulated revision runs "
                                 "(0: Knative's default, no annotation)", labels=names)
        seen.add_metric(values, target or 0.0)
        yield seen


def load_trace(trace: str, start_s: float, duration_s: float) -> Trace:
    """`trace`: a generated workload's name (`WORKLOADS`), a held-out family's (`HELD_OUT_FAMILIES`)
    or a BurstGPT CSV file; the window [start_s, start_s + duration_s) of it."""
    if trace in WORKLOADS:
        full = evaluation_trace(trace, 0, duration_s=start_s + duration_s)
    elif trace in HELD_OUT_FAMILIES:
        full = held_out_trace(trace, 0, duration_s=start_s + duration_s)
    else:
        full = load_burstgpt(Path(trace))
    return full.window(start_s, duration_s)


def _annotations(obj: dict | None) -> dict:
    """A PodAutoscaler's annotations, or a Knative Service's template's."""
    obj = obj or {}
    if obj.get("kind") == "PodAutoscaler":
        return (obj.get("metadata") or {}).get("annotations") or {}
    return ((obj.get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations") or {}


def target_annotation(obj: dict | None) -> float | None:
    """The target on a PodAutoscaler (its annotations), or on a Knative Service (its template's); None:
    none set, Knative's default applies."""
    try:
        return float(_annotations(obj)[TARGET_ANNOTATION])
    except (KeyError, ValueError):
        return None


def min_scale_annotation(obj: dict | None) -> int:
    """The min-scale (warm-pod floor) on a PodAutoscaler or a Knative Service's template; 0 (Knative's
    default) when none is set or it is not a whole number."""
    try:
        return max(int(_annotations(obj)[MIN_SCALE_ANNOTATION]), 0)
    except (KeyError, ValueError):
        return 0


def _service_reader(namespace: str, service: str, kubeconfig: str | None) -> Callable[[], dict | None]:
    """Reads the PodAutoscaler of the service's newest revision (labelled with the service, as Knative
    labels it), where the operator sets the target in force and the KPA reads it; while there is none
    (no Knative controller made one), the Knative Service, whose template's target a new revision's
    PodAutoscaler starts with."""
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    custom = kubernetes.client.CustomObjectsApi(client)

    def read() -> dict | None:
        try:
            found = cast(dict, custom.list_namespaced_custom_object(
                "autoscaling.internal.knative.dev", "v1alpha1", namespace, "podautoscalers",
                label_selector=f"serving.knative.dev/service={service}", _request_timeout=5))
            items = sorted(found.get("items") or [], key=lambda item: item["metadata"]["name"])
            if items:
                return cast(dict, items[-1])
        except ApiException as error:
            if error.status != 404:
                raise
        try:
            return cast(dict, custom.get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services",
                                                                  service, _request_timeout=5))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    return read


def serve_revision(
    *, namespace: str, service: str, trace: Trace, port: int = 0, duration_s: float = 300.0, speed: float = 1.0,
    seed: int = 0, kubeconfig: str | None = None, echo: Callable[[str], None] = print,
) -> None:
    """Play the revision until `duration_s` wall seconds have passed (or the trace ends).

    `speed` simulated seconds pass per wall second; the metrics then count simulated requests, so rates
    read by Prometheus are `speed` times the trace's. `echo` gets `listening 127.0.0.1:<port>` first,
    then `target <value>` (or `target default`) whenever the target in force changes, and `min-scale <n>`
    whenever the warm-pod floor does."""
    read_service = _service_reader(namespace, service, kubeconfig)
    simulator = Simulator()
    metrics = RevisionMetrics(namespace, service)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        echo(f"listening 127.0.0.1:{server.server_port}")
        target, min_scale = _read_settings(read_service, (None, 0))
        simulator.reset(trace, seed=seed, target=target)
        simulator.set_min_scale(min_scale)
        echo(f"target {target:g}" if target is not None else "target default")
        started = time.monotonic()
        next_poll = started + TARGET_POLL_S
        tick = 1.0 / speed
        next_tick = started
        while time.monotonic() - started < duration_s and not simulator.done:
            if time.monotonic() >= next_poll:
                next_poll += TARGET_POLL_S
                new_target, new_min_scale = _read_settings(read_service, (target, min_scale))
                if new_target != target:
                    target = new_target
                    simulator.set_target(target)
                    echo(f"target {target:g}" if target is not None else "target default")
                if new_min_scale != min_scale:
                    min_scale = new_min_scale
                    simulator.set_min_scale(min_scale)
                    echo(f"min-scale {min_scale}")
            metrics.record(simulator.advance(1), target)
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _read_settings(read_service: Callable[[], dict | None], last: tuple[float | None, int]) -> tuple[float | None, int]:
    """(target, min-scale) in force; the last ones while the API server cannot be read."""
    try:
        obj = read_service()
        return target_annotation(obj), min_scale_annotation(obj)
    except Exception as error:  # the API server restarting: keep what is in force, as Knative would
        print(f"reading the target failed ({type(error).__name__}); keeping target {last[0]}, min-scale {last[1]}",
              file=sys.stderr)
        return last
