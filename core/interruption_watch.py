"""One spot interruption played on real Karpenter, and what the API server showed while it ran: whether a
revision's pods were all Ready elsewhere before the first pod on the interrupted node went. Shared by
`make demo` (one), tests/e2e/test_capacity.py (a few in a row) and bench/capacity_interruptions.py (twenty)."""

import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client import CustomObjectsApi
from kubernetes.watch import Watch

from agentkube.operator import capacity, interruptions, servedmodel


class PodStream:
    """The namespace's pods as a watch delivers their changes, in the API server's order: what was true at
    the moment of each change, not at a poll."""

    def __init__(self, api_client: Any, namespace: str, node: str):
        self.pods: dict[str, dict[str, Any]] = {}
        self.first_eviction: dict[str, dict[str, Any]] | None = None  # the pods when one on `node` first went
        self.node = node
        self._stopped = False
        self._watch = Watch()
        self._thread = threading.Thread(target=self._run, args=(api_client, namespace), daemon=True)
        self._thread.start()

    def _run(self, api_client: Any, namespace: str) -> None:
        try:
            self._follow(_core(api_client), namespace)
        except Exception:  # the stream cut when the caller stops it or its environment goes: nothing left to see
            if not self._stopped:
                raise

    def _follow(self, core: Any, namespace: str) -> None:
        for event in self._watch.stream(core.list_namespaced_pod, namespace, timeout_seconds=600):
            pod = event["object"]
            ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
            state = {"node": pod.spec.node_name, "ready": ready, "deleting": pod.metadata.deletion_timestamp is not None}
            if event["type"] == "DELETED":
                self.pods.pop(pod.metadata.name, None)
            else:
                self.pods[pod.metadata.name] = state
            if (self.first_eviction is None and state["node"] == self.node
                    and (state["deleting"] or event["type"] == "DELETED")):
                self.first_eviction = {name: dict(value) for name, value in self.pods.items()}

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


class InterruptionNotPlayed(RuntimeError):
    """The model was not steady before the notice, or the interruption did not run its course."""


@dataclass
class Interruption:
    """One interruption's outcome."""

    node: str
    pods_before: int  # the revision's pods before the notice
    on_node: int  # of them on the interrupted node
    ready_elsewhere_at_first_eviction: int | None  # None: no pod on the node was seen going
    node_gone_s: float  # notice to node removed
    restored_s: float | None  # notice to floor, budget and pod count back to before (None: not within the wait)
    pods_after: int
    placement_before: dict[str, int]  # capacity type → the revision's pods there, before the notice
    placement_after: dict[str, int]  # the same once all is back: replacements go where capacity was at the time

    @property
    def replaced_before_eviction(self) -> bool:
        return self.ready_elsewhere_at_first_eviction is not None and self.ready_elsewhere_at_first_eviction >= self.pods_before


def _core(api_client: Any) -> Any:
    """The client's typed models, read loosely: a test-and-demo observer, not the operator's data path."""
    return kubernetes.client.CoreV1Api(api_client)


def live_pods(api_client: Any, namespace: str, model: str) -> list[Any]:
    core = _core(api_client)
    return [p for p in core.list_namespaced_pod(namespace, label_selector=f"{servedmodel.MODEL_LABEL}={model}").items
            if not p.metadata.deletion_timestamp]


def pods_by_capacity_type(api_client: Any, namespace: str, model: str) -> dict[str, int]:
    """Capacity type (`spot`, `on-demand`; `none` for a node without the label, `unscheduled`) → the model's
    undeleted pods there."""
    core = _core(api_client)
    node_types = {node.metadata.name: (node.metadata.labels or {}).get(capacity.CAPACITY_TYPE_LABEL, "none")
                  for node in core.list_node().items}
    return dict(Counter(node_types.get(pod.spec.node_name, "unscheduled") for pod in live_pods(api_client, namespace, model)))


def _wait(condition: Any, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def steady(api_client: Any, namespace: str, model: str, replicas: int) -> bool:
    """The revision at its count, every pod bound and Ready, no interruption in progress (no raised floor,
    no budget)."""
    pods = live_pods(api_client, namespace, model)
    if len(pods) != replicas or not all(p.spec.node_name and any(c.type == "Ready" and c.status == "True"
                                                                 for c in p.status.conditions or []) for p in pods):
        return False
    revision = pods[0].metadata.labels[interruptions.REVISION_LABEL]
    custom: Any = CustomObjectsApi(api_client)
    pod_autoscaler = custom.get_namespaced_custom_object(
        servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace, servedmodel.PA_PLURAL, revision)
    if interruptions.INTERRUPTED_NODES in (pod_autoscaler["metadata"].get("annotations") or {}):
        return False
    return not kubernetes.client.PolicyV1Api(api_client).list_namespaced_pod_disruption_budget(namespace).items


def spot_node_of(api_client: Any, namespace: str, model: str) -> str | None:
    """A spot node with one of the model's pods."""
    core = _core(api_client)
    spot_nodes = {n.metadata.name for n in core.list_node(label_selector=f"{capacity.CAPACITY_TYPE_LABEL}={capacity.SPOT}").items}
    return next((p.spec.node_name for p in live_pods(api_client, namespace, model) if p.spec.node_name in spot_nodes), None)


def play(api_client: Any, environ: dict[str, str], namespace: str, model: str, replicas: int, notice_s: float,
         timeout_s: float = 240.0) -> Interruption:
    """Wait until the model is steady at `replicas`, interrupt one of its spot nodes with
    `agentkube capacity interrupt`, and follow it until everything is back to before."""
    if not _wait(lambda: steady(api_client, namespace, model, replicas), timeout_s):
        raise InterruptionNotPlayed(f"{model} was not steady at {replicas} Ready pods before the interruption")
    node = spot_node_of(api_client, namespace, model)
    if node is None:
        raise InterruptionNotPlayed(f"{model} has no pod on a spot node")
    before = live_pods(api_client, namespace, model)
    placement_before = pods_by_capacity_type(api_client, namespace, model)
    on_node = sum(1 for p in before if p.spec.node_name == node)
    core = _core(api_client)
    stream = PodStream(api_client, namespace, node)
    try:
        started = time.monotonic()
        played = subprocess.run([sys.executable, "-m", "agentkube", "capacity", "interrupt", node, "--notice", f"{notice_s:g}"],
                                env=environ, capture_output=True, text=True, timeout=notice_s + 60)
        if played.returncode != 0:
            raise InterruptionNotPlayed(played.stderr)
        gone = _wait(lambda: node not in {n.metadata.name for n in core.list_node().items}, timeout_s)
        if not gone:
            raise InterruptionNotPlayed(f"node {node} was not removed after its NodeClaim was deleted")
        node_gone_s = time.monotonic() - started
        restored = _wait(lambda: steady(api_client, namespace, model, replicas), timeout_s)
        restored_s = time.monotonic() - started if restored else None
    finally:
        stream.stop()
    ready_elsewhere = None
    if stream.first_eviction is not None:
        ready_elsewhere = sum(1 for state in stream.first_eviction.values()
                              if state["ready"] and state["node"] != node and not state["deleting"])
    return Interruption(node, len(before), on_node, ready_elsewhere, round(node_gone_s, 1),
                        None if restored_s is None else round(restored_s, 1), len(live_pods(api_client, namespace, model)),
                        placement_before, pods_by_capacity_type(api_client, namespace, model))
