"""CustomResourceDefinitions generated from the pydantic models in `agentkube.operator.api`.

Pydantic writes JSON Schema (references, `anyOf` with null for optional fields, tuple-style numeric
bounds); Kubernetes wants a structural OpenAPI v3 schema (everything inlined, one type per node). The
conversion is a pure function, and `agentkube crds generate` writes its result to `crds/`.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agentkube.contract import DNS_LABEL, POOL_PLURAL
from agentkube.operator import api

REPOSITORY = Path(__file__).resolve().parents[1]
CRD_DIRECTORY = REPOSITORY / "crds"
# Helm installs a chart's crds/ before its templates and never deletes them on uninstall (users' objects
# survive); the chart carries the same generated files.
CHART_CRD_DIRECTORY = REPOSITORY / "charts" / "agentkube" / "crds"
OUTPUT_DIRECTORIES = (CRD_DIRECTORY, CHART_CRD_DIRECTORY)
DROPPED_KEYS = {"title"}


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def structural(schema: dict[str, Any], definitions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural schema node."""
    definitions = definitions if definitions is not None else schema.get("$defs", {})
    node = {k: v for k, v in schema.items() if k not in DROPPED_KEYS and k != "$defs"}
    if "$ref" in node:
        target = copy.deepcopy(definitions[node.pop("$ref").rsplit("/", 1)[-1]])
        node = {**target, **node}
        node = {k: v for k, v in node.items() if k not in DROPPED_KEYS}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:  # Optional[X]: absence is how Kubernetes says "not set"
            del node["anyOf"]
            inner = structural(options[0], definitions)
            validations = inner.pop("x-kubernetes-validations", []) + node.pop("x-kubernetes-validations", [])
            node = {**inner, **node}
            if validations:
                node["x-kubernetes-validations"] = validations
        else:
            node["anyOf"] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if "default" in node:
        if node["default"] is None:
            del node["default"]
        else:
            node["default"] = _strip_none(node["default"])
    if "properties" in node:
        node["properties"] = {k: structural(v, definitions) for k, v in node["properties"].items()}
    # Constrained map keys are not in Kubernetes' schema dialect: the same rule, as CEL over the keys.
    key_rules = []
    if "patternProperties" in node:
        ((pattern, values),) = node.pop("patternProperties").items()
        node["additionalProperties"] = values
        key_rules.append(f"k.matches('{pattern}')")
    if "propertyNames" in node:
        names = node.pop("propertyNames")
        key_rules += [f"size(k) <= {names['maxLength']}"] if "maxLength" in names else []
        key_rules += [f"size(k) >= {names['minLength']}"] if "minLength" in names else []
    if key_rules:
        node.setdefault("x-kubernetes-validations", []).append(
            {"rule": f"self.all(k, {' && '.join(key_rules)})", "message": "keys must be DNS labels: a-z, 0-9 and '-', at most 63"}
        )
    if node.get("additionalProperties") is False:
        # Not allowed beside `properties`; the API server rejects unknown fields itself (kubectl's strict
        # field validation) and prunes them from stored objects.
        del node["additionalProperties"]
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], definitions)
    if "items" in node:
        node["items"] = structural(node["items"], definitions)
    return node


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # The scale subresource (`kubectl scale`, autoscalers): where the wanted and the actual count and the
    # pods' selector are.
    scale: dict[str, str] | None = None
    # What names the API server admits beyond its own rule (a DNS subdomain), as an OpenAPI string schema.
    name_schema: dict[str, Any] | None = None

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{api.GROUP}"


