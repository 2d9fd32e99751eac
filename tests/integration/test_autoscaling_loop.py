"""The `policy: ppo` autoscaling loop closed over real parts: the operator (as its service account) reads
Knative's metrics from a real Prometheus, which scrapes the simulator playing the Knative revision as a
process; the simulator reads the target the operator patched from the real API server."""

import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import ApiException, CustomObjectsApi

from agentkube.devenv import process
from agentkube.devenv.versions import bin_dir
from agentkube.operator import api, autoscaling, prometheus, servedmodel
from agentkube.rl.knative import MIN_SCALE_ANNOTATION
from agentkube.rl.observation import POLICY_METRICS
from harness import CHART, Operator, install_knative_crds, install_operator

MODEL = "llm"
SCRAPE_JOB = "knative-revision"
# The simulator exits by itself after this long, whatever happens to the test.
SIMULATOR_LIFETIME_S = 240


@pytest.fixture(scope="module")
def operator(devenv, kubectl, tmp_path_factory) -> Iterator[Path]:
    """`agentkube operator run --prometheus-url ...` as its service account, standalone; yields its log."""
    kubeconfig = install_operator(devenv, kubectl)
    install_knative_crds(kubectl)
    running = Operator(kubeconfig, tmp_path_factory.mktemp("operator"), "--peering=",
                       f"--prometheus-url={devenv.prometheus_url}")
    running.start()
    yield running.log_path
    running.stop()


class Revision:
    """`agentkube rl serve-revision` in a child process: the Knative revision, with its metrics endpoint."""

    def __init__(self, devenv, namespace: str, log: Path):
        self.log = log
        argv = [sys.executable, "-m", "agentkube", "rl", "serve-revision", "--namespace", namespace, "--service", MODEL,
                "--trace", "conversation", "--port", "0", "--duration", str(SIMULATOR_LIFETIME_S)]
        self.record = process.start("revision", ["env", f"KUBECONFIG={devenv.kubeconfig}", *argv], log, tie_to_parent=True)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def address(self) -> str | None:
        found = re.search(r"^listening (127\.0\.0\.1:\d+)$", self.output(), re.MULTILINE)
        return found.group(1) if found else None

    def targets_seen(self) -> list[str]:
        return re.findall(r"^target (\S+)$", self.output(), re.MULTILINE)

    def stop(self) -> None:
        process.stop([self.record])


def _model(api_client, namespace: str) -> dict:
    return CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", MODEL)


def _pod_autoscaler(api_client, namespace: str) -> dict | None:
    """The revision's PodAutoscaler. No Knative controller runs in this tier (only its CRDs are installed), so
    the first read creates it as Knative's revision reconciler does: named after the revision, labelled
    with the Service, its annotations copied from the Service's template once, at creation."""
    custom = CustomObjectsApi(api_client)
    pa = (servedmodel.PA_GROUP, servedmodel.PA_VERSION, namespace, servedmodel.PA_PLURAL)
    try:
        return custom.get_namespaced_custom_object(*pa, f"{MODEL}-00001")
    except ApiException as error:
        if error.status != 404:
            raise
    try:
        service = custom.get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", MODEL)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return custom.create_namespaced_custom_object(*pa, {
        "apiVersion": f"{servedmodel.PA_GROUP}/{servedmodel.PA_VERSION}", "kind": "PodAutoscaler",
        "metadata": {"name": f"{MODEL}-00001", "labels": {servedmodel.SERVICE_LABEL: MODEL},
                     "annotations": service["spec"]["template"]["metadata"]["annotations"]},
        "spec": {"protocolType": "http1",  # required by Knative's schema; the revision reconciler sets it so
                 "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{MODEL}-00001-deployment"}}})


def _annotation(api_client, namespace: str, key: str = servedmodel.TARGET_ANNOTATION) -> str | None:
    """The target (or with `key`, another setting) in force: on the revision's PodAutoscaler, where the KPA reads it."""
    pod_autoscaler = _pod_autoscaler(api_client, namespace)
    return pod_autoscaler["metadata"].get("annotations", {}).get(key) if pod_autoscaler else None


def _template_target(api_client, namespace: str) -> str | None:
    service = CustomObjectsApi(api_client).get_namespaced_custom_object("serving.knative.dev", "v1", namespace, "services", MODEL)
    return service["spec"]["template"]["metadata"]["annotations"].get(servedmodel.TARGET_ANNOTATION)


def _condition(model: dict) -> dict | None:
    conditions = (model.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == autoscaling.CONDITION), None)


