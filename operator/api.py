"""The agentkube.dev/v1alpha1 API: typed models of AgentSandbox and ServedModel.

These models are the one source of truth. `crds/*.yaml` are generated from them (`agentkube crds
generate`), the operator parses objects with them, and a test fails when the two drift. Rules that span
fields are CEL `x-kubernetes-validations`, so that the API server rejects a bad object at `kubectl apply`
with a message that names the field; the same rules hold in Python where they are cheap to repeat.
"""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from agentkube.contract import (  # the tool-call vocabulary, shared with the node agent, runtime and SDK
    MAX_LIST,
    MAX_NAME,
    MAX_STRING,
    Duration,
    Model,
    Name,
    Quantity,
    ToolCallTotals,
    Tools,
    cel,
    defaulted,
    validations,
)
from agentkube.rl.knative import KnativeDefaults

GROUP = "agentkube.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "agentkube"


# ----- AgentSandbox -------------------------------------------------------------------------------------


class ResourceList(Model):
    cpu: Quantity | None = None
    memory: Quantity | None = None


class Resources(Model):
    """The sandbox's envelope: every tool call's limits must fit inside `limits`."""

    model_config = validations(
        cel(
            "!has(self.requests) || !has(self.limits) || !has(self.requests.memory) || !has(self.limits.memory)"
            " || quantity(string(self.requests.memory)).compareTo(quantity(string(self.limits.memory))) <= 0",
            "requests.memory may not exceed limits.memory",
        )
    )
    requests: ResourceList | None = None
    limits: ResourceList | None = None


class EnvVar(Model):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME * 4, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
    value: Annotated[str, Field(max_length=32768)] = ""


class Toleration(Model):
    key: Annotated[str, Field(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SandboxTemplate(Model):
    image: Annotated[str, Field(min_length=1, max_length=MAX_STRING)]
    command: Annotated[list[Annotated[str, Field(max_length=MAX_STRING)]], Field(max_length=MAX_LIST)] | None = None
    args: Annotated[list[Annotated[str, Field(max_length=MAX_STRING)]], Field(max_length=MAX_LIST)] | None = None
    env: Annotated[list[EnvVar], Field(max_length=MAX_LIST)] | None = None
    resources: Resources = defaulted(Resources)
    runtime_class_name: Name | None = None
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=MAX_NAME)]], Field(max_length=MAX_LIST)] | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=MAX_LIST)] | None = None
    # The container always runs non-root, without privilege escalation, with RuntimeDefault seccomp and
    # every capability dropped; only the identity is the user's to choose.
    run_as_user: Annotated[int, Field(ge=1)] = 1000
    run_as_group: Annotated[int, Field(ge=1)] = 1000


class Lifecycle(Model):
    model_config = validations(
        cel("!(has(self.expireAfter) && has(self.shutdownTime))", "set expireAfter or shutdownTime, not both"),
    )
    suspend: bool = False
    idle_timeout: Duration | None = None
    expire_after: Duration | None = None
    shutdown_time: datetime | None = None
    shutdown_policy: Literal["Delete", "Retain"] = "Retain"


class Workspace(Model):
    size: Quantity = "1Gi"
    storage_class_name: Name | None = None
    mount_path: Annotated[str, Field(pattern=r"^/", max_length=MAX_STRING)] = "/workspace"


class SandboxNetwork(Model):
    """The NetworkPolicy the operator manages: ingress only from the agentkube runtime path, egress only
    DNS plus what the tool intents allow."""

    managed_policy: bool = True


def _profile_fits(resource: str) -> str:
    envelope = f"self.template.resources.limits.{resource}"
    return (
        f"!has(self.template.resources.limits) || !has({envelope}) || self.tools.profiles.all(name,"
        f" !has(self.tools.profiles[name].{resource})"
        f" || quantity(string(self.tools.profiles[name].{resource})).compareTo(quantity(string({envelope}))) <= 0)"
    )


def _default_fits(resource: str) -> str:
    envelope = f"self.template.resources.limits.{resource}"
    return (
        f"!has(self.template.resources.limits) || !has({envelope}) || !has(self.tools.default.{resource})"
        f" || quantity(string(self.tools.default.{resource})).compareTo(quantity(string({envelope}))) <= 0"
    )


def _profiles_over(resource: str) -> str:
    # Naming the offending profiles (filter + join) would cost more than the API server's CEL budget allows.
    envelope = f"self.template.resources.limits.{resource}"
    return (
        f"'a tool profile in spec.tools.profiles asks for more {resource} than the sandbox allows"
        f" (spec.template.resources.limits.{resource} = ' + string({envelope}) + ')'"
    )


def _envelope_rules(guard: str = "") -> tuple[dict, ...]:
    """The tool intents must fit the template's envelope (an AgentSandbox's, or a pool's). `guard`: a CEL
    condition under which the rules hold trivially (a sandbox that takes its template from a pool)."""
    return tuple(
        cel(guard + rule, message, message_expression=expression, field_path=path)
        for rule, message, expression, path in (
            (_profile_fits("memory"), None, _profiles_over("memory"), ".tools.profiles"),
            (_profile_fits("cpu"), None, _profiles_over("cpu"), ".tools.profiles"),
            (_default_fits("memory"), "spec.tools.default.memory may not exceed spec.template.resources.limits.memory",
             None, ".tools.default.memory"),
            (_default_fits("cpu"), "spec.tools.default.cpu may not exceed spec.template.resources.limits.cpu",
             None, ".tools.default.cpu"),
        )
    )


