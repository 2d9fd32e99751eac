"""The operator as it runs in production: installed from the Helm chart's RBAC, authenticated as its
service account, reconciling against the real API server. The tests play the kubelet's part where a pod
must become Running or Failed (there is no node in this environment)."""

import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import kubernetes
import pytest
import requests
import yaml
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi, NetworkingV1Api

from agentkube.devenv import knative
from agentkube.devenv.versions import bin_dir
from agentkube.operator import api, sandbox
from harness import CHART, OPERATOR_SA, REPO, SYSTEM_NAMESPACE, Operator, helm_template, install_knative_crds, install_operator

SANDBOXES = "agentsandboxes"


@pytest.fixture(scope="module")
def installed(devenv, kubectl) -> Path:
    return install_operator(devenv, kubectl)


@pytest.fixture(scope="module")
def operator(installed, tmp_path_factory) -> Iterator[Operator]:
    running = Operator(installed, tmp_path_factory.mktemp("operator"))
    running.start()
    yield running
    running.stop()


def _sandbox(name: str, **spec) -> dict:
    spec.setdefault("template", {"image": "busybox", "command": ["sleep", "infinity"], "resources": {"limits": {"memory": "1Gi"}}})
    return {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": name}, "spec": spec}


def _get_sandbox(api_client, namespace: str, name: str) -> dict | None:
    try:
        return CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, SANDBOXES, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _create_sandbox(api_client, namespace: str, body: dict) -> dict:
    return CustomObjectsApi(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, SANDBOXES, body)


def _patch_sandbox(api_client, namespace: str, name: str, patch: dict) -> None:
    CustomObjectsApi(api_client).patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, SANDBOXES, name, patch)


