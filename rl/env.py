"""A thin `gymnasium.Env` over the simulator (needs the `train` extra: gymnasium).

By default every episode draws a fresh workload and server from `workloads.TrainingRanges` and
generates its trace at a random time of day; given `traces`, episodes are windows of those instead."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from agentkube.rl.episodes import DECISION_INTERVAL_S, RewardWeights, reward, warm_pods
from agentkube.rl.observation import OBSERVATION_FIELDS, ActionBounds, bounded_target, decision_from_action
from agentkube.rl.simulator import SimConfig, Simulator
from agentkube.rl.traces import SECONDS_PER_DAY, Trace, generate_trace
from agentkube.rl.workloads import TrainingRanges, sample_training_workload

__all__ = ["EnvConfig", "AutoscalingEnv"]


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


class AutoscalingEnv(gym.Env):
    """Observation: `OBSERVATION_FIELDS`; action: [target, spot share] in [-1, 1]^2 (see `observation`).
    The target a step sets is bounded as the operator bounds it (`observation.bounded_target`)."""

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, traces: Sequence[Trace] | None = None) -> None:
        self.config = config or EnvConfig()
        self.traces = list(traces) if traces is not None else None
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (len(OBSERVATION_FIELDS),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.sim = Simulator(self.config.sim)
        self.spot_allowed = False

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
        self.sim.reset(trace, seed=int(self.np_random.integers(2**31)), target=target,
                       ready_pods=warm_pods(trace, sim_config, target))
        self.sim.advance(cfg.lead_in_s)
        stats = self.sim.advance(cfg.interval_s)
        return self.sim.observation(stats, self.spot_allowed, cfg.bounds), {"trace": trace.name}

    def step(self, action):
        cfg = self.config
        decision = decision_from_action(action, cfg.bounds, self.spot_allowed)
        self.sim.set_target(bounded_target(self.sim.target, decision.target, cfg.bounds))
        self.sim.set_spot_share(decision.spot_share)
        stats = self.sim.advance(cfg.interval_s)
        observation = self.sim.observation(stats, self.spot_allowed, cfg.bounds)
        info = {"cost": stats.cost, "arrivals": stats.arrivals, "within_slo": stats.within_slo, "failed": stats.failed}
        return observation, reward(stats, self.sim.config, cfg.weights), False, self.sim.done, info
