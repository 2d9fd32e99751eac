"""AgentSandbox decisions, as pure functions: the child objects a sandbox wants, and what its lifecycle
asks for right now (run, suspend, expire). The handlers only read, call these, and apply."""

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agentkube.contract import (
    CLAIMED_BY_LABEL,
    CLUSTER_DOMAIN,
    CONTAINER_NAME,
    CSI_DRIVER,
    GATEWAY_LABELS,
    LAST_ACTIVITY_ANNOTATION,
    NODE_DNS_ADDRESS,
    NON_PUBLIC,
    POD_RUNTIME_DIR,
    RUNTIME_ENV,
    RUNTIME_IDENTITY_ANNOTATION,
    RUNTIME_PORT,
    RUNTIME_VERIFIER_ENV,
    RUNTIME_VOLUME,
    SANDBOX_AGENT_SOCKET,
    SANDBOX_LABEL,
    TOOL_CALLS_ANNOTATION,
    TOOLS_ANNOTATION,
    TOOLS_REFUSED_ANNOTATION,
    WORKSPACE_BYTES_ENV,
    WORKSPACE_ENV,
    ToolNetwork,
    dns_search_paths,
    duration_seconds,
    quantity_bytes,
    runtime_token,
    token_verifier,
)
from agentkube.operator import api
from agentkube.operator.status import parse_timestamp

MANAGED_BY = {"app.kubernetes.io/managed-by": "agentkube"}
SANDBOX_RUNTIME_PORT = RUNTIME_PORT
# Where the chart installs the gateway unless told otherwise (`operator run --gateway-namespace`): only its
# pods there may reach a sandbox's runtime port.
DEFAULT_GATEWAY_NAMESPACE = "agentkube-system"
WORKSPACE_VOLUME = "workspace"
# The node agent's sandbox socket comes into the pod read-only from this volume: a CSI ephemeral inline
# volume the node agent itself publishes (a hostPath would keep the pod out of the Pod Security baseline).
AGENT_VOLUME = "agentkube-agent"

__all__ = ["CONTAINER_NAME", "LAST_ACTIVITY_ANNOTATION", "SANDBOX_LABEL", "TOOL_CALLS_ANNOTATION",
           "TOOLS_ANNOTATION", "TOOLS_REFUSED_ANNOTATION"]


def parse_duration(text: str) -> timedelta:
    """A Go duration ("1h30m", "45s") as a timedelta."""
    return timedelta(seconds=duration_seconds(text))


def labels(name: str) -> dict[str, str]:
    return {SANDBOX_LABEL: name, **MANAGED_BY}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_owned_by(child: dict[str, Any], body: dict[str, Any]) -> bool:
    """Whether `child` (a pod, say) is the one this sandbox made: a user's own object that only shares the
    sandbox's name must never be reported, replaced or deleted as the sandbox's."""
    return any(ref.get("uid") == body["metadata"]["uid"] for ref in child["metadata"].get("ownerReferences") or [])


def runtime_endpoint(pod: dict[str, Any] | None) -> api.RuntimeEndpoint | None:
    """What the gateway needs to reach the pod's runtime and derive its token (status.runtime), or None
    while the pod has no address."""
    if pod is None or not (pod.get("status") or {}).get("podIP"):
        return None
    metadata = pod["metadata"]
    name = (metadata.get("labels") or {}).get(SANDBOX_LABEL) or metadata["name"]
    return api.RuntimeEndpoint(pod_ip=pod["status"]["podIP"], name=name,
                               identity=(metadata.get("annotations") or {}).get(RUNTIME_IDENTITY_ANNOTATION))


def _metadata(name: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": labels(body["metadata"]["name"]),
        "ownerReferences": [owner_reference(body)],
        **extra,
    }


def tool_call_totals(annotations: dict[str, str]) -> api.ToolCallTotals | None:
    """status.toolCalls from the node agent's annotation; None when there is none or it is malformed."""
    try:
        return api.ToolCallTotals.model_validate_json(annotations[TOOL_CALLS_ANNOTATION])
    except (KeyError, ValueError):
        return None


