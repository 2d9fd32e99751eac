"""The dashboards are built from one Python source; the checked-in JSON never drifts from it, and every
panel queries only metrics some component exports."""

import json
import re

import pytest

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
    from agentkube.rl.observation import KNATIVE_METRICS

    exported = {m.name for m in Metrics().registry.collect()} | {m.name for m in REGISTRY.collect()}
    knative = {"revision_app_request_count", "revision_app_request_latencies"} | set(KNATIVE_METRICS)
    for _, panel, query in dashboards.all_queries():
        for name in _metric_names(query.expr):
            family = re.sub(r"_(bucket|total|count|sum)$", "", name)
            assert name == "up" or name in knative or family in knative or family in exported or name in exported, (panel.title, name)


def test_legend_fills_labels():
    assert dashboards.legend("{{namespace}}/{{sandbox}}", {"namespace": "a", "sandbox": "b"}) == "a/b"
    assert dashboards.legend("", {"x": "1"}) == "x=1"
