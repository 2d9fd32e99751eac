"""Where a ServedModel's replicas run, as pure functions: Karpenter NodePools for an on-demand base and
spot overflow, and the pod placement that splits a revision across them; or, where Karpenter is absent or
spot is off, node affinity on the capacity labels the managed Kubernetes services put on their nodes.

The split follows Karpenter's documented pattern for a ratio of on-demand to spot: two NodePools whose
nodes carry disjoint values of one custom label (`spread_label`, one per model), and a `topologySpreadConstraints` on
that label with maxSkew 1, so that the scheduler (and Karpenter, which simulates it) fills every value
("domain") in turn. With k on-demand and m spot domains the revision runs k/(k+m) of its pods on
on-demand, and once it has k+m pods at least k of them are on-demand (every domain holds one).

Below k+m pods the spread alone does not say which of several equally full domains a pod takes: every pod
of a revision has the same template, so no constraint can single out "the first k". The pods therefore
also prefer on-demand nodes. Karpenter treats a preference as a requirement until the pod cannot be
placed with it (then it drops it), and its spread picks among the domains the pod's requirements allow,
so the capacity it launches fills the on-demand domains first; the kube-scheduler, placing a pod on
nodes that exist already, weighs the preference in its score, which decides among the nodes the spread
allows but is a score, not a rule. And a ReplicaSet scaling down picks its victims without regard to
capacity type. So at fewer than k+m pods the base is what Karpenter launches and what the scheduler
prefers, not a guarantee (docs/architecture.md, "Capacity").

The split is changed in the NodePools only (the domain values), never in the pod template: a change to
the Knative Service's template would stamp a new Revision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

from agentkube.operator import api
from agentkube.operator.sandbox import MANAGED_BY
from agentkube.rl.spot import SpotConfig

KARPENTER_GROUP = "karpenter.sh"
KARPENTER_VERSION = "v1"
NODEPOOLS = "nodepools"
NODECLAIMS = "nodeclaims"
CAPACITY_TYPE_LABEL = f"{KARPENTER_GROUP}/capacity-type"
NODEPOOL_LABEL = f"{KARPENTER_GROUP}/nodepool"
ON_DEMAND, SPOT = "on-demand", "spot"
# The custom label of Karpenter's ratio-split pattern (each NodePool's nodes take one of its pool's values),
# one key per model (`spread_label`): Karpenter counts a spread's domains over every NodePool that offers
# the key, so with one key for all models another model's empty values hold the global minimum at 0 and a
# model never gets a second pod into any of its own (found by bench/capacity_cost.py with three models).
SPREAD_LABEL_PREFIX = "capacity-spread.agentkube.dev"
# Which ServedModel a NodePool serves (NodePools are cluster-scoped: no owner reference to a namespaced model).
MODEL_NAME_LABEL = "agentkube.dev/served-model"
MODEL_NAMESPACE_LABEL = "agentkube.dev/served-model-namespace"
# The pools' nodes are for model servers alone: everything else (sandboxes, Knative's own components, the
# node agent's DaemonSet) lacks the toleration and stays off them.
DEDICATED_TAINT = {"key": "agentkube.dev/served-models", "value": "true", "effect": "NoSchedule"}
DEDICATED_TOLERATION = {"key": DEDICATED_TAINT["key"], "operator": "Equal", "value": "true", "effect": "NoSchedule"}
# More domains than this would only make the split finer than a revision's pod count can show.
MAX_DOMAINS = 20
# Karpenter's name for a NodePool is also a label value (karpenter.sh/nodepool): at most 63 characters.
MAX_NODEPOOL_NAME = 63
# Nodes are replaced after a month (Karpenter's default) so that none runs an old image for ever.
EXPIRE_AFTER = "720h"
# A spot node goes `notice_s` after its notice whatever Karpenter does: waiting longer to drain gains
# nothing. On-demand nodes are drained unhurried (in-flight LLM requests run for minutes).
SPOT_TERMINATION_GRACE = f"{int(SpotConfig().notice_s)}s"
ON_DEMAND_TERMINATION_GRACE = "15m"
# Emptied nodes go after this long; nodes with model pods are never consolidated (a move is a cold start).
CONSOLIDATE_AFTER = "1m"
# Disrupt at most one on-demand node at a time (the base must hold), a fifth of the spot nodes.
DISRUPTION_BUDGETS = {ON_DEMAND: [{"nodes": "1"}], SPOT: [{"nodes": "20%"}]}

# The capacity labels and spot taints of the managed services, for placement without Karpenter:
# (label key, its spot value, the taint its spot nodes carry or None).
WELL_KNOWN_SPOT_LABELS: tuple[tuple[str, str, dict[str, str] | None], ...] = (
    (CAPACITY_TYPE_LABEL, SPOT, None),  # Karpenter's label, also on nodes of other provisioners
    ("eks.amazonaws.com/capacityType", "SPOT", None),  # EKS managed node groups
    ("cloud.google.com/gke-spot", "true", {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}),
    ("kubernetes.azure.com/scalesetpriority", "spot",
     {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"}),
)

Mode = Literal["karpenter", "labels"]
# The node label that carries an instance's price per hour: eks-node-viewer's convention, which Karpenter's
# KWOK provider follows (from the instance types' offerings). Nodes without it are counted, not priced.
PRICE_LABEL = "eks-node-viewer/instance-price"


@dataclass(frozen=True)
class NodeClassRef:
    """The cloud provider's node class every NodePool names (EC2NodeClass on AWS, KWOKNodeClass here)."""

    group: str = "karpenter.kwok.sh"
    kind: str = "KWOKNodeClass"
    name: str = "default"

    @classmethod
    def parse(cls, text: str) -> NodeClassRef:
        """`group/Kind/name`, as the operator's --node-class option takes it."""
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"node class {text!r}: expected group/Kind/name, e.g. karpenter.k8s.aws/EC2NodeClass/default")
        return cls(*parts)


