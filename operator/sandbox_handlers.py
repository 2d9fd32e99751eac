"""AgentSandbox handlers: read the sandbox and its pod, ask `sandbox` (pure) what should exist, apply
that, write status. Every step is idempotent, so a handler killed half-way (or two racing) converges on
the next run."""

import logging
from datetime import datetime, timedelta
from typing import Any

import kopf

from agentkube.contract import CLAIMED_BY_LABEL, POOL_LABEL
from agentkube.operator import api, kube, metrics, pool, pool_handlers, sandbox
from agentkube.operator.gateway_settings import gateway
from agentkube.operator.kube import POOLS, SANDBOXES
from agentkube.operator.rechecks import rechecks
from agentkube.operator.status import merge_conditions, parse_timestamp


def reconcile_sandbox(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None,
                      *, pod_only: bool = False) -> sandbox.Plan | None:
    """Bring one sandbox's children and status in line with its spec. `body`: the object, when the caller
    has it fresh from a watch event (saves a read). `pod_only`: a pod event; the service, claim and policy
    were ensured when the sandbox itself last changed, so only the pod and status are looked at."""
    if body is None:
        body = kube.read_own(SANDBOXES, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        metrics.SANDBOXES.forget(namespace, name)
        return None  # the owned children go with it, through their owner references
    with metrics.reconciling("AgentSandbox"):
        spec = api.AgentSandboxSpec.model_validate(body["spec"])
        core = kube.client("core")
        # A sandbox from a pool runs its pool's template (read now: a cold start needs it, and the policy's
        # egress follows its tools); its lifecycle and env are its own.
        pool_body = kube.read_own(POOLS, namespace, spec.pool) if spec.pool else None
        pool_spec = api.AgentSandboxPoolSpec.model_validate(pool_body["spec"]) if pool_body else None
        effective = spec if not spec.pool else pool.sandbox_spec(pool_spec.template, spec.lifecycle, spec.env) if pool_spec else None
        pod = _own_pod(body, spec, namespace, name)
        _pod_views.acted_on(pod)
        now = kube.now()
        created = parse_timestamp(body["metadata"]["creationTimestamp"]) or now
        annotations = body["metadata"].get("annotations") or {}
        last_activity = parse_timestamp(annotations.get(sandbox.LAST_ACTIVITY_ANNOTATION))
        decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)
        if effective is None and decision.want_pod and pod is None:
            decision = sandbox.Plan("Pending", "PoolNotFound", f"no AgentSandboxPool {spec.pool} in {namespace}",
                                    False, recheck_after=POOL_RECHECK)

        if decision.delete_sandbox:
            kube.delete_own(SANDBOXES, namespace, name, body["metadata"]["uid"])
            metrics.SANDBOXES.forget(namespace, name)
            kopf.event(body, type="Normal", reason="Expired", message="deleted at its shutdown time (shutdownPolicy: Delete)")
            return decision

        if not pod_only:
            kube.create(core.create_namespaced_service, namespace, sandbox.service_manifest(body))
            if spec.workspace is not None:
                kube.create(core.create_namespaced_persistent_volume_claim, namespace,
                            sandbox.workspace_claim_manifest(body, spec.workspace))
            if effective is not None:
                _apply_network_policy(body, effective, namespace, name)

        adopted = False
        if decision.delete_pod:
            assert pod is not None  # the plan deletes only a pod that exists
            kube.delete(core.delete_namespaced_pod, pod["metadata"]["name"], namespace, pod["metadata"]["uid"])
            logger.info("deleted pod %s/%s: %s", namespace, pod["metadata"]["name"], decision.message)
        elif decision.want_pod and pod is None and effective is not None:
            if pool_body is not None:
                pod = _adopt(body, pool_body, pool.template_hash(pool_spec.template) if pool_spec else "", namespace)
                adopted = pod is not None
            if pod is None:
                pod = kube.create(core.create_namespaced_pod, namespace, _pod_manifest(body, effective))
            _pod_views.acted_on(pod)
            if pod is not None:
                logger.info("%s pod %s/%s", "adopted warm" if adopted else "created", namespace, pod["metadata"]["name"])
                # Report the pod as it now is, not as it was before it existed.
                decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)

        old = api.AgentSandboxStatus.model_validate(body.get("status") or {})
        new = sandbox_status(body, decision, sandbox.PodView.of(pod), old, last_activity, now,
                             pod["metadata"]["name"] if pod else None)
        if old.phase != decision.phase:
            kopf.event(body, type="Warning" if decision.phase == "Failed" else "Normal", reason=decision.reason, message=decision.message)
        if adopted and pod is not None:
            kopf.event(body, type="Normal", reason="Adopted",
                       message=f"adopted the warm pod {pod['metadata']['name']} of pool {spec.pool}")
        kube.patch_status(SANDBOXES, namespace, name, old, new)
        metrics.SANDBOXES.set(namespace, name, decision.phase)
        if decision.recheck_after is not None:
            rechecks.schedule(reconcile_sandbox, namespace, name, decision.recheck_after, logger)
    if adopted and spec.pool:
        pool_handlers.reconcile_pool(namespace, spec.pool, logger)  # refill, after the sandbox is reported
    return decision


# How soon a sandbox whose pool does not exist (yet) looks again.
POOL_RECHECK = timedelta(seconds=5)


