"""The node agent's CSI node plugin: it delivers the directory of the agent's sandbox socket into sandbox pods
as a read-only CSI ephemeral inline volume, as spiffe-csi-driver delivers the SPIFFE workload API socket, so
that sandbox pods need no hostPath and are admitted under the Pod Security `baseline` standard.

The kubelet finds the plugin through its plugin registration API: the agent itself serves `Registration` on
`<kubelet-root>/plugins_registry/<driver>-reg.sock` (what node-driver-registrar does for other drivers) and
names `<kubelet-root>/plugins/<driver>/csi.sock` as the CSI endpoint. Only what ephemeral inline volumes need
is served: Identity, and the Node service's info, capabilities, publish and unpublish; every other call is
UNIMPLEMENTED.

Who gets the socket. The volume carries nothing but that directory, read-only, and the socket itself answers
a request only from a registered sandbox's runtime or its tool calls (by the caller's cgroup): that, not this
plugin, is the security boundary. Still, the plugin refuses (PERMISSION_DENIED, the pod stays in
ContainerCreating with a FailedMount event) every pod that is not an agentkube sandbox on this node. The
kubelet passes only the pod's name, namespace, UID and service account (CSIDriver `podInfoOnMount: true`), not
its labels, so the plugin reads the pod from the API server and checks its UID, node, sandbox label and that an
AgentSandbox (or, for a warm pod, an AgentSandboxPool) controls it. Whoever may create pods can write both of
the last two, so this keeps mistakes and curious pods away from the socket; it does not stand in for the socket's own authorization.

Decisions (is this request acceptable, is this pod a sandbox) are pure functions; mounting and reading the
pod are the edges.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc

from agentkube.contract import CSI_DRIVER, SANDBOX_AGENT_SOCKET, SANDBOX_LABEL
from agentkube.ebpf.csiproto import csi_pb2, csi_pb2_grpc, pluginregistration_pb2, pluginregistration_pb2_grpc

log = logging.getLogger("agentkube.node-agent.csi")

# What the kubelet adds to an inline volume's context when the CSIDriver says `podInfoOnMount: true`
# (k8s.io/kubernetes pkg/volume/csi getPodInfoAttrs); its values override any the pod spec sets.
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT_KEY = "csi.storage.k8s.io/serviceAccount.name"
KUBELET_KEYS = frozenset({EPHEMERAL_KEY, POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY, SERVICE_ACCOUNT_KEY})
# The registration API's plugin type for CSI drivers, and the CSI versions this plugin speaks.
CSI_PLUGIN_TYPE = "CSIPlugin"
SUPPORTED_VERSIONS = ["1.0.0"]
# A published volume is the kubelet's <root>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount.
TARGET_SHAPE = re.compile(r"(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/volumes/"
                          r"kubernetes\.io~csi/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/mount")
SINGLE_NODE_MODES = frozenset({
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,  # what the kubelet asks for an inline volume
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER,
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER,
})
AGENTSANDBOX_API_GROUP = "agentkube.dev"


class Refusal(Exception):
    """A request the plugin refuses: the gRPC status the kubelet gets, and why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Publish:
    """An accepted NodePublishVolume: bind the socket directory read-only onto `target`, for `pod`."""

    volume_id: str
    target: Path
    pod: PodRef


def csi_driver_object(driver: str = CSI_DRIVER) -> dict[str, Any]:
    """The CSIDriver the kubelet reads before it calls the plugin (the chart's templates/csidriver.yaml is
    the same object; a unit test keeps them in step)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIDriver",
        "metadata": {"name": driver},
        "spec": {
            "attachRequired": False,  # nothing to attach: the kubelet calls NodePublishVolume directly
            "podInfoOnMount": True,  # the pod's name, namespace and UID, and the ephemeral flag, in the request
            "volumeLifecycleModes": ["Ephemeral"],  # inline in a pod only: no PersistentVolume can name it
            "fsGroupPolicy": "None",  # the kubelet must never chown or chmod the node agent's socket directory
            "requiresRepublish": False,
            "storageCapacity": False,
        },
    }


def plugin_socket(kubelet_root: Path, driver: str = CSI_DRIVER) -> Path:
    return Path(kubelet_root) / "plugins" / driver / "csi.sock"


def registration_socket(kubelet_root: Path, driver: str = CSI_DRIVER) -> Path:
    return Path(kubelet_root) / "plugins_registry" / f"{driver}-reg.sock"


def _target(target_path: str, kubelet_root: Path) -> tuple[Path, str]:
    """The target path, if it is a CSI volume's mount directory in a pod's directory under the kubelet's
    pods dir, and that pod's UID. Written exactly as the kubelet writes it: no `..`, no doubled slashes."""
    if not target_path:
        raise _invalid("target_path is required")
    if not target_path.startswith("/") or os.path.normpath(target_path) != target_path:
        raise _invalid(f"target_path {target_path!r} is not an absolute, normalized path")
    pods = str(Path(kubelet_root) / "pods") + "/"
    match = TARGET_SHAPE.fullmatch(target_path[len(pods):]) if target_path.startswith(pods) else None
    if match is None:
        raise _invalid(f"target_path {target_path!r} is not a CSI volume's mount directory under {pods}")
    return Path(target_path), match["uid"]


