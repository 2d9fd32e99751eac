"""AgentSandboxPool handlers: read the pool and its warm pods, ask `pool` (pure) what to make and delete,
apply, write status. Adoption itself is the sandbox handlers' (`adopt`), which then refill the pool here."""

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import kopf

from agentkube.contract import CLAIMED_BY_LABEL, POOL_LABEL
from agentkube.operator import api, kube, metrics, pool, sandbox, shards
from agentkube.operator.gateway_settings import gateway
from agentkube.operator.kube import POOLS
from agentkube.operator.status import merge_conditions

# One reconcile of a pool at a time in this process: pod events and adoptions come from many worker threads,
# and two reconciles reading the same count would both make the missing pods.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


# Long past any event of a sandbox from before its first status (they come within milliseconds of it) and
# any retry of a failed reconciliation (`rechecks.RETRY_AFTER_FAILURE`).
GIVEN_MEMORY_SECONDS = 600


class Known:
    """The pools and waiting warm pods this process last saw (from their events and its own reads), so that
    a claim reads neither before it adopts. Only a hint: adoption is a patch conditional on the pod's
    resourceVersion, so a pod changed or taken meanwhile fails it, and the claim lists the pool's pods after
    all; a pool read here may lag a template change by one event, which at worst adopts a pod of the old
    template that the roll was about to replace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str], dict[str, Any]] = {}
        self._warm: defaultdict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
        self._given: dict[str, float] = {}  # sandbox uid -> when this process set out to give it a pod (monotonic)

    def pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pool, as last seen or else read now."""
        with self._lock:
            body = self._pools.get((namespace, name))
        if body is None:
            body = kube.read_own(POOLS, namespace, name)
            self.saw_pool(namespace, name, body)
        return body

    def saw_pool(self, namespace: str, name: str, body: dict[str, Any] | None) -> None:
        with self._lock:
            if body is None or body["metadata"].get("deletionTimestamp"):
                self._pools.pop((namespace, name), None)
                self._warm.pop((namespace, name), None)
            else:
                self._pools[(namespace, name)] = body

    def saw_warm_pod(self, event_type: str | None, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        pool_name = (metadata.get("labels") or {}).get(POOL_LABEL)
        if not pool_name:
            return
        waiting = event_type != "DELETED" and not metadata.get("deletionTimestamp") \
            and not (metadata.get("labels") or {}).get(CLAIMED_BY_LABEL)
        with self._lock:
            pods = self._warm[(metadata["namespace"], pool_name)]
            if waiting:
                pods[metadata["name"]] = pod
            else:
                pods.pop(metadata["name"], None)

    def warm_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._warm.get((namespace, name), {}).values())

    def taken(self, namespace: str, name: str, pod_name: str) -> None:
        with self._lock:
            self._warm.get((namespace, name), {}).pop(pod_name, None)


    def giving_pod(self, sandbox_uid: str) -> None:
        """This process is about to give a sandbox a pod (adopt or start one): from then on, until its status
        says so, neither an event of it from before nor a retry after a failed write may look like a sandbox
        with no pod yet. A write can take effect and still fail on its way back (an API server timing out
        on etcd, a dropped connection); a retry that adopted blind would then take a second warm pod, and the
        claim after it would start cold."""
        now = time.monotonic()
        with self._lock:
            self._given = {uid: at for uid, at in self._given.items() if now - at < GIVEN_MEMORY_SECONDS}
            self._given[sandbox_uid] = now

    def may_have_given_pod(self, sandbox_uid: str) -> bool:
        with self._lock:
            return sandbox_uid in self._given


known = Known()


def reconcile_pool(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None) -> pool.PoolPlan | None:
    with _locks[(namespace, name)]:
        body = kube.read_own(POOLS, namespace, name) if body is None else body
        known.saw_pool(namespace, name, body)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # its warm pods go with it (owner references); adopted ones are their sandboxes'
        with metrics.reconciling("AgentSandboxPool"):
            return _reconcile(namespace, name, body, logger)


def _reconcile(namespace: str, name: str, body: dict[str, Any], logger: logging.Logger) -> pool.PoolPlan:
    spec = api.AgentSandboxPoolSpec.model_validate(body["spec"])
    current_hash = pool.template_hash(spec.template)
    pods_path = kube.object_path("v1", namespace, "pods")
    pods = [p for p in kube.list_at(pods_path, pool.selector(name)) if sandbox.is_owned_by(p, body)]
    decision = pool.plan(spec.replicas, current_hash, [pool.WarmPod.of(p) for p in pods])
    policy = pool.pool_network_policy_manifest(body, gateway.namespace)
    path = kube.object_path(kube.NETWORKING, namespace, "networkpolicies", policy["metadata"]["name"])
    if spec.template.network.managed_policy:
        if kube.post(kube.object_path(kube.NETWORKING, namespace, "networkpolicies"), policy) is None:
            current = kube.get(path)
            if current is not None and current["spec"] != policy["spec"]:
                kube.request("PATCH", path, {"spec": policy["spec"]}, kube.MERGE_PATCH)
    else:  # the template's network is its user's (perhaps since a change of it): no policy of ours on its pods
        kube.delete_at(path)
    listed = {p["metadata"]["name"]: p["metadata"] for p in pods}
    for pod_name in decision.delete:
        # Only the pod as listed: one a sandbox adopted meanwhile (a newer resourceVersion) is no longer ours.
        kube.delete_at(kube.object_path("v1", namespace, "pods", pod_name), listed[pod_name]["uid"],
                       listed[pod_name]["resourceVersion"])
    for _ in range(decision.create):
        kube.post(pods_path, pool.warm_pod_manifest(body, spec.template, pool.warm_pod_name(name), gateway.runtime_key))
    if decision.create or decision.delete:
        logger.info("pool %s/%s: %d warm pods made, deleted: %s", namespace, name, decision.create,
                    ", ".join(decision.delete) or "none")
    old = api.AgentSandboxPoolStatus.model_validate(body.get("status") or {})
    now = kube.now()
    ready = decision.ready >= spec.replicas
    new = api.AgentSandboxPoolStatus(
        replicas=decision.replicas + decision.create,
        ready_replicas=decision.ready,
        selector=pool.selector(name),
        template_hash=current_hash,
        conditions=merge_conditions(old.conditions, [
            ("Ready", ready, "Warm" if ready else "Filling",
             f"{decision.ready} of {spec.replicas} warm sandboxes ready to adopt")], now),
        observed_generation=body["metadata"].get("generation"),
    )
    kube.patch_status(POOLS, namespace, name, old, new)
    return decision


# A pool is reconciled by the shard that owns its namespace, as its warm pods and the sandboxes that adopt
# them are (`shards`). Kopf is blind to an object no handler's filter matches: the other shards store no diff
# base or progress on it.
@kopf.on.resume(api.GROUP, api.VERSION, POOLS, when=shards.in_this_shard)
@kopf.on.create(api.GROUP, api.VERSION, POOLS, when=shards.in_this_shard)
@kopf.on.update(api.GROUP, api.VERSION, POOLS, when=shards.in_this_shard)
def pool_changed(body: kopf.Body, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    reconcile_pool(namespace, name, logger, kube.as_dict(dict(body)))


@kopf.on.event(api.GROUP, api.VERSION, POOLS, when=shards.in_this_shard)
def pool_event(type: str | None, namespace: str, name: str, **_: Any) -> None:
    """A pool deleted is forgotten at once (the change handlers above are not told of a deletion)."""
    if type == "DELETED":
        known.saw_pool(namespace, name, None)
