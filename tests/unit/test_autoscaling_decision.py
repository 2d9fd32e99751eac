"""The ppo autoscaling decision, as a pure function: bounded steps, fallbacks and what is recorded."""

from datetime import UTC, datetime

import numpy as np
import pytest

from agentkube.operator import api, autoscaling
from agentkube.rl.observation import OBSERVATION_FIELDS, POLICY_METRICS, ActionBounds, Decision
from agentkube.rl.policy import load_policy

NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
BOUNDS = ActionBounds()
FRESH = {"revision_app_request_count": 20.0, "revision_app_request_latencies": 1500.0,
         "autoscaler_stable_request_concurrency": 150.0, "autoscaler_panic_request_concurrency": 160.0,
         "autoscaler_actual_pods": 3.0, "autoscaler_not_ready_pods": 0.0,
         "request_rate_10m": 19.0, "request_rate_1h": 15.0, "request_rate_stddev_1h": 4.0,
         "peak_concurrency_10m": 220.0, "mean_concurrency_10m": 140.0}
SLO = {"p95LatencyMs": 10_000}


def _observed(values=FRESH, age_s: float = 1.0) -> autoscaling.Observed:
    return autoscaling.Observed({name: autoscaling.MetricSample(value, age_s) for name, value in values.items()})


def _asks(target: float, spot_share: float = 0.5, warm_share: float = 0.0):
    seen = []

    def policy(observation: np.ndarray) -> Decision:
        seen.append(observation)
        return Decision(target, spot_share, warm_share)

    policy.seen = seen
    return policy


def _decide(observed, policy, current=100, spot=api.SpotCapacity(), guard_engaged=False, **autoscaling_fields):
    settings = api.Autoscaling(policy="ppo", **autoscaling_fields)
    return autoscaling.decide(observed, current_target=current, autoscaling=settings, spot=spot, policy=policy,
                              bounds=BOUNDS, now=NOON, guard_engaged=guard_engaged)


def test_the_policy_decides_within_a_bounded_step():
    policy = _asks(400.0)
    outcome = _decide(_observed(), policy, current=100, ppo={"maxChangeFraction": 0.5})
    assert (outcome.target, outcome.previous_target, outcome.reason) == (150, 100, autoscaling.DECIDED)
    assert outcome.decided and outcome.condition[:3] == ("Autoscaling", True, "PolicyDecided")
    assert outcome.policy_target == 400.0 and "bounded step" in outcome.message
    assert outcome.inputs["autoscaler_actual_pods"] == 3.0
    assert len(policy.seen) == 1 and policy.seen[0].shape == (len(OBSERVATION_FIELDS),)


def test_a_step_down_is_bounded_too_and_a_small_one_is_taken_whole():
    assert _decide(_observed(), _asks(10.0), current=100, ppo={"maxChangeFraction": 0.2}).target == 80
    assert _decide(_observed(), _asks(90.4), current=100, ppo={"maxChangeFraction": 0.2}).target == 90


def test_targets_stay_within_the_policy_bounds():
    assert autoscaling.bounded_step(300, 1000, 1.0, BOUNDS) == 400
    assert autoscaling.bounded_step(12, 1, 1.0, BOUNDS) == 10


def test_spot_share_is_recorded_only_when_spot_is_enabled_and_capped():
    assert _decide(_observed(), _asks(100, 0.9)).spot_share == 0.0
    spot = api.SpotCapacity(enabled=True, max_spot_fraction=0.6)
    assert _decide(_observed(), _asks(100, 0.9), spot=spot).spot_share == 0.6


@pytest.mark.parametrize("missing", sorted(POLICY_METRICS))
def test_a_missing_metric_falls_back_to_knatives_default(missing):
    values = {k: v for k, v in FRESH.items() if k != missing}
    policy = _asks(300)
    outcome = _decide(_observed(values), policy, current=37)
    assert outcome.target == autoscaling.KNATIVE_DEFAULT_TARGET == 100
    assert outcome.reason == autoscaling.METRICS_MISSING and missing in outcome.message
    assert outcome.condition[1] is False and not policy.seen


def test_stale_metrics_fall_back():
    outcome = _decide(_observed(age_s=120.0), _asks(300), current=37, ppo={"decisionInterval": "30s"})
    assert (outcome.target, outcome.reason) == (100, autoscaling.METRICS_STALE)
    assert "120s ago" in outcome.message
    # Fresh within two decision intervals (and never stricter than the floor).
    assert _decide(_observed(age_s=50.0), _asks(50), ppo={"decisionInterval": "30s"}).decided
    assert _decide(_observed(age_s=10.0), _asks(50), ppo={"decisionInterval": "1s"}).decided


