"""Spot-enabled ServedModels on real Karpenter (its KWOK provider) and real Knative Serving
(`dev up --with-knative --with-capacity`): the operator's NodePools make Karpenter launch spot and
on-demand NodeClaims, and the revision's pods land on both in the split asked for, never below the
on-demand base. Karpenter's nodes have simulated kubelets (kwok): the pods bound there never run."""

from collections import Counter
from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client import CustomObjectsApi

from agentkube import interruption_watch
from agentkube.devenv import DevEnv, images
from agentkube.operator import api, capacity, interruptions, servedmodel
from harness import Operator, install_operator, node_environment

KARPENTER = (capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION)


@pytest.fixture(scope="module")
def devenv(request: pytest.FixtureRequest) -> Iterator[DevEnv]:
    """Overrides the e2e one (its `api_client` and `kubectl` then take this environment)."""
    with node_environment(request, with_knative=True, with_capacity=True) as env:
        yield env


# A NodePool the operator made for a model deleted while no operator ran: the start's sweep removes it.
ORPHAN = capacity.nodepools("capacity", "deleted-while-down", api.SpotCapacity(enabled=True), 0.0, capacity.NodeClassRef())[0]


@pytest.fixture(scope="module")
def operator(devenv, kubectl, api_client, tmp_path_factory) -> Iterator[Operator]:
    kubeconfig = install_operator(devenv, kubectl)
    CustomObjectsApi(api_client).create_cluster_custom_object(*KARPENTER, capacity.NODEPOOLS, ORPHAN)
    running = Operator(kubeconfig, tmp_path_factory.mktemp("operator"), "--peering=")
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
    placed = eventually(lambda: (found := Counter(interruption_watch.pods_by_capacity_type(api_client, namespace, "llm"))) and sum(
        found[kind] for kind in ("spot", "on-demand")) == replicas and found,
        timeout=240, interval=2, message="the revision's pods were not all placed on Karpenter's nodes")
    assert placed["on-demand"] >= 1
    assert placed == Counter({"on-demand": 2, "spot": 2})

    model = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm")
    condition = next(c for c in model["status"]["conditions"] if c["type"] == "Capacity")
    assert (condition["status"], condition["reason"]) == ("True", "NodePoolsApplied")

    # The pool of the model deleted while no operator ran went at the operator's start; the model's stayed.
    remaining = {p["metadata"]["name"] for p in custom.list_cluster_custom_object(*KARPENTER, capacity.NODEPOOLS)["items"]}
    assert ORPHAN["metadata"]["name"] not in remaining and pools <= remaining



INTERRUPTIONS = 2  # a few in a row: each must leave the model as it found it (bench/capacity_interruptions.py runs 20)


def test_interrupted_spot_nodes_pods_are_replaced_before_any_is_evicted_and_all_returns_after(api_client, devenv, operator,
                                                                                                namespace, eventually):
    """Runs after the test above, on its model: four pods, two on spot."""
    custom = CustomObjectsApi(api_client)
    assert len(interruption_watch.live_pods(api_client, namespace, "llm")) == 4, "the previous test's model is not in place"
    for _ in range(INTERRUPTIONS):
        outcome = interruption_watch.play(api_client, devenv.environ(), namespace, "llm", replicas=4, notice_s=5)
        # At the first eviction from the node, the revision already had its four pods Ready off it: the
        # replacements were Ready first (the drain goes through the Eviction API, which the operator's budget holds).
        assert outcome.on_node >= 1
        assert outcome.replaced_before_eviction, outcome
        # The node gone, the floor, the budget and the pod count return to before (fixed: 4).
        assert outcome.restored_s is not None and outcome.pods_after == 4, outcome
    pods = interruption_watch.live_pods(api_client, namespace, "llm")
    pod_autoscaler = custom.get_namespaced_custom_object(servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace,
                                                         servedmodel.PA_PLURAL, pods[0].metadata.labels[interruptions.REVISION_LABEL])
    assert pod_autoscaler["metadata"]["annotations"][interruptions.MIN_SCALE] == "4"

    # The model goes, and its NodePools with it (they are cluster-scoped: no owner reference does that).
    pools = {capacity.nodepool_name(namespace, "llm", kind) for kind in (capacity.ON_DEMAND, capacity.SPOT)}
    custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm")
    eventually(lambda: not {p["metadata"]["name"] for p in custom.list_cluster_custom_object(*KARPENTER, capacity.NODEPOOLS)["items"]}
               & pools, timeout=60, message="the model's NodePools stayed after it was deleted")
