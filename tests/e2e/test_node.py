"""Through the real parts: pods on a real kubelet with containerd and runc, Services through kube-proxy
and CoreDNS, a firewall that keeps pods' packets on this machine, an AgentSandbox from
`kubectl apply` to Running, and tool calls through the SDK into the sandbox pod's runtime, each placed
by the node agent (Kubernetes mode) in its own cgroup under the container's."""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from kubernetes.client import CoreV1Api, CustomObjectsApi, NetworkingV1Api

from agentkube import contract
from agentkube.client import ApiError, Sandbox
from agentkube.devenv import DevEnv, images, localnode, network, node
from agentkube.devenv.cluster import sweep_abandoned
from agentkube.devenv.versions import bin_dir
from agentkube.ebpf.agent import POOL_SLOTS_PER_SANDBOX
from agentkube.operator import api, sandbox

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
    assert described["spec"]["podCIDRs"] == [node.POD_SUBNET], "allocated by the controller manager"


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


def _pod_python(kubectl, namespace: str, pod: str, program: str, check: bool = True):
    return kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", program, check=check)


def _web_and_client(kubectl, namespace: str) -> None:
    """A web pod behind the Service `web` (port 80 → 8080) and a client pod, started together."""
    web = _pod_manifest("web")
    web["metadata"]["labels"] = {"app": "web"}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    documents = [web, _pod_manifest("client"), service]
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/web", "pod/client", "--timeout=120s")


RESOLVE_AND_FETCH = """
import json, socket, sys, urllib.request
names = sys.argv[1:]
addresses = {name: socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)[0][4][0] for name in names}
body = urllib.request.urlopen(f"http://{names[0]}/debian_version", timeout=10).read().decode()
print(json.dumps({"addresses": addresses, "body": body, "resolv": open("/etc/resolv.conf").read()}))
"""


def test_a_pod_resolves_a_service_by_name_and_reaches_it_through_its_cluster_ip(kubectl, namespace):
    _web_and_client(kubectl, namespace)
    cluster_ip = kubectl("get", "-n", namespace, "service/web", "-o", "jsonpath={.spec.clusterIP}").stdout
    names = ["web", f"web.{namespace}", f"web.{namespace}.svc.cluster.local"]
    answer = json.loads(kubectl("exec", "-n", namespace, "client", "--", "python3", "-c", RESOLVE_AND_FETCH, *names).stdout)
    assert answer["addresses"] == {name: cluster_ip for name in names}
    assert answer["body"].strip()
    assert f"nameserver {node.CLUSTER_DNS_IP}" in answer["resolv"] and "svc.cluster.local" in answer["resolv"]
    # kube-dns is itself a Service: its ClusterIP answers over TCP too (kube-proxy → CoreDNS on the bridge).
    _pod_python(kubectl, namespace, "client", f"import socket; socket.create_connection(('{node.CLUSTER_DNS_IP}', 53), timeout=5)")
    # Names outside the cluster are answered by nobody: CoreDNS refuses them instead of asking upstream.
    outside = _pod_python(kubectl, namespace, "client",
                          "import socket, time; t = time.monotonic()\n"
                          "try: socket.getaddrinfo('example.com', 80)\n"
                          "except socket.gaierror as e: print('failed', round(time.monotonic() - t, 1), e)")
    assert outside.stdout.startswith("failed"), outside.stdout


def _firewall_drops() -> int:
    """Packets the node's firewall dropped so far (the DROP rule's counter)."""
    listing = subprocess.run(["iptables", "-w", "5", "-t", network.FIREWALL_TABLE, "-L", network.FIREWALL_CHAIN,
                              "-v", "-x", "-n"], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0]) for line in listing.splitlines()[2:] if line.split()[2] == "DROP")


