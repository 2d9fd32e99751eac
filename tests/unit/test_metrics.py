"""The metrics the dashboards and alerts need, added to the operator and the node agent."""

from prometheus_client import CollectorRegistry, generate_latest

from agentkube.ebpf.metrics import Metrics
from agentkube.operator import metrics


def _value(registry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return registry.get_sample_value(name, labels or {})


def test_sandbox_phases_are_counted_per_phase_with_every_phase_present():
    phases = metrics.SandboxPhases()
    registry = CollectorRegistry()
    registry.register(phases)
    phases.set("a", "one", "Running")
    phases.set("a", "two", "Running")
    phases.set("b", "one", "Pending")
    phases.set("a", "two", "Suspended")  # a sandbox counts once, in its latest phase
    assert _value(registry, "agentkube_agentsandboxes", {"phase": "Running"}) == 1
    assert _value(registry, "agentkube_agentsandboxes", {"phase": "Suspended"}) == 1
    assert _value(registry, "agentkube_agentsandboxes", {"phase": "Pending"}) == 1
    assert _value(registry, "agentkube_agentsandboxes", {"phase": "Failed"}) == 0
    phases.forget("a", "one")
    phases.forget("a", "gone")  # forgetting the unknown is harmless
    assert _value(registry, "agentkube_agentsandboxes", {"phase": "Running"}) == 0
    assert set(metrics.sandbox_phase_counts([])) == set(metrics.SANDBOX_PHASES)


def test_a_decision_is_counted_by_reason_and_sets_the_model_gauges():
    from prometheus_client import REGISTRY

    before = _value(REGISTRY, "agentkube_autoscaling_decisions_total", {"reason": "PolicyDecided"}) or 0
    metrics.served_model_decided("ns", "llm", reason="PolicyDecided", target=42, policy_target=47.5, spot_share=0.25)
    labels = {"namespace": "ns", "servedmodel": "llm"}
    assert _value(REGISTRY, "agentkube_autoscaling_decisions_total", {"reason": "PolicyDecided"}) == before + 1
    assert _value(REGISTRY, "agentkube_servedmodel_concurrency_target", labels) == 42
    assert _value(REGISTRY, "agentkube_servedmodel_policy_target", labels) == 47.5
    assert _value(REGISTRY, "agentkube_servedmodel_spot_share", labels) == 0.25
    # A fallback has no policy target or spot share: the last ones stay; the target in force changes.
    metrics.served_model_decided("ns", "llm", reason="MetricsStale", target=100, policy_target=None, spot_share=None)
    assert _value(REGISTRY, "agentkube_servedmodel_concurrency_target", labels) == 100
    metrics.forget_served_model("ns", "llm")
    assert _value(REGISTRY, "agentkube_servedmodel_concurrency_target", labels) is None
    metrics.forget_served_model("ns", "llm")


def test_a_models_capacity_is_exported_by_type_with_its_cost_and_interruptions():
    from prometheus_client import REGISTRY

    from agentkube.operator.capacity import Usage

    labels = {"namespace": "ns", "servedmodel": "cap"}
    metrics.served_model_capacity("ns", "cap", Usage(on_demand_pods=1, spot_pods=3, cost_per_hour=2.056, unpriced_nodes=0))
    assert _value(REGISTRY, "agentkube_servedmodel_replicas", labels | {"capacity_type": "on-demand"}) == 1
    assert _value(REGISTRY, "agentkube_servedmodel_replicas", labels | {"capacity_type": "spot"}) == 3
    assert _value(REGISTRY, "agentkube_servedmodel_capacity_cost_per_hour", labels) == 2.056
    assert _value(REGISTRY, "agentkube_servedmodel_interruptions_total", labels) == 0  # there from the first look
    metrics.served_model_interrupted("ns", "cap")
    assert _value(REGISTRY, "agentkube_servedmodel_interruptions_total", labels) == 1
    metrics.forget_served_model_capacity("ns", "cap")
    assert _value(REGISTRY, "agentkube_servedmodel_replicas", labels | {"capacity_type": "spot"}) is None
    assert _value(REGISTRY, "agentkube_servedmodel_interruptions_total", labels) is None
    metrics.forget_served_model_capacity("ns", "cap")  # forgetting twice is harmless


def test_the_node_agent_exports_placement_latency_and_its_own_health():
    node = Metrics()
    with node.placement.time():
        pass
    node.bpf_loaded.set_function(lambda: 1.0)
    node.sandboxes.set_function(lambda: 3)
    assert _value(node.registry, "agentkube_node_agent_call_placement_seconds_count") == 1
    assert _value(node.registry, "agentkube_node_agent_bpf_programs_loaded") == 1
    assert _value(node.registry, "agentkube_node_agent_sandboxes") == 3
    assert b"agentkube_node_agent_call_placement_seconds_bucket" in generate_latest(node.registry)
