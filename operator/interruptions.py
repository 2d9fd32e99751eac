"""Spot interruptions, as pure functions: which signals say a node is about to go, and what the operator
does before its pods are evicted.

Signals: Karpenter's `karpenter.sh/disrupted` taint (put on a node whose NodeClaim is being deleted,
before the drain), the AWS Node Termination Handler's `spot-itn` taint (its interruption notice), and a
node condition of the same meaning. Reaction, per revision with pods on the node:
- its floor goes up by the pods there (the PodAutoscaler's `min-scale`, which the KPA reads from the
  annotations; the Revision stays), so replacements start at once, on other nodes (the signals taint the
  node NoSchedule), and Karpenter launches capacity for them if none is free. The revision's Deployment
  is raised to the new floor at once too: the KPA applies its bounds only while it has metrics (it leaves
  the Deployment alone until it does), and raising it now saves waiting for the next decision;
- a PodDisruptionBudget keeps the revision's pod count before the notice available, so that the drain's
  evictions (Karpenter drains through the Eviction API) wait until replacements are Ready;
- once the node is gone, the floor returns to what it was and the budget goes, and the Deployment returns
  to its count before the notice if it still has the count the operator gave it (had the KPA set one
  since, it is the KPA's; without metrics the KPA never would, and each interruption would otherwise
  leave the revision with more pods than it had before: bench/capacity_interruptions.py counts them).
"""

from __future__ import annotations

from typing import Any

from agentkube.operator.sandbox import MANAGED_BY
from agentkube.rl.knative import MAX_SCALE_ANNOTATION as MAX_SCALE
from agentkube.rl.knative import MIN_SCALE_ANNOTATION as MIN_SCALE

DISRUPTED_TAINT = "karpenter.sh/disrupted"
SPOT_NOTICE_TAINT = "aws-node-termination-handler/spot-itn"
INTERRUPTION_TAINTS = (DISRUPTED_TAINT, SPOT_NOTICE_TAINT)
# A node condition some termination handlers set instead of (or beside) a taint.
INTERRUPTION_CONDITIONS = ("SpotInterruption", "TerminationScheduled")
# On the PodAutoscaler: the floor (and ceiling) before the first interruption, and the nodes that raised it.
FLOOR_BEFORE = "agentkube.dev/min-scale-before-interruption"
CEILING_BEFORE = "agentkube.dev/max-scale-before-interruption"
INTERRUPTED_NODES = "agentkube.dev/interrupted-nodes"
# On the PodAutoscaler too: the revision Deployment's replicas before the first notice, and what the
# operator raised them to.
REPLICAS_BEFORE = "agentkube.dev/replicas-before-interruption"
REPLICAS_RAISED = "agentkube.dev/replicas-raised-to"
REVISION_LABEL = "serving.knative.dev/revision"


def interruption_signal(node: dict[str, Any]) -> str | None:
    """Why this node is about to go, or None."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    for taint in spec.get("taints") or []:
        if taint.get("key") in INTERRUPTION_TAINTS:
            return f"taint {taint['key']}"
    for condition in status.get("conditions") or []:
        if condition.get("type") in INTERRUPTION_CONDITIONS and condition.get("status") == "True":
            return f"condition {condition['type']}"
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return "node deleted"
    return None


def pods_by_revision(pods: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(namespace, revision) → its pods, for pods of a Knative revision."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for pod in pods:
        metadata = pod.get("metadata") or {}
        revision = (metadata.get("labels") or {}).get(REVISION_LABEL)
        if revision:
            grouped.setdefault((metadata["namespace"], revision), []).append(pod)
    return grouped


def _nodes(annotations: dict[str, str]) -> set[str]:
    return {name for name in annotations.get(INTERRUPTED_NODES, "").split(",") if name}


def raised_floor(pod_autoscaler: dict[str, Any], node: str, revision_pods: int, on_node: int,
                 replicas: int | None = None) -> dict[str, Any] | None:
    """The PodAutoscaler's annotation patch that raises its floor by the pods on `node`, over the pods the
    revision runs (so replacements come on top of them), and a bounded ceiling with it (the KPA clamps the
    floor to the ceiling); None when this node already raised it. `replicas`, the revision Deployment's
    count now (None: no Deployment), is recorded with what it is raised to (`REPLICAS_RAISED`)."""
    annotations = (pod_autoscaler.get("metadata") or {}).get("annotations") or {}
    nodes = _nodes(annotations)
    if node in nodes:
        return None
    current = int(annotations.get(MIN_SCALE, "0") or 0)
    floor = max(current, revision_pods) + on_node
    patch = {MIN_SCALE: str(floor), FLOOR_BEFORE: annotations.get(FLOOR_BEFORE, annotations.get(MIN_SCALE, "0")),
             INTERRUPTED_NODES: ",".join(sorted(nodes | {node}))}
    ceiling = int(annotations.get(MAX_SCALE, "0") or 0)
    if ceiling:  # 0 is unbounded
        patch[MAX_SCALE] = str(max(ceiling, floor))
        patch[CEILING_BEFORE] = annotations.get(CEILING_BEFORE, str(ceiling))
    if replicas is not None:
        patch[REPLICAS_BEFORE] = annotations.get(REPLICAS_BEFORE, str(replicas))
        patch[REPLICAS_RAISED] = str(max(replicas, floor))
    return {"metadata": {"annotations": patch}}


def replicas_raised_to(patch: dict[str, Any]) -> int | None:
    """The Deployment's count a `raised_floor` patch asks for (None: it had no Deployment)."""
    raised = patch["metadata"]["annotations"].get(REPLICAS_RAISED)
    return None if raised is None else int(raised)


