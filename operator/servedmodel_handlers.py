"""ServedModel handlers: read the model, ask `servedmodel` (pure) for its Knative Service, apply it, and
mirror the Service's readiness and URL into status. Under `autoscaling.policy: ppo` they start the
autoscaling loop (`autoscaling_loop`), which owns the target in force from then on."""

import logging
from datetime import datetime, timedelta
from typing import Any

import kopf

from agentkube.operator import api, autoscaling, capacity_handlers, kube, metrics, servedmodel
from agentkube.operator.autoscaling_loop import decide_served_model
from agentkube.operator.kube import SERVED_MODELS, ApiException
from agentkube.operator.rechecks import rechecks
from agentkube.operator.status import ConditionUpdate, merge_conditions, merge_own_conditions

# How often a model whose Knative Service is not ready re-reads it (beside the watch on Knative Services).
KNATIVE_READINESS_RECHECK = timedelta(seconds=10)
KNATIVE_BACKOFF_MAX = 300.0


def knative_backoff(retry: int) -> float:
    """Seconds until the next try of a model whose Knative Service could not be applied (no Knative)."""
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
            # so that the status written below does not start from an older copy than the loop's write.
            body["status"] = (kube.read_own(SERVED_MODELS, namespace, name) or body).get("status")
        current = api.ServedModelStatus.model_validate(body.get("status") or {})
        in_force = capacity_handlers.apply_capacity(namespace, name, spec, current)
        # The capacity metrics' measurements (the latest timer wins: one per model).
        rechecks.schedule(capacity_handlers.measure_capacity, namespace, name, timedelta(0), logger)
        _write_capacity_condition(namespace, name, current, in_force.condition)
        manifest = servedmodel.knative_service_manifest(body, spec, servedmodel.template_target(spec), in_force.placement)
        try:
            service = _apply_knative_service(namespace, name, manifest)
        except ApiException as error:
            if error.status in (400, 422):
                # Refused: Knative's webhook validates every Service (the CRD's schema cannot say all it
                # does). The same spec would be refused again, so say why and wait for a new spec.
                message = f"Knative refused the Service: {servedmodel.refusal_message(error.body)}"
                conditions = merge_conditions(current.conditions, [("KnativeAvailable", False, "KnativeRefused", message),
                                                                   ("Ready", False, "KnativeRefused", message)], kube.now())
                kube.patch_status(SERVED_MODELS, namespace, name, current, api.ServedModelStatus(
                    conditions=conditions, ready=False, observed_generation=body["metadata"].get("generation")))
                raise kopf.PermanentError(message) from None
            if error.status != 404:
                raise
            message = (f"Knative Serving is not installed ({servedmodel.KNATIVE_GROUP}/{servedmodel.KNATIVE_VERSION}"
                       " services not found); retrying")
            conditions = merge_conditions(current.conditions, [("KnativeAvailable", False, "KnativeNotInstalled", message),
                                                               ("Ready", False, "KnativeNotInstalled", message)], kube.now())
            kube.patch_status(SERVED_MODELS, namespace, name, current, api.ServedModelStatus(
                conditions=conditions, ready=False, observed_generation=body["metadata"].get("generation")))
            raise kopf.TemporaryError(message, delay=knative_backoff(retry)) from None
        # Status from a fresh read: the event's copy may predate the autoscaling loop's last write, and
        # a comparison with it would skip a write that is needed (or undo the loop's).
        refresh_served_model(namespace, name, logger, service)
        _put_target_in_force(namespace, name, spec, current)
        if spec.autoscaling.policy == "ppo":
            # Starts the autoscaling loop (or decides at once after a spec change; the latest timer wins).
            rechecks.schedule(decide_served_model, namespace, name, timedelta(0), logger)


def _write_capacity_condition(namespace: str, name: str, status: api.ServedModelStatus, condition: ConditionUpdate) -> None:
    """The `Capacity` condition alone (every other writer keeps it: see `served_model_status`)."""
    conditions = merge_own_conditions(status.conditions, [condition], kube.now(), keep={c.type for c in status.conditions})
    if conditions != status.conditions:
        kube.patch_status(SERVED_MODELS, namespace, name, status, api.ServedModelStatus(conditions=conditions))
        status.conditions = conditions


def _apply_knative_service(namespace: str, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    current = kube.read_knative_service(namespace, name)
    if current is None:
        return kube.create_knative_service(namespace, manifest)
    unchanged = (current.get("spec", {}).get("template") == manifest["spec"]["template"]
                 and current["metadata"].get("labels") == manifest["metadata"]["labels"])
    if unchanged:
        return current
    return kube.patch_knative_service(namespace, name, {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]})


