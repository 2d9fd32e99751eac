"""AgentSandbox handlers: read the sandbox and its pod, ask `sandbox` (pure) what should exist, apply
that, write status. Every step is idempotent, so a handler killed half-way (or two racing) converges on
the next run."""

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import kopf

from agentkube.contract import CLAIMED_BY_LABEL, POOL_LABEL
from agentkube.operator import api, kube, latest, metrics, pool, pool_handlers, sandbox, shards
from agentkube.operator.gateway_settings import gateway
from agentkube.operator.kube import NETWORKING, SANDBOXES
from agentkube.operator.rechecks import RETRY_AFTER_FAILURE, rechecks
from agentkube.operator.status import merge_conditions, parse_timestamp

# How soon a sandbox whose pool does not exist (yet) looks again.
POOL_RECHECK = timedelta(seconds=5)
# How long this process trusts that a namespace's shared Service (sandbox.SANDBOX_SERVICE) exists once it
# made or found it: one create a minute per namespace at most, and a Service someone deleted is back with
# the next sandbox reconciled there after that.
SHARED_SERVICE_TRUSTED = 60.0


# The newest copy of every sandbox of this shard (its watch events and our status writes' replies), and
# one reconciliation of a sandbox at a time: see `latest`.
sandboxes = latest.Latest()


def reconcile_sandbox(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None,
                      *, pod_only: bool = False, pod: dict[str, Any] | None = None) -> sandbox.Plan | None:
    """Bring one sandbox's children and status in line with its spec, one reconciliation of it at a time.
    `body`: the object, when the caller has it from the watch or `sandboxes` (saves a read; a newer copy
    known by then is used instead); None: read it (a timer's recheck, a retry). `pod_only`: a pod event,
    whose pod is `pod` (None: read it); the service, claim and policy were ensured when the sandbox itself
    last changed, so only the pod and status are looked at, and observedGeneration stays where the last
    full reconciliation put it."""
    with sandboxes.exclusive(namespace, name):
        if body is None:
            body = kube.read_own(SANDBOXES, namespace, name)
            if body is not None:
                body = sandboxes.saw(body)
        else:
            body = sandboxes.saw(body)
        return _reconcile(namespace, name, logger, body, pod_only=pod_only, pod=pod)


def _reconcile(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None,
               *, pod_only: bool, pod: dict[str, Any] | None) -> sandbox.Plan | None:
    if body is None or body["metadata"].get("deletionTimestamp"):
        metrics.SANDBOXES.forget(namespace, name)
        return None  # the owned children go with it, through their owner references
    with metrics.reconciling("AgentSandbox"):
        spec = api.AgentSandboxSpec.model_validate(body["spec"])
        if spec.pool:
            return _reconcile_pooled(namespace, name, logger, body, spec, pod_only=pod_only, pod=pod)
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
        _report(body, decision, pod, old, last_activity, now, generation, logger)
        _own_service(body, pod, pod_only=pod_only and not fresh)
    return decision