def _pod(api_client, namespace: str, name: str):
    try:
        return CoreV1Api(api_client).read_namespaced_pod(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _phase(api_client, namespace: str, name: str) -> str | None:
    return ((_get_sandbox(api_client, namespace, name) or {}).get("status") or {}).get("phase")


def _act_as_kubelet(api_client, namespace: str, name: str, phase: str, ready: bool, pod_ip: str | None = None) -> None:
    """There is no node here: set the pod's status as a kubelet would."""
    status = "True" if ready else "False"
    CoreV1Api(api_client).patch_namespaced_pod_status(name, namespace, {"status": {
        "phase": phase,
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": status}],
        **({"podIP": pod_ip, "podIPs": [{"ip": pod_ip}]} if pod_ip else {}),
    }})


def test_rbac_allows_what_the_operator_needs_and_nothing_else(installed, api_client, kubectl):
    user = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{OPERATOR_SA}"

    def can(*args: str) -> bool:
        return kubectl("auth", "can-i", *args, f"--as={user}", check=False).stdout.strip() == "yes"

    for allowed in (["watch", "agentsandboxes.agentkube.dev", "-A"], ["patch", "agentsandboxes.agentkube.dev/status", "-n", "x"],
                    ["create", "pods", "-n", "x"], ["delete", "pods", "-n", "x"], ["create", "networkpolicies", "-n", "x"],
                    ["create", "events", "-n", "x"], ["watch", "customresourcedefinitions"],
                    # Warm pools: watched, their status written, and a warm pod adopted by patching it.
                    ["watch", "agentsandboxpools.agentkube.dev", "-A"], ["patch", "agentsandboxpools.agentkube.dev/status", "-n", "x"],
                    ["patch", "pods", "-n", "x"]):
        assert can(*allowed), allowed
    # kubectl resolves resource names through discovery, and Knative is not installed here: ask directly.
    def may(group: str, resource: str, verb: str) -> bool:
        review = kubernetes.client.AuthorizationV1Api(api_client).create_subject_access_review({"spec": {"user": user,
            "groups": ["system:serviceaccounts"], "resourceAttributes": {
                "group": group, "resource": resource, "verb": verb, "namespace": "x"}}})
        return review.status.allowed

    assert may("serving.knative.dev", "services", "create")
    # The target in force goes onto Knative's PodAutoscalers, which Knative alone creates and deletes.
    assert may("autoscaling.internal.knative.dev", "podautoscalers", "patch")
    assert may("autoscaling.internal.knative.dev", "podautoscalers", "list")
    for verb in ("create", "delete", "update"):
        assert not may("autoscaling.internal.knative.dev", "podautoscalers", verb), verb
    assert not may("serving.knative.dev", "services", "delete")
    # Spot-enabled models' NodePools (cluster-scoped): made, changed and removed; nothing else of Karpenter's.
    for verb in ("create", "patch", "delete", "list"):
        assert may("karpenter.sh", "nodepools", verb), verb
    assert not may("karpenter.sh", "nodepools", "update") and not may("karpenter.sh", "nodeclaims", "delete")
    # Interruptions: read nodes, a budget per revision, and a revision Deployment's scale (not the Deployment).
    assert may("", "nodes", "watch") and not may("", "nodes", "patch")
    assert may("policy", "poddisruptionbudgets", "create")
    assert not may("apps", "deployments", "patch")
    # Its Route and Revisions are read for status, never written.
    for resource in ("routes", "revisions"):
        assert may("serving.knative.dev", resource, "get")
        for verb in ("create", "patch", "delete", "list"):
            assert not may("serving.knative.dev", resource, verb), (resource, verb)
    for refused in (["get", "secrets", "-n", SYSTEM_NAMESPACE], ["list", "secrets", "-A"], ["create", "rolebindings", "-n", "x"],
                    ["create", "clusterroles"], ["delete", "services", "-n", "x"], ["create", "deployments", "-n", "x"],
                    ["update", "nodes"], ["create", "pods", "--subresource=exec", "-n", "x"],
                    ["delete", "persistentvolumeclaims", "-n", "x"], ["update", "pods", "-n", "x"],
                    ["create", "agentsandboxpools.agentkube.dev", "-n", "x"], ["delete", "agentsandboxpools.agentkube.dev", "-n", "x"],
                    ["create", "serviceaccounts", "--subresource=token", "-n", SYSTEM_NAMESPACE]):
        assert not can(*refused), refused


def test_a_sandbox_gets_its_pod_service_and_policy_and_reports_status(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("box", workspace={"size": "1Gi"}))
    pod = eventually(lambda: _pod(api_client, namespace, "box"), message="no pod")
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("AgentSandbox", "box", True)
    assert pod.spec.containers[0].security_context.capabilities.drop == ["ALL"]
    core, networking = CoreV1Api(api_client), NetworkingV1Api(api_client)
    # Its DNS name comes from the namespace's one headless Service (no Service of its own): hostname and
    # subdomain, as a StatefulSet's pods get theirs.
    shared = core.read_namespaced_service(sandbox.SANDBOX_SERVICE, namespace)
    assert shared.spec.cluster_ip == "None" and shared.spec.publish_not_ready_addresses
    assert shared.spec.selector == sandbox.SANDBOX_SERVICE_SELECTOR
    assert shared.spec.selector.items() <= pod.metadata.labels.items()
    assert (pod.spec.hostname, pod.spec.subdomain) == ("box", sandbox.SANDBOX_SERVICE)
    assert not [s for s in core.list_namespaced_service(namespace).items if s.metadata.name != sandbox.SANDBOX_SERVICE]
    assert core.read_namespaced_persistent_volume_claim("box-workspace", namespace).metadata.owner_references[0].name == "box"
    assert networking.read_namespaced_network_policy("box", namespace).spec.policy_types == ["Ingress", "Egress"]

    status = eventually(lambda: (_get_sandbox(api_client, namespace, "box").get("status") or {}).get("phase") and
                        _get_sandbox(api_client, namespace, "box")["status"], message="no status")
    assert status["phase"] == "Pending" and status["podName"] == "box"
    assert status["serviceFqdn"] == f"box.{sandbox.SANDBOX_SERVICE}.{namespace}.svc.cluster.local"
    assert status["observedGeneration"] == 1
    # Nothing needs cleaning up beyond owner references, so nothing blocks deletion when the operator is down.
    assert not _get_sandbox(api_client, namespace, "box")["metadata"].get("finalizers")
    _act_as_kubelet(api_client, namespace, "box", "Running", ready=True, pod_ip="10.244.0.7")
    eventually(lambda: _phase(api_client, namespace, "box") == "Running", message="never Running")
    # The real controller manager publishes the pod under its hostname in the shared Service's EndpointSlice,
    # which is what cluster DNS answers `box.agentkube-sandboxes.NS.svc.cluster.local` from.
    discovery = kubernetes.client.DiscoveryV1Api(api_client)

    def published() -> list:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={sandbox.SANDBOX_SERVICE}").items
        return [(e.hostname, e.addresses) for s in slices for e in s.endpoints or []]
    assert eventually(published, message="the pod was never published") == [("box", ["10.244.0.7"])]
    conditions = {c["type"]: c["status"] for c in _get_sandbox(api_client, namespace, "box")["status"]["conditions"]}
    assert conditions == {"Ready": "True", "Suspended": "False", "PodScheduled": "True", "ToolsEnforced": "True"}
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=box,involvedObject.kind=AgentSandbox")
    assert "PodReady" in {e.reason for e in events.items}


def test_a_name_that_cannot_be_a_pod_s_hostname_is_refused_at_admission(api_client, operator, namespace):
    """The sandbox's name is its pod's hostname, a DNS label: a longer one or one with dots is refused by the
    API server rather than leaving a sandbox whose pod can never be made."""
    for name in ("b" * 64, "a.b"):
        with pytest.raises(ApiException) as refused:
            _create_sandbox(api_client, namespace, _sandbox(name))
        assert refused.value.status == 422 and "metadata.name" in refused.value.body
    _create_sandbox(api_client, namespace, _sandbox("b" * 63))  # the longest label is fine


def test_a_sandbox_made_by_the_previous_version_keeps_its_own_service(api_client, operator, namespace, eventually):
    """Before the shared Service each sandbox had a headless Service of its own name, and its pod that name
    as subdomain. A pod's subdomain never changes: after the upgrade the status names that Service while the
    old pod lives, and the name of the shared Service once the pod is replaced. The old Service is left to
    go with its sandbox (the operator may not delete Services); it names the new pod too."""
    core = CoreV1Api(api_client)
    operator.stop()  # the previous version made what follows
    try:
        body = _create_sandbox(api_client, namespace, _sandbox("old"))
        pod = sandbox.pod_manifest(body, api.AgentSandboxSpec.model_validate(body["spec"]))
        pod["spec"]["subdomain"] = "old"
        for key in sandbox.SANDBOX_SERVICE_SELECTOR:
            del pod["metadata"]["labels"][key]
        core.create_namespaced_pod(namespace, pod)
        core.create_namespaced_service(namespace, sandbox.service_manifest(body))
        _act_as_kubelet(api_client, namespace, "old", "Running", ready=True)
        CustomObjectsApi(api_client).patch_namespaced_custom_object_status(api.GROUP, api.VERSION, namespace, SANDBOXES, "old", {
            "status": {"phase": "Running", "podName": "old", "observedGeneration": 1,
                       "serviceFqdn": f"old.{namespace}.svc.cluster.local"}})
    finally:
        operator.start()
    # The upgraded operator reconciles every sandbox at its start: this one keeps its name and Service.
    eventually(lambda: next((c for c in (_get_sandbox(api_client, namespace, "old").get("status") or {}).get("conditions") or []
                             if c["type"] == "Ready" and c["status"] == "True"), None), message="never reconciled")
    assert _get_sandbox(api_client, namespace, "old")["status"]["serviceFqdn"] == f"old.{namespace}.svc.cluster.local"
    assert core.read_namespaced_service(sandbox.SANDBOX_SERVICE, namespace).spec.cluster_ip == "None"
    # Its pod goes (a node lost, say): the new one is named through the shared Service.
    first = _pod(api_client, namespace, "old")
    core.delete_namespaced_pod("old", namespace)
    second = eventually(lambda: (p := _pod(api_client, namespace, "old")) and p.metadata.uid != first.metadata.uid and p,
                        message="the pod was not recreated")
    assert second.spec.subdomain == sandbox.SANDBOX_SERVICE
    eventually(lambda: _get_sandbox(api_client, namespace, "old")["status"]["serviceFqdn"]
               == f"old.{sandbox.SANDBOX_SERVICE}.{namespace}.svc.cluster.local", message="the status kept the old name")
    old_service = core.read_namespaced_service("old", namespace)
    assert old_service.metadata.owner_references[0].uid == body["metadata"]["uid"]
    assert old_service.spec.selector.items() <= second.metadata.labels.items()


def test_a_pod_deleted_by_someone_else_is_recreated(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("box"))
    first = eventually(lambda: _pod(api_client, namespace, "box"), message="no pod")
    CoreV1Api(api_client).delete_namespaced_pod("box", namespace)
    second = eventually(lambda: (p := _pod(api_client, namespace, "box")) and p.metadata.uid != first.metadata.uid and p,
                        message="the pod was not recreated")
    assert second.metadata.labels[sandbox.SANDBOX_LABEL] == "box"
    assert len(CoreV1Api(api_client).list_namespaced_pod(namespace).items) == 1


def test_a_pod_of_someone_else_with_the_sandboxs_name_is_never_taken_for_its_own(api_client, operator, namespace, eventually):
    """The sandbox's pod is found by name: a user's pod that only shares it must not be reported as the
    sandbox's, replaced, or deleted on suspend (as `helm test`'s own pod once was, named like its sandbox)."""
    core = CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "box"},
                                           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    _act_as_kubelet(api_client, namespace, "box", "Running", ready=True)
    _create_sandbox(api_client, namespace, _sandbox("box"))
    status = eventually(lambda: (_get_sandbox(api_client, namespace, "box").get("status") or {}).get("phase") and
                        _get_sandbox(api_client, namespace, "box")["status"], message="no status")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["reason"], status.get("podName")) == ("Pending", "PodNameTaken", None)
    _patch_sandbox(api_client, namespace, "box", {"spec": {"lifecycle": {"suspend": True}}})
    eventually(lambda: _phase(api_client, namespace, "box") == "Suspended", message="not suspended")
    assert not _pod(api_client, namespace, "box").metadata.owner_references, "the user's pod is untouched"
    # Once the name is free, the sandbox gets its own pod (the recheck finds it: no event says a foreign pod went).
    _patch_sandbox(api_client, namespace, "box", {"spec": {"lifecycle": {"suspend": False}}})
    core.delete_namespaced_pod("box", namespace, grace_period_seconds=0)
    own = eventually(lambda: (p := _pod(api_client, namespace, "box")) and p.metadata.owner_references and p, timeout=90,
                     message="the sandbox never got its own pod once the name was free")
    assert own.metadata.owner_references[0].name == "box"


