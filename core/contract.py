"""The tool-call contract: one vocabulary for what a tool call may use, shared by the operator, the node
agent, the sandbox runtime and the SDK, and importing none of them.

It holds the tool-intent models (the CRD's `spec.tools`, generated into the CRD from here), the labels,
annotations and socket paths the parts find each other by, and the one translation from an intent to the
limits the node agent enforces. Quantities and durations are parsed by the Kubernetes client's own parsers
(`kubernetes.utils.parse_quantity`, `durationpy`), so everything the API server admits, the node agent
accepts.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import os
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

# ----- where the parts find each other ------------------------------------------------------------------

SANDBOX_LABEL = "agentkube.dev/sandbox"
# The operator writes a sandbox's tool intents and envelope on its pod; the node agent reads them there.
TOOLS_ANNOTATION = "agentkube.dev/tools"
# The node agent adds each finished call to these totals (JSON); the operator mirrors them into status.toolCalls.
TOOL_CALLS_ANNOTATION = "agentkube.dev/tool-calls"
# The node agent's report of tool-call activity; the operator mirrors it and measures idleness from it.
LAST_ACTIVITY_ANNOTATION = "agentkube.dev/last-activity"
# Set by the node agent when it cannot honour a sandbox's tool intent (no call of it runs then); the operator
# turns it into the condition ToolsEnforced=False. Absent while the agent enforces the sandbox's intent.
TOOLS_REFUSED_ANNOTATION = "agentkube.dev/tools-refused"
CONTAINER_NAME = "sandbox"  # the sandbox pod's container whose cgroup holds the sandbox's calls
# Warm pools (AgentSandboxPool). A warm pod keeps its SANDBOX_LABEL (its own name: what its runtime and the
# node agent know it by, for its whole life) and carries POOL_LABEL while it waits. A sandbox that adopts it
# adds CLAIMED_BY_LABEL (its own name: its Service and NetworkPolicy select on it) and becomes its owner.
POOL_LABEL = "agentkube.dev/pool"
POOL_TEMPLATE_LABEL = "agentkube.dev/pool-template"  # the hash of the pool template a warm pod was made from
CLAIMED_BY_LABEL = "agentkube.dev/claimed-by"
# A warm pod's runtime token is derived from its own name and this random value (an AgentSandbox's from its
# name and uid): the gateway reads both from the pod it is sent to.
RUNTIME_IDENTITY_ANNOTATION = "agentkube.dev/runtime-identity"

# One node agent per node serves two sockets: the admin socket (0600, root outside every sandbox) and the
# sandbox socket (0666, mounted read-only into sandbox pods; each request is authorized by the caller's cgroup).
AGENT_SOCKET = Path("/run/agentkube/node-agent.sock")
SANDBOX_AGENT_SOCKET = Path("/run/agentkube/agent/sandbox.sock")
# The sandbox socket's directory reaches sandbox pods as a CSI ephemeral inline volume of this driver, which
# the node agent serves (a hostPath would keep the pods out of the Pod Security baseline standard).
CSI_DRIVER = "csi.agentkube.dev"
# Each sandbox's runtime socket as the SDK on the node finds it (for a pod: a link the node agent makes to
# the socket in the pod's runtime volume).
RUNTIME_SOCKET_DIR = Path("/run/agentkube/sandboxes")
# Inside a sandbox pod: the runtime's socket in a memory-backed emptyDir volume.
POD_RUNTIME_DIR = Path("/run/agentkube/runtime")
RUNTIME_SOCKET_NAME = "runtime.sock"
RUNTIME_VOLUME = "agentkube-runtime"
# The sandbox image's runtime reads where it listens and where the node agent is from these.
RUNTIME_ENV = {
    "AGENTKUBE_SANDBOX_SOCKET": str(POD_RUNTIME_DIR / RUNTIME_SOCKET_NAME),
    "AGENTKUBE_AGENT_SOCKET": str(SANDBOX_AGENT_SOCKET),
}
# The runtime also listens on this TCP port of the pod, for the gateway alone: only when the operator gave
# it a verifier (RUNTIME_VERIFIER_ENV), every request must carry the sandbox's runtime token as a bearer
# token, and the sandbox's NetworkPolicy admits only the gateway's pods to it.
RUNTIME_PORT = 7070
# The SHA-256 (hex) of the sandbox's runtime token, not the token: a tool call runs as the runtime's user
# and can read its environment and files, and a digest lets it forge nothing.
RUNTIME_VERIFIER_ENV = "AGENTKUBE_RUNTIME_TOKEN_SHA256"
# Where the sandbox's workspace is mounted in its container, and its declared size in bytes (the most one
# upload through the gateway may write): the operator tells the runtime, whose file API serves that directory.
WORKSPACE_ENV = "AGENTKUBE_WORKSPACE"
WORKSPACE_BYTES_ENV = "AGENTKUBE_WORKSPACE_BYTES"
# The gateway's pods, as the sandboxes' NetworkPolicies select them (the chart labels them so).
GATEWAY_LABELS = {"app.kubernetes.io/name": "agentkube", "app.kubernetes.io/component": "gateway"}
# Who may do what to a sandbox through the gateway, as RBAC sees it: `create agentsandboxes/exec` to run
# commands and background processes (start, read, write stdin, signal, list); `agentsandboxes/files` with
# the verb of the operation (create: upload, get: download, list, delete) for the workspace's files.
EXEC_SUBRESOURCE = "exec"
FILES_SUBRESOURCE = "files"
# `create agentsandboxpools/claim` on a pool: take a sandbox from it through the gateway, and release one
# taken so (the gateway creates and deletes the AgentSandbox; the caller needs no right on AgentSandboxes).
CLAIM_SUBRESOURCE = "claim"
POOL_PLURAL = "agentsandboxpools"
# Set by the gateway on the AgentSandboxes it creates for claims: only those can be released through it.
CLAIMED_THROUGH_GATEWAY_LABEL = "agentkube.dev/claimed-through-gateway"
# The prefix of every call cgroup's name: who is inside a call is decided by it.
CALL_PREFIX = "call-"
# The node agent answers sandbox pods' DNS on this node-local link-local address (as NodeLocal DNSCache
# does): it lets a tool call reach the addresses of the names its network allows, and only those. Sandbox
# pods get it as their only nameserver; the node agent's --dns-address overrides it (both sides then).
NODE_DNS_ADDRESS = "169.254.20.10"
CLUSTER_DOMAIN = "cluster.local"  # the kubelet's --cluster-domain: sandbox pods' DNS search paths end in it


def dns_search_paths(namespace: str, domain: str = CLUSTER_DOMAIN) -> list[str]:
    """The search paths of a pod in `namespace` (what the kubelet writes for dnsPolicy ClusterFirst)."""
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]


def runtime_socket(namespace: str, name: str, directory: Path = RUNTIME_SOCKET_DIR) -> Path:
    return directory / namespace / f"{name}.sock"


def runtime_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The bearer token the gateway presents to one sandbox's runtime: derived from the key the operator
    and the gateway share, so no Secret per sandbox exists and neither needs to read Secrets. The uid binds
    it to this sandbox object: a sandbox recreated under the same name gets another token."""
    return hmac.new(key, f"{namespace}/{name}/{uid}".encode(), hashlib.sha256).hexdigest()