def workspace_claim_name(sandbox: str) -> str:
    return f"{sandbox}-workspace"


# Every sandbox pod of a namespace is named in DNS by one headless Service of this name there (the
# StatefulSet pattern): the pod's `hostname` and this `subdomain` make `HOST.agentkube-sandboxes.NS.svc.DOMAIN`.
# One Service per namespace instead of one per sandbox: at 10,000 sandboxes the per-sandbox Services cost
# the API server a create each and the controller manager's EndpointSlice controller, which matches every
# pod change against every Service of its namespace, ~8x the CPU (operator/README.md, scale).
SANDBOX_SERVICE = "agentkube-sandboxes"
# What the shared Service selects: every pod whose subdomain is SANDBOX_SERVICE (sandbox and warm pods
# alike), and nothing else (other agentkube pods share MANAGED_BY).
SANDBOX_SERVICE_SELECTOR = {"agentkube.dev/subdomain": SANDBOX_SERVICE}


def service_fqdn(hostname: str, namespace: str) -> str:
    """The DNS name of a sandbox pod with this hostname, through the namespace's shared Service."""
    return f"{hostname}.{SANDBOX_SERVICE}.{namespace}.svc.{CLUSTER_DOMAIN}"


def own_service_fqdn(name: str, namespace: str) -> str:
    """The name an earlier version gave a sandbox: a headless Service of the sandbox's own name selecting its
    pod. Reported while the sandbox's pod is one that version made (`has_own_service`); the Service stays
    until the sandbox goes, so the name keeps resolving to any later pod of the sandbox as well."""
    return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"


def has_own_service(pod: dict[str, Any] | None) -> bool:
    """Whether the pod was made before the shared Service (its subdomain is not SANDBOX_SERVICE): only a
    Service of the sandbox's own name gives it a DNS name, so that Service must stay while the pod lives."""
    return pod is not None and (pod.get("spec") or {}).get("subdomain") != SANDBOX_SERVICE


