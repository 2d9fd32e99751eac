"""The operator-facing API: observations from Knative metrics, actions to decisions, exported policies."""

import math

import numpy as np
import pytest

from agentkube.rl.observation import (
    METRIC_SERIES,
    OBSERVATION_FIELDS,
    POLICY_METRICS,
    ActionBounds,
    Decision,
    MissingMetricError,
    action_from_decision,
    bounded_target,
    decision_from_action,
    observation_from_metrics,
    warm_pod_floor,
)
from agentkube.rl.policy import ExportedPolicy, default_policy_path, load_policy, save_policy
from agentkube.rl.simulator import Simulator
from agentkube.rl.traces import WORKLOADS, generate_trace

METRICS = {
    "revision_app_request_count": 20.0,
    "revision_app_request_latencies": 15_000.0,
    "autoscaler_stable_request_concurrency": 140.0,
    "autoscaler_panic_request_concurrency": 160.0,
    "autoscaler_actual_pods": 4.0,
    "autoscaler_not_ready_pods": 1.0,
    "request_rate_10m": 18.0,
    "request_rate_1h": 12.0,
    "request_rate_stddev_1h": 6.0,
    "peak_concurrency_10m": 300.0,
    "mean_concurrency_10m": 120.0,
}


def observe(metrics=METRICS, **overrides):
    args = dict(target=50.0, time_of_day_s=6 * 3600.0, reference_latency_s=30.0, spot_pods=1.0, spot_allowed=True)
    return observation_from_metrics(metrics, **(args | overrides))


def test_observation_from_knative_metrics():
    observation = dict(zip(OBSERVATION_FIELDS, observe(), strict=True))
    assert set(METRICS) == set(POLICY_METRICS) == set(METRIC_SERIES)
    assert observation["log_request_rate"] == pytest.approx(math.log1p(20.0) / 5)
    assert observation["p95_latency_over_reference"] == pytest.approx(0.5)
    assert observation["spot_share"] == pytest.approx(0.25)
    assert observation["time_of_day_sin"] == pytest.approx(1.0) and observation["time_of_day_cos"] == pytest.approx(0.0, abs=1e-6)
    assert observation["concurrency_per_pod_over_target"] == pytest.approx(140.0 / 4 / 35.0)
    assert observation["log_target"] == pytest.approx(math.log(5.0) / math.log(40.0))
    assert observation["spot_allowed"] == 1.0
    assert observation["log_request_rate_10m"] == pytest.approx(math.log1p(18.0) / 5)
    assert observation["log_request_rate_1h"] == pytest.approx(math.log1p(12.0) / 5)
    assert observation["request_rate_cv_1h"] == pytest.approx(0.5)
    assert observation["log_concurrency_peak_over_mean_10m"] == pytest.approx(math.log1p(300.0) - math.log1p(120.0))
    # Little's law: 120 requests in the system at 18 requests/s is 6.7 s per request.
    assert observation["log_seconds_per_request_10m"] == pytest.approx(math.log1p(120.0 / 18.0) / 4)


def test_no_requests_means_zero_latency_but_missing_or_broken_metrics_raise():
    assert observe(METRICS | {"revision_app_request_latencies": float("nan")})[3] == 0.0
    with pytest.raises(MissingMetricError, match="autoscaler_actual_pods"):
        observe({k: v for k, v in METRICS.items() if k != "autoscaler_actual_pods"})
    with pytest.raises(MissingMetricError):
        observe(METRICS | {"revision_app_request_count": float("inf")})
    with pytest.raises(MissingMetricError):
        observe(METRICS | {"autoscaler_stable_request_concurrency": -1.0})
    with pytest.raises(MissingMetricError, match="request_rate_1h"):
        observe({k: v for k, v in METRICS.items() if k != "request_rate_1h"})
    # No traffic for an hour: a rate of 0 and no spread are features, not errors.
    quiet = observe(METRICS | {"request_rate_10m": 0.0, "request_rate_1h": 0.0, "request_rate_stddev_1h": float("nan")})
    assert np.all(np.isfinite(quiet))