def restored_floor(pod_autoscaler: dict[str, Any], existing_nodes: set[str]) -> dict[str, Any] | None:
    """The patch that puts the floor back once every node that raised it is gone; None while one remains
    (or when nothing was raised)."""
    annotations = (pod_autoscaler.get("metadata") or {}).get("annotations") or {}
    nodes = _nodes(annotations)
    if not nodes or nodes & existing_nodes:
        return None
    patch = {MIN_SCALE: annotations.get(FLOOR_BEFORE, "0"), FLOOR_BEFORE: None, INTERRUPTED_NODES: None,
             REPLICAS_BEFORE: None, REPLICAS_RAISED: None}
    if CEILING_BEFORE in annotations:
        patch |= {MAX_SCALE: annotations[CEILING_BEFORE], CEILING_BEFORE: None}
    return {"metadata": {"annotations": patch}}


def restored_replicas(pod_autoscaler: dict[str, Any], replicas: int | None) -> int | None:
    """What the revision's Deployment goes back to once the floor is restored: its count before the first
    notice, only while it still has the count the operator raised it to (None: leave it, the KPA has set
    its own since, or nothing was raised)."""
    annotations = (pod_autoscaler.get("metadata") or {}).get("annotations") or {}
    before, raised = annotations.get(REPLICAS_BEFORE), annotations.get(REPLICAS_RAISED)
    if before is None or raised is None or replicas != int(raised):
        return None
    return int(before)


def deployment_name(revision: str) -> str:
    """The Deployment Knative makes for a revision."""
    return f"{revision}-deployment"


def budget_name(revision: str) -> str:
    return f"{revision}-interruption"[:253]


def disruption_budget(namespace: str, revision: str, available: int) -> dict[str, Any]:
    """Keeps the revision's pods before the notice available: the drain evicts a pod on the interrupted
    node only once a replacement is Ready."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": budget_name(revision), "namespace": namespace,
                         "labels": {REVISION_LABEL: revision, **MANAGED_BY}},
            "spec": {"minAvailable": available, "selector": {"matchLabels": {REVISION_LABEL: revision}}}}


# ----- playing an interruption (`agentkube capacity interrupt`), the way AWS gives one -------------------------

NOTICE_SECONDS = 120.0  # AWS's two-minute spot interruption notice


def notice_taints(taints: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The node's taints with the notice added (as the AWS Node Termination Handler adds it: nothing new
    lands there); None when it is there already."""
    if any(taint.get("key") == SPOT_NOTICE_TAINT for taint in taints):
        return None
    return [*taints, {"key": SPOT_NOTICE_TAINT, "value": "true", "effect": "NoSchedule"}]


def nodeclaim_of(nodeclaims: list[dict[str, Any]], node: str) -> dict[str, Any] | None:
    """The NodeClaim whose node is `node`."""
    return next((claim for claim in nodeclaims if (claim.get("status") or {}).get("nodeName") == node), None)