@dataclass(frozen=True)
class Split:
    """How many spread domains each capacity type gets."""

    on_demand: int
    spot: int

    @property
    def spot_fraction(self) -> float:
        total = self.on_demand + self.spot
        return self.spot / total if total else 0.0


def spot_share_in_force(spot: api.SpotCapacity, policy_share: float | None) -> float:
    """The spot share to run at: the policy's when it gave one, else the largest allowed; never above
    `maxSpotFraction`, and 0 with spot off."""
    if not spot.enabled:
        return 0.0
    wanted = spot.max_spot_fraction if policy_share is None else policy_share
    return min(max(wanted, 0.0), spot.max_spot_fraction)


def split(spot: api.SpotCapacity, share: float) -> Split:
    """Domains for a spot share: the on-demand base's count of on-demand domains (at least one unless the
    share is all spot), and as many spot domains as keep the spot fraction at or below `share`."""
    if share <= 0:
        return Split(on_demand=max(1, spot.on_demand_base), spot=0)
    if share >= 1 and spot.on_demand_base == 0:
        return Split(on_demand=0, spot=1)
    on_demand = max(1, spot.on_demand_base)
    spot_domains = math.floor(on_demand * share / (1 - share) + 1e-9) if share < 1 else MAX_DOMAINS - on_demand
    on_demand = min(on_demand, MAX_DOMAINS)
    return Split(on_demand=on_demand, spot=max(0, min(spot_domains, MAX_DOMAINS - on_demand)))


def domain_values(capacity_type: str, count: int) -> list[str]:
    return [f"{capacity_type}-{index}" for index in range(1, count + 1)]


def spread_label(namespace: str, name: str) -> str:
    """The model's own spread key (a label name is at most 63 characters: a digest of the model)."""
    return f"{SPREAD_LABEL_PREFIX}/{hashlib.sha256(f'{namespace}/{name}'.encode()).hexdigest()[:16]}"


def nodepool_name(namespace: str, name: str, capacity_type: str) -> str:
    """`<namespace>-<name>-<type>`, shortened with a hash of the whole when it would pass 63 characters."""
    full = f"{namespace}-{name}-{capacity_type}"
    if len(full) <= MAX_NODEPOOL_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = MAX_NODEPOOL_NAME - len(capacity_type) - len(digest) - 2
    return f"{full[:keep].rstrip('-.')}-{digest}-{capacity_type}"