AGENT_SANDBOX = Kind(
    kind="AgentSandbox",
    plural="agentsandboxes",
    short_names=("asb",),
    spec=api.AgentSandboxSpec,
    status=api.AgentSandboxStatus,
    printer_columns=(
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Pod", "type": "string", "jsonPath": ".status.podName"},
        {"name": "Calls", "type": "integer", "jsonPath": ".status.toolCalls.calls"},
        {"name": "OOM", "type": "integer", "jsonPath": ".status.toolCalls.oomKilled"},
        {"name": "Node", "type": "string", "jsonPath": ".status.nodeName", "priority": 1},
        {"name": "Last-Activity", "type": "date", "jsonPath": ".status.lastActivityTime", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ),
    # A sandbox's pod is named like it, and that name is the pod's hostname and so its DNS name
    # (sandbox.sandbox_fqdn): a DNS label. A longer name or one with dots is refused at `kubectl apply` (a
    # schema rule, no CEL) rather than leaving a sandbox whose pod can never be made.
    name_schema={"type": "string", "maxLength": 63, "pattern": DNS_LABEL.pattern},
)
SERVED_MODEL = Kind(
    kind="ServedModel",
    plural="servedmodels",
    short_names=("smodel",),
    spec=api.ServedModelSpec,
    status=api.ServedModelStatus,
    printer_columns=(
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
        {"name": "Policy", "type": "string", "jsonPath": ".spec.autoscaling.policy"},
        {"name": "Target", "type": "integer", "jsonPath": ".status.concurrencyTarget"},
        {"name": "MinScale", "type": "integer", "jsonPath": ".status.minScale", "priority": 1},
        {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ),
)
AGENT_SANDBOX_POOL = Kind(
    kind="AgentSandboxPool",
    plural=POOL_PLURAL,  # the gateway's claims are authorized on it
    short_names=("asbpool",),
    spec=api.AgentSandboxPoolSpec,
    status=api.AgentSandboxPoolStatus,
    printer_columns=(
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Warm", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Template", "type": "string", "jsonPath": ".status.templateHash", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ),
    scale={"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
           "labelSelectorPath": ".status.selector"},
)
KINDS = (AGENT_SANDBOX, SERVED_MODEL, AGENT_SANDBOX_POOL)

# Kopf keeps its peering state (which replica is active) in a ClusterKopfPeering object; its schema is
# Kopf's business, so it is preserved as written.
KOPF_PEERING = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterkopfpeerings.kopf.dev", "labels": {"app.kubernetes.io/part-of": "agentkube"}},
    "spec": {
        "group": "kopf.dev",
        "scope": "Cluster",
        "names": {"kind": "ClusterKopfPeering", "plural": "clusterkopfpeerings", "singular": "clusterkopfpeering"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                },
            }
        ],
    },
}


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    return structural(model.model_json_schema(by_alias=True, mode="validation"))


def custom_resource_definition(kind: Kind) -> dict[str, Any]:
    status = _model_schema(kind.status)
    # The status is written by the operator only; an older operator must not have newer fields pruned.
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/part-of": "agentkube"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": [api.CATEGORY],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, **({"scale": dict(kind.scale)} if kind.scale else {})},
                    "additionalPrinterColumns": list(kind.printer_columns),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object", **({"properties": {"name": dict(kind.name_schema)}}
                                                                   if kind.name_schema else {})},
                                "spec": _model_schema(kind.spec),
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated from agentkube.operator.api by `agentkube crds generate`. Do not edit.\n"


def rendered() -> dict[str, str]:
    """Every CRD the project ships, by file name."""
    documents = [custom_resource_definition(kind) for kind in KINDS] + [KOPF_PEERING]
    return {f"{d['metadata']['name']}.yaml": HEADER + yaml.safe_dump(d, sort_keys=False, width=120) for d in documents}


def write_all(directories: tuple[Path, ...] = OUTPUT_DIRECTORIES) -> list[Path]:
    paths = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in rendered().items():
            (directory / name).write_text(text)
            paths.append(directory / name)
    return paths


def stale(directories: tuple[Path, ...] = OUTPUT_DIRECTORIES) -> list[Path]:
    """The checked-in CRDs that differ from what the models generate."""
    texts = rendered()
    return [d / n for d in directories for n, text in texts.items() if not (d / n).is_file() or (d / n).read_text() != text]
