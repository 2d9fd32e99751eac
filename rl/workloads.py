"""Workload families: the randomised ones PPO trains on, and held-out ones it never sees.

Training draws a fresh workload for every episode from wide ranges (`TrainingRanges`): mean rate,
inter-arrival CV, daily amplitude, flash crowds, erratic bursts, a token-length family, and the model
server's speed and cold-start time. A policy trained on three fixed profiles learns those three; one
trained on the ranges has to read the workload from its observation (`observation.WORKLOAD_METRICS`).

The held-out families (`HELD_OUT_FAMILIES`) test that: some lie outside the training ranges (a
rate of 60 req/s, an inter-arrival CV of 3.5, a deeper daily trough), others come from processes the
training generator never uses (a Markov-modulated Poisson process, a heavy-tailed on/off source,
long-context requests). Their seeds come from a spawn key of their own, disjoint from training's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from agentkube.rl.simulator import SimConfig
from agentkube.rl.traces import (
    SECONDS_PER_DAY,
    WORKLOADS,
    Trace,
    WorkloadProfile,
    generate_trace,
    trace_from_rate,
    training_trace,
)

__all__ = [
    "TOKEN_FAMILIES",
    "TrainingRanges",
    "sample_training_workload",
    "HELD_OUT_FAMILIES",
    "held_out_trace",
    "trace_shape",
    "closest_workload",
]

# Token-length families (request Zipf–Mandelbrot exponent and offset; response base, slope and spread).
TOKEN_FAMILIES: dict[str, dict[str, float]] = {
    "chat": dict(zipf_exponent=2.0, zipf_offset=250.0, response_base_tokens=120.0, response_slope=0.165, response_sigma=0.6),
    "short": dict(zipf_exponent=2.6, zipf_offset=80.0, response_base_tokens=40.0, response_slope=0.1, response_sigma=0.5),
    "long-answers": dict(zipf_exponent=2.2, zipf_offset=150.0, response_base_tokens=350.0, response_slope=0.2, response_sigma=0.7),
}


@dataclass(frozen=True)
class TrainingRanges:
    """What one training episode's workload and server are drawn from (uniform, rate log-uniform)."""

    mean_rate_rps: tuple[float, float] = (1.0, 40.0)
    interarrival_cv: tuple[float, float] = (1.0, 3.0)
    daily_amplitude: tuple[float, float] = (0.0, 0.9)
    flash_crowds_per_day: tuple[float, float] = (0.0, 12.0)
    erratic_bursts_per_day: tuple[float, float] = (0.0, 8.0)
    # Both decode-step terms scale together: a faster or slower GPU/model pair, same batching curve.
    server_speed: tuple[float, float] = (0.7, 1.4)
    model_load_s: tuple[float, float] = (10.0, 40.0)
    # Share of episodes with no flash crowds or bursts at all (a plain daily cycle): without them the
    # draws would almost never be calm, and a calm day is where a high target pays most.
    calm_share: float = 0.25


def sample_training_workload(
    rng: np.random.Generator, ranges: TrainingRanges = TrainingRanges(), base: SimConfig = SimConfig(),
) -> tuple[WorkloadProfile, SimConfig]:
    """One episode's workload profile and simulator configuration."""

    def uniform(bounds: tuple[float, float]) -> float:
        return float(rng.uniform(*bounds))

    low, high = ranges.mean_rate_rps
    calm = rng.random() < ranges.calm_share
    family = TOKEN_FAMILIES[sorted(TOKEN_FAMILIES)[int(rng.integers(len(TOKEN_FAMILIES)))]]
    profile = WorkloadProfile(
        mean_rate_rps=float(math.exp(rng.uniform(math.log(low), math.log(high)))),
        interarrival_cv=uniform(ranges.interarrival_cv),
        daily_amplitude=uniform(ranges.daily_amplitude),
        flash_crowds_per_day=0.0 if calm else uniform(ranges.flash_crowds_per_day),
        erratic_bursts_per_day=0.0 if calm else uniform(ranges.erratic_bursts_per_day),
        **family,  # type: ignore[arg-type]
    )
    speed = uniform(ranges.server_speed)
    server = replace(base.server, base_step_s=base.server.base_step_s / speed,
                     per_request_step_s=base.server.per_request_step_s / speed)
    cold_start = replace(base.cold_start, model_load_s=uniform(ranges.model_load_s))
    return profile, replace(base, server=server, cold_start=cold_start)


# ---------------------------------------------------------------------------------------- held out
_HELD_OUT_SPLIT = 2  # spawn-key split of held-out traces (training traces are 0, evaluation traces 1)


def _markov_modulated_rate(rng: np.random.Generator, seconds: int, rates: tuple[float, ...], mean_sojourn_s: float) -> np.ndarray:
    """A continuous-time Markov chain over `rates` (uniform jumps to another state, exponential stays)."""
    rate = np.empty(seconds)
    t, state = 0, int(rng.integers(len(rates)))
    while t < seconds:
        stay = max(1, int(rng.exponential(mean_sojourn_s)))
        rate[t : t + stay] = rates[state]
        t += stay
        state = (state + 1 + int(rng.integers(len(rates) - 1))) % len(rates)
    return rate


