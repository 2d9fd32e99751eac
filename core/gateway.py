"""The gateway: how agents anywhere in the cluster (or outside it) reach their sandboxes.

Every request carries a bearer token — a pod's service-account token, or a user's kubeconfig token. The
gateway asks the API server who that is (TokenReview) and whether they may `create agentsandboxes/exec`
on that one sandbox (SubjectAccessReview), so RBAC alone says who may run commands where:

    kubectl auth can-i create agentsandboxes --subresource=exec -n team-a --as system:serviceaccount:team-a:agent

It then forwards the call to the sandbox runtime on the pod network (contract.RUNTIME_PORT) with that
sandbox's runtime token, derived from a key only the gateway and the operator hold, and streams the
runtime's answer back as it comes. Where the runtime is comes from its watch of sandboxes (sandboxwatch.py:
the operator's status.runtime; no API request per call) when that is current and says the sandbox runs,
else from reading the sandbox and its pod; and the runtime proves itself on each new connection before it
is sent the token or anything else (runtime_client.py). The runtime places every command with the node agent as before: the
gateway adds a way in, not a way around the tool-call contract.

    under /v1/namespaces/{namespace}/sandboxes/{name}:                               RBAC on agentsandboxes/…
    POST   /run                      RunRequest → NDJSON events (ebpf/runtime_port.py)   create exec
    POST   /processes                RunRequest → ProcessInfo: a background process      create exec
    GET    /processes                → ProcessList                                       create exec
    GET    /processes/ID?wait=S      → ProcessInfo                                       create exec
    GET    /processes/ID/output?stdout=N&stderr=M&wait=S → ProcessOutput                 create exec
    POST   /processes/ID/stdin       StdinWrite → StdinWritten                           create exec
    POST   /processes/ID/signal      SignalRequest → ProcessInfo                         create exec
    PUT    /files?path=P&mode=755    the file's bytes (Content-Length) → FileEntry       create files
    GET    /files?path=P             the file's bytes                                    get files
    GET    /files?path=D&list=1      → FileList                                          list files
    DELETE /files?path=P&recursive=1                                                     delete files

    under /v1/namespaces/{namespace}/pools/{pool}:                                   RBAC on agentsandboxpools/…
    POST   /claims                   ClaimRequest → Claimed (201, once the new sandbox runs) create claim
    DELETE /claims/NAME              release: delete a sandbox claimed so                create claim
    GET  /healthz

Processes are tool calls, so everything about them is `exec`: reading a process's output is reading what
a command printed, as sensitive as running one. Files get their own subresource with the operation's verb,
so that a role can, say, download results without running anything.

Wire protocol: HTTP/1.1 with a chunked NDJSON body, the runtime's own (see runtime_port.py for why); the
gateway relays the bytes without re-framing them.

Decisions (who is asking, what to ask the API server, which pod is the sandbox's) are pure functions;
the handlers do the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar, cast  # the client serializes plain dicts as it does its models

import kubernetes
from aiohttp import web
from pydantic import ValidationError

from agentkube.contract import (
    CLAIM_SUBRESOURCE,
    CLAIMED_BY_LABEL,
    CLAIMED_THROUGH_GATEWAY_LABEL,
    EXEC_SUBRESOURCE,
    FILES_SUBRESOURCE,
    LAST_ACTIVITY_ANNOTATION,
    POOL_PLURAL,
    RUNTIME_IDENTITY_ANNOTATION,
    RUNTIME_PORT,
    SANDBOX_LABEL,
    runtime_token,
    timestamp,
)
from agentkube.ebpf.models import MAX_REQUEST_BYTES, Claimed, ClaimRequest, RunRequest, SignalRequest, StdinWrite
from agentkube.ebpf.runtime_port import NDJSON, REFUSAL_HEADER, RUNTIME_IDLE_SECONDS, bearer_token
from agentkube.ebpf.unixhttp import ApiError, validation_message
from agentkube.ebpf.workspace import CHUNK_BYTES, upload_mode, workspace_path
from agentkube.runtime_client import NotTheRuntime, Runtime, RuntimeConnections, StaleConnection, Unreachable, Upstream
from agentkube.sandboxwatch import SandboxWatch

logger = logging.getLogger("agentkube.gateway")

GROUP, VERSION, PLURAL = "agentkube.dev", "v1alpha1", "agentsandboxes"
DEFAULT_PORT = 8080
# A token's review is reused this long: the API server's own webhook token authenticator caches for 2
# minutes; a short reuse keeps a revoked token's reach short and spares the API server a review per call.
REVIEW_SECONDS = 10.0
REVIEW_CACHE_SIZE = 4096
K = TypeVar("K")
V = TypeVar("V")
CONNECT_SECONDS = 10.0
# How long a call to a suspended sandbox waits for it to run again (a pod start here takes about a second;
# a cold image pull, much longer) before it is answered 504.
RESUME_SECONDS = 120.0
RESUME_POLL_SECONDS = 0.25
# A refused connection is retried this long even to a sandbox that was not just resumed, in small steps:
# a NetworkPolicy enforcer applies a pod's new policies a moment after its labels change (an adopted warm
# pod's change at once; kube-router here rejected the gateway for a few tens of milliseconds while it
# rewrote its rules, so 3 of 16 warm claims' first commands were refused). Nothing was sent yet.
REFUSED_RETRY_SECONDS = 2.0
REFUSED_RETRY_STEP_SECONDS = 0.02
# Connections to runtimes are kept for the next call, idle at most this long: well under the runtime's own
# RUNTIME_IDLE_SECONDS, so that it is the gateway that closes an idle one, not both at once.
RUNTIME_KEEPALIVE_SECONDS = RUNTIME_IDLE_SECONDS / 4
# Connecting to an address from the watch of sandboxes is given this long: a pod on the pod network accepts
# within a millisecond, and an address whose pod is gone (the watch a moment late) would otherwise hold the
# call for the whole CONNECT_SECONDS before the direct reads say what became of the sandbox.
WATCHED_CONNECT_SECONDS = 1.0
STALE_CONNECTION_RETRIES = 3


class Refusal(Exception):
    """An answer to the caller instead of a call: an HTTP status and a message that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Access:
    """What RBAC is asked about a sandbox (or a pool): `VERB RESOURCE/SUBRESOURCE`."""

    verb: str
    subresource: str
    resource: str = PLURAL


