"""Knative Serving's pod autoscaler (KPA), as a pure decision function.

The logic follows knative/serving's `pkg/autoscaler/scaling/autoscaler.go` (`Scale`), the scale-to-zero
rules of `pkg/reconciler/autoscaling/kpa/scaler.go` and the bounds of `kpa.go`, re-expressed here: the
decision is a pure function of the observed metrics, the configuration and a small carried state
(`DeciderState`), so that it can be unit-tested against hand-computed cases and stepped fast by the
simulator. Every parameter defaults to Knative's shipped value (`config/core/configmaps/autoscaler.yaml`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = [
    "AUTOSCALING_GROUP",
    "TARGET_ANNOTATION",
    "MIN_SCALE_ANNOTATION",
    "MAX_SCALE_ANNOTATION",
    "LATENCY_HISTOGRAM_MAX_S",
    "KnativeDefaults",
    "DeciderState",
    "ScaleDecision",
    "effective_target",
    "scale",
    "scale_to_zero_step",
    "ScaleToZeroState",
    "bounded_scale",
]

# The annotations the KPA reads its per-revision settings from (knative/serving `pkg/apis/autoscaling`,
# register.go), on the revision template and, after the revision reconciler copied them there at
# creation, on the revision's PodAutoscaler, where the operator's live loop changes the target and the
# warm-pod floor (`PodAutoscaler.ScaleBounds` and `.Target` read them on every reconcile).
AUTOSCALING_GROUP = "autoscaling.knative.dev"
TARGET_ANNOTATION = f"{AUTOSCALING_GROUP}/target"
MIN_SCALE_ANNOTATION = f"{AUTOSCALING_GROUP}/min-scale"
MAX_SCALE_ANNOTATION = f"{AUTOSCALING_GROUP}/max-scale"
# queue-proxy's request-latency histogram (`kn_serving_invocation_duration_seconds`) has no bucket above 10 s
# (knative/serving `pkg/queue/request_metric.go`, `latencyBounds`): a p95 that Prometheus computes from it
# is at most this. The simulator reports its p95 the same way, so that the policy learns from what it reads live.
LATENCY_HISTOGRAM_MAX_S = 10.0


@dataclass(frozen=True)
class KnativeDefaults:
    """The KPA's settings; each default is Knative Serving's.

    `container_concurrency` is the hard per-pod limit (0 = unlimited, Knative's default);
    `target` is the `autoscaling.knative.dev/target` annotation (None = not set).
    """

    stable_window_s: float = 60.0
    panic_window_percentage: float = 10.0
    panic_threshold_percentage: float = 200.0
    target_utilization: float = 0.7
    container_concurrency_target_default: float = 100.0
    container_concurrency: int = 0
    target: float | None = None
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    target_burst_capacity: float = 211.0
    scale_to_zero_grace_period_s: float = 30.0
    enable_scale_to_zero: bool = True
    initial_scale: int = 1
    min_scale: int = 0
    max_scale: int = 0  # 0 = unbounded
    tick_interval_s: float = 2.0
    metric_bucket_s: float = 1.0

    @property
    def panic_window_s(self) -> float:
        # Knative keeps the panic window at least one bucket long.
        return max(self.metric_bucket_s, self.stable_window_s * self.panic_window_percentage / 100.0)

    @property
    def panic_threshold(self) -> float:
        return self.panic_threshold_percentage / 100.0

    def with_target(self, target: float | None) -> KnativeDefaults:
        """The same settings with the per-pod concurrency target annotation set to `target`."""
        return replace(self, target=target)


def total_target(config: KnativeDefaults) -> float:
    """Per-pod concurrency before utilisation: the annotation, capped by a set container concurrency,
    else the container concurrency, else the cluster default."""
    cc = float(config.container_concurrency)
    if config.target is not None:
        return min(config.target, cc) if cc > 0 else config.target
    return cc if cc > 0 else config.container_concurrency_target_default


def effective_target(config: KnativeDefaults) -> float:
    """The per-pod concurrency the decider aims for (`total × utilisation`, at least 0.01)."""
    return max(0.01, total_target(config) * config.target_utilization)


@dataclass(frozen=True)
class DeciderState:
    """What the decider carries between ticks: when panic mode last saw the threshold crossed
    (None = not panicking) and the highest pod count requested while panicking."""

    panic_since_s: float | None = None
    max_panic_pods: int = 0

    @property
    def in_panic(self) -> bool:
        return self.panic_since_s is not None


@dataclass(frozen=True)
class ScaleDecision:
    desired_pods: int
    excess_burst_capacity: float
    state: DeciderState

    @property
    def activator_in_path(self) -> bool:
        # Negative excess burst capacity puts the activator in the request path (SKS proxy mode).
        return self.excess_burst_capacity < 0


def scale(
    config: KnativeDefaults,
    state: DeciderState,
    now_s: float,
    ready_pods: int,
    stable_concurrency: float,
    panic_concurrency: float,
    reachable: bool = True,
) -> ScaleDecision:
    """One decider tick: the desired pod count from the stable and panic concurrency averages.

    `stable_concurrency` and `panic_concurrency` are the revision's total in-flight requests averaged
    over the stable and panic windows. The result is before min/max bounds and scale-to-zero gating
    (see `bounded_scale` and `scale_to_zero_step`).
    """
    target = effective_target(config)
    ready = max(1.0, float(ready_pods))  # a revision at zero still scales as if it had one pod
    max_up = math.ceil(config.max_scale_up_rate * ready)
    max_down = math.floor(ready / config.max_scale_down_rate) if reachable else 0.0
    stable_wanted = math.ceil(stable_concurrency / target)
    panic_wanted = math.ceil(panic_concurrency / target)
    desired_stable = int(min(max(stable_wanted, max_down), max_up))
    desired_panic = int(min(max(panic_wanted, max_down), max_up))

    over_threshold = panic_wanted / ready >= config.panic_threshold
    panic_since, max_panic = state.panic_since_s, state.max_panic_pods
    if over_threshold:
        panic_since = now_s  # starting or extending panic
    elif panic_since is not None and panic_since + config.stable_window_s < now_s:
        # The surge has had a full stable window to reach the stable average: leave panic.
        panic_since, max_panic = None, 0

    desired = desired_stable
    if panic_since is not None:
        # Panic never scales down: it ratchets up to the largest count wanted since it began.
        max_panic = max(max_panic, desired_stable, desired_panic)
        desired = max_panic

    if config.target_burst_capacity == 0:
        excess = 0.0
    elif config.target_burst_capacity < 0:  # -1: the activator always stays in the path
        excess = -1.0
    else:
        excess = math.floor(ready_pods * total_target(config) - config.target_burst_capacity - panic_concurrency)
    return ScaleDecision(desired, excess, DeciderState(panic_since, max_panic))


def bounded_scale(config: KnativeDefaults, desired_pods: int) -> int:
    """Apply min-scale and max-scale (0 = unbounded) to a desired pod count, as the KPA reconciler does."""
    wanted = max(desired_pods, config.min_scale)
    if config.max_scale > 0:
        wanted = min(wanted, config.max_scale)
    return wanted


@dataclass(frozen=True)
class ScaleToZeroState:
    """The PodAutoscaler's Active condition: since when it has been active, or inactive."""

    active: bool = True
    since_s: float = 0.0


def scale_to_zero_step(
    config: KnativeDefaults, state: ScaleToZeroState, now_s: float, desired_pods: int
) -> tuple[int, ScaleToZeroState]:
    """Gate a desired count of zero the way the KPA scaler does.

    A revision goes to zero only after it has been active for a stable window (then it is marked
    inactive and the activator takes the traffic) and then inactive for the grace period; until then
    it keeps one pod. Any positive desire re-activates it.
    """
    if desired_pods > 0:
        if state.active:
            return desired_pods, state
        return desired_pods, ScaleToZeroState(True, now_s)
    if not config.enable_scale_to_zero:
        return 1, state
    if state.active:
        if now_s - state.since_s >= config.stable_window_s:
            return 1, ScaleToZeroState(False, now_s)
        return 1, state
    if now_s - state.since_s >= config.scale_to_zero_grace_period_s:
        return 0, state
    return 1, state