def token_verifier(token: str) -> str:
    """What the runtime is given to check a token with (RUNTIME_VERIFIER_ENV)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, verifier: str) -> bool:
    return hmac.compare_digest(token_verifier(token), verifier)


# ----- the runtime proves itself to the gateway ---------------------------------------------------------
# A pod's address can be another pod's once it is gone, and the hop is plain HTTP carrying the token, the
# command and its env. So on each new connection, before anything that matters, the gateway asks
# `GET RUNTIME_PROOF_PATH?nonce=N` (N: PROOF_NONCE_BYTES random bytes, hex) and the runtime answers
# {"proof": runtime_proof(verifier, N, namespace, name)}: an HMAC keyed by its verifier (the SHA-256 of the
# sandbox's token, which the gateway derives and a listener elsewhere does not hold) over the nonce and the
# name the runtime knows itself by. The token then goes only to a listener that knows the verifier.
# Why the token still crosses (to a runtime that proved itself) rather than an HMAC of the gateway's: a tool
# call runs as the runtime's user and can read whatever the runtime holds, so the runtime holds no key that
# could verify such an HMAC without also forging it. Knowing the verifier lets nobody pass as the gateway;
# only the token (its preimage) does.
RUNTIME_PROOF_PATH = "/v1/proof"
PROOF_NONCE_BYTES = 32
_NONCE = re.compile(rf"[0-9a-f]{{{2 * PROOF_NONCE_BYTES}}}")


def proof_nonce() -> str:
    return os.urandom(PROOF_NONCE_BYTES).hex()


def is_proof_nonce(nonce: str) -> bool:
    return _NONCE.fullmatch(nonce) is not None


def runtime_proof(verifier: str, nonce: str, namespace: str, name: str) -> str:
    """What only a runtime given `verifier` answers to `nonce`, bound to the sandbox it serves."""
    message = f"agentkube-runtime-proof/v1\n{nonce}\n{namespace}/{name}".encode()
    return hmac.new(verifier.encode(), message, hashlib.sha256).hexdigest()


def proof_matches(proof: object, token: str, nonce: str, namespace: str, name: str) -> bool:
    """Whether `proof` is the answer of the runtime of sandbox `namespace/name` whose token is `token`
    (compared in constant time; anything but a string is no proof)."""
    expected = runtime_proof(token_verifier(token), nonce, namespace, name)
    return isinstance(proof, str) and hmac.compare_digest(proof.encode(), expected.encode())


def timestamp(moment: datetime) -> str:
    """A Kubernetes (RFC 3339, UTC) timestamp, as annotations and status carry them."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ----- bounds both sides agree on -----------------------------------------------------------------------

