"""Spot capacity on the local node (`agentkube dev up --with-capacity`): real Karpenter with its KWOK cloud
provider, and kwok, both built here from their Go modules (versions.KARPENTER, versions.KWOK).

- Karpenter runs as a pod on the real node, installed from its own chart (`kwok/charts` in its module,
  rendered by helm) with the image built here: its RBAC, probes and security context are Karpenter's.
  It runs as a pod rather than a host process because it listens on every address for metrics and health
  (no bind-address option), which in a pod is the pod's own network.
- Its instance types are written here: the simulator's on-demand and spot prices per node-hour
  (agentkube.rl.spot.SpotConfig), so that NodeClaims cost what the simulator assumes (Karpenter's own
  generated types price spot at 0.7 x on-demand).
- kwok runs as a host process as its own service account (kwok's RBAC from its module), gives the Nodes
  Karpenter creates (annotated `kwok.x-k8s.io/node: fake`) heartbeats and leases, and plays the lifecycle
  of pods bound to them with kwok's own Stages (node initialise and heartbeat, pod ready, complete and
  delete). It serves no port. Pods on those nodes never run: they are Running and Ready on paper only.
- The nodes Karpenter launches carry the taint of the NodePools the operator makes
  (agentkube.operator.capacity.DEDICATED_TAINT): only model-server pods tolerate it, so sandboxes, Knative's
  components and everything else stay on the real node.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from agentkube.devenv import images
from agentkube.devenv.install import module_source, require_binary
from agentkube.devenv.versions import KARPENTER, KWOK
from agentkube.rl.spot import SpotConfig

SYSTEM_NAMESPACE = "karpenter"
RELEASE = "karpenter"
IMAGE = f"dev.local/karpenter/controller:{KARPENTER.version}"
INSTANCE_TYPES_CONFIGMAP = "karpenter-instance-types"
INSTANCE_TYPES_MOUNT = "/etc/karpenter/instance-types"
INSTANCE_TYPES_FILE = "instance_types.json"
KWOK_NAMESPACE = "kube-system"  # where kwok's own RBAC puts its service account
KWOK_ACCOUNT = "kwok-controller"
# Which nodes kwok plays the kubelet of: those Karpenter's KWOK provider creates (never the real node).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node=fake"
# Addresses kwok hands out to pods on its nodes: nothing routes them (the node's pods are in 10.88/16,
# Services in 10.96/16), and the node's firewall forwards nothing off the machine.
KWOK_POD_CIDR = "10.250.0.0/16"
# kwok's Stages, by their path in its module: nodes become Ready and keep a lease; pods become Ready,
# complete, and go when deleted.
KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
NODE_LEASE_SECONDS = 40
KWOK_RBAC_FILES = ("kustomize/rbac/service_account.yaml", "kustomize/rbac/role.yaml", "kustomize/rbac/role_binding.yaml")
# The node class every NodePool names (KWOK's needs no settings).
NODE_CLASS = {"apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass", "metadata": {"name": "default"}}
# Instance types: the simulator's node (one model-server pod per GPU node, g5.xlarge class) and its
# multiples, in three zones; vCPU and memory as on AWS.
INSTANCE_SIZES = ((1, "4", "16Gi"), (2, "8", "32Gi"), (4, "16", "64Gi"))
ZONES = ("test-zone-a", "test-zone-b", "test-zone-c")


# ----- pure ---------------------------------------------------------------------------------------

def instance_types(spot: SpotConfig = SpotConfig()) -> list[dict[str, Any]]:
    """Karpenter's KWOK instance-types file: each size on demand and on spot in every zone, priced per
    node-hour at the simulator's on-demand price and its spot price (the same discount)."""
    types = []
    for gpus, cpu, memory in INSTANCE_SIZES:
        offerings = []
        for zone in ZONES:
            for capacity_type, price in (("spot", spot.spot_price_per_hour), ("on-demand", spot.on_demand_price_per_hour)):
                offerings.append({"Price": round(price * gpus, 6), "Available": True, "Requirements": [
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": [capacity_type]},
                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [zone]},
                ]})
        types.append({"name": f"gpu-{gpus}x-amd64-linux", "offerings": offerings, "architecture": "amd64",
                      "operatingSystems": ["linux"],
                      "resources": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus), "pods": "110"}})
    return types


def chart_values() -> dict[str, Any]:
    """Values for Karpenter's own chart: the local image, one replica (leader election stays on, as the
    chart has it), and the instance-types file from a ConfigMap."""
    repository, tag = IMAGE.rsplit(":", 1)
    return {
        "replicas": 1,
        "imagePullPolicy": "Never",
        "controller": {
            "image": {"repository": repository, "tag": tag, "digest": ""},
            "env": [{"name": "INSTANCE_TYPES_FILE_PATH", "value": f"{INSTANCE_TYPES_MOUNT}/{INSTANCE_TYPES_FILE}"}],
            "extraVolumeMounts": [{"name": "instance-types", "mountPath": INSTANCE_TYPES_MOUNT, "readOnly": True}],
            # Small requests: the node is shared by everything in the environment.
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        },
        "extraVolumes": [{"name": "instance-types", "configMap": {"name": INSTANCE_TYPES_CONFIGMAP}}],
        "serviceMonitor": {"enabled": False},
    }


def instance_types_configmap(spot: SpotConfig = SpotConfig()) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": INSTANCE_TYPES_CONFIGMAP, "namespace": SYSTEM_NAMESPACE},
            "data": {INSTANCE_TYPES_FILE: json.dumps(instance_types(spot), indent=1)}}


def kwok_config(stages: list[dict[str, Any]]) -> str:
    """kwok's --config file: its Stages (kwok takes them from its configuration when the Stage CRD is off)."""
    return yaml.safe_dump_all(stages)


def kwok_command(binary: Path, kubeconfig: Path, config: Path) -> list[str]:
    return [str(binary), f"--kubeconfig={kubeconfig}", f"--config={config}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}", f"--cidr={KWOK_POD_CIDR}",
            f"--node-lease-duration-seconds={NODE_LEASE_SECONDS}"]


# ----- I/O: module sources, chart, image ----------------------------------------------------------

def karpenter_source() -> Path:
    return module_source(KARPENTER.pin)


def kwok_source() -> Path:
    return module_source(KWOK.pin)


def crds() -> list[dict[str, Any]]:
    """Karpenter's CRDs (NodePool, NodeClaim, NodeOverlay, CapacityBuffer) and the KWOKNodeClass, as its module has them."""
    source = karpenter_source()
    paths = sorted((source / "pkg" / "apis" / "crds").glob("*.yaml")) + [
        source / "kwok" / "apis" / "crds" / "karpenter.kwok.sh_kwoknodeclasses.yaml"]
    return [document for path in paths for document in yaml.safe_load_all(path.read_text()) if document]


def kwok_stages() -> list[dict[str, Any]]:
    source = kwok_source()
    return [document for name in KWOK_STAGE_FILES for document in yaml.safe_load_all((source / name).read_text()) if document]


def kwok_rbac() -> list[dict[str, Any]]:
    source = kwok_source()
    documents = [document for name in KWOK_RBAC_FILES for document in yaml.safe_load_all((source / name).read_text()) if document]
    for document in documents:  # kustomize sets the namespace; the files leave it out
        if document["kind"] == "ServiceAccount":
            document["metadata"]["namespace"] = KWOK_NAMESPACE
        for subject in document.get("subjects") or []:
            subject.setdefault("namespace", KWOK_NAMESPACE)
    return documents


def chart_documents(environ: dict[str, str]) -> list[dict[str, Any]]:
    """Karpenter's chart rendered with `chart_values()`, without its CRDs (applied first, from the module)."""
    chart = karpenter_source() / "kwok" / "charts"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values:
        yaml.safe_dump(chart_values(), values)
        values.flush()
        result = subprocess.run([str(require_binary("helm")), "template", RELEASE, str(chart), "--namespace",
                                 SYSTEM_NAMESPACE, "--skip-crds", "-f", values.name],
                                capture_output=True, text=True, env=environ)
    if result.returncode != 0:
        raise RuntimeError(f"helm template of Karpenter's chart failed: {result.stderr[-2000:]}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def image_archive(binary: Path) -> Path:
    """Karpenter's image: its static binary alone (the chart sets the non-root user it runs as)."""
    key = json.dumps({"binary": hashlib.sha256(binary.read_bytes()).hexdigest(), "reference": IMAGE})

    def build(scratch: Path) -> None:
        root = scratch / "rootfs"
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "karpenter").write_bytes(binary.read_bytes())
        (root / "bin" / "karpenter").chmod(0o755)
        layers = [images.layer(images.tar_directory(root, scratch / "layer.tar"))]
        config = {"Entrypoint": ["/bin/karpenter"], "Env": [images.PATH_ENV], "WorkingDir": "/"}
        images.write_oci_archive(scratch / "out.tar", layers, config, IMAGE)

    return images.cached_build("karpenter", key, build)
