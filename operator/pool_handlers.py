"""AgentSandboxPool handlers: read the pool and its warm pods, ask `pool` (pure) what to make and delete,
apply, write status. Adoption itself is the sandbox handlers' (`adopt`), which then refill the pool here."""

import logging
import threading
from collections import defaultdict
from typing import Any

import kopf

from agentkube.operator import api, kube, metrics, pool, sandbox
from agentkube.operator.gateway_settings import gateway
from agentkube.operator.kube import POOLS
from agentkube.operator.status import merge_conditions

# One reconcile of a pool at a time in this process: pod events and adoptions come from many worker threads,
# and two reconciles reading the same count would both make the missing pods.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def reconcile_pool(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None) -> pool.PoolPlan | None:
    with _locks[(namespace, name)]:
        body = kube.read_own(POOLS, namespace, name) if body is None else body
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
    if spec.template.network.managed_policy:
        kube.post(kube.object_path(kube.NETWORKING, namespace, "networkpolicies"),
                  pool.pool_network_policy_manifest(body))
    listed = {p["metadata"]["name"]: p["metadata"] for p in pods}
    for pod_name in decision.delete:
        # Only the pod as listed: one a sandbox adopted meanwhile (a newer resourceVersion) is no longer ours.
        kube.delete_at(kube.object_path("v1", namespace, "pods", pod_name), listed[pod_name]["uid"],
                       listed[pod_name]["resourceVersion"])
    for _ in range(decision.create):
        kube.post(pods_path, pool.warm_pod_manifest(body, spec.template, pool.warm_pod_name(name), gateway.runtime_key))
    if decision.create or decision.delete:
        logger.info("pool %s/%s: %d warm pods made, %d deleted", namespace, name, decision.create, len(decision.delete))
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


@kopf.on.resume(api.GROUP, api.VERSION, POOLS)
@kopf.on.create(api.GROUP, api.VERSION, POOLS)
@kopf.on.update(api.GROUP, api.VERSION, POOLS)
def pool_changed(body: kopf.Body, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    reconcile_pool(namespace, name, logger, kube.as_dict(dict(body)))
