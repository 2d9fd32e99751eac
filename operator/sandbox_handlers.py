"""AgentSandbox handlers: read the sandbox and its pod, ask `sandbox` (pure) what should exist, apply
that, write status. Every step is idempotent, so a handler killed half-way (or two racing) converges on
the next run."""

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import kopf

from agentkube.operator import api, kube, metrics, sandbox, shards
from agentkube.operator.kube import SANDBOXES
from agentkube.operator.rechecks import RETRY_AFTER_FAILURE, rechecks
from agentkube.operator.status import merge_conditions, parse_timestamp


@dataclass
class GatewaySettings:
    """What the operator knows of the gateway: the key it shares with it (sandbox runtimes then serve the
    gateway, each with its own token derived from it) and the namespace its pods run in."""

    runtime_key: bytes | None = None
    namespace: str = sandbox.DEFAULT_GATEWAY_NAMESPACE


gateway = GatewaySettings()
NETWORKING = "networking.k8s.io/v1"


def configure_gateway(runtime_key_file: Path | None, namespace: str | None) -> None:
    """Read the shared key once at start. Its bytes are never logged."""
    gateway.runtime_key = Path(runtime_key_file).read_bytes().strip() if runtime_key_file else None
    if gateway.runtime_key is not None and len(gateway.runtime_key) < 32:
        raise ValueError(f"the runtime key in {runtime_key_file} is shorter than 32 bytes")
    gateway.namespace = namespace or sandbox.DEFAULT_GATEWAY_NAMESPACE


def reconcile_sandbox(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None,
                      *, pod_only: bool = False, pod: dict[str, Any] | None = None) -> sandbox.Plan | None:
    """Bring one sandbox's children and status in line with its spec. `body`: the object, when the caller
    has it fresh from a watch event (saves a read). `pod_only`: a pod event, whose pod is `pod` (None: read
    it); the service, claim and policy were ensured when the sandbox itself last changed, so only the pod
    and status are looked at, and observedGeneration stays where the last full reconciliation put it."""
    if body is None:
        body = kube.read_own(SANDBOXES, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        metrics.SANDBOXES.forget(namespace, name)
        return None  # the owned children go with it, through their owner references
    with metrics.reconciling("AgentSandbox"):
        spec = api.AgentSandboxSpec.model_validate(body["spec"])
        now = kube.now()
        created = parse_timestamp(body["metadata"]["creationTimestamp"]) or now
        annotations = body["metadata"].get("annotations") or {}
        last_activity = parse_timestamp(annotations.get(sandbox.LAST_ACTIVITY_ANNOTATION))
        old = api.AgentSandboxStatus.model_validate(body.get("status") or {})
        pod_path = kube.object_path("v1", namespace, "pods", name)
        # A sandbox never reconciled before has no pod unless a run that made it died before writing status:
        # its pod is created without a read first, and a 409 says to read after all.
        fresh = not pod_only and old.observed_generation is None
        if fresh and sandbox.plan(spec, created, last_activity, None, now).want_pod:
            _ensure_children(body, spec, namespace, name)
            pod = kube.post(kube.object_path("v1", namespace, "pods"), sandbox.pod_manifest(body, spec, gateway.runtime_key))
            if pod is not None:
                logger.info("created pod %s/%s", namespace, name)
            else:
                pod = kube.get(pod_path)
            pod_only = True  # the children are ensured; what follows only looks at the pod
        elif pod is None:
            pod = kube.get(pod_path)
        pod_name_taken = pod is not None and not sandbox.is_owned_by(pod, body)
        if pod_name_taken:
            pod = None  # someone else's pod: never reported, replaced or deleted as ours
        _pod_views.acted_on(pod)
        decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now, pod_name_taken=pod_name_taken)

        if decision.delete_sandbox:
            kube.delete_own(SANDBOXES, namespace, name, body["metadata"]["uid"])
            metrics.SANDBOXES.forget(namespace, name)
            kopf.event(body, type="Normal", reason="Expired", message="deleted at its shutdown time (shutdownPolicy: Delete)")
            return decision

        if not pod_only:
            _ensure_children(body, spec, namespace, name)

        if decision.delete_pod:
            assert pod is not None  # the plan deletes only a pod that exists
            kube.delete_at(pod_path, pod["metadata"]["uid"])
            logger.info("deleted pod %s/%s: %s", namespace, name, decision.message)
        elif decision.want_pod and pod is None and not pod_name_taken:
            pod = kube.post(kube.object_path("v1", namespace, "pods"), sandbox.pod_manifest(body, spec, gateway.runtime_key))
            _pod_views.acted_on(pod)
            if pod is not None:
                logger.info("created pod %s/%s", namespace, name)
                # Report the pod as it now is, not as it was before it existed.
                decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)

        generation = body["metadata"].get("generation") if fresh or not pod_only else old.observed_generation
        new = sandbox_status(body, decision, sandbox.PodView.of(pod), old, last_activity, now, generation)
        if old.phase != decision.phase:
            kind = "Warning" if decision.warning or decision.phase == "Failed" else "Normal"
            kopf.event(body, type=kind, reason=decision.reason, message=decision.message)
        kube.patch_status(SANDBOXES, namespace, name, old, new)
        metrics.SANDBOXES.set(namespace, name, decision.phase)
        if decision.recheck_after is not None:
            rechecks.schedule(reconcile_sandbox, namespace, name, decision.recheck_after, logger)
    return decision


