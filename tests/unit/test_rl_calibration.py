"""The figures the simulator is compared to real Knative by (`agentkube.rl.calibration`), on hand-made runs,
and the pieces the comparison needs from the traces and the simulator."""

import math

import numpy as np
import pytest

from agentkube.rl.calibration import RunRecord, compare, scale_up_lags, simulated_run, summarize
from agentkube.rl.episodes import run_episode
from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.simulator import SimConfig, Simulator, SLOConfig
from agentkube.rl.traces import evaluation_trace


def _run(ready, desired=None, pods=None, latency=(), tokens=None, starts=()) -> RunRecord:
    ready = np.asarray(ready, dtype=float)
    latency = np.asarray(latency, dtype=float)
    return RunRecord(ready=ready, pods=np.asarray(pods if pods is not None else ready, dtype=float),
                     desired=np.asarray(desired if desired is not None else ready, dtype=float), latency_s=latency,
                     response_tokens=np.asarray(tokens if tokens is not None else [10] * latency.size),
                     pod_start_s=np.asarray(starts, dtype=float))


def test_a_scale_up_lasts_until_the_wanted_pods_are_ready():
    desired = [1, 3, 3, 3, 3, 3, 5, 5, 5]
    ready = [1, 1, 1, 2, 3, 3, 3, 3, 5]
    lags, censored = scale_up_lags(np.array(desired), np.array(ready))
    assert lags == [3.0, 2.0] and censored == 0


def test_a_rise_taken_back_ends_when_the_wanted_count_falls_to_what_is_ready():
    lags, censored = scale_up_lags(np.array([1, 4, 4, 1, 1]), np.array([1, 1, 1, 1, 1]))
    assert lags == [2.0] and censored == 0


def test_a_rise_unmet_at_the_end_is_censored_not_counted():
    lags, censored = scale_up_lags(np.array([1, 2, 2]), np.array([1, 1, 1]))
    assert lags == [] and censored == 1


def test_summary_counts_unanswered_requests_as_slo_misses_and_pod_seconds_include_starting_pods():
    slo = SLOConfig(first_token_s=2.0, per_output_token_s=0.1)  # budget 3 s for 10 tokens
    run = _run(ready=[1, 1, 2], pods=[2, 2, 2], latency=[1.0, 2.5, 4.0, math.nan], starts=[5.0, 7.0])
    figures = summarize(run, slo)
    assert figures["slo_attainment"] == 0.5  # 2 of 4 within 3 s; the unanswered one is a miss
    assert figures["answered_share"] == 0.75
    assert figures["pod_seconds"] == 6 and figures["ready_pod_seconds"] == 4
    assert figures["cold_starts"] == 2 and figures["pod_start_median_s"] == 6.0
    assert figures["p95_latency_s"] == pytest.approx(np.quantile([1.0, 2.5, 4.0], 0.95))


def test_compare_reports_the_simulators_figures_over_the_real_ones_and_the_ready_pod_gap():
    real = _run(ready=[1] * 60 + [3] * 60, latency=[2.0, 2.0])
    sim = _run(ready=[1] * 60 + [2] * 60, latency=[1.0, 1.0])
    result = compare(real, sim, SLOConfig())
    assert result["simulator_over_real"]["p95_latency_s"] == pytest.approx(0.5)
    assert result["gaps"]["ready_pods_mean_abs_diff"] == pytest.approx(0.5)
    assert result["gaps"]["ready_pods_minute_mean_abs_diff"] == pytest.approx(0.5)


def test_thinning_scales_the_rate_and_keeps_the_time_scales_and_token_lengths():
    trace = evaluation_trace("flash", 0, duration_s=3600)
    thin = trace.thinned(0.2, seed=3)
    assert len(thin) == pytest.approx(0.2 * len(trace), rel=0.05)
    assert thin.duration_s == trace.duration_s and np.all(np.diff(thin.arrival_s) >= 0)
    assert np.median(thin.response_tokens) == pytest.approx(np.median(trace.response_tokens), rel=0.1)
    assert thin.thinned(1.0).arrival_s.size == len(thin)
    with pytest.raises(ValueError):
        trace.thinned(0.0)


def test_a_simulated_run_records_every_pod_start_and_its_requests_in_trace_order():
    trace = evaluation_trace("flash", 0).window(249 * 60, 300).thinned(0.2, seed=7)
    sim = Simulator(SimConfig(knative=KnativeDefaults(max_scale=10)))
    sim.reset(trace, seed=1, ready_pods=1)
    sim.advance(300)
    run = simulated_run(sim)
    assert run.ready.size == 300 and run.latency_s.size == len(trace)
    assert run.pod_start_s.size == sim.summary().cold_starts > 0
    assert np.all(run.pod_start_s >= sim.config.cold_start.model_load_s)
    assert summarize(run, sim.config.slo)["slo_attainment"] == pytest.approx(sim.summary().slo_attainment)


def test_an_episode_can_start_from_the_real_runs_ready_pods():
    trace = evaluation_trace("flash", 0).window(249 * 60, 120)

    class Fixed:
        def decide(self, observation):
            from agentkube.rl.observation import Decision
            return Decision(target=100.0, spot_share=0.0)

    _, sim, _ = run_episode(Fixed(), trace, ready_pods=3)
    assert sim.ready_series[0] == 3