def model_labels(namespace: str, name: str) -> dict[str, str]:
    return {MODEL_NAME_LABEL: name, MODEL_NAMESPACE_LABEL: namespace, **MANAGED_BY}


def nodepools(namespace: str, name: str, spot: api.SpotCapacity, share: float, node_class: NodeClassRef) -> list[dict[str, Any]]:
    """The NodePools a spot-enabled ServedModel runs on: one per capacity type that has domains."""
    domains = split(spot, share)
    pools = []
    for capacity_type, count in ((ON_DEMAND, domains.on_demand), (SPOT, domains.spot)):
        if count == 0:
            continue
        pools.append({
            "apiVersion": f"{KARPENTER_GROUP}/{KARPENTER_VERSION}",
            "kind": "NodePool",
            "metadata": {"name": nodepool_name(namespace, name, capacity_type), "labels": model_labels(namespace, name)},
            "spec": {
                "template": {
                    "metadata": {"labels": model_labels(namespace, name)},
                    "spec": {
                        "requirements": [
                            {"key": CAPACITY_TYPE_LABEL, "operator": "In", "values": [capacity_type]},
                            {"key": spread_label(namespace, name), "operator": "In", "values": domain_values(capacity_type, count)},
                            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                        ],
                        "taints": [dict(DEDICATED_TAINT)],
                        "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": node_class.name},
                        "expireAfter": EXPIRE_AFTER,
                        "terminationGracePeriod": SPOT_TERMINATION_GRACE if capacity_type == SPOT else ON_DEMAND_TERMINATION_GRACE,
                    },
                },
                "disruption": {"consolidationPolicy": "WhenEmpty", "consolidateAfter": CONSOLIDATE_AFTER,
                               "budgets": DISRUPTION_BUDGETS[capacity_type]},
                # On-demand first when a pod could go either way (both pools' domains are open to it), as
                # the pods' preference asks: the base fills before the spot overflow.
                "weight": 10 if capacity_type == ON_DEMAND else 1,
            },
        })
    return pools


def orphaned_nodepools(pools: list[dict[str, Any]], models: set[tuple[str, str]], namespace: str | None) -> list[str]:
    """The NodePools made for a ServedModel that no longer exists (deleted while no operator ran, so no
    DELETED event removed them): those labelled with a model's namespace and name that `models` (namespace,
    name) lacks. Only within `namespace` when the operator watches one; pools without both labels are not
    ours to judge. `models` must be listed after `pools`: a pool is only made for a model that exists, so
    every pool listed first has its model in the later list unless the model is gone."""
    orphans = []
    for pool in pools:
        labels = (pool.get("metadata") or {}).get("labels") or {}
        owner = (labels.get(MODEL_NAMESPACE_LABEL), labels.get(MODEL_NAME_LABEL))
        if None in owner or any(labels.get(key) != value for key, value in MANAGED_BY.items()):
            continue
        if namespace is not None and owner[0] != namespace:
            continue
        if owner not in models:
            orphans.append(pool["metadata"]["name"])
    return sorted(orphans)