def publish_request(request: csi_pb2.NodePublishVolumeRequest, kubelet_root: Path) -> Publish:
    """Accept a NodePublishVolume only in the form the kubelet sends for this driver's inline volume, or raise
    Refusal (INVALID_ARGUMENT: the request can never succeed as it is)."""
    if not request.volume_id:
        raise _invalid("volume_id is required")
    context = dict(request.volume_context)
    if context.get(EPHEMERAL_KEY) != "true":
        raise _invalid(f"only ephemeral inline volumes are served ({EPHEMERAL_KEY}: \"true\"; the CSIDriver must "
                       "say podInfoOnMount: true)")
    unknown = sorted(context.keys() - KUBELET_KEYS)
    if unknown:
        raise _invalid(f"the volume takes no attributes; got {', '.join(unknown)}")
    missing = [key for key in (POD_NAMESPACE_KEY, POD_NAME_KEY, POD_UID_KEY) if not context.get(key)]
    if missing:
        raise _invalid(f"the pod's identity is missing from the volume context: {', '.join(missing)}")
    if not request.readonly:
        raise _invalid("the volume is read-only: set readOnly: true on the pod's csi volume")
    capability = request.volume_capability
    if not request.HasField("volume_capability") or capability.WhichOneof("access_type") != "mount":
        raise _invalid("only a mount volume capability is served (no block volumes)")
    if capability.access_mode.mode not in SINGLE_NODE_MODES:
        raise _invalid("only single-node access modes are served")
    if capability.mount.fs_type or capability.mount.mount_flags or capability.mount.volume_mount_group:
        raise _invalid("the volume takes no fsType, mount flags or mount group")
    if request.staging_target_path or request.publish_context:
        raise _invalid("the volume is neither staged nor controller-published")
    if request.secrets:
        raise _invalid("the volume takes no secrets")
    target, uid = _target(request.target_path, kubelet_root)
    if uid != context[POD_UID_KEY]:
        raise _invalid(f"target_path {request.target_path!r} is not in the directory of pod {context[POD_UID_KEY]}")
    return Publish(request.volume_id, target, PodRef(context[POD_NAMESPACE_KEY], context[POD_NAME_KEY], context[POD_UID_KEY]))


def unpublish_target(request: csi_pb2.NodeUnpublishVolumeRequest, kubelet_root: Path) -> Path:
    """The directory a NodeUnpublishVolume may unmount and remove: only a CSI volume's mount directory of a pod."""
    if not request.volume_id:
        raise _invalid("volume_id is required")
    return _target(request.target_path, kubelet_root)[0]


# Who may control a sandbox pod: an AgentSandbox, or an AgentSandboxPool while the pod waits warm (the
# sandbox that adopts it takes over as controller, without remounting anything).
CONTROLLER_KINDS = ("AgentSandbox", "AgentSandboxPool")