class AgentSandboxSpec(Model):
    model_config = validations(
        *_envelope_rules("!has(self.template) || "),
        cel("has(self.template) != has(self.pool)", "set spec.template, or spec.pool to take a warm sandbox of that"
            " pool, not both"),
        cel("!has(self.pool) || !has(self.workspace)", "a sandbox from a pool has the warm sandbox's own workspace"
            " (an emptyDir nobody else used); spec.workspace is for sandboxes with their own template",
            field_path=".workspace"),
        cel("has(self.pool) || !has(self.env)", "spec.env is for sandboxes from a pool; set spec.template.env",
            field_path=".env"),
    )
    template: SandboxTemplate | None = None
    # The AgentSandboxPool (same namespace) whose warm sandbox this one adopts; its template, tools and
    # network are then the pool's (spec.tools and spec.network here are not used).
    pool: Name | None = None
    # A pooled sandbox's own environment: given to each of its tool calls (the warm pod started before it
    # was known), on top of the pool template's env.
    env: Annotated[list[EnvVar], Field(max_length=MAX_LIST)] | None = None
    tools: Tools = defaulted(Tools)
    lifecycle: Lifecycle = defaulted(Lifecycle)
    workspace: Workspace | None = None
    network: SandboxNetwork = defaulted(SandboxNetwork)


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None


SandboxPhase = Literal["Pending", "Running", "Suspended", "Failed", "Expired"]


class RuntimeEndpoint(Model):
    """Where the gateway reaches a running sandbox's runtime, and what its token is derived from, as the
    operator last saw its pod: the gateway's watch of sandboxes spares each call reading the pod (the gateway
    may not list pods). A hint, never a credential: the runtime at that address proves itself before the
    gateway sends it anything (contract.runtime_proof)."""

    model_config = ConfigDict(**Model.model_config | {"extra": "ignore"})
    pod_ip: Annotated[str, Field(max_length=45, alias="podIP")]  # an IPv4 or IPv6 address
    # The name the pod's runtime knows itself by (the pod's agentkube.dev/sandbox label: the sandbox's name,
    # or an adopted warm pod's own), and a warm pod's random runtime identity (absent: the sandbox's uid).
    name: Name
    identity: Annotated[str, Field(max_length=MAX_NAME)] | None = None


class AgentSandboxStatus(Model):
    # Written by the operator only; read leniently, so that a newer operator's fields do not break an older one.
    model_config = ConfigDict(**Model.model_config | {"extra": "ignore"})
    phase: SandboxPhase | None = None
    conditions: list[Condition] = defaulted(list)
    pod_name: str | None = None
    runtime: RuntimeEndpoint | None = None  # while Running
    node_name: str | None = None
    service_fqdn: str | None = None
    last_activity_time: datetime | None = None
    tool_calls: ToolCallTotals = defaulted(ToolCallTotals)
    observed_generation: int | None = None


# ----- AgentSandboxPool ---------------------------------------------------------------------------------


class PoolTemplate(Model):
    """What every warm sandbox of a pool is: an AgentSandbox's template, tools and network. Its workspace
    is the pod's own emptyDir (a persistent claim cannot be made before its owner is known)."""

    model_config = validations(*_envelope_rules())
    template: SandboxTemplate
    tools: Tools = defaulted(Tools)
    network: SandboxNetwork = defaulted(SandboxNetwork)


class AgentSandboxPoolSpec(Model):
    replicas: Annotated[int, Field(ge=0, le=1000)] = 1  # warm sandboxes kept started (the scale subresource's)
    template: PoolTemplate


class AgentSandboxPoolStatus(Model):
    model_config = AgentSandboxStatus.model_config
    replicas: int = 0  # warm pods of the current template, started or starting
    ready_replicas: int = 0  # of those, ready to be adopted
    selector: str | None = None  # the label selector of the pool's warm pods (for the scale subresource)
    template_hash: str | None = None
    conditions: list[Condition] = defaulted(list)
    observed_generation: int | None = None


# ----- ServedModel --------------------------------------------------------------------------------------


class ModelSource(Model):
    name: Annotated[str, Field(min_length=1, max_length=MAX_STRING)]
    uri: Annotated[str, Field(max_length=MAX_STRING)] | None = None


class ModelResources(Model):
    requests: Annotated[dict[Annotated[str, Field(max_length=MAX_NAME * 4)], Quantity], Field(max_length=16)] | None = None
    limits: Annotated[dict[Annotated[str, Field(max_length=MAX_NAME * 4)], Quantity], Field(max_length=16)] | None = None


class Slo(Model):
    p95_latency_ms: Annotated[int, Field(ge=1)]