MAX_ALLOW_RULES = 16  # per network; one source of truth with the BPF program's MAX_RULES (passed as a define)
MAX_PROFILES = 16  # named intents per sandbox
MAX_NAME = 63
MAX_STRING = 1024
MAX_LIST = 64
MiB = 1024 * 1024
GiB = 1024 * MiB
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # names: sandboxes, namespaces, profiles
GO_DURATION = re.compile(r"^[-+]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+$")
# A domain name, optionally with a leading "*." that stands for one or more labels.
FQDN = re.compile(r"^(\*\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)+[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

# What `internet` refuses: everything that is not a public address. Private and shared ranges, loopback,
# link-local (cloud metadata endpoints such as 169.254.169.254 live there), multicast and reserved space,
# and their IPv6 counterparts, IPv4-mapped addresses included. The documentation ranges (TEST-NET) are left
# public on purpose: no network routes them, which makes them the tests' stand-in for "a public host".
NON_PUBLIC = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/127", "::ffff:0:0/96", "64:ff9b::/96", "fc00::/7", "fe80::/10", "ff00::/8",
))


# ----- quantities and durations, parsed as Kubernetes parses them ---------------------------------------

# A call's intent and its sandbox's defaults are parsed at every call's start: the same few strings ("512Mi",
# "5m") again and again, and parsing one costs ~10 µs. Bounded, so that strings sent to fill it only evict.
PARSED_TEXTS_KEPT = 512


def _quantity(value: int | float | str) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("expected a quantity such as 512Mi or 2, not a boolean")
    return _quantity_of_text(value) if isinstance(value, str) else _parse_quantity(value)


@functools.lru_cache(maxsize=PARSED_TEXTS_KEPT)
def _quantity_of_text(text: str) -> Decimal:
    return _parse_quantity(text)  # a Decimal: immutable, so sharing it is safe


def _parse_quantity(value: int | float | str) -> Decimal:
    # Imported here: the sandbox runtime imports this module but never parses a quantity (the node agent
    # judges intents), and its image carries no Kubernetes client.
    from kubernetes.utils import parse_quantity

    try:
        quantity = parse_quantity(value)
    except (ValueError, InvalidOperation, TypeError):
        raise ValueError(f"not a Kubernetes quantity: {value!r} (e.g. 512Mi, 2Gi, 500m, 2)") from None
    if not quantity.is_finite() or quantity <= 0:
        raise ValueError(f"a quantity must be positive: {value!r}")
    return quantity


def quantity_bytes(value: int | float | str) -> int:
    """Bytes of a memory quantity ("1.5Gi", "129e6", "500k", 2048); fractions of a byte round up, as
    Kubernetes rounds them."""
    return math.ceil(_quantity(value))


def quantity_cores(value: int | float | str) -> float:
    """CPU cores of a quantity ("500m", "2", 1.5)."""
    return float(_quantity(value))