def test_a_failed_pod_is_replaced_and_the_workspace_kept(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("box", workspace={"size": "1Gi"}))
    first = eventually(lambda: _pod(api_client, namespace, "box"), message="no pod")
    claim = eventually(lambda: CoreV1Api(api_client).read_namespaced_persistent_volume_claim("box-workspace", namespace))
    _act_as_kubelet(api_client, namespace, "box", "Failed", ready=False)
    replacement = eventually(lambda: (p := _pod(api_client, namespace, "box")) and p.metadata.uid != first.metadata.uid and p,
                             message="the failed pod was not replaced")
    assert replacement.spec.volumes[0].persistent_volume_claim.claim_name == "box-workspace"
    assert CoreV1Api(api_client).read_namespaced_persistent_volume_claim("box-workspace", namespace).metadata.uid == claim.metadata.uid


def test_suspend_and_resume_work_repeatedly(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("box", workspace={"size": "1Gi"}))
    eventually(lambda: _pod(api_client, namespace, "box"), message="no pod")
    claim_uid = CoreV1Api(api_client).read_namespaced_persistent_volume_claim("box-workspace", namespace).metadata.uid
    for _ in range(3):
        _patch_sandbox(api_client, namespace, "box", {"spec": {"lifecycle": {"suspend": True}}})
        eventually(lambda: _pod(api_client, namespace, "box") is None and _phase(api_client, namespace, "box") == "Suspended",
                   message="not suspended")
        _patch_sandbox(api_client, namespace, "box", {"spec": {"lifecycle": {"suspend": False}}})
        eventually(lambda: _pod(api_client, namespace, "box") is not None and _phase(api_client, namespace, "box") == "Pending",
                   message="not resumed")
    assert CoreV1Api(api_client).read_namespaced_persistent_volume_claim("box-workspace", namespace).metadata.uid == claim_uid