def test_a_pod_reaches_nothing_off_the_machine_its_packets_are_dropped_in_forward(kubectl, namespace):
    # Checked first, so that a missing firewall fails the test before any packet is sent.
    assert localnode.firewall_installed()
    forward = subprocess.run(["iptables", "-w", "5", "-t", network.FIREWALL_TABLE, "-S", network.FIREWALL_HOOK],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert forward[1].endswith(f"-j {network.FIREWALL_CHAIN}"), "the node's jump comes first"
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pod_manifest("client")))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/client", "--timeout=120s")
    # The machine's own gateway (192.0.2.1 here) and an address routed like any public one (TEST-NET-3).
    for address in ("192.0.2.1", "203.0.113.1"):
        dropped = _firewall_drops()
        probe = _pod_python(kubectl, namespace, "client",
                            f"import socket; socket.create_connection(('{address}', 80), timeout=2)", check=False)
        assert probe.returncode != 0 and "timed out" in probe.stderr, probe.stderr
        assert _firewall_drops() > dropped, f"the SYN to {address} was dropped by the node's FORWARD chain"


TEST_HOST = "akt-e2e"  # network.TEST_LINK_PREFIX: a link the firewall lets pods' traffic into
TEST_HOST_ADDRESS, TEST_HOST_GATEWAY = "198.51.100.1", "198.51.100.254"


