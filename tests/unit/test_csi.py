"""The node agent's CSI node plugin: which requests it accepts (only the kubelet's for an inline ephemeral
volume of a sandbox pod), which pods it serves, its CSIDriver object, and the generated stubs' drift."""

import re
from pathlib import Path

import grpc
import pytest
import yaml

from agentkube.contract import CSI_DRIVER, SANDBOX_LABEL
from agentkube.ebpf import csi, csigen
from agentkube.ebpf.csiproto import csi_pb2
from agentkube.operator import api, sandbox

ROOT = Path("/var/lib/kubelet")
UID = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
TARGET = f"{ROOT}/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent/mount"
CHART_TEMPLATE = Path(__file__).resolve().parents[2] / "charts" / "agentkube" / "templates" / "csidriver.yaml"
Mode = csi_pb2.VolumeCapability.AccessMode


def _request(**changes) -> csi_pb2.NodePublishVolumeRequest:
    """What the kubelet sends for `csi: {driver: csi.agentkube.dev, readOnly: true}` (podInfoOnMount on)."""
    context = {csi.EPHEMERAL_KEY: "true", csi.POD_NAME_KEY: "box", csi.POD_NAMESPACE_KEY: "team",
               csi.POD_UID_KEY: UID, csi.SERVICE_ACCOUNT_KEY: "default"}
    context.update(changes.pop("context", {}))
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=changes.pop("volume_id", "csi-5c7e1b"), target_path=changes.pop("target_path", TARGET),
        readonly=changes.pop("readonly", True), volume_context={k: v for k, v in context.items() if v is not None},
        volume_capability=changes.pop("volume_capability", csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))),
        **changes)
    return request


def _refused(request, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(csi.Refusal) as refused:
        csi.publish_request(request, ROOT)
    assert refused.value.code == code
    return refused.value.message


def test_the_kubelets_request_for_an_inline_volume_is_accepted():
    publish = csi.publish_request(_request(), ROOT)
    assert publish.target == Path(TARGET) and publish.volume_id == "csi-5c7e1b"
    assert publish.pod == csi.PodRef("team", "box", UID)


@pytest.mark.parametrize("request_, why", [
    (_request(context={csi.EPHEMERAL_KEY: "false"}), "ephemeral"),
    (_request(context={csi.EPHEMERAL_KEY: None}), "podInfoOnMount"),
    (_request(context={csi.POD_UID_KEY: None}), "pod.uid"),
    (_request(context={"socket": "/etc"}), "no attributes; got socket"),
    (_request(readonly=False), "readOnly: true"),
    (_request(volume_id=""), "volume_id"),
    (_request(volume_capability=csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())), "no block"),
    (_request(volume_capability=csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                                         access_mode=Mode(mode=Mode.MULTI_NODE_MULTI_WRITER))), "single-node"),
    (_request(volume_capability=csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["rw"]), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))),
     "mount flags"),
    (_request(staging_target_path="/var/lib/kubelet/plugins/x"), "staged"),
    (_request(secrets={"token": "x"}), "secrets"),
], ids=["not-ephemeral", "no-pod-info", "no-pod-uid", "attributes", "writable", "no-volume-id", "block",
        "multi-node", "mount-flags", "staged", "secrets"])
def test_anything_but_that_request_is_refused_as_invalid(request_, why):
    assert why in _refused(request_)


@pytest.mark.parametrize("target", [
    "",
    "relative/pods/x",
    f"{ROOT}/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent/mount/../../../../../../etc",
    f"{ROOT}/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent//mount",
    f"{ROOT}/plugins/{UID}/volumes/kubernetes.io~csi/agentkube-agent/mount",
    f"{ROOT}/pods/{UID}/volumes/kubernetes.io~empty-dir/agentkube-agent/mount",
    f"{ROOT}/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent",
    f"{ROOT}/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent/mount/deeper",
    f"/var/lib/kubelet-other/pods/{UID}/volumes/kubernetes.io~csi/agentkube-agent/mount",
    "/etc",
])
def test_a_target_outside_a_pods_csi_volume_directory_is_refused(target):
    assert "target_path" in _refused(_request(target_path=target))
    with pytest.raises(csi.Refusal):
        csi.unpublish_target(csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-5c7e1b", target_path=target), ROOT)


def test_a_target_in_another_pods_directory_is_refused():
    other = TARGET.replace(UID, "11111111-2222-3333-4444-555555555555")
    assert "not in the directory of pod" in _refused(_request(target_path=other))


def test_the_kubelets_pod_identity_overrides_what_a_pod_spec_could_claim():
    # The pod spec's volumeAttributes cannot carry the kubelet's keys past it (its values win), and any other
    # attribute is refused; so the identity the plugin checks is the kubelet's.
    assert csi.KUBELET_KEYS >= {csi.POD_NAME_KEY, csi.POD_NAMESPACE_KEY, csi.POD_UID_KEY, csi.EPHEMERAL_KEY}


def test_unpublish_names_a_pods_csi_volume_directory():
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-5c7e1b", target_path=TARGET)
    assert csi.unpublish_target(request, ROOT) == Path(TARGET)
    with pytest.raises(csi.Refusal, match="volume_id"):
        csi.unpublish_target(csi_pb2.NodeUnpublishVolumeRequest(target_path=TARGET), ROOT)


def _sandbox_pod(**changes) -> dict:
    body = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "box", "namespace": "team", "uid": "s"}}
    pod = sandbox.pod_manifest(body, api.AgentSandboxSpec.model_validate({"template": {"image": "sandbox"}}))
    pod["metadata"]["uid"], pod["spec"]["nodeName"] = UID, "node-a"
    for key, value in changes.items():
        pod["metadata"][key] = value
    return pod


