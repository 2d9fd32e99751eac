"""The operator's I/O edge towards the Kubernetes API: one pooled, authenticated connection, and reads, creates,
deletes and status writes that treat the races of a level-triggered controller as outcomes, not errors (an
object already there, already gone, or replaced meanwhile). Blocking: call from Kopf's worker threads.

Every request sends and reads the API's JSON as it is, over urllib3. The `kubernetes` client is not used in the
operator process: its imports alone were ~19 MiB of its resident memory, its generated API classes megabytes
more once created, and every reply was built into model objects only to be turned back into dicts."""

import json
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import kopf
import urllib3
from pydantic import BaseModel

from agentkube.operator import api, capacity, crds, interruptions, servedmodel
from agentkube.operator.status import changed, status_patch

SANDBOXES = crds.AGENT_SANDBOX.plural
SERVED_MODELS = crds.SERVED_MODEL.plural
POOLS = crds.AGENT_SANDBOX_POOL.plural
NETWORKING = "networking.k8s.io/v1"  # NetworkPolicies' group/version
# Threads that run the (synchronous) handlers; Kopf's executor and the connection pool match it.
# A handler spends nearly all its time waiting for the API server: 16 gave 44 sandboxes/s, 64 gave 82 on the
# same control plane (bench/sandbox_scale.py), for a few MiB of thread stacks and connections.
WORKERS = 64

# Where a pod finds its service account's credentials (client-go's in-cluster rule: these files and
# KUBERNETES_SERVICE_HOST/PORT in the environment).
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ApiException(Exception):
    """The API server answered outside 2xx: its status code, reason and body (the API's Status JSON)."""

    def __init__(self, status: int, reason: str = "", body: str = ""):
        super().__init__(f"({status}) {reason}: {body}")
        self.status, self.reason, self.body = status, reason, body


def login() -> kopf.ConnectionInfo:
    """The operator's credentials, read afresh: in a pod its service account's (the API server at
    KUBERNETES_SERVICE_HOST:PORT, as client-go finds it), elsewhere the current kubeconfig's (inline or
    absolute-path credentials, or a token). Both Kopf's session and ours use them."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = SERVICE_ACCOUNT / "token"
    if host and port and token_file.exists():
        namespace = SERVICE_ACCOUNT / "namespace"
        return kopf.ConnectionInfo(
            server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
            ca_path=str(SERVICE_ACCOUNT / "ca.crt"), token=token_file.read_text().strip() or None,
            default_namespace=namespace.read_text().strip() if namespace.exists() else None)
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    if info is None:
        raise kopf.LoginError("no service account in this pod and no kubeconfig ($KUBECONFIG or ~/.kube/config)")
    if not (info.token or info.certificate_path or info.certificate_data or info.username):
        raise kopf.LoginError("the current kubeconfig user has no token, client certificate or password "
                              "(credential plugins are not run by the operator: give it a token kubeconfig)")
    return info


class _Connection:
    """One pool of kept-alive connections to the API server with the credentials they were opened with."""

    def __init__(self, info: kopf.ConnectionInfo):
        self.server = info.server.rstrip("/")
        self.headers = {**info.as_http_headers(), "Accept": "application/json"}
        # One kept-alive connection per handler thread: past the pool, every request would pay a TLS handshake.
        options: dict[str, Any] = {"num_pools": 1, "maxsize": WORKERS}
        if self.server.startswith("https:"):
            options["ssl_context"] = info.as_ssl_context()
        self.pool: urllib3.PoolManager = (urllib3.ProxyManager(info.proxy_url, **options) if info.proxy_url
                                          else urllib3.PoolManager(**options))


_connection: _Connection | None = None
_connection_lock = threading.Lock()


def _connected(fresh: bool = False) -> _Connection:
    global _connection
    with _connection_lock:
        if _connection is None or fresh:
            _connection = _Connection(login())
        return _connection


def now() -> datetime:
    return datetime.now(UTC)


def as_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An API object (or Kopf's view of one) as the plain dict the API sends."""
    return obj if isinstance(obj, dict) else dict(obj)


MERGE_PATCH = "application/merge-patch+json"  # lists (ownerReferences) are replaced whole, not merged


def object_path(group_version: str, namespace: str, plural: str, name: str = "", subresource: str = "") -> str:
    """The API path of a namespaced collection, one object in it, or one object's subresource."""
    return _path(group_version, f"namespaces/{quote(namespace, safe='')}/{plural}", name, subresource)