def _reconcile_pooled(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any], spec: api.AgentSandboxSpec,
                      *, pod_only: bool, pod: dict[str, Any] | None) -> sandbox.Plan:
    """A sandbox that names a pool: its pod is the warm pod it adopted (or, with none ready, one started
    from the pool's template), found by CLAIMED_BY_LABEL and its owner reference; it runs the pool's
    template, tools and network with its own lifecycle and env (`pool.sandbox_spec`)."""
    now = kube.now()
    created = parse_timestamp(body["metadata"]["creationTimestamp"]) or now
    annotations = body["metadata"].get("annotations") or {}
    last_activity = parse_timestamp(annotations.get(sandbox.LAST_ACTIVITY_ANNOTATION))
    old = api.AgentSandboxStatus.model_validate(body.get("status") or {})
    pods_path = kube.object_path("v1", namespace, "pods")
    # A sandbox never reconciled before has no pod, unless a run that adopted or made one died before writing
    # status: it adopts without a read first, and its next reconcile finds the pods it holds (and lets go of
    # all but one). Not fresh: one whose status names a pod (written from its pod's event, which does not
    # set observedGeneration) or that this process set out to give a pod already (an event from before its
    # status, or a retry after an adoption whose reply was lost: `Known.giving_pod`).
    uid = body["metadata"]["uid"]
    fresh = not pod_only and old.observed_generation is None and old.pod_name is None \
        and not pool_handlers.known.may_have_given_pod(uid)
    if not fresh and (pod is None or not sandbox.is_owned_by(pod, body)):
        pod = _claimed_pod(body, pods_path, logger)
    _pod_views.acted_on(pod)
    decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)
    if decision.delete_sandbox:
        kube.delete_own(SANDBOXES, namespace, name, body["metadata"]["uid"])
        metrics.SANDBOXES.forget(namespace, name)
        kopf.event(body, type="Normal", reason="Expired", message="deleted at its shutdown time (shutdownPolicy: Delete)")
        return decision

    # The pool is needed only for its template: for the children, or to adopt or start a pod.
    needs_pod = decision.want_pod and pod is None
    pool_body = pool_handlers.known.pool(namespace, str(spec.pool)) if needs_pod or not pod_only else None
    pool_spec = api.AgentSandboxPoolSpec.model_validate(pool_body["spec"]) if pool_body else None
    effective = pool.sandbox_spec(pool_spec.template, spec.lifecycle, spec.env) if pool_spec else None
    # Its NetworkPolicy: a fresh claim's after its status, off the claim's path, when the pool's own policy
    # covers the pod it adopts meanwhile (`pool.pool_network_policy_manifest`: gateway ingress, no egress,
    # which its own only widens); any other time before it acts on a pod. Its Service (a DNS name; the
    # gateway dials the pod) after its status, off the claim's path.
    policy_after_status = fresh and effective is not None and effective.network.managed_policy
    if not pod_only and effective is not None and not policy_after_status:
        _apply_network_policy(body, effective, namespace, name)

    adopted = False
    if decision.delete_pod:
        assert pod is not None  # the plan deletes only a pod that exists
        kube.delete_at(kube.object_path("v1", namespace, "pods", pod["metadata"]["name"]), pod["metadata"]["uid"])
        logger.info("deleted pod %s/%s: %s", namespace, pod["metadata"]["name"], decision.message)
    elif needs_pod and (pool_body is None or pool_spec is None or effective is None):
        decision = sandbox.Plan("Pending", "PoolNotFound", f"no AgentSandboxPool {spec.pool} in {namespace}", True,
                                recheck_after=POOL_RECHECK, warning=True)
    elif needs_pod and pool_body is not None and pool_spec is not None and effective is not None:
        pool_handlers.known.giving_pod(uid)
        pod = _adopt(body, pool_body, pool.template_hash(pool_spec.template), pods_path, logger)
        adopted = pod is not None
        pod_name_taken = False
        if pod is None:  # no warm pod ready: a cold start from the pool's template, named like the sandbox
            pod = kube.post(pods_path, _cold_pod_manifest(body, effective))
            if pod is None:  # a pod has the name: ours from a run that died before its status, or someone else's
                pod = kube.get(kube.object_path("v1", namespace, "pods", name))
                pod_name_taken = pod is not None and not sandbox.is_owned_by(pod, body)
                pod = None if pod_name_taken else pod
        _pod_views.acted_on(pod)
        if pod is not None:
            logger.info("sandbox %s/%s: %s pod %s", namespace, name, "adopted the warm" if adopted else "created",
                        pod["metadata"]["name"])
        # Report the pod as it now is, not as it was before it existed.
        decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now, pod_name_taken=pod_name_taken)

    generation = body["metadata"].get("generation") if not pod_only else old.observed_generation
    if adopted and pod is not None:
        kopf.event(body, type="Normal", reason="Adopted", message=f"adopted the warm pod {pod['metadata']['name']} of pool {spec.pool}")
    _report(body, decision, pod, old, last_activity, now, generation, logger)
    if policy_after_status:
        assert effective is not None
        _apply_network_policy(body, effective, namespace, name)
    if not pod_only:
        _ensure_shared_service(namespace)
    _own_service(body, pod, pod_only=pod_only)
    if adopted:
        pool_handlers.reconcile_pool(namespace, str(spec.pool), logger)  # refill, after the sandbox is reported
    return decision


def _claimed_pod(body: dict[str, Any], pods_path: str, logger: logging.Logger) -> dict[str, Any] | None:
    """A pooled sandbox's pod: labelled CLAIMED_BY_LABEL with its name and owned by it (a label alone anyone
    who may label pods could copy); a live one before one going away. Two live ones (a run adopted one and
    died before its status, and the next adopted another) are one too many: the newer is deleted."""
    claimed = kube.list_at(pods_path, f"{CLAIMED_BY_LABEL}={body['metadata']['name']}")
    pods = sorted((p for p in claimed if sandbox.is_owned_by(p, body)), key=lambda p: p["metadata"].get("creationTimestamp") or "")
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    for extra in live[1:]:
        kube.delete_at(f"{pods_path}/{extra['metadata']['name']}", extra["metadata"]["uid"])
        logger.info("deleted pod %s: sandbox %s holds another", extra["metadata"]["name"], body["metadata"]["name"])
    return live[0] if live else (pods[0] if pods else None)