EXEC = Access("create", EXEC_SUBRESOURCE)
CLAIM = Access("create", CLAIM_SUBRESOURCE, POOL_PLURAL)
# How often a claim looks whether its sandbox runs yet (a read of one object; a claim from a warm pool
# takes tens of milliseconds, so a coarser step would be most of it).
CLAIM_POLL_SECONDS = 0.005
CLAIM_WATCH_POLL_SECONDS = 0.001  # the same look at the watch's copy in memory: no request, so more often
CLAIMANT_ANNOTATION = "agentkube.dev/claimant"  # who claimed it through the gateway (for `kubectl describe`)
# A file operation's verb, by HTTP method ("LIST": a GET with list=1).
FILE_ACCESS = {"PUT": Access("create", FILES_SUBRESOURCE), "GET": Access("get", FILES_SUBRESOURCE),
               "LIST": Access("list", FILES_SUBRESOURCE), "DELETE": Access("delete", FILES_SUBRESOURCE)}
# Query parameters passed on to the runtime, per kind of route (nothing else reaches it).
PROCESS_PARAMS = ("wait", "stdout", "stderr", "limit")
FILE_PARAMS = ("path", "mode", "recursive", "list")
# What each background-process route's body must be (checked after authorization, as a run's).
PROCESS_BODIES: dict[tuple[str, str], type[RunRequest] | type[StdinWrite] | type[SignalRequest]] = {
    ("POST", ""): RunRequest, ("POST", "stdin"): StdinWrite, ("POST", "signal"): SignalRequest}


@dataclass(frozen=True)
class Caller:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: tuple[tuple[str, tuple[str, ...]], ...]


# ----- decisions ----------------------------------------------------------------------------------------


def token_of(header: str | None) -> str:
    token = bearer_token(header)
    if token is None:
        raise Refusal(401, "no bearer token: send `Authorization: Bearer <token>` (a service-account token inside "
                           "the cluster, your kubeconfig's token outside)")
    return token


def token_review(token: str) -> dict[str, Any]:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}


def caller_of(review: dict[str, Any]) -> Caller:
    """Who the API server says the token belongs to, or a 401 that says why not."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        why = status.get("error") or "the API server does not recognise it (forged, expired or revoked)"
        raise Refusal(401, f"token not accepted: {why}")
    user = status.get("user") or {}
    return Caller(username=user.get("username", ""), uid=user.get("uid", ""), groups=tuple(user.get("groups") or ()),
                  extra=tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items())))


def access_review(caller: Caller, namespace: str, name: str, access: Access = EXEC) -> dict[str, Any]:
    """May this caller do this to this sandbox: e.g. `create agentsandboxes/exec` (run commands) on it."""
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": caller.username,
            "uid": caller.uid,
            "groups": list(caller.groups),
            "extra": {k: list(v) for k, v in caller.extra},
            "resourceAttributes": {"group": GROUP, "resource": access.resource, "subresource": access.subresource,
                                   "verb": access.verb, "namespace": namespace, "name": name},
        },
    }


def check_allowed(review: dict[str, Any], caller: Caller, namespace: str, name: str, access: Access = EXEC) -> None:
    status = review.get("status") or {}
    if not status.get("allowed") or status.get("denied"):
        why = f" ({status['reason']})" if status.get("reason") else ""
        raise Refusal(403, f"{caller.username} may not {access.verb} {access.resource}/{access.subresource} on {name!r} in namespace "
                           f"{namespace!r}{why}: bind the ClusterRole agentkube-sandbox-user (or a role granting it)")


def runtime_address(sandbox: dict[str, Any] | None, pod: dict[str, Any] | None, namespace: str, name: str) -> str:
    """The sandbox runtime's address, from the sandbox and its pod: only a running pod the sandbox itself
    controls gets the sandbox's runtime token (a pod someone else named like it does not)."""
    if sandbox is None:
        raise Refusal(404, f"no AgentSandbox {name!r} in namespace {namespace!r}")
    phase = (sandbox.get("status") or {}).get("phase", "Pending")
    if pod is None:
        raise Refusal(409, f"sandbox {name!r} has no pod (phase {phase}); resume it (spec.lifecycle.suspend: false) "
                           "and call again once it is Running")
    owners = [o for o in pod["metadata"].get("ownerReferences") or () if o.get("controller")]
    labels = pod["metadata"].get("labels") or {}
    # A sandbox from a pool finds its pod by CLAIMED_BY_LABEL (an adopted warm pod keeps its own SANDBOX_LABEL).
    label = CLAIMED_BY_LABEL if _pooled(sandbox) else SANDBOX_LABEL
    if [o.get("uid") for o in owners] != [sandbox["metadata"]["uid"]] or labels.get(label) != name:
        raise Refusal(502, f"the pod {name!r} in {namespace!r} is not this sandbox's: refusing to send it anything")
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP") or pod["metadata"].get("deletionTimestamp"):
        raise Refusal(503, f"sandbox {name!r} is not running yet (phase {phase}): call again once it is Running")
    return str(status["podIP"])


