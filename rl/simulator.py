"""A Knative revision serving an LLM under a trace, at 1 s resolution.

The simulator is a plain, seedable object (no gymnasium): `Simulator(config).reset(trace, seed)`, then
`advance(seconds)` under the concurrency target and spot share in force (`set_target`,
`set_spot_share`), each call returning what happened (`IntervalStats`).

Requests are a fluid per second (counts and token work, not objects), which keeps a simulated day
under the speed goal; each request's latency is then computed exactly from the second it was admitted
(FIFO) and the batch it joined: wait + its token work × the decode step time at that concurrency.
The KPA (`agentkube.rl.knative`) sees the revision's in-flight requests (queued ones included, as
queue-proxy and the activator report them) in 1 s buckets and decides every 2 s.
"""

from __future__ import annotations

import copy
import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np

from agentkube.rl import knative
from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.observation import ActionBounds, SLOConfig, observation_from_metrics
from agentkube.rl.server import ColdStartConfig, ModelServerConfig, sample_cold_starts_s
from agentkube.rl.spot import SpotConfig, place_new_pods, pods_to_remove
from agentkube.rl.traces import SECONDS_PER_DAY, Trace

__all__ = ["SLOConfig", "SimConfig", "IntervalStats", "EpisodeSummary", "Simulator"]

# The windows of `observation.WORKLOAD_METRICS` ([10m], [1h], [1m] rates; [10m:15s] subqueries).
RATE_WINDOW_10M_S = 600
RATE_WINDOW_1H_S = 3600
MINUTE_S = 60
SUBQUERY_STEP_S = 15


# Where an admitted request is served (`SimConfig.binding`):
# - "pooled": every ready pod shares all in-flight requests (one batch size for the revision), and requests
#   beyond the pods' hard limit wait in one revision-wide queue that any pod, a new one too, takes from.
# - "pod": as Knative routes with containerConcurrency 0 (no limit it knows of, so the activator holds
#   nothing while pods exist): each request is bound at arrival to a pod that is ready then, spread evenly
#   (kube-proxy and the activator), and stays there, queued in that pod's server beyond its batch limit. A
#   backlog built before a scale-up stays on the old pods; new pods take only new arrivals. Measured against
#   real Knative in bench/knative_vs_simulator.py (rl/README.md, "The simulator against real Knative").
BINDINGS = ("pooled", "pod")
MAX_POD_GROUPS = 6  # pods that became ready together are one group; more groups than this are merged


