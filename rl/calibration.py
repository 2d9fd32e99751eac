"""The simulator against real Knative: one trace slice's run, real or simulated, reduced to the same figures.

A run (`RunRecord`) is what both sides can report at 1 s resolution: the ready pods, the pods that hold
capacity (starting or ready), the pod count the autoscaler wants, each request's latency (in trace order;
NaN when it was not answered) and each new pod's start time (creation to ready). `summarize` turns one
into the figures the issue compares (ready pods over time, p95 latency, cold starts, scale-up lag, cost in
pod-seconds, SLO attainment) and `compare` puts a real and a simulated run side by side. Everything here is
pure; the real run's sampling and load generation live in `bench/knative_vs_simulator.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agentkube.rl.simulator import Simulator, SLOConfig

__all__ = ["RunRecord", "scale_up_lags", "summarize", "compare", "simulated_run"]


@dataclass(frozen=True)
class RunRecord:
    """One run of a trace slice at 1 s resolution (all series of the same length)."""

    ready: np.ndarray  # ready pods at each second
    pods: np.ndarray  # pods holding capacity: starting or ready (not ones being deleted)
    desired: np.ndarray  # the pod count the autoscaler wants at each second
    latency_s: np.ndarray  # per request, in trace order; NaN = not answered
    response_tokens: np.ndarray  # per request, for its SLO budget
    pod_start_s: np.ndarray  # per pod created during the run: seconds from creation to ready


def scale_up_lags(desired: np.ndarray, ready: np.ndarray) -> tuple[list[float], int]:
    """Seconds from each rise of the wanted pod count above the ready count until that many pods are ready.

    A rise that the autoscaler takes back before it is met (the wanted count falls to what is ready) ends
    there: the lag is until then. Returns the lags and how many rises were still unmet when the run ended
    (censored, not counted in the lags)."""
    lags: list[float] = []
    censored = 0
    for t in range(len(desired)):
        previous = desired[t - 1] if t else ready[0]
        if desired[t] <= previous or desired[t] <= ready[t]:
            continue
        met = np.flatnonzero((ready[t:] >= desired[t]) | (desired[t:] <= ready[t:]))
        if met.size:
            lags.append(float(met[0]))
        else:
            censored += 1
    return lags, censored


def _quantile(values: np.ndarray | list[float], q: float) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.quantile(array, q)) if array.size else math.nan


def summarize(run: RunRecord, slo: SLOConfig) -> dict[str, float]:
    """The figures compared between a real and a simulated run. SLO attainment counts a request not
    answered as a miss; the p95 is over answered requests."""
    answered = ~np.isnan(run.latency_s)
    budget = slo.budget_s(run.response_tokens.astype(float))
    within = answered & (np.nan_to_num(run.latency_s, nan=np.inf) <= budget)
    lags, censored = scale_up_lags(run.desired, run.ready)
    requests = int(run.latency_s.size)
    return {
        "seconds": float(run.ready.size),
        "requests": float(requests),
        "answered_share": float(answered.mean()) if requests else 1.0,
        "slo_attainment": float(within.mean()) if requests else 1.0,
        "p50_latency_s": _quantile(run.latency_s[answered], 0.5),
        "p95_latency_s": _quantile(run.latency_s[answered], 0.95),
        "pod_seconds": float(run.pods.sum()),
        "ready_pod_seconds": float(run.ready.sum()),
        "mean_ready_pods": float(run.ready.mean()) if run.ready.size else 0.0,
        "max_ready_pods": float(run.ready.max()) if run.ready.size else 0.0,
        "cold_starts": float(run.pod_start_s.size),
        "pod_start_median_s": _quantile(run.pod_start_s, 0.5),
        "pod_start_max_s": float(run.pod_start_s.max()) if run.pod_start_s.size else math.nan,
        "scale_ups": float(len(lags)),
        "scale_up_lag_median_s": _quantile(lags, 0.5),
        "scale_up_lag_max_s": max(lags) if lags else math.nan,
        "scale_ups_unmet_at_end": float(censored),
    }


def compare(real: RunRecord, simulated: RunRecord, slo: SLOConfig) -> dict[str, dict[str, float]]:
    """Both runs' figures, the simulator's over the real one's for each, and how far apart the ready-pod
    series are (mean absolute difference over the common seconds, and the same on minute means)."""
    real_figures, sim_figures = summarize(real, slo), summarize(simulated, slo)
    ratios = {key: (sim_figures[key] / real_figures[key] if real_figures[key] not in (0.0,) and
                    not math.isnan(real_figures[key]) else math.nan) for key in real_figures}
    n = min(real.ready.size, simulated.ready.size)
    minutes = n // 60
    real_minutes = real.ready[: minutes * 60].reshape(minutes, 60).mean(axis=1) if minutes else np.zeros(0)
    sim_minutes = simulated.ready[: minutes * 60].reshape(minutes, 60).mean(axis=1) if minutes else np.zeros(0)
    gaps = {
        "ready_pods_mean_abs_diff": float(np.abs(real.ready[:n] - simulated.ready[:n]).mean()) if n else math.nan,
        "ready_pods_minute_mean_abs_diff": float(np.abs(real_minutes - sim_minutes).mean()) if minutes else math.nan,
    }
    return {"real": real_figures, "simulator": sim_figures, "simulator_over_real": ratios, "gaps": gaps}


def simulated_run(sim: Simulator) -> RunRecord:
    """A finished simulator run as a `RunRecord`: the wanted count is what is ready plus what is starting
    (the simulator creates and removes pods at the decision), latencies in trace order (FIFO admission,
    so the scored requests are the trace's first ones; the rest were never admitted)."""
    latencies = np.concatenate(sim.latencies) if sim.latencies else np.zeros(0)
    latency = np.full(len(sim.trace), np.nan)
    latency[: latencies.size] = latencies
    return RunRecord(
        ready=sim.ready_series.astype(float), pods=(sim.ready_series + sim.pending_series).astype(float),
        desired=(sim.ready_series + sim.pending_series).astype(float), latency_s=latency,
        response_tokens=sim.trace.response_tokens, pod_start_s=np.asarray(sim.pod_start_s, dtype=float))
