"""What must outlive what, on the real node: a sandbox's workspace outlives its pods (suspend/resume, a
pod lost and replaced), on a volume that local-path-provisioner made; and sandboxes, their call records
and reconciling outlive kube-apiserver going away for a minute."""

import json
import os
import time

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi, StorageV1Api

from agentkube.client import Sandbox
from agentkube.contract import SANDBOX_LABEL, TOOL_CALLS_ANNOTATION
from agentkube.devenv import images, localpath
from agentkube.operator import api, sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a node needs root (cgroups, network namespaces, mounts)")

SANDBOX = {
    "template": {"image": images.SANDBOX_IMAGE,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}},
    "tools": {"default": {"memory": "128Mi", "cpu": "1", "pids": 64, "timeout": "1m", "network": {"egress": "none"}}},
}
# As the issue asks: a minute, long enough for every client's watch and keep-alive to notice and to back off
# more than once (Kopf's and the kubernetes client's retries, the kubelet's node lease).
APISERVER_DOWN_SECONDS = 60


def _sandbox(api_client, namespace: str, name: str) -> dict:
    return CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "agentsandboxes", name)


def _status(api_client, namespace: str, name: str) -> dict:
    return _sandbox(api_client, namespace, name).get("status") or {}


def _apply(kubectl, namespace: str, name: str, spec: dict) -> None:
    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": name}, "spec": spec}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def _running_pod_uid(api_client, namespace: str, name: str, not_uid: str | None = None) -> str | bool:
    """The uid of the sandbox's pod once the sandbox is Running on it (and it is not `not_uid`)."""
    if _status(api_client, namespace, name).get("phase") != "Running":
        return False
    pods = CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=f"{SANDBOX_LABEL}={name}").items
    uids = [p.metadata.uid for p in pods if p.metadata.deletion_timestamp is None and p.status.phase == "Running"]
    return uids[0] if len(uids) == 1 and uids[0] != not_uid else False


def test_local_path_is_the_default_storage_class(api_client):
    storage_class = StorageV1Api(api_client).read_storage_class(localpath.STORAGE_CLASS)
    assert storage_class.provisioner == localpath.PROVISIONER_NAME
    assert storage_class.volume_binding_mode == "WaitForFirstConsumer"
    assert storage_class.metadata.annotations["storageclass.kubernetes.io/is-default-class"] == "true"


