"""ServedModel decisions, as pure functions: the Knative Service a model wants, with Knative's
autoscaling annotations."""

import json
from typing import Any

from agentkube.operator import api, interruptions
from agentkube.operator.sandbox import MANAGED_BY, owner_reference
from agentkube.rl.knative import AUTOSCALING_GROUP, MAX_SCALE_ANNOTATION, MIN_SCALE_ANNOTATION, TARGET_ANNOTATION

KNATIVE_GROUP = "serving.knative.dev"
KNATIVE_VERSION = "v1"
KNATIVE_PLURAL = "services"
MODEL_LABEL = "agentkube.dev/served-model"
AUTOSCALING = AUTOSCALING_GROUP
KPA_CLASS = "kpa.autoscaling.knative.dev"
# The KPA's per-revision object. Knative's revision reconciler creates it with the revision's annotations
# and afterwards reconciles only its spec (pkg/reconciler/revision/reconcile_resources.go, reconcilePA:
# it compares and rewrites `Spec`, never `metadata.annotations`), while the KPA reads the target from its
# annotations on every reconcile of the PodAutoscaler (pkg/reconciler/autoscaling/resources/target.go,
# ResolveMetricTarget, via MakeDecider). So a target set there changes what the autoscaler aims for and
# leaves the Revision — and its pods — as they are; a change to the Service's template would stamp a new
# Revision instead. The same holds for `min-scale` (the policy's warm-pod floor): the KPA reads it from the
# PodAutoscaler's annotations (`PodAutoscaler.ScaleBounds`, pkg/apis/autoscaling/v1alpha1/pa_lifecycle.go,
# used by kpa/scaler.go's applyBounds and kpa.go's activeThreshold) while the revision is reachable, and
# the webhook refuses a min-scale above a non-zero max-scale on a PodAutoscaler too (ValidateObjectMetadata).
PA_GROUP = "autoscaling.internal.knative.dev"
PA_VERSION = "v1alpha1"
PA_PLURAL = "podautoscalers"
SERVICE_LABEL = "serving.knative.dev/service"


def concurrency_target(spec: api.ServedModelSpec, status: api.ServedModelStatus) -> int:
    """The target in force: the policy's last decision for `ppo`, the spec's target otherwise."""
    if spec.autoscaling.policy == "ppo" and status.concurrency_target is not None:
        return status.concurrency_target
    return spec.autoscaling.target


def template_target(spec: api.ServedModelSpec) -> int:
    """The target a revision starts with: the spec's. Under `ppo` the loop's decisions go onto the
    revisions' PodAutoscalers (`pod_autoscaler_patches`), never into the template."""
    return spec.autoscaling.target


def template_min_scale(autoscaling: api.Autoscaling) -> int:
    """The min-scale a revision starts with (non-fixed policies): the spec's, at least 1 without scale to
    zero (Knative turns scale-to-zero off per revision by keeping a replica)."""
    return autoscaling.min_scale if autoscaling.scale_to_zero else max(1, autoscaling.min_scale)


def min_scale_in_force(spec: api.ServedModelSpec, status: api.ServedModelStatus) -> int:
    """The min-scale in force: under `ppo` the loop's last one (the policy's warm-pod floor, never below the
    template's), the template's otherwise."""
    if spec.autoscaling.policy == "ppo" and status.min_scale is not None:
        return status.min_scale
    return template_min_scale(spec.autoscaling)


def floor_in_force(autoscaling: api.Autoscaling, warm_pods: int) -> int:
    """The min-scale that puts a warm-pod floor in force: at least the template's, at most a non-zero
    max-scale (Knative's webhook refuses min-scale above max-scale)."""
    floor = max(template_min_scale(autoscaling), int(warm_pods))
    return min(floor, autoscaling.max_scale) if autoscaling.max_scale > 0 else floor


def pod_autoscaler_patches(pod_autoscalers: list[dict[str, Any]], target: int, min_scale: int) -> list[tuple[str, dict[str, Any]]]:
    """(name, merge patch) for each PodAutoscaler of a Service whose target or min-scale differs from
    those in force: every revision that may serve traffic runs under them. Only what differs is written;
    objects being deleted are left alone. While a spot interruption has raised a PodAutoscaler's floor
    (`interruptions.raised_floor`), the new min-scale is what the floor returns to afterwards, and the
    raised floor in force only ever goes up: replacements for the pods on the node must not be dropped."""
    patches = []
    for pod_autoscaler in pod_autoscalers:
        metadata = pod_autoscaler.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            continue
        annotations = metadata.get("annotations") or {}
        wanted = {TARGET_ANNOTATION: str(target), MIN_SCALE_ANNOTATION: str(min_scale)}
        if interruptions.FLOOR_BEFORE in annotations:
            raised = int(annotations.get(MIN_SCALE_ANNOTATION) or 0)
            wanted |= {MIN_SCALE_ANNOTATION: str(max(raised, min_scale)), interruptions.FLOOR_BEFORE: str(min_scale)}
        changed = {key: value for key, value in wanted.items() if annotations.get(key) != value}
        if changed:
            patches.append((metadata["name"], {"metadata": {"annotations": changed}}))
    return patches


