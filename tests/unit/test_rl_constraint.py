"""Constrained training: the multiplier that holds the policy at Knative's default's attainment, the reward
that charges only misses beyond the default's, and the environment that runs the default beside the policy."""

import math

import numpy as np
import pytest

from agentkube.rl.constraint import ConstraintConfig, SLOMultiplier, next_multiplier
from agentkube.rl.episodes import RewardWeights, missed_share, reward
from agentkube.rl.simulator import IntervalStats, SimConfig

BASE = dict(seconds=3600, arrivals=1000, admitted=1000, cold_starts=0, interruptions=0, p95_latency_s=1.0,
            mean_ready_pods=2, mean_concurrency=1, metrics={})


def test_the_multiplier_rises_while_the_policy_misses_more_than_the_default_and_falls_with_room():
    config = ConstraintConfig(mode="lagrangian", margin_points=0.0)
    assert next_multiplier(40.0, 0.04, config) == pytest.approx(40.0 * math.exp(0.02))
    assert next_multiplier(40.0, 4.0, config) == pytest.approx(40.0 * math.exp(config.max_step))  # one step at most
    assert next_multiplier(40.0, -0.1, config) < 40.0
    assert next_multiplier(40.0, 0.0, config) == pytest.approx(40.0)
    # The margin asks for room under the default: matching it exactly still raises λ.
    assert next_multiplier(40.0, 0.0, ConstraintConfig(mode="lagrangian", margin_points=0.02)) > 40.0
    assert next_multiplier(config.max_multiplier * 0.99, 10.0, config) == config.max_multiplier
    assert next_multiplier(config.min_multiplier * 1.01, -10.0, config) == config.min_multiplier


def test_the_shared_multiplier_smooths_the_gap_over_rollouts():
    multiplier = SLOMultiplier(ConstraintConfig(mode="excess", ema=0.5, margin_points=0.0))
    for _ in range(4):
        multiplier.record(0.012, 0.010)  # 0.2 points over the default
    assert multiplier.update() > 40.0 and multiplier.gap_ema_points == pytest.approx(0.2)
    multiplier.record(0.010, 0.012)
    multiplier.update()
    assert multiplier.gap_ema_points == pytest.approx(0.0)  # half the last rollout, half the EMA
    assert multiplier.update() == multiplier.value and len(multiplier.history) == 2  # nothing recorded: unchanged


def test_unknown_modes_and_inverted_bounds_are_refused():
    with pytest.raises(ValueError, match="constraint mode"):
        ConstraintConfig(mode="hard")
    with pytest.raises(ValueError):
        ConstraintConfig(mode="lagrangian", initial=1.0)


def test_the_excess_reward_charges_only_misses_beyond_the_defaults():
    config, weights = SimConfig(), RewardWeights()
    two_pods = config.spot.on_demand_price_per_hour * 2
    slow = IntervalStats(within_slo=990, failed=0, cost=two_pods, **BASE)
    assert missed_share(slow) == pytest.approx(0.01)
    assert reward(slow, config, weights, excess_over=0.01) == pytest.approx(-2 / weights.scale)
    assert reward(slow, config, weights, excess_over=0.02) == pytest.approx(-2 / weights.scale)  # no credit
    assert reward(slow, config, weights, excess_over=0.005) == pytest.approx(-2 * (1 + weights.slo_miss * 0.005) / weights.scale)
    assert reward(slow, config, weights) == pytest.approx(-2 * (1 + weights.slo_miss * 0.01) / weights.scale)
    # Failures (spot reclamation) are not SLO misses the default could have had: they cost `failed` alone.
    failing = IntervalStats(within_slo=990, failed=10, cost=two_pods, **BASE)
    assert missed_share(failing) == pytest.approx(0.02) and missed_share(failing, count_failed=False) == pytest.approx(0.01)
    assert reward(failing, config, weights, excess_over=0.01) == pytest.approx(-(2 + weights.failed * 0.01) / weights.scale)


def test_the_env_runs_knatives_default_beside_the_policy_and_feeds_the_multiplier():
    pytest.importorskip("gymnasium", reason="needs the train extra")
    from dataclasses import replace

    from agentkube.rl.env import AutoscalingEnv, EnvConfig

    config = EnvConfig(episode_s=1800, lead_in_s=600, constraint=ConstraintConfig(mode="excess"))
    env = AutoscalingEnv(config, probe=True)
    plain = AutoscalingEnv(replace(config, constraint=ConstraintConfig()))
    observation, _ = env.reset(seed=4)
    plain_observation, _ = plain.reset(seed=4)
    # The shadow changes nothing the policy sees: same episode, same observation.
    assert np.array_equal(observation, plain_observation) and env.default_sim is not None
    # Both start from the same lead-in; the default takes over where the policy's first decision does.
    assert env.default_sim.t == env.sim.t and env.default_sim.target == pytest.approx(100.0)
    assert env.default_sim.summary() == env.sim.summary()
    lean = np.array([1.0, -1.0, -1.0], dtype=np.float32)  # the highest target the step bound allows, no floor
    missed, default_missed = [], []
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(lean)
        plain.step(lean)
        missed.append(missed_share(env.stats, count_failed=False))
        default_missed.append(info["default_missed_share"])
        assert env.default_sim.t == env.sim.t and info["slo_multiplier"] == env.multiplier.value
    assert plain.sim.summary() == env.sim.summary()
    # The shadow is Knative's default on the very same trace: the same requests, another cost.
    shadow = env.default_sim.summary()
    assert shadow.requests == env.sim.summary().requests and shadow.cost != env.sim.summary().cost
    gap = 100 * float(np.mean(np.array(missed) - np.array(default_missed)))
    before = env.multiplier.value
    env.multiplier.update()
    assert env.multiplier.gap_ema_points == pytest.approx(gap)
    assert (env.multiplier.value > before) == (gap + config.constraint.margin_points > 0)
