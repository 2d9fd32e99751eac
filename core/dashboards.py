"""agentkube's Grafana dashboards, from one source: every panel's PromQL is written here once, and from it
come the dashboards' JSON (grafana-foundation-sdk; checked in under charts/agentkube/dashboards and shipped
as ConfigMaps), the integration test that runs every query against the real Prometheus, and the PNGs
rendered from the same queries (`agentkube dashboards render`).

Queries use fixed windows rather than Grafana's `$__rate_interval`, so that they run as written against
Prometheus itself. Only metrics the components export are used: the operator's (`operator/metrics.py`),
the node agent's (`ebpf/metrics.py`) and Knative's queue-proxy and autoscaler (played by `rl/live.py`
where there is no Knative).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The `job` label of each component's scrape target: the ServiceMonitors set it through `jobLabel` (the
# chart's Services carry it as a label), tests name their file_sd jobs the same. Alerts use them too.
OPERATOR_JOB = "agentkube-operator"
NODE_AGENT_JOB = "agentkube-node-agent"
DASHBOARD_DIRECTORY = Path(__file__).resolve().parents[1] / "charts" / "agentkube" / "dashboards"
DATASOURCE_VARIABLE = "datasource"
TAGS = ["agentkube"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: Literal["timeseries", "stat"] = "timeseries"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _p95(bucket: str, by: str = "", window: str = "5m") -> str:
    return f"histogram_quantile(0.95, sum by (le{', ' + by if by else ''}) (rate({bucket}[{window}])))"


# Knative's metrics come under two generations of names (operator/autoscaling.py: OpenCensus before 1.19,
# OpenTelemetry since, where the queue-proxy's series carry the revision only on `target_info`). A panel
# asks for both and shows whichever the cluster exports, the newer relabelled to the older's labels, so one
# legend fits both: without this, every Knative panel is empty on a current Knative.
_KNATIVE_BY = "namespace_name, service_name"
_OTEL_BY = "k8s_namespace_name, kn_service_name"
_OTEL_ON_TARGET = f"on (job, instance) group_left ({_OTEL_BY}) target_info"
_OTEL_REQUESTS = "kn_serving_invocation_duration_seconds"


def _knative(opencensus: str, opentelemetry: str) -> str:
    relabelled = (f'label_replace(label_replace({opentelemetry}, "namespace_name", "$1", "k8s_namespace_name", "(.+)"), '
                  f'"service_name", "$1", "kn_service_name", "(.+)")')
    return f"({opencensus}) or {relabelled}"


def _knative_gauge(opencensus: str, opentelemetry: str) -> str:
    return _knative(f"sum by ({_KNATIVE_BY}) ({opencensus})", f"sum by ({_OTEL_BY}) ({opentelemetry})")


def _p50(bucket: str, by: str = "", window: str = "5m") -> str:
    return f"histogram_quantile(0.5, sum by (le{', ' + by if by else ''}) (rate({bucket}[{window}])))"


SANDBOXES = Dashboard(
    uid="agentkube-sandboxes",
    title="agentkube / Sandboxes",
    description="AgentSandboxes and their tool calls: each call runs in its own cgroup, so every number here is per call.",
    panels=(
        Panel("AgentSandboxes by phase", "As the operator last reconciled them.", "short",
              (q("sum by (phase) (agentkube_agentsandboxes)", "{{phase}}"),)),
        Panel("Tool calls/s by outcome", "Finished calls: ok, failed (non-zero exit), oom_killed, timed_out, killed.", "reqps",
              (q("sum by (outcome) (rate(agentkube_tool_calls_total[5m]))", "{{outcome}}"),)),
        Panel("OOM kills (5m)", "Processes the kernel OOM-killed inside tool calls; the sandbox itself lives on.", "short",
              (q("sum by (namespace, sandbox) (increase(agentkube_tool_call_oom_kills_total[5m]))", "{{namespace}}/{{sandbox}}"),)),
        Panel("Blocked connections and refused DNS lookups (5m)",
              "Egress the call's network rules refused in the kernel, and names the node agent's DNS answering refused.",
              "short",
              (q("sum by (namespace, sandbox) (increase(agentkube_tool_call_connections_blocked_total[5m]))",
                 "blocked {{namespace}}/{{sandbox}}"),
               q("sum by (namespace, sandbox) (increase(agentkube_tool_call_dns_refused_total[5m]))",
                 "DNS refused {{namespace}}/{{sandbox}}"))),
        Panel("Tool call latency", "Wall time of a call, p50 and p95.", "s",
              (q(_p50("agentkube_tool_call_duration_seconds_bucket"), "p50"),
               q(_p95("agentkube_tool_call_duration_seconds_bucket"), "p95"))),
        Panel("Tool call peak memory", "Peak memory of a call's cgroup, p50 and p95: memory, not CPU, limits how many agents fit.",
              "bytes",
              (q(_p50("agentkube_tool_call_peak_memory_bytes_bucket"), "p50"),
               q(_p95("agentkube_tool_call_peak_memory_bytes_bucket"), "p95"))),
        Panel("CPU of tool calls", "CPU seconds per second used by calls, and time they were throttled.", "short",
              (q("sum by (namespace, sandbox) (rate(agentkube_tool_call_cpu_seconds_total[5m]))", "used {{namespace}}/{{sandbox}}"),
               q("sum by (namespace, sandbox) (rate(agentkube_tool_call_throttled_seconds_total[5m]))",
                 "throttled {{namespace}}/{{sandbox}}"))),
        Panel("Tool calls running", "Calls running now, per sandbox.", "short",
              (q("sum by (namespace, sandbox) (agentkube_tool_calls_running)", "{{namespace}}/{{sandbox}}"),)),
    ),
)

NODE_AGENT = Dashboard(
    uid="agentkube-node-agent",
    title="agentkube / Node agent",
    description="The DaemonSet that places every tool call in its own cgroup and enforces it with eBPF.",
    panels=(
        Panel("Node agents up", "Scrape health of each node agent.", "short",
              (q(f'up{{job="{NODE_AGENT_JOB}"}}', "{{instance}}"),)),
        Panel("Call placement latency", "Time to place a call in its cgroup (limits, BPF maps, moving the process): "
              "the agent's cost on every call's start.", "s",
              (q(_p50("agentkube_node_agent_call_placement_seconds_bucket", "instance"), "p50 {{instance}}"),
               q(_p95("agentkube_node_agent_call_placement_seconds_bucket", "instance"), "p95 {{instance}}"))),
        Panel("Live call cgroups", "Tool calls running now (one cgroup each), and sandboxes registered, per node.", "short",
              (q("sum by (instance) (agentkube_tool_calls_running)", "calls {{instance}}"),
               q("sum by (instance) (agentkube_node_agent_sandboxes)", "sandboxes {{instance}}"))),
        Panel("BPF programs", "1: the programs are loaded and the exec/exit/OOM event reader runs.", "short",
              (q("min by (instance) (agentkube_node_agent_bpf_programs_loaded)", "{{instance}}"),)),
        Panel("Refused DNS lookups/s", "Names the node agent's DNS answering refused to tool calls.", "short",
              (q("sum by (instance) (rate(agentkube_tool_call_dns_refused_total[5m]))", "{{instance}}"),)),
        Panel("Memory pressure", "Times calls crossed memory.high, and processes they started, per second.", "short",
              (q("sum by (instance) (rate(agentkube_tool_call_memory_high_events_total[5m]))", "memory.high {{instance}}"),
               q("sum by (instance) (rate(agentkube_tool_call_processes_spawned_total[5m]))", "processes {{instance}}"))),
    ),
)

SERVED_MODELS = Dashboard(
    uid="agentkube-served-models",
    title="agentkube / Served models",
    description="ServedModels on Knative: the concurrency target the PPO policy keeps in force, and what it does to the revision.",
    panels=(
        Panel("Concurrency target: in force vs the policy's wish",
              "The target applied (a bounded step) and the one the policy asked for.", "short",
              (q("max by (namespace, servedmodel) (agentkube_servedmodel_concurrency_target)",
                 "in force {{namespace}}/{{servedmodel}}"),
               q("max by (namespace, servedmodel) (agentkube_servedmodel_policy_target)", "policy {{namespace}}/{{servedmodel}}"))),
        Panel("Pods", "Ready and not-ready pods of each revision, as Knative's autoscaler counts them.", "short",
              (q(_knative_gauge("autoscaler_actual_pods", "kn_revision_pods_count"), "ready {{namespace_name}}/{{service_name}}"),
               q(_knative_gauge("autoscaler_not_ready_pods", "kn_revision_pods_not_ready_count"),
                 "not ready {{namespace_name}}/{{service_name}}"))),
        Panel("p95 request latency", "From queue-proxy's latency histogram (Knative's tops out at 10 s).", "ms",
              (q(_knative(_p95("revision_app_request_latencies_bucket", _KNATIVE_BY, "1m"),
                          f"1000 * histogram_quantile(0.95, sum by (le, {_OTEL_BY}) "
                          f"(rate({_OTEL_REQUESTS}_bucket[1m]) * {_OTEL_ON_TARGET}))"),
                 "{{namespace_name}}/{{service_name}}"),)),
        Panel("Requests/s", "Requests routed to each revision's queue-proxy.", "reqps",
              (q(_knative(f"sum by ({_KNATIVE_BY}) (rate(revision_app_request_count[1m]))",
                          f"sum by ({_OTEL_BY}) (rate({_OTEL_REQUESTS}_count[1m]) * {_OTEL_ON_TARGET})"),
                 "{{namespace_name}}/{{service_name}}"),)),
        Panel("Autoscaling decisions and fallbacks (5m)",
              "Turns of the autoscaling loop by reason: PolicyDecided, or why it fell back to Knative's default.", "short",
              (q("sum by (reason) (increase(agentkube_autoscaling_decisions_total[5m]))", "{{reason}}"),)),
        Panel("Spot share", "Share of replicas the policy places on spot capacity.", "percentunit",
              (q("max by (namespace, servedmodel) (agentkube_servedmodel_spot_share)", "{{namespace}}/{{servedmodel}}"),)),
        Panel("Replicas on spot and on-demand", "Each model's pods by the capacity type of the node they are bound to.",
              "short",
              (q("max by (namespace, servedmodel, capacity_type) (agentkube_servedmodel_replicas)",
                 "{{capacity_type}} {{namespace}}/{{servedmodel}}"),)),
        Panel("Interruptions (1h)", "Nodes announced as going (a spot interruption notice, Karpenter's disruption taint) "
              "that held a model's pods; the operator brings replacements up before they are evicted.", "short",
              (q("sum by (namespace, servedmodel) (increase(agentkube_servedmodel_interruptions_total[1h]))",
                 "{{namespace}}/{{servedmodel}}"),)),
        Panel("Capacity cost per hour", "What the nodes of each model's NodePools cost per hour, from their price labels.",
              "currencyUSD",
              (q("max by (namespace, servedmodel) (agentkube_servedmodel_capacity_cost_per_hour)", "{{namespace}}/{{servedmodel}}"),)),
    ),
)

OPERATOR = Dashboard(
    uid="agentkube-operator",
    title="agentkube / Operator",
    description="The Kopf operator: two replicas, one active through peering.",
    panels=(
        Panel("Operator replicas up", "Scrape health of each replica.", "short",
              (q(f'up{{job="{OPERATOR_JOB}"}}', "{{instance}}"),)),
        Panel("Active replica", "Reconciles/s per replica: only the active one reconciles, the other stands by.", "reqps",
              (q("sum by (instance) (rate(agentkube_operator_reconciles_total[5m]))", "{{instance}}"),)),
        Panel("Reconciles/s", "By kind and result.", "reqps",
              (q("sum by (kind, result) (rate(agentkube_operator_reconciles_total[5m]))", "{{kind}} {{result}}"),)),
        Panel("Reconcile errors/s", "Failed reconciliations; Kopf retries them.", "reqps",
              (q('sum by (kind) (rate(agentkube_operator_reconciles_total{result="error"}[5m]))', "{{kind}}"),)),
        Panel("Reconcile latency", "p50 and p95 of one reconciliation, by kind.", "s",
              (q(_p50("agentkube_operator_reconcile_seconds_bucket", "kind"), "p50 {{kind}}"),
               q(_p95("agentkube_operator_reconcile_seconds_bucket", "kind"), "p95 {{kind}}"))),
        Panel("Operator memory", "Resident memory of each replica.", "bytes",
              (q(f'process_resident_memory_bytes{{job="{OPERATOR_JOB}"}}', "{{instance}}"),)),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (SANDBOXES, NODE_AGENT, SERVED_MODELS, OPERATOR)


def all_queries(dashboards: Iterable[Dashboard] = DASHBOARDS) -> list[tuple[Dashboard, Panel, Query]]:
    return [(dashboard, panel, query) for dashboard in dashboards for panel in dashboard.panels for query in panel.queries]


# --- Grafana JSON -------------------------------------------------------------------------------------
PANEL_WIDTH, PANEL_HEIGHT = 12, 8  # two panels a row on Grafana's 24-column grid


def build(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard's JSON model, built with grafana-foundation-sdk."""
    from grafana_foundation_sdk.builders import dashboard as gdashboard
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    datasource = DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")
    builder = (
        gdashboard.Dashboard(dashboard.title)
        .uid(dashboard.uid)
        .description(dashboard.description)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(gdashboard.DatasourceVariable(DATASOURCE_VARIABLE).label("Prometheus").type("prometheus"))
    )
    for panel in dashboard.panels:
        built = stat.Panel() if panel.kind == "stat" else timeseries.Panel()
        built = built.title(panel.title).description(panel.description).unit(panel.unit).datasource(datasource)
        built = built.span(PANEL_WIDTH).height(PANEL_HEIGHT)
        for index, query in enumerate(panel.queries):
            built = built.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto")
                                      .ref_id(chr(ord("A") + index)).datasource(datasource))
        builder = builder.with_panel(built)
    model: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return model


