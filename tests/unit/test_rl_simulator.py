"""The simulator end to end: Knative's scaling, queueing, cold starts and spot interruptions."""

from dataclasses import replace

import numpy as np
import pytest

from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.observation import OBSERVATION_FIELDS, WORKLOAD_METRICS
from agentkube.rl.server import ColdStartConfig
from agentkube.rl.simulator import (
    MINUTE_S,
    RATE_WINDOW_1H_S,
    RATE_WINDOW_10M_S,
    SUBQUERY_STEP_S,
    SimConfig,
    Simulator,
)
from agentkube.rl.spot import SpotConfig
from agentkube.rl.traces import Trace, WorkloadProfile, generate_trace

STEADY = WorkloadProfile(mean_rate_rps=20.0, interarrival_cv=1.0, daily_amplitude=0.0, weekend_factor=1.0)
FIXED_START = ColdStartConfig(mean_s=1.0, sd_s=0.01, model_load_s=10.0)


def uniform_trace(rate_rps: float, duration_s: int, response_tokens: int = 100, start_s: float = 0.0) -> Trace:
    arrival = start_s + np.arange(int(rate_rps * (duration_s - start_s))) / rate_rps
    n = arrival.size
    return Trace(arrival, np.full(n, 100), np.full(n, response_tokens), float(duration_s))


def run(sim: Simulator, trace: Trace, **reset):
    sim.reset(trace, seed=0, **reset)
    while not sim.done:
        sim.advance(60)
    return sim.summary()


def test_steady_load_settles_at_concurrency_over_target():
    sim = Simulator(SimConfig(cold_start=FIXED_START))
    trace = generate_trace(STEADY, 1, 1800)
    run(sim, trace, target=50.0, ready_pods=2)
    late = slice(1200, 1800)
    expected = np.ceil(sim.concurrency_series[late].mean() / 35.0)  # target 50 × 0.7
    assert abs(np.median(sim.ready_series[late]) - expected) <= 1


def test_a_higher_target_runs_fewer_pods_with_higher_latency():
    trace = generate_trace(STEADY, 2, 1800)
    low, high = run(Simulator(), trace, target=40.0, ready_pods=3), run(Simulator(), trace, target=200.0, ready_pods=3)
    assert high.mean_ready_pods < low.mean_ready_pods and high.cost < low.cost
    assert high.p95_latency_s > low.p95_latency_s


def test_idle_revision_scales_to_zero_after_stable_window_and_grace_period():
    sim = Simulator(SimConfig(cold_start=FIXED_START))
    sim.reset(uniform_trace(1.0, 400, start_s=390.0), seed=0, ready_pods=1)
    sim.advance(300)
    zero_at = int(np.argmax(sim.ready_series[:300] == 0))
    # Desired 0 from the first tick; inactive after a 60 s stable window, zero 30 s later (ticks every 2 s).
    assert 88 <= zero_at <= 94 and sim.ready_series[zero_at:300].max() == 0


def test_requests_to_zero_wait_for_a_cold_start():
    sim = Simulator(SimConfig(cold_start=FIXED_START))
    trace = uniform_trace(1.0, 300, response_tokens=10, start_s=200.0)
    summary = run(sim, trace, ready_pods=0)
    assert sim.ready_series[:200].max() == 0 and sim.ready_series[215:].min() >= 1
    assert summary.cold_starts >= 1
    assert summary.slo_attainment < 0.99  # the first requests waited ~11 s against a ~3 s budget


def test_requests_beyond_the_hard_limit_queue():
    base = SimConfig(knative=KnativeDefaults(max_scale=1), cold_start=FIXED_START)
    limited = replace(base, knative=replace(base.knative, container_concurrency=4))
    trace = uniform_trace(5.0, 300, response_tokens=50)
    free = run(Simulator(base), trace, ready_pods=1)
    queued = run(Simulator(limited), trace, ready_pods=1)
    assert queued.p95_latency_s > 3 * free.p95_latency_s