class PpoSettings(Model):
    decision_interval: Duration = "30s"
    # The largest change of the concurrency target one decision may make, as a fraction of the current one.
    max_change_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5


class Autoscaling(Model):
    model_config = validations(
        cel("self.maxScale == 0 || self.minScale <= self.maxScale",
            "minScale may not exceed maxScale (maxScale 0 means unbounded)", field_path=".minScale"),
        cel("self.maxScale == 0 || self.initialScale <= self.maxScale", "initialScale may not exceed maxScale",
            field_path=".initialScale"),
        cel("self.policy != 'fixed' || (self.minScale == self.maxScale && self.minScale > 0)",
            "policy fixed runs exactly minScale = maxScale > 0 replicas", field_path=".policy"),
    )
    policy: Literal["kpa", "fixed", "ppo"] = "kpa"
    target: Annotated[int, Field(ge=1, le=10_000)] = int(KnativeDefaults.container_concurrency_target_default)
    target_utilization: Annotated[int, Field(ge=1, le=100)] = round(KnativeDefaults.target_utilization * 100)  # percent
    min_scale: Annotated[int, Field(ge=0, le=10_000)] = 0
    max_scale: Annotated[int, Field(ge=0, le=10_000)] = 0
    # At least 1: Knative refuses initial-scale 0 unless the cluster's config-autoscaler allows it
    # (allow-zero-initial-scale, off by default), and a ServedModel must not depend on that.
    initial_scale: Annotated[int, Field(ge=1, le=10_000)] = 1
    scale_to_zero: bool = True
    slo: Slo | None = None
    ppo: PpoSettings = defaulted(PpoSettings)


class SpotCapacity(Model):
    enabled: bool = False
    on_demand_base: Annotated[int, Field(ge=0, le=10_000)] = 1
    max_spot_fraction: Annotated[float, Field(ge=0, le=1)] = 0.8


class Capacity(Model):
    spot: SpotCapacity = defaulted(SpotCapacity)


# What Knative's webhook refuses in a revision's container (knative.dev/serving, pkg/apis/serving/
# k8s_validation.go: reservedPorts, reservedEnvVars): the queue-proxy's and profiling ports, and the
# variables Knative sets itself. Refused here too, so that a ServedModel the API server admits is never
# refused by Knative (tests/e2e/test_knative.py checks both against the real webhook).
KNATIVE_RESERVED_PORTS = (8008, 8012, 8013, 8022, 9090, 9091)
KNATIVE_RESERVED_ENV = ("PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION")


class ServedModelSpec(Model):
    model_config = validations(
        cel(f"!(self.port in {list(KNATIVE_RESERVED_PORTS)})",
            f"port may not be one Knative reserves for its queue-proxy ({', '.join(map(str, KNATIVE_RESERVED_PORTS))})",
            field_path=".port"),
        cel("!has(self.env) || self.env.all(e, !(e.name in " + str(list(KNATIVE_RESERVED_ENV)).replace("'", '"') + "))",
            f"env may not set what Knative sets itself ({', '.join(KNATIVE_RESERVED_ENV)})", field_path=".env"),
    )
    model: ModelSource
    image: Annotated[str, Field(min_length=1, max_length=MAX_STRING)]
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    args: Annotated[list[Annotated[str, Field(max_length=MAX_STRING)]], Field(max_length=MAX_LIST)] | None = None
    env: Annotated[list[EnvVar], Field(max_length=MAX_LIST)] | None = None
    resources: ModelResources | None = None
    autoscaling: Autoscaling = defaulted(Autoscaling)
    capacity: Capacity = defaulted(Capacity)


class AutoscalingDecision(Model):
    """The autoscaling loop's last decision (`policy: ppo`): the target it applied and why."""

    time: datetime
    value: int  # the concurrency target applied
    reason: str  # the Autoscaling condition's reason: PolicyDecided, or why it fell back
    message: str = ""
    previous_value: int | None = None
    policy_target: float | None = None  # what the policy asked for, before the bounded step
    spot_share: float | None = None
    # The min-scale applied (the policy's warm-pod floor, at least the spec's), and the share of the last
    # 10 minutes' peak pods the policy asked to keep warm.
    min_scale: int | None = None
    warm_share: float | None = None
    # The metric values the decision saw, under Knative's names (request rate, p95 latency in ms, ...).
    inputs: Annotated[dict[Annotated[str, Field(max_length=MAX_NAME)], float], Field(max_length=16)] = defaulted(dict)


class ServedModelStatus(Model):
    model_config = AgentSandboxStatus.model_config
    url: str | None = None
    ready: bool = False
    conditions: list[Condition] = defaulted(list)
    concurrency_target: int | None = None
    # Knative's Revisions of the model: the latest it created and the latest that became ready (they differ
    # while a spec change rolls out, or when the new one cannot start).
    latest_created_revision: str | None = None
    latest_ready_revision: str | None = None
    min_scale: int | None = None  # the min-scale in force (`ppo`: the loop's warm-pod floor)
    last_decision: AutoscalingDecision | None = None
    observed_generation: int | None = None
