"""The KPA decision, pinned against cases worked out by hand from knative/serving's `Scale` logic."""

import pytest

from agentkube.rl.knative import (
    DeciderState,
    KnativeDefaults,
    ScaleToZeroState,
    bounded_scale,
    effective_target,
    scale,
    scale_to_zero_step,
)

DEFAULTS = KnativeDefaults()


def test_defaults_are_knatives():
    assert DEFAULTS.stable_window_s == 60 and DEFAULTS.panic_window_s == 6
    assert DEFAULTS.panic_threshold == 2.0 and DEFAULTS.target_utilization == 0.7
    assert (DEFAULTS.max_scale_up_rate, DEFAULTS.max_scale_down_rate) == (1000, 2)
    assert DEFAULTS.target_burst_capacity == 211 and DEFAULTS.scale_to_zero_grace_period_s == 30
    assert (DEFAULTS.initial_scale, DEFAULTS.min_scale, DEFAULTS.max_scale) == (1, 0, 0)
    assert DEFAULTS.tick_interval_s == 2


@pytest.mark.parametrize(
    ("container_concurrency", "annotation", "expected"),
    [(0, None, 70.0), (0, 50, 35.0), (30, 50, 21.0), (10, None, 7.0), (0, 0.001, 0.01)],
    ids=["default", "annotation", "annotation-capped-by-cc", "container-concurrency", "floor"],
)
def test_effective_target(container_concurrency, annotation, expected):
    config = KnativeDefaults(container_concurrency=container_concurrency, target=annotation)
    assert effective_target(config) == pytest.approx(expected)


def test_stable_mode_uses_the_stable_average_and_limits_scale_down_to_half():
    # ceil(140/70) = 2; panic ceil(150/70) = 3, 3/5 < 2 so no panic; floor(5/2) = 2 allows 2.
    decision = scale(DEFAULTS, DeciderState(), 0.0, 5, 140.0, 150.0)
    assert decision.desired_pods == 2 and not decision.state.in_panic
    # From 10 pods at zero load the decider may only halve: floor(10/2) = 5.
    assert scale(DEFAULTS, DeciderState(), 0.0, 10, 0.0, 0.0).desired_pods == 5


def test_scale_up_rate_limit():
    config = KnativeDefaults(max_scale_up_rate=2.0)
    # ceil(1000/70) = 15 wanted, at most ceil(2 × 3) = 6; panic 15/3 ≥ 2 panics but is clamped too.
    assert scale(config, DeciderState(), 0.0, 3, 1000.0, 1000.0).desired_pods == 6


def test_panic_starts_at_the_threshold_and_ratchets():
    # 2 ready, panic average 300: ceil(300/70) = 5, 5/2 = 2.5 ≥ 2 -> panic, desired max(2, 5) = 5.
    first = scale(DEFAULTS, DeciderState(), 100.0, 2, 100.0, 300.0)
    assert first.desired_pods == 5 and first.state == DeciderState(100.0, 5)
    # The burst passes (panic 100 -> 2 pods, 2/5 < 2) but panic never scales down: still 5.
    second = scale(DEFAULTS, first.state, 130.0, 5, 150.0, 100.0)
    assert second.desired_pods == 5 and second.state.panic_since_s == 100.0
    # Exactly one stable window after the last crossing, panic still holds (Knative's strict Before).
    assert scale(DEFAULTS, second.state, 160.0, 5, 150.0, 100.0).desired_pods == 5
    # After it, the stable average decides again: ceil(150/70) = 3, within floor(5/2) = 2.
    after = scale(DEFAULTS, second.state, 161.0, 5, 150.0, 100.0)
    assert after.desired_pods == 3 and after.state == DeciderState()


def test_panic_is_extended_while_over_the_threshold():
    state = DeciderState(100.0, 5)
    # 5 ready, panic 700: ceil(10) = 10, 10/5 = 2 ≥ 2 -> panic extended to now, ratchet to 10.
    decision = scale(DEFAULTS, state, 150.0, 5, 200.0, 700.0)
    assert decision.state == DeciderState(150.0, 10) and decision.desired_pods == 10


def test_a_revision_at_zero_counts_as_one_pod():
    assert scale(DEFAULTS, DeciderState(), 0.0, 0, 0.0, 0.0).desired_pods == 0
    # One request in the panic window: ceil(1/70) = 1, 1/1 < 2, stable still 0 -> 0 from stable.
    assert scale(DEFAULTS, DeciderState(), 0.0, 0, 0.0, 1.0).desired_pods == 0
    burst = scale(DEFAULTS, DeciderState(), 0.0, 0, 0.0, 150.0)  # ceil(150/70) = 3 ≥ 2 × 1 -> panic
    assert burst.desired_pods == 3 and burst.state.in_panic


@pytest.mark.parametrize(
    ("ready", "burst_capacity", "expected_excess", "activator"),
    [(3, 211.0, 39.0, False), (2, 211.0, -61.0, True), (2, 0.0, 0.0, False), (9, -1.0, -1.0, True)],
)
def test_excess_burst_capacity_decides_whether_the_activator_is_in_the_path(ready, burst_capacity, expected_excess, activator):
    # floor(ready × 100 − 211 − 50): 300 − 261 = 39; 200 − 261 = −61.
    config = KnativeDefaults(target_burst_capacity=burst_capacity)
    decision = scale(config, DeciderState(), 0.0, ready, 50.0, 50.0)
    assert decision.excess_burst_capacity == expected_excess
    assert decision.activator_in_path is activator


def test_scale_to_zero_waits_a_stable_window_then_the_grace_period():
    state = ScaleToZeroState(active=True, since_s=0.0)
    pods, state = scale_to_zero_step(DEFAULTS, state, 30.0, 0)
    assert pods == 1 and state.active
    pods, state = scale_to_zero_step(DEFAULTS, state, 60.0, 0)  # active a full stable window
    assert pods == 1 and state == ScaleToZeroState(False, 60.0)
    assert scale_to_zero_step(DEFAULTS, state, 89.0, 0)[0] == 1  # inside the 30 s grace period
    assert scale_to_zero_step(DEFAULTS, state, 90.0, 0)[0] == 0
    pods, state = scale_to_zero_step(DEFAULTS, state, 95.0, 2)  # a request re-activates it
    assert pods == 2 and state == ScaleToZeroState(True, 95.0)


def test_scale_to_zero_can_be_disabled():
    config = KnativeDefaults(enable_scale_to_zero=False)
    assert scale_to_zero_step(config, ScaleToZeroState(False, 0.0), 1000.0, 0)[0] == 1


def test_min_and_max_scale():
    assert bounded_scale(KnativeDefaults(min_scale=2), 0) == 2
    assert bounded_scale(KnativeDefaults(max_scale=5), 9) == 5
    assert bounded_scale(DEFAULTS, 10_000) == 10_000  # max 0 = unbounded
