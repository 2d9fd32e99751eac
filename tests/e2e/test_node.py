"""Through the real parts: pods on a real kubelet with containerd and runc, an AgentSandbox from
`kubectl apply` to Running, and tool calls through the SDK into the sandbox pod's runtime, each placed
by the node agent (Kubernetes mode) in its own cgroup under the container's."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from kubernetes.client import CoreV1Api, CustomObjectsApi, NetworkingV1Api

from agentkube.client import Sandbox
from agentkube.devenv import DevEnv, images, localnode, node
from agentkube.devenv.cluster import sweep_abandoned
from agentkube.devenv.versions import bin_dir
from agentkube.operator import api

MEMORY_V1 = Path("/sys/fs/cgroup/memory")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a node needs root (cgroups, network namespaces, mounts)")


def _pod_manifest(name: str) -> dict:
    server = "import http.server as h; print('serving', flush=True); " \
             "h.HTTPServer(('0.0.0.0', 8080), h.SimpleHTTPRequestHandler).serve_forever()"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "web", "image": images.SANDBOX_IMAGE, "imagePullPolicy": "Never",
                        "command": ["python3", "-u", "-c", server], "workingDir": "/etc"}]}}


def _cgroup_dirs(pod_uid: str) -> list[Path]:
    """The pod's cgroup directories in every hierarchy the kubelet made them in."""
    return [path for path in localnode.CGROUP_ROOT.glob(f"*/{localnode.KUBEPODS}/**/pod{pod_uid}")]


def test_node_is_ready_and_reports_containerd(kubectl):
    described = json.loads(kubectl("get", "node", node.NODE_NAME, "-o", "json").stdout)
    ready = next(c for c in described["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert described["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": node.NODE_IP} in described["status"]["addresses"]


def test_a_plain_pod_runs_answers_logs_exec_and_port_forward_and_leaves_nothing_when_deleted(
        devenv, kubectl, namespace, eventually):
    netns_before = set(node.NETNS_DIR.iterdir()) if node.NETNS_DIR.is_dir() else set()
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pod_manifest("web")))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/web", "--timeout=120s")
    pod = json.loads(kubectl("get", "-n", namespace, "pod/web", "-o", "json").stdout)
    uid, ip = pod["metadata"]["uid"], pod["status"]["podIP"]
    assert pod["spec"]["nodeName"] == node.NODE_NAME and ip.startswith(node.POD_SUBNET.rsplit(".", 1)[0])
    assert _cgroup_dirs(uid), "the kubelet made the pod's cgroups"

    eventually(lambda: "serving" in kubectl("logs", "-n", namespace, "web").stdout, message="the pod's log")
    assert kubectl("exec", "-n", namespace, "web", "--", "cat", "/etc/debian_version").stdout.strip()
    # Pods reach nothing beyond this machine: no default route.
    probe = kubectl("exec", "-n", namespace, "web", "--", "python3", "-c",
                    "import socket; socket.create_connection(('192.0.2.1', 80), timeout=2)", check=False)
    assert "Network is unreachable" in probe.stderr

    forward = subprocess.Popen([str(bin_dir() / "kubectl"), "port-forward", "-n", namespace, "pod/web", ":8080"],
                               env=devenv.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = re.search(r"127\.0\.0\.1:(\d+)", forward.stdout.readline()).group(1)
        assert requests.get(f"http://127.0.0.1:{port}/debian_version", timeout=10).status_code == 200
    finally:
        forward.terminate()
        forward.wait(timeout=10)

    kubectl("delete", "-n", namespace, "pod/web", "--wait=true", "--timeout=60s")
    eventually(lambda: not _cgroup_dirs(uid), timeout=60, message="the pod's cgroups removed")
    eventually(lambda: (set(node.NETNS_DIR.iterdir()) if node.NETNS_DIR.is_dir() else set()) <= netns_before,
               timeout=60, message="the pod's network namespace removed")


SANDBOX = {
    "template": {"image": images.SANDBOX_IMAGE,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}},
    "tools": {"default": {"memory": "128Mi", "cpu": "1", "pids": 64, "timeout": "1m", "network": {"egress": "none"}},
              "profiles": {"probe": {"memory": "96Mi", "pids": 16}}},
}


def _sandbox(api_client, namespace: str, name: str) -> dict:
    return CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "agentsandboxes", name)


def _phase(api_client, namespace: str, name: str) -> str | None:
    return (_sandbox(api_client, namespace, name).get("status") or {}).get("phase")