def admit_pod(pod: dict[str, Any] | None, ref: PodRef, node_name: str) -> None:
    """Raise Refusal (PERMISSION_DENIED) unless `pod` (as read from the API server) is the pod the kubelet
    named, bound to this node, an agentkube sandbox pod controlled by an AgentSandbox."""
    if pod is None:
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref.key} does not exist")
    metadata_ = pod.get("metadata") or {}
    if metadata_.get("uid") != ref.uid:
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref.key} is not the pod {ref.uid} (replaced?)")
    if (pod.get("spec") or {}).get("nodeName") != node_name:
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref.key} is not bound to node {node_name}")
    if not (metadata_.get("labels") or {}).get(SANDBOX_LABEL):
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                      f"pod {ref.key} is not an agentkube sandbox (no {SANDBOX_LABEL} label): the node agent's socket "
                      "is only for sandbox pods")
    controller = next((o for o in metadata_.get("ownerReferences") or [] if o.get("controller")), None)
    if controller is None or controller.get("kind") not in CONTROLLER_KINDS \
            or str(controller.get("apiVersion", "")).split("/")[0] != AGENTSANDBOX_API_GROUP:
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref.key} is not controlled by an AgentSandbox"
                      " (or an AgentSandboxPool: its warm pods)")


def is_mount_point(mountinfo: str, path: Path) -> bool:
    """Whether `path` is a mount point in a /proc/self/mountinfo text (a bind mount of a directory on the
    same filesystem is invisible to os.path.ismount)."""
    wanted = str(path)
    return any(line.split()[4].encode().decode("unicode_escape") == wanted for line in mountinfo.splitlines() if line)


# ----- the edges: mounts, the pod's lookup, the gRPC servers ----------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x8, 0x20, 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind `source` onto `target`, then make that mount read-only, nosuid, nodev and noexec (a bind mount
    takes its flags only on a remount)."""
    _check(_libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None), f"bind {source} on {target}")
    try:
        _check(_libc.mount(None, str(target).encode(), None,
                           MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
               f"remount {target} read-only")
    except OSError:
        _libc.umount2(str(target).encode(), 0)  # never leave it writable
        raise


def unmount(target: Path) -> None:
    """Unmount `target`; not mounted or not there is fine (unpublish is idempotent)."""
    if _libc.umount2(str(target).encode(), 0) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        error = ctypes.get_errno()
        raise OSError(error, f"unmount {target}: {os.strerror(error)}")


def _mounted(path: Path) -> bool:
    return is_mount_point(Path("/proc/self/mountinfo").read_text(), path)


PodLookup = Callable[[str, str], "dict[str, Any] | None"]  # (namespace, name) -> the pod, or None if there is none


def api_pod_lookup(core) -> PodLookup:
    """Read a pod from the API server with the node agent's client (`get` on pods, which it has anyway)."""
    import json

    from kubernetes.client.exceptions import ApiException

    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(core.read_namespaced_pod(name, namespace, _preload_content=False).data)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
    return lookup


class NodePlugin(csi_pb2_grpc.IdentityServicer, csi_pb2_grpc.NodeServicer):
    """The CSI Identity and Node services; each RPC validates, decides, then touches the node."""

    def __init__(self, node_name: str, kubelet_root: Path, lookup: PodLookup, driver: str = CSI_DRIVER,
                 source: Path = SANDBOX_AGENT_SOCKET.parent):
        self.node_name, self.kubelet_root, self.lookup = node_name, Path(kubelet_root), lookup
        self.driver, self.source = driver, Path(source)

    @staticmethod
    def _refuse(context: grpc.ServicerContext, refusal: Refusal, what: str):
        log.warning("%s refused: %s", what, refusal.message)
        context.abort(refusal.code, refusal.message)

    # Identity
    def GetPluginInfo(self, request, context):
        try:
            version = metadata.version("agentkube")
        except metadata.PackageNotFoundError:
            version = "0"
        return csi_pb2.GetPluginInfoResponse(name=self.driver, vendor_version=version)

    def GetPluginCapabilities(self, request, context):
        return csi_pb2.GetPluginCapabilitiesResponse()  # no controller service, no topology

    def Probe(self, request, context):
        ready = csi_pb2.ProbeResponse()
        ready.ready.value = self.source.is_dir()
        return ready

    # Node
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_name)

    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse()  # no staging, no stats, no expansion, no mount group

    def NodePublishVolume(self, request, context):
        try:
            publish = publish_request(request, self.kubelet_root)
            try:
                pod = self.lookup(publish.pod.namespace, publish.pod.name)
            except Exception as error:  # the API server away: the kubelet retries
                raise Refusal(grpc.StatusCode.UNAVAILABLE, f"reading pod {publish.pod.key}: {error}") from None
            admit_pod(pod, publish.pod, self.node_name)
        except Refusal as refusal:
            return self._refuse(context, refusal, f"NodePublishVolume {request.volume_id} at {request.target_path}")
        target = publish.target
        if _mounted(target):
            return csi_pb2.NodePublishVolumeResponse()  # published before: same request, same answer
        if not self.source.is_dir():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the node agent's socket directory {self.source} is not there yet")
        try:
            target.mkdir(mode=0o755, exist_ok=True)  # the kubelet made its parent; the target is the plugin's
            bind_read_only(self.source, target)
        except OSError as error:
            context.abort(grpc.StatusCode.INTERNAL, str(error))
        log.info("published %s into pod %s (%s)", self.source, publish.pod.key, publish.volume_id)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        try:
            target = unpublish_target(request, self.kubelet_root)
        except Refusal as refusal:
            return self._refuse(context, refusal, f"NodeUnpublishVolume {request.volume_id} at {request.target_path}")
        try:
            while _mounted(target):  # a mount stacked by a retried publish goes too
                unmount(target)
            if target.is_dir():
                target.rmdir()  # empty once unmounted; never a recursive delete under the kubelet's pods
        except OSError as error:
            context.abort(grpc.StatusCode.INTERNAL, str(error))
        log.info("unpublished %s (%s)", target, request.volume_id)
        return csi_pb2.NodeUnpublishVolumeResponse()