def sandbox_fqdn(body: dict[str, Any], pod: dict[str, Any] | None) -> str | None:
    """status.serviceFqdn: the name that resolves to the sandbox's pod. A pod's DNS name is fixed when it is
    made (hostname and subdomain are immutable): a warm pod adopted from a pool keeps its own hostname, and
    a pod an earlier version made keeps the sandbox's own Service. Without a pod, the name its pod will
    have: the sandbox's own name (its pod is named so), unknown for a sandbox from a pool (None)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    if pod is None:
        return None if (body.get("spec") or {}).get("pool") else service_fqdn(name, namespace)
    if has_own_service(pod):
        return own_service_fqdn(name, namespace)
    return service_fqdn(str(pod["spec"].get("hostname") or pod["metadata"]["name"]), namespace)


def _quantities(resources: api.ResourceList | None) -> dict[str, str]:
    if resources is None:
        return {}
    return {k: str(v) for k, v in resources.model_dump(exclude_none=True).items()}


def runtime_verifier(body: dict[str, Any], key: bytes) -> str:
    """The digest of the sandbox's runtime token its runtime checks the gateway's requests with."""
    metadata = body["metadata"]
    return token_verifier(runtime_token(key, metadata["namespace"], metadata["name"], metadata["uid"]))


# The kubelet reports the sandbox container Ready only once its runtime answers, so neither a sandbox (its
# status follows the pod's Ready condition) nor a warm pod (adopted only when Ready) is offered while the
# runtime is still starting: before, a first command right after Running was refused now and then (1 in 16
# warm claims, 5 in 16 cold ones). The startup probe holds Ready back at each (re)start and looks every
# second, so Ready follows the runtime within about a second; then, on the gateway's port, the readiness
# probe looks every 10 s (without a gateway the runtime is the container's main process: it answers while
# the container runs).
STARTUP_PROBE_PERIOD_SECONDS = 1
STARTUP_PROBE_FAILURES = 300  # a runtime that never answers is restarted after five minutes
READINESS_PROBE_PERIOD_SECONDS = 10
PROBE_TIMEOUT_SECONDS = 5  # a loaded node starts the exec probe's python slowly: slow is not unready


def runtime_probe(gateway_served: bool) -> dict[str, Any]:
    """How the kubelet asks whether the runtime answers: it accepts on RUNTIME_PORT, the gateway's way in
    (the listening socket exists before it serves, so a connection accepted is never refused); without a
    gateway, its unix socket accepts (connected from inside the container, where the socket is)."""
    if gateway_served:
        return {"tcpSocket": {"port": SANDBOX_RUNTIME_PORT}}
    path = RUNTIME_ENV["AGENTKUBE_SANDBOX_SOCKET"]
    return {"exec": {"command": ["python3", "-S", "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"]}}


def pod_manifest(body: dict[str, Any], spec: api.AgentSandboxSpec, runtime_key: bytes | None = None) -> dict[str, Any]:
    """The sandbox's pod. With `runtime_key` (the key the operator shares with the gateway) its runtime also
    serves the gateway on RUNTIME_PORT; without, it serves only its unix socket on the node."""
    name = body["metadata"]["name"]
    template = spec.template
    if template is None:  # a sandbox from a pool: its pod is built from pool.sandbox_spec(...)
        raise ValueError("a pod is built from a spec with a template")
    workspace_path = (spec.workspace or api.Workspace()).mount_path
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": template.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "runtime", "containerPort": SANDBOX_RUNTIME_PORT}],
        "startupProbe": {**runtime_probe(runtime_key is not None), "periodSeconds": STARTUP_PROBE_PERIOD_SECONDS,
                         "failureThreshold": STARTUP_PROBE_FAILURES, "timeoutSeconds": PROBE_TIMEOUT_SECONDS},
        "resources": {
            key: value
            for key, value in (("requests", _quantities(template.resources.requests)), ("limits", _quantities(template.resources.limits)))
            if value
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": template.run_as_user,
            "runAsGroup": template.run_as_group,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": WORKSPACE_VOLUME, "mountPath": workspace_path},
            {"name": RUNTIME_VOLUME, "mountPath": str(POD_RUNTIME_DIR)},
            {"name": AGENT_VOLUME, "mountPath": str(SANDBOX_AGENT_SOCKET.parent), "readOnly": True},
        ],
        "env": [
            {"name": "AGENTKUBE_SANDBOX_NAME", "value": name},
            {"name": "AGENTKUBE_SANDBOX_NAMESPACE", "value": body["metadata"]["namespace"]},
            *({"name": key, "value": value} for key, value in RUNTIME_ENV.items()),
            *([{"name": RUNTIME_VERIFIER_ENV, "value": runtime_verifier(body, runtime_key)}] if runtime_key else []),
            # What the gateway's file API serves, and the most one upload may write (ebpf/workspace.py).
            {"name": WORKSPACE_ENV, "value": workspace_path},
            {"name": WORKSPACE_BYTES_ENV, "value": str(quantity_bytes((spec.workspace or api.Workspace()).size))},
            # The template's env comes last (the last of a name wins) but never sets the verifier: only the
            # operator says which token the runtime accepts.
            *(e.model_dump() for e in template.env or () if e.name != RUNTIME_VERIFIER_ENV),
        ],
    }
    if template.command:
        container["command"] = list(template.command)
    if template.args:
        container["args"] = list(template.args)
    workspace = (
        {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": workspace_claim_name(name)}}
        if spec.workspace
        else {"name": WORKSPACE_VOLUME, "emptyDir": {}}
    )
    pod_spec: dict[str, Any] = {
        # With the namespace's shared headless Service, which selects this pod by SANDBOX_SERVICE_SELECTOR: a
        # DNS name for the pod. The hostname must be a DNS label: the CRD admits only such sandbox names, and
        # a warm pod's name is cut to fit (pool.warm_pod_name).
        "hostname": name,
        "subdomain": SANDBOX_SERVICE,
        "restartPolicy": "Always",
        # The sandbox runs untrusted tool calls: it gets no Kubernetes credentials and no service links.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "fsGroup": template.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        # egress: the pod's only resolver is the node agent's DNS answering, which forwards what each tool
        # call's network allows to the cluster DNS and lets the call reach exactly what allowed names resolve to.
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": [NODE_DNS_ADDRESS],
                      "searches": dns_search_paths(body["metadata"]["namespace"]),
                      "options": [{"name": "ndots", "value": "5"}]},
        "volumes": [
            workspace,
            {"name": RUNTIME_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": AGENT_VOLUME, "csi": {"driver": CSI_DRIVER, "readOnly": True}},
        ],
    }
    if template.runtime_class_name:
        pod_spec["runtimeClassName"] = template.runtime_class_name
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in template.tolerations]
    if runtime_key is not None:  # a connection every 10 s; an exec probe would start a process in the sandbox
        container["readinessProbe"] = {**runtime_probe(True), "periodSeconds": READINESS_PROBE_PERIOD_SECONDS,
                                       "failureThreshold": 3, "timeoutSeconds": PROBE_TIMEOUT_SECONDS}
    tools = {"envelope": _quantities(template.resources.limits), **spec.tools.model_dump(by_alias=True, exclude_none=True)}
    metadata = _metadata(name, body, annotations={TOOLS_ANNOTATION: json.dumps(tools, sort_keys=True)})
    metadata["labels"].update(SANDBOX_SERVICE_SELECTOR)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def pod_selector(body: dict[str, Any]) -> dict[str, str]:
    """How a sandbox's Service and NetworkPolicy find its pod: by its name, or for a sandbox from a pool by
    CLAIMED_BY_LABEL (an adopted warm pod keeps its own SANDBOX_LABEL, what its runtime knows it by)."""
    name = body["metadata"]["name"]
    return {CLAIMED_BY_LABEL: name} if (body.get("spec") or {}).get("pool") else {SANDBOX_LABEL: name}


def service_manifest(body: dict[str, Any]) -> dict[str, Any]:
    """The Service of the sandbox's own name that an earlier version made for each sandbox; still made for a
    sandbox whose pod is such a version's (`has_own_service`), the only way that pod has a DNS name."""
    name = body["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(name, body),
            "spec": _headless_service_spec(pod_selector(body))}