def test_agent_sandbox_runs_on_the_node_suspends_and_resumes(operator, api_client, kubectl, namespace, eventually):
    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "box"}, "spec": SANDBOX}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: _phase(api_client, namespace, "box") == "Running", timeout=120, message="sandbox Running")
    status = _sandbox(api_client, namespace, "box")["status"]
    assert status["nodeName"] == node.NODE_NAME and status["podName"] == "box"
    pod = CoreV1Api(api_client).read_namespaced_pod("box", namespace)
    assert pod.status.phase == "Running" and pod.spec.node_name == node.NODE_NAME
    # The policy object is there; enforcing it takes a policy-capable CNI (see README).
    assert NetworkingV1Api(api_client).read_namespaced_network_policy("box", namespace)
    # Right after Running: the SDK waits the moment it takes the node agent to register the pod.
    assert Sandbox("box", namespace).run(["true"]).exit_code == 0

    kubectl("patch", "-n", namespace, "agentsandbox/box", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":true}}}')
    eventually(lambda: _phase(api_client, namespace, "box") == "Suspended", timeout=60, message="sandbox Suspended")
    eventually(lambda: not CoreV1Api(api_client).list_namespaced_pod(namespace).items, timeout=60, message="pod gone")

    kubectl("patch", "-n", namespace, "agentsandbox/box", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":false}}}')
    eventually(lambda: _phase(api_client, namespace, "box") == "Running", timeout=120, message="sandbox Running again")
    assert Sandbox("box", namespace).run(["echo", "back"]).stdout == "back\n"


def test_a_tool_call_runs_in_its_own_cgroup_and_only_it_is_oom_killed(operator, api_client, kubectl, namespace, eventually):
    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "agent"}, "spec": SANDBOX}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: _phase(api_client, namespace, "agent") == "Running", timeout=120, message="sandbox Running")
    client = Sandbox("agent", namespace)
    pod = CoreV1Api(api_client).read_namespaced_pod("agent", namespace)
    container_id = pod.status.container_statuses[0].container_id.split("://")[1]

    where = client.run(["cat", "/proc/self/cgroup"], profile="probe")  # the AgentSandbox's own profile
    memory_path = next(line.split(":", 2)[2] for line in where.stdout.splitlines() if line.split(":")[1] == "memory")
    container_path, call = memory_path.rsplit("/", 1)
    assert container_path.endswith(f"pod{pod.metadata.uid}/{container_id}") and call.startswith("call-")
    assert where.limits.memory == 96 * 2**20 and where.limits.pids == 16 and where.sources["memory"] == "profile"

    hog = client.run(["python3", "-c", "block = bytearray(400 * 2**20); print(len(block))"], memory="64Mi")
    assert hog.signal == 9 and hog.usage.oom_kills >= 1, hog
    assert hog.usage.peak_memory_bytes <= 64 * 2**20

    # The container's own processes (the runtime) are untouched: it answers, and was never restarted.
    assert client.run(["echo", "still here"]).stdout == "still here\n"
    pod = CoreV1Api(api_client).read_namespaced_pod("agent", namespace)
    assert pod.status.container_statuses[0].restart_count == 0 and pod.status.phase == "Running"
    container_cgroup = MEMORY_V1 / container_path.lstrip("/")
    assert not any(p.name.startswith("call-") for p in container_cgroup.iterdir()), "call cgroups removed"
    # The node agent reports the calls' activity and totals; the operator mirrors them into status (the
    # activity is what idleTimeout measures from).
    def reported():
        status = _sandbox(api_client, namespace, "agent").get("status") or {}
        return status.get("lastActivityTime") and status.get("toolCalls", {}).get("calls", 0) >= 3 and status

    status = eventually(reported, timeout=90, message="status.lastActivityTime and toolCalls from the node agent")
    assert status["toolCalls"]["oomKilled"] == 1 and status["toolCalls"]["failed"] == 1


def test_a_second_node_is_refused_and_leaves_the_first_running(devenv, kubectl, tmp_path):
    second = DevEnv(tmp_path / "second", tie_to_parent=True, with_prometheus=False, with_node=True)
    with pytest.raises(localnode.NodeError, match=str(devenv.layout.root)):
        second.up()
    assert not (tmp_path / "second").exists()
    assert subprocess.run(["ip", "link", "show", node.BRIDGE], capture_output=True).returncode == 0
    ready = kubectl("get", "node", node.NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
    assert ready.stdout == "True"


def test_dev_down_leaves_no_container_mount_namespace_bridge_or_process(devenv):
    root, socket = devenv.layout.root, str(devenv.layout.node.containerd_socket)
    devenv.down()
    assert not root.exists()
    assert not localnode.mounts_under(root)
    assert subprocess.run(["ip", "link", "show", node.BRIDGE], capture_output=True).returncode != 0
    assert not list(localnode.CGROUP_ROOT.glob(f"*/{localnode.KUBEPODS}"))
    leftovers = subprocess.run(["pgrep", "-f", socket], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes of the node still running: {leftovers}"
    assert not node.NODE_LOCK.exists()


ABANDONED = """
import sys, time
from agentkube.devenv import temporary_env
env = temporary_env(with_prometheus=False, with_node=True).up()
manifest = sys.stdin.read()
import subprocess
subprocess.run([sys.argv[1], "apply", "-f", "-"], input=manifest, text=True, env=env.environ(), check=True, capture_output=True)
subprocess.run([sys.argv[1], "wait", "--for=condition=Ready", "pod/web", "--timeout=120s"], env=env.environ(), check=True, capture_output=True)
print(env.layout.root, flush=True)
time.sleep(600)
"""


def test_a_node_whose_owner_was_killed_is_swept_by_the_next_environment():
    """SIGKILL leaves containers (their shims outlive containerd), mounts and the bridge; the next
    temporary environment's sweep takes them all away."""
    owner = subprocess.Popen([sys.executable, "-c", ABANDONED, str(bin_dir() / "kubectl")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        owner.stdin.write(json.dumps(_pod_manifest("web")))
        owner.stdin.close()
        root = Path(owner.stdout.readline().strip())
    finally:
        owner.kill()
        owner.wait()
    assert root.is_dir() and node.NODE_LOCK.exists()
    assert root in sweep_abandoned()
    assert not root.exists() and not localnode.mounts_under(root) and not node.NODE_LOCK.exists()
    assert subprocess.run(["ip", "link", "show", node.BRIDGE], capture_output=True).returncode != 0
    assert not list(localnode.CGROUP_ROOT.glob(f"*/{localnode.KUBEPODS}"))
    assert not localnode.empty_pod_netns() and not list(node.NETNS_DIR.glob("cni-*"))
    assert not subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
