"""The operator's I/O edge towards the Kubernetes API: one pooled client, and reads, creates, deletes and
status writes that treat the races of a level-triggered controller as outcomes, not errors (an object
already there, already gone, or replaced meanwhile). Blocking: call from Kopf's worker threads."""

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kubernetes
from kubernetes.client import ApiException
from pydantic import BaseModel

from agentkube.operator import api, capacity, crds, interruptions, servedmodel
from agentkube.operator.status import changed, status_patch

SANDBOXES = crds.AGENT_SANDBOX.plural
SERVED_MODELS = crds.SERVED_MODEL.plural
POOLS = crds.AGENT_SANDBOX_POOL.plural
NETWORKING = "networking.k8s.io/v1"  # NetworkPolicies' group/version
# Threads that run the (synchronous) handlers; Kopf's executor and the client's connection pool match it.
# A handler spends nearly all its time waiting for the API server: 16 gave 44 sandboxes/s, 64 gave 82 on the
# same control plane (bench/sandbox_scale.py), for a few MiB of thread stacks and connections.
WORKERS = 64

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


# The generated API classes, created on first use: each module of theirs is megabytes once imported
# (CoreV1Api's alone ~15 MiB), and the per-sandbox path needs none of them (it sends raw JSON).
API_CLASSES = {
    "core": "CoreV1Api",
    "networking": "NetworkingV1Api",
    "custom": "CustomObjectsApi",
    "policy": "PolicyV1Api",
    "apps": "AppsV1Api",
}


def client(kind: str) -> Any:
    """The pooled `ApiClient` (`client`), or one of the API_CLASSES on it, created once the operator has
    logged in (current kubeconfig or in-cluster)."""
    with _clients_lock:
        if not _clients:
            _connect()
        if kind not in _clients:
            _clients[kind] = getattr(kubernetes.client, API_CLASSES[kind])(_clients["client"])
        return _clients[kind]


def _connect() -> None:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    # One pooled connection per handler thread: past the pool, every request would pay a TLS handshake.
    configuration.connection_pool_maxsize = WORKERS
    _clients["client"] = kubernetes.client.ApiClient(configuration)


def now() -> datetime:
    return datetime.now(UTC)


def as_dict(obj: Any) -> dict[str, Any]:
    """An API object (or Kopf's view of one) as the plain dict the API sends."""
    return obj if isinstance(obj, dict) else client("client").sanitize_for_serialization(obj)


