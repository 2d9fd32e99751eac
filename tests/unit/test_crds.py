"""The CRDs are generated from the models, and the checked-in files never drift from them."""

import re

import pytest

from agentkube.operator import api, crds


def test_checked_in_crds_match_the_models():
    assert crds.stale() == [], "run `agentkube crds generate` and commit the result"


def _spec_schema(kind: crds.Kind) -> dict:
    return crds.custom_resource_definition(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _walk(node: dict):
    yield node
    for child in list(node.get("properties", {}).values()) + [node.get("items"), node.get("additionalProperties")]:
        if isinstance(child, dict):
            yield from _walk(child)


@pytest.mark.parametrize("kind", crds.KINDS, ids=lambda k: k.kind)
def test_schemas_are_structural(kind):
    for node in _walk(_spec_schema(kind)):
        assert "$ref" not in node and "title" not in node and "patternProperties" not in node
        assert node.get("additionalProperties") is not False
        assert "type" in node or node.get("x-kubernetes-int-or-string"), node
        for option in node.get("anyOf", []):
            assert option.get("type") in ("integer", "string")  # only the int-or-string form


def test_crd_names_shows_and_categories():
    crd = crds.custom_resource_definition(crds.AGENT_SANDBOX)
    names = crd["spec"]["names"]
    assert names["categories"] == [api.CATEGORY] and names["shortNames"] == ["asb"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Phase", "Age", "Calls"}


def test_defaults_are_filled_in_by_the_api_server():
    spec = _spec_schema(crds.AGENT_SANDBOX)
    assert spec["properties"]["lifecycle"]["properties"]["shutdownPolicy"]["default"] == "Retain"
    assert spec["properties"]["tools"]["properties"]["default"]["default"]["memory"] == "512Mi"
    autoscaling = _spec_schema(crds.SERVED_MODEL)["properties"]["autoscaling"]["properties"]
    assert autoscaling["target"]["default"] == 100 and autoscaling["targetUtilization"]["default"] == 70


def test_structural_inlines_references_and_drops_null_options():
    schema = {
        "$defs": {"Inner": {"title": "Inner", "type": "object", "properties": {"x": {"type": "integer", "exclusiveMinimum": 0}}}},
        "type": "object",
        "properties": {
            "inner": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}], "default": None},
            "kind": {"const": "only"},
            "labels": {"type": "object", "patternProperties": {"^[a-z]+$": {"type": "string"}}, "propertyNames": {"maxLength": 5}},
        },
    }
    result = crds.structural(schema)
    inner = result["properties"]["inner"]
    assert inner["type"] == "object" and "default" not in inner
    assert inner["properties"]["x"] == {"type": "integer", "minimum": 0, "exclusiveMinimum": True}
    assert result["properties"]["kind"] == {"enum": ["only"]}
    labels = result["properties"]["labels"]
    assert labels["additionalProperties"] == {"type": "string"}
    assert labels["x-kubernetes-validations"][0]["rule"] == "self.all(k, k.matches('^[a-z]+$') && size(k) <= 5)"


def test_a_sandbox_name_must_be_a_dns_label():
    """Its pod's hostname is its name: the API server refuses what a hostname cannot be (the schema's own
    rule, no CEL); pools and served models keep the API server's name rule."""
    crd = crds.custom_resource_definition(crds.AGENT_SANDBOX)
    name = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]["properties"]["name"]
    assert name["maxLength"] == 63
    pattern = re.compile(name["pattern"])
    assert pattern.match("box") and pattern.match("b" * 63) and pattern.match("0-a")
    assert not any(pattern.match(bad) for bad in ("a.b", "Box", "-a", "a-", "b" * 64))
    pool = crds.custom_resource_definition(crds.AGENT_SANDBOX_POOL)
    assert pool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] == {"type": "object"}