def _pooled(sandbox: dict[str, Any]) -> bool:
    return bool((sandbox.get("spec") or {}).get("pool"))


def pod_name(sandbox: dict[str, Any] | None, name: str) -> str:
    """The name of a sandbox's pod: its own, or for a sandbox from a pool the warm pod it adopted (its status
    says which; `runtime_address` then checks that the sandbox controls that pod)."""
    if sandbox is not None and _pooled(sandbox):
        return str((sandbox.get("status") or {}).get("podName") or name)
    return name


def runtime_identity(sandbox: dict[str, Any], pod: dict[str, Any]) -> tuple[str, str]:
    """The (name, uid) a pod's runtime token is derived from: the sandbox's, or for a warm pod a sandbox of
    a pool adopted, the name the pod's runtime knows itself by and the random identity the pool gave it."""
    metadata = pod["metadata"]
    return _identity(sandbox, (metadata.get("labels") or {}).get(SANDBOX_LABEL),
                     (metadata.get("annotations") or {}).get(RUNTIME_IDENTITY_ANNOTATION))


def _identity(sandbox: dict[str, Any], runtime_name: Any, identity: Any) -> tuple[str, str]:
    if _pooled(sandbox) and identity:
        return str(runtime_name), str(identity)
    return sandbox["metadata"]["name"], sandbox["metadata"]["uid"]


def cached_target(sandbox: dict[str, Any] | None) -> tuple[str, str, str] | None:
    """From the watch's copy of a sandbox (sandboxwatch.slim): its runtime's address and the (name, uid) its
    token is derived from, only while the operator reports it Running with a runtime and it needs no resume;
    None: the direct reads decide (and say why a call cannot go)."""
    if sandbox is None or sandbox["metadata"].get("deletionTimestamp"):
        return None
    status = sandbox.get("status") or {}
    runtime = status.get("runtime") or {}
    if status.get("phase") != "Running" or not runtime.get("podIP") or not runtime.get("name"):
        return None
    try:
        if resume_patch(sandbox, "") is not None:
            return None
    except Refusal:
        return None
    return str(runtime["podIP"]), *_identity(sandbox, runtime["name"], runtime.get("identity"))


def with_sandbox_env(run: RunRequest, sandbox: dict[str, Any]) -> RunRequest:
    """A call of a sandbox from a pool gets the sandbox's spec.env (its warm pod's container was started
    before the sandbox existed); the call's own variables win, as a shell's `NAME=value command` would."""
    env = {e["name"]: e.get("value", "") for e in (sandbox.get("spec") or {}).get("env") or ()} if _pooled(sandbox) else {}
    if not env:
        return run
    return run.model_copy(update={"env": {**env, **(run.env or {})}})


def claim_manifest(pool: str, claim: ClaimRequest, caller: Caller) -> dict[str, Any]:
    """The AgentSandbox a claim creates: named after the pool by the API server, its env and TTL the
    caller's, marked as made by the gateway (only those can be released through it)."""
    spec: dict[str, Any] = {"pool": pool}
    if claim.env:
        spec["env"] = [{"name": k, "value": v} for k, v in claim.env.items()]
    if claim.ttl_seconds:
        spec["lifecycle"] = {"expireAfter": f"{claim.ttl_seconds}s", "shutdownPolicy": "Delete"}
    naming = {"name": claim.name} if claim.name else {"generateName": f"{pool[:40]}-"}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AgentSandbox",
            "metadata": {**naming, "labels": {CLAIMED_THROUGH_GATEWAY_LABEL: "true"},
                         "annotations": {CLAIMANT_ANNOTATION: caller.username}},
            "spec": spec}


def check_same_claim(sandbox: dict[str, Any] | None, namespace: str, pool: str, name: str, caller: Caller) -> None:
    """A claim asked again under its name (its first answer was lost) may only find the sandbox that claim
    made: through the gateway, from this pool, for this caller. Anything else with the name is someone else's."""
    if sandbox is None:
        raise Refusal(409, f"the sandbox {name!r} of this claim was deleted meanwhile: claim again under a new name")
    metadata = sandbox["metadata"]
    if (sandbox.get("spec") or {}).get("pool") != pool \
            or (metadata.get("labels") or {}).get(CLAIMED_THROUGH_GATEWAY_LABEL) != "true" \
            or (metadata.get("annotations") or {}).get(CLAIMANT_ANNOTATION) != caller.username:
        raise Refusal(409, f"an AgentSandbox named {name!r} already exists in {namespace!r} and is not this caller's "
                           f"claim from pool {pool!r}: claim under another name")


