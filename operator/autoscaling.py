"""The `policy: ppo` autoscaling decision, as pure functions: from what Prometheus returned (or why it
returned nothing) to the concurrency target to apply, the reason, and the `Autoscaling` condition.

Like Knative's own `Scale()`, the decision knows nothing of where the metrics came from or how the
result is applied: `agentkube.operator.prometheus` queries, `autoscaling_loop` records and patches. Everything here is
unit-tested without Prometheus or a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from agentkube.operator import api, servedmodel
from agentkube.operator.autoscaling_reasons import (  # noqa: F401 (the decision's vocabulary, named from here too)
    CONDITION,
    DECIDED,
    DECISION_FAILED,
    METRICS_MISSING,
    METRICS_STALE,
    PROMETHEUS_NOT_CONFIGURED,
    PROMETHEUS_UNREACHABLE,
    SLO_GUARD,
)
from agentkube.operator.sandbox import parse_duration
from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.observation import (
    METRIC_SERIES,
    POLICY_METRICS,
    ActionBounds,
    Decision,
    MissingMetricError,
    SLOConfig,
    bounded_target,
    observation_from_metrics,
    warm_pod_floor,
)

if TYPE_CHECKING:  # NumPy itself loads with the first policy decision (`rl.observation`)
    import numpy as np

# What a ServedModel falls back to when the policy cannot decide: the target Knative itself would use.
KNATIVE_DEFAULT_TARGET = int(KnativeDefaults.container_concurrency_target_default)
# A metric whose newest raw sample is older than this many decision intervals (or scrape-interval-sized
# floor) no longer describes the revision: the policy would act on a past that is gone.
STALE_AFTER_INTERVALS = 2.0
STALE_AFTER_MIN_S = 15.0

# The SLO guard reads the p95 latency over a window long enough that a few slow seconds do not trip it
# and short enough to catch a policy that has been running too lean for minutes.
GUARD_P95 = "guard_p95_latency_ms"
GUARD_WINDOW = "10m"
GUARD_QUERIES: dict[str, str] = {  # `{rev}` as in POLICY_METRICS
    GUARD_P95: "histogram_quantile(0.95, sum by (le) (rate(revision_app_request_latencies_bucket{{{rev}}}[" + GUARD_WINDOW + "])))",
}
# Once engaged, the guard lets the policy back only when the window's p95 is this far inside the SLO:
# the window still holds the lean minutes that tripped it, so releasing at the SLO itself would hand
# control back while the revision is only just recovering (and trip again a turn later).
GUARD_RELEASE_FRACTION = 0.8
# The raw series behind each input (the histogram's freshness is that of its buckets).
RAW_SERIES: dict[str, str] = METRIC_SERIES | {GUARD_P95: "revision_app_request_latencies_bucket"}


def revision_matcher(namespace: str, service: str) -> str:
    """The label matcher for every revision of one Knative Service, under Knative's metric labels."""
    return _matcher(OPENCENSUS_REVISION_LABELS, namespace, service)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def value_queries(matcher: str) -> dict[str, str]:
    """PromQL for each observation input (keyed as `POLICY_METRICS`, the policy's one list) and the guard's."""
    return {name: promql.format(rev=matcher) for name, promql in (POLICY_METRICS | GUARD_QUERIES).items()}


def age_queries(matcher: str) -> dict[str, str]:
    """PromQL for the age in seconds of each input's newest raw sample. An instant query answers with
    the latest sample within Prometheus' 5-minute lookback, so presence alone does not mean fresh."""
    return {name: f"time() - max(timestamp({series}{{{matcher}}}))" for name, series in RAW_SERIES.items()}


# Knative 1.19 (July 2025) replaced its OpenCensus metrics with OpenTelemetry ones: new names, seconds for
# durations, `k8s_namespace_name`/`kn_service_name` for the labels (as a Prometheus scrape of its
# components shows them). The autoscaler's and the controller's series carry the revision's labels
# themselves; the queue-proxy's carry them only on `target_info` (resource attributes), joined on the
# scrape target. Which generation a cluster has is read from Prometheus for each input, newest first,
# never configured: see `metric_generations`.
OTEL_REVISION_LABELS = ("k8s_namespace_name", "kn_service_name")
OPENCENSUS_REVISION_LABELS = ("namespace_name", "service_name")
_ON_TARGET = "on (job, instance) group_left () target_info{{{rev}}}"
_OTEL_REQUESTS = "kn_serving_invocation_duration_seconds"


