"""Capacity I/O for ServedModels: find out whether Karpenter is there, apply the NodePools `capacity`
(pure) asks for with the spot share in force, remove them when spot is turned off or the model goes, and
say which placement is in force (the `Capacity` condition)."""

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import kopf

from agentkube.operator import api, capacity, interruptions, kube, metrics
from agentkube.operator.kube import SERVED_MODELS, ApiException
from agentkube.operator.rechecks import rechecks
from agentkube.operator.servedmodel import MODEL_LABEL
from agentkube.operator.status import ConditionUpdate

CONDITION = "Capacity"
# How often a model's replicas by capacity type and its nodes' cost are measured for the metrics.
CAPACITY_MEASURE_INTERVAL = timedelta(seconds=30)

_node_class = capacity.NodeClassRef()
_namespace: str | None = None  # the one namespace the operator watches, or None for all


def configure_capacity(node_class: str | None, namespace: str | None = None) -> None:
    """The node class every NodePool names (`group/Kind/name`; unset: KWOK's `default`, as `dev up
    --with-capacity` makes it), and the namespace the operator watches (None: all)."""
    global _node_class, _namespace
    _node_class = capacity.NodeClassRef.parse(node_class) if node_class else capacity.NodeClassRef()
    _namespace = namespace


@kopf.on.startup()
def sweep_orphaned_nodepools(logger: logging.Logger, **_: Any) -> None:
    """At start, remove the NodePools of models deleted while no operator ran (the DELETED event that
    removes them otherwise was never seen). A failed sweep is logged, not retried: it must not keep the
    operator from starting, and the next start sweeps again."""
    try:
        pools = kube.list_managed_nodepools()  # before the models: see `capacity.orphaned_nodepools`
        if pools is None:
            return  # no Karpenter
        for name in capacity.orphaned_nodepools(pools, kube.served_model_names(_namespace), _namespace):
            kube.delete_nodepool(name)
            logger.info("deleted NodePool %s: its ServedModel no longer exists", name)
    except ApiException as error:
        logger.warning("the sweep of orphaned NodePools failed (%s %s); the next start tries again",
                       error.status, error.reason)


@dataclass(frozen=True)
class CapacityInForce:
    placement: dict[str, Any]  # the revision's pod-spec fields
    condition: ConditionUpdate
    spot_share: float


def policy_share(spec: api.ServedModelSpec, status: api.ServedModelStatus) -> float | None:
    """The policy's last spot share, under `ppo` (None otherwise, or before its first decision)."""
    if spec.autoscaling.policy == "ppo" and status.last_decision is not None:
        return status.last_decision.spot_share
    return None


def apply_capacity(namespace: str, name: str, spec: api.ServedModelSpec, status: api.ServedModelStatus) -> CapacityInForce:
    """Bring the model's NodePools to what its spec and the policy's share ask for; the placement that goes
    with them."""
    spot = spec.capacity.spot
    existing = kube.list_model_nodepools(namespace, name)
    mode: capacity.Mode = "labels" if existing is None else "karpenter"
    share = capacity.spot_share_in_force(spot, policy_share(spec, status))
    wanted = capacity.nodepools(namespace, name, spot, share, _node_class) if spot.enabled and mode == "karpenter" else []
    current = {pool["metadata"]["name"]: pool for pool in existing or []}
    for pool in wanted:
        kube.apply_nodepool(pool, current.get(pool["metadata"]["name"]))
    # A pool no longer wanted (spot off, or a share of 0 or 1): Karpenter drains and removes its nodes.
    for stale in set(current) - {pool["metadata"]["name"] for pool in wanted}:
        kube.delete_nodepool(stale)
    domains = capacity.split(spot, share) if spot.enabled and mode == "karpenter" else None
    return CapacityInForce(capacity.placement(namespace, name, spot, mode, MODEL_LABEL),
                           capacity.capacity_condition(spot, mode, domains), share)