def claimed_of(sandbox: dict[str, Any] | None, namespace: str, name: str) -> Claimed | None:
    """The claim's answer once its sandbox runs; None while it does not yet."""
    if sandbox is None:
        raise Refusal(410, f"the claimed sandbox {name!r} in {namespace!r} was deleted before it ran")
    status = sandbox.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podName"):
        return None
    return Claimed(name=name, namespace=namespace, pool=sandbox["spec"]["pool"], pod_name=status["podName"],
                   warm=status["podName"] != name)


def check_releasable(sandbox: dict[str, Any] | None, namespace: str, pool: str, name: str) -> str:
    """The uid of a sandbox the gateway may release for a caller allowed to claim from `pool`."""
    if sandbox is None:
        raise Refusal(404, f"no AgentSandbox {name!r} in namespace {namespace!r}")
    if (sandbox.get("spec") or {}).get("pool") != pool \
            or (sandbox["metadata"].get("labels") or {}).get(CLAIMED_THROUGH_GATEWAY_LABEL) != "true":
        raise Refusal(403, f"{name!r} is not a sandbox claimed from pool {pool!r} through the gateway: "
                           "delete it with kubectl if you may")
    return str(sandbox["metadata"]["uid"])


def resume_patch(sandbox: dict[str, Any], now: str) -> dict[str, Any] | None:
    """What makes a suspended sandbox run again through the operator's own path, or None when it is not
    suspended: `suspend: true` is cleared; a sandbox suspended for idleness is marked active now (the
    annotation the node agent sets after each call), so its idle timer starts again. An expired one stays."""
    lifecycle = (sandbox.get("spec") or {}).get("lifecycle") or {}
    phase = (sandbox.get("status") or {}).get("phase")
    if phase == "Expired":
        raise Refusal(409, f"sandbox {sandbox['metadata']['name']!r} has expired: it runs nothing any more")
    if lifecycle.get("suspend"):
        return {"spec": {"lifecycle": {"suspend": False}}}
    if phase == "Suspended":
        return {"metadata": {"annotations": {LAST_ACTIVITY_ANNOTATION: now}}}
    return None


def name_of(target: Target) -> str:
    return str(target.sandbox["metadata"]["name"])


def passed_on(query: Any, names: tuple[str, ...]) -> dict[str, str]:
    """The query parameters the runtime is given: only the route's own, each once."""
    return {name: query[name] for name in names if name in query}


def file_access(method: str, query: Any) -> Access:
    if method == "GET" and query.get("list") in ("1", "true"):
        return FILE_ACCESS["LIST"]
    return FILE_ACCESS[method]


def check_file_request(method: str, query: Any, content_length: int | None) -> None:
    """A file request's own checks, after authorization (the runtime checks again against the filesystem)."""
    try:
        workspace_path(query.get("path", ""), root_allowed=file_access(method, query) == FILE_ACCESS["LIST"])
        if method == "PUT":
            upload_mode(query.get("mode"))
    except ApiError as error:
        raise Refusal(error.status, error.message) from None
    if method == "PUT" and content_length is None:
        raise Refusal(411, "an upload needs its Content-Length (the SDK sends the file's size)")


class ExpiringCache(Generic[K, V]):
    """Answers reused for `seconds`, at most `size` of them (the expired, else all, dropped when full)."""

    def __init__(self, seconds: float = REVIEW_SECONDS, size: int = REVIEW_CACHE_SIZE):
        self.seconds, self.size = seconds, size
        self._entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K, now: float) -> V | None:
        entry = self._entries.get(key)
        return entry[1] if entry and entry[0] > now else None

    def put(self, key: K, value: V, now: float) -> None:
        if len(self._entries) >= self.size:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= self.size:
                self._entries.clear()
        self._entries[key] = (now + self.seconds, value)