def shared_service_manifest(namespace: str) -> dict[str, Any]:
    """The namespace's headless Service that names every sandbox pod there. It has no owner: it serves every
    sandbox of the namespace, past and future, and costs one object and an empty EndpointSlice when there
    is none, so it is left in place when the last sandbox goes (a sandbox made later finds it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SANDBOX_SERVICE, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "spec": _headless_service_spec(SANDBOX_SERVICE_SELECTOR),
    }


def _headless_service_spec(selector: dict[str, str]) -> dict[str, Any]:
    return {
        "clusterIP": "None",
        "selector": dict(selector),
        "ports": [{"name": "runtime", "port": SANDBOX_RUNTIME_PORT, "targetPort": SANDBOX_RUNTIME_PORT}],
        # The name resolves while the pod starts, so a client can wait on DNS rather than poll.
        "publishNotReadyAddresses": True,
    }


def workspace_claim_manifest(body: dict[str, Any], workspace: api.Workspace) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": str(workspace.size)}}}
    if workspace.storage_class_name:
        spec["storageClassName"] = workspace.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(workspace_claim_name(body["metadata"]["name"]), body),
        "spec": spec,
    }


def _egress_rules(network: ToolNetwork) -> list[dict[str, Any]]:
    """The pod-wide bound of one tool network. A domain rule's addresses are known only when resolved, so at
    this level it allows its port anywhere; the node agent lets each call reach only what it resolved."""
    if network.egress == "cluster":
        return [{"to": [{"namespaceSelector": {}}]}]
    if network.egress == "internet":
        return [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [str(n) for n in NON_PUBLIC if n.version == 4]}}]}]
    if network.egress == "explicit":
        return [
            {"to": [{"ipBlock": {"cidr": rule.cidr or "0.0.0.0/0"}}],
             **({"ports": [{"protocol": "TCP", "port": rule.port}]} if rule.port else {})}
            for rule in network.allow
        ]
    return []


def gateway_ingress(gateway_namespace: str) -> dict[str, Any]:
    """The one ingress a sandbox pod admits: the gateway's pods to the runtime port. The namespace by its name
    label (the API server sets it; nobody can forge it), the pods by the gateway's labels: a pod labelled so
    elsewhere is not the gateway."""
    return {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": gateway_namespace}},
                      "podSelector": {"matchLabels": dict(GATEWAY_LABELS)}}],
            "ports": [{"protocol": "TCP", "port": SANDBOX_RUNTIME_PORT}]}


def network_policy_manifest(body: dict[str, Any], spec: api.AgentSandboxSpec,
                            gateway_namespace: str = DEFAULT_GATEWAY_NAMESPACE) -> dict[str, Any]:
    """Ingress only to the runtime port, only from the gateway's pods in its namespace; egress only DNS plus the union of what the
    tool intents allow (the node agent narrows each call further with its own eBPF program)."""
    dns = {
        # egress: sandbox pods resolve through the node agent on its node-local address (kube-dns behind it).
        "to": [{"ipBlock": {"cidr": f"{NODE_DNS_ADDRESS}/32"}},
               {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    intents = [spec.tools.default, *spec.tools.profiles.values()]
    egress = [dns]
    for intent in intents:
        for rule in _egress_rules(intent.network or ToolNetwork()):
            if rule not in egress:
                egress.append(rule)
    name = body["metadata"]["name"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, body),
        "spec": {
            "podSelector": {"matchLabels": pod_selector(body)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [gateway_ingress(gateway_namespace)],
            "egress": egress,
        },
    }


# ----- lifecycle ---------------------------------------------------------------------------------------


MAX_SCHEDULER_MESSAGE = 1024  # of the scheduler's word on an unschedulable pod, as much as a condition shows


@dataclass(frozen=True)
class PodView:
    """What the lifecycle needs to know about the sandbox's pod."""

    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    scheduled: bool
    node_name: str | None
    terminating: bool
    # The scheduler's message when it found no node for the pod (e.g. "0/1 nodes are available: 1 Insufficient
    # cpu"): the sandbox reports it, or a sandbox Pending behind a full node says only that it waits.
    unschedulable: str | None = None

    @classmethod
    def of(cls, pod: dict[str, Any] | None) -> "PodView | None":
        if pod is None:
            return None
        status = pod.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        scheduling = conditions.get("PodScheduled") or {}
        unschedulable = scheduling.get("status") == "False" and scheduling.get("reason") == "Unschedulable"
        return cls(
            phase=status.get("phase", "Pending"),
            ready=(conditions.get("Ready") or {}).get("status") == "True",
            scheduled=scheduling.get("status") == "True",
            node_name=(pod.get("spec") or {}).get("nodeName"),
            terminating=bool(pod["metadata"].get("deletionTimestamp")),
            unschedulable=(scheduling.get("message") or "no node fits the pod")[:MAX_SCHEDULER_MESSAGE] if unschedulable else None,
        )