def test_a_workspace_is_a_bound_volume_whose_data_survives_suspend_resume_and_a_lost_pod(
        devenv, operator, api_client, kubectl, namespace, eventually):
    spec = {**SANDBOX, "workspace": {"size": "64Mi"}}  # no class named: the default (local-path) provisions it
    _apply(kubectl, namespace, "ws", spec)
    first = eventually(lambda: _running_pod_uid(api_client, namespace, "ws"), timeout=180, message="sandbox Running")
    claim = CoreV1Api(api_client).read_namespaced_persistent_volume_claim(sandbox.workspace_claim_name("ws"), namespace)
    assert claim.status.phase == "Bound" and claim.spec.storage_class_name == localpath.STORAGE_CLASS
    volume = CoreV1Api(api_client).read_persistent_volume(claim.spec.volume_name)
    # The volume is a directory under the environment's directory: `dev down` takes it with everything else.
    volume_dir = volume.spec.host_path.path
    assert volume_dir.startswith(str(localpath.data_dir(devenv.layout.node.root)) + "/")

    client = Sandbox("ws", namespace)
    wrote = client.run(["sh", "-c", "mkdir -p /workspace/src && echo kept > /workspace/src/note"])
    assert wrote.exit_code == 0, wrote
    assert open(os.path.join(volume_dir, "src", "note")).read() == "kept\n", "the tool call wrote to the volume"

    kubectl("patch", "-n", namespace, "agentsandbox/ws", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":true}}}')
    eventually(lambda: _status(api_client, namespace, "ws").get("phase") == "Suspended", timeout=60, message="Suspended")
    eventually(lambda: not CoreV1Api(api_client).list_namespaced_pod(namespace).items, timeout=60, message="pod gone")
    kubectl("patch", "-n", namespace, "agentsandbox/ws", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":false}}}')
    second = eventually(lambda: _running_pod_uid(api_client, namespace, "ws", not_uid=first), timeout=120,
                        message="Running again on a new pod")
    assert Sandbox("ws", namespace).run(["cat", "/workspace/src/note"]).stdout == "kept\n"
    assert Sandbox("ws", namespace).run(["sh", "-c", "echo more >> /workspace/src/note"]).exit_code == 0

    # The pod is lost (deleted under the operator's feet): the operator makes another, on the same claim.
    CoreV1Api(api_client).delete_namespaced_pod("ws", namespace, grace_period_seconds=0)
    eventually(lambda: _running_pod_uid(api_client, namespace, "ws", not_uid=second), timeout=120,
               message="a replacement pod Running")
    assert Sandbox("ws", namespace).run(["cat", "/workspace/src/note"]).stdout == "kept\nmore\n"
    after = CoreV1Api(api_client).read_namespaced_persistent_volume_claim(sandbox.workspace_claim_name("ws"), namespace)
    assert after.spec.volume_name == claim.spec.volume_name, "the same volume throughout"


def _audited_calls(devenv, namespace: str, name: str) -> list[dict]:
    log = devenv.layout.node.root / "node-agent" / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r["namespace"] == namespace and r["sandbox"] == name]


def _reported_calls(api_client, namespace: str, name: str) -> tuple[int, int]:
    """(calls in the node agent's annotation, calls in the operator's status)."""
    body = _sandbox(api_client, namespace, name)
    annotation = json.loads((body["metadata"].get("annotations") or {}).get(TOOL_CALLS_ANNOTATION) or "{}")
    return annotation.get("calls", 0), ((body.get("status") or {}).get("toolCalls") or {}).get("calls", 0)


def test_sandboxes_call_records_and_reconciling_survive_the_api_server_going_away(
        devenv, operator, api_client, kubectl, namespace, eventually):
    _apply(kubectl, namespace, "steady", SANDBOX)
    pod_uid = eventually(lambda: _running_pod_uid(api_client, namespace, "steady"), timeout=180, message="Running")
    client = Sandbox("steady", namespace)
    for word in ("one", "two", "three"):
        assert client.run(["echo", word]).stdout == f"{word}\n"
    eventually(lambda: _reported_calls(api_client, namespace, "steady") == (3, 3), timeout=90,
               message="3 calls reported by the node agent and mirrored by the operator")

    devenv.stop_apiserver()
    # The node keeps serving while the API is away: a call runs (the runtime and node agent need no API
    # server for it), and its record must reach the AgentSandbox once the API is back.
    assert client.run(["echo", "during"]).stdout == "during\n"
    time.sleep(APISERVER_DOWN_SECONDS)
    devenv.start_apiserver()

    # Nothing lost: the object, its pod, every call in the audit log and, once reported, in the object.
    assert len(_audited_calls(devenv, namespace, "steady")) == 4
    eventually(lambda: _reported_calls(api_client, namespace, "steady") == (4, 4), timeout=120,
               message="the call made during the outage reported and mirrored")
    # The node's lease went stale while the API was away, so the node lifecycle controller marks it (and the
    # pod's readiness) not ready until the kubelet reports again: the same pod is Running again, never
    # replaced or evicted (the controller evicts nothing when every node is not ready). The kubelet was seen
    # to take 70-90 s after the API returned to report the pod Ready again; the operator must then notice,
    # although the not-ready state may have reached it only through Kopf's re-listing (operator/sandbox.py,
    # PodViews).
    eventually(lambda: _running_pod_uid(api_client, namespace, "steady") == pod_uid, timeout=300,
               message="the same pod Running again")
    assert client.run(["echo", "after"]).stdout == "after\n"
    eventually(lambda: _reported_calls(api_client, namespace, "steady") == (5, 5), timeout=90,
               message="a call after the outage reported")

    # Reconciling resumes by itself: a change applied now is acted on (suspend, then a new sandbox).
    kubectl("patch", "-n", namespace, "agentsandbox/steady", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":true}}}')
    eventually(lambda: _status(api_client, namespace, "steady").get("phase") == "Suspended", timeout=90,
               message="a suspend applied after the outage reconciled")
    _apply(kubectl, namespace, "fresh", SANDBOX)
    eventually(lambda: _running_pod_uid(api_client, namespace, "fresh"), timeout=180,
               message="a sandbox created after the outage Running")
    assert Sandbox("fresh", namespace).run(["echo", "new"]).stdout == "new\n"
    eventually(lambda: _reported_calls(api_client, namespace, "fresh") == (1, 1), timeout=90,
               message="the new sandbox's call reported")


def test_dev_down_removes_the_volumes(devenv):
    volumes = localpath.data_dir(devenv.layout.node.root)
    devenv.down()
    assert not volumes.exists() and not devenv.layout.root.exists()