def cluster_path(group_version: str, plural: str, name: str = "", subresource: str = "") -> str:
    """The API path of a collection across namespaces or of cluster-scoped objects, or one such object."""
    return _path(group_version, plural, name, subresource)


def _path(group_version: str, collection: str, name: str, subresource: str) -> str:
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{root}/{collection}"
    for part in (name, subresource):
        if part:
            path += f"/{quote(part, safe='')}"
    return path


def request(method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
    """One request; the reply's JSON. Raises ApiException for any non-2xx. A 401 logs in again once (a service
    account's token is rotated in its file) and repeats the request."""
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    connection = _connected()
    for attempt in range(2):
        headers = {**connection.headers, **({"Content-Type": content_type} if data is not None else {})}
        response = connection.pool.request(method, connection.server + path, body=data, headers=headers)
        if response.status != 401 or attempt:
            break
        connection = _connected(fresh=True)
    if not 200 <= response.status <= 299:
        raise ApiException(response.status, response.reason or "", response.data.decode("utf-8", "replace"))
    return json.loads(response.data)


def with_query(path: str, **query: str | None) -> str:
    """`path` with the given query parameters (those not None), encoded."""
    given = {k: v for k, v in query.items() if v is not None}
    return f"{path}?{urlencode(given)}" if given else path


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


def list_at(path: str, label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
    """The objects at the collection `path` that match the selectors, read from storage (no resourceVersion: a
    consistent read, so an object created a moment ago is in it)."""
    return list(request("GET", with_query(path, labelSelector=label_selector, fieldSelector=field_selector)).get("items") or [])


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

KNATIVE_GROUP_VERSION = f"{servedmodel.KNATIVE_GROUP}/{servedmodel.KNATIVE_VERSION}"
PA_GROUP_VERSION = f"{servedmodel.PA_GROUP}/{servedmodel.PA_VERSION}"


def read_knative_service(namespace: str, name: str) -> dict[str, Any] | None:
    """The Knative Service, or None when there is none (a 404 also when Knative is not installed)."""
    return read_knative(namespace, servedmodel.KNATIVE_PLURAL, name)


def read_knative(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    """A serving.knative.dev object of another kind (a Route or Revision), or None when there is none."""
    return get(object_path(KNATIVE_GROUP_VERSION, namespace, plural, name))


def create_knative_service(namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Raises ApiException 404 when Knative Serving is not installed."""
    return request("POST", object_path(KNATIVE_GROUP_VERSION, namespace, servedmodel.KNATIVE_PLURAL), manifest)


def patch_knative_service(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return request("PATCH", object_path(KNATIVE_GROUP_VERSION, namespace, servedmodel.KNATIVE_PLURAL, name), patch, MERGE_PATCH)


# ----- PodAutoscalers (autoscaling.internal.knative.dev), where the target in force is set -------------------

def list_pod_autoscalers(namespace: str, service: str) -> list[dict[str, Any]]:
    """The PodAutoscalers of one Knative Service's revisions (Knative labels them with the Service)."""
    return list_at(object_path(PA_GROUP_VERSION, namespace, servedmodel.PA_PLURAL), f"{servedmodel.SERVICE_LABEL}={service}")


def patch_pod_autoscaler(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return request("PATCH", object_path(PA_GROUP_VERSION, namespace, servedmodel.PA_PLURAL, name), patch, MERGE_PATCH)


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

KARPENTER_GROUP_VERSION = f"{capacity.KARPENTER_GROUP}/{capacity.KARPENTER_VERSION}"


def list_model_nodepools(namespace: str, name: str) -> list[dict[str, Any]] | None:
    """The NodePools made for one ServedModel, or None when Karpenter's NodePool CRD is not installed."""
    return _list_nodepools(f"{capacity.MODEL_NAMESPACE_LABEL}={namespace},{capacity.MODEL_NAME_LABEL}={name}")


def list_managed_nodepools() -> list[dict[str, Any]] | None:
    """Every NodePool the operator made for a ServedModel, or None when Karpenter's NodePool CRD is not
    installed."""
    return _list_nodepools(f"{capacity.MODEL_NAMESPACE_LABEL},{capacity.MODEL_NAME_LABEL}")


def _list_nodepools(selector: str) -> list[dict[str, Any]] | None:
    try:
        return list_at(cluster_path(KARPENTER_GROUP_VERSION, capacity.NODEPOOLS), selector)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def served_model_names(namespace: str | None) -> set[tuple[str, str]]:
    """(namespace, name) of every ServedModel, in one namespace or all."""
    path = (cluster_path(OWN_GROUP_VERSION, SERVED_MODELS) if namespace is None
            else object_path(OWN_GROUP_VERSION, namespace, SERVED_MODELS))
    return {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in list_at(path)}


def apply_nodepool(manifest: dict[str, Any], current: dict[str, Any] | None) -> None:
    """Create the NodePool, or bring its labels and spec to the manifest's when they differ."""
    if current is None:
        try:
            request("POST", cluster_path(KARPENTER_GROUP_VERSION, capacity.NODEPOOLS), manifest)
            return
        except ApiException as error:
            if error.status != 409:
                raise
    elif (capacity.holds(current.get("spec") or {}, manifest["spec"])
          and current["metadata"].get("labels") == manifest["metadata"]["labels"]):
        return  # the API server's defaults (fields the manifest leaves out) are no difference
    request("PATCH", cluster_path(KARPENTER_GROUP_VERSION, capacity.NODEPOOLS, manifest["metadata"]["name"]),
            {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]}, MERGE_PATCH)


def delete_nodepool(name: str) -> None:
    delete_at(cluster_path(KARPENTER_GROUP_VERSION, capacity.NODEPOOLS, name))


# ----- interruptions: pods on a node, PodAutoscalers' floors, disruption budgets ------------------------------

def list_model_pods_on_node(node: str) -> list[dict[str, Any]]:
    """Pods of ServedModels' revisions bound to `node`, in every namespace."""
    return list_at(cluster_path("v1", "pods"), servedmodel.MODEL_LABEL, f"spec.nodeName={node}")


def count_revision_pods(namespace: str, revision: str) -> int:
    """A revision's pods that are not being deleted."""
    pods = list_at(object_path("v1", namespace, "pods"), f"{interruptions.REVISION_LABEL}={revision}")
    return sum(1 for pod in pods if pod["metadata"].get("deletionTimestamp") is None)


def read_pod_autoscaler(namespace: str, name: str) -> dict[str, Any] | None:
    return get(object_path(PA_GROUP_VERSION, namespace, servedmodel.PA_PLURAL, name))


def list_all_pod_autoscalers() -> list[dict[str, Any]]:
    try:
        return list_at(cluster_path(PA_GROUP_VERSION, servedmodel.PA_PLURAL))
    except ApiException as error:
        if error.status == 404:
            return []
        raise


def list_model_pods(namespace: str, name: str) -> list[dict[str, Any]]:
    """A ServedModel's pods (every revision's)."""
    return list_at(object_path("v1", namespace, "pods"), f"{servedmodel.MODEL_LABEL}={name}")


def node_labels() -> dict[str, dict[str, str]]:
    """Every node's labels, by node name."""
    return {node["metadata"]["name"]: dict(node["metadata"].get("labels") or {}) for node in list_at(cluster_path("v1", "nodes"))}


def node_names() -> set[str]:
    return {node["metadata"]["name"] for node in list_at(cluster_path("v1", "nodes"))}


def create_disruption_budget(namespace: str, manifest: dict[str, Any]) -> None:
    post(object_path("policy/v1", namespace, "poddisruptionbudgets"), manifest)


def delete_disruption_budget(namespace: str, name: str) -> None:
    delete_at(object_path("policy/v1", namespace, "poddisruptionbudgets", name))


def deployment_replicas(namespace: str, name: str) -> int | None:
    """A Deployment's count on its scale subresource, or None when it does not exist."""
    scale = get(object_path("apps/v1", namespace, "deployments", name, "scale"))
    return None if scale is None else int((scale.get("spec") or {}).get("replicas") or 0)


def scale_deployment(namespace: str, name: str, replicas: int) -> None:
    """Set a Deployment's count through its scale subresource (gone is no error)."""
    try:
        request("PATCH", object_path("apps/v1", namespace, "deployments", name, "scale"), {"spec": {"replicas": replicas}},
                MERGE_PATCH)
    except ApiException as error:
        if error.status != 404:
            raise
