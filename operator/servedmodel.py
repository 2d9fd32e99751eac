"""ServedModel decisions, as pure functions: the Knative Service a model wants, with Knative's
autoscaling annotations."""

import json
from typing import Any

from agentkube.operator import api
from agentkube.operator.sandbox import MANAGED_BY, owner_reference

KNATIVE_GROUP = "serving.knative.dev"
KNATIVE_VERSION = "v1"
KNATIVE_PLURAL = "services"
MODEL_LABEL = "agentkube.dev/served-model"
AUTOSCALING = "autoscaling.knative.dev"
KPA_CLASS = "kpa.autoscaling.knative.dev"
TARGET_ANNOTATION = f"{AUTOSCALING}/target"
# The KPA's per-revision object. Knative's revision reconciler creates it with the revision's annotations
# and afterwards reconciles only its spec (pkg/reconciler/revision/reconcile_resources.go, reconcilePA:
# it compares and rewrites `Spec`, never `metadata.annotations`), while the KPA reads the target from its
# annotations on every reconcile of the PodAutoscaler (pkg/reconciler/autoscaling/resources/target.go,
# ResolveMetricTarget, via MakeDecider). So a target set there changes what the autoscaler aims for and
# leaves the Revision — and its pods — as they are; a change to the Service's template would stamp a new
# Revision instead.
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
    revisions' PodAutoscalers (`pod_autoscaler_target_patches`), never into the template."""
    return spec.autoscaling.target


def pod_autoscaler_target_patches(pod_autoscalers: list[dict[str, Any]], target: int) -> list[tuple[str, dict[str, Any]]]:
    """(name, merge patch) for each PodAutoscaler of a Service whose target differs from `target`: every
    revision that may serve traffic runs under the target in force. Objects being deleted are left alone."""
    patches = []
    for pod_autoscaler in pod_autoscalers:
        metadata = pod_autoscaler.get("metadata") or {}
        if metadata.get("deletionTimestamp"):
            continue
        if (metadata.get("annotations") or {}).get(TARGET_ANNOTATION) != str(target):
            patches.append((metadata["name"], {"metadata": {"annotations": {TARGET_ANNOTATION: str(target)}}}))
    return patches


def autoscaling_annotations(autoscaling: api.Autoscaling, target: int) -> dict[str, str]:
    if autoscaling.policy == "fixed":
        replicas = str(autoscaling.min_scale)
        return {f"{AUTOSCALING}/class": KPA_CLASS, f"{AUTOSCALING}/min-scale": replicas,
                f"{AUTOSCALING}/max-scale": replicas, f"{AUTOSCALING}/initial-scale": replicas}
    # Knative turns scale-to-zero off per revision by keeping at least one replica.
    min_scale = autoscaling.min_scale if autoscaling.scale_to_zero else max(1, autoscaling.min_scale)
    return {
        f"{AUTOSCALING}/class": KPA_CLASS,
        f"{AUTOSCALING}/metric": "concurrency",
        TARGET_ANNOTATION: str(target),
        f"{AUTOSCALING}/target-utilization-percentage": str(autoscaling.target_utilization),
        f"{AUTOSCALING}/min-scale": str(min_scale),
        f"{AUTOSCALING}/max-scale": str(autoscaling.max_scale),
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