def _otel_requests(window: str) -> str:
    return f"sum(rate({_OTEL_REQUESTS}_count[{window}]) * {_ON_TARGET})"


def _otel_gauge(series: str) -> tuple[str, str]:
    return f"sum({series}{{{{{{rev}}}}}})", f"time() - max(timestamp({series}{{{{{{rev}}}}}}))"


_OTEL_REQUESTS_AGE = f"time() - max(timestamp({_OTEL_REQUESTS}_count) * {_ON_TARGET})"
_OTEL_BUCKETS_AGE = f"time() - max(timestamp({_OTEL_REQUESTS}_bucket) * {_ON_TARGET})"
_STABLE, _PANIC = "kn_revision_concurrency_stable", "kn_revision_concurrency_panic"
OPENTELEMETRY_METRICS: dict[str, tuple[str, str]] = {  # key: (value PromQL, age PromQL), `{rev}` the matcher
    "revision_app_request_count": (_otel_requests("1m"), _OTEL_REQUESTS_AGE),
    "revision_app_request_latencies": (  # p95, milliseconds (the histogram is in seconds)
        f"1000 * histogram_quantile(0.95, sum by (le) (rate({_OTEL_REQUESTS}_bucket[1m]) * {_ON_TARGET}))",
        _OTEL_BUCKETS_AGE),
    "autoscaler_stable_request_concurrency": _otel_gauge(_STABLE),
    "autoscaler_panic_request_concurrency": _otel_gauge(_PANIC),
    "autoscaler_actual_pods": _otel_gauge("kn_revision_pods_count"),
    "autoscaler_not_ready_pods": _otel_gauge("kn_revision_pods_not_ready_count"),
    # The workload features (rl/observation.py's WORKLOAD_METRICS) over the same series. A pod gone (scaled
    # down) takes its target_info along, so its past requests drop out of the hour's rates: they read low
    # after scale-downs, where the OpenCensus series (labelled per revision) do not.
    "request_rate_10m": (_otel_requests("10m"), _OTEL_REQUESTS_AGE),
    "request_rate_1h": (_otel_requests("1h"), _OTEL_REQUESTS_AGE),
    "request_rate_stddev_1h": (f"stddev_over_time({_otel_requests('1m')}[1h:1m])", _OTEL_REQUESTS_AGE),
    "peak_concurrency_10m": (f"max_over_time(sum({_PANIC}{{{{{{rev}}}}}})[10m:15s])", _otel_gauge(_PANIC)[1]),
    "mean_concurrency_10m": (f"avg_over_time(sum({_STABLE}{{{{{{rev}}}}}})[10m:15s])", _otel_gauge(_STABLE)[1]),
    GUARD_P95: (f"1000 * histogram_quantile(0.95, sum by (le) (rate({_OTEL_REQUESTS}_bucket[{GUARD_WINDOW}]) * {_ON_TARGET}))",
                _OTEL_BUCKETS_AGE),
}


@dataclass(frozen=True)
class MetricQuery:
    """How to read one observation input under one generation of Knative's metric names."""

    generation: str
    value: str
    age: str


def metric_generations(namespace: str, service: str) -> dict[str, list[MetricQuery]]:
    """For each input (`value_queries`' keys: the policy's and the guard's), its queries under each generation of Knative's
    names, newest first: the query layer uses the first whose series Prometheus has."""
    otel = _matcher(OTEL_REVISION_LABELS, namespace, service)
    opencensus = revision_matcher(namespace, service)
    values, ages = value_queries(opencensus), age_queries(opencensus)
    return {name: [MetricQuery("opentelemetry", OPENTELEMETRY_METRICS[name][0].format(rev=otel),
                               OPENTELEMETRY_METRICS[name][1].format(rev=otel)),
                   MetricQuery("opencensus", values[name], ages[name])]
            for name in values}