def test_actions_map_to_bounded_decisions_and_back():
    bounds = ActionBounds()
    assert decision_from_action(np.array([-1.0, -1.0])) == Decision(bounds.min_target, 0.0)
    assert decision_from_action(np.array([5.0, 5.0])) == Decision(pytest.approx(bounds.max_target), 1.0)
    assert decision_from_action(np.array([1.0, 1.0]), spot_allowed=False).spot_share == 0.0
    decision = Decision(70.0, 0.3, 0.4)
    again = decision_from_action(action_from_decision(decision))
    assert again.target == pytest.approx(70.0, rel=1e-5) and again.spot_share == pytest.approx(0.3, abs=1e-6)
    assert again.warm_share == pytest.approx(0.4, abs=1e-6)
    # The third number is the warm share, -1 for no floor; a two-output policy (before the floor) has none.
    assert decision_from_action(np.array([0.0, 0.0, -1.0])).warm_share == 0.0
    assert decision_from_action(np.array([0.0, 0.0, 3.0])).warm_share == bounds.max_warm_share
    assert decision_from_action(np.array([0.0, 0.0])).warm_share == 0.0


def test_the_warm_pod_floor_is_a_share_of_the_recent_peaks_pods():
    # 140 in flight at the 10-minute peak, target 100 × 0.7 per pod: the whole peak needs 2 pods.
    assert warm_pod_floor(1.0, 140.0, 100.0) == 2
    assert warm_pod_floor(0.5, 140.0, 100.0) == 1
    assert warm_pod_floor(0.51, 140.0, 100.0) == 2  # rounded up: a share of a pod is a pod
    assert warm_pod_floor(1.0, 140.0, 50.0) == 4  # at a lower target the peak took more pods
    assert warm_pod_floor(0.0, 140.0, 100.0) == 0  # no floor asked
    assert warm_pod_floor(1.0, 0.0, 100.0) == 0  # no traffic in 10 minutes: nothing to keep warm
    assert warm_pod_floor(5.0, 140.0, 100.0) == 2  # the share is capped at max_warm_share


def test_a_decision_moves_the_target_at_most_the_operators_max_change():
    bounds = ActionBounds()
    assert bounded_target(100.0, 400.0) == pytest.approx(150.0)
    assert bounded_target(100.0, 10.0) == pytest.approx(50.0)
    assert bounded_target(100.0, 120.0) == 120.0
    assert bounded_target(15.0, 1.0) == bounds.min_target and bounded_target(350.0, 1000.0) == bounds.max_target


def test_training_bounds_the_step_as_the_operator_does():
    from agentkube.operator.api import PpoSettings

    assert ActionBounds().max_change_fraction == PpoSettings().max_change_fraction


def test_simulator_observation_is_the_operators_observation():
    sim = Simulator()
    sim.reset(generate_trace(WORKLOADS["conversation"], 1, 600), seed=0, target=60.0, ready_pods=3)
    stats = sim.advance(60)
    expected = observation_from_metrics(stats.metrics, target=60.0, time_of_day_s=60.0, reference_latency_s=30.0,
                                        spot_pods=0.0, spot_allowed=False)
    assert np.array_equal(sim.observation(stats, spot_allowed=False), expected)


def random_policy(seed=0) -> ExportedPolicy:
    rng = np.random.default_rng(seed)
    shapes = [(16, len(OBSERVATION_FIELDS)), (16, 16), (2, 16)]
    return ExportedPolicy(tuple(rng.normal(0, 0.5, s).astype(np.float32) for s in shapes),
                          tuple(rng.normal(0, 0.1, s[0]).astype(np.float32) for s in shapes), metadata={"note": "test"})


def test_exported_policy_round_trips_and_computes_its_mlp(tmp_path):
    policy = random_policy()
    loaded = load_policy(save_policy(policy, tmp_path / "p.npz"))
    observation = observe()
    w, b = policy.weights, policy.biases
    by_hand = np.clip(np.tanh(np.tanh(observation @ w[0].T + b[0]) @ w[1].T + b[1]) @ w[2].T + b[2], -1, 1)
    assert np.allclose(loaded.action(observation), by_hand, atol=1e-6)
    assert loaded.metadata == {"note": "test"}
    assert loaded.decide(observation) == decision_from_action(by_hand)
    assert loaded.decide(observation, spot_allowed=False).spot_share == 0.0


def test_a_policy_for_other_observation_fields_is_refused(tmp_path):
    from dataclasses import replace

    path = save_policy(replace(random_policy(), observation_fields=("something", "else")), tmp_path / "p.npz")
    with pytest.raises(ValueError, match="observation fields"):
        load_policy(path)


def test_the_shipped_default_policy_loads_and_decides_within_bounds():
    assert default_policy_path().exists()
    policy = load_policy()
    assert "command" in policy.metadata
    decision = policy.decide(observe())
    assert ActionBounds().min_target <= decision.target <= ActionBounds().max_target
    assert 0.0 <= decision.spot_share <= 1.0
