"""Running a policy over a trace in the simulator, and the reward it is trained on.

A policy is any object with `decide(observation) -> Decision` (and optionally `reset()`): the exported
PPO policy, the baselines in `agentkube.rl.baselines`. Every policy is run by `run_episode`, so all of
them see exactly the same traces, seeds and decision interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agentkube.rl import knative
from agentkube.rl.observation import ActionBounds, Decision, bounded_target, warm_pod_floor
from agentkube.rl.server import decode_step_s
from agentkube.rl.simulator import EpisodeSummary, IntervalStats, SimConfig, Simulator
from agentkube.rl.traces import Trace

__all__ = ["Policy", "RewardWeights", "missed_share", "reward", "warm_pods", "apply_decision", "run_episode", "DECISION_INTERVAL_S"]

# How often the agent (and the operator's live loop) sets the target; Knative itself decides every 2 s.
DECISION_INTERVAL_S = 30


class Policy(Protocol):
    def decide(self, observation: np.ndarray) -> Decision: ...


@dataclass(frozen=True)
class RewardWeights:
    """reward = -(pods × (1 + slo_miss × missed share) + failed × failed share) / scale per decision interval.

    `pods` is the interval's cost in on-demand pod-equivalents (cost / on-demand price). The SLO term
    is relative to it: "missing the SLO for 1% of requests is as bad as running `slo_miss`% more pods",
    at 1 pod or at 30. Training draws rates from 1 to 40 requests/s, and an absolute weight (the
    earlier `pods + 60 × missed share`) made misses nearly free at high rates and dear at low ones; the
    goal is relative too (cost against the default at no lower SLO attainment).

    `slo_miss` = 40 ranks fixed targets the way the goal does: on the workloads' evaluation days
    Knative's default keeps 99.5–99.9% within the SLO, and the static target that keeps 99% costs
    11–16% less, about 16–19% per point of attainment given up; at 40% per point the reward prefers
    holding the default's attainment to that saving. Failed requests (lost to spot reclamation) weigh
    more than slow ones: the user sees an error.
    """

    slo_miss: float = 40.0
    failed: float = 1000.0
    scale: float = 10.0


def missed_share(stats: IntervalStats, count_failed: bool = True) -> float:
    """The interval's requests that missed their SLO (or failed, unless `count_failed` is False) over its
    arrivals."""
    requests = max(stats.arrivals, 1)
    missed = max(stats.admitted - stats.within_slo, 0) + (stats.failed if count_failed else 0.0)
    # Requests still queued at the end of the interval have waited since they arrived: count a queue
    # that outgrew the interval's arrivals as missed too, so the agent cannot hide a backlog.
    backlog = max(stats.arrivals - stats.admitted, 0)
    return min((missed + 0.5 * backlog) / requests, 1.0)


def reward(stats: IntervalStats, config: SimConfig, weights: RewardWeights = RewardWeights(),
           excess_over: float | None = None) -> float:
    """`excess_over`: Knative's default's missed share (failures apart) in the same interval on the same
    trace (constrained training, `constraint.py` mode `excess`): then only slow requests beyond it cost;
    failed ones cost `weights.failed` alone (the default runs on on-demand and loses none)."""
    hours = stats.seconds / 3600.0
    pods = stats.cost / (config.spot.on_demand_price_per_hour * hours) if hours else 0.0
    if excess_over is None:
        missed = missed_share(stats)
    else:
        missed = max(missed_share(stats, count_failed=False) - excess_over, 0.0)
    # At least one pod's worth: a revision scaled to zero while requests wait must not miss them for free.
    slo_cost = max(pods, 1.0) * weights.slo_miss * missed
    return -(pods + slo_cost + weights.failed * stats.failed / max(stats.arrivals, 1)) / weights.scale


def warm_pods(trace: Trace, config: SimConfig, target: float | None, lookahead_s: float = 120.0) -> int:
    """The pods a revision already running under `target` would have when the trace starts: the first
    minutes' concurrency (Little's law at that target's batch) over the effective target."""
    first = trace.arrival_s < lookahead_s
    if not first.any():
        return max(config.knative.initial_scale, config.knative.min_scale)
    rate = first.sum() / lookahead_s
    per_pod = knative.effective_target(config.knative.with_target(target))
    work = config.server.work_tokens(trace.request_tokens[first], trace.response_tokens[first]).mean()
    concurrency = rate * work * float(decode_step_s(config.server, per_pod))
    return max(1, math.ceil(concurrency / per_pod))


def apply_decision(sim: Simulator, decision: Decision, stats: IntervalStats, spot_allowed: bool,
                   bounds: ActionBounds = ActionBounds()) -> None:
    """Put a decision in force as the operator does: the target moved at most the bounded step, the spot
    share (0 when spot is not allowed), and the warm-pod floor from the last interval's 10-minute peak
    concurrency at the new target (`observation.warm_pod_floor`, the operator's formula)."""
    sim.set_target(bounded_target(sim.target, decision.target, bounds))
    sim.set_spot_share(decision.spot_share if spot_allowed else 0.0)
    sim.set_min_scale(warm_pod_floor(decision.warm_share, stats.metrics["peak_concurrency_10m"], sim.target, bounds))


def run_episode(
    policy: Policy,
    trace: Trace,
    config: SimConfig | None = None,
    *,
    seed: int = 0,
    spot_allowed: bool = False,
    interval_s: int = DECISION_INTERVAL_S,
    bounds: ActionBounds = ActionBounds(),
    weights: RewardWeights = RewardWeights(),
    initial_target: float | None = None,
    ready_pods: int | None = None,
    intervals: list[IntervalStats] | None = None,
) -> tuple[EpisodeSummary, Simulator, float]:
    """Run `policy` over `trace` from a warm revision; returns the summary, the simulator (with its
    per-second series) and the total reward. Each decision's target is bounded as the operator bounds
    it (`observation.bounded_target`: at most `bounds.max_change_fraction` away from the one in force).
    `ready_pods`: the warm pods at the start (default: `warm_pods`, what a revision running under the
    initial target would have). `intervals`: if given, every decision interval's stats are appended to it,
    the first one (under the initial target) included."""
    sim = Simulator(config)
    warm = warm_pods(trace, sim.config, initial_target) if ready_pods is None else ready_pods
    sim.reset(trace, seed=seed, target=initial_target, ready_pods=warm)
    if hasattr(policy, "reset"):
        policy.reset()
    total_reward = 0.0
    stats = sim.advance(interval_s)
    if intervals is not None:
        intervals.append(stats)
    while not sim.done:
        decision = policy.decide(sim.observation(stats, spot_allowed, bounds))
        apply_decision(sim, decision, stats, spot_allowed, bounds)
        stats = sim.advance(interval_s)
        if intervals is not None:
            intervals.append(stats)
        step_reward = reward(stats, sim.config, weights)
        total_reward += step_reward
        if hasattr(policy, "feedback"):  # learning baselines (Q-learning) update from it
            policy.feedback(step_reward)
    return sim.summary(), sim, total_reward
