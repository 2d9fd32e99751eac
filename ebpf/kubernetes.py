"""The node agent's Kubernetes mode: sandboxes are the AgentSandbox pods running on this node.

The agent watches the pods bound to its node that carry the sandbox label. Once a pod's sandbox container
runs, it registers a sandbox on that container's cgroup (envelope and defaults from the pod's tools
annotation, written by the operator) and links the runtime's socket where the SDK on the node looks for
it; when the container changes or the pod goes, it removes the sandbox again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentkube.contract import (
    CLAIMED_BY_LABEL,
    CONTAINER_NAME,
    LAST_ACTIVITY_ANNOTATION,
    POOL_LABEL,
    RUNTIME_SOCKET_NAME,
    RUNTIME_VOLUME,
    SANDBOX_LABEL,
    TOOL_CALLS_ANNOTATION,
    TOOLS_ANNOTATION,
    TOOLS_REFUSED_ANNOTATION,
    ToolCallTotals,
    Tools,
    runtime_socket,
    timestamp,
)
from agentkube.ebpf.models import EnvelopeSpec, KubernetesContainer, SandboxCreate, SandboxRef

log = logging.getLogger("agentkube.node-agent")

GROUP, VERSION, PLURAL = "agentkube.dev", "v1alpha1", "agentsandboxes"
WATCH_SECONDS = 300  # a watch is renewed this often (the API server ends long watches anyway)
# How often tool-call activity is reported to the AgentSandbox (the operator's idle timeout reads it):
# a bound on API writes per sandbox, and far below any sensible idle timeout.
ACTIVITY_REPORT_SECONDS = 15.0
# The keys of status.toolCalls, as agentkube.ebpf.metrics.call_totals counts them (a unit test keeps the two in step).
TOTAL_KEYS = tuple(field.alias or name for name, field in ToolCallTotals.model_fields.items())


class IntentRefused(ValueError):
    """A sandbox pod whose tool intent the node agent cannot read or honour: none of its calls may run."""


def _why(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'tools'}: {e['msg']}" for e in error.errors())


def sandbox_spec(pod: dict[str, Any]) -> SandboxCreate | None:
    """The sandbox a pod's running sandbox container makes, or None while it does not run. Raises
    IntentRefused when the pod's tools annotation cannot be read or honoured (fail closed)."""
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    container = next((c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER_NAME), None)
    if container is None or "running" not in (container.get("state") or {}) or not container.get("containerID"):
        return None
    try:
        tools_json = json.loads((metadata.get("annotations") or {}).get(TOOLS_ANNOTATION, "{}"))
    except ValueError as error:
        raise IntentRefused(f"annotation {TOOLS_ANNOTATION} is not JSON: {error}") from None
    if not isinstance(tools_json, dict):
        raise IntentRefused(f"annotation {TOOLS_ANNOTATION} is not a JSON object")
    envelope_limits = tools_json.pop("envelope", {})
    if not isinstance(envelope_limits, dict):
        raise IntentRefused(f"annotation {TOOLS_ANNOTATION}: envelope is not a JSON object")
    try:
        envelope = EnvelopeSpec(**{key: envelope_limits[key] for key in ("memory", "cpu") if key in envelope_limits})
        tools = Tools.model_validate(tools_json)
        return SandboxCreate(
            name=metadata["labels"][SANDBOX_LABEL], namespace=metadata["namespace"], envelope=envelope, tools=tools,
            kubernetes=KubernetesContainer(pod_uid=metadata["uid"], container_id=container["containerID"],
                                           qos=(status.get("qosClass") or "Burstable").lower()),
        )
    except ValidationError as error:
        raise IntentRefused(_why(error)) from None


def _brief(error: Exception) -> str:
    """An API error as its status and reason (the client's text carries every response header)."""
    status = getattr(error, "status", None)
    return f"{status} {getattr(error, 'reason', '')}".strip() if status else str(error)


@dataclass
class Report:
    activity: float | None = None
    totals: Counter = field(default_factory=Counter)


