"""Training for cost at Knative's default's SLO attainment: a constraint, not a fixed exchange rate.

A fixed reward weight (`RewardWeights.slo_miss`) names a price for a point of attainment; the goal names
no price, only a floor (no lower attainment than Knative's default). With the simulator a day in under
a second, each training episode can run Knative's default on the very same trace, server and seed
beside the policy (`env.AutoscalingEnv`, the "shadow"), so every interval has the default's missed share
to compare with. Only the reward and the multiplier use it: the policy's observation stays what the live
loop sees.

Two shapes of the SLO term (`ConstraintConfig.mode`), both with the multiplier λ adapted between
rollouts (constrained PPO, Lagrangian relaxation) so that the policy's missed share averages at least
`margin_points` below the default's:

- `lagrangian`: the usual term, λ × the interval's missed share (× its pods, at least one);
- `excess`: only the misses beyond the default's in that interval cost (λ × max(missed − default's, 0)):
  a burst that Knative's default misses too is not the policy's to pay for, so it may stay lean there.

`none` is the fixed weight the shipped policy was trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["CONSTRAINT_MODES", "ConstraintConfig", "SLOMultiplier", "next_multiplier"]

CONSTRAINT_MODES = ("none", "lagrangian", "excess")


@dataclass(frozen=True)
class ConstraintConfig:
    mode: str = "none"
    initial: float = 40.0  # where λ starts: the fixed weight that held the default's attainment (RewardWeights)
    # λ × exp(rate × gap) per rollout, the gap in points of missed share (EMA): 0.1 point over the
    # default's raises λ by 5% per rollout (2,048 decisions), about ×2.7 over 20 rollouts.
    rate_per_point: float = 0.5
    # The per-rollout gap is noisy (each rollout is a handful of randomised 4-hour episodes); the EMA
    # spans about ten rollouts so one burst does not swing λ.
    ema: float = 0.1
    # Aim this far under the default's missed share on average: the goal asks for no lower attainment
    # on every trace, and the average over training workloads hides a spread between them.
    margin_points: float = 0.02
    # At most ×/÷1.05 per rollout: early on, λ would otherwise race to a bound on a policy that is still
    # learning; 50 rollouts (of ~1,000 in 2M steps) move it tenfold.
    max_step: float = 0.05
    # The constraint is measured on the deterministic policy (what is exported), in a probe env run for
    # this many decisions after each rollout: the sampled actions' exploration noise alone (±0.3 on the
    # target) misses points more than the default, and is not what the operator runs.
    probe_steps: int = 512
    min_multiplier: float = 5.0
    max_multiplier: float = 400.0

    def __post_init__(self) -> None:
        if self.mode not in CONSTRAINT_MODES:
            raise ValueError(f"constraint mode must be one of {CONSTRAINT_MODES}, not {self.mode!r}")
        if not 0.0 < self.ema <= 1.0 or not 0.0 < self.min_multiplier <= self.initial <= self.max_multiplier:
            raise ValueError("need 0 < ema <= 1 and min_multiplier <= initial <= max_multiplier")

    @property
    def active(self) -> bool:
        return self.mode != "none"


def next_multiplier(multiplier: float, gap_points: float, config: ConstraintConfig) -> float:
    """λ after a rollout whose (smoothed) missed share was `gap_points` over the default's: up when the
    policy misses more than the default plus the margin allows, down when it holds it with room."""
    step = min(max(config.rate_per_point * (gap_points + config.margin_points), -config.max_step), config.max_step)
    return min(max(multiplier * math.exp(step), config.min_multiplier), config.max_multiplier)


@dataclass
class SLOMultiplier:
    """The λ shared by the environment copies of one training (they run in one process): the probe env
    `record`s each interval's gap, the training loop calls `update` after each rollout."""

    config: ConstraintConfig
    value: float = field(init=False)
    gap_ema_points: float | None = field(init=False, default=None)
    history: list[tuple[float, float]] = field(init=False, default_factory=list)  # (λ, gap EMA) per update
    _gaps: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.value = self.config.initial

    def record(self, missed_share: float, default_missed_share: float) -> None:
        self._gaps.append(missed_share - default_missed_share)

    def update(self) -> float:
        if not self._gaps:
            return self.value
        gap_points = 100.0 * sum(self._gaps) / len(self._gaps)
        self._gaps.clear()
        ema = gap_points if self.gap_ema_points is None else (
            (1.0 - self.config.ema) * self.gap_ema_points + self.config.ema * gap_points)
        self.gap_ema_points = ema
        self.value = next_multiplier(self.value, ema, self.config)
        self.history.append((round(self.value, 3), round(ema, 5)))
        return self.value