def token_digest(token: str) -> str:
    """What a token's review is kept under: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


# Recent TokenReview answers, by the token's digest, for REVIEW_SECONDS.
ReviewCache = ExpiringCache[str, Caller]
# Who may run commands where: only a SubjectAccessReview's "allowed" is reused, for REVIEW_SECONDS (the API
# server's own webhook authorizer keeps allowed answers 5 minutes). A denial is asked again each time, so a
# role granted takes effect at once; a role taken away reaches a caller it allowed within REVIEW_SECONDS,
# as a revoked token does.
AccessCache = ExpiringCache[tuple[Caller, str, str, Access], bool]


# ----- I/O ----------------------------------------------------------------------------------------------


class KubernetesApi:
    """The few API calls the gateway makes, with its own identity, in worker threads (the client is
    synchronous; each call is one short request)."""

    def __init__(self, kubeconfig: str | None = None):
        configuration = kubernetes.client.Configuration()
        if kubeconfig:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = 16
        self.client = kubernetes.client.ApiClient(configuration)
        self.authn = kubernetes.client.AuthenticationV1Api(self.client)
        self.authz = kubernetes.client.AuthorizationV1Api(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    def watch_sandboxes(self) -> SandboxWatch:
        """Every AgentSandbox, watched (list and watch on agentsandboxes: see the chart's gateway-rbac.yaml)."""
        return SandboxWatch(lambda **kwargs: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)).start()

    async def review_token(self, token: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._json, self.authn.create_token_review, cast(Any, token_review(token)))

    async def review_access(self, review: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._json, self.authz.create_subject_access_review, cast(Any, review))

    @staticmethod
    def _json(call: Any, *args: Any) -> dict[str, Any]:
        # The answer as JSON, not as the client's model objects: building a V1Pod and turning it back into a
        # dict costs about a millisecond per call, the whole of it thrown away.
        response = call(*args, _preload_content=False)
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()  # back to the pool for the next request

    async def _read(self, call: Any, *args: Any) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(self._json, call, *args)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    async def sandbox(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self.core.read_namespaced_pod, name, namespace)

    async def pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, POOL_PLURAL, name)

    async def create_sandbox(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The sandbox created, or None when one has its name already."""
        try:
            return await asyncio.to_thread(self._json, self.custom.create_namespaced_custom_object, GROUP, VERSION,
                                           namespace, PLURAL, body)
        except kubernetes.client.ApiException as error:
            if error.status == 409:
                return None
            raise

    async def delete_sandbox(self, namespace: str, name: str, uid: str) -> None:
        options = cast(Any, {"preconditions": {"uid": uid}})  # the client serializes a plain dict as it does its models
        await asyncio.to_thread(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                                body=options)

    async def patch_sandbox(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await asyncio.to_thread(self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, patch)


@dataclass(frozen=True)
class Target:
    """Where a call goes: the runtime (address, identity, token), whether the sandbox was just resumed, the
    sandbox as it was read (or as the watch has it), and the watch entry's resourceVersion when it came from
    the watch (None: from the direct reads)."""

    runtime: Runtime
    resumed: bool
    sandbox: dict[str, Any]
    cached_version: str | None = None

    @property
    def cached(self) -> bool:
        return self.cached_version is not None


class Gateway:
    def __init__(self, api: KubernetesApi, runtime_key: bytes, runtime_port: int = RUNTIME_PORT,
                 sandboxes: SandboxWatch | None = None):
        self.api, self.runtime_key, self.runtime_port, self.sandboxes = api, runtime_key, runtime_port, sandboxes
        self.reviews = ReviewCache()
        self.access = AccessCache()
        self.connections: RuntimeConnections | None = None
        # One resume per sandbox at a time: concurrent calls to a suspended sandbox wait on the same one.
        self.resuming: dict[tuple[str, str], asyncio.Task[tuple[str, dict[str, Any], dict[str, Any]]]] = {}

    async def authorize(self, request: web.Request, namespace: str, name: str, access: Access = EXEC) -> Caller:
        token = token_of(request.headers.get("Authorization"))
        now = time.monotonic()
        caller = self.reviews.get(token_digest(token), now)
        if caller is None:
            caller = caller_of(await self.api.review_token(token))
            self.reviews.put(token_digest(token), caller, now)
        if not self.access.get((caller, namespace, name, access), now):
            check_allowed(await self.api.review_access(access_review(caller, namespace, name, access)), caller,
                          namespace, name, access)
            self.access.put((caller, namespace, name, access), True, now)
        return caller

    async def sandbox_and_pod(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Both read at once; a sandbox from a pool whose pod is named otherwise costs a second read."""
        sandbox, pod = await asyncio.gather(self.api.sandbox(namespace, name), self.api.pod(namespace, name))
        if (other := pod_name(sandbox, name)) != name:
            pod = await self.api.pod(namespace, other)
        return sandbox, pod

    def _runtime(self, namespace: str, address: str, runtime_name: str, uid: str) -> Runtime:
        return Runtime(address, self.runtime_port, namespace, runtime_name,
                       runtime_token(self.runtime_key, namespace, runtime_name, uid))

    async def target(self, namespace: str, name: str, use_watch: bool = True) -> Target:
        """Where the call goes: from the watch of sandboxes when it is current and says the sandbox runs
        (no API request), else from the sandbox and its pod read now, once its pod runs (resuming a
        suspended sandbox first)."""
        if use_watch and self.sandboxes is not None:
            cached = self.sandboxes.get(namespace, name)
            found = cached_target(cached)
            if cached is not None and found is not None:
                return Target(self._runtime(namespace, *found), False, cached,
                              str(cached["metadata"].get("resourceVersion")))
        sandbox, pod = await self.sandbox_and_pod(namespace, name)
        resumed = False
        # A call that comes while this gateway resumes the sandbox for another waits on that resume: by now
        # the sandbox may no longer read as suspended (Pending, no pod yet), which alone would be a 409.
        if sandbox is not None and ((namespace, name) in self.resuming or resume_patch(sandbox, "") is not None):
            address, sandbox, pod = await self.resume(namespace, name, sandbox)
            resumed = True
        else:
            address = runtime_address(sandbox, pod, namespace, name)
        assert sandbox is not None and pod is not None
        return Target(self._runtime(namespace, address, *runtime_identity(sandbox, pod)), resumed, sandbox)

    async def send(self, namespace: str, name: str, method: str, path: str, body: Any = None, *,
                   params: dict[str, str] | None = None, content_type: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[Target, Upstream]:
        """One request to the sandbox's runtime. `body`: the bytes, a stream, or a function of the sandbox
        giving them (a call's env comes from its sandbox). A target from the watch that leads nowhere (nobody
        at its address, or not the sandbox's runtime) is distrusted and the direct reads decide again."""
        target = await self.target(namespace, name)
        try:
            return target, await self.dial(method, target, path, body, params=params, content_type=content_type,
                                           headers=headers)
        except (Unreachable, NotTheRuntime) as error:
            if not target.cached:
                raise self._refusal(target, name, error) from None
            assert self.sandboxes is not None
            self.sandboxes.distrust(namespace, name, target.cached_version)
            logger.warning("%s/%s: the watch's address %s led nowhere (%s); reading the sandbox and its pod",
                           namespace, name, target.runtime.address, error)
        target = await self.target(namespace, name, use_watch=False)
        try:
            return target, await self.dial(method, target, path, body, params=params, content_type=content_type,
                                           headers=headers)
        except (Unreachable, NotTheRuntime) as error:
            raise self._refusal(target, name, error) from None

    @staticmethod
    def _refusal(target: Target, name: str, error: Exception) -> Refusal:
        if isinstance(error, NotTheRuntime):
            logger.error("the listener at %s is not %s/%s's runtime: %s; it was sent nothing", target.runtime.address,
                         target.runtime.namespace, target.runtime.name, error)
            return Refusal(502, f"the listener at sandbox {name!r}'s address is not its runtime ({error}): it was "
                                "sent nothing")
        return Refusal(502, f"could not reach sandbox {name!r}'s runtime: {error}")

    async def run(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        caller = await self.authorize(request, namespace, name)
        try:
            run = RunRequest.model_validate_json(await request.read())
        except ValidationError as error:
            raise Refusal(422, validation_message(error)) from None
        logger.info("%s runs %s in %s/%s", caller.username, run.argv[:1], namespace, name)
        _, upstream = await self.send(namespace, name, "POST", "/v1/run",
                                      lambda sandbox: with_sandbox_env(run, sandbox).model_dump_json().encode(),
                                      content_type="application/json")
        async with upstream:
            await self.check_upstream(upstream, namespace, name)
            if upstream.status != 200:  # the node agent's verdict (422: over the envelope, …): pass it on
                return web.Response(status=upstream.status, body=await upstream.read(), content_type="application/json")
            response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def check_upstream(self, upstream: Upstream, namespace: str, name: str) -> None:
        if upstream.status in (401, 403) and upstream.headers.get(REFUSAL_HEADER.lower()) != "request":
            # The runtime refused the gateway: not the caller's doing.
            text = (await upstream.read()).decode(errors="replace")
            logger.error("runtime of %s/%s refused the gateway: %s", namespace, name, text)
            raise Refusal(502, f"sandbox {name!r}'s runtime refused the gateway ({upstream.status}); "
                               "was the sandbox created before the gateway's key?")

    async def relay_json(self, upstream: Upstream, namespace: str, name: str) -> web.Response:
        async with upstream:
            await self.check_upstream(upstream, namespace, name)
            return web.Response(status=upstream.status, body=await upstream.read(), content_type="application/json")

    async def processes(self, request: web.Request) -> web.StreamResponse:
        """Background processes: authorized as `exec`, relayed to the runtime as they are (small JSON)."""
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        process, action = request.match_info.get("process", ""), request.match_info.get("action", "")
        caller = await self.authorize(request, namespace, name, EXEC)
        body = await request.read() if request.method == "POST" else b""
        model = PROCESS_BODIES.get((request.method, action))
        parsed = None
        if model is not None:
            try:
                parsed = model.model_validate_json(body or b"{}")
            except ValidationError as error:
                raise Refusal(422, validation_message(error)) from None

        def content(sandbox: dict[str, Any]) -> bytes | None:
            if isinstance(parsed, RunRequest):  # a process is a call: it gets the sandbox's env as a run does
                return with_sandbox_env(parsed, sandbox).model_dump_json(exclude_none=True).encode()
            return body or None

        path = "/".join(part for part in ("/v1/processes", process, action) if part)
        if request.method == "POST" and not process:
            logger.info("%s starts a background process in %s/%s", caller.username, namespace, name)
        _, upstream = await self.send(namespace, name, request.method, path, content,
                                      params=passed_on(request.query, PROCESS_PARAMS), content_type="application/json")
        return await self.relay_json(upstream, namespace, name)

    async def files(self, request: web.Request) -> web.StreamResponse:
        """Workspace files: authorized per operation on `agentsandboxes/files`, streamed both ways in
        CHUNK_BYTES pieces (the gateway holds at most a few of them per transfer, never a whole file)."""
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        access = file_access(request.method, request.query)
        caller = await self.authorize(request, namespace, name, access)
        check_file_request(request.method, request.query, request.content_length)
        logger.info("%s: %s %s/%s in %s/%s", caller.username, access.verb, FILES_SUBRESOURCE,
                    request.query.get("path", "")[:200], namespace, name)
        params = passed_on(request.query, FILE_PARAMS)
        if request.method == "PUT":
            async def body():
                async for chunk in request.content.iter_chunked(CHUNK_BYTES):
                    yield chunk

            _, upstream = await self.send(namespace, name, "PUT", "/v1/files", body(), params=params,
                                          content_type="application/octet-stream",
                                          headers={"Content-Length": str(request.content_length)})
            return await self.relay_json(upstream, namespace, name)
        _, upstream = await self.send(namespace, name, request.method, "/v1/files", params=params)
        if request.method != "GET" or access == FILE_ACCESS["LIST"] or upstream.status != 200:
            return await self.relay_json(upstream, namespace, name)
        async with upstream:
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            if "content-length" in upstream.headers:
                response.content_length = int(upstream.headers["content-length"])
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def dial(self, method: str, target: Target, path: str, body: Any = None, *,
                   params: dict[str, str] | None = None, content_type: str | None = None,
                   headers: dict[str, str] | None = None) -> Upstream:
        """The runtime's answer to a request, on a connection the runtime proved itself on. Just after a
        resume the runtime may not listen yet, and a NetworkPolicy enforcer may refuse for a moment: from the
        direct reads, connecting is retried for RESUME_SECONDS after a resume and REFUSED_RETRY_SECONDS
        otherwise (nothing was sent, so nothing runs twice); a target from the watch is not retried (the
        direct reads decide instead)."""
        assert self.connections is not None
        content = body(target.sandbox) if callable(body) else body
        started = time.monotonic()
        deadline = started + (0.0 if target.cached else max(RESUME_SECONDS if target.resumed else 0.0,
                                                             REFUSED_RETRY_SECONDS))
        stale = 0
        sent = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
        while True:
            try:
                return await self.connections.request(target.runtime, method, path, params=params, headers=sent,
                                                      content=content,
                                                      connect_seconds=WATCHED_CONNECT_SECONDS if target.cached else None)
            except Unreachable:
                if time.monotonic() >= deadline:
                    raise
            except StaleConnection as error:
                # A kept-alive connection the runtime no longer holds (it restarted, or let it go idle): closed
                # before any answer, so the call was never released (the runtime answers once it is placed,
                # before it runs). Another connection, a few times at most.
                stale += 1
                if stale > STALE_CONNECTION_RETRIES or not isinstance(content, (bytes, type(None))):
                    # A streamed body (an upload) is partly consumed by now and cannot be sent again.
                    raise Refusal(502, f"could not reach sandbox {name_of(target)!r}'s runtime: {error}") from None
                continue
            quick = time.monotonic() - started < REFUSED_RETRY_SECONDS
            await asyncio.sleep(REFUSED_RETRY_STEP_SECONDS if quick else RESUME_POLL_SECONDS)

    async def claim(self, request: web.Request) -> web.Response:
        """A new sandbox from a pool, answered once it runs (from a warm pod: tens of milliseconds)."""
        namespace, pool = request.match_info["namespace"], request.match_info["pool"]
        caller = await self.authorize(request, namespace, pool, CLAIM)
        try:
            claim = ClaimRequest.model_validate_json(await request.read() or b"{}")
        except ValidationError as error:
            raise Refusal(422, validation_message(error)) from None
        # The pool is read while the sandbox is created, not before it (one request less on the claim's path);
        # a sandbox made for a pool that is not there is deleted again.
        found, created = await asyncio.gather(self.api.pool(namespace, pool),
                                              self.api.create_sandbox(namespace, claim_manifest(pool, claim, caller)))
        if created is None:  # the claim's name exists: this claim asked again, or someone else's sandbox
            assert claim.name is not None
            created = await self.api.sandbox(namespace, claim.name)
            check_same_claim(created, namespace, pool, claim.name, caller)
            assert created is not None
        name = created["metadata"]["name"]
        if found is None:
            await self.api.delete_sandbox(namespace, name, created["metadata"]["uid"])
            raise Refusal(404, f"no AgentSandboxPool {pool!r} in namespace {namespace!r}")
        logger.info("%s claims %s/%s from pool %s", caller.username, namespace, name, pool)
        deadline = time.monotonic() + claim.wait_seconds
        while True:
            # The watch's copy once it has one (no request; looked at often), else a read of the sandbox.
            seen = self.sandboxes.get(namespace, name) if self.sandboxes is not None else None
            if (claimed := claimed_of(seen or await self.api.sandbox(namespace, name), namespace, name)) is not None:
                return web.json_response(claimed.model_dump(mode="json"), status=201)
            if time.monotonic() > deadline:
                raise Refusal(504, f"sandbox {name!r} from pool {pool!r} did not run within {claim.wait_seconds:.0f}s; "
                                   "it is still there: use it once it runs, or release it")
            await asyncio.sleep(CLAIM_WATCH_POLL_SECONDS if seen else CLAIM_POLL_SECONDS)

    async def release(self, request: web.Request) -> web.Response:
        """Delete a sandbox claimed through the gateway (its adopted pod goes with it; the pool is untouched)."""
        namespace, pool, name = request.match_info["namespace"], request.match_info["pool"], request.match_info["name"]
        caller = await self.authorize(request, namespace, pool, CLAIM)
        uid = check_releasable(await self.api.sandbox(namespace, name), namespace, pool, name)
        await self.api.delete_sandbox(namespace, name, uid)
        logger.info("%s releases %s/%s of pool %s", caller.username, namespace, name, pool)
        return web.json_response({"released": name})

    async def resume(self, namespace: str, name: str, sandbox: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Resume a suspended sandbox (once, whoever else calls meanwhile) and wait until its pod runs: its
        address, and the sandbox and pod as they are then."""
        key = (namespace, name)
        task = self.resuming.get(key)
        if task is None:
            task = self.resuming[key] = asyncio.create_task(self._resume(namespace, name, sandbox))
            task.add_done_callback(lambda _: self.resuming.pop(key, None))
        return await asyncio.shield(task)

    async def _resume(self, namespace: str, name: str, sandbox: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        patch = resume_patch(sandbox, timestamp(datetime.now(UTC)))
        if patch is not None:
            logger.info("resuming %s/%s for a call", namespace, name)
            await self.api.patch_sandbox(namespace, name, patch)
        deadline = time.monotonic() + RESUME_SECONDS
        while True:
            current, pod = await self.sandbox_and_pod(namespace, name)
            try:
                address = runtime_address(current, pod, namespace, name)
                assert current is not None and pod is not None
                return address, current, pod
            except Refusal as refusal:
                if refusal.status not in (409, 503):
                    raise
                if time.monotonic() > deadline:
                    raise Refusal(504, f"sandbox {name!r} did not run again within {RESUME_SECONDS:.0f}s of its "
                                       f"resume: {refusal.message}") from None
            await asyncio.sleep(RESUME_POLL_SECONDS)

    @web.middleware
    async def refusals(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refusal as refusal:
            headers = {"WWW-Authenticate": 'Bearer realm="agentkube"'} if refusal.status == 401 else None
            return web.json_response({"error": refusal.message}, status=refusal.status, headers=headers)
        except kubernetes.client.ApiException as error:
            logger.error("API server: %s %s", error.status, error.reason)
            return web.json_response({"error": f"the API server answered {error.status} {error.reason}"}, status=502)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.refusals], client_max_size=MAX_REQUEST_BYTES)
        sandbox = "/v1/namespaces/{namespace}/sandboxes/{name}"
        app.router.add_post(f"{sandbox}/run", self.run)
        for method in ("GET", "POST"):
            app.router.add_route(method, f"{sandbox}/processes", self.processes)
        app.router.add_get(f"{sandbox}/processes/{{process:[0-9a-f]{{16}}}}", self.processes)
        app.router.add_get(f"{sandbox}/processes/{{process:[0-9a-f]{{16}}}}/{{action:output}}", self.processes)
        app.router.add_post(f"{sandbox}/processes/{{process:[0-9a-f]{{16}}}}/{{action:stdin|signal}}", self.processes)
        for method in ("GET", "PUT", "DELETE"):
            app.router.add_route(method, f"{sandbox}/files", self.files)
        pool = "/v1/namespaces/{namespace}/pools/{pool}"
        app.router.add_post(f"{pool}/claims", self.claim)
        app.router.add_delete(f"{pool}/claims/{{name}}", self.release)
        app.router.add_get("/healthz", self.healthz)

        async def session(app: web.Application):
            # No read timeout: a call lasts as long as its own timeout says; connecting is bounded.
            self.connections = RuntimeConnections(RUNTIME_KEEPALIVE_SECONDS, CONNECT_SECONDS)
            yield
            await self.connections.close()

        app.cleanup_ctx.append(session)
        return app


def tls_context(cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext | None:
    """HTTPS with the given certificate, TLS 1.2 at least; None (plain HTTP) when neither file is given."""
    if (cert_file is None) != (key_file is None):
        raise SystemExit("give both --tls-cert-file and --tls-key-file, or neither")
    if cert_file is None or key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def serve(*, address: str, port: int, runtime_key_file: Path, kubeconfig: str | None = None,
          tls_cert_file: Path | None = None, tls_key_file: Path | None = None, runtime_port: int = RUNTIME_PORT,
          watch_sandboxes: bool = True) -> None:
    """Serve until stopped. Bearer tokens cross the network to it: the chart always gives it a certificate;
    plain HTTP is for a gateway on loopback (tests, a port-forward's far end)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = Path(runtime_key_file).read_bytes().strip()
    if len(key) < 32:
        raise SystemExit(f"the runtime key in {runtime_key_file} is shorter than 32 bytes")
    tls = tls_context(tls_cert_file, tls_key_file)
    api = KubernetesApi(kubeconfig)
    gateway = Gateway(api, key, runtime_port, sandboxes=api.watch_sandboxes() if watch_sandboxes else None)
    # access_log off: it would log nothing secret, but the gateway's own line per call says who ran what.
    web.run_app(gateway.app(), host=address, port=port, access_log=None, print=None, ssl_context=tls)
