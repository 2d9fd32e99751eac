"""The operator's own Prometheus metrics. Labels are bounded: the kind, the result, a phase or a reason —
never an AgentSandbox's name. ServedModels are the exception: one series per model for the target in
force and the policy's wish (as Knative exports one per revision), which a dashboard needs per model."""

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentkube.operator import capacity
from agentkube.operator.api import SandboxPhase
from agentkube.operator.autoscaling_reasons import DECISION_REASONS

RECONCILES = Counter(
    "agentkube_operator_reconciles_total", "Reconciliations by kind and result (success or error).", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "agentkube_operator_reconcile_seconds", "Time one reconciliation takes, by kind.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTOSCALING_DECISIONS = Counter(
    "agentkube_autoscaling_decisions_total",
    "Turns of the ppo autoscaling loop by reason (PolicyDecided, or why it fell back to Knative's default).",
    ["reason"],
)
MODEL_LABELS = ("namespace", "servedmodel")
CONCURRENCY_TARGET = Gauge(
    "agentkube_servedmodel_concurrency_target", "The per-pod concurrency target in force on a ServedModel.", MODEL_LABELS
)
POLICY_TARGET = Gauge(
    "agentkube_servedmodel_policy_target", "The target the policy asked for, before the bounded step.", MODEL_LABELS
)
SPOT_SHARE = Gauge("agentkube_servedmodel_spot_share", "The share of replicas the policy places on spot capacity.",
                   MODEL_LABELS)
REPLICAS = Gauge("agentkube_servedmodel_replicas", "A ServedModel's pods bound to nodes, by the nodes' capacity type "
                 "(spot or on-demand, from the capacity labels of Karpenter, EKS, GKE and AKS).", [*MODEL_LABELS, "capacity_type"])
CAPACITY_COST = Gauge("agentkube_servedmodel_capacity_cost_per_hour",
                      "What the nodes of a ServedModel's NodePools cost per hour (their instance-price labels).", MODEL_LABELS)
INTERRUPTIONS = Counter("agentkube_servedmodel_interruptions",
                        "Nodes announced as going (spot interruptions and other disruptions) that held pods of a ServedModel.",
                        MODEL_LABELS)
CAPACITY_TYPES = (capacity.ON_DEMAND, capacity.SPOT)

SANDBOX_PHASES: tuple[str, ...] = get_args(SandboxPhase)
KINDS = ("AgentSandbox", "AgentSandboxPool", "ServedModel")
# Every bounded label value exists from the start (at zero): an error rate or a fallback count is then 0,
# not "no data", and `rate()` sees the first increase.
for _kind in KINDS:
    for _result in ("success", "error"):
        RECONCILES.labels(_kind, _result)
for _reason in DECISION_REASONS:
    AUTOSCALING_DECISIONS.labels(_reason)


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "success").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


def sandbox_phase_counts(phases: Iterable[str]) -> dict[str, int]:
    """How many sandboxes are in each phase (every phase, zero included, so a panel never goes blank)."""
    counts = dict.fromkeys(SANDBOX_PHASES, 0)
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    return counts


class SandboxPhases(Collector):
    """The phase of every AgentSandbox this replica last reconciled, exported as counts per phase. A standby
    replica reconciles nothing and exports zeros: sum over replicas is the cluster's count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        self.set(namespace, name, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = sandbox_phase_counts(self._phases.values())
        family = GaugeMetricFamily("agentkube_agentsandboxes", "AgentSandboxes by phase, as last reconciled.", labels=["phase"])
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


SANDBOXES = SandboxPhases()
REGISTRY.register(SANDBOXES)


def served_model_decided(namespace: str, name: str, *, reason: str, target: int, policy_target: float | None,
                         spot_share: float | None) -> None:
    """Record one turn of the autoscaling loop."""
    AUTOSCALING_DECISIONS.labels(reason).inc()
    CONCURRENCY_TARGET.labels(namespace, name).set(target)
    if policy_target is not None:
        POLICY_TARGET.labels(namespace, name).set(policy_target)
    if spot_share is not None:
        SPOT_SHARE.labels(namespace, name).set(spot_share)


def forget_served_model(namespace: str, name: str) -> None:
    for gauge in (CONCURRENCY_TARGET, POLICY_TARGET, SPOT_SHARE):
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass


def served_model_capacity(namespace: str, name: str, usage: capacity.Usage) -> None:
    """Record what a model runs on now (both capacity types, zero included, and its interruptions counter
    at zero from the first look: a panel then shows 0, not "no data")."""
    REPLICAS.labels(namespace, name, capacity.ON_DEMAND).set(usage.on_demand_pods)
    REPLICAS.labels(namespace, name, capacity.SPOT).set(usage.spot_pods)
    CAPACITY_COST.labels(namespace, name).set(usage.cost_per_hour)
    INTERRUPTIONS.labels(namespace, name)


def served_model_interrupted(namespace: str, name: str) -> None:
    INTERRUPTIONS.labels(namespace, name).inc()


def forget_served_model_capacity(namespace: str, name: str) -> None:
    for labels in ((namespace, name, kind) for kind in CAPACITY_TYPES):
        try:
            REPLICAS.remove(*labels)
        except KeyError:
            pass
    for metric in (CAPACITY_COST, INTERRUPTIONS):
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass
