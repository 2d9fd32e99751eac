"""Knative Serving on the local node, built here from its Go module (`agentkube dev up --with-knative`).

- Programs: controller, autoscaler, activator, webhook and queue-proxy from `knative.dev/serving` at the
  pin in versions.py (install.ensure_knative).
- Images: one layer each, the static binary at /ko-app/<name> (where ko, Knative's own image builder,
  puts it) and a passwd naming the non-root user the image runs as; named under `dev.local`, which
  Knative's `registries-skipping-tag-resolving` default lists, so no registry is ever asked for a digest.
- Manifests: Knative's own CRDs, RBAC, config, Deployments and webhook configurations, read from the
  module cache at install time (not copied into this repository): `config/core` of knative.dev/serving plus
  the files that repository links in as symlinks, which Go module zips drop — the networking CRDs and
  `config-network` from knative.dev/networking and the caching `Image` CRD from knative.dev/caching, at the
  versions serving's go.mod requires. Only what must differ here is changed: the images, and metrics in
  Prometheus format (off by default in Knative >= 1.19).

The networking layer (KIngress) is Traefik's Knative provider, run as a host process like CoreDNS (built
by hack/traefik/build.sh): it programs its routes from Knative's Ingress objects and marks them ready, so
Routes and Services become Ready and the Service's URL answers in the cluster.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from agentkube.devenv import images
from agentkube.devenv.versions import KNATIVE_COMMANDS, KNATIVE_SERVING, cache_root

SYSTEM_NAMESPACE = "knative-serving"
IMAGE_REPOSITORY = "dev.local/knative"
KO_PREFIX = "ko://knative.dev/serving/cmd/"
BINARY_DIR = "ko-app"
# Knative's Deployments in the order they become useful: the webhook first (everything else is admitted
# through it), then the reconcilers and the data path.
DEPLOYMENTS = ("webhook", "controller", "autoscaler", "activator")
# What makes the components expose Prometheus' text format: components on :9090 (`metrics`), the
# queue-proxy's request metrics on :9091 (`http-usermetric`). Knative >= 1.19 defaults both to OTLP push.
OBSERVABILITY = {"metrics-protocol": "prometheus", "request-metrics-protocol": "prometheus"}
# The pod-spec fields a ServedModel's placement on spot and on-demand capacity uses
# (agentkube.operator.capacity): Knative's webhook refuses them in a revision unless these are on.
PODSPEC_FEATURES = {"kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "enabled",
                    "kubernetes.podspec-topologyspreadconstraints": "enabled"}
# Traefik's Knative provider answers for Ingresses of this class (config-network's `ingress-class`).
TRAEFIK_INGRESS_CLASS = "traefik.ingress.networking.knative.dev"
TRAEFIK_SERVICE = "traefik"
TRAEFIK_ACCOUNT = "traefik"
TRAEFIK_HTTP_PORT = 80  # the Service's port; Traefik itself listens on the node's address at a free port
# The pod ports Prometheus scrapes (by the name Knative's manifests and the revision reconciler give them).
METRICS_PORT_NAMES = ("metrics", "http-usermetric")


class KnativeError(RuntimeError):
    """Knative could not be installed; the message says which step and why."""


def image_reference(command: str) -> str:
    return f"{IMAGE_REPOSITORY}/{command}:{KNATIVE_SERVING.version}"


def images_by_ko_path() -> dict[str, str]:
    """ko's placeholders in Knative's manifests → the images built here."""
    return {f"{KO_PREFIX}{command}": image_reference(command) for command in KNATIVE_COMMANDS}


# ----- manifests (pure) -----------------------------------------------------------------------------

def manifest_files(serving: Path, networking: Path, caching: Path) -> list[Path]:
    """Knative's install, in the order `ko resolve -R -f config/core` emits it (paths sorted: namespace,
    RBAC, CRDs, config, Deployments, and the webhook configurations last, so that nothing before them
    waits on a webhook that is not running yet), with the symlinked files in the places they link into.
    The HPAs of the activator and webhook are left out: no metrics server runs here to feed them."""
    core = serving / "config" / "core"
    files = {path.relative_to(core).as_posix(): path for path in core.rglob("*.yaml") if not path.name.endswith("-hpa.yaml")}
    for name in ("certificate", "domain-claim", "ingress", "serverlessservice"):
        files[f"300-resources/{name}.yaml"] = networking / "config" / f"{name}.yaml"
    files["configmaps/network.yaml"] = networking / "config" / "config-network.yaml"
    files["300-resources/image.yaml"] = caching / "config" / "image.yaml"
    return [files[name] for name in sorted(files)]


def _replace_images(node: Any, replacements: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _replace_images(value, replacements) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_images(value, replacements) for value in node]
    if isinstance(node, str) and node in replacements:
        return replacements[node]
    return node


def adapt(documents: Iterable[dict[str, Any] | None], replacements: dict[str, str]) -> list[dict[str, Any]]:
    """Knative's documents as installed here: ko placeholders become the local images, Prometheus metrics
    are on, and so are the pod-spec fields of capacity placement. Everything else stays as Knative ships it."""
    adapted = []
    for document in documents:
        if not document:
            continue
        document = _replace_images(copy.deepcopy(document), replacements)
        if document.get("kind") == "ConfigMap" and document["metadata"].get("name") == "config-observability":
            document.setdefault("data", {}).update(OBSERVABILITY)
        if document.get("kind") == "ConfigMap" and document["metadata"].get("name") == "config-features":
            document.setdefault("data", {}).update(PODSPEC_FEATURES)
        if document.get("kind") == "ConfigMap" and document["metadata"].get("name") == "config-network":
            document.setdefault("data", {})["ingress-class"] = TRAEFIK_INGRESS_CLASS
        adapted.append(document)
    unresolved = [ref for ref in re.findall(r"ko://\S+", json.dumps(adapted))]
    if unresolved:
        raise KnativeError(f"ko placeholders without a local image: {sorted(set(unresolved))}")
    return adapted


def admission_probe() -> dict[str, Any]:
    """A minimal Knative Service, sent as a server-side dry run to learn whether Knative's webhook admits."""
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "metadata": {"name": "admission-probe", "namespace": "default"},
            "spec": {"template": {"spec": {"containers": [{"image": image_reference("queue")}]}}}}


def traefik_objects(node_ip: str, node_name: str, port: int, endpointslice_manager: str) -> list[dict[str, Any]]:
    """Traefik's identity (a service account with what its Knative provider reads and writes: Knative's
    Ingresses and their status, Services for the backends' ClusterIPs, Secrets for TLS), and the Service
    Knative names as the Ingresses' load balancer: without a selector (Traefik is a host process), its
    EndpointSlice points at the node's address, where Traefik listens."""
    name = "agentkube:traefik-knative"
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": TRAEFIK_SERVICE, "namespace": SYSTEM_NAMESPACE},
               "spec": {"ports": [{"name": "http", "port": TRAEFIK_HTTP_PORT, "targetPort": port, "protocol": "TCP"}]}}
    endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": f"{TRAEFIK_SERVICE}-host", "namespace": SYSTEM_NAMESPACE,
                              "labels": {"kubernetes.io/service-name": TRAEFIK_SERVICE,
                                         "endpointslice.kubernetes.io/managed-by": endpointslice_manager}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}, "nodeName": node_name}],
                 "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": TRAEFIK_ACCOUNT, "namespace": SYSTEM_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": [
            {"apiGroups": ["networking.internal.knative.dev"], "resources": ["ingresses"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.internal.knative.dev"], "resources": ["ingresses/status"], "verbs": ["update"]},
            {"apiGroups": [""], "resources": ["services", "secrets"], "verbs": ["get", "list", "watch"]},
        ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": TRAEFIK_ACCOUNT, "namespace": SYSTEM_NAMESPACE}]},
        service, endpoints,
    ]


def traefik_config(listen: str, api_server: str, token: str, ca_file: str) -> dict[str, Any]:
    """Traefik's static configuration: one entry point for public and cluster-local Ingresses alike (the
    node has no outside), the Knative provider as the service account, and the Service above as the
    load balancer it reports to Knative."""
    service = {"name": TRAEFIK_SERVICE, "namespace": SYSTEM_NAMESPACE}
    return {
        "entryPoints": {"web": {"address": listen}},
        "experimental": {"knative": True},
        "providers": {"knative": {"endpoint": api_server, "token": token, "certAuthFilePath": ca_file,
                                  "publicEntrypoints": ["web"], "privateEntrypoints": ["web"],
                                  "publicService": service, "privateService": service}},
        "log": {"level": "INFO"},
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
    }


def pod_discovery_rbac(user: str) -> list[dict[str, Any]]:
    """Read-only access to pods for the environment's target discovery (pod IPs change with every
    revision pod; nothing else is needed to find the metrics ports), as the Prometheus identity."""
    name = "agentkube:prometheus-pod-discovery"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
    ]


def scrape_target_groups(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups for Knative's metrics ports (its components' and every revision's
    queue-proxy's) on running pods, each labelled with the pod's namespace, name and container. Debian's
    Prometheus is built without Kubernetes service discovery, so the environment lists pods itself."""
    groups = []
    for pod in pods:
        metadata, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in spec.get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") in METRICS_PORT_NAMES:
                    groups.append({"targets": [f"{status['podIP']}:{port['containerPort']}"],
                                   "labels": {"job": "knative", "namespace": metadata.get("namespace", ""),
                                              "pod": metadata.get("name", ""), "container": container.get("name", "")}})
    return sorted(groups, key=lambda group: group["targets"][0])


# ----- I/O: module sources, images -----------------------------------------------------------------

def _module_dirs(*modules: str, cwd: Path | None = None) -> dict[str, Path]:
    """Module path → its source in the module cache. Run inside serving's module (`cwd`), a bare module path
    means the version serving's go.mod requires, checked against serving's go.sum (the checksum database
    has no record of some of the pseudo-versions it pins)."""
    result = subprocess.run(["go", "mod", "download", "-json", *modules], capture_output=True, text=True,
                            cwd=cwd or tempfile.gettempdir())
    if result.returncode != 0:
        raise KnativeError(f"`go mod download {' '.join(modules)}` failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")
    decoder, text, found, position = json.JSONDecoder(), result.stdout, {}, 0
    while position < len(text.rstrip()):
        info, position = decoder.raw_decode(text, position)
        found[info["Path"]] = Path(info["Dir"])
        while position < len(text) and text[position].isspace():
            position += 1
    return found


def load_documents() -> list[dict[str, Any]]:
    """Knative's install for the pinned serving module, adapted to this environment."""
    serving = _module_dirs(KNATIVE_SERVING.pin)[KNATIVE_SERVING.module]
    linked = _module_dirs("knative.dev/networking", "knative.dev/caching", cwd=serving)
    documents: list[dict[str, Any] | None] = []
    for path in manifest_files(serving, linked["knative.dev/networking"], linked["knative.dev/caching"]):
        documents.extend(yaml.safe_load_all(path.read_text()))
    return adapt(documents, images_by_ko_path())


def crds_file() -> Path:
    """Knative Serving's own CustomResourceDefinitions, for the tests that run no Knative controller: the API
    server stores and prunes what the operator writes exactly as under a real Knative (only the admission
    webhook's validation is missing there). Written once per serving version into the cache."""
    path = cache_root() / f"knative-serving-crds-{KNATIVE_SERVING.version}.yaml"
    if not path.exists():
        crds = [document for document in load_documents() if document["kind"] == "CustomResourceDefinition"]
        partial = path.with_suffix(f".{os.getpid()}")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(yaml.safe_dump_all(crds))
        partial.replace(path)  # atomic: a concurrent test run reads the whole file or writes its own
    return path


def image_archive(command: str, binary: Path) -> Path:
    """The OCI archive of one Knative program: its binary and a passwd naming the user it runs as (numeric
    in the image config, so the kubelet can check `runAsNonRoot`)."""
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    reference = image_reference(command)
    key = json.dumps({"binary": digest, "reference": reference, "uid": images.NONROOT_UID})

    def build(scratch: Path) -> None:
        root = scratch / "rootfs"
        (root / BINARY_DIR).mkdir(parents=True)
        (root / BINARY_DIR / command).write_bytes(binary.read_bytes())
        (root / BINARY_DIR / command).chmod(0o755)
        passwd, group = images.with_nonroot_user("root:x:0:0:root:/root:/usr/sbin/nologin\n", "root:x:0:\n")
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text(passwd)
        (root / "etc" / "group").write_text(group)
        layers = [images.layer(images.tar_directory(root, scratch / "layer.tar"))]
        config = {"Entrypoint": [f"/{BINARY_DIR}/{command}"], "User": f"{images.NONROOT_UID}:{images.NONROOT_UID}",
                  "Env": [images.PATH_ENV, "KO_DATA_PATH=/var/run/ko"], "WorkingDir": "/"}
        images.write_oci_archive(scratch / "out.tar", layers, config, reference)

    return images.cached_build(f"knative-{command}", key, build)


def image_archives(binaries: dict[str, Path]) -> list[Path]:
    return [image_archive(command, binaries[command]) for command in KNATIVE_COMMANDS]


def watch_scrape_targets(kubeconfig: Path, target_file: Path, interval_s: float = 2.0) -> None:
    """Keep `target_file` (a file_sd file Prometheus watches) equal to the Knative metrics ports of the
    running pods; runs until killed. Polls: the list is small, and polling rides out API server restarts."""
    import time

    import kubernetes

    api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(kubeconfig)))
    written = None
    while True:
        try:
            pods = api.list_pod_for_all_namespaces(_request_timeout=10).to_dict()["items"]
            groups = scrape_target_groups(_camel(pod) for pod in pods)
            if groups != written:
                partial = target_file.with_name(target_file.name + ".partial")
                partial.write_text(json.dumps(groups))
                partial.replace(target_file)
                written = groups
        except Exception as error:  # an API server restart must not end discovery
            print(f"listing pods failed: {error}", flush=True)
        time.sleep(interval_s)


def _camel(pod: dict[str, Any]) -> dict[str, Any]:
    """The fields scrape_target_groups reads, from the client's snake_case model dict."""
    return {"metadata": pod["metadata"],
            "spec": {"containers": [{"name": c["name"], "ports": [{"name": p.get("name"), "containerPort": p["container_port"]}
                                                                  for p in c.get("ports") or []]}
                                    for c in pod["spec"]["containers"]]},
            "status": {"phase": pod["status"]["phase"], "podIP": pod["status"].get("pod_ip")}}