def added_totals(current: str | None, delta: Counter) -> dict[str, int]:
    """The AgentSandbox's call totals (its annotation's JSON, if any) plus what happened since."""
    try:
        totals = json.loads(current) if current else {}
    except ValueError:
        totals = {}
    if not isinstance(totals, dict):
        totals = {}
    return {key: int(totals.get(key, 0) or 0) + delta.get(key, 0) for key in TOTAL_KEYS}


def report_target(labels: dict[str, str], name: str) -> str | None:
    """The AgentSandbox a sandbox pod's activity and refusals are reported to: the adopter of a warm pod
    (CLAIMED_BY_LABEL), none for a warm pod still waiting (POOL_LABEL), else the pod's sandbox."""
    if labels.get(CLAIMED_BY_LABEL):
        return labels[CLAIMED_BY_LABEL]
    return None if labels.get(POOL_LABEL) else name


def pod_runtime_socket(kubelet_root: Path, pod_uid: str) -> Path:
    """Where the runtime's socket of a pod is on the node: in its emptyDir runtime volume."""
    return kubelet_root / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / RUNTIME_VOLUME / RUNTIME_SOCKET_NAME


class PodWatcher:
    """Keeps the agent's sandboxes in step with the sandbox pods running on `node_name`."""

    def __init__(self, agent, node_name: str, kubelet_root: Path, kubeconfig: str | None = None):
        from kubernetes import client, config

        if kubeconfig:
            config.load_kube_config(kubeconfig)
        else:
            config.load_incluster_config()
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()
        self.agent = agent
        self.reported: dict[tuple[str, str], Report] = {}  # (sandbox key, container id) -> what was reported
        # sandbox key -> the AgentSandbox its reports go to: its own name, or for an adopted warm pod the
        # adopter's (CLAIMED_BY_LABEL); None for a warm pod nobody adopted yet (no AgentSandbox to tell).
        self.report_to: dict[str, str | None] = {}
        self.node_name = node_name
        self.kubelet_root = Path(kubelet_root)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pod-watcher", daemon=True)
        self.reporter = threading.Thread(target=self._report_activity, name="activity-reporter", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.reporter.start()

    def _report_activity(self) -> None:
        while not self.stop.wait(ACTIVITY_REPORT_SECONDS):
            for sandbox in list(self.agent.sandboxes.values()):
                if sandbox.spec.kubernetes is not None:
                    self._report(sandbox)

    def _report(self, sandbox) -> None:
        """Mirror a sandbox's last tool-call activity and its call totals into its AgentSandbox's
        annotations. Totals are added as deltas to what the object holds, so they survive new pods
        and agent restarts; the write is conditional on the object's version (a conflict retries)."""
        owner = self.report_to.get(sandbox.key, sandbox.spec.name)
        if owner is None:
            return
        seen = self.reported.setdefault((sandbox.key, sandbox.spec.kubernetes.container_id), Report())
        totals = Counter(sandbox.totals)
        delta = totals - seen.totals
        if seen.activity == sandbox.last_activity and not delta:
            return
        try:
            body: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, sandbox.spec.namespace, PLURAL, owner)
            annotations = body["metadata"].get("annotations") or {}
            moment = datetime.fromtimestamp(sandbox.last_activity, UTC).replace(microsecond=0)
            patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"], "annotations": {
                LAST_ACTIVITY_ANNOTATION: timestamp(moment),
                TOOL_CALLS_ANNOTATION: json.dumps(added_totals(annotations.get(TOOL_CALLS_ANNOTATION), delta), sort_keys=True),
            }}}
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, sandbox.spec.namespace, PLURAL, owner, patch)
            seen.activity, seen.totals = sandbox.last_activity, totals
        except Exception as error:  # a conflict, the API server away: the next round tries again
            log.warning("sandbox %s: reporting activity: %s", sandbox.key, _brief(error))

    def close(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                selector: dict[str, Any] = {"label_selector": SANDBOX_LABEL, "field_selector": f"spec.nodeName={self.node_name}"}
                pods: Any = self.core.list_pod_for_all_namespaces(**selector, _preload_content=False)  # raw: no models
                listed = json.loads(pods.data)
                self._resync([item for item in listed["items"]])
                stream = watch.Watch()
                for event in stream.stream(self.core.list_pod_for_all_namespaces, **selector,
                                           resource_version=listed["metadata"]["resourceVersion"],
                                           timeout_seconds=WATCH_SECONDS, _preload_content=False):
                    if self.stop.is_set():
                        stream.stop()
                        break
                    pod = event["raw_object"]
                    self._apply(pod, deleted=event["type"] == "DELETED")
            except Exception as error:  # the API server restarting, an expired watch: list again
                log.warning("pod watch: %s; listing again", _brief(error))
                self.stop.wait(1.0)

    def _resync(self, pods: list[dict[str, Any]]) -> None:
        present = set()
        for pod in pods:
            spec = self._apply(pod, deleted=False)
            if spec:
                present.add(spec.key)
        for key, sandbox in list(self.agent.sandboxes.items()):
            if sandbox.spec.kubernetes and key not in present:
                self._remove(sandbox.spec)

    def _apply(self, pod: dict[str, Any], deleted: bool) -> SandboxCreate | None:
        labels = pod["metadata"].get("labels") or {}
        namespace, name = pod["metadata"]["namespace"], str(labels.get(SANDBOX_LABEL))  # the watch selects on it
        key = f"{namespace}/{name}"
        self.report_to[key] = report_target(labels, name)
        try:
            spec = None if deleted else sandbox_spec(pod)
            if self.agent.refused.pop(key, None) is not None:
                self._say_refused(namespace, name, None)
        except IntentRefused as error:
            # Fail closed: the sandbox is not registered, so its runtime places no call, and the refusal
            # (not a silent 404) is what the runtime and the AgentSandbox's condition say.
            spec = None
            if self.agent.refused.get(key) != str(error):
                log.warning("sandbox %s: refusing its calls: %s", key, error)
                self.agent.refused[key] = str(error)
                self._say_refused(namespace, name, str(error))
        current = self.agent.sandboxes.get(key)
        if current and (spec is None or current.spec.kubernetes != spec.kubernetes):
            self._remove(current.spec)
            current = None
        if key in self.agent.refused:
            # The runtime stays reachable from the node, so that a caller hears why every call is refused.
            self._link(namespace, name, pod["metadata"]["uid"])
        if spec and spec.kubernetes and current is None:
            try:
                self.agent.register(spec)
                self._link(spec.namespace, spec.name, spec.kubernetes.pod_uid)
                log.info("sandbox %s: container %s", spec.key, spec.kubernetes.container_id)
            except Exception as error:  # e.g. the cgroup is not there yet: the next event retries
                log.warning("sandbox %s: %s", spec.key, error)
        return spec

    def _say_refused(self, namespace: str, name: str, why: str | None) -> None:
        """Tell the AgentSandbox why its calls are refused (None: they are not, any more)."""
        name = self.report_to.get(f"{namespace}/{name}", name) or ""
        if not name:
            return
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                       {"metadata": {"annotations": {TOOLS_REFUSED_ANNOTATION: why}}})
        except Exception as error:  # the sandbox's runtime still hears the reason on every call
            log.warning("sandbox %s/%s: recording the refusal: %s", namespace, name, _brief(error))

    def _remove(self, spec: SandboxCreate) -> None:
        runtime_socket(spec.namespace, spec.name).unlink(missing_ok=True)
        current = self.agent.sandboxes.get(spec.key)
        if current is not None and current.spec.kubernetes is not None:
            self._report(current)  # the last calls' totals, before they go with the sandbox
            self.reported.pop((spec.key, current.spec.kubernetes.container_id), None)
        self.report_to.pop(spec.key, None)
        try:
            self.agent.unregister(SandboxRef(name=spec.name, namespace=spec.namespace))
            log.info("sandbox %s removed", spec.key)
        except Exception as error:  # never let one sandbox stop the watch of all the others
            log.warning("sandbox %s: removing it: %s", spec.key, error)

    def _link(self, namespace: str, name: str, pod_uid: str) -> None:
        link = runtime_socket(namespace, name)
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        link.unlink(missing_ok=True)
        os.symlink(pod_runtime_socket(self.kubelet_root, pod_uid), link)
