"""The control plane is a real Kubernetes API: namespaces, CRDs and custom objects, through the Python
client and through kubectl."""

import json
import time

import kubernetes
from kubernetes.client import ApiextensionsV1Api, CustomObjectsApi

GROUP, VERSION, PLURAL = "examples.agentkube.dev", "v1", "widgets"


def _widget_crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                    "required": ["size"],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def _wait_established(extensions: ApiextensionsV1Api, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.2)
    raise AssertionError(f"CRD {name} not established")


def test_namespace_crd_and_object_round_trip(api_client, kubectl, namespace):
    extensions = ApiextensionsV1Api(api_client)
    extensions.create_custom_resource_definition(_widget_crd())
    try:
        _wait_established(extensions, f"{PLURAL}.{GROUP}")
        objects = CustomObjectsApi(api_client)
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        read = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1")
        assert read["spec"] == {"size": 3}
        assert read["metadata"]["namespace"] == namespace

        via_kubectl = json.loads(kubectl("get", f"{PLURAL}.{GROUP}", "w1", "-n", namespace, "-o", "json").stdout)
        assert via_kubectl["spec"] == {"size": 3}
        assert via_kubectl["metadata"]["uid"] == read["metadata"]["uid"]

        # The schema is enforced by the real apiserver, not by the client.
        invalid = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
        try:
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, invalid)
        except kubernetes.client.ApiException as error:
            assert error.status == 422
            assert "spec.size" in error.body
        else:
            raise AssertionError("an object violating the CRD schema was accepted")
    finally:
        extensions.delete_custom_resource_definition(f"{PLURAL}.{GROUP}")


def test_kubectl_and_server_versions_match_the_pin(kubectl):
    from agentkube.devenv.versions import KUBERNETES_VERSION

    versions = json.loads(kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert versions["clientVersion"]["minor"] == versions["serverVersion"]["minor"]
