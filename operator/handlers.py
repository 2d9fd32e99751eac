"""Kopf handlers: thin. Each reads the object and its children, asks the pure functions in `sandbox` and
`servedmodel` what should exist, applies that, and writes status. Every step is idempotent, so a handler
killed half-way (or two racing) converges on the next run."""

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf
import kubernetes
from kubernetes.client import ApiException

from agentkube.operator import api, autoscaling, metrics, prometheus, sandbox, servedmodel
from agentkube.operator.status import merge_conditions, timestamp
from agentkube.rl.observation import ActionBounds
from agentkube.rl.policy import ExportedPolicy, load_policy

SANDBOXES = "agentsandboxes"
SERVED_MODELS = "servedmodels"
# An object with a recheck pending is looked at least this often, so a missed event is repaired without a restart.
RECHECK_MAX = timedelta(minutes=5)
# How often a model whose Knative Service is not ready re-reads it (beside the watch on Knative Services).
KNATIVE_READINESS_RECHECK = timedelta(seconds=10)
KNATIVE_BACKOFF_MAX = 300.0
# Threads that run the (synchronous) handlers; Kopf's executor and the client's connection pool match it.
WORKERS = 16

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _api(kind: str) -> Any:
    """Kubernetes API clients, created once the operator has logged in (current kubeconfig or in-cluster)."""
    with _clients_lock:
        if not _clients:
            _connect()
    return _clients[kind]


