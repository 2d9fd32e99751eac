"""Prometheus metrics of the node agent. Labels are bounded: sandbox, namespace, profile (and a small
fixed set of outcomes) — never a per-call id, which would make every call a new time series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentkube.ebpf.models import CallRecord

LABELS = ("sandbox", "namespace", "profile")
OUTCOMES = ("ok", "failed", "oom_killed", "timed_out", "killed")


def outcome(record: CallRecord) -> str:
    usage = record.usage
    if usage is None:
        return "killed"
    if usage.timed_out:
        return "timed_out"
    if usage.oom_kills:
        return "oom_killed"
    if usage.signal:
        return "killed"
    return "ok" if usage.exit_code == 0 else "failed"


def call_totals(record: CallRecord) -> dict[str, int]:
    """What one finished call adds to its sandbox's totals (the AgentSandbox's status.toolCalls)."""
    usage = record.usage
    return {
        "calls": 1,
        "failed": int(outcome(record) != "ok"),
        "oomKilled": int(bool(usage and usage.oom_kills)),
        "blockedConnections": usage.connections_blocked if usage else 0,
        "dnsRefused": usage.dns_refused if usage else 0,
    }


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("agentkube_tool_calls", "Tool calls finished", (*LABELS, "outcome"), registry=r)
        self.duration = Histogram("agentkube_tool_call_duration_seconds", "Wall time of a tool call", LABELS,
                                  buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800), registry=r)
        self.peak_memory = Histogram("agentkube_tool_call_peak_memory_bytes", "Peak memory of a tool call", LABELS,
                                     buckets=tuple(2**i * 1024 * 1024 for i in range(0, 15)), registry=r)
        self.cpu = Counter("agentkube_tool_call_cpu_seconds", "CPU time used by tool calls", LABELS, registry=r)
        self.throttled = Counter("agentkube_tool_call_throttled_seconds", "Time tool calls were CPU-throttled", LABELS, registry=r)
        self.oom = Counter("agentkube_tool_call_oom_kills", "Processes OOM-killed inside tool calls", LABELS, registry=r)
        self.spawned = Counter("agentkube_tool_call_processes_spawned", "Processes started by tool calls", LABELS, registry=r)
        self.blocked = Counter("agentkube_tool_call_connections_blocked", "Egress connection attempts blocked", LABELS, registry=r)
        self.dns_refused = Counter("agentkube_tool_call_dns_refused", "DNS lookups refused to tool calls", LABELS, registry=r)
        self.high = Counter("agentkube_tool_call_memory_high_events", "Times tool calls crossed memory.high", LABELS, registry=r)
        self.running = Gauge("agentkube_tool_calls_running", "Tool calls running now", ("sandbox", "namespace"), registry=r)
        self.activity = Gauge("agentkube_sandbox_last_activity_timestamp_seconds",
                              "Unix time of a sandbox's last tool call start or end (for idle suspension)",
                              ("sandbox", "namespace"), registry=r)
        # The node agent's own health: how long placing a call in its cgroup takes (on the call's start
        # path: the agent's cost to every tool call) and whether its BPF programs are loaded and attached.
        self.placement = Histogram("agentkube_node_agent_call_placement_seconds",
                                   "Time the node agent takes to place a call in its own cgroup (limits, BPF maps, move)",
                                   buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                                   registry=r)
        self.bpf_loaded = Gauge("agentkube_node_agent_bpf_programs_loaded",
                                "1 when the node agent's BPF programs are loaded and their event reader runs", registry=r)
        self.sandboxes = Gauge("agentkube_node_agent_sandboxes", "Sandboxes registered with the node agent", registry=r)

    def started(self, sandbox: str, namespace: str, at: float) -> None:
        self.running.labels(sandbox, namespace).inc()
        self.activity.labels(sandbox, namespace).set(at)

    def finished(self, record: CallRecord) -> None:
        labels = (record.sandbox, record.namespace, record.profile)
        usage = record.usage
        self.running.labels(record.sandbox, record.namespace).dec()
        self.activity.labels(record.sandbox, record.namespace).set(record.finished_at or 0)
        self.calls.labels(*labels, outcome(record)).inc()
        if usage is None:
            return
        self.duration.labels(*labels).observe(usage.duration_seconds)
        self.peak_memory.labels(*labels).observe(usage.peak_memory_bytes)
        self.cpu.labels(*labels).inc(usage.cpu_seconds)
        self.throttled.labels(*labels).inc(usage.throttled_seconds)
        self.oom.labels(*labels).inc(usage.oom_kills)
        self.spawned.labels(*labels).inc(usage.processes_spawned)
        self.blocked.labels(*labels).inc(usage.connections_blocked)
        self.high.labels(*labels).inc(usage.memory_high_events)
        self.dns_refused.labels(*labels).inc(usage.dns_refused)

    def forget_sandbox(self, sandbox: str, namespace: str) -> None:
        for gauge in (self.running, self.activity):
            try:
                gauge.remove(sandbox, namespace)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