@dataclass(frozen=True)
class SimConfig:
    knative: KnativeDefaults = field(default_factory=KnativeDefaults)
    server: ModelServerConfig = field(default_factory=ModelServerConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    spot: SpotConfig = field(default_factory=SpotConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    binding: str = "pooled"

    def __post_init__(self) -> None:
        if self.binding not in BINDINGS:
            raise ValueError(f"binding must be one of {BINDINGS}, not {self.binding!r}")


@dataclass
class IntervalStats:
    """What happened during one `advance` call. Latency figures cover requests admitted in it."""

    seconds: int
    arrivals: int
    admitted: int
    within_slo: int
    failed: float
    cost: float
    cold_starts: int
    interruptions: int
    p95_latency_s: float
    mean_ready_pods: float
    mean_concurrency: float
    metrics: dict[str, float]


@dataclass
class EpisodeSummary:
    requests: int
    cost: float
    slo_attainment: float  # share of all requests served within their SLO (failed and unserved count as misses)
    served_share: float  # share of requests not failed by interruptions (or left unserved at the end)
    p95_latency_s: float
    cold_starts: int
    failed: float
    interruptions: int
    mean_ready_pods: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def p95(values: np.ndarray) -> float:
    """The 95th percentile by nearest rank (np.percentile's interpolation costs more than the sim step)."""
    if not values.size:
        return float("nan")
    k = max(int(math.ceil(0.95 * values.size)) - 1, 0)
    return float(np.partition(values, k)[k])


class Simulator:
    """One Knative revision of one model, under one trace."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()

    # ------------------------------------------------------------------ set-up
    def reset(
        self, trace: Trace, seed: int | None = None, target: float | None = None, spot_share: float = 0.0,
        ready_pods: int | None = None,
    ) -> None:
        """Start `trace` with the revision already running `ready_pods` warm pods (default: Knative's
        initial scale, at least min-scale), under `target` (None: Knative's default) and `spot_share`."""
        cfg = self.config
        self.trace = trace
        self.rng = np.random.default_rng(seed)
        self.seconds = int(math.ceil(trace.duration_s))
        second = np.minimum(trace.arrival_s.astype(np.int64), self.seconds - 1)
        work = cfg.server.work_tokens(trace.request_tokens.astype(float), trace.response_tokens.astype(float))
        self._arrivals = np.bincount(second, minlength=self.seconds).astype(float).tolist()
        self._arrival_work = np.bincount(second, weights=work, minlength=self.seconds).tolist()
        self._request_work = work
        self._budget = cfg.slo.budget_s(trace.response_tokens.astype(float))
        self._arrived_before = np.concatenate([[0], np.cumsum(np.bincount(second, minlength=self.seconds))])
        # Per-second records (for latency scoring, plots and reports).
        self.admitted_cumulative = np.zeros(self.seconds + 1)
        self.step_time_s = np.zeros(self.seconds)
        self.ready_series = np.zeros(self.seconds, dtype=np.int32)
        self.pending_series = np.zeros(self.seconds, dtype=np.int32)
        self.target_series = np.zeros(self.seconds)
        self.concurrency_series = np.zeros(self.seconds)
        self.latency_p95_series: list[tuple[float, float]] = []
        self.pod_start_s: list[float] = []  # each created pod: seconds from its creation until it is ready
        # Random streams drawn ahead in blocks, since per-second scalar draws would dominate the run time.
        self._cold_starts = sample_cold_starts_s(cfg.cold_start, self.rng, 4096).tolist()
        self._uniforms = self.rng.random(self.seconds + 1).tolist()

        self.t = 0
        self.knative = cfg.knative.with_target(target)
        self.spot_share = float(spot_share)
        self.decider = knative.DeciderState()
        self.activator_in_path = True
        self.queue = 0.0  # requests waiting (activator or queue-proxy), and their token work
        self.queue_work = 0.0
        self.in_service = 0.0
        self.in_service_work = 0.0
        self.ready_on_demand = 0
        self.ready_spot = 0
        self.pending: list[tuple[float, int, bool]] = []  # (ready at, pod id, is spot) heap
        self.noticed: list[tuple[float, int]] = []  # undrained spot pods still serving: (terminates at, id)
        self.draining: list[list[float]] = []  # [terminates at, in-flight, work]
        # binding "pod": groups of pods that became ready together, oldest first: [pods, in service, its
        # work, queued in their servers, its work].
        self.pod_groups: list[list[float]] = []
        self._activator_queue = 0.0
        self._activator_queue_work = 0.0
        self._next_pod_id = 0
        self._window: list[float] = [0.0] * int(cfg.knative.stable_window_s)
        self._stable_sum = 0.0
        self._panic_sum = 0.0
        self._panic_len = int(cfg.knative.panic_window_s)
        self._buckets_seen = 0
        self._scored = 0  # requests whose latency has been scored (all admitted ones)
        self._latencies: list[np.ndarray] = []
        self._within = 0
        self.totals = dict(cost=0.0, failed=0.0, cold_starts=0, interruptions=0, ready_pod_seconds=0.0)
        warm = max(self.knative.initial_scale, self.knative.min_scale) if ready_pods is None else ready_pods
        self.ready_spot = place_new_pods(warm, 0, 0, self.spot_share)
        self.ready_on_demand = warm - self.ready_spot
        # A revision that starts at zero has already been scaled to zero: inactive past its grace period.
        self.activity = knative.ScaleToZeroState(
            active=warm > 0, since_s=0.0 if warm else -cfg.knative.scale_to_zero_grace_period_s)

    # What `reset` derives from the trace once and never changes afterwards.
    _READ_ONLY = ("config", "trace", "_arrivals", "_arrival_work", "_request_work", "_budget", "_arrived_before", "_uniforms")

    def branch(self) -> Simulator:
        """A copy that runs on from here without touching this one (planning ahead: try a decision, keep
        the branch that paid). The trace and what was derived from it are shared, not copied, as are the
        latencies of intervals already scored; the state, the random stream included, is copied."""
        shared = {id(value): value for value in map(self.__dict__.get, self._READ_ONLY)}
        shared.update((id(scored), scored) for scored in self._latencies)
        return copy.deepcopy(self, shared)

    def set_target(self, target: float | None) -> None:
        """The `autoscaling.knative.dev/target` annotation (None: Knative's default)."""
        self.knative = self.knative.with_target(None if target is None else float(target))

    def set_min_scale(self, pods: int) -> None:
        """The `autoscaling.knative.dev/min-scale` annotation on the revision's PodAutoscaler (the policy's
        warm-pod floor): never below the configured min-scale, which is the revision's own."""
        floor = max(int(pods), self.config.knative.min_scale)
        if self.knative.max_scale > 0:
            floor = min(floor, self.knative.max_scale)  # Knative refuses min-scale above max-scale
        self.knative = replace(self.knative, min_scale=floor)

    @property
    def min_scale(self) -> int:
        return self.knative.min_scale

    def set_spot_share(self, share: float) -> None:
        self.spot_share = min(1.0, max(0.0, float(share)))

    @property
    def done(self) -> bool:
        return self.t >= self.seconds

    @property
    def ready_pods(self) -> int:
        return self.ready_on_demand + self.ready_spot

    # ------------------------------------------------------------------ pods
    def _cold_start(self) -> float:
        if not self._cold_starts:
            self._cold_starts = sample_cold_starts_s(self.config.cold_start, self.rng, 4096).tolist()
        return self._cold_starts.pop()

    def _create_pods(self, count: int, extra_delay_s: float = 0.0) -> None:
        pending_spot = sum(1 for p in self.pending if p[2])
        spot = place_new_pods(count, self.ready_on_demand + len(self.pending) - pending_spot,
                              self.ready_spot + pending_spot, self.spot_share)
        for i in range(count):
            start_s = extra_delay_s + self._cold_start()
            self.pod_start_s.append(start_s)
            heapq.heappush(self.pending, (self.t + start_s, self._next_pod_id, i < spot))
            self._next_pod_id += 1
        self.totals["cold_starts"] += count

    def _remove_pods(self, count: int) -> None:
        # Kubernetes deletes pods that are not ready first, the youngest first.
        while count and self.pending:
            self.pending.remove(max(self.pending))
            count -= 1
        heapq.heapify(self.pending)
        if not count:
            return
        from_spot = pods_to_remove(count, self.ready_on_demand, self.ready_spot, self.spot_share)
        self.ready_spot -= from_spot
        self.ready_on_demand -= count - from_spot
        # A removed spot pod that had an interruption notice no longer fails anything.
        del self.noticed[:from_spot]
        # Scale-down is graceful: in-flight requests finish on the remaining capacity.

    def _scale_to(self, desired: int) -> None:
        current = self.ready_pods + len(self.pending)
        if desired > current:
            self._create_pods(desired - current)
        elif desired < current:
            self._remove_pods(current - desired)

    def _interrupt_spot_pod(self) -> None:
        cfg = self.config.spot
        self.totals["interruptions"] += 1
        pending_spot = [p for p in self.pending if p[2]]
        if pending_spot and self.rng.random() < len(pending_spot) / (len(pending_spot) + self.ready_spot):
            self.pending.remove(pending_spot[0])
            heapq.heapify(self.pending)
            self._create_pods(1, cfg.replacement_delay_s)
            return
        if cfg.drain_on_notice:
            share = 1.0 / self.ready_pods
            n, w = self.in_service * share, self.in_service_work * share
            self.in_service -= n
            self.in_service_work -= w
            self.ready_spot -= 1
            self.draining.append([self.t + cfg.notice_s, n, w])
            self._create_pods(1, cfg.replacement_delay_s)
        else:
            self.noticed.append((self.t + cfg.notice_s, self._next_pod_id))
            self._next_pod_id += 1

    # ------------------------------------------------------------------ the clock
    def advance(self, seconds: int) -> IntervalStats:
        """Run up to `seconds` simulated seconds under the target and spot share in force."""
        cfg = self.config
        kn_cfg = self.knative
        server = cfg.server
        spot_cfg = cfg.spot
        hard_limit = float(min(server.max_batch, kn_cfg.container_concurrency or server.max_batch))
        base_step, per_request_step, max_batch = server.base_step_s, server.per_request_step_s, float(server.max_batch)
        window, window_len, panic_len = self._window, len(self._window), self._panic_len
        interrupt_rate = spot_cfg.interruptions_per_node_hour / 3600.0
        tick = int(kn_cfg.tick_interval_s)
        bound = cfg.binding == "pod"
        start_t, end_t = self.t, min(self.seconds, self.t + int(seconds))
        start_cost, start_failed = self.totals["cost"], self.totals["failed"]
        start_cold, start_int = self.totals["cold_starts"], self.totals["interruptions"]
        ready_sum = 0.0
        concurrency_sum = 0.0
        arrivals_list, work_list = self._arrivals, self._arrival_work
        admitted_cum = self.admitted_cumulative
        for t in range(start_t, end_t):
            self.t = t
            # Pods that finished starting.
            while self.pending and self.pending[0][0] <= t:
                _, _, is_spot = heapq.heappop(self.pending)
                if is_spot:
                    self.ready_spot += 1
                else:
                    self.ready_on_demand += 1
            # Spot interruptions: at most one notice per second (the rate makes two vanishingly rare).
            spot_pods = self.ready_spot + sum(1 for p in self.pending if p[2]) if self.pending else self.ready_spot
            if spot_pods and self._uniforms[t] < 1.0 - math.exp(-spot_pods * interrupt_rate):
                self._interrupt_spot_pod()
            # Undrained noticed pods die with their share of the in-flight requests.
            while self.noticed and self.noticed[0][0] <= t:
                self.noticed.pop(0)
                share = 1.0 / max(self.ready_pods, 1)
                self.totals["failed"] += self.in_service * share
                self.in_service -= self.in_service * share
                self.in_service_work -= self.in_service_work * share
                self.ready_spot -= 1
                self._create_pods(1)
            ready = self.ready_on_demand + self.ready_spot
            # Admission, FIFO: the queue first, then this second's arrivals, up to the pods' hard limit.
            arrivals, arrival_work = arrivals_list[t], work_list[t]
            free = ready * hard_limit - self.in_service
            if bound:
                admitted_cum[t + 1] = admitted_cum[t] + self._bound_second(t, ready, arrivals, arrival_work, hard_limit)
            elif free > 0.0 and (self.queue > 0.0 or arrivals > 0.0):
                from_queue = min(self.queue, free)
                if from_queue > 0.0:
                    moved_work = self.queue_work * (from_queue / self.queue)
                    self.queue -= from_queue
                    self.queue_work -= moved_work
                    self.in_service += from_queue
                    self.in_service_work += moved_work
                    free -= from_queue
                new = min(arrivals, free)
                admitted = from_queue + new
                if new > 0.0:
                    moved_work = arrival_work * (new / arrivals)
                    self.in_service += new
                    self.in_service_work += moved_work
                    self.queue += arrivals - new
                    self.queue_work += arrival_work - moved_work
                else:
                    self.queue += arrivals
                    self.queue_work += arrival_work
            else:
                admitted = 0.0
                self.queue += arrivals
                self.queue_work += arrival_work
            if not bound:
                admitted_cum[t + 1] = admitted_cum[t] + admitted
            # Service: every in-flight request decodes 1/step tokens this second (processor sharing).
            batch = self.in_service / ready if ready else 0.0
            step = base_step + per_request_step * min(max(batch, 1.0), max_batch)
            if not bound:
                self.step_time_s[t] = step
            if self.in_service_work > 0.0 and not bound:
                done_work = min(self.in_service_work, self.in_service / step)
                completed = self.in_service * done_work / self.in_service_work
                self.in_service -= completed
                self.in_service_work -= done_work
                if self.in_service < 1e-9:
                    self.in_service = self.in_service_work = 0.0
            for pod in self.draining:
                if pod[2] > 0.0:
                    pod_step = base_step + per_request_step * min(max(pod[1], 1.0), max_batch)
                    done = min(pod[2], pod[1] / pod_step)
                    pod[1] -= pod[1] * done / pod[2]
                    pod[2] -= done
            while self.draining and self.draining[0][0] <= t:
                self.totals["failed"] += self.draining.pop(0)[1]
            # The KPA's 1 s bucket: every request the revision holds, queued or in service.
            concurrency = self.in_service + self.queue
            oldest = window[t % window_len]
            window[t % window_len] = concurrency
            self._stable_sum += concurrency - oldest
            self._panic_sum += concurrency - window[(t - panic_len) % window_len]
            self._buckets_seen += 1
            concurrency_sum += concurrency
            self.concurrency_series[t] = concurrency
            # Decider tick, or at once when a request reaches a revision with no pods.
            if t % tick == 0 or (arrivals > 0.0 and ready == 0 and not self.pending):
                self._decide(t, ready)
            # Cost: every pod that holds a node, ready, starting or draining.
            pending_spot = sum(1 for p in self.pending if p[2]) if self.pending else 0
            spot_nodes = self.ready_spot + pending_spot + len(self.draining)
            on_demand_nodes = self.ready_on_demand + len(self.pending) - pending_spot
            self.totals["cost"] += spot_cfg.price_per_second(on_demand_nodes, spot_nodes)
            ready_sum += ready
            self.ready_series[t] = ready
            self.pending_series[t] = len(self.pending)
        self.t = end_t
        self.target_series[start_t:end_t] = knative.effective_target(kn_cfg)
        n = max(end_t - start_t, 1)
        self.totals["ready_pod_seconds"] += ready_sum
        within, admitted_count, p95 = self._score_admitted(end_t)
        self.latency_p95_series.append((float(end_t), p95))
        arrivals_count = int(self._arrived_before[end_t] - self._arrived_before[start_t])
        stats = IntervalStats(
            seconds=end_t - start_t,
            arrivals=arrivals_count,
            admitted=admitted_count,
            within_slo=within,
            failed=self.totals["failed"] - start_failed,
            cost=self.totals["cost"] - start_cost,
            cold_starts=int(self.totals["cold_starts"] - start_cold),
            interruptions=int(self.totals["interruptions"] - start_int),
            p95_latency_s=p95,
            mean_ready_pods=ready_sum / n,
            mean_concurrency=concurrency_sum / n,
            metrics={},
        )
        stats.metrics = self.knative_metrics(stats)
        return stats

    def _bound_second(self, t: int, ready: int, arrivals: float, arrival_work: float, hard_limit: float) -> float:
        """One second under binding "pod": admission and service per group of pods. Returns the requests
        admitted. The revision-wide fields (`in_service`, `queue`, ...) stay the groups' sums; the queue
        outside any group is the activator's, which holds requests only while no pod is ready."""
        server = self.config.server
        groups = self.pod_groups
        in_groups = sum(g[1] for g in groups)
        if in_groups > 0.0 and abs(in_groups - self.in_service) > 1e-9:
            # Spot interruptions took their pod's share from the revision-wide figures: take it from every group.
            kept = max(self.in_service, 0.0) / in_groups
            for g in groups:
                g[1] *= kept
                g[2] *= kept
        # Pods that became ready form a new group; pods removed leave the newest groups first (the
        # ReplicaSet deletes the youngest), their requests finishing on the next older group (graceful drain).
        counted = sum(int(g[0]) for g in groups)
        if ready > counted:
            groups.append([float(ready - counted), 0.0, 0.0, 0.0, 0.0])
        while counted > ready and groups:
            newest = groups[-1]
            leaving = min(newest[0], float(counted - ready))
            share = leaving / newest[0]
            moved = [value * share for value in newest[1:]]
            newest[0] -= leaving
            for i, value in enumerate(moved, start=1):
                newest[i] -= value
            counted -= int(leaving)
            if newest[0] <= 0.0:
                groups.pop()
            target = groups[-1] if groups else None
            if target is None:  # no pod left: what they held waits in the activator
                self._activator_queue += moved[0] + moved[2]
                self._activator_queue_work += moved[1] + moved[3]
            else:
                for i, value in enumerate(moved, start=1):
                    target[i] += value
        while len(groups) > MAX_POD_GROUPS:  # merge the two neighbours with the closest load per pod
            loads = [g[1] / g[0] for g in groups]
            i = min(range(len(groups) - 1), key=lambda k: abs(loads[k] - loads[k + 1]))
            merged = [a + b for a, b in zip(groups[i], groups[i + 1], strict=True)]
            groups[i : i + 2] = [merged]
        # The activator's held requests and this second's arrivals, spread over the ready pods.
        incoming, incoming_work = arrivals + self._activator_queue, arrival_work + self._activator_queue_work
        if ready:
            self._activator_queue = self._activator_queue_work = 0.0
            for g in groups:
                g[3] += incoming * g[0] / ready
                g[4] += incoming_work * g[0] / ready
        else:
            self._activator_queue, self._activator_queue_work = incoming, incoming_work
        admitted = 0.0
        weighted_step = 0.0
        for g in groups:
            room = g[0] * hard_limit - g[1]
            if room > 0.0 and g[3] > 0.0:
                taken = min(g[3], room)
                work = g[4] * taken / g[3]
                g[1] += taken
                g[2] += work
                g[3] -= taken
                g[4] -= work
                admitted += taken
            step = server.base_step_s + server.per_request_step_s * min(max(g[1] / g[0], 1.0), server.max_batch)
            weighted_step += g[0] * step
            if g[2] > 0.0:
                done_work = min(g[2], g[1] / step)
                g[1] -= g[1] * done_work / g[2]
                g[2] -= done_work
                if g[1] < 1e-9:
                    g[1] = g[2] = 0.0
        # A request admitted this second joins a group with that group's step time; scored with the
        # pod-weighted mean (the spread between groups shows in the revision's concurrency, not per request).
        self.step_time_s[t] = weighted_step / ready if ready else server.base_step_s
        self.in_service = sum(g[1] for g in groups)
        self.in_service_work = sum(g[2] for g in groups)
        self.queue = self._activator_queue + sum(g[3] for g in groups)
        self.queue_work = self._activator_queue_work + sum(g[4] for g in groups)
        return admitted

    def _decide(self, t: int, ready: int) -> None:
        cfg = self.knative
        seen = self._buckets_seen
        stable = self._stable_sum / min(seen, len(self._window))
        panic = self._panic_sum / min(seen, self._panic_len)
        decision = knative.scale(cfg, self.decider, float(t), ready, stable, panic)
        self.decider = decision.state
        self.activator_in_path = decision.activator_in_path
        desired, self.activity = knative.scale_to_zero_step(cfg, self.activity, float(t), decision.desired_pods)
        if desired == 0 and not self.activator_in_path:
            desired = 1  # Knative scales to zero only with the activator in the path
        self._scale_to(knative.bounded_scale(cfg, desired))

    # ------------------------------------------------------------------ scoring
    def _score_admitted(self, end_t: int) -> tuple[int, int, float]:
        """Latencies of the requests admitted since the last call (FIFO order = arrival order)."""
        admitted_total = int(math.floor(self.admitted_cumulative[end_t] + 1e-6))
        lo, hi = self._scored, min(admitted_total, len(self.trace))
        if hi <= lo:
            return 0, 0, float("nan")
        index = np.arange(lo, hi)
        # The second in which request k was admitted: the first t with admitted_cumulative[t+1] > k.
        admit_second = np.searchsorted(self.admitted_cumulative[1 : end_t + 1], index + 1e-6, side="left")
        admit_second = np.minimum(admit_second, end_t - 1)
        arrival = self.trace.arrival_s[lo:hi]
        wait = np.maximum(admit_second - np.floor(arrival), 0.0)
        latency = wait + self._request_work[lo:hi] * self.step_time_s[admit_second]
        within = int(np.count_nonzero(latency <= self._budget[lo:hi]))
        self._scored = hi
        self._within += within
        self._latencies.append(latency.astype(np.float32))
        return within, hi - lo, p95(latency)

    @property
    def latencies(self) -> list[np.ndarray]:
        """Latencies of the requests scored so far, in admission (= trace) order, one array per interval."""
        return self._latencies

    def summary(self) -> EpisodeSummary:
        """Totals for the run so far; requests still queued at the end count as unserved."""
        total = len(self.trace) if self.done else int(self._arrived_before[self.t])
        latencies = np.concatenate(self._latencies) if self._latencies else np.zeros(0)
        failed = self.totals["failed"]
        unserved = max(total - self._scored, 0)
        return EpisodeSummary(
            requests=total,
            cost=self.totals["cost"],
            slo_attainment=max(self._within - failed, 0.0) / total if total else 1.0,
            served_share=1.0 - (failed + unserved) / total if total else 1.0,
            p95_latency_s=p95(latencies),
            cold_starts=int(self.totals["cold_starts"]),
            failed=failed,
            interruptions=int(self.totals["interruptions"]),
            mean_ready_pods=self.totals["ready_pod_seconds"] / max(self.t, 1),
        )

    # ------------------------------------------------------------------ what Prometheus would show
    def knative_metrics(self, stats: IntervalStats) -> dict[str, float]:
        """The interval's figures under Knative's Prometheus names, in `observation.POLICY_METRICS` units."""
        return self._revision_metrics(stats) | self._workload_metrics()

    def _workload_metrics(self) -> dict[str, float]:
        """`observation.WORKLOAD_METRICS` as Prometheus answers them at the current second: rates over
        the windows there is history for (`rate` extrapolates over what it has), the per-minute rates'
        standard deviation over the hour, and the panic and stable concurrency gauges sampled every
        `SUBQUERY_STEP_S` over 10 minutes."""
        t = self.t
        arrived = self._arrived_before

        def rate(window: int) -> float:
            span = min(window, t)
            return float(arrived[t] - arrived[t - span]) / span if span else 0.0

        minute_ends = np.arange(t, max(t - RATE_WINDOW_1H_S, MINUTE_S - 1), -MINUTE_S)
        minute_rates = (arrived[minute_ends] - arrived[minute_ends - MINUTE_S]) / MINUTE_S
        stable_len, panic_len = len(self._window), self._panic_len
        history = self.concurrency_series[max(t - RATE_WINDOW_10M_S - stable_len, 0) : t]
        cumulative = np.concatenate([[0.0], np.cumsum(history)])
        ends = np.arange(cumulative.size - 1, max(cumulative.size - 1 - RATE_WINDOW_10M_S, 0), -SUBQUERY_STEP_S)
        if ends.size:
            panic = (cumulative[ends] - cumulative[np.maximum(ends - panic_len, 0)]) / np.minimum(ends, panic_len)
            stable = (cumulative[ends] - cumulative[np.maximum(ends - stable_len, 0)]) / np.minimum(ends, stable_len)
            peak, mean = max(float(panic.max()), 0.0), max(float(stable.mean()), 0.0)
        else:
            peak = mean = 0.0
        return {
            "request_rate_10m": rate(RATE_WINDOW_10M_S),
            "request_rate_1h": rate(RATE_WINDOW_1H_S),
            "request_rate_stddev_1h": float(minute_rates.std()) if minute_rates.size else 0.0,
            "peak_concurrency_10m": peak,
            "mean_concurrency_10m": mean,
        }

    def _revision_metrics(self, stats: IntervalStats) -> dict[str, float]:
        return {
            "revision_app_request_count": stats.arrivals / max(stats.seconds, 1),
            # As Prometheus answers it from queue-proxy's histogram: capped at its largest bucket.
            "revision_app_request_latencies": min(stats.p95_latency_s, knative.LATENCY_HISTOGRAM_MAX_S) * 1000.0,
            # The running sums drift by rounding (-1e-16 once the window empties): a gauge is never below 0.
            "autoscaler_stable_request_concurrency": max(self._stable_sum, 0.0) / max(min(self._buckets_seen, len(self._window)), 1),
            "autoscaler_panic_request_concurrency": max(self._panic_sum, 0.0) / max(min(self._buckets_seen, self._panic_len), 1),
            "autoscaler_actual_pods": float(self.ready_pods),
            "autoscaler_not_ready_pods": float(len(self.pending)),
        }

    @property
    def time_of_day_s(self) -> float:
        return (self.trace.start_time_of_day_s + self.t) % SECONDS_PER_DAY

    @property
    def target(self) -> float:
        """The per-pod concurrency target in force, before utilisation."""
        return knative.total_target(self.knative)

    def observation(self, stats: IntervalStats, spot_allowed: bool, bounds: ActionBounds = ActionBounds()) -> np.ndarray:
        """The policy's observation after an interval, built exactly as the operator builds it."""
        return observation_from_metrics(
            stats.metrics, target=self.target, time_of_day_s=self.time_of_day_s,
            reference_latency_s=self.config.slo.reference_latency_s, spot_pods=float(self.ready_spot),
            spot_allowed=spot_allowed, bounds=bounds,
        )
