"""The local node's decisions: containerd, CNI and kubelet configuration, identities, images, and how the
node agent reads a sandbox pod."""

import hashlib
import ipaddress
import json
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from agentkube.contract import CallIntent, resolve_limits
from agentkube.devenv import config, images, node
from agentkube.devenv.config import Layout, Ports
from agentkube.ebpf.agent import innermost_pid
from agentkube.ebpf.kubernetes import TOTAL_KEYS, IntentRefused, added_totals, pod_runtime_socket, sandbox_spec
from agentkube.operator import api, sandbox

LAYOUT = Layout(Path("/state"))
NODE_LAYOUT = LAYOUT.node
PORTS = Ports(etcd_client=1, etcd_peer=2, apiserver=3, controller_manager=4, prometheus=5, scheduler=6, kubelet=7,
              kubelet_healthz=8)


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in argv[1:] if arg.startswith("--"))


def test_containerd_runs_runc_with_cgroupfs_and_keeps_everything_in_the_environment():
    document = tomllib.loads(node.containerd_config(NODE_LAYOUT, images.PAUSE_IMAGE))
    cri = document["plugins"]["io.containerd.grpc.v1.cri"]
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"BinaryName": str(node.RUNC), "SystemdCgroup": False}
    assert cri["sandbox_image"] == images.PAUSE_IMAGE and cri["restrict_oom_score_adj"] is True
    assert cri["stream_server_address"] == "127.0.0.1"
    for path in (document["root"], document["state"], document["grpc"]["address"], cri["cni"]["conf_dir"]):
        assert path.startswith("/state/node/")


def test_pods_route_through_the_node_without_masquerade():
    bridge = node.cni_conflist(NODE_LAYOUT)["plugins"][0]
    # What may leave the bridge is the node firewall's to decide (test_network_config), never a NAT's.
    assert bridge["isDefaultGateway"] is True and bridge["ipMasq"] is False
    subnet = ipaddress.ip_network(node.POD_SUBNET)
    (pod_range,) = bridge["ipam"]["ranges"][0]
    assert ipaddress.ip_address(node.NODE_IP) in subnet and pod_range["gateway"] == node.NODE_IP
    assert bridge["ipam"]["dataDir"].startswith("/state/node/")


def test_kubelet_authenticates_and_authorizes_every_caller_and_accepts_this_hosts_cgroups():
    kubelet = node.kubelet_config(NODE_LAYOUT, LAYOUT.pki, port=7, healthz_port=8)
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert kubelet["authentication"]["x509"]["clientCAFile"] == "/state/pki/ca.crt"
    assert kubelet["authorization"]["mode"] == "Webhook" and kubelet["readOnlyPort"] == 0
    assert kubelet["address"] == node.NODE_IP and kubelet["healthzBindAddress"] == "127.0.0.1"
    assert kubelet["cgroupDriver"] == "cgroupfs" and kubelet["failCgroupV1"] is False
    assert kubelet["resolvConf"] == "/state/node/resolv.conf", "pods never get the host's resolvers"
    assert node.resolv_conf() == f"nameserver {node.CLUSTER_DNS_IP}\n"
    assert kubelet["clusterDNS"] == [node.CLUSTER_DNS_IP] and kubelet["clusterDomain"] == "cluster.local"
    flags = _flags(config.kubelet_command(Path("kubelet"), LAYOUT, PORTS))
    assert flags["hostname-override"] == node.NODE_NAME and flags["node-ip"] == node.NODE_IP
    assert flags["kubeconfig"] == str(LAYOUT.client_kubeconfig("kubelet-client"))


def test_node_identities_are_the_ones_the_node_authorizer_and_rbac_expect():
    assert config.KUBELET.user == f"system:node:{node.NODE_NAME}" and config.KUBELET.groups == ("system:nodes",)
    assert config.SCHEDULER.user == "system:kube-scheduler"
    masters = [name for name, identity in config.CLIENT_CERTIFICATES.items() if "system:masters" in identity.groups]
    assert masters == ["admin"]
    apiserver = _flags(config.apiserver_command(Path("a"), LAYOUT, PORTS))
    assert apiserver["kubelet-client-certificate"] == "/state/pki/apiserver-kubelet-client.crt"
    assert apiserver["kubelet-certificate-authority"] == "/state/pki/ca.crt"
    assert "NodeRestriction" in apiserver["enable-admission-plugins"].split(",")
    scheduler = _flags(config.scheduler_command(Path("s"), LAYOUT, PORTS))
    assert scheduler["bind-address"] == "127.0.0.1" and scheduler["secure-port"] == "6"