def _cold_pod_manifest(body: dict[str, Any], effective: api.AgentSandboxSpec) -> dict[str, Any]:
    manifest = sandbox.pod_manifest(body, effective, gateway.runtime_key)
    manifest["metadata"]["labels"][CLAIMED_BY_LABEL] = body["metadata"]["name"]
    return manifest


def _adopt(body: dict[str, Any], pool_body: dict[str, Any], current_hash: str, pods_path: str,
           logger: logging.Logger) -> dict[str, Any] | None:
    """Adopt one ready warm pod of the pool; None when none is left (the caller starts a pod cold). The pods
    this process last saw are tried first, then those listed now: a pod changed or taken meanwhile fails its
    conditional patch, and the next is tried."""
    namespace, pool_name = pool_body["metadata"]["namespace"], pool_body["metadata"]["name"]
    pods: list[dict[str, Any]] = []
    for warm in (lambda: pool_handlers.known.warm_pods(namespace, pool_name),
                 lambda: kube.list_at(pods_path, pool.selector(pool_name))):
        pods = [p for p in warm() if sandbox.is_owned_by(p, pool_body)]
        for candidate in pool.adoptable(pods, current_hash):
            pool_handlers.known.taken(namespace, pool_name, candidate["metadata"]["name"])
            adopted = kube.patch_if_unchanged(f"{pods_path}/{candidate['metadata']['name']}", pool.adoption_patch(candidate, body))
            if adopted is not None:
                return adopted
    logger.info("sandbox %s/%s: no warm pod of pool %s to adopt (%s): a cold start", namespace, body["metadata"]["name"],
                pool_name, pool.why_none_adoptable(pods, current_hash))
    return None


