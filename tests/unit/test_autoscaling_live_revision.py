"""The simulated revision's metrics carry the names and labels the operator's PromQL selects."""

import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentkube.operator import autoscaling
from agentkube.rl.knative import MIN_SCALE_ANNOTATION, TARGET_ANNOTATION
from agentkube.rl.live import LATENCY_BUCKETS_MS, RevisionMetrics, load_trace, min_scale_annotation, target_annotation
from agentkube.rl.simulator import Simulator


def _scrape(metrics: RevisionMetrics) -> dict[str, list]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    text = generate_latest(registry).decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_every_series_the_operator_queries_is_served_under_its_labels():
    simulator = Simulator()
    simulator.reset(load_trace("conversation", 36_000, 120), seed=1, target=150)
    metrics = RevisionMetrics("ml", "llm")
    for _ in range(30):
        metrics.record(simulator.advance(1), 150.0)
    samples = _scrape(metrics)
    matcher = autoscaling.revision_matcher("ml", "llm")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', matcher))
    for series in autoscaling.RAW_SERIES.values():
        assert series in samples, series
        assert all(wanted.items() <= s.labels.items() for s in samples[series])
    assert samples["revision_app_request_count"][0].value > 0
    buckets = samples["revision_app_request_latencies_bucket"]
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1
    assert buckets[-1].value == samples["revision_app_request_latencies_count"][0].value > 0
    assert samples["agentkube_simulator_target"][0].value == 150.0
    assert samples["autoscaler_actual_pods"][0].value >= 1


def test_the_target_comes_from_the_knative_service_annotation():
    service = {"spec": {"template": {"metadata": {"annotations": {"autoscaling.knative.dev/target": "37"}}}}}
    assert target_annotation(service) == 37.0
    assert target_annotation({"spec": {"template": {"metadata": {}}}}) is None
    assert target_annotation(None) is None


def test_the_floor_comes_from_the_pod_autoscalers_min_scale():
    pa = {"kind": "PodAutoscaler", "metadata": {"annotations": {MIN_SCALE_ANNOTATION: "3", TARGET_ANNOTATION: "80"}}}
    assert (min_scale_annotation(pa), target_annotation(pa)) == (3, 80.0)
    assert min_scale_annotation({"kind": "PodAutoscaler", "metadata": {}}) == 0  # Knative's default
    assert min_scale_annotation({"kind": "PodAutoscaler", "metadata": {"annotations": {MIN_SCALE_ANNOTATION: "x"}}}) == 0