def test_idle_sandbox_is_suspended_and_the_next_request_resumes_it(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("box", lifecycle={"idleTimeout": "3s"}))
    eventually(lambda: _phase(api_client, namespace, "box") == "Suspended" and _pod(api_client, namespace, "box") is None,
               timeout=30, message="not suspended when idle")
    reason = next(c for c in _get_sandbox(api_client, namespace, "box")["status"]["conditions"] if c["type"] == "Suspended")
    assert reason["reason"] == "IdleTimeout"
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    _patch_sandbox(api_client, namespace, "box", {"metadata": {"annotations": {sandbox.LAST_ACTIVITY_ANNOTATION: now}}})
    eventually(lambda: _pod(api_client, namespace, "box") is not None, timeout=30, message="activity did not resume it")
    assert _get_sandbox(api_client, namespace, "box")["status"]["lastActivityTime"] == now


def test_expiry_retains_or_deletes_as_asked(api_client, operator, namespace, eventually):
    _create_sandbox(api_client, namespace, _sandbox("kept", lifecycle={"expireAfter": "3s"}, workspace={"size": "1Gi"}))
    _create_sandbox(api_client, namespace, _sandbox("gone", lifecycle={"expireAfter": "3s", "shutdownPolicy": "Delete"}))
    eventually(lambda: _phase(api_client, namespace, "kept") == "Expired" and _pod(api_client, namespace, "kept") is None,
               timeout=30, message="not expired")
    assert CoreV1Api(api_client).read_namespaced_persistent_volume_claim("kept-workspace", namespace)
    eventually(lambda: _get_sandbox(api_client, namespace, "gone") is None, timeout=30, message="not deleted at expiry")