def refresh_served_model(namespace: str, name: str, logger: logging.Logger, service: dict[str, Any] | None = None) -> None:
    """Mirror the Knative Service's readiness and URL into the ServedModel."""
    model = kube.read_own(SERVED_MODELS, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return
    if service is None:
        service = kube.read_knative_service(namespace, name)
        if service is None:
            return  # not applied yet: the ServedModel's own handler is retrying
    old = api.ServedModelStatus.model_validate(model.get("status") or {})
    spec = api.ServedModelSpec.model_validate(model["spec"])
    # The Route and the latest Revision say what the Service's own Ready summarises away: why.
    revision_name = servedmodel.latest_created_revision(service)
    route = kube.read_knative(namespace, servedmodel.ROUTES, service["metadata"]["name"])
    revision = kube.read_knative(namespace, servedmodel.REVISIONS, revision_name) if revision_name else None
    new = served_model_status(model, spec, old, service, kube.now(), route, revision)
    if not new.ready:
        rechecks.schedule(refresh_served_model, namespace, name, KNATIVE_READINESS_RECHECK, logger)
    kube.patch_status(SERVED_MODELS, namespace, name, old, new)


def served_model_status(model: dict[str, Any], spec: api.ServedModelSpec, old: api.ServedModelStatus,
                        service: dict[str, Any], now: datetime, route: dict[str, Any] | None = None,
                        revision: dict[str, Any] | None = None) -> api.ServedModelStatus:
    """What the reconcile writes: the Knative Service's state, its Route's (URL, readiness) and its latest
    Revision's. Under `ppo` the autoscaling loop's condition and target are the loop's, and kept."""
    ready, url = servedmodel.knative_readiness(service)
    route_url = ((route or {}).get("status") or {}).get("url")
    revision_name = servedmodel.latest_created_revision(service)
    ppo = spec.autoscaling.policy == "ppo"
    conditions = merge_own_conditions(old.conditions, [
        ("KnativeAvailable", True, "KnativeServiceApplied", f"Knative Service {model['metadata']['name']} applied"),
        *servedmodel.knative_route_and_revision_conditions(route, revision, revision_name),
        ("Ready", ready, "KnativeReady" if ready else "KnativeNotReady",
         "the Knative Service is ready" if ready else "waiting for the Knative Service to become ready"),
    ], now, keep={capacity_handlers.CONDITION} | ({autoscaling.CONDITION} if ppo else set()))
    status = api.ServedModelStatus(url=route_url or url, ready=ready, conditions=conditions,
                                   latest_created_revision=revision_name,
                                   latest_ready_revision=((service.get("status") or {}).get("latestReadyRevisionName")),
                                   observed_generation=model["metadata"].get("generation"))
    if not ppo or old.concurrency_target is None:
        # Under `ppo` the autoscaling loop owns the target in force; a reconcile that read the status
        # before the loop's last write must not put an older target back.
        status.concurrency_target = servedmodel.concurrency_target(spec, old)
    if not ppo or old.min_scale is None:
        status.min_scale = servedmodel.min_scale_in_force(spec, old)
    return status


@kopf.on.event(servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, servedmodel.KNATIVE_PLURAL,
               labels={servedmodel.MODEL_LABEL: kopf.PRESENT})
def knative_service_changed(type: str, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Knative reports readiness and the URL on its Service; mirror them into the ServedModel."""
    if type in ("ADDED", "MODIFIED"):
        service = kube.as_dict(dict(body))
        namespace, name = service["metadata"]["namespace"], service["metadata"]["labels"][servedmodel.MODEL_LABEL]
        refresh_served_model(namespace, name, logger, service)
        # A new revision (its Service's status names it) starts with the template's target: give it the
        # one in force.
        model = kube.read_own(SERVED_MODELS, namespace, name)
        if model is not None and not model["metadata"].get("deletionTimestamp"):
            _put_target_in_force(namespace, name, api.ServedModelSpec.model_validate(model["spec"]),
                                 api.ServedModelStatus.model_validate(model.get("status") or {}))


def _put_target_in_force(namespace: str, name: str, spec: api.ServedModelSpec, status: api.ServedModelStatus) -> None:
    """The target and min-scale in force (the loop's last decision under `ppo`, the spec's otherwise) onto
    the revisions' PodAutoscalers: Knative never resets what is set there, so leaving `ppo` must put the
    spec's back."""
    if spec.autoscaling.policy != "fixed":
        kube.set_target_in_force(namespace, name, servedmodel.concurrency_target(spec, status),
                                 servedmodel.min_scale_in_force(spec, status))