def test_a_pod_reaches_a_test_host_in_a_network_namespace_routed_from_the_host(kubectl, namespace, eventually):
    """A test host is a network namespace held by a process (not `ip netns add`, which bind-mounts
    /run/netns over itself and so hides containerd's pod namespaces from `dev down`)."""
    def ip(*args: str, netns: int | None = None) -> None:
        prefix = ["nsenter", "-t", str(netns), "-n"] if netns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    server = None
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        eventually(lambda: os.stat(f"/proc/{holder.pid}/ns/net").st_ino != own, timeout=10, message="netns made")
        ip("link", "add", TEST_HOST, "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid))
        ip("addr", "add", f"{TEST_HOST_GATEWAY}/24", "dev", TEST_HOST)
        ip("link", "set", TEST_HOST, "up")
        ip("addr", "add", f"{TEST_HOST_ADDRESS}/24", "dev", "eth0", netns=holder.pid)
        ip("link", "set", "eth0", "up", netns=holder.pid)
        ip("route", "add", node.POD_SUBNET, "via", TEST_HOST_GATEWAY, netns=holder.pid)
        server = subprocess.Popen(["nsenter", "-t", str(holder.pid), "-n", sys.executable, "-m", "http.server",
                                   "--bind", TEST_HOST_ADDRESS, "8080", "--directory", "/etc"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pod_manifest("client")))
        kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/client", "--timeout=120s")
        fetch = _pod_python(kubectl, namespace, "client",
                            "import time, urllib.request\n"
                            "for attempt in range(50):\n"
                            "    try: print(urllib.request.urlopen("
                            f"'http://{TEST_HOST_ADDRESS}:8080/debian_version', timeout=5).status); break\n"
                            "    except OSError: time.sleep(0.2)\n")
        assert fetch.stdout.strip() == "200"
    finally:
        for process in (server, holder):
            if process is not None:
                process.kill()
                process.wait()
        subprocess.run(["ip", "link", "delete", TEST_HOST], capture_output=True)  # gone with the netns, normally


NO_ENFORCER = ("no NetworkPolicy enforcer runs on this node: kube-network-policies needs the nftables `queue` "
               "expression (CONFIG_NFT_QUEUE is unset on this kernel), and kube-router is not running")


def test_a_network_policy_that_denies_ingress_is_enforced_and_lifted(devenv, kubectl, namespace, eventually):
    if not devenv.status().get("kube-router"):
        pytest.skip(NO_ENFORCER)
    _web_and_client(kubectl, namespace)
    web_ip = kubectl("get", "-n", namespace, "pod/web", "-o", "jsonpath={.status.podIP}").stdout
    connect = f"import socket; socket.create_connection(('{web_ip}', 8080), timeout=2); print('connected')"

    def reachable() -> bool:
        return _pod_python(kubectl, namespace, "client", connect, check=False).stdout.strip() == "connected"

    assert reachable(), "without a policy, pods reach each other"
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny-web"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deny))
    eventually(lambda: not reachable(), timeout=60, message="the deny-ingress policy enforced")
    kubectl("delete", "-n", namespace, "networkpolicy/deny-web")
    eventually(reachable, timeout=60, message="the policy lifted")

    # Egress like a sandbox's (operator.sandbox.network_policy_manifest): DNS to kube-dns only. Names still
    # resolve (CoreDNS is a host process no pod selector matches, reached on its ClusterIP), nothing else.
    dns_only = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "dns-only"},
                "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}}
    kubectl("label", "-n", namespace, "pod/client", "app=client")
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dns_only))
    eventually(lambda: not reachable(), timeout=60, message="the egress policy enforced")
    cluster_ip = kubectl("get", "-n", namespace, "service/web", "-o", "jsonpath={.spec.clusterIP}").stdout
    resolved = _pod_python(kubectl, namespace, "client", "import socket; print(socket.getaddrinfo('web', 80)[0][4][0])")
    assert resolved.stdout.strip() == cluster_ip


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
    # The policy object is there (kube-router enforces it on this node).
    assert NetworkingV1Api(api_client).read_namespaced_network_policy("box", namespace)
    # Right after Running: the SDK waits the moment it takes the node agent to register the pod.
    assert Sandbox("box", namespace).run(["true"]).exit_code == 0

    kubectl("patch", "-n", namespace, "agentsandbox/box", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":true}}}')
    eventually(lambda: _phase(api_client, namespace, "box") == "Suspended", timeout=60, message="sandbox Suspended")
    eventually(lambda: not CoreV1Api(api_client).list_namespaced_pod(namespace).items, timeout=60, message="pod gone")

    kubectl("patch", "-n", namespace, "agentsandbox/box", "--type=merge", "-p", '{"spec":{"lifecycle":{"suspend":false}}}')
    eventually(lambda: _phase(api_client, namespace, "box") == "Running", timeout=120, message="sandbox Running again")
    assert Sandbox("box", namespace).run(["echo", "back"]).stdout == "back\n"


def _call_cgroups_left(container_cgroup: Path) -> list[Path]:
    """Call cgroups under the container that are neither the warm pool's (one waits for a call with the held
    program alone in it, its comm the program's name, `agentkube-held`) nor kept empty for a later call (at most
    POOL_SLOTS_PER_SANDBOX: beyond that the empty ones are left too)."""
    left, empty = [], []
    for call_dir in container_cgroup.glob("call-*"):
        try:
            members = (call_dir / "cgroup.procs").read_text().split()
            if not members:
                empty.append(call_dir)
            elif len(members) > 1 or not Path(f"/proc/{members[0]}/comm").read_text().startswith("agentkube-held"):
                left.append(call_dir)
        except OSError:  # removed (or its process gone) while we looked: ENOENT, or ENODEV mid-removal
            continue
    return left + (empty if len(empty) > POOL_SLOTS_PER_SANDBOX else [])


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
    eventually(lambda: not _call_cgroups_left(container_cgroup), timeout=30,
               message="finished calls' cgroups removed (the warm pool's waiting ones and the kept empty ones aside)")
    # The node agent reports the calls' activity and totals; the operator mirrors them into status (the
    # activity is what idleTimeout measures from).
    def reported():
        status = _sandbox(api_client, namespace, "agent").get("status") or {}
        return status.get("lastActivityTime") and status.get("toolCalls", {}).get("calls", 0) >= 3 and status

    status = eventually(reported, timeout=90, message="status.lastActivityTime and toolCalls from the node agent")
    assert status["toolCalls"]["oomKilled"] == 1 and status["toolCalls"]["failed"] == 1


# From inside a tool call of a real sandbox pod: the runtime's socket and the node agent's sandbox socket
# (both reachable from the pod, as the same user) refuse it; so does every route about another sandbox.
ESCAPE_PROBE = """
import json, os, sys
from agentkube.ebpf.unixhttp import request, ApiError
runtime, agent = os.environ["AGENTKUBE_SANDBOX_SOCKET"], os.environ["AGENTKUBE_AGENT_SOCKET"]
me, other = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tries = {
    "run_via_runtime": (runtime, "POST", "/v1/run", {"argv": ["true"], "intent": {"network": {"egress": "internet"}}}),
    "status_via_runtime": (runtime, "GET", "/v1/status", None),
    "place_self": (agent, "POST", "/v1/calls", {**me, "pid": os.getpid(), "argv": ["x"]}),
    "read_own_sandbox": (agent, "GET", f"/v1/sandboxes/{me['namespace']}/{me['name']}", None),
    "place_in_other": (agent, "POST", "/v1/calls", {**other, "pid": os.getpid(), "argv": ["x"]}),
    "read_other": (agent, "GET", f"/v1/sandboxes/{other['namespace']}/{other['name']}", None),
}
out = {}
for name, (socket, method, path, body) in tries.items():
    try:
        request(socket, method, path, body)
        out[name] = 200
    except ApiError as error:
        out[name] = error.status
    except OSError as error:
        out[name] = type(error).__name__
print(json.dumps(out))
"""


def _running(api_client, kubectl, namespace, eventually, name: str, spec: dict = SANDBOX) -> Sandbox:
    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": name}, "spec": spec}
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: _phase(api_client, namespace, name) == "Running", timeout=120, message=f"sandbox {name} Running")
    return Sandbox(name, namespace)