def _own_pod(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> dict[str, Any] | None:
    """The sandbox's pod: by its name, or for a sandbox from a pool the pod it adopted (or cold-started),
    found by CLAIMED_BY_LABEL and its owner reference (a label alone anyone who may label pods could copy)."""
    if not spec.pool:
        return kube.read(kube.client("core").read_namespaced_pod, name, namespace)
    uid = body["metadata"]["uid"]
    pods = [p for p in kube.list_pods(namespace, f"{CLAIMED_BY_LABEL}={name}") if pool.owned_by(p, uid)]
    pods.sort(key=lambda p: bool(p["metadata"].get("deletionTimestamp")))  # a live one before one going
    return pods[0] if pods else None


def _pod_manifest(body: dict[str, Any], effective: api.AgentSandboxSpec) -> dict[str, Any]:
    manifest = sandbox.pod_manifest(body, effective, gateway.runtime_key)
    if body["spec"].get("pool"):  # a cold start of a pooled sandbox (its pool had no warm pod ready)
        manifest["metadata"]["labels"][CLAIMED_BY_LABEL] = body["metadata"]["name"]
    return manifest


def _adopt(body: dict[str, Any], pool_body: dict[str, Any], current_hash: str, namespace: str) -> dict[str, Any] | None:
    """Adopt one ready warm pod of the pool; None when none is left (the caller starts a pod cold). A pod
    another sandbox took meanwhile fails its conditional patch, and the next is tried."""
    warm = [p for p in kube.list_pods(namespace, pool.selector(pool_body["metadata"]["name"]))
            if pool.owned_by(p, pool_body["metadata"]["uid"])]
    for candidate in pool.adoptable(warm, current_hash):
        adopted = kube.merge_patch_pod(namespace, candidate["metadata"]["name"], pool.adoption_patch(candidate, body))
        if adopted is not None:
            return adopted
    return None


def sandbox_status(body: dict[str, Any], decision: sandbox.Plan, pod: sandbox.PodView | None, old: api.AgentSandboxStatus,
                   last_activity: datetime | None, now: datetime, pod_name: str | None = None) -> api.AgentSandboxStatus:
    """The status a sandbox reports (every field: the reconcile is its only writer). What the node agent
    last reported (activity, call totals) is kept until it reports again."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    annotations = body["metadata"].get("annotations") or {}
    refused = annotations.get(sandbox.TOOLS_REFUSED_ANNOTATION)
    return api.AgentSandboxStatus(
        phase=decision.phase,
        conditions=merge_conditions(old.conditions, sandbox.conditions(decision, pod, refused), now),
        pod_name=(pod_name or name) if decision.want_pod else None,
        node_name=pod.node_name if pod and decision.want_pod else None,
        service_fqdn=sandbox.service_fqdn(name, namespace),
        last_activity_time=last_activity or old.last_activity_time,
        tool_calls=sandbox.tool_call_totals(annotations) or old.tool_calls,
        observed_generation=body["metadata"].get("generation"),
    )


def _apply_network_policy(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> None:
    networking = kube.client("networking")
    if not spec.network.managed_policy:
        current = kube.read(networking.read_namespaced_network_policy, name, namespace)
        if current and current["metadata"].get("labels", {}).get(sandbox.SANDBOX_LABEL) == name:
            kube.delete(networking.delete_namespaced_network_policy, name, namespace)
        return
    manifest = sandbox.network_policy_manifest(body, spec, gateway.namespace)
    if kube.create(networking.create_namespaced_network_policy, namespace, manifest) is None:
        current = kube.read(networking.read_namespaced_network_policy, name, namespace)
        if current is not None and current["spec"] != manifest["spec"]:
            networking.patch_namespaced_network_policy(name, namespace, {"spec": manifest["spec"]})


@kopf.on.resume(api.GROUP, api.VERSION, SANDBOXES)
@kopf.on.create(api.GROUP, api.VERSION, SANDBOXES)
@kopf.on.update(api.GROUP, api.VERSION, SANDBOXES)
def sandbox_changed(body: kopf.Body, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    reconcile_sandbox(namespace, name, logger, kube.as_dict(dict(body)))


_pod_views = sandbox.PodViews()


@kopf.on.event("", "v1", "pods", labels={sandbox.SANDBOX_LABEL: kopf.PRESENT})
def sandbox_pod_changed(type: str | None, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """A pod deleted by someone else is recreated, a failed one replaced, and status follows the pod.
    `type` is None for the objects Kopf lists when a watch (re)starts: those count, as the state the
    pod was in while nobody was watching."""
    pod = kube.as_dict(dict(body))
    labels = pod["metadata"].get("labels") or {}
    if not _pod_views.is_news(type, pod):
        return
    if labels.get(CLAIMED_BY_LABEL):  # adopted (or cold-started) by a sandbox from a pool
        reconcile_sandbox(pod["metadata"]["namespace"], labels[CLAIMED_BY_LABEL], logger, pod_only=True)
    elif labels.get(POOL_LABEL):  # a warm pod: ready, failed or gone, the pool's count changes
        pool_handlers.reconcile_pool(pod["metadata"]["namespace"], labels[POOL_LABEL], logger)
    elif labels.get(sandbox.SANDBOX_LABEL):
        reconcile_sandbox(pod["metadata"]["namespace"], labels[sandbox.SANDBOX_LABEL], logger, pod_only=True)