def autoscaling_annotations(autoscaling: api.Autoscaling, target: int) -> dict[str, str]:
    if autoscaling.policy == "fixed":
        replicas = str(autoscaling.min_scale)
        return {f"{AUTOSCALING}/class": KPA_CLASS, MIN_SCALE_ANNOTATION: replicas,
                MAX_SCALE_ANNOTATION: replicas, f"{AUTOSCALING}/initial-scale": replicas}
    min_scale = template_min_scale(autoscaling)
    return {
        f"{AUTOSCALING}/class": KPA_CLASS,
        f"{AUTOSCALING}/metric": "concurrency",
        TARGET_ANNOTATION: str(target),
        f"{AUTOSCALING}/target-utilization-percentage": str(autoscaling.target_utilization),
        MIN_SCALE_ANNOTATION: str(min_scale),
        MAX_SCALE_ANNOTATION: str(autoscaling.max_scale),
        f"{AUTOSCALING}/initial-scale": str(max(autoscaling.initial_scale, min_scale)),
    }


def knative_service_manifest(body: dict[str, Any], spec: api.ServedModelSpec, target: int,
                             placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """`placement`: pod-spec fields that say where the revision's pods run (`capacity.placement`)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    container: dict[str, Any] = {
        "name": "model",
        "image": spec.image,
        "ports": [{"containerPort": spec.port}],
        "env": [{"name": "MODEL_NAME", "value": spec.model.name}]
        + ([{"name": "MODEL_URI", "value": spec.model.uri}] if spec.model.uri else [])
        + [e.model_dump() for e in spec.env or []],
    }
    if spec.args:
        container["args"] = list(spec.args)
    if spec.resources:
        container["resources"] = {
            key: {k: str(v) for k, v in values.items()}
            for key, values in (("requests", spec.resources.requests), ("limits", spec.resources.limits))
            if values
        }
    labels = {MODEL_LABEL: name, **MANAGED_BY}
    return {
        "apiVersion": f"{KNATIVE_GROUP}/{KNATIVE_VERSION}",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": [owner_reference(body)]},
        "spec": {
            "template": {
                "metadata": {"labels": labels, "annotations": autoscaling_annotations(spec.autoscaling, target)},
                "spec": {"containers": [container], **(placement or {})},
            }
        },
    }


ROUTES = "routes"
REVISIONS = "revisions"


def _ready_condition(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)


def _as_status(condition: dict[str, Any] | None) -> bool | None:
    return None if condition is None or condition.get("status") not in ("True", "False") else condition["status"] == "True"


def latest_created_revision(service: dict[str, Any] | None) -> str | None:
    """The Revision the Service's Configuration made last (the one a spec change is waiting for)."""
    return ((service or {}).get("status") or {}).get("latestCreatedRevisionName")


def knative_route_and_revision_conditions(route: dict[str, Any] | None, revision: dict[str, Any] | None,
                                          revision_name: str | None) -> list[tuple[str, bool | None, str, str]]:
    """`RouteReady` and `RevisionReady`, Knative's own status, reason and message (why a Route is not
    programmed by the KIngress, why a Revision's pods do not start: `ExitCode1`, `ImagePullBackOff`, ...).
    Unknown while Knative has not said."""
    route_ready = _ready_condition(route)
    revision_ready = _ready_condition(revision)
    route_status, revision_status = _as_status(route_ready), _as_status(revision_ready)
    named = f"Revision {revision_name}" if revision_name else "no Revision yet"
    return [
        ("RouteReady", route_status, (route_ready or {}).get("reason") or ("RouteReady" if route_status else "RouteNotReady"),
         (route_ready or {}).get("message") or ("the Route is ready" if route_status else
                                                "waiting for the Route" if route is not None else "no Route yet")),
        ("RevisionReady", revision_status,
         (revision_ready or {}).get("reason") or ("RevisionReady" if revision_status else "RevisionNotReady"),
         f"{named}: " + ((revision_ready or {}).get("message") or ("ready" if revision_status else "not ready yet"))),
    ]


def knative_readiness(service: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(ready, url) from a Knative Service's status."""
    status = (service or {}).get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready, status.get("url")


def refusal_message(status_body: str | bytes | None) -> str:
    """Why the API server (Knative's webhook, for a Knative Service) refused an object: the `message` of
    the Status it answered with, or the body itself when that is not a Status."""
    text = status_body.decode(errors="replace") if isinstance(status_body, bytes) else (status_body or "")
    try:
        return str(json.loads(text).get("message") or text)
    except (ValueError, AttributeError):
        return text