def test_in_a_real_pod_calls_are_bounded_and_code_inside_cannot_ask_for_more(operator, api_client, kubectl, namespace,
                                                                               eventually):
    client = _running(api_client, kubectl, namespace, eventually, "bounded")
    other = _running(api_client, kubectl, namespace, eventually, "neighbour")
    refs = [json.dumps({"name": n, "namespace": namespace}) for n in ("bounded", "neighbour")]
    probe = client.run(["python3", "-c", ESCAPE_PROBE, *refs], timeout=60)
    assert json.loads(probe.stdout) == dict.fromkeys(
        ["run_via_runtime", "status_via_runtime", "place_self", "read_own_sandbox", "place_in_other", "read_other"], 403), probe

    # Asked of the SDK: more network than the spec grants, a built-in profile with internet: refused.
    for asked in ({"network": "internet"}, {"profile": "fetch"}, {"network": [f"{node.NODE_IP}:10250"]}):
        with pytest.raises(ApiError) as refused:
            client.run(["true"], **asked)
        assert refused.value.status == 422 and refused.value.message.startswith("network:"), asked

    # Egress none: the node's own address is blocked in the kernel and counted.
    connect = f"import socket; socket.create_connection(({node.NODE_IP!r}, 10250), timeout=3)"
    blocked = client.run(["python3", "-c", connect], timeout=30)
    assert blocked.exit_code != 0 and blocked.usage.connections_blocked >= 1, blocked

    # A fork bomb is stopped by the pids limit; the machine and the sandbox stay usable.
    bomb = client.run(["bash", "-c", "bomb() { bomb | bomb & }; bomb; exec sleep 1000"], pids=32, timeout=5)
    assert bomb.usage.pids_limit_hits > 0 and bomb.usage.timed_out and bomb.signal == 9, bomb.usage
    assert client.run(["echo", "alive"]).stdout == "alive\n"

    # A timeout kills the call's whole tree, a daemonized grandchild included.
    marker = "agentkube-e2e-daemon"
    tree = client.run(["bash", "-c", f"setsid bash -c 'exec -a {marker} sleep 1000' </dev/null >/dev/null 2>&1 & sleep 1000"],
                      timeout=2)
    assert tree.usage.timed_out and tree.signal == 9
    # (The pattern's last letter in brackets: grep's own command line does not match it.)
    survivors = client.run(["bash", "-c", f"grep -l {marker[:-1]}[{marker[-1]}] /proc/[0-9]*/cmdline 2>/dev/null | wc -l"])
    assert survivors.stdout.strip() == "0", survivors

    # What the node agent counted reaches the AgentSandbox's status.
    def counted():
        totals = (_sandbox(api_client, namespace, "bounded").get("status") or {}).get("toolCalls") or {}
        return totals.get("blockedConnections", 0) >= 1 and totals
    eventually(counted, timeout=90, message="status.toolCalls.blockedConnections from the node agent")
    assert other.run(["echo", "untouched"]).stdout == "untouched\n"