def _report(body: dict[str, Any], decision: sandbox.Plan, pod: dict[str, Any] | None, old: api.AgentSandboxStatus,
            last_activity: datetime | None, now: datetime, generation: int | None, logger: logging.Logger) -> None:
    """Write the status, post an Event on a new phase (`sandbox.phase_event`), and arm the timer of the plan's next change."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    new = sandbox_status(body, decision, sandbox.PodView.of(pod), old, last_activity, now, generation,
                         pod["metadata"]["name"] if pod else None, sandbox.runtime_endpoint(pod),
                         sandbox.sandbox_fqdn(body, pod))
    if sandbox.phase_event(old.phase, decision):
        kind = "Warning" if decision.warning or decision.phase == "Failed" else "Normal"
        kopf.event(body, type=kind, reason=decision.reason, message=decision.message)
    written = kube.patch_status(SANDBOXES, namespace, name, old, new)
    if written is not None:
        sandboxes.saw(written)  # what the next reconciliation starts from, before the watch brings it back
    metrics.SANDBOXES.set(namespace, name, decision.phase)
    if decision.recheck_after is not None:
        rechecks.schedule(reconcile_sandbox, namespace, name, decision.recheck_after, logger)


def _ensure_children(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> None:
    """The namespace's shared Service, the workspace claim and the network policy: created when missing (a
    409 is no error)."""
    _ensure_shared_service(namespace)
    if spec.workspace is not None:
        kube.post(kube.object_path("v1", namespace, "persistentvolumeclaims"), sandbox.workspace_claim_manifest(body, spec.workspace))
    _apply_network_policy(body, spec, namespace, name)


_shared_services: dict[str, float] = {}  # namespace -> when this process last made or found its shared Service
_shared_services_lock = threading.Lock()


def _ensure_shared_service(namespace: str) -> None:
    """Create the namespace's shared Service unless this process made or found it lately. Racing creates
    (reconciles in parallel, other replicas) cannot fight: one is created, the others get a 409 and leave it."""
    now = time.monotonic()
    with _shared_services_lock:
        if now - _shared_services.get(namespace, float("-inf")) < SHARED_SERVICE_TRUSTED:
            return
        _shared_services[namespace] = now  # the others go on meanwhile: the create below is idempotent
    try:
        kube.post(kube.object_path("v1", namespace, "services"), sandbox.shared_service_manifest(namespace))
    except Exception:
        with _shared_services_lock:
            _shared_services.pop(namespace, None)
        raise


def _own_service(body: dict[str, Any], pod: dict[str, Any] | None, *, pod_only: bool) -> None:
    """The Service of the sandbox's own name that an earlier version made for each sandbox: made again on a
    full reconcile while the sandbox's pod is one that version made (only it names that pod). It is never
    deleted here: it goes with its sandbox (owner reference), and until then it still names whatever pod
    the sandbox has. Deleting it would need `delete` on every Service of the cluster, which the operator's
    role does not grant. A sandbox made by this version never pays a request for it."""
    if sandbox.has_own_service(pod) and not pod_only:
        kube.post(kube.object_path("v1", body["metadata"]["namespace"], "services"), sandbox.service_manifest(body))


def sandbox_status(body: dict[str, Any], decision: sandbox.Plan, pod: sandbox.PodView | None, old: api.AgentSandboxStatus,
                   last_activity: datetime | None, now: datetime, observed_generation: int | None,
                   pod_name: str | None = None, runtime: api.RuntimeEndpoint | None = None,
                   service_fqdn: str | None = None) -> api.AgentSandboxStatus:
    """The status a sandbox reports (every field: the reconcile is its only writer). What the node agent
    last reported (activity, call totals) is kept until it reports again. `pod_name`: the pod's, when it is
    not named like the sandbox (a warm pod adopted from a pool). `runtime`: where its pod's runtime is
    (sandbox.runtime_endpoint), reported only while the sandbox runs: the gateway's watch takes a call
    there without reading the pod. `service_fqdn`: the pod's DNS name (sandbox.sandbox_fqdn)."""
    name = body["metadata"]["name"]
    annotations = body["metadata"].get("annotations") or {}
    refused = annotations.get(sandbox.TOOLS_REFUSED_ANNOTATION)
    return api.AgentSandboxStatus(
        phase=decision.phase,
        conditions=merge_conditions(old.conditions, sandbox.conditions(decision, pod, refused), now),
        pod_name=(pod_name or name) if decision.want_pod else None,
        runtime=runtime if decision.phase == "Running" else None,
        node_name=pod.node_name if pod and decision.want_pod else None,
        service_fqdn=service_fqdn,
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
    """`type` is None for the objects Kopf lists when a watch (re)starts. At the operator's start those are
    reconciled whatever their status says (which also arms their lifecycle timers). A listing later in the
    process's life (Kopf lists again when the API server drops its watch and the resourceVersion is gone,
    which an overloaded API server does to a watcher that falls behind) treats a sandbox this process knows
    like any event: nothing to do when its status is current (its timers are armed already). Reconciling
    every sandbox on such a listing cost four requests each (the pod's read, the Service's and policy's
    creates answered 409, the policy's read) just when the API server was already behind: 6,000 sandboxes
    (bench/sandbox_scale.py) made it drop the watch again."""
    if type == "DELETED":
        metrics.SANDBOXES.forget(namespace, name)
        sandboxes.forget(namespace, name)
        return
    known = sandboxes.knows(namespace, name)
    # An event older than a status we wrote since (its own write's, still on its way) asks for nothing.
    sandbox_ = sandboxes.saw(kube.as_dict(dict(body)))
    if not sandbox.needs_reconcile(type, known, sandbox_):
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
    labels = pod["metadata"].get("labels") or {}
    pool_handlers.known.saw_warm_pod(type, pod)  # every event: its resourceVersion is what adoption is conditional on
    if not _pod_views.is_news(type, pod):
        return
    namespace = pod["metadata"]["namespace"]
    owner = labels.get(CLAIMED_BY_LABEL)  # adopted (or cold-started) by a sandbox from a pool
    if not owner and labels.get(POOL_LABEL):  # a waiting warm pod: ready, failed or gone, the pool's count changes
        pool_handlers.reconcile_pool(namespace, labels[POOL_LABEL], logger)
        return
    owner = owner or labels.get(sandbox.SANDBOX_LABEL)
    if owner:
        # The sandbox as its watch last brought it (or our last write left it): no read per pod event. But a
        # pod gone is read afresh (None): it is gone most often because its sandbox is, and the sandbox's own
        # deletion may not have come through its watch yet; from memory, a sandbox deleted already would
        # replace its pod, taking a warm pod from its pool or starting one cold, again on each such pod's end.
        gone = type == "DELETED"
        _reconcile_or_retry(namespace, owner, logger, body=None if gone else sandboxes.get(namespace, owner),
                            pod_only=True, pod=None if gone else pod)


def _reconcile_or_retry(namespace: str, name: str, logger: logging.Logger, **kwargs: Any) -> None:
    """Event handlers are not retried by Kopf: a failed reconciliation is tried again by a timer."""
    try:
        reconcile_sandbox(namespace, name, logger, **kwargs)
    except Exception:
        logger.exception("reconciling %s/%s failed; retrying in %s", namespace, name, RETRY_AFTER_FAILURE)
        rechecks.schedule(reconcile_sandbox, namespace, name, RETRY_AFTER_FAILURE, logger)