def test_negative_or_infinite_values_count_as_missing_but_no_traffic_latency_is_fine():
    assert _decide(_observed(FRESH | {"autoscaler_actual_pods": -1.0}), _asks(50)).reason == autoscaling.METRICS_MISSING
    assert _decide(_observed(FRESH | {"revision_app_request_latencies": float("nan")}), _asks(50)).decided


@pytest.mark.parametrize("problem", [autoscaling.PROMETHEUS_UNREACHABLE, autoscaling.PROMETHEUS_NOT_CONFIGURED])
def test_no_prometheus_falls_back_and_says_why(problem):
    outcome = _decide(autoscaling.Observed(problem=problem, detail="no answer"), _asks(300), current=250)
    assert (outcome.target, outcome.previous_target, outcome.reason) == (100, 250, problem)
    assert "no answer" in outcome.message and "default target 100" in outcome.message


def test_no_policy_falls_back():
    outcome = autoscaling.decide(_observed(), current_target=50, autoscaling=api.Autoscaling(policy="ppo"),
                                 spot=api.SpotCapacity(), policy=None, bounds=BOUNDS, now=NOON, policy_error="bad file")
    assert (outcome.target, outcome.reason) == (100, autoscaling.DECISION_FAILED) and "bad file" in outcome.message


def test_the_warm_pod_floor_is_a_share_of_the_recent_peaks_pods_at_the_target_applied():
    # Peak 220 in flight over 10 minutes; at target 150 (bounded from the asked 400) a pod takes 105:
    # the whole peak needs 3 pods, half of it 2 (rounded up).
    whole = _decide(_observed(), _asks(400.0, warm_share=1.0), current=100, ppo={"maxChangeFraction": 0.5})
    assert (whole.target, whole.min_scale, whole.warm_share) == (150, 3, 1.0) and "min-scale 3" in whole.message
    assert _decide(_observed(), _asks(150.0, warm_share=0.5), current=100).min_scale == 2
    # No floor asked: the spec's own min-scale (1 without scale to zero).
    assert _decide(_observed(), _asks(150.0), current=100).min_scale == 0
    assert _decide(_observed(), _asks(150.0), current=100, scaleToZero=False).min_scale == 1
    # Within the spec's bounds: never over a set max-scale, never under its min-scale.
    assert _decide(_observed(), _asks(20.0, warm_share=1.0), current=20, maxScale=4).min_scale == 4
    assert _decide(_observed(), _asks(150.0, warm_share=0.1), current=100, minScale=2).min_scale == 2


def test_a_fallback_takes_the_floor_away():
    # Knative's default target with the spec's own min-scale: the floor was the policy's choice.
    outcome = _decide(_observed(FRESH | {autoscaling.GUARD_P95: 14_000.0}), _asks(300, warm_share=1.0), current=180,
                      slo=SLO, minScale=1)
    assert (outcome.reason, outcome.target, outcome.min_scale) == (autoscaling.SLO_GUARD, 100, 1)
    missing = {k: v for k, v in FRESH.items() if k != "peak_concurrency_10m"}
    assert _decide(_observed(missing), _asks(300, warm_share=1.0)).min_scale == 0


def test_the_shipped_policy_decides_from_metrics():
    policy = load_policy()
    outcome = _decide(_observed(), policy.decide, current=100)
    assert outcome.decided and 50 <= outcome.target <= 150


def test_queries_select_one_service_and_check_freshness():
    matcher = autoscaling.revision_matcher("ml", 'we"ird')
    assert matcher == 'namespace_name="ml",service_name="we\\"ird"'
    queries = autoscaling.value_queries(matcher)
    # Exactly the policy's inputs (one list for training and production) and the guard's.
    assert set(queries) == set(POLICY_METRICS) | {autoscaling.GUARD_P95} and all(matcher in q for q in queries.values())
    assert queries["request_rate_1h"] == f"sum(rate(revision_app_request_count{{{matcher}}}[1h]))"
    assert queries[autoscaling.GUARD_P95] == ("histogram_quantile(0.95, sum by (le) "
                                              f"(rate(revision_app_request_latencies_bucket{{{matcher}}}[10m])))")
    ages = autoscaling.age_queries(matcher)
    assert set(ages) == set(queries)
    assert ages["revision_app_request_latencies"] == f"time() - max(timestamp(revision_app_request_latencies_bucket{{{matcher}}}))"
    assert ages["peak_concurrency_10m"] == f"time() - max(timestamp(autoscaler_panic_request_concurrency{{{matcher}}}))"


