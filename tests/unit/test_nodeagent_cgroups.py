"""Cgroup layout detection and the files the node agent writes and reads, as pure functions."""

from pathlib import Path

import pytest

from agentkube.contract import CPU_PERIOD_US, memory_high_for
from agentkube.ebpf.agent import sandbox_containing
from agentkube.ebpf.cgroups import (
    CgroupError,
    Counters,
    counters_from_files,
    is_within,
    kubernetes_container_paths,
    limit_settings,
    local_root_paths,
    parse_mounts,
    parse_proc_cgroup,
)
from agentkube.ebpf.kubernetes import TOTAL_KEYS
from agentkube.ebpf.metrics import LABELS, OUTCOMES, Metrics, call_totals, outcome
from agentkube.ebpf.models import CallRecord, Usage

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
COMOUNTED_MOUNTS = """\
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


def test_hybrid_layout_uses_v1_controllers_and_the_unified_hierarchy():
    layout = parse_mounts(HYBRID_MOUNTS)
    assert layout.kind == "hybrid"
    assert layout.unified.mount == Path("/sys/fs/cgroup/unified")
    assert layout.hierarchy_for("memory").mount == Path("/sys/fs/cgroup/memory")
    assert layout.hierarchy_for("cpuacct").mount == Path("/sys/fs/cgroup/cpuacct")
    assert {h.name for h in layout.hierarchies} == {"unified", "cpu", "cpuacct", "memory", "pids"}


def test_comounted_v1_controllers_form_one_hierarchy():
    layout = parse_mounts(COMOUNTED_MOUNTS)
    assert layout.hierarchy_for("cpu") is layout.hierarchy_for("cpuacct")
    assert layout.hierarchy_for("cpu").name == "cpu,cpuacct"


def test_pure_v2_layout_needs_its_controllers():
    layout = parse_mounts(V2_MOUNTS, ["cpuset", "cpu", "io", "memory", "pids"])
    assert layout.kind == "v2" and len(layout.hierarchies) == 1
    assert layout.hierarchy_for("memory") is layout.unified
    with pytest.raises(CgroupError, match="pids"):
        parse_mounts(V2_MOUNTS, ["cpu", "memory"])


def test_no_unified_hierarchy_is_an_error():
    with pytest.raises(CgroupError, match="cgroup2"):
        parse_mounts("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n")


def test_proc_cgroup_keys_match_hierarchy_names():
    text = "9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/\n8:pids:/x\n0::/agentkube/s\n"
    assert parse_proc_cgroup(text) == {"memory": "/a/b", "cpu,cpuacct": "/", "pids": "/x", "unified": "/agentkube/s"}
    layout = parse_mounts(COMOUNTED_MOUNTS)
    assert set(parse_proc_cgroup(text)) == {h.name for h in layout.hierarchies}


@pytest.mark.parametrize("path, ancestor, inside", [
    ("/a/b/c", "/a/b", True), ("/a/b", "/a/b", True), ("/a/bc", "/a/b", False), ("/a", "/a/b", False),
    ("/anything", "/", True), ("/a/b/", "/a/b", True),
])
def test_is_within_compares_path_components(path, ancestor, inside):
    assert is_within(path, ancestor) is inside


def test_sandbox_containing_finds_the_caller_sandbox():
    sandboxes = {"ns/a": "/agentkube/ns_a", "ns/ab": "/agentkube/ns_ab"}
    assert sandbox_containing("/agentkube/ns_ab/agent", sandboxes) == "ns/ab"
    assert sandbox_containing("/agentkube/ns_a/call-1", sandboxes) == "ns/a"
    assert sandbox_containing("/user.slice", sandboxes) is None


def test_local_root_nests_under_the_agent_on_v1_and_at_top_level_on_v2():
    hybrid = parse_mounts(HYBRID_MOUNTS)
    roots = local_root_paths(hybrid, {"memory": "/jobs/1", "unified": "/some/where"}, "agentkube")
    assert roots["memory"] == "/jobs/1/agentkube" and roots["pids"] == "/agentkube" and roots["unified"] == "/agentkube"
    v2 = parse_mounts(V2_MOUNTS, ["cpu", "memory", "pids"])
    assert local_root_paths(v2, {"unified": "/system.slice/agent.service"}, "ak") == {"unified": "/ak"}


def test_kubernetes_paths_cover_cgroupfs_and_systemd_drivers():
    uid = "1f2e3d4c-0000-1111-2222-333344445555"
    paths = kubernetes_container_paths(uid, "containerd://" + "ab" * 32, "burstable")
    assert f"/kubepods/burstable/pod{uid}/{'ab' * 32}" in paths
    assert (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
            f"cri-containerd-{'ab' * 32}.scope") in paths
    guaranteed = kubernetes_container_paths(uid, "cd" * 32, "guaranteed")
    assert f"/kubepods/pod{uid}/{'cd' * 32}" in guaranteed
    assert any(p.startswith(f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/") for p in guaranteed)


def test_limit_files_on_v2_include_memory_high_below_max():
    settings = {(c, f): v for c, f, v, _ in limit_settings("v2", 64 << 20, 0.5, 32)}
    assert settings[("memory", "memory.max")] == str(64 << 20)
    assert int(settings[("memory", "memory.high")]) == memory_high_for(64 << 20) < 64 << 20
    assert settings[("cpu", "cpu.max")] == f"{CPU_PERIOD_US // 2} {CPU_PERIOD_US}"
    assert settings[("pids", "pids.max")] == "32"


def test_limit_files_on_v1_stand_in_for_memory_high_and_set_the_period_before_the_quota():
    settings = limit_settings("hybrid", 64 << 20, 1.5, 32)
    files = [f for _, f, _, _ in settings]
    assert files.index("cpu.cfs_period_us") < files.index("cpu.cfs_quota_us")
    values = {f: v for _, f, v, _ in settings}
    assert values["memory.limit_in_bytes"] == str(64 << 20)
    assert values["memory.soft_limit_in_bytes"] == str(memory_high_for(64 << 20))
    assert values["cpu.cfs_quota_us"] == str(int(1.5 * CPU_PERIOD_US))
    optional = {f for _, f, _, required in settings if not required}
    assert optional == {"memory.memsw.limit_in_bytes"}


def test_counters_parse_on_both_layouts():
    v2 = counters_from_files("v2", {
        "memory.peak": "1048576\n", "memory.events": "low 0\nhigh 3\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
        "cpu.stat": "usage_usec 250000\nuser_usec 1\nthrottled_usec 50000\n", "pids.events": "max 7\n"})
    assert (v2.peak_memory_bytes, v2.cpu_seconds, v2.throttled_seconds, v2.oom_kills, v2.memory_high_events,
            v2.pids_limit_hits) == (1048576, 0.25, 0.05, 1, 3, 7)
    v1 = counters_from_files("hybrid", {
        "memory.max_usage_in_bytes": "2097152\n", "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "cpuacct.usage": "500000000\n", "cpu.stat": "nr_periods 3\nnr_throttled 1\nthrottled_time 20000000\n"})
    assert (v1.peak_memory_bytes, v1.cpu_seconds, v1.throttled_seconds, v1.oom_kills, v1.pids_limit_hits) == (
        2097152, 0.5, 0.02, 2, 0)
    assert counters_from_files("v2", {"memory.current": "4096\n"}).memory_bytes == 4096
    assert counters_from_files("hybrid", {"memory.usage_in_bytes": "8192\n"}).memory_bytes == 8192


def test_a_reused_cgroups_counters_are_its_current_calls_alone():
    # Cumulative counters less those read when the call's turn began; the peak (reset then) and the charge as read.
    earlier = Counters(peak_memory_bytes=90 << 20, cpu_seconds=1.5, throttled_seconds=0.2, oom_kills=1,
                       memory_high_events=4, pids_limit_hits=2, memory_bytes=1 << 20)
    now = Counters(peak_memory_bytes=3 << 20, cpu_seconds=1.75, throttled_seconds=0.2, oom_kills=1,
                   memory_high_events=6, pids_limit_hits=2, memory_bytes=2 << 20)
    assert now.since(earlier) == Counters(peak_memory_bytes=3 << 20, cpu_seconds=0.25, throttled_seconds=0.0,
                                          oom_kills=0, memory_high_events=2, pids_limit_hits=0, memory_bytes=2 << 20)
    assert now.since(Counters()) == now


def _record(usage: Usage | None) -> CallRecord:
    return CallRecord(call_id="abc", sandbox="s", namespace="n", profile="none", signature="x", argv=["x"], pid=2,
                      cgroup_paths={}, cgroup_id=1, limits={"memory": 1 << 24, "cpu": 1, "pids": 1, "timeout": 1},
                      sources={}, started_at=0, deadline=1, finished_at=1, usage=usage)


def test_metrics_have_bounded_labels_and_outcomes():
    base = dict(duration_seconds=1, exit_code=0, signal=None, timed_out=False, peak_memory_bytes=1, cpu_seconds=0.1,
                throttled_seconds=0, oom_kills=0, processes_spawned=1, connections_blocked=0, memory_high_events=0,
                pids_limit_hits=0)
    assert outcome(_record(Usage(**base))) == "ok"
    assert outcome(_record(Usage(**{**base, "exit_code": None, "signal": 9, "oom_kills": 1}))) == "oom_killed"
    assert outcome(_record(Usage(**{**base, "exit_code": None, "signal": 9, "timed_out": True}))) == "timed_out"
    assert outcome(_record(None)) == "killed"
    metrics = Metrics()
    metrics.started("s", "n", 0)
    metrics.finished(_record(Usage(**base)))
    text = metrics.exposition().decode()
    assert 'agentkube_tool_calls_total{namespace="n",outcome="ok",profile="none",sandbox="s"} 1.0' in text
    assert "abc" not in text  # no call id anywhere
    label_names = {name for family in metrics.registry.collect() for s in family.samples for name in s.labels}
    assert label_names <= {*LABELS, "outcome", "le"}
    assert set(OUTCOMES) >= {outcome(_record(None))}


def test_a_finished_call_adds_to_its_sandbox_totals():
    base = dict(duration_seconds=1, exit_code=0, signal=None, timed_out=False, peak_memory_bytes=1, cpu_seconds=0.1,
                throttled_seconds=0, oom_kills=0, processes_spawned=1, connections_blocked=2, memory_high_events=0,
                pids_limit_hits=0)
    assert call_totals(_record(Usage(**base))) == {"calls": 1, "failed": 0, "oomKilled": 0, "blockedConnections": 2, "dnsRefused": 0}
    oom = call_totals(_record(Usage(**{**base, "exit_code": None, "signal": 9, "oom_kills": 3})))
    assert (oom["failed"], oom["oomKilled"]) == (1, 1)
    assert call_totals(_record(None)) == {"calls": 1, "failed": 1, "oomKilled": 0, "blockedConnections": 0, "dnsRefused": 0}
    assert set(call_totals(_record(None))) == set(TOTAL_KEYS)  # what the node agent reports, status.toolCalls holds


def test_high_events_count_a_crossing_the_watch_missed():
    from agentkube.ebpf.pressure import high_events_seen

    assert high_events_seen(watched=2, counted_by_kernel=0, peak_bytes=10, high_bytes=5) == 2
    assert high_events_seen(watched=0, counted_by_kernel=3, peak_bytes=10, high_bytes=5) == 3
    assert high_events_seen(watched=0, counted_by_kernel=0, peak_bytes=5, high_bytes=5) == 1  # before arming
    assert high_events_seen(watched=0, counted_by_kernel=0, peak_bytes=4, high_bytes=5) == 0


def test_mount_options_of_the_unified_hierarchy():
    from agentkube.ebpf.cgroups import mount_options

    mounts = HYBRID_MOUNTS.replace("cgroup2 rw,relatime", "cgroup2 rw,relatime,favordynmods")
    assert "favordynmods" in mount_options(mounts, Path("/sys/fs/cgroup/unified"))
    assert "favordynmods" not in mount_options(HYBRID_MOUNTS, Path("/sys/fs/cgroup/unified"))
    with pytest.raises(CgroupError):
        mount_options(HYBRID_MOUNTS, Path("/nowhere"))


def test_delegation_runs_from_the_root_down_to_the_cgroup():
    from agentkube.ebpf.cgroups import delegation_chain

    mount = Path("/sys/fs/cgroup")
    assert delegation_chain(mount, mount / "agentkube" / "ns_s") == [
        mount, mount / "agentkube", mount / "agentkube" / "ns_s"]
    assert delegation_chain(mount, mount) == [mount]
