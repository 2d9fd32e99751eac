"""The agentkube.dev/v1alpha1 API: typed models of AgentSandbox and ServedModel.

These models are the one source of truth. `crds/*.yaml` are generated from them (`agentkube crds
generate`), the operator parses objects with them, and a test fails when the two drift. Rules that span
fields are CEL `x-kubernetes-validations`, so that the API server rejects a bad object at `kubectl apply`
with a message that names the field; the same rules hold in Python where they are cheap to repeat.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from agentkube.ebpf.limits import MAX_ALLOW_RULES, MAX_PROFILES  # what the node agent accepts per sandbox
from agentkube.rl.knative import KnativeDefaults

GROUP = "agentkube.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "agentkube"

# Bounds keep every CEL rule's cost estimable by the API server (it refuses unbounded lists and maps).
MAX_NAME = 63
MAX_STRING = 1024
MAX_LIST = 64

# A Kubernetes resource quantity ("2Gi", "500m", 2). Checked by the API server's quantity library.
Quantity = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": 64,  # bounds the cost of the CEL rules below; applies to the string form only
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                {"rule": "isQuantity(string(self))", "message": "must be a Kubernetes quantity such as 512Mi or 2"},
                {
                    "rule": "!isQuantity(string(self)) || quantity(string(self)).isGreaterThan(quantity('0'))",
                    "message": "must be positive",
                },
            ],
        }
    ),
]
# A Go duration ("30s", "10m", "1h30m"), as Kubernetes and Knative write them.
Duration = Annotated[str, Field(pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$", max_length=32)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


def cel(rule: str, message: str | None = None, *, message_expression: str | None = None, field_path: str | None = None) -> dict:
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


def defaulted(factory: Any) -> Any:
    """A field whose default is a whole object (or list): the API server fills it in too, so that
    `kubectl get -o yaml` shows what is in force."""
    value = factory()
    dumped = value.model_dump(by_alias=True, exclude_none=True) if isinstance(value, BaseModel) else value
    return Field(default_factory=factory, json_schema_extra={"default": dumped})


def validations(*rules: dict) -> ConfigDict:
    """A model's config with CEL rules that span its fields."""
    return ConfigDict(**Model.model_config, json_schema_extra={"x-kubernetes-validations": list(rules)})


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


class AllowRule(Model):
    cidr: Annotated[str, Field(max_length=64)] = Field(json_schema_extra={"x-kubernetes-validations": [cel("isCIDR(self)", "must be a CIDR such as 10.0.0.0/8")]})
    port: Annotated[int, Field(ge=1, le=65535)] | None = None


class ToolNetwork(Model):
    """Where a tool call may connect. `explicit` allows exactly the listed CIDR (and port) rules."""

    model_config = validations(
        cel("self.egress == 'explicit' ? (has(self.allow) && size(self.allow) > 0) : (!has(self.allow) || size(self.allow) == 0)",
            "allow lists the rules of egress: explicit, and only then", field_path=".allow"),
    )
    egress: Literal["none", "cluster", "internet", "explicit"] = "none"
    allow: Annotated[list[AllowRule], Field(max_length=MAX_ALLOW_RULES)] = defaulted(list)


class ToolIntent(Model):
    """What one tool call may use. Unset fields fall back to the sandbox's default intent."""

    memory: Quantity | None = None
    cpu: Quantity | None = None
    pids: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    network: ToolNetwork | None = None
    timeout: Duration | None = None


class Tools(Model):
    default: ToolIntent = defaulted(lambda: ToolIntent(memory="512Mi", cpu="1", pids=256, timeout="5m", network=ToolNetwork()))
    profiles: Annotated[dict[Name, ToolIntent], Field(max_length=MAX_PROFILES)] = defaulted(dict)


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


class AgentSandboxSpec(Model):
    model_config = validations(
        cel(_profile_fits("memory"), message_expression=_profiles_over("memory"), field_path=".tools.profiles"),
        cel(_profile_fits("cpu"), message_expression=_profiles_over("cpu"), field_path=".tools.profiles"),
        cel(_default_fits("memory"), "spec.tools.default.memory may not exceed spec.template.resources.limits.memory",
            field_path=".tools.default.memory"),
        cel(_default_fits("cpu"), "spec.tools.default.cpu may not exceed spec.template.resources.limits.cpu",
            field_path=".tools.default.cpu"),
    )
    template: SandboxTemplate
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


class ToolCallTotals(Model):
    calls: int = 0
    failed: int = 0
    oom_killed: int = 0
    blocked_connections: int = 0


SandboxPhase = Literal["Pending", "Running", "Suspended", "Failed", "Expired"]


class AgentSandboxStatus(Model):
    # Written by the operator only; read leniently, so that a newer operator's fields do not break an older one.
    model_config = ConfigDict(**Model.model_config | {"extra": "ignore"})
    phase: SandboxPhase | None = None
    conditions: list[Condition] = defaulted(list)
    pod_name: str | None = None
    node_name: str | None = None
    service_fqdn: str | None = None
    last_activity_time: datetime | None = None
    tool_calls: ToolCallTotals = defaulted(ToolCallTotals)
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
    initial_scale: Annotated[int, Field(ge=0, le=10_000)] = 1
    scale_to_zero: bool = True
    slo: Slo | None = None
    ppo: PpoSettings = defaulted(PpoSettings)


class SpotCapacity(Model):
    enabled: bool = False
    on_demand_base: Annotated[int, Field(ge=0, le=10_000)] = 1
    max_spot_fraction: Annotated[float, Field(ge=0, le=1)] = 0.8


class Capacity(Model):
    spot: SpotCapacity = defaulted(SpotCapacity)


class ServedModelSpec(Model):
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
    # The metric values the decision saw, under Knative's names (request rate, p95 latency in ms, ...).
    inputs: Annotated[dict[Annotated[str, Field(max_length=MAX_NAME)], float], Field(max_length=16)] = defaulted(dict)


class ServedModelStatus(Model):
    model_config = AgentSandboxStatus.model_config
    url: str | None = None
    ready: bool = False
    conditions: list[Condition] = defaulted(list)
    concurrency_target: int | None = None
    last_decision: AutoscalingDecision | None = None
    observed_generation: int | None = None