def duration_seconds(value: int | float | str) -> float:
    """Seconds of a Go duration ("1h30m", "45s", "100ms") or of a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 5m, not a boolean")
    seconds = _duration_of_text(value) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive: {value!r}")
    return seconds


@functools.lru_cache(maxsize=PARSED_TEXTS_KEPT)
def _duration_of_text(text: str) -> float:
    import durationpy  # what the Kubernetes client parses durations with (imported late, as above)

    if not GO_DURATION.match(text):  # durationpy also takes days and weeks, which Go does not
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h30m)")
    try:
        return durationpy.from_str(text).total_seconds()
    except Exception:  # durationpy raises its own error type for every malformed form
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h30m)") from None


def _checked(parse):
    """A validator that keeps the value as written (the CRD's spelling) once `parse` accepts it."""
    def check(value):
        if value is not None:
            parse(value)
        return value
    return check


# ----- the CRD's building blocks (the schema is generated from these models) ----------------------------

def cel(rule: str, message: str | None = None, *, message_expression: str | None = None,
        field_path: str | None = None) -> dict[str, Any]:
    validation: dict[str, Any] = {"rule": rule}
    if message:
        validation["message"] = message
    if message_expression:
        validation["messageExpression"] = message_expression
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class Model(BaseModel):
    """Kubernetes spelling (camelCase) on the wire, Python spelling in code; unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def validations(*rules: dict[str, Any]) -> ConfigDict:
    """A model's config with CEL rules that span its fields."""
    return ConfigDict(**Model.model_config, json_schema_extra={"x-kubernetes-validations": list(rules)})


def defaulted(factory: Any) -> Any:
    """A field whose default is a whole object (or list): the API server fills it in too, so that
    `kubectl get -o yaml` shows what is in force."""
    value = factory()
    dumped = value.model_dump(by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value
    return Field(default_factory=factory, json_schema_extra={"default": dumped})


# A Kubernetes resource quantity ("2Gi", "500m", 2): the API server checks it with its quantity library,
# this side with the client's parser, which accepts the same grammar.
Quantity = Annotated[
    str | int,
    AfterValidator(_checked(_quantity)),
    WithJsonSchema({
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "maxLength": 64,  # bounds the cost of the CEL rules below; applies to the string form only
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [
            {"rule": "isQuantity(string(self))", "message": "must be a Kubernetes quantity such as 512Mi or 2"},
            {"rule": "!isQuantity(string(self)) || quantity(string(self)).isGreaterThan(quantity('0'))",
             "message": "must be positive"},
        ],
    }),
]
# A Go duration ("30s", "10m", "1h30m"), as Kubernetes and Knative write them.
Duration = Annotated[str, Field(pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$", max_length=32),
                     AfterValidator(_checked(duration_seconds))]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


def _cidr(value: str) -> str:
    if "/" not in value:
        raise ValueError(f"not a CIDR: {value!r} (e.g. 10.0.0.0/8, 203.0.113.7/32)")
    ipaddress.ip_network(value, strict=False)
    return value


def _fqdn(value: str) -> str:
    if len(value) > 253 or not FQDN.match(value):
        raise ValueError(f"not a domain name: {value!r} (e.g. pypi.org, *.github.com)")
    return value


class EgressRule(Model):
    """One destination of `egress: explicit`: an address range (`cidr`) or a domain name (`fqdn`, `*.` for
    any subdomain), and a port (none = any)."""

    model_config = validations(cel("has(self.cidr) != has(self.fqdn)", "set exactly one of cidr and fqdn"))
    cidr: Annotated[str, Field(max_length=64), AfterValidator(_cidr)] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-validations": [cel("isCIDR(self)", "must be a CIDR such as 10.0.0.0/8")]})
    fqdn: Annotated[str, Field(max_length=253, json_schema_extra={"pattern": FQDN.pattern}), AfterValidator(_fqdn)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @model_validator(mode="after")
    def _one_destination(self) -> EgressRule:
        if (self.cidr is None) == (self.fqdn is None):
            raise ValueError("set exactly one of cidr and fqdn")
        return self

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        assert self.cidr is not None
        return ipaddress.ip_network(self.cidr, strict=False)

    def __str__(self) -> str:
        return f"{self.cidr or self.fqdn}:{self.port or '*'}"


EgressMode = Literal["none", "cluster", "internet", "explicit"]


class ToolNetwork(Model):
    """Where a tool call may connect, besides its pod's own loopback (always allowed: it never leaves the
    pod). `none`: nowhere, DNS included; `cluster`: the pod and service networks and the cluster DNS;
    `internet`: public addresses only; `explicit`: exactly the `allow` rules."""

    model_config = validations(
        cel("self.egress == 'explicit' ? (has(self.allow) && size(self.allow) > 0) : (!has(self.allow) || size(self.allow) == 0)",
            "allow lists the rules of egress: explicit, and only then", field_path=".allow"),
    )
    egress: EgressMode = "none"
    allow: Annotated[list[EgressRule], Field(max_length=MAX_ALLOW_RULES)] = defaulted(list)

    @model_validator(mode="after")
    def _allow_only_explicit(self) -> ToolNetwork:
        if (self.egress == "explicit") != bool(self.allow):
            raise ValueError("allow lists the rules of egress: explicit, and only then")
        return self

    def __str__(self) -> str:
        return ",".join(map(str, self.allow)) if self.egress == "explicit" else self.egress


def egress_rule(text: str) -> EgressRule:
    """One rule as the SDK and the CLI write it: "10.0.0.0/8:443", "203.0.113.7:*", "[2001:db8::1]:80",
    "pypi.org:443", "*.github.com:443" (the port is required; * means any)."""
    text = text.strip()
    host, sep, port = (text[1:].partition("]:") if text.startswith("[") else text.rpartition(":"))
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {text!r} (e.g. 10.0.0.0/8:443, pypi.org:443, [2001:db8::1]:80, 203.0.113.7:*)")
    if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"not a port in {text!r}: {port!r} (1-65535 or *)")
    try:
        address = ipaddress.ip_network(host, strict=False)
        destination = {"cidr": str(address) if "/" not in host else host}
    except ValueError:
        destination = {"fqdn": host.lower()}
    return EgressRule(**destination, port=None if port == "*" else int(port))


def tool_network(value: str | Sequence[str] | dict[str, Any] | ToolNetwork) -> ToolNetwork:
    """A network as a mode ("none", "cluster", "internet"), a list of rules (egress: explicit), or the
    CRD's own form."""
    if isinstance(value, ToolNetwork):
        return value
    if isinstance(value, dict):
        return ToolNetwork.model_validate(value)
    if isinstance(value, str):
        if value in ("none", "cluster", "internet"):
            return ToolNetwork(egress=value)  # type: ignore[arg-type]
        value = [part for part in value.split(",") if part.strip()]
    return ToolNetwork(egress="explicit", allow=[egress_rule(item) for item in value])


class ToolIntent(Model):
    """What one tool call may use. Unset fields fall back to the sandbox's default intent."""

    memory: Quantity | None = None
    cpu: Quantity | None = None
    pids: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    network: ToolNetwork | None = None
    timeout: Duration | None = None


class ToolCallTotals(Model):
    """The node agent's running totals of a sandbox's calls (TOOL_CALLS_ANNOTATION; status.toolCalls)."""

    calls: int = 0
    failed: int = 0
    oom_killed: int = 0
    blocked_connections: int = 0
    dns_refused: int = 0


def _constant(**fields: Any) -> ToolIntent:
    """An intent written in this module. Not validated here: importing the contract must not need the
    Kubernetes client (the sandbox image has none); a unit test validates every one of them."""
    return ToolIntent.model_construct(**fields)


DEFAULT_INTENT = _constant(memory="512Mi", cpu="1", pids=256, timeout="5m", network=ToolNetwork())


class Tools(Model):
    """An AgentSandbox's `spec.tools`: the default intent of its calls and named profiles. Together they
    are the widest a call of the sandbox may get: the network of a call must fit one of them."""

    default: ToolIntent = defaulted(lambda: DEFAULT_INTENT.model_copy())
    profiles: Annotated[dict[Name, ToolIntent], Field(max_length=MAX_PROFILES)] = defaulted(dict)


class CallIntent(ToolIntent):
    """What an agent declares for one call: a profile by name, explicit values, or nothing."""

    profile: Name | None = None


# Named intents every sandbox offers beside its own (its own win on a name clash). Shapes follow what
# coding agents' tool calls need (AgentCgroup: quick shell commands stay small; builds and test runs burst
# to GBs). They are bounded like any other intent: `fetch` in a sandbox without internet is refused.
BUILTIN_PROFILES: dict[str, ToolIntent] = {
    "shell": _constant(memory="256Mi", cpu="500m", pids=64, timeout="1m", network=ToolNetwork(egress="none")),
    "test": _constant(memory="2Gi", cpu="1", pids=512, timeout="10m", network=ToolNetwork(egress="none")),
    "build": _constant(memory="4Gi", cpu="2", pids=1024, timeout="30m", network=ToolNetwork(egress="none")),
    "fetch": _constant(memory="512Mi", cpu="500m", pids=64, timeout="2m", network=ToolNetwork(egress="internet")),
}


# ----- the network envelope -----------------------------------------------------------------------------

def is_public(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return not any(network.version == blocked.version and network.overlaps(blocked) for blocked in NON_PUBLIC)


def fqdn_matches(pattern: str, name: str) -> bool:
    """Whether `name` (itself possibly a `*.` pattern) is covered by `pattern`: equal, or under a `*.` pattern."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return name.endswith(suffix) and len(name) > len(suffix)
    return name == pattern


def rule_within(rule: EgressRule, grant: EgressRule) -> bool:
    if grant.port is not None and rule.port != grant.port:
        return False
    if rule.cidr is not None and grant.cidr is not None:
        return rule.network.version == grant.network.version and rule.network.subnet_of(grant.network)  # type: ignore[arg-type]
    if rule.fqdn is not None and grant.fqdn is not None:
        return fqdn_matches(grant.fqdn, rule.fqdn)
    return False


def network_within(request: ToolNetwork, grant: ToolNetwork) -> bool:
    """Whether every connection `request` allows, `grant` allows too. A name is covered only by a name
    rule (its addresses are whatever DNS says, so no address range can vouch for it)."""
    if request.egress == "none":
        return True
    if request.egress != "explicit":
        return grant.egress == request.egress
    if grant.egress == "explicit":
        return all(any(rule_within(rule, allowed) for allowed in grant.allow) for rule in request.allow)
    if grant.egress == "internet":
        return all(rule.cidr is not None and is_public(rule.network) for rule in request.allow)
    return False


def network_grants(tools: Tools) -> list[ToolNetwork]:
    """The networks a sandbox's spec grants: its default's and its own profiles'. A call's network must fit
    one of them; built-in profiles grant nothing."""
    intents = [tools.default, *tools.profiles.values()]
    return [intent.network for intent in intents if intent.network is not None] or [ToolNetwork()]


# ----- from an intent to enforced limits ----------------------------------------------------------------

# memory.high sits below memory.max so that a call is throttled (reclaimed) before it is killed.
MEMORY_HIGH_FRACTION = 0.9
MIN_CALL_MEMORY = 16 * MiB  # below this a shell cannot even start
CPU_PERIOD_US = 100_000
# History: a command needs this many observed runs before its p95 is trusted, and gets this margin on top.
HISTORY_MIN_SAMPLES = 3
HISTORY_MARGIN = 1.5
HISTORY_WINDOW = 50  # most recent peaks kept per command signature
LimitSource = Literal["intent", "profile", "history", "default"]
LIMIT_FIELDS = ("memory", "cpu", "pids", "timeout")


class Envelope(BaseModel):
    """The most any call in a sandbox may get in the numeric dimensions (its cgroup holds these too):
    bytes, cores, processes, seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int = Field(gt=0)
    cpu: float = Field(gt=0)
    pids: int = Field(gt=0)
    timeout: float = Field(gt=0)


class Limits(Envelope):
    """What the node agent enforces on one call; every field set."""

    network: ToolNetwork = ToolNetwork()

    @property
    def memory_high(self) -> int:
        return memory_high_for(self.memory)

    @property
    def cpu_quota_us(self) -> int:
        return max(1000, round(self.cpu * CPU_PERIOD_US))


def enforced(intent: ToolIntent) -> dict[str, Any]:
    """The fields an intent sets, in the node agent's units (bytes, cores, seconds)."""
    parsers: dict[str, Callable[[Any], int | float]] = {"memory": quantity_bytes, "cpu": quantity_cores, "pids": int,
                                                         "timeout": duration_seconds}
    values: dict[str, Any] = {name: parsers[name](getattr(intent, name)) for name in LIMIT_FIELDS
                              if getattr(intent, name) is not None}
    if intent.network is not None:
        values["network"] = intent.network
    return values


class ResolvedLimits(BaseModel):
    limits: Limits
    sources: dict[str, LimitSource]


class OutOfEnvelope(ValueError):
    """A call asked for more than its sandbox grants; the message names the field."""


def memory_high_for(memory_max: int) -> int:
    return max(MIN_CALL_MEMORY // 2, int(memory_max * MEMORY_HIGH_FRACTION))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 is a value that was observed)."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def memory_from_history(peaks: Sequence[int]) -> int | None:
    """p95 of the observed peaks times the margin, or None while there are too few observations."""
    if len(peaks) < HISTORY_MIN_SAMPLES:
        return None
    return max(MIN_CALL_MEMORY, int(percentile(peaks, 0.95) * HISTORY_MARGIN))


def command_signature(argv: Sequence[str]) -> str:
    """Which past calls count as "the same command": the program and its first non-option word
    (`pytest`, `make test`, `python -m pytest` -> `python pytest`), so that arguments such as file
    names or test ids do not split the history, while `make` and `make test` stay apart."""
    if not argv:
        raise ValueError("empty argv")
    words = [os.path.basename(argv[0])]
    for arg in argv[1:]:
        if arg.startswith("-"):
            continue
        word = arg.split("::", 1)[0]  # pytest node ids name one test of a file
        words.append(os.path.basename(word) if "/" in word else word)
        break
    return " ".join(words)[:128]


def resolve_limits(intent: CallIntent, history_peaks: Sequence[int], tools: Tools, envelope: Envelope) -> ResolvedLimits:
    """The limits one call gets, per field: the intent's explicit value, else its profile's (the sandbox's
    own, else a built-in one), else (memory) what past calls of the command needed, else the sandbox's
    default. Nothing exceeds what the sandbox grants. An explicit value above the envelope, and a network
    (from anywhere) wider than every network the sandbox's spec grants, are refused with OutOfEnvelope;
    numbers not asked for explicitly are clamped to the envelope instead."""
    profiles = BUILTIN_PROFILES | tools.profiles
    if intent.profile is not None and intent.profile not in profiles:
        raise OutOfEnvelope(f"profile: unknown profile {intent.profile!r}; this sandbox has: {', '.join(sorted(profiles))}")
    layers: list[tuple[LimitSource, dict[str, Any]]] = [("intent", enforced(intent))]
    if intent.profile is not None:
        layers.append(("profile", enforced(profiles[intent.profile])))
    history_memory = memory_from_history(history_peaks)
    if history_memory is not None:
        layers.append(("history", {"memory": history_memory}))
    layers.append(("default", enforced(DEFAULT_INTENT) | enforced(tools.default)))
    values: dict[str, Any] = {}
    sources: dict[str, LimitSource] = {}
    for name in (*LIMIT_FIELDS, "network"):
        sources[name], values[name] = next((source, layer[name]) for source, layer in layers if name in layer)
    for name in LIMIT_FIELDS:
        ceiling = getattr(envelope, name)
        if values[name] > ceiling:
            if sources[name] == "intent":
                raise OutOfEnvelope(f"{name}: {values[name]} is above the sandbox's envelope of {ceiling}")
            values[name] = ceiling
    grants = network_grants(tools)
    if not any(network_within(values["network"], grant) for grant in grants):
        origin = f"profile {intent.profile!r}" if sources["network"] == "profile" else sources["network"]
        raise OutOfEnvelope(f"network: egress {values['network']} (from the {origin}) is wider than this sandbox's "
                            f"spec.tools grants ({'; '.join(map(str, grants))})")
    values["memory"] = max(MIN_CALL_MEMORY, int(values["memory"]))
    return ResolvedLimits(limits=Limits(**values), sources=sources)


def defaults_fit(tools: Tools, envelope: Envelope) -> None:
    """Raises OutOfEnvelope when a sandbox's own default intent is above its envelope (the CRD's CEL rules
    refuse such an object; pods made by anything else are checked here)."""
    values = enforced(DEFAULT_INTENT) | enforced(tools.default)
    for name in LIMIT_FIELDS:
        if values[name] > getattr(envelope, name):
            raise OutOfEnvelope(f"spec.tools.default.{name}: {values[name]} is above the sandbox's envelope of "
                                f"{getattr(envelope, name)}")
