"""Knative's install as the local environment applies it: the pure parts (which files, in which order,
what is changed), checked without a cluster. Knative's own files are read from the Go module cache when
it holds the pinned module (after `agentkube dev up --with-knative` or `make tools`); those checks skip
otherwise."""

import os
import subprocess

import pytest
import yaml

from agentkube.devenv import knative
from agentkube.devenv.versions import KNATIVE_COMMANDS, KNATIVE_SERVING


def test_every_ko_placeholder_becomes_a_dev_local_image_and_metrics_are_prometheus():
    documents = [
        {"kind": "Deployment", "metadata": {"name": "controller"},
         "spec": {"template": {"spec": {"containers": [{"image": "ko://knative.dev/serving/cmd/controller"}]}}}},
        {"kind": "ConfigMap", "metadata": {"name": "config-deployment"},
         "data": {"queue-sidecar-image": "ko://knative.dev/serving/cmd/queue"}},
        {"kind": "ConfigMap", "metadata": {"name": "config-observability"}, "data": {"_example": "..."}},
        None,
    ]
    adapted = knative.adapt(documents, knative.images_by_ko_path())
    assert adapted[0]["spec"]["template"]["spec"]["containers"][0]["image"] == f"dev.local/knative/controller:{KNATIVE_SERVING.version}"
    assert adapted[1]["data"]["queue-sidecar-image"] == f"dev.local/knative/queue:{KNATIVE_SERVING.version}"
    assert adapted[2]["data"]["metrics-protocol"] == "prometheus"
    assert adapted[2]["data"]["request-metrics-protocol"] == "prometheus"
    assert documents[2]["data"] == {"_example": "..."}  # the input is not changed


def test_an_unknown_ko_placeholder_is_refused():
    with pytest.raises(knative.KnativeError, match="ko://knative.dev/serving/cmd/other"):
        knative.adapt([{"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"i": "ko://knative.dev/serving/cmd/other"}}],
                      knative.images_by_ko_path())


def test_scrape_targets_are_the_metrics_ports_of_running_pods():
    def pod(name, phase, ip, ports):
        return {"metadata": {"namespace": "ns", "name": name}, "status": {"phase": phase, "podIP": ip},
                "spec": {"containers": [{"name": "c", "ports": [{"name": n, "containerPort": p} for n, p in ports]}]}}

    groups = knative.scrape_target_groups([
        pod("rev-1", "Running", "10.88.0.7", [("http1", 8012), ("http-usermetric", 9091), ("http-autometric", 9090)]),
        pod("controller", "Running", "10.88.0.5", [("metrics", 9090), ("probes", 8080)]),
        pod("starting", "Pending", None, [("metrics", 9090)]),
    ])
    assert [group["targets"] for group in groups] == [["10.88.0.5:9090"], ["10.88.0.7:9091"]]
    assert groups[1]["labels"] == {"job": "knative", "namespace": "ns", "pod": "rev-1", "container": "c"}


def _in_module_cache(pin: str) -> bool:
    result = subprocess.run(["go", "mod", "download", "-json", pin], capture_output=True, text=True,
                            env={**os.environ, "GOPROXY": "off"})
    return result.returncode == 0


@pytest.fixture(scope="module")
def module_documents() -> list[dict]:
    if not _in_module_cache(KNATIVE_SERVING.pin):
        pytest.skip(f"{KNATIVE_SERVING.pin} is not in the Go module cache")
    return knative.load_documents()


def test_the_install_has_every_crd_the_controller_watches(module_documents):
    crds = {doc["metadata"]["name"] for doc in module_documents if doc["kind"] == "CustomResourceDefinition"}
    # The ones serving's repository links in from networking and caching are there too.
    assert {"services.serving.knative.dev", "revisions.serving.knative.dev", "podautoscalers.autoscaling.internal.knative.dev",
            "ingresses.networking.internal.knative.dev", "serverlessservices.networking.internal.knative.dev",
            "certificates.networking.internal.knative.dev", "images.caching.internal.knative.dev"} <= crds


def test_the_install_runs_only_local_images(module_documents):
    text = yaml.safe_dump_all(module_documents)
    assert "ko://" not in text
    for command in KNATIVE_COMMANDS:
        if command != "queue":
            assert knative.image_reference(command) in text
    network = next(doc for doc in module_documents if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "config-network")
    assert network["metadata"]["namespace"] == knative.SYSTEM_NAMESPACE


def test_webhook_configurations_come_after_the_configmaps_they_validate(module_documents):
    kinds = [doc["kind"] for doc in module_documents]
    last_configmap = max(i for i, kind in enumerate(kinds) if kind == "ConfigMap")
    first_webhook = min(i for i, kind in enumerate(kinds) if kind.endswith("WebhookConfiguration"))
    assert last_configmap < first_webhook


def test_knative_uses_traefik_as_its_ingress_and_traefik_reports_its_service():
    adapted = knative.adapt([{"kind": "ConfigMap", "metadata": {"name": "config-network"}, "data": {}}],
                            knative.images_by_ko_path())
    assert adapted[0]["data"]["ingress-class"] == knative.TRAEFIK_INGRESS_CLASS
    config = knative.traefik_config("10.88.0.1:4000", "https://10.88.0.1:6443", "token", "/ca.crt")
    provider = config["providers"]["knative"]
    assert config["experimental"]["knative"] is True
    assert provider["publicService"] == provider["privateService"] == {"name": "traefik", "namespace": "knative-serving"}
    objects = knative.traefik_objects("10.88.0.1", "node", 4000, "agentkube-devenv")
    endpoints = next(obj for obj in objects if obj["kind"] == "EndpointSlice")
    assert endpoints["endpoints"][0]["addresses"] == ["10.88.0.1"] and endpoints["ports"][0]["port"] == 4000