def render_json(dashboard: Dashboard) -> str:
    return json.dumps(build(dashboard), indent=2, sort_keys=True) + "\n"


def write(directory: Path = DASHBOARD_DIRECTORY) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = directory / dashboard.filename
        path.write_text(render_json(dashboard))
        written.append(path)
    return written


def stale(directory: Path = DASHBOARD_DIRECTORY) -> list[str]:
    """The checked-in dashboards that differ from what this module builds (the names of the files)."""
    expected = {dashboard.filename: render_json(dashboard) for dashboard in DASHBOARDS}
    present = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    differ = [name for name, text in expected.items() if not (directory / name).is_file() or (directory / name).read_text() != text]
    return sorted(differ + sorted(present - set(expected)))


# --- PNG, from the same queries ---------------------------------------------------------------------
def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    import requests

    response = requests.get(f"{prometheus_url.rstrip('/')}/api/v1/query_range",
                            params={"query": expr, "start": str(start), "end": str(end), "step": str(step)}, timeout=30)
    response.raise_for_status()
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format, filled in."""
    text = template
    for name, value in labels.items():
        text = text.replace(f"{{{{{name}}}}}", value)
    return text if template and template != "__auto" else (", ".join(f"{k}={v}" for k, v in labels.items()) or "value")


def render_png(dashboard: Dashboard, prometheus_url: str, out: Path, *, minutes: float = 15.0, now: float | None = None) -> Path:
    """Draw the dashboard as Grafana would lay it out (two panels a row), one subplot per panel, from
    query_range over the last `minutes`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    end = now if now is not None else time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 300)
    columns = 2
    rows = (len(dashboard.panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(14, 3.2 * rows), squeeze=False)

    for index, panel in enumerate(dashboard.panels):
        axis = axes[index // columns][index % columns]
        axis.set_title(panel.title, fontsize=10, loc="left")
        drawn = 0
        for query in panel.queries:
            for series in query_range(prometheus_url, query.expr, start, end, step):
                points = [(dt.datetime.fromtimestamp(float(t)), float(v)) for t, v in series["values"]]
                if not points:
                    continue
                axis.plot([p[0] for p in points], [p[1] for p in points], label=legend(query.legend, series["metric"]),
                          linewidth=1.4)
                drawn += 1
        if drawn:
            axis.legend(fontsize=7, loc="upper left")
        else:
            axis.text(0.5, 0.5, "No data", transform=axis.transAxes, ha="center", va="center", color="grey")
        axis.set_ylabel(panel.unit, fontsize=8)
        axis.set_xlim(dt.datetime.fromtimestamp(start), dt.datetime.fromtimestamp(end))  # one time range, as in Grafana
        axis.xaxis.set_major_formatter(DateFormatter("%H:%M" if minutes > 10 else "%H:%M:%S"))
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for index in range(len(dashboard.panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(dashboard.title, fontsize=13, x=0.01, ha="left")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dashboard.uid}.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