class PodViews:
    """The last view of each sandbox pod (by uid) that a reconciliation acted on, so that pod events which
    change nothing the sandbox reports (a new resourceVersion, a kubelet heartbeat) cost no reconciliation.

    Every reconciliation records the pod it read, whatever started it: a view remembered only from pod
    events goes stale when the status is written from elsewhere (the sandbox's own handler, a recheck) or
    when Kopf re-lists after a watch outage (those events have no type), and a stale view would swallow
    the one event that matters, such as the pod Ready again after an API server outage."""

    def __init__(self) -> None:
        self._views: dict[str, PodView] = {}

    def acted_on(self, pod: dict[str, Any] | None) -> None:
        view = PodView.of(pod)
        if pod is not None and view is not None:
            self._views[pod["metadata"]["uid"]] = view

    def is_news(self, event_type: str | None, pod: dict[str, Any]) -> bool:
        """Whether a watch event of `pod` may change what its sandbox reports."""
        uid = pod["metadata"]["uid"]
        if event_type == "DELETED":
            self._views.pop(uid, None)
            return True
        view = PodView.of(pod)
        previous = self._views.get(uid)
        if previous is None:
            # A pod just created, not scheduled yet, was reported by the reconciliation that made it.
            return not (event_type == "ADDED" and view is not None and view.phase == "Pending" and not view.scheduled)
        return view != previous