INVALID = {
    "negative memory": ({"tools": {"default": {"memory": "-1Gi"}}}, "must be positive"),
    "not a quantity": ({"tools": {"default": {"cpu": "lots"}}}, "must be a Kubernetes quantity"),
    "profile over the envelope": ({"tools": {"profiles": {"test": {"memory": "8Gi"}}}},
                                  "a tool profile in spec.tools.profiles asks for more memory than the sandbox allows"),
    "default over the envelope": ({"tools": {"default": {"memory": "2Gi"}}}, "spec.tools.default.memory may not exceed"),
    "malformed CIDR": ({"tools": {"default": {"network": {"egress": "explicit", "allow": [{"cidr": "10.0.0.300/8"}]}}}},
                       "must be a CIDR"),
    "allow without explicit": ({"tools": {"default": {"network": {"egress": "none", "allow": [{"cidr": "10.0.0.0/8"}]}}}},
                               "allow lists the rules of egress: explicit"),
    "bad profile name": ({"tools": {"profiles": {"Not_A_Label": {}}}}, "keys must be DNS labels"),
    "bad duration": ({"lifecycle": {"idleTimeout": "10 minutes"}}, "spec.lifecycle.idleTimeout"),
    "unknown field": ({"tools": {"default": {"memroy": "1Gi"}}}, 'unknown field "spec.tools.default.memroy"'),
    "template and pool": ({"pool": "py"}, "set spec.template, or spec.pool to take a warm sandbox of that pool, not both"),
    "env without a pool": ({"env": [{"name": "A", "value": "1"}]}, "spec.env is for sandboxes from a pool"),
}
INVALID_MODELS = {
    "unknown policy": ({"policy": "magic"}, 'Unsupported value: "magic"'),
    "minScale over maxScale": ({"minScale": 5, "maxScale": 2}, "minScale may not exceed maxScale"),
    "fixed without replicas": ({"policy": "fixed"}, "policy fixed runs exactly minScale = maxScale > 0 replicas"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_kubectl_apply_rejects_an_invalid_sandbox_with_a_specific_message(installed, kubectl, case):
    spec, message = INVALID[case]
    body = _sandbox("bad", **spec)
    result = kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("case", INVALID_MODELS, ids=list(INVALID_MODELS))
def test_kubectl_apply_rejects_an_invalid_served_model_with_a_specific_message(installed, kubectl, case):
    autoscaling, message = INVALID_MODELS[case]
    body = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": "bad"},
            "spec": {"model": {"name": "m"}, "image": "i", "autoscaling": autoscaling}}
    result = kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_examples_are_valid(installed, kubectl):
    for example in ("sandbox.yaml", "servedmodel.yaml", "pool.yaml"):
        kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(REPO / "examples" / example))