def read(read_call: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        result = read_call(*args)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return as_dict(result)


def create(create_call: Callable[..., Any], namespace: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The created object, or None when it exists already (another run, or a racing handler, made it)."""
    try:
        return as_dict(create_call(namespace, manifest))
    except ApiException as error:
        if error.status == 409 or (error.status == 403 and "being terminated" in str(error.body)):
            return None  # or its namespace is going away, and everything in it with it
        raise


def delete(delete_call: Callable[..., Any], name: str, namespace: str, uid: str | None = None) -> None:
    """Delete, if it is still the object with `uid` (when given)."""
    options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
    try:
        delete_call(name, namespace, body=options)
    except ApiException as error:
        if error.status not in (404, 409):  # gone already, or replaced by a newer object we must keep
            raise


# ----- raw JSON requests, for the paths every sandbox takes --------------------------------------------------
# The generated API methods validate their arguments with pydantic and build a model object of every reply
# (only for `as_dict` to turn it back into a dict); the per-sandbox path sends and reads the API's JSON as it
# is, through the same pooled, authenticated client.

MERGE_PATCH = "application/merge-patch+json"  # lists (ownerReferences) are replaced whole, not merged


def object_path(group_version: str, namespace: str, plural: str, name: str = "", subresource: str = "") -> str:
    """The API path of a namespaced collection, one object in it, or one object's subresource."""
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{root}/namespaces/{quote(namespace, safe='')}/{plural}"
    for part in (name, subresource):
        if part:
            path += f"/{quote(part, safe='')}"
    return path


def request(method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
    """One request; the reply's JSON. Raises ApiException, as the generated methods do, for any non-2xx."""
    api_client = client("client")
    headers = {**api_client.default_headers, "Accept": "application/json", "Content-Type": content_type}
    api_client.update_params_for_auth(headers, [], ["BearerToken"], path, method, body)
    response = api_client.call_api(method, api_client.configuration.host + path, header_params=headers, body=body)
    data = response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=response.reason, body=data.decode("utf-8", "replace"))
    return json.loads(data)


def get(path: str) -> dict[str, Any] | None:
    """The object at `path`, or None when it does not exist."""
    try:
        return request("GET", path)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def post(path: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The created object, or None when it exists already (another run, or a racing handler, made it)."""
    try:
        return request("POST", path, manifest)
    except ApiException as error:
        if error.status == 409 or (error.status == 403 and "being terminated" in str(error.body)):
            return None  # or its namespace is going away, and everything in it with it
        raise


def delete_at(path: str, uid: str | None = None, resource_version: str | None = None) -> None:
    """Delete, if it is still the object with `uid` (when given), unchanged since `resource_version` (when
    given); gone already, or replaced or changed meanwhile (409), is no error."""
    preconditions = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
    options = {"apiVersion": "v1", "kind": "DeleteOptions", **({"preconditions": preconditions} if preconditions else {})}
    try:
        request("DELETE", path, options)
    except ApiException as error:
        if error.status not in (404, 409):
            raise


def list_at(path: str, label_selector: str) -> list[dict[str, Any]]:
    """The objects at the collection `path` that match `label_selector`, read from storage (no
    resourceVersion: a consistent read, so an object created a moment ago is in it)."""
    return list(request("GET", f"{path}?labelSelector={quote(label_selector, safe='')}").get("items") or [])


def patch_if_unchanged(path: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch (whose metadata.resourceVersion makes it conditional): the object as patched;
    None when it is gone or changed meanwhile (404, 409)."""
    try:
        return request("PATCH", path, patch, MERGE_PATCH)
    except ApiException as error:
        if error.status in (404, 409):
            return None
        raise


# ----- agentkube's own objects ---------------------------------------------------------------------------


OWN_GROUP_VERSION = f"{api.GROUP}/{api.VERSION}"


def read_own(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """An AgentSandbox, AgentSandboxPool or ServedModel (by plural), or None when it does not exist."""
    return get(object_path(OWN_GROUP_VERSION, namespace, plural, name))


def delete_own(plural: str, namespace: str, name: str, uid: str) -> None:
    delete_at(object_path(OWN_GROUP_VERSION, namespace, plural, name), uid)


def patch_status(plural: str, namespace: str, name: str, old: BaseModel, new: BaseModel) -> dict[str, Any] | None:
    """Write the fields `new` was given, unless `old` has them already: the object as written, or None when
    nothing was written because nothing changed, or because it is gone meanwhile (no error)."""
    if not changed(old, new):
        return None
    try:
        return request("PATCH", object_path(OWN_GROUP_VERSION, namespace, plural, name, "status"), status_patch(new), MERGE_PATCH)
    except ApiException as error:
        if error.status != 404:
            raise
    return None


def patch_status_if_unchanged(plural: str, namespace: str, name: str, resource_version: str, new: BaseModel) -> bool:
    """Write the fields `new` was given only over the object at `resource_version` (a write over a newer
    one would drop another writer's work). False when the object is gone; a 409 is the caller's to handle."""
    body = {"metadata": {"resourceVersion": resource_version}, **status_patch(new)}
    try:
        request("PATCH", object_path(OWN_GROUP_VERSION, namespace, plural, name, "status"), body, MERGE_PATCH)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


# ----- Knative Services (serving.knative.dev/v1), which ServedModels become ---------------------------------


def _knative_services(namespace: str) -> tuple[str, str, str, str]:
    return servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION, namespace, servedmodel.KNATIVE_PLURAL


def read_knative_service(namespace: str, name: str) -> dict[str, Any] | None:
    """The Knative Service, or None when there is none (a 404 also when Knative is not installed)."""
    return read(client("custom").get_namespaced_custom_object, *_knative_services(namespace), name)


def read_knative(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """A serving.knative.dev object of another kind (a Route or Revision), or None when there is none."""
    return read(client("custom").get_namespaced_custom_object, servedmodel.KNATIVE_GROUP, servedmodel.KNATIVE_VERSION,
                namespace, plural, name)


def create_knative_service(namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Raises ApiException 404 when Knative Serving is not installed."""
    return client("custom").create_namespaced_custom_object(*_knative_services(namespace), manifest)


def patch_knative_service(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return client("custom").patch_namespaced_custom_object(*_knative_services(namespace), name, patch)


# ----- PodAutoscalers (autoscaling.internal.knative.dev), where the target in force is set -------------------

def list_pod_autoscalers(namespace: str, service: str) -> list[dict[str, Any]]:
    """The PodAutoscalers of one Knative Service's revisions (Knative labels them with the Service)."""
    result = client("custom").list_namespaced_custom_object(
        servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace, servedmodel.PA_PLURAL,
        label_selector=f"{servedmodel.SERVICE_LABEL}={service}")
    return list(result.get("items") or [])


def patch_pod_autoscaler(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return client("custom").patch_namespaced_custom_object(
        servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace, servedmodel.PA_PLURAL, name, patch)


def set_target_in_force(namespace: str, service: str, target: int, min_scale: int) -> None:
    """Put `target` and `min_scale` (the warm-pod floor) on the PodAutoscalers of the Service's revisions,
    where the KPA reads them (see `servedmodel.PA_GROUP`): the Revision stays, so a change never rolls out
    new pods. A revision created later starts with the template's and gets these at the next reconcile or
    decision."""
    try:
        pod_autoscalers = list_pod_autoscalers(namespace, service)
    except ApiException as error:
        if error.status == 404:
            return  # Knative's autoscaling CRD is not installed: nothing scales this Service yet
        raise
    for name, patch in servedmodel.pod_autoscaler_patches(pod_autoscalers, target, min_scale):
        try:
            patch_pod_autoscaler(namespace, name, patch)
        except ApiException as error:
            if error.status != 404:  # a revision removed meanwhile took its PodAutoscaler along
                raise


# ----- Karpenter NodePools (karpenter.sh/v1, cluster-scoped), which spot-enabled ServedModels run on --------

def _nodepools() -> tuple[str, str, str]:
    return capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION, capacity.NODEPOOLS


def list_model_nodepools(namespace: str, name: str) -> list[dict[str, Any]] | None:
    """The NodePools made for one ServedModel, or None when Karpenter's NodePool CRD is not installed."""
    return _list_nodepools(f"{capacity.MODEL_NAMESPACE_LABEL}={namespace},{capacity.MODEL_NAME_LABEL}={name}")


def list_managed_nodepools() -> list[dict[str, Any]] | None:
    """Every NodePool the operator made for a ServedModel, or None when Karpenter's NodePool CRD is not
    installed."""
    return _list_nodepools(f"{capacity.MODEL_NAMESPACE_LABEL},{capacity.MODEL_NAME_LABEL}")


def _list_nodepools(selector: str) -> list[dict[str, Any]] | None:
    try:
        result = client("custom").list_cluster_custom_object(*_nodepools(), label_selector=selector)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return list(result.get("items") or [])


def served_model_names(namespace: str | None) -> set[tuple[str, str]]:
    """(namespace, name) of every ServedModel, in one namespace or all."""
    custom = client("custom")
    if namespace is None:
        result = custom.list_cluster_custom_object(api.GROUP, api.VERSION, SERVED_MODELS)
    else:
        result = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, SERVED_MODELS)
    return {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in result.get("items") or []}


def apply_nodepool(manifest: dict[str, Any], current: dict[str, Any] | None) -> None:
    """Create the NodePool, or bring its labels and spec to the manifest's when they differ."""
    if current is None:
        try:
            client("custom").create_cluster_custom_object(*_nodepools(), manifest)
            return
        except ApiException as error:
            if error.status != 409:
                raise
    elif (capacity.holds(current.get("spec") or {}, manifest["spec"])
          and current["metadata"].get("labels") == manifest["metadata"]["labels"]):
        return  # the API server's defaults (fields the manifest leaves out) are no difference
    client("custom").patch_cluster_custom_object(*_nodepools(), manifest["metadata"]["name"],
                                                 {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]})


def delete_nodepool(name: str) -> None:
    try:
        client("custom").delete_cluster_custom_object(*_nodepools(), name)
    except ApiException as error:
        if error.status != 404:
            raise


# ----- interruptions: pods on a node, PodAutoscalers' floors, disruption budgets ------------------------------

def list_model_pods_on_node(node: str) -> list[dict[str, Any]]:
    """Pods of ServedModels' revisions bound to `node`, in every namespace."""
    result = client("core").list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}",
                                                        label_selector=servedmodel.MODEL_LABEL)
    return [as_dict(pod) for pod in result.items]


def count_revision_pods(namespace: str, revision: str) -> int:
    """A revision's pods that are not being deleted."""
    result = client("core").list_namespaced_pod(namespace, label_selector=f"{interruptions.REVISION_LABEL}={revision}")
    return sum(1 for pod in result.items if pod.metadata.deletion_timestamp is None)


def read_pod_autoscaler(namespace: str, name: str) -> dict[str, Any] | None:
    return read(client("custom").get_namespaced_custom_object, servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace,
                servedmodel.PA_PLURAL, name)


def list_all_pod_autoscalers() -> list[dict[str, Any]]:
    try:
        result = client("custom").list_cluster_custom_object(servedmodel.PA_GROUP, servedmodel.PA_VERSION, servedmodel.PA_PLURAL)
    except ApiException as error:
        if error.status == 404:
            return []
        raise
    return list(result.get("items") or [])


def list_model_pods(namespace: str, name: str) -> list[dict[str, Any]]:
    """A ServedModel's pods (every revision's)."""
    result = client("core").list_namespaced_pod(namespace, label_selector=f"{servedmodel.MODEL_LABEL}={name}")
    return [as_dict(pod) for pod in result.items]


def node_labels() -> dict[str, dict[str, str]]:
    """Every node's labels, by node name."""
    return {node.metadata.name: dict(node.metadata.labels or {}) for node in client("core").list_node().items}


def node_names() -> set[str]:
    return {node.metadata.name for node in client("core").list_node().items}


def create_disruption_budget(namespace: str, manifest: dict[str, Any]) -> None:
    create(client("policy").create_namespaced_pod_disruption_budget, namespace, manifest)


def delete_disruption_budget(namespace: str, name: str) -> None:
    delete(client("policy").delete_namespaced_pod_disruption_budget, name, namespace)


def deployment_replicas(namespace: str, name: str) -> int | None:
    """A Deployment's count on its scale subresource, or None when it does not exist."""
    try:
        return int(client("apps").read_namespaced_deployment_scale(name, namespace).spec.replicas or 0)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def scale_deployment(namespace: str, name: str, replicas: int) -> None:
    """Set a Deployment's count through its scale subresource (gone is no error)."""
    try:
        client("apps").patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
    except ApiException as error:
        if error.status != 404:
            raise
