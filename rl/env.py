"""A thin `gymnasium.Env` over the simulator (needs the `train` extra: gymnasium)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from agentkube.rl.episodes import DECISION_INTERVAL_S, RewardWeights, reward, warm_pods
from agentkube.rl.observation import OBSERVATION_FIELDS, ActionBounds, bounded_target, decision_from_action
from agentkube.rl.simulator import SimConfig, Simulator
from agentkube.rl.traces import WORKLOADS, Trace, training_trace

__all__ = ["EnvConfig", "AutoscalingEnv"]


@dataclass(frozen=True)
class EnvConfig:
    """Episodes are `episode_s` windows, at random offsets, of training traces only."""

    workloads: tuple[str, ...] = tuple(sorted(WORKLOADS))
    traces_per_workload: int = 2
    trace_days: float = 1.0
    episode_s: int = 4 * 3600
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
        cfg = self.config
        self.traces = list(traces) if traces is not None else [
            training_trace(w, i, cfg.trace_days * 86_400) for w in cfg.workloads for i in range(cfg.traces_per_workload)
        ]
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (len(OBSERVATION_FIELDS),), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.sim = Simulator(cfg.sim)
        self.spot_allowed = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        cfg = self.config
        trace = self.traces[int(self.np_random.integers(len(self.traces)))]
        start = float(self.np_random.uniform(0.0, max(trace.duration_s - cfg.episode_s, 0.0)))
        window = trace.window(start, cfg.episode_s)
        self.spot_allowed = bool(self.np_random.random() < cfg.spot_probability)
        target = float(cfg.bounds.min_target * (cfg.bounds.max_target / cfg.bounds.min_target) ** self.np_random.random())
        self.sim.reset(window, seed=int(self.np_random.integers(2**31)), target=target,
                       ready_pods=warm_pods(window, cfg.sim, target))
        stats = self.sim.advance(cfg.interval_s)
        return self.sim.observation(stats, self.spot_allowed, cfg.bounds), {"trace": window.name}

    def step(self, action):
        cfg = self.config
        decision = decision_from_action(action, cfg.bounds, self.spot_allowed)
        self.sim.set_target(bounded_target(self.sim.target, decision.target, cfg.bounds))
        self.sim.set_spot_share(decision.spot_share)
        stats = self.sim.advance(cfg.interval_s)
        observation = self.sim.observation(stats, self.spot_allowed, cfg.bounds)
        info = {"cost": stats.cost, "arrivals": stats.arrivals, "within_slo": stats.within_slo, "failed": stats.failed}
        return observation, reward(stats, cfg.sim, cfg.weights), False, self.sim.done, info