def test_a_tool_intent_the_node_agent_cannot_honour_runs_no_call(operator, api_client, kubectl, namespace, eventually):
    client = _running(api_client, kubectl, namespace, eventually, "closed")
    assert client.run(["true"]).exit_code == 0
    # Whoever may patch pods breaks the intent the operator wrote: the agent fails closed.
    kubectl("annotate", "--overwrite", "-n", namespace, "pod/closed", 'agentkube.dev/tools={"default": {"memory": "lots"}}')

    def refused():
        try:
            client.run(["true"], timeout=10)
        except ApiError as error:
            return error.status == 422 and error
        except OSError:  # the runtime restarting: the agent stopped what ran under the old intent
            return False
        return False
    error = eventually(refused, timeout=60, message="calls still run with an intent the agent cannot read")
    assert "default.memory" in error.message
    condition = eventually(lambda: next((c for c in (_sandbox(api_client, namespace, "closed").get("status") or {}).get(
        "conditions", []) if c["type"] == "ToolsEnforced" and c["status"] == "False"), None), timeout=60,
        message="no ToolsEnforced=False condition")
    assert condition["reason"] == "ToolIntentRefused" and "default.memory" in condition["message"]


def test_a_call_reaches_a_service_by_name_exactly_when_its_network_allows(operator, api_client, kubectl, namespace,
                                                                          eventually):
    """Cluster networking on the node (kube-proxy, CoreDNS) through the node agent's DNS answering: a call
    with `cluster` egress resolves a Service by name and reaches its ClusterIP; `none` gets no answer;
    a domain rule opens exactly its name."""
    web = _pod_manifest("web")
    web["metadata"]["labels"] = {"app": "web"}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    for manifest in (web, service):
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/web", "--timeout=120s")
    name = f"web.{namespace}.svc.cluster.local"
    spec = json.loads(json.dumps(SANDBOX))
    spec["tools"]["profiles"] = {"svc": {"network": {"egress": "explicit", "allow": [{"fqdn": name, "port": 80}]}},
                                 "cluster": {"network": {"egress": "cluster"}}}
    client = _running(api_client, kubectl, namespace, eventually, "resolver", spec)
    fetch = f"import urllib.request as u; print(u.urlopen('http://{name}/', timeout=5).status)"
    by_cluster = client.run(["python3", "-c", fetch], profile="cluster", timeout=60)
    assert by_cluster.stdout == "200\n", (by_cluster.stderr[-2000:], by_cluster.usage)
    by_name = client.run(["python3", "-c", fetch], profile="svc", timeout=60)
    assert by_name.stdout == "200\n" and by_name.usage.dns_refused == 0, (by_name.stderr[-2000:], by_name.usage)
    other = client.run(["python3", "-c", fetch.replace("web.", "kubernetes.").replace(namespace, "default")],
                       profile="svc", timeout=60)
    assert other.exit_code != 0 and other.usage.dns_refused >= 1, other
    nothing = client.run(["python3", "-c", fetch], timeout=60)  # the default: egress none, DNS included
    assert nothing.exit_code != 0 and nothing.usage.dns_refused >= 1, nothing


LISTENER = """
import socket, sys, time
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
server.settimeout(1)
end = time.monotonic() + 30
while time.monotonic() < end:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        continue
    with conn:
        conn.sendall(b"hi")
"""