def _matcher(labels: tuple[str, str], namespace: str, service: str) -> str:
    return f'{labels[0]}="{_escape(namespace)}",{labels[1]}="{_escape(service)}"'


@dataclass(frozen=True)
class MetricSample:
    value: float
    age_s: float  # seconds since the newest raw sample behind the value was scraped


@dataclass(frozen=True)
class Observed:
    """What the query layer saw: a sample per metric it found (absent keys were not found), or why it
    could not ask at all (`problem`: a condition reason such as PrometheusUnreachable, with `detail`)."""

    samples: Mapping[str, MetricSample] = field(default_factory=dict)
    problem: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Outcome:
    """One decision: the target to apply, and what to record about it."""

    target: int
    previous_target: int
    reason: str  # one of the reasons above; DECIDED only when the policy chose the target
    message: str
    min_scale: int  # the min-scale to apply: the policy's warm-pod floor within the spec's bounds, else the spec's
    spot_share: float | None = None
    warm_share: float | None = None
    policy_target: float | None = None
    inputs: dict[str, float] = field(default_factory=dict)

    @property
    def decided(self) -> bool:
        return self.reason == DECIDED

    @property
    def condition(self) -> tuple[str, bool, str, str]:
        return (CONDITION, self.decided, self.reason, self.message)


def decision_interval(settings: api.PpoSettings) -> timedelta:
    return parse_duration(settings.decision_interval)


def stale_after_s(interval: timedelta) -> float:
    return max(STALE_AFTER_MIN_S, STALE_AFTER_INTERVALS * interval.total_seconds())


def seconds_since_midnight(now: datetime) -> float:
    return now.hour * 3600.0 + now.minute * 60.0 + now.second + now.microsecond / 1e6


def bounded_step(current: float, wanted: float, max_change_fraction: float, bounds: ActionBounds) -> int:
    """The target after one decision: at most `max_change_fraction` of the current target away from it,
    within the policy's bounds, a whole number of requests (Knative reads the annotation as a number;
    whole numbers keep the Knative Service from changing on rounding noise). The same bound the policy
    was trained under (`rl.observation.bounded_target`), with the ServedModel's own fraction."""
    bounded = bounded_target(current, wanted, replace(bounds, max_change_fraction=max_change_fraction))
    return max(1, int(round(bounded)))


def _fallback(current: int, autoscaling: api.Autoscaling, reason: str, why: str, inputs: dict[str, float] | None = None) -> Outcome:
    """Knative's default target and the spec's own min-scale: no warm-pod floor without the policy."""
    return Outcome(KNATIVE_DEFAULT_TARGET, current, reason,
                   f"{why}; running Knative's default target {KNATIVE_DEFAULT_TARGET}",
                   servedmodel.template_min_scale(autoscaling), inputs=inputs or {})


@dataclass(frozen=True)
class Guard:
    """The SLO guard's verdict: whether Knative's default replaces the policy, and why."""

    engaged: bool
    message: str = ""


def slo_guard(p95_ms: float | None, slo: api.Slo | None, current_target: int, engaged: bool) -> Guard:
    """Whether the policy's recent decisions are costing the SLO, so Knative's default takes over.

    `p95_ms` is the revision's p95 latency over `GUARD_WINDOW` (None or NaN: no requests), `engaged`
    whether the guard held the previous turn. It engages when that p95 is above the SLO's while the
    policy runs a target above Knative's default (leaner than Knative would run: its choice is the
    likely cause; below the default it already runs more pods than Knative would, and the default
    would not help). Once engaged it holds until the p95 is back under `GUARD_RELEASE_FRACTION` of
    the SLO. No SLO, nothing to guard; no requests, the state stands."""
    if slo is None:
        return Guard(False)
    if p95_ms is None or not math.isfinite(p95_ms):
        return Guard(engaged, "no requests in the guard's window; Knative's default target stays" if engaged else "")
    limit = float(slo.p95_latency_ms)
    if engaged:
        if p95_ms <= GUARD_RELEASE_FRACTION * limit:
            return Guard(False)
        return Guard(True, f"p95 latency over the last {GUARD_WINDOW} is {p95_ms:.0f}ms against the SLO's {limit:.0f}ms "
                           f"(the policy gets control back below {GUARD_RELEASE_FRACTION * limit:.0f}ms)")
    if p95_ms > limit and current_target > KNATIVE_DEFAULT_TARGET:
        return Guard(True, f"p95 latency over the last {GUARD_WINDOW} is {p95_ms:.0f}ms, above the SLO's {limit:.0f}ms, "
                           f"while the policy ran target {current_target} (leaner than Knative's default)")
    return Guard(False)


