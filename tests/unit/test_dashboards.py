"""The dashboards are built from one Python source; the checked-in JSON never drifts from it, and every
panel queries only metrics some component exports."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from agentkube import dashboards


def test_checked_in_dashboards_match_the_source():
    assert dashboards.stale() == [], "run `agentkube dashboards generate` and commit the result"


@pytest.mark.parametrize("dashboard", dashboards.DASHBOARDS, ids=lambda d: d.uid)
def test_each_dashboard_is_a_grafana_model_with_every_panel_and_query(dashboard):
    model = dashboards.build(dashboard)
    assert model["uid"] == dashboard.uid and model["title"] == dashboard.title
    assert [p["title"] for p in model["panels"]] == [p.title for p in dashboard.panels]
    for panel, source in zip(model["panels"], dashboard.panels, strict=True):
        assert [t["expr"] for t in panel["targets"]] == [q.expr for q in source.queries]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["gridPos"]["w"] == dashboards.PANEL_WIDTH
    assert [v["name"] for v in model["templating"]["list"]] == [dashboards.DATASOURCE_VARIABLE]
    json.dumps(model)


def test_the_four_dashboards_and_unique_titles():
    assert [d.uid for d in dashboards.DASHBOARDS] == [
        "agentkube-sandboxes", "agentkube-node-agent", "agentkube-served-models", "agentkube-operator"]
    for dashboard in dashboards.DASHBOARDS:
        titles = [p.title for p in dashboard.panels]
        assert len(titles) == len(set(titles))


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[])", expr))
    return {w for w in words if w not in {"by", "sum", "rate", "increase", "max", "min"}}


def test_panels_use_only_exported_metric_families():
    from prometheus_client import REGISTRY

    from agentkube.ebpf.metrics import Metrics
    from agentkube.operator import metrics as operator_metrics  # noqa: F401  (registers the operator's metrics)
    from agentkube.operator.autoscaling import OPENTELEMETRY_METRICS
    from agentkube.rl.observation import KNATIVE_METRICS

    exported = {m.name for m in Metrics().registry.collect()} | {m.name for m in REGISTRY.collect()}
    knative = {"revision_app_request_count", "revision_app_request_latencies"} | set(KNATIVE_METRICS)
    knative |= {name for value, age in OPENTELEMETRY_METRICS.values() for name in _metric_names(value + age)}  # the newer names
    for _, panel, query in dashboards.all_queries():
        for name in _metric_names(query.expr):
            family = re.sub(r"_(bucket|total|count|sum)$", "", name)
            assert name == "up" or name in knative or family in knative or family in exported or name in exported, (panel.title, name)


def test_legend_fills_labels():
    assert dashboards.legend("{{namespace}}/{{sandbox}}", {"namespace": "a", "sandbox": "b"}) == "a/b"
    assert dashboards.legend("", {"x": "1"}) == "x=1"



def test_knative_panels_show_either_generation_of_its_metrics_under_one_set_of_labels(tmp_path):
    """Knative 1.19 renamed its metrics (OpenTelemetry, the queue-proxy's revision labels only on `target_info`).
    Evaluated by Prometheus' own engine (`promtool test rules`): a revision exporting the older names and one
    exporting the newer both show up in each Knative panel, under the same labels."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make deps` installs Debian's prometheus package"
    old = {"namespace_name": "ns", "service_name": "old"}
    new_target = 'job="queue-proxy", instance="10.0.0.9:9091"'
    series = [
        ('autoscaler_actual_pods{namespace_name="ns", service_name="old"}', "2x10"),
        ('autoscaler_not_ready_pods{namespace_name="ns", service_name="old"}', "1x10"),
        ('revision_app_request_count{namespace_name="ns", service_name="old"}', "0+60x10"),
        *((f'revision_app_request_latencies_bucket{{namespace_name="ns", service_name="old", le="{le}"}}', f"0+{n}x10")
          for le, n in (("100", 0), ("1000", 60), ("+Inf", 60))),
        ('kn_revision_pods_count{k8s_namespace_name="ns", kn_service_name="new", job="autoscaler"}', "3x10"),
        ('kn_revision_pods_not_ready_count{k8s_namespace_name="ns", kn_service_name="new", job="autoscaler"}', "0x10"),
        (f'target_info{{{new_target}, k8s_namespace_name="ns", kn_service_name="new"}}', "1x10"),
        (f"kn_serving_invocation_duration_seconds_count{{{new_target}}}", "0+120x10"),
        *((f'kn_serving_invocation_duration_seconds_bucket{{{new_target}, le="{le}"}}', f"0+{n}x10")
          for le, n in (("0.1", 0), ("1", 120), ("+Inf", 120))),
    ]
    new = {"namespace_name": "ns", "service_name": "new", "k8s_namespace_name": "ns", "kn_service_name": "new"}
    panels = {panel.title: panel for panel in dashboards.SERVED_MODELS.panels}
    expected = {"Pods": ((old, 2), (new, 3)), "Requests/s": ((old, 1), (new, 2)), "p95 request latency": ((old, 955), (new, 955))}
    tests = [{"expr": panels[title].queries[0].expr, "eval_time": "5m",
              "exp_samples": [{"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "value": value}
                              for labels, value in samples]}
             for title, samples in expected.items()]
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"tests": [{
        "interval": "1m", "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": tests}]}, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "panels.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