@kopf.on.event(api.GROUP, api.VERSION, SERVED_MODELS)
def served_model_event(type: str, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    """NodePools are cluster-scoped, so no owner reference takes them along with the model: remove them
    when the model is gone. On the watch's DELETED event rather than with a finalizer, so that nothing
    holds a model's deletion (a model deleted while no operator runs leaves its NodePools, which
    `kubectl delete nodepools -l agentkube.dev/served-model=NAME` removes)."""
    if type != "DELETED":
        return
    metrics.forget_served_model_capacity(namespace, name)
    for pool in kube.list_model_nodepools(namespace, name) or []:
        kube.delete_nodepool(pool["metadata"]["name"])
        logger.info("deleted NodePool %s of %s/%s", pool["metadata"]["name"], namespace, name)


@kopf.on.event("", "v1", "nodes")
def node_changed(type: str, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """A node about to go (see `interruptions`): raise the floors of the revisions with pods on it and hold
    their drain until replacements are Ready. A node gone: put the floors back."""
    node = kube.as_dict(dict(body))
    name = node["metadata"]["name"]
    if type == "DELETED":
        restore_floors(logger)
        return
    signal = interruptions.interruption_signal(node)
    if signal is None:
        return
    pods = [pod for pod in kube.list_model_pods_on_node(name) if not pod["metadata"].get("deletionTimestamp")]
    for (namespace, revision), on_node in interruptions.pods_by_revision(pods).items():
        pod_autoscaler = kube.read_pod_autoscaler(namespace, revision)  # Knative names it after its revision
        if pod_autoscaler is None:
            continue
        running = kube.count_revision_pods(namespace, revision)
        deployment = interruptions.deployment_name(revision)
        replicas = kube.deployment_replicas(namespace, deployment)
        patch = interruptions.raised_floor(pod_autoscaler, name, running, len(on_node), replicas)
        if patch is None:
            continue  # this node's notice was handled already
        # The budget first: from then on no drain evicts below the pods running now.
        kube.create_disruption_budget(namespace, interruptions.disruption_budget(namespace, revision, running))
        kube.patch_pod_autoscaler(namespace, revision, patch)
        raised = interruptions.replicas_raised_to(patch)
        if raised is not None and replicas is not None and raised > replicas:
            kube.scale_deployment(namespace, deployment, raised)
        logger.warning("node %s is going (%s): revision %s/%s floor raised by %d for replacements",
                       name, signal, namespace, revision, len(on_node))
        model = (on_node[0]["metadata"].get("labels") or {}).get(MODEL_LABEL)
        if model:
            metrics.served_model_interrupted(namespace, model)


def restore_floors(logger: logging.Logger) -> None:
    """Put back every floor an interruption raised once all the nodes that raised it are gone."""
    existing = kube.node_names()
    for pod_autoscaler in kube.list_all_pod_autoscalers():
        patch = interruptions.restored_floor(pod_autoscaler, existing)
        if patch is None:
            continue
        namespace, revision = pod_autoscaler["metadata"]["namespace"], pod_autoscaler["metadata"]["name"]
        deployment = interruptions.deployment_name(revision)
        replicas = interruptions.restored_replicas(pod_autoscaler, kube.deployment_replicas(namespace, deployment))
        kube.patch_pod_autoscaler(namespace, revision, patch)
        if replicas is not None:
            kube.scale_deployment(namespace, deployment, replicas)
        kube.delete_disruption_budget(namespace, interruptions.budget_name(revision))
        logger.info("revision %s/%s: interrupted nodes gone, floor back to %s", namespace, revision,
                    patch["metadata"]["annotations"][interruptions.MIN_SCALE])


def measure_capacity(namespace: str, name: str, logger: logging.Logger) -> None:
    """Export what a model runs on (its pods by capacity type, its NodePools' nodes' cost per hour), then
    look again after `CAPACITY_MEASURE_INTERVAL`; ends by itself when the model is gone."""
    model = kube.read_own(SERVED_MODELS, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        metrics.forget_served_model_capacity(namespace, name)
        return
    try:
        pools = {capacity.nodepool_name(namespace, name, kind) for kind in (capacity.ON_DEMAND, capacity.SPOT)}
        metrics.served_model_capacity(namespace, name, capacity.usage(kube.list_model_pods(namespace, name),
                                                                      kube.node_labels(), pools))
    finally:
        rechecks.schedule(measure_capacity, namespace, name, CAPACITY_MEASURE_INTERVAL, logger)