def test_node_rbac_binds_the_apiserver_to_the_kubelet_api_and_lets_the_node_agent_read_pods_and_report():
    binding, role, agent_binding = node.node_rbac("apiserver-client", "node-agent")
    assert binding["roleRef"]["name"] == "system:kubelet-api-admin"
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "apiserver-client"}]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": ["agentkube.dev"], "resources": ["agentsandboxes"], "verbs": ["get", "patch"]},
                             # egress `cluster`: what the node agent discovers the cluster's networks from
                             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
                             {"apiGroups": ["networking.k8s.io"], "resources": ["servicecidrs"], "verbs": ["list"]},
                             {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]}]
    assert agent_binding["roleRef"]["name"] == role["metadata"]["name"]


def test_network_namespaces_are_read_from_container_specs():
    infos = [{"Spec": {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/cni-1"}]}}},
             {"Spec": {"linux": {"namespaces": [{"type": "network", "path": "/proc/9/ns/net"}]}}}, {"Spec": None}]
    assert node.netns_paths(infos) == {"/run/netns/cni-1", "/proc/9/ns/net"}


def test_oci_documents_reference_each_other_by_digest():
    layer = images.Layer(Path("l.tar"), "ab" * 32, 10)
    config_blob, manifest_blob, index_blob = images.image_documents([layer], {"Entrypoint": ["/pause"]}, "localhost/x/y:dev")
    manifest, index = json.loads(manifest_blob), json.loads(index_blob)
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config_blob).hexdigest()
    assert manifest["layers"] == [{"mediaType": images.MEDIA_LAYER, "digest": "sha256:" + "ab" * 32, "size": 10}]
    assert index["manifests"][0]["digest"] == "sha256:" + hashlib.sha256(manifest_blob).hexdigest()
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "localhost/x/y:dev"
    assert json.loads(config_blob)["rootfs"]["diff_ids"] == ["sha256:" + "ab" * 32]


def test_layers_are_reproducible(tmp_path):
    source = tmp_path / "root"
    (source / "bin").mkdir(parents=True)
    (source / "bin" / "tool").write_text("#!/bin/sh\n")
    first = images.layer(images.tar_directory(source, tmp_path / "a.tar"))
    (source / "bin" / "tool").touch()  # a new mtime changes nothing
    second = images.layer(images.tar_directory(source, tmp_path / "b.tar"))
    assert first.digest == second.digest


def _pod(state: dict | None, tools: dict | None = None) -> dict:
    spec = api.AgentSandboxSpec.model_validate({"template": {"image": "i", "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}}},
                                                **({"tools": tools} if tools else {})})
    body = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox",
            "metadata": {"name": "box", "namespace": "team", "uid": "u"}}
    pod = sandbox.pod_manifest(body, spec)
    pod["metadata"]["uid"] = "0c1f2e3d-4b5a-6978-8a9b-0c1d2e3f4a5b"
    statuses = [{"name": sandbox.CONTAINER_NAME, "state": state, "containerID": "containerd://" + "f" * 64}] if state else []
    pod["status"] = {"qosClass": "Burstable", "containerStatuses": statuses}
    return pod


def _defaults(spec):
    return resolve_limits(CallIntent(), [], spec.tools, spec.envelope.envelope()).limits


def test_a_sandbox_pod_registers_once_its_container_runs():
    assert sandbox_spec(_pod(None)) is None
    assert sandbox_spec(_pod({"waiting": {"reason": "ContainerCreating"}})) is None
    network = {"egress": "explicit", "allow": [{"cidr": "10.1.0.0/16", "port": 443}]}
    default = {"memory": "128Mi", "cpu": "250m", "pids": 32, "timeout": "2m", "network": network}
    spec = sandbox_spec(_pod({"running": {}}, tools={"default": default}))
    assert (spec.name, spec.namespace) == ("box", "team")
    assert spec.kubernetes.container_id == "containerd://" + "f" * 64 and spec.kubernetes.qos == "burstable"
    assert spec.envelope.envelope().memory == 2**30 and spec.envelope.envelope().cpu == 0.5
    defaults = _defaults(spec)
    assert (defaults.memory, defaults.cpu, defaults.pids, defaults.timeout) == (128 * 2**20, 0.25, 32, 120)
    assert str(defaults.network) == "10.1.0.0/16:443"


def test_the_sandbox_profiles_reach_the_node_agent_as_written():
    tools = {"profiles": {"test": {"memory": "768Mi", "cpu": "500m", "timeout": "10m"},
                          "fetch": {"network": {"egress": "explicit", "allow": [{"cidr": "10.0.0.0/8", "port": 443}]}}}}
    spec = sandbox_spec(_pod({"running": {}}, tools=tools))
    assert spec.tools.profiles["test"].model_dump(by_alias=True, exclude_none=True) == tools["profiles"]["test"]
    limits = resolve_limits(CallIntent(profile="test"), [], spec.tools, spec.envelope.envelope()).limits
    assert (limits.memory, limits.cpu, limits.timeout) == (768 * 2**20, 0.5, 600.0)
    assert str(resolve_limits(CallIntent(profile="fetch"), [], spec.tools, spec.envelope.envelope()).limits.network) == "10.0.0.0/8:443"


def test_defaults_never_exceed_the_envelope_whoever_made_the_pod():
    pod = _pod({"running": {}})
    pod["metadata"]["annotations"][sandbox.TOOLS_ANNOTATION] = json.dumps({"envelope": {"memory": "1Gi", "cpu": "500m"},
                                                                           "default": {"memory": "4Gi", "cpu": "4"}})
    spec = sandbox_spec(pod)
    defaults, envelope = _defaults(spec), spec.envelope.envelope()
    assert defaults.memory == envelope.memory and defaults.cpu == envelope.cpu


@pytest.mark.parametrize("annotation", ["{not json", "[]", json.dumps({"default": {"memory": "lots"}}),
                                        json.dumps({"default": {"network": {"egress": "all"}}}),
                                        json.dumps({"envelope": {"memory": "-1"}}), json.dumps({"envelope": "big"}),
                                        json.dumps({"surprise": 1})])
def test_a_tools_annotation_the_agent_cannot_honour_is_refused_not_ignored(annotation):
    pod = _pod({"running": {}})
    pod["metadata"]["annotations"][sandbox.TOOLS_ANNOTATION] = annotation
    with pytest.raises(IntentRefused):
        sandbox_spec(pod)


def test_sandbox_pod_mounts_the_agent_socket_read_only_and_the_runtime_socket_in_memory():
    pod = _pod(None)
    container = pod["spec"]["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts[sandbox.AGENT_VOLUME]["readOnly"] is True
    assert volumes[sandbox.RUNTIME_VOLUME]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AGENTKUBE_SANDBOX_NAME"] == "box" and env["AGENTKUBE_SANDBOX_NAMESPACE"] == "team"
    assert env["AGENTKUBE_SANDBOX_SOCKET"].startswith(mounts[sandbox.RUNTIME_VOLUME]["mountPath"])
    assert env["AGENTKUBE_AGENT_SOCKET"].startswith(mounts[sandbox.AGENT_VOLUME]["mountPath"])
    assert pod_runtime_socket(Path("/var/lib/kubelet"), "u").parts[-2:] == (sandbox.RUNTIME_VOLUME, "runtime.sock")


def test_innermost_pid_is_the_last_nspid():
    assert innermost_pid("Name:\tpython3\nNSpid:\t4242\t17\n") == 17
    assert innermost_pid("Name:\tinit\nNSpid:\t1\n") == 1
    assert innermost_pid("Name:\tx\n") is None


def test_call_totals_are_added_to_what_the_sandbox_already_holds():
    zero = dict.fromkeys(TOTAL_KEYS, 0)
    assert added_totals(None, Counter(calls=2, oomKilled=1)) == {**zero, "calls": 2, "oomKilled": 1}
    held = json.dumps({**zero, "calls": 5, "failed": 1, "blockedConnections": 3})
    assert added_totals(held, Counter(calls=1, failed=1)) == {**zero, "calls": 6, "failed": 2, "blockedConnections": 3}
    assert added_totals("not json", Counter(calls=1))["calls"] == 1
    assert added_totals("[1, 2]", Counter(calls=1))["calls"] == 1


def test_the_operator_mirrors_the_totals_into_status_and_ignores_garbage():
    totals = {"calls": 3, "failed": 1, "oomKilled": 1, "blockedConnections": 0, "dnsRefused": 0}
    assert sandbox.tool_call_totals({sandbox.TOOL_CALLS_ANNOTATION: json.dumps(totals)}).model_dump(by_alias=True) == totals
    assert sandbox.tool_call_totals({}) is None
    assert sandbox.tool_call_totals({sandbox.TOOL_CALLS_ANNOTATION: '{"calls": "many"}'}) is None
    assert set(totals) == set(TOTAL_KEYS)