class Registration(pluginregistration_pb2_grpc.RegistrationServicer):
    """The kubelet's plugin registration API: which driver this is and where its CSI socket is."""

    def __init__(self, driver: str, endpoint: Path):
        self.driver, self.endpoint = driver, endpoint
        self.registered = False

    def GetInfo(self, request, context):
        return pluginregistration_pb2.PluginInfo(type=CSI_PLUGIN_TYPE, name=self.driver, endpoint=str(self.endpoint),
                                                 supported_versions=SUPPORTED_VERSIONS)

    def NotifyRegistrationStatus(self, request, context):
        self.registered = request.plugin_registered
        if request.plugin_registered:
            log.info("the kubelet registered CSI driver %s", self.driver)
        else:
            log.error("the kubelet refused CSI driver %s: %s", self.driver, request.error)
        return pluginregistration_pb2.RegistrationStatusResponse()


def _listen(server: grpc.Server, path: Path) -> None:
    path.unlink(missing_ok=True)  # a previous agent's socket
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"cannot listen on {path}")


class CSIPluginServer:
    """The plugin's two gRPC servers: the CSI services on the plugin socket and the registration service on
    the kubelet's registry socket (two servers, so that neither socket answers the other's calls). Only root
    reaches either: the sockets are 0600 (the plugin's directory 0700)."""

    def __init__(self, plugin: NodePlugin):
        self.plugin = plugin
        self.csi_socket = plugin_socket(plugin.kubelet_root, plugin.driver)
        self.registration_socket = registration_socket(plugin.kubelet_root, plugin.driver)
        self.registration = Registration(plugin.driver, self.csi_socket)
        self.servers: list[grpc.Server] = []

    def start(self) -> None:
        self.csi_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registration_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        csi = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="csi"))
        csi_pb2_grpc.add_IdentityServicer_to_server(self.plugin, csi)
        csi_pb2_grpc.add_NodeServicer_to_server(self.plugin, csi)
        _listen(csi, self.csi_socket)
        csi.start()
        self.servers.append(csi)
        os.chmod(self.csi_socket, 0o600)
        # Registration last: the kubelet calls the CSI socket as soon as it has read the registry's.
        registry = grpc.server(futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="csi-registration"))
        pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(self.registration, registry)
        _listen(registry, self.registration_socket)
        registry.start()
        self.servers.append(registry)
        os.chmod(self.registration_socket, 0o600)
        log.info("CSI driver %s on %s, registering through %s", self.plugin.driver, self.csi_socket,
                 self.registration_socket)

    def stop(self) -> None:
        """Stop serving and remove both sockets (the kubelet deregisters the driver when the registry's
        goes). Published volumes stay mounted: their pods keep the socket across an agent restart."""
        for server in reversed(self.servers):
            server.stop(grace=1.0).wait()
        self.servers = []
        self.registration_socket.unlink(missing_ok=True)
        self.csi_socket.unlink(missing_ok=True)