def test_time_of_day_and_interval():
    assert autoscaling.seconds_since_midnight(NOON) == 43_200.0
    assert autoscaling.decision_interval(api.PpoSettings(decision_interval="1m30s")).total_seconds() == 90
    assert autoscaling.stale_after_s(autoscaling.decision_interval(api.PpoSettings(decision_interval="5s"))) == 15.0


def test_an_unreachable_prometheus_is_a_reason_not_an_exception():
    from agentkube.devenv.cluster import free_port
    from agentkube.operator.prometheus import MetricsSource

    source = MetricsSource(f"http://user:secret@127.0.0.1:{free_port()}")  # nothing listens there
    observed = source.observe("ml", "llm")
    assert observed.problem == autoscaling.PROMETHEUS_UNREACHABLE and not observed.samples
    assert "secret" not in observed.detail and "127.0.0.1" in observed.detail


# ------------------------------------------------------------------------------------ the SLO guard
SLOW = FRESH | {autoscaling.GUARD_P95: 14_000.0}
RECOVERING = FRESH | {autoscaling.GUARD_P95: 9_000.0}
RECOVERED = FRESH | {autoscaling.GUARD_P95: 7_000.0}


def test_the_guard_falls_back_when_a_lean_policy_costs_the_slo():
    policy = _asks(300)
    outcome = _decide(_observed(SLOW), policy, current=180, slo=SLO)
    assert (outcome.target, outcome.previous_target, outcome.reason) == (100, 180, autoscaling.SLO_GUARD)
    assert outcome.condition[:3] == ("Autoscaling", False, "SLOGuard") and not policy.seen
    assert "14000ms" in outcome.message and "10000ms" in outcome.message and "target 180" in outcome.message


def test_the_guard_leaves_a_policy_alone_that_runs_more_pods_than_knative_would():
    # Below the default target the policy already buys more capacity than Knative's default would.
    assert _decide(_observed(SLOW), _asks(60), current=80, slo=SLO).decided
    assert _decide(_observed(SLOW), _asks(60), current=100, slo=SLO).decided


def test_the_guard_holds_until_latency_is_well_inside_the_slo():
    assert _decide(_observed(RECOVERING), _asks(300), current=100, slo=SLO, guard_engaged=True).reason == autoscaling.SLO_GUARD
    released = _decide(_observed(RECOVERED), _asks(130), current=100, slo=SLO, guard_engaged=True)
    assert released.decided and released.target == 130
    # Not engaged, the same recovering latency is within the SLO: the policy decides.
    assert _decide(_observed(RECOVERING), _asks(130), current=150, slo=SLO).decided


def test_the_guard_needs_an_slo_and_traffic():
    assert _decide(_observed(SLOW), _asks(300), current=180).decided  # no SLO on the model: nothing to guard
    quiet = FRESH | {autoscaling.GUARD_P95: float("nan")}
    assert _decide(_observed(quiet), _asks(300), current=180, slo=SLO).decided
    assert _decide(_observed(quiet), _asks(300), current=100, slo=SLO, guard_engaged=True).reason == autoscaling.SLO_GUARD
    # The guard's query is not a policy input: without it the policy still decides.
    assert _decide(_observed(FRESH), _asks(300), current=180, slo=SLO, guard_engaged=False).decided


@pytest.mark.parametrize(("p95_ms", "current", "engaged", "expected"), [
    (10_001.0, 101, False, True), (10_000.0, 200, False, False), (10_001.0, 100, False, False),
    (8_001.0, 100, True, True), (8_000.0, 100, True, False), (None, 200, True, True), (None, 200, False, False),
])
def test_slo_guard_thresholds(p95_ms, current, engaged, expected):
    assert autoscaling.slo_guard(p95_ms, api.Slo(p95_latency_ms=10_000), current, engaged).engaged is expected


def test_each_input_is_read_under_knatives_opentelemetry_names_first_then_opencensus():
    generations = autoscaling.metric_generations("ml", "llm")
    assert set(generations) == set(autoscaling.value_queries(autoscaling.revision_matcher("ml", "llm")))
    for name, queries in generations.items():
        assert [query.generation for query in queries] == ["opentelemetry", "opencensus"]
        assert 'k8s_namespace_name="ml",kn_service_name="llm"' in queries[0].value
        assert 'namespace_name="ml",service_name="llm"' in queries[1].value
        assert queries[1].value == autoscaling.value_queries(autoscaling.revision_matcher("ml", "llm"))[name]
    # The queue-proxy's request series name their revision only through target_info.
    assert "target_info{" in generations["revision_app_request_count"][0].value
    assert generations["autoscaler_actual_pods"][0].value.startswith("sum(kn_revision_pods_count{")