def test_served_model_waits_for_knative_then_becomes_a_knative_service(api_client, operator, kubectl, namespace, eventually):
    custom = CustomObjectsApi(api_client)
    kubectl("delete", "-f", str(knative.crds_file()), "--ignore-not-found", "--wait=true")
    body = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": "llm"},
            "spec": {"model": {"name": "llama"}, "image": "vllm", "autoscaling": {"target": 8, "maxScale": 4}}}
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", body)

    def condition(kind: str) -> dict | None:
        status = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm").get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == kind), None)

    missing = eventually(lambda: condition("KnativeAvailable"), message="no condition about Knative")
    assert missing["status"] == "False" and missing["reason"] == "KnativeNotInstalled"

    install_knative_crds(kubectl)
    eventually(lambda: (c := condition("KnativeAvailable")) and c["status"] == "True", timeout=120,
               message="the ServedModel was not retried once Knative appeared")
    service = custom.get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", "llm")
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/target"] == "8"
    assert annotations["autoscaling.knative.dev/max-scale"] == "4"
    assert service["metadata"]["ownerReferences"][0]["name"] == "llm"

    # Knative's controller would report readiness; here the test plays it, and the status follows.
    custom.patch_namespaced_custom_object_status("serving.knative.dev", "v1", namespace, "services", "llm", {"status": {
        "url": f"http://llm.{namespace}.example.com", "conditions": [{"type": "Ready", "status": "True"}]}})
    status = eventually(lambda: (s := custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", "llm")
                                 .get("status", {})).get("ready") and s, message="readiness not mirrored")
    assert status["url"] == f"http://llm.{namespace}.example.com" and status["concurrencyTarget"] == 8


def _get(url: str) -> str | None:
    try:
        response = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return None  # not listening yet
    return response.text if response.ok else None


def test_metrics_and_liveness_endpoints(operator, api_client, namespace, eventually):
    eventually(lambda: _get(f"http://127.0.0.1:{operator.liveness_port}/healthz") is not None, message="liveness probe fails")
    _create_sandbox(api_client, namespace, _sandbox("box"))
    metrics = eventually(lambda: (text := _get(f"http://127.0.0.1:{operator.metrics_port}/metrics"))
                         and 'agentkube_operator_reconciles_total{kind="AgentSandbox",result="success"}' in text and text,
                         message="no reconcile metrics")
    assert 'agentkube_operator_reconcile_seconds_bucket{kind="AgentSandbox"' in metrics
    assert '"box"' not in metrics  # labels never carry object names


def test_a_second_replica_stands_by_while_the_first_is_active(installed, operator, api_client, namespace, eventually, tmp_path):
    standby = Operator(installed, tmp_path)
    standby.start()
    try:
        logs = lambda: operator.log_path.read_text() + standby.log_path.read_text()  # noqa: E731
        eventually(lambda: "Pausing operations in favour of" in logs(), timeout=60, message="neither replica paused")
        assert logs().count("Pausing operations in favour of") == 1  # exactly one stands by
        _create_sandbox(api_client, namespace, _sandbox("box"))
        eventually(lambda: _phase(api_client, namespace, "box") == "Pending", message="the active replica did not reconcile")
        assert len(CoreV1Api(api_client).list_namespaced_pod(namespace).items) == 1
    finally:
        standby.stop()


