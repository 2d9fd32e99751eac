"""Spot-enabled ServedModels on real Karpenter (its KWOK provider) and real Knative Serving
(`dev up --with-knative --with-capacity`): the operator's NodePools make Karpenter launch spot and
on-demand NodeClaims, and the revision's pods land on both in the split asked for, never below the
on-demand base. Karpenter's nodes have simulated kubelets (kwok): the pods bound there never run."""

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client import CustomObjectsApi
from kubernetes.watch import Watch

from agentkube.devenv import DevEnv, images
from agentkube.operator import api, capacity, interruptions, servedmodel
from harness import Operator, install_operator, node_environment

KARPENTER = (capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION)


@pytest.fixture(scope="module")
def devenv(request: pytest.FixtureRequest) -> Iterator[DevEnv]:
    """Overrides the e2e one (its `api_client` and `kubectl` then take this environment)."""
    with node_environment(request, with_knative=True, with_capacity=True) as env:
        yield env


@pytest.fixture(scope="module")
def operator(devenv, kubectl, tmp_path_factory) -> Iterator[Operator]:
    running = Operator(install_operator(devenv, kubectl), tmp_path_factory.mktemp("operator"), "--peering=")
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def namespace(api_client) -> Iterator[str]:
    """One namespace for the module: the interruption test runs on the placement test's model."""
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name="capacity")))
    yield "capacity"
    core.delete_namespace("capacity")


def _nodeclaims(api_client, nodepools: set[str]) -> list[dict]:
    items = CustomObjectsApi(api_client).list_cluster_custom_object(*KARPENTER, capacity.NODECLAIMS)["items"]
    return [claim for claim in items if claim["metadata"].get("labels", {}).get(capacity.NODEPOOL_LABEL) in nodepools]


def _ready(obj: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def _placed_pods(api_client, namespace: str, name: str) -> Counter:
    """Capacity type → the model's scheduled, undeleted pods on nodes of that type."""
    core = kubernetes.client.CoreV1Api(api_client)
    node_types = {node.metadata.name: (node.metadata.labels or {}).get(capacity.CAPACITY_TYPE_LABEL, "none")
                  for node in core.list_node().items}
    pods = core.list_namespaced_pod(namespace, label_selector=f"agentkube.dev/served-model={name}").items
    return Counter(node_types.get(pod.spec.node_name, "unscheduled") for pod in pods if not pod.metadata.deletion_timestamp)


def test_spot_enabled_model_gets_spot_and_on_demand_nodeclaims_and_pods_on_both(api_client, operator, namespace, eventually):
    custom = CustomObjectsApi(api_client)
    # Four replicas at a spot share of at most 0.5 over an on-demand base of 1: one on-demand and one spot
    # spread domain, two pods on each.
    replicas = 4
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", {
        "apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": "llm"},
        "spec": {"model": {"name": "emulated"}, "image": images.MODEL_SERVER_IMAGE,
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                 "autoscaling": {"policy": "fixed", "minScale": replicas, "maxScale": replicas, "initialScale": replicas},
                 "capacity": {"spot": {"enabled": True, "onDemandBase": 1, "maxSpotFraction": 0.5}}}})
    pools = {capacity.nodepool_name(namespace, "llm", kind) for kind in (capacity.ON_DEMAND, capacity.SPOT)}
    eventually(lambda: {p["metadata"]["name"] for p in custom.list_cluster_custom_object(*KARPENTER, capacity.NODEPOOLS)["items"]}
               >= pools, timeout=60, message="the operator made no NodePools")

    # Karpenter launches NodeClaims of both capacity types, and their (simulated) nodes become Ready.
    def claims_by_type() -> dict[str, int]:
        ready = [c for c in _nodeclaims(api_client, pools) if _ready(c)]
        return Counter(c["metadata"]["labels"].get(capacity.CAPACITY_TYPE_LABEL) for c in ready)

    launched = eventually(lambda: (found := claims_by_type()) and found.get("spot") and found.get("on-demand") and found,
                          timeout=240, interval=2, message="Karpenter launched no Ready spot and on-demand NodeClaims")
    assert set(launched) == {"spot", "on-demand"}

    # The revision's pods land on both, in the split asked for; never fewer than the base on on-demand.
    placed = eventually(lambda: (found := _placed_pods(api_client, namespace, "llm")) and sum(
        found[kind] for kind in ("spot", "on-demand")) == replicas and found,
        timeout=240, interval=2, message="the revision's pods were not all placed on Karpenter's nodes")
    assert placed["on-demand"] >= 1
    assert placed == Counter({"on-demand": 2, "spot": 2})

    model = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm")
    condition = next(c for c in model["status"]["conditions"] if c["type"] == "Capacity")
    assert (condition["status"], condition["reason"]) == ("True", "NodePoolsApplied")