@dataclass(frozen=True)
class Plan:
    """What the sandbox should look like now, and when time alone will change that."""

    phase: api.SandboxPhase
    reason: str
    message: str
    want_pod: bool
    delete_pod: bool = False  # the existing pod must go (suspended, expired, or failed and to be replaced)
    delete_sandbox: bool = False
    recheck_after: timedelta | None = None
    warning: bool = False  # posted as a Warning event: the user has to act


def expiry_time(created: datetime, lifecycle: api.Lifecycle) -> datetime | None:
    if lifecycle.shutdown_time is not None:
        return lifecycle.shutdown_time
    if lifecycle.expire_after is not None:
        return created + parse_duration(lifecycle.expire_after)
    return None


# How soon a sandbox whose pod name is taken looks again: nothing of ours is told when a foreign pod goes.
NAME_TAKEN_RECHECK = timedelta(seconds=30)


def plan(spec: api.AgentSandboxSpec, created: datetime, last_activity: datetime | None, pod: PodView | None, now: datetime,
         *, pod_name_taken: bool = False) -> Plan:
    """`pod`: the sandbox's own pod, if any. `pod_name_taken`: a pod that is not the sandbox's has its name
    (see is_owned_by); it is left alone, and the sandbox waits for the name."""
    lifecycle = spec.lifecycle
    # A pod already being deleted needs no second delete; it is waited for.
    pod_to_delete = pod is not None and not pod.terminating
    recheck: list[timedelta] = []
    expires = expiry_time(created, lifecycle)
    if expires is not None:
        if now >= expires:
            if lifecycle.shutdown_policy == "Delete":
                return Plan("Expired", "Expired", "the sandbox reached its shutdown time", False, pod_to_delete, delete_sandbox=True)
            return Plan("Expired", "Expired", "the sandbox reached its shutdown time; its object and workspace are retained",
                        False, pod_to_delete)
        recheck.append(expires - now)
    if lifecycle.suspend:
        return Plan("Suspended", "Suspended", "spec.lifecycle.suspend is true", False, pod_to_delete, recheck_after=_soonest(recheck))
    if lifecycle.idle_timeout is not None:
        idle_since = last_activity or created
        idle_until = idle_since + parse_duration(lifecycle.idle_timeout)
        if now >= idle_until:
            return Plan("Suspended", "IdleTimeout", f"no tool call since {idle_since.isoformat()}; the next one resumes it",
                        False, pod_to_delete, recheck_after=_soonest(recheck))
        recheck.append(idle_until - now)
    recheck_after = _soonest(recheck)
    if pod_name_taken:
        return Plan("Pending", "PodNameTaken", "a pod with this sandbox's name exists and is not the sandbox's; "
                    "it is left alone: delete or rename it", False, recheck_after=_soonest([*recheck, NAME_TAKEN_RECHECK]),
                    warning=True)
    if pod is None or pod.terminating:
        return Plan("Pending", "PodCreating", "creating the sandbox pod", True, recheck_after=recheck_after)
    if pod.phase in ("Failed", "Succeeded"):
        return Plan("Pending", "PodReplacing", f"the pod {pod.phase.lower()}; replacing it, the workspace is kept",
                    True, delete_pod=True, recheck_after=recheck_after)
    if pod.phase == "Running" and pod.ready:
        return Plan("Running", "PodReady", "the sandbox is ready", True, recheck_after=recheck_after)
    if not pod.scheduled and pod.unschedulable:
        return Plan("Pending", "Unschedulable", f"the pod cannot be scheduled: {pod.unschedulable}", True,
                    recheck_after=recheck_after, warning=True)
    if not pod.scheduled:
        return Plan("Pending", "PodScheduling", "waiting for the pod to be scheduled to a node", True, recheck_after=recheck_after)
    return Plan("Pending", "PodStarting", f"the pod is {pod.phase.lower()} and not ready yet", True, recheck_after=recheck_after)


