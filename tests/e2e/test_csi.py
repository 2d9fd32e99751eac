"""The node agent's socket reaches sandbox pods through its CSI node plugin, so that sandboxes run in a
namespace that enforces the Pod Security `baseline` standard; on the real node, with the real kubelet
calling the plugin, and the real admission plugin judging the pods."""

import json
import os

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi, StorageV1Api

from agentkube.client import Sandbox
from agentkube.contract import CSI_DRIVER, SANDBOX_AGENT_SOCKET, SANDBOX_LABEL
from agentkube.devenv import images, localnode, node
from agentkube.operator import api, sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a node needs root (cgroups, network namespaces, mounts)")

SANDBOX = {
    "template": {"image": images.SANDBOX_IMAGE,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}},
    "tools": {"default": {"memory": "128Mi", "cpu": "1", "pids": 64, "timeout": "1m", "network": {"egress": "none"}}},
}
BASELINE = {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "latest"}


def _pod(name: str, volume: dict, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": images.SANDBOX_IMAGE, "imagePullPolicy": "Never",
                        "command": ["sleep", "infinity"],
                        "volumeMounts": [{"name": "agent", "mountPath": "/agent", "readOnly": True}]}],
        "volumes": [{"name": "agent", **volume}]}}


def _csi_mounts(kubelet_root) -> list[str]:
    return [point for point in localnode.mounts_under(kubelet_root / "pods") if "/kubernetes.io~csi/" in point]


@pytest.fixture
def baseline_namespace(kubectl, namespace):
    kubectl("label", "namespace", namespace, *(f"{key}={value}" for key, value in BASELINE.items()))
    return namespace


def test_the_node_agent_registers_its_csi_driver_with_the_kubelet(api_client, eventually):
    def registered():
        drivers = StorageV1Api(api_client).read_csi_node(node.NODE_NAME).spec.drivers or []
        return next((d for d in drivers if d.name == CSI_DRIVER), None)

    driver = eventually(registered, timeout=60, message=f"{CSI_DRIVER} in the CSINode of {node.NODE_NAME}")
    assert driver.node_id == node.NODE_NAME
    assert StorageV1Api(api_client).read_csi_driver(CSI_DRIVER).spec.volume_lifecycle_modes == ["Ephemeral"]


def test_a_sandbox_runs_under_the_baseline_standard_and_calls_reach_the_agent_through_the_csi_volume(
        devenv, operator, api_client, kubectl, baseline_namespace, eventually):
    namespace = baseline_namespace
    # The namespace really enforces baseline: the hostPath that sandbox pods used to need is refused.
    refused = kubectl("apply", "-n", namespace, "-f", "-", check=False, input=json.dumps(
        _pod("host-path", {"hostPath": {"path": str(SANDBOX_AGENT_SOCKET.parent), "type": "Directory"}})))
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr and "hostPath" in refused.stderr

    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "box"}, "spec": SANDBOX}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: _phase(api_client, namespace, "box") == "Running", timeout=120, message="sandbox Running")
    pod = CoreV1Api(api_client).read_namespaced_pod("box", namespace)
    volume = next(v for v in pod.spec.volumes if v.name == sandbox.AGENT_VOLUME)
    assert volume.csi.driver == CSI_DRIVER and volume.csi.read_only and volume.host_path is None

    client = Sandbox("box", namespace)
    result = client.run(["sh", "-c", f"grep ' {SANDBOX_AGENT_SOCKET.parent} ' /proc/self/mountinfo; "
                                     f"ls {SANDBOX_AGENT_SOCKET.parent}; touch {SANDBOX_AGENT_SOCKET.parent}/x"])
    mount, listing, error = result.stdout.splitlines()[0], result.stdout.splitlines()[1:], result.stderr
    assert " ro," in mount or mount.split()[5].startswith("ro"), mount  # the mount's own options: read-only
    assert listing == [SANDBOX_AGENT_SOCKET.name], "the volume carries the sandbox socket and nothing else"
    assert result.exit_code != 0 and "Read-only file system" in error, result
    assert client.run(["echo", "through the CSI volume"]).stdout == "through the CSI volume\n"

    # The kubelet unpublishes the volume with the pod: no mount of the socket directory is left behind.
    kubectl("delete", "-n", namespace, "agentsandbox/box", "--wait=true", "--timeout=60s")
    eventually(lambda: not CoreV1Api(api_client).list_namespaced_pod(namespace).items, timeout=60, message="pod gone")
    eventually(lambda: not [p for p in _csi_mounts(devenv.layout.node.kubelet_root) if pod.metadata.uid in p],
               timeout=60, message="the pod's CSI mount removed")


def _phase(api_client, namespace: str, name: str) -> str | None:
    body = CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "agentsandboxes", name)
    return (body.get("status") or {}).get("phase")


def _mount_failures(kubectl, namespace: str, pod: str) -> str:
    events = json.loads(kubectl("get", "events", "-n", namespace, "--field-selector",
                                f"involvedObject.name={pod},reason=FailedMount", "-o", "json").stdout)
    return "\n".join(event["message"] for event in events["items"])


def test_a_pod_that_is_no_sandbox_gets_no_socket(devenv, api_client, kubectl, baseline_namespace, eventually):
    namespace = baseline_namespace
    pods = {
        # an ordinary pod asking for the volume
        "intruder": (_pod("intruder", {"csi": {"driver": CSI_DRIVER, "readOnly": True}}), "not an agentkube sandbox"),
        # one that wears the sandbox label, but no AgentSandbox controls it
        "impostor": (_pod("impostor", {"csi": {"driver": CSI_DRIVER, "readOnly": True}}, {SANDBOX_LABEL: "x"}),
                     "not controlled by an AgentSandbox"),
        # one that asks for it writable, or with attributes of its own
        "writer": (_pod("writer", {"csi": {"driver": CSI_DRIVER}}), "readOnly: true"),
        "attributes": (_pod("attributes", {"csi": {"driver": CSI_DRIVER, "readOnly": True,
                                                   "volumeAttributes": {"path": "/etc"}}}), "takes no attributes"),
    }
    for manifest, _ in pods.values():
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))  # admitted: csi volumes are baseline
    for name, (_, why) in pods.items():
        failures = eventually(lambda name=name, why=why: why in (text := _mount_failures(kubectl, namespace, name)) and text,
                              timeout=90, message=f"pod {name}: FailedMount saying {why!r}")
        assert ("PermissionDenied" in failures or "InvalidArgument" in failures), failures
        pod = CoreV1Api(api_client).read_namespaced_pod(name, namespace)
        assert pod.status.phase == "Pending" and not any(s.state.running for s in pod.status.container_statuses or [])
    uids = {CoreV1Api(api_client).read_namespaced_pod(name, namespace).metadata.uid for name in pods}
    assert not [p for p in _csi_mounts(devenv.layout.node.kubelet_root) if any(uid in p for uid in uids)]
    kubectl("delete", "-n", namespace, "pods", "--all", "--wait=true", "--timeout=60s")