def _ensure_children(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> None:
    """The service, workspace claim and network policy: created when missing (a 409 is no error)."""
    kube.post(kube.object_path("v1", namespace, "services"), sandbox.service_manifest(body))
    if spec.workspace is not None:
        kube.post(kube.object_path("v1", namespace, "persistentvolumeclaims"), sandbox.workspace_claim_manifest(body, spec.workspace))
    _apply_network_policy(body, spec, namespace, name)


def sandbox_status(body: dict[str, Any], decision: sandbox.Plan, pod: sandbox.PodView | None, old: api.AgentSandboxStatus,
                   last_activity: datetime | None, now: datetime, observed_generation: int | None) -> api.AgentSandboxStatus:
    """The status a sandbox reports (every field: the reconcile is its only writer). What the node agent
    last reported (activity, call totals) is kept until it reports again."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    annotations = body["metadata"].get("annotations") or {}
    refused = annotations.get(sandbox.TOOLS_REFUSED_ANNOTATION)
    return api.AgentSandboxStatus(
        phase=decision.phase,
        conditions=merge_conditions(old.conditions, sandbox.conditions(decision, pod, refused), now),
        pod_name=name if decision.want_pod else None,
        node_name=pod.node_name if pod and decision.want_pod else None,
        service_fqdn=sandbox.service_fqdn(name, namespace),
        last_activity_time=last_activity or old.last_activity_time,
        tool_calls=sandbox.tool_call_totals(annotations) or old.tool_calls,
        observed_generation=observed_generation,
    )


def _apply_network_policy(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> None:
    path = kube.object_path(NETWORKING, namespace, "networkpolicies", name)
    if not spec.network.managed_policy:
        current = kube.get(path)
        if current and current["metadata"].get("labels", {}).get(sandbox.SANDBOX_LABEL) == name:
            kube.delete_at(path)
        return
    manifest = sandbox.network_policy_manifest(body, spec, gateway.namespace)
    if kube.post(kube.object_path(NETWORKING, namespace, "networkpolicies"), manifest) is None:
        current = kube.get(path)
        if current is not None and current["spec"] != manifest["spec"]:
            kube.request("PATCH", path, {"spec": manifest["spec"]}, kube.MERGE_PATCH)


# Sandboxes are level-triggered: every event of one is looked at, and only one whose status does not yet
# reflect it (sandbox.status_is_current) is reconciled. Kopf's change handlers would store a diff base and
# progress in annotations on every sandbox: one more write per sandbox, and one more event coming back.
# Each shard handles only the sandboxes of its namespaces (`shards`); Kopf drops the others' events at the
# filter, and event handlers write nothing of Kopf's on the objects they skip.
@kopf.on.event(api.GROUP, api.VERSION, SANDBOXES, when=shards.in_this_shard)
def sandbox_changed(type: str | None, body: kopf.Body, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    """`type` is None for the objects Kopf lists when a watch (re)starts (a start, a resume): those are
    reconciled whatever their status says, which also arms their lifecycle timers again."""
    if type == "DELETED":
        metrics.SANDBOXES.forget(namespace, name)
        return
    sandbox_ = kube.as_dict(dict(body))
    if type is not None and sandbox.status_is_current(sandbox_):
        return
    _reconcile_or_retry(namespace, name, logger, body=sandbox_)


_pod_views = sandbox.PodViews()


@kopf.on.event("", "v1", "pods", labels={sandbox.SANDBOX_LABEL: kopf.PRESENT}, when=shards.in_this_shard)
def sandbox_pod_changed(type: str | None, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """A pod deleted by someone else is recreated, a failed one replaced, and status follows the pod.
    `type` is None for the objects Kopf lists when a watch (re)starts: those count, as the state the
    pod was in while nobody was watching. The event's pod is the one reported (no read of it again),
    except a deleted one's: then whatever pod has the name now is read."""
    pod = kube.as_dict(dict(body))
    owner = (pod["metadata"].get("labels") or {}).get(sandbox.SANDBOX_LABEL)
    if owner and _pod_views.is_news(type, pod):
        _reconcile_or_retry(pod["metadata"]["namespace"], owner, logger, pod_only=True,
                            pod=None if type == "DELETED" else pod)


def _reconcile_or_retry(namespace: str, name: str, logger: logging.Logger, **kwargs: Any) -> None:
    """Event handlers are not retried by Kopf: a failed reconciliation is tried again by a timer."""
    try:
        reconcile_sandbox(namespace, name, logger, **kwargs)
    except Exception:
        logger.exception("reconciling %s/%s failed; retrying in %s", namespace, name, RETRY_AFTER_FAILURE)
        rechecks.schedule(reconcile_sandbox, namespace, name, RETRY_AFTER_FAILURE, logger)