def holds(current: Any, wanted: Any) -> bool:
    """Whether `current` (as read back) has every field `wanted` sets, with the same value: what the API
    server added (defaults) is no difference."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(key in current and holds(current[key], value) for key, value in wanted.items())
    if isinstance(wanted, list):
        return isinstance(current, list) and len(current) == len(wanted) and all(map(holds, current, wanted))
    return bool(current == wanted)


def karpenter_placement(namespace: str, name: str, model_label: str) -> dict[str, Any]:
    """The revision's pod-spec fields for the NodePools above: only their nodes (required affinity on
    Karpenter's nodepool label), on-demand nodes preferred (the base first, see the module's note), the
    toleration of their taint, and the spread over the domains. The same whatever the split, so that a new
    share never stamps a new Revision."""
    return {
        "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": NODEPOOL_LABEL, "operator": "In",
                                       "values": [nodepool_name(namespace, name, ON_DEMAND), nodepool_name(namespace, name, SPOT)]}]},
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": [
                    {"key": CAPACITY_TYPE_LABEL, "operator": "In", "values": [ON_DEMAND]}]}},
            ],
        }},
        "tolerations": [dict(DEDICATED_TOLERATION)],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": spread_label(namespace, name), "whenUnsatisfiable": "DoNotSchedule",
                                       "labelSelector": {"matchLabels": {model_label: name}}}],
    }


def label_placement(spot_enabled: bool) -> dict[str, Any]:
    """Without Karpenter, or with spot off: the capacity labels the managed services put on their nodes.
    Spot off keeps the pods off every kind of spot node (NotIn also matches nodes without the label, such
    as on-demand GKE and AKS nodes). Spot on tolerates the spot taints and prefers spot nodes; it cannot
    hold a split, which needs node pools with spread domains."""
    if not spot_enabled:
        return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": key, "operator": "NotIn", "values": [value]}
                                  for key, value, _ in WELL_KNOWN_SPOT_LABELS]},
        ]}}}}
    return {
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": key, "operator": "In", "values": [value]}]}}
            for key, value, _ in WELL_KNOWN_SPOT_LABELS
        ]}},
        "tolerations": [{"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": taint["effect"]}
                        for _, _, taint in WELL_KNOWN_SPOT_LABELS if taint],
    }


def placement(namespace: str, name: str, spot: api.SpotCapacity, mode: Mode, model_label: str) -> dict[str, Any]:
    """The pod-spec fields for a revision of this model."""
    if spot.enabled and mode == "karpenter":
        return karpenter_placement(namespace, name, model_label)
    return label_placement(spot.enabled)


def capacity_condition(spot: api.SpotCapacity, mode: Mode, domains: Split | None) -> tuple[str, bool, str, str]:
    """The `Capacity` condition: which placement is in force, and why."""
    if not spot.enabled:
        return ("Capacity", True, "SpotDisabled",
                "spot is off: pods kept off spot nodes by the capacity labels of Karpenter, EKS, GKE and AKS")
    if mode == "labels":
        return ("Capacity", False, "KarpenterNotInstalled",
                "Karpenter's NodePools are not available: pods prefer spot nodes by the well-known capacity "
                "labels, with no on-demand base or split")
    assert domains is not None
    return ("Capacity", True, "NodePoolsApplied",
            f"NodePools for {domains.on_demand} on-demand and {domains.spot} spot spread domains "
            f"(spot fraction {domains.spot_fraction:.2f})")


@dataclass(frozen=True)
class Usage:
    """What a model runs on now: its pods by capacity type, and what its NodePools' nodes cost."""

    on_demand_pods: int
    spot_pods: int
    cost_per_hour: float  # the priced nodes of the model's NodePools
    unpriced_nodes: int  # nodes of its NodePools without a price label


def capacity_type_of(node_labels: dict[str, str]) -> str:
    """Spot if any of the managed services' capacity labels says so, else on-demand."""
    return SPOT if any(node_labels.get(key) == value for key, value, _ in WELL_KNOWN_SPOT_LABELS) else ON_DEMAND


def usage(pods: list[dict[str, Any]], nodes: dict[str, dict[str, str]], pools: set[str]) -> Usage:
    """`pods`: the model's; `nodes`: every node's labels by name; `pools`: the model's NodePools. Pods
    not bound yet or being deleted run nowhere and count for nothing."""
    kinds = [capacity_type_of(nodes[node]) for pod in pods
             if not (pod.get("metadata") or {}).get("deletionTimestamp")
             and (node := (pod.get("spec") or {}).get("nodeName")) in nodes]
    cost, unpriced = 0.0, 0
    for labels in nodes.values():
        if labels.get(NODEPOOL_LABEL) not in pools:
            continue
        try:
            cost += float(labels[PRICE_LABEL])
        except (KeyError, ValueError):
            unpriced += 1
    return Usage(kinds.count(ON_DEMAND), kinds.count(SPOT), round(cost, 6), unpriced)