class PodStream:
    """The namespace's pods as a watch delivers their changes, in the API server's order: what was true at
    the moment of each change, not at a poll."""

    def __init__(self, api_client, namespace: str):
        self.pods: dict[str, dict] = {}
        self.first_eviction: dict | None = None  # the state when a pod on `node` was first being deleted
        self.node: str | None = None
        self._watch = Watch()
        self._thread = threading.Thread(target=self._run, args=(api_client, namespace), daemon=True)
        self._thread.start()

    def _run(self, api_client, namespace: str) -> None:
        core = kubernetes.client.CoreV1Api(api_client)
        for event in self._watch.stream(core.list_namespaced_pod, namespace, timeout_seconds=600):
            pod = event["object"]
            ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
            state = {"node": pod.spec.node_name, "ready": ready, "deleting": pod.metadata.deletion_timestamp is not None}
            if event["type"] == "DELETED":
                self.pods.pop(pod.metadata.name, None)
            else:
                self.pods[pod.metadata.name] = state
            if (self.node and self.first_eviction is None and state["node"] == self.node
                    and (state["deleting"] or event["type"] == "DELETED")):
                self.first_eviction = {name: dict(value) for name, value in self.pods.items()}

    def stop(self) -> None:
        self._watch.stop()


def test_an_interrupted_spot_nodes_pods_are_replaced_before_any_is_evicted(api_client, devenv, operator, namespace, eventually):
    """Runs after the test above, on its model: four pods, two on spot."""
    custom = CustomObjectsApi(api_client)
    core = kubernetes.client.CoreV1Api(api_client)
    pods = [p for p in core.list_namespaced_pod(namespace, label_selector=f"{servedmodel.MODEL_LABEL}=llm").items
            if not p.metadata.deletion_timestamp]
    assert len(pods) == 4, "the previous test's model is not in place"
    revision = pods[0].metadata.labels[interruptions.REVISION_LABEL]
    spot_nodes = {node.metadata.name for node in core.list_node(label_selector=f"{capacity.CAPACITY_TYPE_LABEL}=spot").items}
    node = next(p.spec.node_name for p in pods if p.spec.node_name in spot_nodes)
    on_node = sum(1 for p in pods if p.spec.node_name == node)

    stream = PodStream(api_client, namespace)
    stream.node = node
    try:
        played = subprocess.run([sys.executable, "-m", "agentkube", "capacity", "interrupt", node, "--notice", "30"],
                                env=devenv.environ(), capture_output=True, text=True, timeout=120)
        assert played.returncode == 0, played.stderr
        # Karpenter drains the node (through the Eviction API, which honours the operator's budget) and removes it.
        eventually(lambda: node not in {n.metadata.name for n in core.list_node().items}, timeout=240, interval=2,
                   message=f"node {node} was not removed after its NodeClaim was deleted")
        assert stream.first_eviction is not None, "no pod on the interrupted node was seen going"
        ready_elsewhere = sum(1 for state in stream.first_eviction.values()
                              if state["ready"] and state["node"] != node and not state["deleting"])
        # At the first eviction, the revision already had its four pods Ready off the interrupted node:
        # the replacements were Ready first.
        assert ready_elsewhere >= len(pods), stream.first_eviction
        assert on_node >= 1
    finally:
        stream.stop()

    # The node gone, the floor returns to the spec's (fixed: 4) and the budget goes.
    def floor() -> str | None:
        pod_autoscaler = custom.get_namespaced_custom_object(servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace,
                                                             servedmodel.PA_PLURAL, revision)
        annotations = pod_autoscaler["metadata"].get("annotations") or {}
        return None if interruptions.INTERRUPTED_NODES in annotations else annotations.get(interruptions.MIN_SCALE)

    assert eventually(floor, timeout=60, message="the floor was not put back") == "4"
    eventually(lambda: not kubernetes.client.PolicyV1Api(api_client).list_namespaced_pod_disruption_budget(namespace).items,
               timeout=60, message="the interruption's budget stayed")

    # The model goes, and its NodePools with it (they are cluster-scoped: no owner reference does that).
    pools = {capacity.nodepool_name(namespace, "llm", kind) for kind in (capacity.ON_DEMAND, capacity.SPOT)}
    custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm")
    eventually(lambda: not {p["metadata"]["name"] for p in custom.list_cluster_custom_object(*KARPENTER, capacity.NODEPOOLS)["items"]}
               & pools, timeout=60, message="the model's NodePools stayed after it was deleted")