def _soonest(durations: list[timedelta]) -> timedelta | None:
    return min(durations) if durations else None


def tools_enforced(tools_refused: str | None) -> tuple[str, bool, str, str]:
    """The ToolsEnforced condition for the node agent's refusal (TOOLS_REFUSED_ANNOTATION), if any."""
    if tools_refused:
        return ("ToolsEnforced", False, "ToolIntentRefused", f"no tool call runs: {tools_refused}")
    return ("ToolsEnforced", True, "NotRefused", "the node agent has not refused this sandbox's tool intent")


def phase_event(old_phase: str | None, plan_: "Plan") -> bool:
    """Whether the phase the plan reports is worth an Event: any change of phase, except a new sandbox's
    first, uneventful Pending (what its creator just asked for: its Running, or why it waits or failed, is
    the news). One write fewer per sandbox for the API server, where thousands are made at once."""
    if old_phase == plan_.phase:
        return False
    return not (old_phase is None and plan_.phase == "Pending" and not plan_.warning)


def needs_reconcile(event_type: str | None, known: bool, body: dict[str, Any]) -> bool:
    """Whether a watch event of a sandbox asks for a reconciliation. `event_type` None: Kopf listed it (a
    watch started); `known`: this process has seen the sandbox before (so a listing is a re-listing after a
    dropped watch, not the operator's start, and the sandbox's timers are armed already). At the start every
    sandbox is reconciled; otherwise only one whose status does not reflect it yet."""
    return (event_type is None and not known) or not status_is_current(body)


def status_is_current(body: dict[str, Any]) -> bool:
    """Whether the sandbox's status already reflects its spec (observedGeneration, written only by a full
    reconciliation) and the annotations others write (the gateway's last activity, the node agent's call
    totals and refusal). Then a watch event of it asks for no work: most such events are our own status
    writes coming back. A pure function of the object, so it holds across restarts and replicas."""
    metadata = body["metadata"]
    try:
        status = api.AgentSandboxStatus.model_validate(body.get("status") or {})
    except ValueError:
        return False  # a status we cannot read is one to rewrite
    if status.observed_generation is None or status.observed_generation != metadata.get("generation"):
        return False
    annotations = metadata.get("annotations") or {}
    activity = parse_timestamp(annotations.get(LAST_ACTIVITY_ANNOTATION))
    if activity is not None and activity != status.last_activity_time:
        return False
    totals = tool_call_totals(annotations)
    if totals is not None and totals != status.tool_calls:
        return False
    type_, ok, reason, message = tools_enforced(annotations.get(TOOLS_REFUSED_ANNOTATION))
    reported = next((c for c in status.conditions if c.type == type_), None)
    return reported is not None and reported.status == ("True" if ok else "False") and reported.message == message


def conditions(plan_: Plan, pod: PodView | None, tools_refused: str | None = None) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) for Ready, Suspended, PodScheduled and ToolsEnforced. `tools_refused`
    is the node agent's word (TOOLS_REFUSED_ANNOTATION) that it cannot honour the sandbox's tool intent."""
    suspended = plan_.phase in ("Suspended", "Expired")
    enforced = tools_enforced(tools_refused)
    return [
        ("Ready", plan_.phase == "Running", plan_.reason, plan_.message),
        ("Suspended", suspended, plan_.reason if suspended else "Active", plan_.message if suspended else ""),
        ("PodScheduled", bool(pod and pod.scheduled),
         "Scheduled" if pod and pod.scheduled else "Unschedulable" if pod and pod.unschedulable else "NotScheduled",
         f"on {pod.node_name}" if pod and pod.node_name else pod.unschedulable or "" if pod else ""),
        enforced,
    ]
