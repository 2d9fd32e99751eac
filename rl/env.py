"""A thin `gymnasium.Env` over the simulator (needs the `train` extra: gymnasium).

By default every episode draws a fresh workload and server from `workloads.TrainingRanges` and
generates its trace at a random time of day; given `traces`, episodes are windows of those instead.

With a constraint (`EnvConfig.constraint`, see `constraint.py`), each episode also runs Knative's
default on the same trace, server and seed beside the policy (the shadow); its missed share per
interval enters the reward and the multiplier, never the observation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import gymnasium as gym
import numpy as np

from agentkube.rl.constraint import ConstraintConfig, SLOMultiplier
from agentkube.rl.episodes import DECISION_INTERVAL_S, RewardWeights, apply_decision, missed_share, reward, warm_pods
from agentkube.rl.observation import OBSERVATION_FIELDS, ActionBounds, decision_from_action
from agentkube.rl.simulator import IntervalStats, SimConfig, Simulator
from agentkube.rl.traces import SECONDS_PER_DAY, Trace, generate_trace
from agentkube.rl.workloads import TrainingRanges, sample_training_workload

__all__ = ["EnvConfig", "AutoscalingEnv", "ACTION_SIZE"]

ACTION_SIZE = 3  # target, spot share, warm share (`observation.decision_from_action`)


@dataclass(frozen=True)
class EnvConfig:
    """Episodes of `episode_s`, each after `lead_in_s` run under the starting target (so the windowed
    workload features have history, as they have in a revision that has been running)."""

    ranges: TrainingRanges = field(default_factory=TrainingRanges)
    episode_s: int = 4 * 3600
    lead_in_s: int = 1800
    interval_s: int = DECISION_INTERVAL_S
    spot_probability: float = 0.5  # share of episodes in which spot capacity is allowed
    sim: SimConfig = field(default_factory=SimConfig)
    bounds: ActionBounds = field(default_factory=ActionBounds)
    weights: RewardWeights = field(default_factory=RewardWeights)
    warm_floor: bool = True  # the warm share is an action (False: target and spot share only, no floor)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)  # "none": the fixed weight alone

    @property
    def action_size(self) -> int:
        return ACTION_SIZE if self.warm_floor else ACTION_SIZE - 1


class AutoscalingEnv(gym.Env):
    """Observation: `OBSERVATION_FIELDS`; action: [target, spot share, warm share] in [-1, 1]^3 (see
    `observation`). A step puts it in force as the operator does (`episodes.apply_decision`)."""

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, traces: Sequence[Trace] | None = None,
                 multiplier: SLOMultiplier | None = None, probe: bool = False) -> None:
        """`multiplier`: the training's shared λ (one per environment copy would drift apart); a lone env
        keeps its own. `probe`: this env measures the constraint (runs Knative's default beside the policy
        and records each interval's gap in the multiplier); the training's own envs run the default only
        when the reward needs it (mode `excess`)."""
        self.config = config or EnvConfig()
        constraint = self.config.constraint
        self.multiplier = multiplier or (SLOMultiplier(constraint) if constraint.active else None)
        self.probe = probe and self.multiplier is not None
        self.runs_default = self.probe or constraint.mode == "excess"
        self.default_sim: Simulator | None = None  # Knative's default on the same episode
        self.traces = list(traces) if traces is not None else None
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (len(OBSERVATION_FIELDS),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.config.action_size,), np.float32)
        self.sim = Simulator(self.config.sim)
        self.spot_allowed = False
        self.stats: IntervalStats | None = None  # the last interval's (the floor is computed from its metrics)

    def _episode(self) -> tuple[Trace, SimConfig]:
        cfg, rng = self.config, self.np_random
        length = cfg.lead_in_s + cfg.episode_s
        if self.traces is not None:
            trace = self.traces[int(rng.integers(len(self.traces)))]
            start = float(rng.uniform(0.0, max(trace.duration_s - length, 0.0)))
            return trace.window(start, length), cfg.sim
        profile, sim_config = sample_training_workload(rng, cfg.ranges, cfg.sim)
        trace = generate_trace(profile, int(rng.integers(2**63)), length, start_day=int(rng.integers(7)),
                               name="randomised", start_time_of_day_s=float(rng.uniform(0.0, SECONDS_PER_DAY)))
        return trace, sim_config

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        cfg = self.config
        trace, sim_config = self._episode()
        self.sim = Simulator(sim_config)
        self.spot_allowed = bool(self.np_random.random() < cfg.spot_probability)
        target = float(cfg.bounds.min_target * (cfg.bounds.max_target / cfg.bounds.min_target) ** self.np_random.random())
        episode_seed = int(self.np_random.integers(2**31))  # drawn in this order since the shipped policy
        self.sim.reset(trace, seed=episode_seed, target=target, ready_pods=warm_pods(trace, sim_config, target))
        self.sim.advance(cfg.lead_in_s)
        if self.runs_default:
            # The default's run starts from the policy's state (the same lead-in, seed and so cold-start
            # draws) and takes over where the policy's first decision does: the gap is the policy's doing.
            self.default_sim = Simulator(sim_config)
            self.default_sim.reset(trace, seed=episode_seed, target=target, ready_pods=warm_pods(trace, sim_config, target))
            self.default_sim.advance(cfg.lead_in_s + cfg.interval_s)
            self.default_sim.set_target(None)
        self.stats = self.sim.advance(cfg.interval_s)
        return self.sim.observation(self.stats, self.spot_allowed, cfg.bounds), {"trace": trace.name}

    def step(self, action):
        cfg = self.config
        if self.stats is None:
            raise RuntimeError("step before reset")
        decision = decision_from_action(action, cfg.bounds, self.spot_allowed)
        apply_decision(self.sim, decision, self.stats, self.spot_allowed, cfg.bounds)
        stats = self.stats = self.sim.advance(cfg.interval_s)
        observation = self.sim.observation(stats, self.spot_allowed, cfg.bounds)
        info = {"cost": stats.cost, "arrivals": stats.arrivals, "within_slo": stats.within_slo, "failed": stats.failed}
        if self.multiplier is None:
            return observation, reward(stats, self.sim.config, cfg.weights), False, self.sim.done, info
        weights = replace(cfg.weights, slo_miss=self.multiplier.value)
        info["slo_multiplier"] = self.multiplier.value
        excess_over = 0.0  # slow requests only: the default runs on on-demand, spot failures cost `weights.failed`
        if self.default_sim is not None:
            default_missed = missed_share(self.default_sim.advance(cfg.interval_s), count_failed=False)
            info["default_missed_share"] = default_missed
            if self.probe:
                self.multiplier.record(missed_share(stats, count_failed=False), default_missed)
            if cfg.constraint.mode == "excess":
                excess_over = default_missed
        return observation, reward(stats, self.sim.config, weights, excess_over), False, self.sim.done, info