def test_operator_killed_mid_creation_converges_to_one_pod_per_sandbox(api_client, operator, namespace, eventually):
    count = 50
    creator = threading.Thread(target=lambda: [_create_sandbox(api_client, namespace, _sandbox(f"box-{i}")) for i in range(count)])
    creator.start()
    core = CoreV1Api(api_client)
    eventually(lambda: len(core.list_namespaced_pod(namespace).items) >= 5, interval=0.05, message="the operator made no pods")
    operator.kill()  # in the middle: some sandboxes have pods, some are half-done, some not even created yet
    killed_with = len(core.list_namespaced_pod(namespace).items)
    creator.join()
    operator.start()
    eventually(lambda: len(core.list_namespaced_pod(namespace).items) == count, timeout=180,
               message="not every sandbox got its pod after the restart")
    pods = core.list_namespaced_pod(namespace).items
    owners = [p.metadata.owner_references[0].name for p in pods]
    assert sorted(owners) == sorted(f"box-{i}" for i in range(count))  # exactly one each
    eventually(lambda: all(_phase(api_client, namespace, f"box-{i}") == "Pending" for i in range(count)),
               message="status did not converge")
    assert killed_with < count, "the operator finished before it was killed: the test did not test a restart mid-way"


def test_the_whole_chart_lints_renders_and_is_accepted_by_the_api_server(installed, kubectl):
    helm = str(bin_dir() / "helm")
    lint = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = helm_template()
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    kinds = {doc["kind"] for doc in documents}
    # Role and RoleBinding: kube-dns, and `helm test`'s; Pod: `helm test`; ConfigMaps: the dashboards (on by
    # default; ServiceMonitors and the PrometheusRule are off by default: they need the Prometheus Operator);
    # Service: the gateway's; Secret: the runtime key the operator and the gateway share.
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Deployment", "DaemonSet",
                     "Role", "RoleBinding", "Pod", "CSIDriver", "ConfigMap", "Service", "Secret"}
    # What `helm install` creates; `helm test`'s hooks (a pod whose service account is another hook) are
    # created by `helm test`, which the chart's e2e test runs.
    installed = [doc for doc in documents if "helm.sh/hook" not in (doc["metadata"].get("annotations") or {})]
    kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(installed))
    # values.schema.json guards the values a user can set.
    refused = subprocess.run([helm, "template", "agentkube", str(CHART), "--set", "operator.replicas=0"], capture_output=True, text=True)
    assert refused.returncode != 0 and "replicas" in refused.stderr


# Every form of the Kubernetes quantity grammar, as the API server admits it in an AgentSandbox, must reach
# the node agent intact: the bytes and cores it enforces are what Kubernetes makes of the same text.
QUANTITY_FORMS = [("1Gi", "1"), ("1.5Gi", "1.5"), (".5Gi", "500m"), ("129e6", "250m"), ("500000k", "0.1"), ("2G", "2"),
                  ("1073741824", "1e0"), ("1E9", "1500m"), ("0.5Gi", "+1")]


def test_every_quantity_the_api_server_admits_reaches_the_node_agent_intact(api_client, operator, namespace, eventually):
    from agentkube.contract import CallIntent, quantity_bytes, quantity_cores, resolve_limits
    from agentkube.ebpf.kubernetes import sandbox_spec

    for i, (memory, cpu) in enumerate(QUANTITY_FORMS):
        _create_sandbox(api_client, namespace, _sandbox(f"q{i}", template={
            "image": "busybox", "resources": {"limits": {"memory": memory, "cpu": cpu}}},
            tools={"default": {"memory": memory, "cpu": cpu, "timeout": "45m30s"}}))
    for i, (memory, cpu) in enumerate(QUANTITY_FORMS):
        pod = eventually(lambda i=i: _pod(api_client, namespace, f"q{i}"), message=f"no pod for {memory}")
        running = api_client.sanitize_for_serialization(pod)
        running["status"] = {"qosClass": "Burstable", "containerStatuses": [
            {"name": sandbox.CONTAINER_NAME, "state": {"running": {}}, "containerID": "containerd://" + "a" * 64}]}
        spec = sandbox_spec(running)
        envelope = spec.envelope.envelope()
        assert (envelope.memory, envelope.cpu) == (quantity_bytes(memory), quantity_cores(cpu)), (memory, cpu)
        defaults = resolve_limits(CallIntent(), [], spec.tools, envelope).limits
        assert (defaults.memory, defaults.cpu, defaults.timeout) == (quantity_bytes(memory), quantity_cores(cpu), 2730)