def test_no_other_pod_can_get_a_call_run(operator, api_client, kubectl, namespace, eventually):
    """Without the gateway's key (this operator has none) the runtime listens on a unix socket in the pod
    only, so no pod can get a call run over the network, whatever the CNI. Where NetworkPolicy is enforced
    (kube-router here), only the gateway's pods — its labels, in its namespace — can even reach the sandbox
    pod's runtime port: shown with a listener on that port (a tool call allowed to answer the pod network),
    which a pod labelled as the gateway in the gateway's namespace reaches, and a pod with the same labels
    in another namespace does not."""
    spec = json.loads(json.dumps(SANDBOX))
    spec["tools"]["profiles"]["listen"] = {"network": {"egress": "explicit", "allow": [{"cidr": node.POD_SUBNET}]}}
    target = _running(api_client, kubectl, namespace, eventually, "target", spec)
    target_ip = CoreV1Api(api_client).read_namespaced_pod("target", namespace).status.pod_ip
    gateway_namespace = sandbox.DEFAULT_GATEWAY_NAMESPACE
    client = _pod_manifest("gateway-stand-in")
    intruder = _pod_manifest("intruder")
    for pod in (client, intruder):
        pod["metadata"]["labels"] = dict(contract.GATEWAY_LABELS)  # the intruder forges them
    kubectl("apply", "-n", gateway_namespace, "-f", "-", input=json.dumps(client))
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(intruder))
    try:
        kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/intruder", "--timeout=120s")
        kubectl("wait", "-n", gateway_namespace, "--for=condition=Ready", "pod/gateway-stand-in", "--timeout=120s")
        port = sandbox.SANDBOX_RUNTIME_PORT
        connect = f"import socket; print(socket.create_connection(({target_ip!r}, {port}), timeout=3).recv(2).decode())"

        def attempt(pod_namespace: str, pod: str):
            return kubectl("exec", "-n", pod_namespace, pod, "--", "python3", "-c", connect, check=False)

        nothing_listens = attempt(gateway_namespace, "gateway-stand-in")
        assert nothing_listens.returncode != 0 and "ConnectionRefused" in nothing_listens.stderr  # not on TCP at all
        listening = threading.Thread(target=lambda: target.run(["python3", "-c", LISTENER, str(port)], profile="listen",
                                                               timeout=60))
        listening.start()
        try:
            eventually(lambda: attempt(gateway_namespace, "gateway-stand-in").stdout == "hi\n", timeout=30,
                       message="the gateway's stand-in never got through")
            refused = attempt(namespace, "intruder")
            assert refused.returncode != 0 and "hi" not in refused.stdout, refused
        finally:
            listening.join(timeout=90)
    finally:
        kubectl("delete", "-n", gateway_namespace, "pod/gateway-stand-in", "--wait=false", check=False)


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
    assert not localnode.firewall_installed(), "the node's iptables chain is gone"
    assert not localnode.kube_proxy_rules_present(), "kube-proxy's chains are gone"
    assert not localnode.node_chains_present(), "the kubelet's, kube-proxy's and kube-router's chains are gone"
    assert not localnode.node_ipsets_present(), "kube-router's ipsets are gone"


ABANDONED = """
import sys, time
from agentkube.devenv import temporary_env
env = temporary_env(with_prometheus=False, with_node=True).up()
manifest = sys.stdin.read()
import subprocess
subprocess.run([sys.argv[1], "apply", "-f", "-"], input=manifest, text=True, env=env.environ(), check=True, capture_output=True)
subprocess.run([sys.argv[1], "wait", "--for=condition=Ready", "pod/web", "--timeout=120s"], env=env.environ(), check=True,
               capture_output=True)
print("root:", env.layout.root, flush=True)  # after whatever the environment logged while it came up
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
        said = next((line for line in owner.stdout if line.startswith("root: ")), "")
    finally:
        owner.kill()
        owner.wait()
    assert said, "the environment's owner ended before its node was up"
    root = Path(said.removeprefix("root: ").strip())
    assert root.is_dir() and node.NODE_LOCK.exists()
    assert root in sweep_abandoned()
    assert not root.exists() and not localnode.mounts_under(root) and not node.NODE_LOCK.exists()
    assert subprocess.run(["ip", "link", "show", node.BRIDGE], capture_output=True).returncode != 0
    assert not list(localnode.CGROUP_ROOT.glob(f"*/{localnode.KUBEPODS}"))
    assert not localnode.empty_pod_netns() and not list(node.NETNS_DIR.glob("cni-*"))
    assert not subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