def _pareto_on_off_rate(
    rng: np.random.Generator, seconds: int, on_rps: float, off_rps: float, alpha: float, min_on_s: float, min_off_s: float,
) -> np.ndarray:
    """A heavy-tailed on/off source: Pareto(alpha) on and off periods (alpha < 2: infinite variance)."""
    rate = np.empty(seconds)
    t, on = 0, bool(rng.random() < 0.5)
    while t < seconds:
        period = int((min_on_s if on else min_off_s) * (1.0 + rng.pareto(alpha)))
        rate[t : t + max(period, 1)] = on_rps if on else off_rps
        t += max(period, 1)
        on = not on
    return rate


def _mmpp(rng: np.random.Generator, seconds: int) -> Trace:
    # Poisson within a state (CV 1): the burstiness is all in the state changes, every ~10 minutes.
    rate = _markov_modulated_rate(rng, seconds, (3.0, 10.0, 30.0), 600.0)
    return trace_from_rate(rate, WorkloadProfile(interarrival_cv=1.0), rng, "mmpp")


def _on_off(rng: np.random.Generator, seconds: int) -> Trace:
    rate = _pareto_on_off_rate(rng, seconds, on_rps=25.0, off_rps=2.0, alpha=1.4, min_on_s=120.0, min_off_s=300.0)
    return trace_from_rate(rate, WorkloadProfile(interarrival_cv=1.2), rng, "on-off-pareto")


def _profile_family(profile: WorkloadProfile, name: str) -> Callable[[np.random.Generator, int], Trace]:
    def make(rng: np.random.Generator, seconds: int) -> Trace:
        return generate_trace(profile, int(rng.integers(2**63)), seconds, start_day=2, name=name)

    return make


HELD_OUT_FAMILIES: dict[str, Callable[[np.random.Generator, int], Trace]] = {
    "mmpp": _mmpp,
    "on-off-pareto": _on_off,
    # Outside the training ranges:
    "high-rate": _profile_family(WorkloadProfile(mean_rate_rps=60.0, interarrival_cv=1.5, daily_amplitude=0.6), "high-rate"),
    "very-bursty": _profile_family(WorkloadProfile(mean_rate_rps=20.0, interarrival_cv=3.5, daily_amplitude=0.3,
                                                   erratic_bursts_per_day=10.0), "very-bursty"),
    "low-rate-deep-trough": _profile_family(WorkloadProfile(mean_rate_rps=2.5, interarrival_cv=1.3, daily_amplitude=0.97),
                                            "low-rate-deep-trough"),
    # Another token-length family: long prompts (retrieval-augmented), short answers.
    "long-context": _profile_family(WorkloadProfile(mean_rate_rps=8.0, interarrival_cv=1.8, daily_amplitude=0.5,
                                                    zipf_exponent=1.6, zipf_offset=2500.0, response_base_tokens=60.0,
                                                    response_slope=0.02, response_sigma=0.5), "long-context"),
}


def held_out_trace(family: str, index: int = 0, duration_s: float = SECONDS_PER_DAY, base_seed: int = 2026) -> Trace:
    """The `index`-th trace of a held-out family (seeds disjoint from training's and evaluation's)."""
    key = sorted(HELD_OUT_FAMILIES).index(family)
    rng = np.random.default_rng(np.random.SeedSequence(base_seed, spawn_key=(_HELD_OUT_SPLIT, key, index)))
    trace = HELD_OUT_FAMILIES[family](rng, int(math.ceil(duration_s)))
    return replace(trace, name=f"{family}-{index}")


# ------------------------------------------------------------------------------ closest workload
def trace_shape(trace: Trace) -> np.ndarray:
    """What a user looking at a trace would compare workloads by: log mean rate, the CV of the
    per-minute request rate (daily cycle, bursts and crowds all raise it), and the log of the busiest
    minutes' rate (99th percentile) over the median minute's (crowds and bursts raise it, a smooth
    daily cycle hardly)."""
    minutes = max(int(trace.duration_s // 60), 1)
    per_minute = np.bincount(np.minimum(trace.arrival_s.astype(np.int64) // 60, minutes - 1), minlength=minutes)
    mean = per_minute.mean() / 60.0
    peak = math.log((np.percentile(per_minute, 99) + 1.0) / (np.median(per_minute) + 1.0))
    return np.array([math.log(max(mean, 1e-3)), per_minute.std() / max(per_minute.mean(), 1e-9), peak])


def closest_workload(trace: Trace, references: dict[str, Trace] | None = None) -> str:
    """The training workload (`WORKLOADS`) whose first training trace has the nearest shape; the one a
    user would tune a static target or a rule on."""
    references = references or {name: training_trace(name, 0) for name in sorted(WORKLOADS)}
    shape = trace_shape(trace)
    return min(references, key=lambda name: float(np.linalg.norm(trace_shape(references[name]) - shape)))