def _connect() -> None:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    # One pooled connection per handler thread: past the pool, every request would pay a TLS handshake.
    configuration.connection_pool_maxsize = WORKERS
    client = kubernetes.client.ApiClient(configuration)
    _clients.update(
        client=client,
        core=kubernetes.client.CoreV1Api(client),
        networking=kubernetes.client.NetworkingV1Api(client),
        custom=kubernetes.client.CustomObjectsApi(client),
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _read(read, *args) -> dict[str, Any] | None:
    try:
        result = read(*args)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return _as_dict(result)


def _as_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else _api("client").sanitize_for_serialization(obj)


def _create(create, namespace: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The created object, or None when it exists already (another run, or a racing handler, made it)."""
    try:
        return _as_dict(create(namespace, manifest))
    except ApiException as error:
        if error.status == 409 or (error.status == 403 and "being terminated" in str(error.body)):
            return None  # or its namespace is going away, and everything in it with it
        raise


def _delete(delete, name: str, namespace: str, uid: str | None = None) -> None:
    options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
    try:
        delete(name, namespace, body=options)
    except ApiException as error:
        if error.status not in (404, 409):  # gone already, or replaced by a newer object we must keep
            raise


def _patch_status(plural: str, namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    if all(old.get(k) == v for k, v in new.items()):
        return False
    try:
        _api("custom").patch_namespaced_custom_object_status(api.GROUP, api.VERSION, namespace, plural, name, {"status": new})
    except ApiException as error:
        if error.status != 404:
            raise
    return True


# ----- AgentSandbox ------------------------------------------------------------------------------------


def reconcile_sandbox(namespace: str, name: str, logger: logging.Logger, body: dict[str, Any] | None = None,
                      *, pod_only: bool = False) -> sandbox.Plan | None:
    """Bring one sandbox's children and status in line with its spec. `body`: the object, when the caller
    has it fresh from a watch event (saves a read). `pod_only`: a pod event; the service, claim and policy
    were ensured when the sandbox itself last changed, so only the pod and status are looked at."""
    if body is None:
        body = _read(_api("custom").get_namespaced_custom_object, api.GROUP, api.VERSION, namespace, SANDBOXES, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None  # the owned children go with it, through their owner references
    with metrics.reconciling("AgentSandbox"):
        spec = api.AgentSandboxSpec.model_validate(body["spec"])
        core = _api("core")
        pod = _read(core.read_namespaced_pod, name, namespace)
        now = _now()
        created = _parse_time(body["metadata"]["creationTimestamp"]) or now
        annotations = body["metadata"].get("annotations") or {}
        last_activity = _parse_time(annotations.get(sandbox.LAST_ACTIVITY_ANNOTATION))
        decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)

        if decision.delete_sandbox:
            _delete(lambda n, ns, body: _api("custom").delete_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, SANDBOXES, n, body=body), name, namespace, body["metadata"]["uid"])
            kopf.event(body, type="Normal", reason="Expired", message="deleted at its shutdown time (shutdownPolicy: Delete)")
            return decision

        if not pod_only:
            _create(core.create_namespaced_service, namespace, sandbox.service_manifest(body))
            if spec.workspace is not None:
                _create(core.create_namespaced_persistent_volume_claim, namespace, sandbox.workspace_claim_manifest(body, spec.workspace))
            _apply_network_policy(body, spec, namespace, name)

        if decision.delete_pod:
            _delete(core.delete_namespaced_pod, name, namespace, pod["metadata"]["uid"])
            logger.info("deleted pod %s/%s: %s", namespace, name, decision.message)
        elif decision.want_pod and pod is None:
            pod = _create(core.create_namespaced_pod, namespace, sandbox.pod_manifest(body, spec))
            if pod is not None:
                logger.info("created pod %s/%s", namespace, name)
                # Report the pod as it now is, not as it was before it existed.
                decision = sandbox.plan(spec, created, last_activity, sandbox.PodView.of(pod), now)

        view = sandbox.PodView.of(pod)
        old = body.get("status") or {}
        new = {
            "phase": decision.phase,
            "conditions": merge_conditions(old.get("conditions", []), sandbox.conditions(decision, view), now),
            "podName": name if decision.want_pod else None,
            "nodeName": view.node_name if view and decision.want_pod else None,
            "serviceFqdn": sandbox.service_fqdn(name, namespace),
            "lastActivityTime": timestamp(last_activity) if last_activity else old.get("lastActivityTime"),
            "toolCalls": sandbox.tool_call_totals(annotations) or old.get("toolCalls"),
            "observedGeneration": body["metadata"].get("generation"),
        }
        if old.get("phase") != decision.phase:
            kopf.event(body, type="Warning" if decision.phase == "Failed" else "Normal", reason=decision.reason, message=decision.message)
        _patch_status(SANDBOXES, namespace, name, old, new)
        if decision.recheck_after is not None:
            rechecks.schedule(reconcile_sandbox, namespace, name, decision.recheck_after, logger)
    return decision


def _apply_network_policy(body: dict[str, Any], spec: api.AgentSandboxSpec, namespace: str, name: str) -> None:
    networking = _api("networking")
    if not spec.network.managed_policy:
        current = _read(networking.read_namespaced_network_policy, name, namespace)
        if current and current["metadata"].get("labels", {}).get(sandbox.SANDBOX_LABEL) == name:
            _delete(networking.delete_namespaced_network_policy, name, namespace)
        return
    manifest = sandbox.network_policy_manifest(body, spec)
    if _create(networking.create_namespaced_network_policy, namespace, manifest) is None:
        current = _read(networking.read_namespaced_network_policy, name, namespace)
        if current is not None and current["spec"] != manifest["spec"]:
            networking.patch_namespaced_network_policy(name, namespace, {"spec": manifest["spec"]})


@kopf.on.resume(api.GROUP, api.VERSION, SANDBOXES)
@kopf.on.create(api.GROUP, api.VERSION, SANDBOXES)
@kopf.on.update(api.GROUP, api.VERSION, SANDBOXES)
def sandbox_changed(body: kopf.Body, namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    reconcile_sandbox(namespace, name, logger, _as_dict(dict(body)))


# The last state seen of each sandbox pod, by uid: most pod updates (a new resourceVersion, a kubelet
# heartbeat of the status) change nothing the sandbox reports, and are not worth a reconciliation.
_pod_views: dict[str, sandbox.PodView] = {}


@kopf.on.event("", "v1", "pods", labels={sandbox.SANDBOX_LABEL: kopf.PRESENT})
def sandbox_pod_changed(type: str, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """A pod deleted by someone else is recreated, a failed one replaced, and status follows the pod."""
    pod = _as_dict(dict(body))
    owner = (pod["metadata"].get("labels") or {}).get(sandbox.SANDBOX_LABEL)
    uid = pod["metadata"].get("uid")
    if not owner or type not in ("ADDED", "MODIFIED", "DELETED"):
        return
    if type == "DELETED":
        _pod_views.pop(uid, None)
    else:
        view = sandbox.PodView.of(pod)
        previous, _pod_views[uid] = _pod_views.get(uid), view
        if view == previous or (type == "ADDED" and previous is None and view.phase == "Pending" and not view.scheduled):
            return  # nothing new; a just-created pod was already reported by the reconciliation that made it
    reconcile_sandbox(pod["metadata"]["namespace"], owner, logger, pod_only=True)


Reconcile = Callable[[str, str, logging.Logger], Any]


class Rechecks:
    """Work that time, not an event, makes due: a sandbox's idle suspension or expiry, a model whose
    Knative Service is not ready yet (its watch may start late, when Knative is installed after us).
    One timer per object (the latest wins), all on the operator's loop: no daemon and no finalizer per
    object, and a thousand sandboxes cost a thousand timer handles, not a thousand tasks."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[tuple[str, str, str], asyncio.TimerHandle] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def schedule(self, reconcile: Reconcile, namespace: str, name: str, delay: timedelta, logger: logging.Logger) -> None:
        """Thread-safe: handlers run in worker threads. The reconciliation later runs in a copy of the
        caller's context, where Kopf keeps what posting Events needs."""
        if self.loop is not None:
            seconds = min(max(delay.total_seconds(), 0), RECHECK_MAX.total_seconds()) + 0.5
            key = (reconcile.__name__, namespace, name)
            self.loop.call_soon_threadsafe(self._arm, key, seconds, reconcile, logger, contextvars.copy_context())

    def _arm(self, key, seconds: float, reconcile: Reconcile, logger: logging.Logger, context: contextvars.Context) -> None:
        if key in self.timers:
            self.timers.pop(key).cancel()
        self.timers[key] = self.loop.call_later(seconds, self._fire, key, reconcile, logger, context)

    def _fire(self, key, reconcile: Reconcile, logger: logging.Logger, context: contextvars.Context) -> None:
        self.timers.pop(key, None)
        self.loop.run_in_executor(None, context.run, self._run, reconcile, key[1], key[2], logger)

    def _run(self, reconcile: Reconcile, namespace: str, name: str, logger: logging.Logger) -> None:
        try:
            reconcile(namespace, name, logger)
        except Exception:  # a timer has no handler to retry it: try again later rather than never
            logger.exception("rechecking %s/%s failed; retrying in a minute", namespace, name)
            self.schedule(reconcile, namespace, name, timedelta(minutes=1), logger)


rechecks = Rechecks()


@kopf.on.startup()
async def start_rechecks(**_: Any) -> None:
    rechecks.start(asyncio.get_running_loop())


# ----- ServedModel -------------------------------------------------------------------------------------


def _knative_backoff(retry: int) -> float:
    return min(KNATIVE_BACKOFF_MAX, 5.0 * 2**retry)


@kopf.on.resume(api.GROUP, api.VERSION, SERVED_MODELS)
@kopf.on.create(api.GROUP, api.VERSION, SERVED_MODELS)
@kopf.on.update(api.GROUP, api.VERSION, SERVED_MODELS)
def served_model_changed(body: dict[str, Any], namespace: str, name: str, retry: int, logger: logging.Logger, **_: Any) -> None:
    with metrics.reconciling("ServedModel"):
        body = dict(body)
        spec = api.ServedModelSpec.model_validate(body["spec"])
        if spec.autoscaling.policy == "ppo":
            # The autoscaling loop records the target in force in status between events: read it fresh,
            # so that an older target from the event's copy is not put back on the Knative Service.
            body["status"] = (_read(_api("custom").get_namespaced_custom_object, api.GROUP, api.VERSION, namespace,
                                    SERVED_MODELS, name) or body).get("status")
        old = dict(body.get("status") or {})
        current = api.ServedModelStatus.model_validate(old)
        target = servedmodel.concurrency_target(spec, current)
        manifest = servedmodel.knative_service_manifest(body, spec, target)
        now = _now()
        try:
            service = _apply_knative_service(namespace, name, manifest)
        except ApiException as error:
            if error.status != 404:
                raise
            message = f"Knative Serving is not installed ({servedmodel.KNATIVE_GROUP}/{servedmodel.KNATIVE_VERSION} services not found); retrying"
            conditions = merge_conditions(old.get("conditions", []), [("KnativeAvailable", False, "KnativeNotInstalled", message),
                                                                      ("Ready", False, "KnativeNotInstalled", message)], now)
            _patch_status(SERVED_MODELS, namespace, name, old, {"conditions": conditions, "ready": False,
                                                                  "observedGeneration": body["metadata"].get("generation")})
            raise kopf.TemporaryError(message, delay=_knative_backoff(retry))
        # Status from a fresh read: the event's copy may predate the autoscaling loop's last write, and
        # a comparison with it would skip a write that is needed (or undo the loop's).
        refresh_served_model(namespace, name, logger, service)
        if spec.autoscaling.policy == "ppo":
            # Starts the autoscaling loop (or decides at once after a spec change; the latest timer wins).
            rechecks.schedule(decide_served_model, namespace, name, timedelta(0), logger)


def _apply_knative_service(namespace: str, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    custom = _api("custom")
    knative = (servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, namespace, servedmodel.KNATIVE_PLURAL)
    current = _read(custom.get_namespaced_custom_object, *knative, name)
    if current is None:
        return custom.create_namespaced_custom_object(*knative, manifest)
    if current.get("spec", {}).get("template") == manifest["spec"]["template"] and current["metadata"].get("labels") == manifest["metadata"]["labels"]:
        return current
    return custom.patch_namespaced_custom_object(*knative, name, {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]})


def _write_served_model_status(body: dict[str, Any], old: dict[str, Any], service: dict[str, Any], target: int, now: datetime,
                               logger: logging.Logger) -> None:
    ready, url = servedmodel.knative_readiness(service)
    if not ready:
        rechecks.schedule(refresh_served_model, body["metadata"]["namespace"], body["metadata"]["name"],
                          KNATIVE_READINESS_RECHECK, logger)
    ppo = api.ServedModelSpec.model_validate(body["spec"]).autoscaling.policy == "ppo"
    conditions = _merge_own_conditions(old.get("conditions", []), [
        ("KnativeAvailable", True, "KnativeServiceApplied", f"Knative Service {body['metadata']['name']} applied"),
        ("Ready", ready, "KnativeReady" if ready else "KnativeNotReady",
         "the Knative Service is ready" if ready else "waiting for the Knative Service to become ready"),
    ], now, keep={autoscaling.CONDITION} if ppo else set())
    new = {"url": url, "ready": ready, "conditions": conditions, "observedGeneration": body["metadata"].get("generation")}
    if not ppo or old.get("concurrencyTarget") is None:
        # Under `ppo` the autoscaling loop owns the target in force; a reconcile that read the status
        # before the loop's last write must not put an older target back.
        new["concurrencyTarget"] = target
    _patch_status(SERVED_MODELS, body["metadata"]["namespace"], body["metadata"]["name"], old, new)


def refresh_served_model(namespace: str, name: str, logger: logging.Logger, service: dict[str, Any] | None = None) -> None:
    """Mirror the Knative Service's readiness and URL into the ServedModel."""
    model = _read(_api("custom").get_namespaced_custom_object, api.GROUP, api.VERSION, namespace, SERVED_MODELS, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return
    if service is None:
        knative = (servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, namespace, servedmodel.KNATIVE_PLURAL, name)
        service = _read(_api("custom").get_namespaced_custom_object, *knative)
        if service is None:
            return  # not applied yet: the ServedModel's own handler is retrying
    old = model.get("status") or {}
    target = servedmodel.concurrency_target(api.ServedModelSpec.model_validate(model["spec"]), api.ServedModelStatus.model_validate(old))
    _write_served_model_status(model, old, service, target, _now(), logger)


@kopf.on.event(servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, servedmodel.KNATIVE_PLURAL,
               labels={servedmodel.MODEL_LABEL: kopf.PRESENT})
def knative_service_changed(type: str, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Knative reports readiness and the URL on its Service; mirror them into the ServedModel."""
    if type in ("ADDED", "MODIFIED"):
        service = _as_dict(dict(body))
        refresh_served_model(service["metadata"]["namespace"], service["metadata"]["labels"][servedmodel.MODEL_LABEL], logger, service)


def _merge_own_conditions(old: list[dict[str, Any]], new: list[tuple[str, bool, str, str]], now: datetime,
                          keep: set[str]) -> list[dict[str, Any]]:
    """`new` merged into `old`, keeping the old conditions of the types in `keep` (another writer's), in
    their old order: two writers that reordered the list would each see a change to write back."""
    merged = {c["type"]: c for c in merge_conditions(old, new, now)}
    ordered = [merged.pop(c["type"]) if c["type"] in merged else c for c in old or [] if c["type"] in merged or c["type"] in keep]
    return ordered + list(merged.values())


# ----- ServedModel autoscaling loop (policy: ppo) --------------------------------------------------------

_metrics_source: prometheus.MetricsSource | None = None
# Attempts at writing a decision when another writer changed the status in between (a 409).
STATUS_WRITE_ATTEMPTS = 3


def configure_autoscaling(prometheus_url: str | None) -> None:
    """Where the loop reads Knative's metrics (None: nowhere; ppo models then run Knative's default)."""
    global _metrics_source
    _metrics_source = prometheus.MetricsSource(prometheus_url) if prometheus_url else None
    _policy()  # loaded once per process, at start-up, so that a broken policy file shows at once


@functools.cache
def _policy() -> tuple[ExportedPolicy | None, str]:
    """The exported policy (NumPy only), or None and why it could not be loaded."""
    try:
        return load_policy(), ""
    except Exception as error:  # a bad file must cost the fallback target, not the operator
        logging.getLogger(__name__).error("the autoscaling policy could not be loaded: %s", error)
        return None, f"{type(error).__name__}: {error}"


def decide_served_model(namespace: str, name: str, logger: logging.Logger) -> autoscaling.Outcome | None:
    """One turn of the autoscaling loop of a `policy: ppo` model, run on the `rechecks` timers in a worker
    thread: observe, decide, record, apply, then schedule the next turn. The loop ends by itself when the
    model is deleted or its policy is no longer ppo (no turn is scheduled then)."""
    model = _read(_api("custom").get_namespaced_custom_object, api.GROUP, api.VERSION, namespace, SERVED_MODELS, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return None
    spec = api.ServedModelSpec.model_validate(model["spec"])
    if spec.autoscaling.policy != "ppo":
        return None
    try:
        return _decide_and_apply(model, spec, logger)
    except Exception as error:  # one failed turn must neither stop the loop nor the operator
        logger.exception("autoscaling decision for %s/%s failed", namespace, name)
        try:
            _record_failure(namespace, name, f"{type(error).__name__}: {error}")
        except Exception:
            logger.exception("could not record the failed decision of %s/%s", namespace, name)
        return None
    finally:
        rechecks.schedule(decide_served_model, namespace, name, autoscaling.decision_interval(spec.autoscaling.ppo), logger)


def _decide_and_apply(model: dict[str, Any], spec: api.ServedModelSpec, logger: logging.Logger) -> autoscaling.Outcome:
    namespace, name = model["metadata"]["namespace"], model["metadata"]["name"]
    status = api.ServedModelStatus.model_validate(model.get("status") or {})
    current = servedmodel.concurrency_target(spec, status)
    if _metrics_source is None:
        observed = autoscaling.Observed(problem=autoscaling.PROMETHEUS_NOT_CONFIGURED,
                                        detail="the operator runs without --prometheus-url")
    else:
        observed = _metrics_source.observe(namespace, name)
    policy, policy_error = _policy()
    now = _now()
    outcome = autoscaling.decide(
        observed, current_target=current, autoscaling=spec.autoscaling, spot=spec.capacity.spot,
        policy=policy.decide if policy else None, bounds=policy.bounds if policy else ActionBounds(), now=now,
        policy_error=policy_error,
    )
    # The status first: it is what every reconcile reads as the target in force (one source of truth),
    # so a reconcile between the two writes already applies the new target.
    if _record_decision(model, outcome, now):
        _apply_target(namespace, name, outcome.target)
    previous = next((c for c in (model.get("status") or {}).get("conditions", []) if c["type"] == autoscaling.CONDITION), {})
    # A warning (which Kopf also posts as an Event) when it starts falling back, not at every turn.
    log = logger.warning if not outcome.decided and previous.get("reason") != outcome.reason else logger.info
    log("autoscaling %s/%s: %s (%s)", namespace, name, outcome.message, outcome.reason)
    return outcome


def _record_decision(model: dict[str, Any], outcome: autoscaling.Outcome, now: datetime) -> bool:
    decision = api.AutoscalingDecision(
        time=now, value=outcome.target, reason=outcome.reason, message=outcome.message,
        previous_value=outcome.previous_target, policy_target=outcome.policy_target, spot_share=outcome.spot_share,
        inputs=outcome.inputs,
    ).model_dump(mode="json", by_alias=True, exclude_none=True)
    return _write_autoscaling_status(model, {"concurrencyTarget": outcome.target, "lastDecision": decision},
                                     outcome.condition, now)


def _record_failure(namespace: str, name: str, detail: str) -> None:
    model = _read(_api("custom").get_namespaced_custom_object, api.GROUP, api.VERSION, namespace, SERVED_MODELS, name)
    if model is not None:
        condition = (autoscaling.CONDITION, False, autoscaling.DECISION_FAILED, f"the decision failed: {detail}")
        _write_autoscaling_status(model, {}, condition, _now())


def _write_autoscaling_status(model: dict[str, Any], fields: dict[str, Any], condition: tuple[str, bool, str, str],
                              now: datetime) -> bool:
    """Patch the status, guarded by the resourceVersion read: the conditions list is written whole, and
    the reconcile writes it too, so a write over a newer status would drop the other writer's conditions.
    False when the model went away or stopped being `ppo` meanwhile (then nothing is written)."""
    custom = _api("custom")
    namespace, name = model["metadata"]["namespace"], model["metadata"]["name"]
    for attempt in range(STATUS_WRITE_ATTEMPTS):
        old = model.get("status") or {}
        conditions = _merge_own_conditions(old.get("conditions", []), [condition], now,
                                           keep={c["type"] for c in old.get("conditions", [])})
        patch = {"metadata": {"resourceVersion": model["metadata"]["resourceVersion"]},
                 "status": {**fields, "conditions": conditions}}
        try:
            custom.patch_namespaced_custom_object_status(api.GROUP, api.VERSION, namespace, SERVED_MODELS, name, patch)
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            if error.status != 409 or attempt == STATUS_WRITE_ATTEMPTS - 1:
                raise
        model = _read(custom.get_namespaced_custom_object, api.GROUP, api.VERSION, namespace, SERVED_MODELS, name)
        if model is None or api.ServedModelSpec.model_validate(model["spec"]).autoscaling.policy != "ppo":
            return False  # the spec's own target is in force now: a late decision must not override it
    return False


def _apply_target(namespace: str, name: str, target: int) -> None:
    """Set the Knative Service's target annotation (where `servedmodel` puts the static one)."""
    custom = _api("custom")
    knative = (servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, namespace, servedmodel.KNATIVE_PLURAL)
    service = _read(custom.get_namespaced_custom_object, *knative, name)
    if service is None:
        return  # not created yet: the reconcile creates it with the target recorded in status
    annotations = ((service.get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations") or {}
    if annotations.get(servedmodel.TARGET_ANNOTATION) != str(target):
        custom.patch_namespaced_custom_object(*knative, name, {"spec": {"template": {"metadata": {"annotations": {
            servedmodel.TARGET_ANNOTATION: str(target)}}}}})