def test_only_an_agentsandboxs_pod_on_this_node_gets_the_socket():
    ref = csi.PodRef("team", "box", UID)
    csi.admit_pod(_sandbox_pod(), ref, "node-a")
    refusals = {
        "gone": (None, "does not exist"),
        "replaced": (_sandbox_pod(uid="another"), "not the pod"),
        "unlabelled": (_sandbox_pod(labels={"app": "web"}), SANDBOX_LABEL),
        "not owned": (_sandbox_pod(ownerReferences=[]), "not controlled by an AgentSandbox"),
        "owned by another kind": (_sandbox_pod(ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                                 "name": "x", "uid": "y", "controller": True}]),
                                  "not controlled by an AgentSandbox"),
    }
    for case, (pod, why) in refusals.items():
        with pytest.raises(csi.Refusal, match=why) as refused:
            csi.admit_pod(pod, ref, "node-a")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, case
    with pytest.raises(csi.Refusal, match="not bound to node node-b"):
        csi.admit_pod(_sandbox_pod(), ref, "node-b")


def test_the_sandbox_pod_takes_the_socket_from_the_csi_volume_read_only_and_has_no_host_path():
    pod = _sandbox_pod()
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[sandbox.AGENT_VOLUME] == {"name": sandbox.AGENT_VOLUME, "csi": {"driver": CSI_DRIVER, "readOnly": True}}
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])
    # What the Pod Security baseline standard refuses besides hostPath volumes:
    spec = pod["spec"]
    assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    for container in spec["containers"]:
        context = container.get("securityContext") or {}
        assert not context.get("privileged") and not (context.get("capabilities") or {}).get("add")
        assert not any("hostPort" in port for port in container.get("ports", []))


def test_mount_points_are_read_from_mountinfo():
    mountinfo = (f"36 35 0:30 / {TARGET} rw,nosuid - tmpfs tmpfs rw\n"
                 "37 35 0:31 / /with\\040space rw - tmpfs tmpfs rw\n")
    assert csi.is_mount_point(mountinfo, Path(TARGET))
    assert csi.is_mount_point(mountinfo, Path("/with space"))
    assert not csi.is_mount_point(mountinfo, Path(TARGET).parent)


def test_sockets_are_where_the_kubelet_looks():
    assert csi.registration_socket(ROOT) == ROOT / "plugins_registry" / f"{CSI_DRIVER}-reg.sock"
    assert csi.plugin_socket(ROOT) == ROOT / "plugins" / CSI_DRIVER / "csi.sock"


def test_the_charts_csidriver_is_the_node_agents():
    text = CHART_TEMPLATE.read_text()
    text = re.sub(r"^\s*\{\{.*\}\}\s*$", "", text, flags=re.M)  # the labels' include aside
    rendered = yaml.safe_load(re.sub(r"\{\{.*?\}\}", "NAME", text))  # and the name's
    expected = csi.csi_driver_object()
    assert rendered["spec"] == expected["spec"]
    # The name comes from the chart's one definition of it, which the node agent's DaemonSet uses too.
    helpers = (CHART_TEMPLATE.parent / "_helpers.tpl").read_text()
    defined = re.search(r'define "agentkube.csiDriver" -\}\}\s*(\S+)\s*\{\{-', helpers)
    assert defined and defined.group(1) == expected["metadata"]["name"] == CSI_DRIVER


def test_checked_in_stubs_match_the_checked_in_protos():
    assert csigen.stale() == [], "run `python -m agentkube.ebpf.csigen` and commit the result"


def test_protos_are_the_pinned_upstream_files():
    try:
        upstream = {name: csigen.upstream(name) for name in csigen.PROTO_SOURCES}
    except (OSError, RuntimeError) as error:  # no Go toolchain or module cache here
        pytest.skip(f"the Go modules are not reachable: {error}")
    for name, text in upstream.items():
        assert (csigen.PACKAGE_DIR / name).read_text() == text, f"run `python -m agentkube.ebpf.csigen --fetch` ({name})"
