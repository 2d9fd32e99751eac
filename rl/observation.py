"""What a policy sees and what it decides, as pure functions shared by training and the operator.

The observation is built from metrics under Knative's Prometheus names, so the simulator (which reports
them, `Simulator.knative_metrics`) and the operator's live loop (which queries them) feed policies the
same vector. The action is three numbers in [-1, 1]: the per-pod concurrency target (log-scaled between
`ActionBounds.min_target` and `max_target`), the share of replicas on spot capacity, and a floor of warm
pods (Knative's `min-scale`) as a share of the pods the last 10 minutes' peak needed (`warm_pod_floor`).
A policy exported with two outputs (before the floor) runs with no floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

# NumPy is imported by the functions that build or read arrays, not here: the operator imports this module's
# vocabulary (the metric names, bounds, `Decision`) on the shard that serves models, and loads NumPy (~15 MiB
# resident with OpenBLAS) only when a `policy: ppo` ServedModel's first decision runs.
if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "KNATIVE_METRICS",
    "WORKLOAD_METRICS",
    "POLICY_METRICS",
    "METRIC_SERIES",
    "OBSERVATION_FIELDS",
    "ActionBounds",
    "Decision",
    "MissingMetricError",
    "observation_from_metrics",
    "decision_from_action",
    "action_from_decision",
    "bounded_target",
    "warm_pod_floor",
    "SLOConfig",
]

SECONDS_PER_DAY = 86_400.0


# Here rather than beside the simulator that scores requests against it (which re-exports it): the observation
# normalises p95 latency by its `reference_latency_s`, and the operator reads that default without the simulator.
@dataclass(frozen=True)
class SLOConfig:
    """A request meets its SLO when its latency ≤ `first_token_s + per_output_token_s × response tokens`
    (a time-to-first-token budget plus a per-token budget, as LLM serving SLOs are usually stated)."""

    first_token_s: float = 2.0
    per_output_token_s: float = 0.1
    # The latency a typical request may take; the observation normalises p95 latency by it.
    reference_latency_s: float = 30.0

    def budget_s(self, response_tokens):
        return self.first_token_s + self.per_output_token_s * response_tokens


# The metrics the observation needs, under Knative's names, and the PromQL that yields each value for
# one revision (`{rev}` is a label matcher such as namespace_name="x",revision_name="y"). These are the
# OpenCensus-era names; Knative releases that export OpenTelemetry metrics renamed them (for example
# autoscaler_actual_pods -> kn_revision_pods_count, latencies in seconds): map those onto these keys.
KNATIVE_METRICS: dict[str, str] = {
    "revision_app_request_count": "sum(rate(revision_app_request_count{{{rev}}}[1m]))",  # requests/s
    "revision_app_request_latencies": (  # p95, milliseconds
        "histogram_quantile(0.95, sum by (le) (rate(revision_app_request_latencies_bucket{{{rev}}}[1m])))"
    ),
    "autoscaler_stable_request_concurrency": "sum(autoscaler_stable_request_concurrency{{{rev}}})",
    "autoscaler_panic_request_concurrency": "sum(autoscaler_panic_request_concurrency{{{rev}}})",
    "autoscaler_actual_pods": "sum(autoscaler_actual_pods{{{rev}}})",
    "autoscaler_not_ready_pods": "sum(autoscaler_not_ready_pods{{{rev}}})",
}

# What tells one workload from another, over the last minutes to an hour, from the same series: the
# request rate over 10 minutes and an hour, the spread of per-minute rates over the hour (daily cycle,
# bursts, crowds), the peak of Knative's 6 s panic concurrency against its 60 s stable concurrency over
# 10 minutes (burstiness at the scale that overfills pods before new ones start), and the stable
# concurrency over 10 minutes (with the rate: seconds per request, by Little's law, so token lengths and
# server speed show without a model-server metric). The simulator computes each the way Prometheus
# does (`Simulator.knative_metrics`), and the operator sends exactly these queries.
WORKLOAD_METRICS: dict[str, str] = {
    "request_rate_10m": "sum(rate(revision_app_request_count{{{rev}}}[10m]))",
    "request_rate_1h": "sum(rate(revision_app_request_count{{{rev}}}[1h]))",
    "request_rate_stddev_1h": "stddev_over_time(sum(rate(revision_app_request_count{{{rev}}}[1m]))[1h:1m])",
    "peak_concurrency_10m": "max_over_time(sum(autoscaler_panic_request_concurrency{{{rev}}})[10m:15s])",
    "mean_concurrency_10m": "avg_over_time(sum(autoscaler_stable_request_concurrency{{{rev}}})[10m:15s])",
}
# Every input of the observation, and the raw series each is computed from (its freshness is theirs).
POLICY_METRICS: dict[str, str] = KNATIVE_METRICS | WORKLOAD_METRICS
METRIC_SERIES: dict[str, str] = {name: name for name in KNATIVE_METRICS} | {
    "revision_app_request_latencies": "revision_app_request_latencies_bucket",
    "request_rate_10m": "revision_app_request_count",
    "request_rate_1h": "revision_app_request_count",
    "request_rate_stddev_1h": "revision_app_request_count",
    "peak_concurrency_10m": "autoscaler_panic_request_concurrency",
    "mean_concurrency_10m": "autoscaler_stable_request_concurrency",
}

OBSERVATION_FIELDS = (
    "log_request_rate",
    "log_stable_concurrency",
    "log_panic_concurrency",
    "p95_latency_over_reference",
    "log_ready_pods",
    "log_pending_pods",
    "spot_share",
    "time_of_day_sin",
    "time_of_day_cos",
    "log_target",
    "concurrency_per_pod_over_target",
    "spot_allowed",
    "log_request_rate_10m",
    "log_request_rate_1h",
    "request_rate_cv_1h",
    "log_concurrency_peak_over_mean_10m",
    "log_seconds_per_request_10m",
)


class MissingMetricError(ValueError):
    """A metric the observation needs is absent or not a finite number."""


@dataclass(frozen=True)
class ActionBounds:
    min_target: float = 10.0
    max_target: float = 400.0
    target_utilization: float = 0.7  # Knative's; per-pod load is compared with target × utilisation
    # The largest change of the target one decision may make, as a fraction of the target in force: the
    # operator enforces it (the ServedModel's `autoscaling.ppo.maxChangeFraction`, default 0.5), so
    # training and evaluation enforce the same, or the policy would learn jumps it never gets to make.
    max_change_fraction: float = 0.5
    # The warm-pod floor holds at most the pods the last 10 minutes' peak needed (share 1): more would
    # be a second, coarser way to lower the target; less lets a burst that comes back find pods warm.
    max_warm_share: float = 1.0


@dataclass(frozen=True)
class Decision:
    """A policy's choice: the `autoscaling.knative.dev/target` annotation, the spot share, and the warm-pod
    floor as a share of the last 10 minutes' peak pods (0: no floor, Knative's own behaviour)."""

    target: float
    spot_share: float
    warm_share: float = 0.0


def _finite(metrics: Mapping[str, float], name: str, allow_nan: bool = False) -> float:
    if name not in metrics:
        raise MissingMetricError(f"metric {name} is missing")
    value = float(metrics[name])
    if math.isnan(value) and allow_nan:
        return 0.0
    if not math.isfinite(value) or value < 0:
        raise MissingMetricError(f"metric {name} is {value!r}")
    return value


def observation_from_metrics(
    metrics: Mapping[str, float],
    *,
    target: float,
    time_of_day_s: float,
    reference_latency_s: float,
    spot_pods: float = 0.0,
    spot_allowed: bool = False,
    bounds: ActionBounds = ActionBounds(),
) -> np.ndarray:
    """The policy's observation from one revision's metrics (keys: `POLICY_METRICS`, values in the
    units noted there; a NaN p95 — no requests — counts as zero), the target in force, the wall-clock
    time of day, the SLO's reference latency and the number of ready pods on spot."""
    rate = _finite(metrics, "revision_app_request_count")
    p95_s = _finite(metrics, "revision_app_request_latencies", allow_nan=True) / 1000.0
    stable = _finite(metrics, "autoscaler_stable_request_concurrency")
    panic = _finite(metrics, "autoscaler_panic_request_concurrency")
    ready = _finite(metrics, "autoscaler_actual_pods")
    pending = _finite(metrics, "autoscaler_not_ready_pods")
    rate_10m = _finite(metrics, "request_rate_10m")
    rate_1h = _finite(metrics, "request_rate_1h")
    rate_stddev_1h = _finite(metrics, "request_rate_stddev_1h", allow_nan=True)
    peak_10m = _finite(metrics, "peak_concurrency_10m")
    mean_10m = _finite(metrics, "mean_concurrency_10m")
    phase = 2.0 * math.pi * (time_of_day_s % SECONDS_PER_DAY) / SECONDS_PER_DAY
    per_pod_target = max(target * bounds.target_utilization, 0.01)
    import numpy as np

    return np.array(
        [
            math.log1p(rate) / 5.0,
            math.log1p(stable) / 6.0,
            math.log1p(panic) / 6.0,
            min(p95_s / reference_latency_s, 5.0),
            math.log1p(ready) / 4.0,
            math.log1p(pending) / 4.0,
            spot_pods / ready if ready > 0 else 0.0,
            math.sin(phase),
            math.cos(phase),
            math.log(target / bounds.min_target) / math.log(bounds.max_target / bounds.min_target),
            min(stable / max(ready, 1.0) / per_pod_target, 5.0),
            1.0 if spot_allowed else 0.0,
            math.log1p(rate_10m) / 5.0,
            math.log1p(rate_1h) / 5.0,
            min(rate_stddev_1h / rate_1h, 3.0) if rate_1h > 0.01 else 0.0,
            min(max(math.log1p(peak_10m) - math.log1p(mean_10m), 0.0), 3.0),
            math.log1p(mean_10m / rate_10m) / 4.0 if rate_10m > 0.01 else 0.0,
        ],
        dtype=np.float32,
    )


