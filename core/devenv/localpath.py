"""The local node's volumes: rancher's local-path-provisioner (the provisioner kind and k3s ship), built
from its Go module and run as a host process. Pure builders of its configuration, objects and command
line; `cluster` writes and applies them.

What the provisioner does (read from v0.0.30's source and sig-storage-lib-external-provisioner v10): it
watches PersistentVolumeClaims, PersistentVolumes and StorageClasses; for a claim of its class that the
scheduler placed on a node (WaitForFirstConsumer) it gets that Node, runs a helper pod on it that makes
the volume's directory under a hostPath of the parent, waits for it to succeed (polling it with get),
deletes it, and creates a hostPath PersistentVolume with node affinity; when a volume is released it runs
a helper pod that removes the directory and deletes the PersistentVolume. It records events on claims and
volumes, and it may clear the scheduler's node annotation on a claim (update) to have it rescheduled.
Everything else (its config, the helper pod's template) it reads from files we give it, so it needs no
access to ConfigMaps. The helper pods' logs it reads only when in a cluster (in-cluster config), so out of
cluster it needs no pods/log either.

The helper pod runs our own sandbox image (it has /bin/sh, mkdir and rm), already imported into the
node's containerd and never pulled: busybox, the default, would have to come from a registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

PROVISIONER_NAME = "rancher.io/local-path"
STORAGE_CLASS = "local-path"
NAMESPACE = "local-path-storage"
# The helper pods' service account: they talk to no API, so it is bound to nothing and its token is not mounted.
HELPER_SERVICE_ACCOUNT = "local-path-helper"
# Holds the setup/teardown scripts that the helper pods mount (the provisioner names it in their volumes).
SCRIPTS_CONFIGMAP = "local-path-config"
HELPER_POD_NAME = "helper-pod"  # the provisioner appends "-<action>-<volume>"
HELPER_TIMEOUT_SECONDS = 120

# The directory is world-writable, as upstream's script makes it: a hostPath volume gets no fsGroup, and
# the sandbox runs as its own non-root user.
SETUP_SCRIPT = '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n'
TEARDOWN_SCRIPT = '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n'


def data_dir(node_root: Path) -> Path:
    """Where the volumes live: under the environment's directory, so that `dev down` removes them."""
    return node_root / "local-path"


def provisioner_config(volumes: Path) -> dict[str, Any]:
    """config.json: every node keeps its volumes in `volumes`."""
    return {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(volumes)]}],
            "cmdTimeoutSeconds": HELPER_TIMEOUT_SECONDS}


def helper_pod(image: str) -> dict[str, Any]:
    """The template the provisioner fills in (command, env, the hostPath and scripts volumes, node)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": HELPER_POD_NAME},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "helper-pod",  # the provisioner reads logs from a container of this name
                "image": image,
                "imagePullPolicy": "Never",  # built here and imported; there is no registry to pull from
                # The parent directory is root's (the kubelet creates the hostPath): the sandbox image's
                # default user could not make a directory in it.
                "securityContext": {"runAsUser": 0, "runAsGroup": 0, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]}},
            }],
        },
    }


def provisioner_rbac(user: str) -> list[dict[str, Any]]:
    """Least privilege for what the provisioner does (module docstring): cluster-wide on volumes, claims,
    classes, nodes and events; pods only in its own namespace."""
    name = "agentkube:local-path-provisioner"
    cluster_role: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "update"]},
            {"apiGroups": [""], "resources": ["persistentvolumes"],
             "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
            {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }
    role: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "create", "delete"]}],
    }
    subject = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    return [
        cluster_role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": subject},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": subject},
    ]


def objects(user: str) -> list[dict[str, Any]]:
    """Everything the provisioner and its helper pods need in the API, and the default StorageClass."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": HELPER_SERVICE_ACCOUNT, "namespace": NAMESPACE},
         "automountServiceAccountToken": False},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": SCRIPTS_CONFIGMAP, "namespace": NAMESPACE},
         "data": {"setup": SETUP_SCRIPT, "teardown": TEARDOWN_SCRIPT}},
        *provisioner_rbac(user),
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            # The default class: a claim that names none (a sandbox's workspace by default) gets one.
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER_NAME,
            # The directory is made on the node the pod is scheduled to, so the claim waits for the pod.
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    ]


def config_files(volumes: Path, image: str) -> dict[str, str]:
    """The files the command line names, by file name."""
    return {"config.json": json.dumps(provisioner_config(volumes), indent=2),
            "helperPod.yaml": yaml.safe_dump(helper_pod(image))}


def command(binary: Path, kubeconfig: Path, config_dir: Path, image: str) -> list[str]:
    return [
        str(binary), "start",
        f"--kubeconfig={kubeconfig}",
        f"--config={config_dir / 'config.json'}",
        f"--helper-pod-file={config_dir / 'helperPod.yaml'}",
        # Required by its flag parsing; the image actually run is the helper pod template's.
        f"--helper-image={image}",
        f"--namespace={NAMESPACE}",
        f"--service-account-name={HELPER_SERVICE_ACCOUNT}",
        f"--configmap-name={SCRIPTS_CONFIGMAP}",
        f"--provisioner-name={PROVISIONER_NAME}",
    ]
