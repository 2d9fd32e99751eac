"""AgentSandboxPool decisions, as pure functions: what a warm pod is, which warm pods a pool keeps, makes or
deletes, which one a sandbox adopts, and how adoption rewrites it. The handlers read, call these, apply.

A warm pod is an ordinary sandbox pod whose runtime already runs (its node agent registration, held
processes and call cgroups included) under the pod's own name. Adoption never restarts anything: the
claiming AgentSandbox becomes the pod's controller owner and adds its CLAIMED_BY_LABEL, which its Service
and NetworkPolicy select on; the pool no longer counts the pod and makes a new one. The sandbox's
own env reaches each of its tool calls through the gateway (RunRequest.env), since the container's
environment was fixed before the sandbox existed.
"""

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from agentkube.contract import (
    CLAIMED_BY_LABEL,
    POOL_LABEL,
    POOL_TEMPLATE_LABEL,
    RUNTIME_IDENTITY_ANNOTATION,
    SANDBOX_LABEL,
)
from agentkube.operator import api, sandbox

# A warm pod's name: the pool's, this infix and a random suffix (the suffix's alphabet and length are the
# API server's generateName's: 27 bits, so a name comes back only after the pod it named is long gone).
WARM_INFIX = "-warm-"
SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
SUFFIX_LENGTH = 5
MAX_POD_NAME = 63  # the pod's hostname is its name, so it must be a DNS label