def test_panic_mode_reacts_to_a_burst_within_seconds():
    sim = Simulator(SimConfig(cold_start=FIXED_START))
    quiet, burst = uniform_trace(2.0, 120), uniform_trace(60.0, 240, start_s=120.0)
    trace = Trace(np.concatenate([quiet.arrival_s, burst.arrival_s]), np.full(len(quiet) + len(burst), 100),
                  np.full(len(quiet) + len(burst), 100), 240.0)
    run(sim, trace, ready_pods=1)
    assert sim.pending_series[120:140].max() >= 3  # scale-up requested within 20 s of the burst


def test_same_seed_same_result_and_spot_is_cheaper():
    trace = generate_trace(STEADY, 3, 3600)
    one, two = run(Simulator(), trace, ready_pods=3), run(Simulator(), trace, ready_pods=3)
    assert one == two
    spot = run(Simulator(), trace, ready_pods=3, spot_share=1.0)
    assert spot.cost < 0.5 * one.cost


@pytest.mark.parametrize("drain", [True, False])
def test_spot_interruptions_fail_requests_unless_drained(drain):
    spot = SpotConfig(interruptions_per_node_hour=6.0, drain_on_notice=drain)
    sim = Simulator(SimConfig(spot=spot, cold_start=FIXED_START))
    summary = run(sim, generate_trace(STEADY, 4, 3600), ready_pods=3, spot_share=1.0)
    assert summary.interruptions >= 5
    if drain:
        assert summary.failed < 1.0 and summary.served_share > 0.999
    else:
        assert summary.failed > 10.0


def test_metrics_use_knative_names():
    sim = Simulator()
    sim.reset(generate_trace(STEADY, 5, 600), seed=0, target=80.0, ready_pods=2)
    stats = sim.advance(120)
    assert stats.metrics["revision_app_request_count"] == pytest.approx(20.0, rel=0.3)
    assert stats.metrics["autoscaler_actual_pods"] >= 1
    assert sim.target == 80.0
    observation = sim.observation(stats, spot_allowed=False)
    assert observation.shape == (len(OBSERVATION_FIELDS),) and np.all(np.isfinite(observation))
    assert stats.arrivals >= stats.admitted >= stats.within_slo


def test_initial_min_and_max_scale_bound_the_revision():
    trace = uniform_trace(100.0, 600)
    sim = Simulator(SimConfig(knative=KnativeDefaults(min_scale=3, max_scale=4), cold_start=FIXED_START))
    sim.reset(trace, seed=0)
    assert sim.ready_pods == 3  # initial scale 1, raised to min-scale
    while not sim.done:
        sim.advance(60)
    assert sim.ready_series.max() == 4 and sim.ready_series.min() >= 3
    default = Simulator()
    default.reset(trace, seed=0)
    assert default.ready_pods == 1  # Knative's initial scale


def test_workload_features_use_the_windows_of_their_promql():
    windows = {"10m": RATE_WINDOW_10M_S, "1h": RATE_WINDOW_1H_S, "1m": MINUTE_S, "15s": SUBQUERY_STEP_S}
    for promql in WORKLOAD_METRICS.values():
        used = [w for w in windows if f"[{w}]" in promql or f"[{w}:" in promql or f":{w}]" in promql]
        assert used, promql
    assert "[1h:1m]" in WORKLOAD_METRICS["request_rate_stddev_1h"]
    assert "[10m:15s]" in WORKLOAD_METRICS["peak_concurrency_10m"]