def decision_from_action(action: np.ndarray, bounds: ActionBounds = ActionBounds(), spot_allowed: bool = True) -> Decision:
    """Map an action in [-1, 1]^3 to a target (log scale), a spot share (0 when spot is not allowed) and
    a warm share (linear, -1 = no floor; 0 for an action without the third number)."""
    import numpy as np

    a = np.clip(np.asarray(action, dtype=float).reshape(-1), -1.0, 1.0)
    fraction = (a[0] + 1.0) / 2.0
    target = bounds.min_target * (bounds.max_target / bounds.min_target) ** fraction
    spot_share = (a[1] + 1.0) / 2.0 if spot_allowed and a.size > 1 else 0.0
    warm_share = bounds.max_warm_share * (a[2] + 1.0) / 2.0 if a.size > 2 else 0.0
    return Decision(float(target), float(spot_share), float(warm_share))


def bounded_target(current: float, proposed: float, bounds: ActionBounds = ActionBounds()) -> float:
    """`proposed`, moved at most `max_change_fraction` of `current` away from it and kept in the bounds."""
    step = bounds.max_change_fraction * current
    return min(max(proposed, current - step, bounds.min_target), current + step, bounds.max_target)


def warm_pod_floor(warm_share: float, peak_concurrency_10m: float, target: float, bounds: ActionBounds = ActionBounds()) -> int:
    """The `min-scale` a warm share asks for: that share of the pods the last 10 minutes' peak concurrency
    (Knative's 6 s panic average, `peak_concurrency_10m`) needed at `target` and Knative's utilisation,
    rounded up. A floor tied to the recent peak (not to the pods running, which it raises itself) keeps
    capacity warm for a burst that returns without ratcheting up; 0 when the share is 0 or no traffic."""
    share = min(max(float(warm_share), 0.0), bounds.max_warm_share)
    per_pod = max(target * bounds.target_utilization, 0.01)
    if share <= 0.0 or not math.isfinite(peak_concurrency_10m) or peak_concurrency_10m <= 0.0:
        return 0
    # A hair under a whole pod rounds down: float noise must not hold an extra pod.
    return max(math.ceil(share * peak_concurrency_10m / per_pod - 1e-9), 0)


def action_from_decision(decision: Decision, bounds: ActionBounds = ActionBounds()) -> np.ndarray:
    """The inverse of `decision_from_action` (targets and warm shares outside the bounds are clipped)."""
    target = min(max(decision.target, bounds.min_target), bounds.max_target)
    fraction = math.log(target / bounds.min_target) / math.log(bounds.max_target / bounds.min_target)
    warm = min(max(decision.warm_share, 0.0), bounds.max_warm_share) / bounds.max_warm_share
    import numpy as np

    return np.array([2.0 * fraction - 1.0, 2.0 * decision.spot_share - 1.0, 2.0 * warm - 1.0], dtype=np.float32)