def test_the_operator_closes_the_loop_and_falls_back_when_metrics_stop(devenv, api_client, operator, namespace, eventually,
                                                                         tmp_path):
    body = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": MODEL},
            "spec": {"model": {"name": "llama"}, "image": "vllm", "autoscaling": {
                "policy": "ppo", "target": 100, "ppo": {"decisionInterval": "5s", "maxChangeFraction": 0.5}}}}
    CustomObjectsApi(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", body)
    # With no metrics yet, the loop runs Knative's default target and says why.
    missing = eventually(lambda: (c := _condition(_model(api_client, namespace))) and c, timeout=90,
                         message="no Autoscaling condition")
    eventually(lambda: _annotation(api_client, namespace) is not None, timeout=60, message="no Knative Service")
    assert missing["status"] == "False" and missing["reason"] in (autoscaling.METRICS_MISSING, autoscaling.METRICS_STALE)

    revision = Revision(devenv, namespace, tmp_path / "revision.log")
    try:
        address = eventually(revision.address, timeout=60, message="the simulator did not start serving")
        devenv.add_scrape_target(SCRAPE_JOB, [address], labels={"suite": "autoscaling"})

        # Decided by the policy, recorded with its reason and inputs, applied to the Knative Service, and
        # seen by the revision.
        def decided_applied_and_seen() -> dict | None:
            model = _model(api_client, namespace)
            decision = (model.get("status") or {}).get("lastDecision") or {}
            if decision.get("reason") != autoscaling.DECIDED:
                return None
            value = str(decision["value"])
            if _annotation(api_client, namespace) == value and f"{float(value):g}" in revision.targets_seen():
                return decision
            return None

        first = eventually(decided_applied_and_seen, timeout=120, interval=0.5,
                           message="no policy decision was applied and seen by the revision")
        assert first["message"] and first["previousValue"] >= 1
        # Every policy input came from Prometheus (the guard's p95 too, once the window has requests).
        assert set(POLICY_METRICS) <= set(first["inputs"]) <= set(POLICY_METRICS) | {autoscaling.GUARD_P95}
        assert first["inputs"]["autoscaler_actual_pods"] >= 1
        model = _model(api_client, namespace)
        assert _condition(model)["status"] == "True" and _condition(model)["reason"] == autoscaling.DECIDED
        assert model["status"]["concurrencyTarget"] == first["value"]
        # The warm-pod floor the decision applied is the PodAutoscaler's min-scale (the spec's 0 when the
        # policy asks for none) and what the revision runs under.
        # (Status is written before the PodAutoscaler, and the loop keeps deciding: read until they agree.)
        floor = eventually(lambda: (f := _annotation(api_client, namespace, MIN_SCALE_ANNOTATION)) is not None
                           and f == str(_model(api_client, namespace)["status"]["minScale"]) and f,
                           timeout=30, interval=0.5, message="the floor in status is not on the PodAutoscaler")
        assert first["minScale"] >= 0
        if int(floor) > 0:
            eventually(lambda: re.search(r"^min-scale \d+$", revision.output(), re.MULTILINE), timeout=30,
                       message="the revision never ran under a floor")
        assert not model["metadata"].get("finalizers")  # the loop lives on the operator's timers, not on the object
        # The loop keeps deciding: a later decision, with a later time.
        eventually(lambda: (d := _model(api_client, namespace)["status"]["lastDecision"])["time"] > first["time"]
                   and d["reason"] == autoscaling.DECIDED, timeout=60, message="only one decision was made")
        # Decisions never touch the template (a change there would stamp a new Revision).
        assert _template_target(api_client, namespace) == "100"
        # The reconcile's own status writes keep the loop's condition.
        assert {"KnativeAvailable", "Ready", autoscaling.CONDITION} <= {c["type"] for c in model["status"]["conditions"]}
    finally:
        revision.stop()
        devenv.remove_scrape_target(SCRAPE_JOB)

    # The metrics stop: back to Knative's default target, with a condition that says why.
    def fell_back() -> dict | None:
        model = _model(api_client, namespace)
        condition = _condition(model)
        decision = model["status"]["lastDecision"]
        if condition["status"] == "False" and decision["value"] == autoscaling.KNATIVE_DEFAULT_TARGET \
                and _annotation(api_client, namespace) == str(autoscaling.KNATIVE_DEFAULT_TARGET):
            return condition
        return None

    condition = eventually(fell_back, timeout=90, interval=0.5, message="no fallback after the metrics stopped")
    assert condition["reason"] in (autoscaling.METRICS_MISSING, autoscaling.METRICS_STALE)
    assert "default target 100" in condition["message"]


def test_the_slo_guard_runs_knatives_default_while_a_lean_target_costs_the_slo(devenv, api_client, operator, namespace,
                                                                              eventually, tmp_path):
    revision = Revision(devenv, namespace, tmp_path / "revision.log")
    try:
        address = eventually(revision.address, timeout=60, message="the simulator did not start serving")
        devenv.add_scrape_target(SCRAPE_JOB, [address], labels={"suite": "autoscaling-guard"})
        # Wait until Prometheus answers every input (the hour's per-minute spread needs a whole minute of
        # samples): otherwise the first turns fall back for missing metrics and set the default first.
        source = prometheus.MetricsSource(devenv.prometheus_url)

        def answered() -> bool:
            samples = source.observe(namespace, MODEL).samples
            return set(POLICY_METRICS) <= set(samples) and math.isfinite(samples[autoscaling.GUARD_P95].value) \
                if autoscaling.GUARD_P95 in samples else False

        eventually(answered, timeout=180, interval=2, message="Prometheus does not answer every input")
        # The model starts at a target leaner than Knative's default, under an SLO no LLM meets (1 ms):
        # its first decision with metrics must be the guard's, and the guard must hold.
        body = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": MODEL},
                "spec": {"model": {"name": "llama"}, "image": "vllm", "autoscaling": {
                    "policy": "ppo", "target": 200, "slo": {"p95LatencyMs": 1},
                    "ppo": {"decisionInterval": "5s"}}}}
        CustomObjectsApi(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", body)

        def guarded() -> dict | None:
            model = _model(api_client, namespace)
            decision = (model.get("status") or {}).get("lastDecision") or {}
            if decision.get("reason") == autoscaling.SLO_GUARD and _annotation(api_client, namespace) == "100":
                return model
            return None

        model = eventually(guarded, timeout=180, interval=0.5, message="the SLO guard did not engage")
        condition = _condition(model)
        assert (condition["status"], condition["reason"]) == ("False", autoscaling.SLO_GUARD)
        # The engaging turn says "above the SLO's", a holding one "against the SLO's": which one is seen
        # first depends on when the stand-in PodAutoscaler (made by the test, as Knative would) appeared.
        assert "the SLO's 1ms" in condition["message"] and "default target 100" in condition["message"]
        assert model["status"]["concurrencyTarget"] == autoscaling.KNATIVE_DEFAULT_TARGET
        engaged_at = model["status"]["lastDecision"]["time"]
        # It holds on the next decisions (latency stays above the SLO): the policy does not get control back.
        later = eventually(lambda: (m := _model(api_client, namespace))["status"]["lastDecision"]["time"] > engaged_at and m,
                           timeout=60, message="no later decision")
        assert later["status"]["lastDecision"]["reason"] == autoscaling.SLO_GUARD
        assert _annotation(api_client, namespace) == "100"
    finally:
        revision.stop()
        devenv.remove_scrape_target(SCRAPE_JOB)


def test_the_loop_stops_when_the_policy_is_no_longer_ppo(devenv, api_client, operator, namespace, eventually):
    body = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": MODEL},
            "spec": {"model": {"name": "llama"}, "image": "vllm", "autoscaling": {
                "policy": "ppo", "target": 40, "ppo": {"decisionInterval": "5s"}}}}
    custom = CustomObjectsApi(api_client)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", body)
    eventually(lambda: _annotation(api_client, namespace) == "100", timeout=90, message="no fallback target applied")
    assert _template_target(api_client, namespace) == "40"  # the revision stays: the target went onto its PodAutoscaler
    custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", MODEL,
                                          {"spec": {"autoscaling": {"policy": "kpa"}}})
    eventually(lambda: _annotation(api_client, namespace) == "40", timeout=60, message="the spec's target was not applied")
    assert _annotation(api_client, namespace, MIN_SCALE_ANNOTATION) == "0"  # the spec's floor too
    model = eventually(lambda: (m := _model(api_client, namespace))["status"].get("concurrencyTarget") == 40 and m,
                       timeout=60, message="status does not show the spec's target")
    assert _condition(model) is None
    decided_at = model["status"]["lastDecision"]["time"]
    # An absence can only be checked by waiting: two decision intervals later, no decision overrode it.
    time.sleep(12)
    assert _annotation(api_client, namespace) == "40"
    assert _model(api_client, namespace)["status"]["lastDecision"]["time"] == decided_at


def test_the_chart_passes_the_prometheus_url_and_refuses_a_malformed_one():
    helm = [str(bin_dir() / "helm"), "template", "agentkube", str(CHART), "--show-only", "templates/deployment.yaml"]
    url = "http://prometheus-operated.monitoring.svc:9090"
    rendered = subprocess.run([*helm, "--set", f"operator.prometheusUrl={url}"], capture_output=True, text=True, check=True)
    assert f"--prometheus-url={url}" in rendered.stdout
    assert "--prometheus-url" not in subprocess.run(helm, capture_output=True, text=True, check=True).stdout
    refused = subprocess.run([*helm, "--set", "operator.prometheusUrl=prometheus:9090"], capture_output=True, text=True)
    assert refused.returncode != 0 and "prometheusUrl" in refused.stderr