def test_workload_features_are_what_prometheus_would_answer():
    sim = Simulator()
    sim.reset(generate_trace(STEADY, 5, 2 * 3600), seed=0, target=100.0, ready_pods=4)
    stats = sim.advance(3700)
    features = stats.metrics
    t = sim.t
    arrivals = np.bincount(sim.trace.arrival_s.astype(int), minlength=sim.seconds)
    assert features["request_rate_10m"] == pytest.approx(arrivals[t - 600 : t].sum() / 600)
    assert features["request_rate_1h"] == pytest.approx(arrivals[t - 3600 : t].sum() / 3600)
    per_minute = [arrivals[end - 60 : end].sum() / 60 for end in range(t, t - 3600, -60)]
    assert features["request_rate_stddev_1h"] == pytest.approx(np.std(per_minute))
    # Peak of the 6 s panic average sampled every 15 s, mean of the 60 s stable average likewise.
    conc = sim.concurrency_series
    ends = range(t, t - 600, -15)
    assert features["peak_concurrency_10m"] == pytest.approx(max(conc[e - 6 : e].mean() for e in ends))
    assert features["mean_concurrency_10m"] == pytest.approx(np.mean([conc[e - 60 : e].mean() for e in ends]))


def test_workload_features_tell_a_steady_workload_from_a_bursty_one():
    def features(profile: WorkloadProfile) -> np.ndarray:
        sim = Simulator()
        sim.reset(generate_trace(profile, 3, 2 * 3600), seed=0, target=100.0, ready_pods=4)
        stats = sim.advance(3600)
        return sim.observation(stats, spot_allowed=False)

    steady = features(STEADY)
    bursty = features(replace(STEADY, interarrival_cv=3.0, erratic_bursts_per_day=48.0))
    cv = OBSERVATION_FIELDS.index("request_rate_cv_1h")
    peak = OBSERVATION_FIELDS.index("log_concurrency_peak_over_mean_10m")
    assert bursty[cv] > 2 * steady[cv] and bursty[peak] > steady[peak]


def test_a_warm_pod_floor_holds_pods_through_a_lull_and_spares_the_cold_start():
    # 20 s of traffic, a 200 s lull, traffic again. Without a floor Knative scales to zero in the lull and
    # the returning requests wait for a cold start; with min-scale 2 the two pods stay and serve them.
    trace = Trace(np.concatenate([np.arange(0, 20, 0.1), np.arange(220, 240, 0.1)]), np.full(400, 100),
                  np.full(400, 20), 300.0)
    bare, floored = Simulator(SimConfig(cold_start=FIXED_START)), Simulator(SimConfig(cold_start=FIXED_START))
    bare.reset(trace, seed=0, ready_pods=2)
    floored.reset(trace, seed=0, ready_pods=2)
    floored.set_min_scale(2)
    for sim in (bare, floored):
        while not sim.done:
            sim.advance(30)
    assert bare.ready_series[150:220].min() == 0 and floored.ready_series.min() == 2
    assert floored.summary().cold_starts == 0 < bare.summary().cold_starts
    assert floored.summary().slo_attainment > bare.summary().slo_attainment
    assert floored.summary().cost > bare.summary().cost  # the warm pods are paid for


def test_the_floor_keeps_within_the_revisions_own_scale_bounds():
    sim = Simulator(SimConfig(knative=KnativeDefaults(min_scale=2, max_scale=5)))
    sim.reset(uniform_trace(1.0, 60), seed=0)
    sim.set_min_scale(0)
    assert sim.min_scale == 2  # the revision's own min-scale stays
    sim.set_min_scale(9)
    assert sim.min_scale == 5  # Knative refuses min-scale above max-scale


def test_a_branch_runs_on_as_its_origin_would_and_leaves_it_alone():
    # Spot interruptions and cold starts draw from the random stream: a branch must carry it on alike.
    trace = generate_trace(STEADY, 3, 1_800)
    origin = Simulator(SimConfig(spot=SpotConfig(interruptions_per_node_hour=6.0)))
    origin.reset(trace, seed=1, spot_share=0.5, ready_pods=2)
    origin.advance(600)
    branch = origin.branch()
    branch.set_target(250.0)
    branch.advance(600)
    assert origin.t == 600 and origin.summary().requests < branch.summary().requests
    alike = origin.branch()
    while not origin.done:
        assert origin.advance(300) == alike.advance(300)
    assert origin.summary() == alike.summary()
    assert origin.summary() != branch.summary()