def test_quantities_the_api_server_refuses_the_contract_refuses_too(api_client, installed, namespace):
    from agentkube.contract import quantity_bytes

    for memory in ("1.5.5Gi", "5Xi", "-1Gi", "0", "Gi"):
        with pytest.raises(ApiException) as refused:
            template = {"image": "busybox", "resources": {"limits": {"memory": memory}}}
            _create_sandbox(api_client, namespace, _sandbox("bad", template=template))
        assert refused.value.status == 422, memory
        with pytest.raises(ValueError):
            quantity_bytes(memory)


def test_a_refusal_by_the_node_agent_becomes_the_tools_enforced_condition(api_client, operator, namespace, eventually):
    def tools_enforced():
        conditions = (_get_sandbox(api_client, namespace, "refused").get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "ToolsEnforced"), None)

    _create_sandbox(api_client, namespace, _sandbox("refused"))
    eventually(lambda: (tools_enforced() or {}).get("status") == "True", message="no ToolsEnforced=True")
    # What the node agent writes when it cannot honour the sandbox's tool intent (see agentkube.ebpf.kubernetes).
    refusal = {sandbox.TOOLS_REFUSED_ANNOTATION: "default.memory: lots"}
    _patch_sandbox(api_client, namespace, "refused", {"metadata": {"annotations": refusal}})
    condition = eventually(lambda: (tools_enforced() or {}).get("status") == "False" and tools_enforced(), message="never refused")
    assert condition["reason"] == "ToolIntentRefused" and "default.memory: lots" in condition["message"]
    _patch_sandbox(api_client, namespace, "refused", {"metadata": {"annotations": {sandbox.TOOLS_REFUSED_ANNOTATION: None}}})
    eventually(lambda: (tools_enforced() or {}).get("status") == "True", message="refusal never cleared")


def test_without_karpenter_spot_placement_falls_back_to_capacity_labels_with_a_condition(api_client, operator, kubectl, namespace,
                                                                                          eventually):
    """No Karpenter CRDs here: a spot-enabled model prefers spot nodes by the managed services' labels and
    says that it has no on-demand base or split; spot off keeps its pods off spot nodes."""
    custom = CustomObjectsApi(api_client)
    install_knative_crds(kubectl)
    for name, spot in (("spotty", {"enabled": True}), ("steady", {"enabled": False})):
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", {
            "apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": name},
            "spec": {"model": {"name": "llama"}, "image": "vllm", "capacity": {"spot": spot}}})

    def capacity_condition(name: str) -> dict | None:
        status = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", name).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Capacity"), None)

    def knative_service(name: str) -> dict | None:
        try:
            return custom.get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", name)
        except ApiException as error:
            if error.status == 404:
                return None  # the Capacity condition is written before the Service is applied
            raise

    fallback = eventually(lambda: capacity_condition("spotty"), timeout=60, message="no Capacity condition")
    assert (fallback["status"], fallback["reason"]) == ("False", "KarpenterNotInstalled")
    pod_spec = eventually(lambda: knative_service("spotty"), timeout=60)["spec"]["template"]["spec"]
    preferred = pod_spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert {"karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType", "cloud.google.com/gke-spot",
            "kubernetes.azure.com/scalesetpriority"} == {p["preference"]["matchExpressions"][0]["key"] for p in preferred}

    disabled = eventually(lambda: capacity_condition("steady"), timeout=60, message="no Capacity condition")
    assert (disabled["status"], disabled["reason"]) == ("True", "SpotDisabled")
    pod_spec = eventually(lambda: knative_service("steady"), timeout=60)["spec"]["template"]["spec"]
    required = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"operator": "NotIn", "key": "karpenter.sh/capacity-type", "values": ["spot"]} in required[0]["matchExpressions"]