def decide(
    observed: Observed,
    *,
    current_target: int,
    autoscaling: api.Autoscaling,
    spot: api.SpotCapacity,
    policy: Callable[[np.ndarray], Decision] | None,
    bounds: ActionBounds,
    now: datetime,
    policy_error: str = "",
    guard_engaged: bool = False,
) -> Outcome:
    """The next target for a `policy: ppo` ServedModel.

    `policy` is the exported policy's `decide` (None when it could not be loaded: `policy_error` says
    why). Missing or stale metrics, an unreachable Prometheus or no policy fall back to Knative's
    default target at once: a known, safe target, rather than a step towards it. So does the SLO guard
    (`slo_guard`; `guard_engaged`: whether it held at the previous decision)."""
    if observed.problem is not None:
        return _fallback(current_target, autoscaling, observed.problem, observed.detail or observed.problem)
    interval = decision_interval(autoscaling.ppo)
    limit = stale_after_s(interval)
    inputs = {name: round(sample.value, 3) for name, sample in observed.samples.items() if math.isfinite(sample.value)}
    missing = sorted(name for name in POLICY_METRICS if name not in observed.samples)
    if missing:
        return _fallback(current_target, autoscaling, METRICS_MISSING, f"no recent samples of {', '.join(missing)} in Prometheus", inputs)
    stale = sorted(name for name, sample in observed.samples.items() if name in POLICY_METRICS and sample.age_s > limit)
    if stale:
        oldest = max(observed.samples[name].age_s for name in stale)
        return _fallback(current_target, autoscaling, METRICS_STALE,
                         f"{', '.join(stale)} last scraped {oldest:.0f}s ago (more than {limit:.0f}s)", inputs)
    if policy is None:
        return _fallback(current_target, autoscaling, DECISION_FAILED, f"the policy could not be loaded: {policy_error}", inputs)
    guard_sample = observed.samples.get(GUARD_P95)
    guard = slo_guard(guard_sample.value if guard_sample else None, autoscaling.slo, current_target, guard_engaged)
    if guard.engaged:
        return _fallback(current_target, autoscaling, SLO_GUARD, guard.message, inputs)
    reference_s = autoscaling.slo.p95_latency_ms / 1000.0 if autoscaling.slo else SLOConfig().reference_latency_s
    try:
        observation = observation_from_metrics(
            {name: sample.value for name, sample in observed.samples.items()},
            target=float(current_target), time_of_day_s=seconds_since_midnight(now), reference_latency_s=reference_s,
            spot_allowed=spot.enabled, bounds=bounds,
        )
    except MissingMetricError as error:
        return _fallback(current_target, autoscaling, METRICS_MISSING, str(error), inputs)
    choice = policy(observation)
    target = bounded_step(current_target, choice.target, autoscaling.ppo.max_change_fraction, bounds)
    spot_share = min(choice.spot_share, spot.max_spot_fraction) if spot.enabled else 0.0
    # The floor at the target being applied, as training computes it (`rl.episodes.apply_decision`), with
    # the utilisation this model's revisions run at (training's is Knative's default, 70%).
    utilization = replace(bounds, target_utilization=autoscaling.target_utilization / 100.0)
    warm_pods = warm_pod_floor(choice.warm_share, observed.samples["peak_concurrency_10m"].value, float(target), utilization)
    min_scale = servedmodel.floor_in_force(autoscaling, warm_pods)
    clipped = "" if target == round(choice.target) else f" (the policy asked for {choice.target:.1f}; bounded step)"
    message = f"target {current_target} -> {target}{clipped}; min-scale {min_scale}; spot share {spot_share:.2f}"
    return Outcome(target, current_target, DECIDED, message, min_scale, spot_share, round(choice.warm_share, 3),
                   round(choice.target, 2), inputs)