def template_hash(template: api.PoolTemplate) -> str:
    """A short digest of the pool template: a warm pod made from another template is stale."""
    canonical = json.dumps(template.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def selector(pool: str) -> str:
    """The label selector of a pool's waiting warm pods (adopted ones have left it)."""
    return f"{POOL_LABEL}={pool},!{CLAIMED_BY_LABEL}"


def warm_pod_name(pool: str, suffix: str | None = None) -> str:
    suffix = suffix or "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(SUFFIX_LENGTH))
    return f"{pool[: MAX_POD_NAME - len(WARM_INFIX) - len(suffix)]}{WARM_INFIX}{suffix}"


def sandbox_spec(template: api.PoolTemplate, lifecycle: api.Lifecycle | None = None,
                 env: list[api.EnvVar] | None = None) -> api.AgentSandboxSpec:
    """The spec a pool's sandbox runs with: the pool's template, tools and network; the sandbox's own
    lifecycle; its own env after the template's (for a cold start, where the container can have it)."""
    merged = template.template.model_copy(update={"env": [*(template.template.env or ()), *(env or ())] or None})
    return api.AgentSandboxSpec(template=merged, tools=template.tools, network=template.network,
                                lifecycle=lifecycle or api.Lifecycle())


def warm_pod_manifest(pool_body: dict[str, Any], template: api.PoolTemplate, name: str,
                      runtime_key: bytes | None, identity: str | None = None) -> dict[str, Any]:
    """A warm pod of the pool: a sandbox pod named `name`, whose runtime knows itself by that name and
    accepts the token derived from it and `identity` (random: nobody can guess a warm pod's token)."""
    identity = identity or secrets.token_hex(16)
    namespace = pool_body["metadata"]["namespace"]
    itself = {"apiVersion": pool_body["apiVersion"], "kind": pool_body["kind"],
              "metadata": {"name": name, "namespace": namespace, "uid": identity}}
    manifest = sandbox.pod_manifest(itself, sandbox_spec(template), runtime_key)
    metadata = manifest["metadata"]
    metadata["ownerReferences"] = [sandbox.owner_reference(pool_body)]
    metadata["labels"].update({POOL_LABEL: pool_body["metadata"]["name"], POOL_TEMPLATE_LABEL: template_hash(template)})
    metadata["annotations"][RUNTIME_IDENTITY_ANNOTATION] = identity
    return manifest


def pool_network_policy_manifest(pool_body: dict[str, Any], gateway_namespace: str = sandbox.DEFAULT_GATEWAY_NAMESPACE) -> dict[str, Any]:
    """Waiting warm pods run no call: no egress. Their ingress is the gateway's alone, as their sandbox's will
    be (kube-router here applies a claimed pod's policies a moment after its labels change, long enough that
    the first command of a claim was refused when this policy denied all ingress). The gateway sends a pod
    nothing until a sandbox controls it, and the runtime takes only the token derived from the pod's random
    identity. It selects adopted pods too: a claim then never leaves its pod under no policy (which in
    Kubernetes means no limit) while its sandbox's own is written, after the claim is answered; policies add
    up, and this one allows nothing the sandbox's does not. It exists only for a template whose policy
    agentkube manages (`managedPolicy`), so it never narrows a sandbox whose network its user manages."""
    name = pool_body["metadata"]["name"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-warm", "namespace": pool_body["metadata"]["namespace"],
                     "labels": {POOL_LABEL: name, **sandbox.MANAGED_BY},
                     "ownerReferences": [sandbox.owner_reference(pool_body)]},
        "spec": {
            "podSelector": {"matchLabels": {POOL_LABEL: name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [sandbox.gateway_ingress(gateway_namespace)],
            "egress": [],
        },
    }


@dataclass(frozen=True)
class WarmPod:
    name: str
    template_hash: str | None
    ready: bool
    ended: bool  # Failed or Succeeded: it will never serve
    terminating: bool
    created: str  # RFC 3339, as the API server writes it (sorts as time)

    @classmethod
    def of(cls, pod: dict[str, Any]) -> "WarmPod":
        view = sandbox.PodView.of(pod)
        assert view is not None
        metadata = pod["metadata"]
        return cls(name=metadata["name"], template_hash=(metadata.get("labels") or {}).get(POOL_TEMPLATE_LABEL),
                   ready=view.phase == "Running" and view.ready, ended=view.phase in ("Failed", "Succeeded"),
                   terminating=view.terminating, created=metadata.get("creationTimestamp") or "")


@dataclass(frozen=True)
class PoolPlan:
    create: int
    delete: tuple[str, ...]
    replicas: int  # current-template warm pods that stay (started or starting)
    ready: int


def plan(replicas: int, current_hash: str, pods: list[WarmPod]) -> PoolPlan:
    """What to do so that `replicas` warm pods of the current template wait. A template change rolls the
    pool at once: stale pods are never adopted, so they only hold resources. Ended pods are replaced; a
    scale-down removes pods not ready yet first, then the newest."""
    alive = [p for p in pods if not p.terminating]
    doomed = [p for p in alive if p.ended or p.template_hash != current_hash]
    current = [p for p in alive if p not in doomed]
    # Keep the ready and the oldest: they are the ones a claim is served by soonest.
    current.sort(key=lambda p: (not p.ready, p.created, p.name))
    kept, excess = current[:replicas], current[replicas:]
    return PoolPlan(create=replicas - len(kept), delete=tuple(p.name for p in doomed + excess),
                    replicas=len(kept), ready=sum(1 for p in kept if p.ready))


def adoptable(pods: list[dict[str, Any]], current_hash: str) -> list[dict[str, Any]]:
    """The warm pods a sandbox may adopt, best first: ready, of the current template, not going away,
    unclaimed; the oldest first (the pool keeps the oldest)."""
    candidates = [p for p in pods if not (p["metadata"].get("labels") or {}).get(CLAIMED_BY_LABEL)]
    views = [(WarmPod.of(p), p) for p in candidates]
    usable = [(v, p) for v, p in views if v.ready and not v.terminating and v.template_hash == current_hash]
    return [p for _, p in sorted(usable, key=lambda vp: (vp[0].created, vp[0].name))]


def why_none_adoptable(pods: list[dict[str, Any]], current_hash: str) -> str:
    """Why a claim found no warm pod to adopt, pod by pod (for the log line of the cold start it falls back to)."""
    def why(pod: dict[str, Any]) -> str:
        view = WarmPod.of(pod)
        if (pod["metadata"].get("labels") or {}).get(CLAIMED_BY_LABEL):
            return "claimed"
        if view.terminating or view.ended:
            return "going away"
        if view.template_hash != current_hash:
            return "old template"
        return "ready but taken meanwhile" if view.ready else "not ready"
    return ", ".join(f"{p['metadata']['name']}: {why(p)}" for p in pods) or "the pool has no pods"


def adoption_patch(pod: dict[str, Any], sandbox_body: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch by which a sandbox adopts a warm pod: it becomes the controller owner (the pool
    no longer is: deleting one never takes the other's pods) and its name the pod's CLAIMED_BY_LABEL. The
    resourceVersion makes it conditional: of two sandboxes racing for one pod, the second gets a 409."""
    return {"metadata": {
        "resourceVersion": pod["metadata"]["resourceVersion"],
        "labels": {CLAIMED_BY_LABEL: sandbox_body["metadata"]["name"]},
        "ownerReferences": [sandbox.owner_reference(sandbox_body)],
    }}


def runtime_name(pod: dict[str, Any]) -> str:
    """The name a pod's runtime and node agent know the sandbox by (a warm pod's own, kept when adopted)."""
    return str((pod["metadata"].get("labels") or {}).get(SANDBOX_LABEL) or pod["metadata"]["name"])
