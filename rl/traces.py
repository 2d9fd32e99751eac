"""Request traces: the BurstGPT CSV format and a seeded generator with BurstGPT's shape.

BurstGPT (arXiv 2401.17644) found Gamma-distributed inter-arrival times (bursty, CV > 1), strong daily
cycles for conversation traffic, day-long erratic bursts for API traffic, Zipf-like token lengths, and
response length growing roughly linearly with request length (median about 100–200 tokens for short
requests, about 450 at 2,000). The generator reproduces those shapes, with flash crowds on top.
Training and evaluation traces come from disjoint seed streams (`trace_seed`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = [
    "Trace",
    "WorkloadProfile",
    "WORKLOADS",
    "BURSTGPT_COLUMNS",
    "load_burstgpt",
    "TraceFormatError",
    "write_burstgpt",
    "generate_trace",
    "trace_from_rate",
    "trace_seed",
    "training_trace",
    "evaluation_trace",
]

BURSTGPT_COLUMNS = (
    "Timestamp", "Session ID", "Elapsed time", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type",
)
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival: seconds from the trace start and token counts."""

    arrival_s: np.ndarray
    request_tokens: np.ndarray
    response_tokens: np.ndarray
    duration_s: float
    name: str = "trace"
    start_time_of_day_s: float = 0.0

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def window(self, start_s: float, duration_s: float) -> Trace:
        """The requests in [start_s, start_s + duration_s), re-based to start at zero."""
        lo, hi = np.searchsorted(self.arrival_s, [start_s, start_s + duration_s])
        return replace(
            self,
            arrival_s=self.arrival_s[lo:hi] - start_s,
            request_tokens=self.request_tokens[lo:hi],
            response_tokens=self.response_tokens[lo:hi],
            duration_s=float(duration_s),
            start_time_of_day_s=(self.start_time_of_day_s + start_s) % SECONDS_PER_DAY,
        )


    def thinned(self, keep: float, seed: int | np.random.SeedSequence = 0) -> Trace:
        """Each request kept with probability `keep` (seeded): the rate scaled by `keep` while every time
        scale of the trace (bursts, crowds, the daily shape) and the token lengths stay as they were,
        which compressing time (`load_burstgpt`'s `rate_scale`) would not keep."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], not {keep}")
        kept = np.random.default_rng(seed).random(len(self)) < keep
        return replace(self, arrival_s=self.arrival_s[kept], request_tokens=self.request_tokens[kept],
                       response_tokens=self.response_tokens[kept])


class TraceFormatError(ValueError):
    """A file that is not a usable BurstGPT CSV; the message names the file, the line and what is wrong."""


# The columns the loader reads; the others of `BURSTGPT_COLUMNS` may be absent.
_REQUIRED_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def load_burstgpt(path: str | Path, *, rate_scale: float = 1.0, log_type: str | None = None, name: str | None = None) -> Trace:
    """Read a BurstGPT CSV. `rate_scale` > 1 compresses time (more requests per second);
    `log_type` keeps only "Conversation log" or "API log" rows. Raises `TraceFormatError` on a file
    that is missing, not CSV with BurstGPT's columns, or has a row that is not numbers ≥ 0."""
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be positive, not {rate_scale}")
    arrivals, requests, responses = [], [], []
    try:
        handle = open(path, newline="")
    except OSError as error:
        raise TraceFormatError(f"{path}: cannot be read ({error.strerror or error})") from error
    with handle:
        reader = csv.DictReader(handle)
        try:
            header = [column.strip() for column in reader.fieldnames or ()]
        except (UnicodeDecodeError, csv.Error) as error:
            raise TraceFormatError(f"{path}: not a CSV file ({error})") from error
        missing = [column for column in _REQUIRED_COLUMNS if column not in header]
        if missing:
            raise TraceFormatError(f"{path}: not a BurstGPT CSV: no column {', '.join(repr(m) for m in missing)} "
                                   f"(the header must name {', '.join(BURSTGPT_COLUMNS)})")
        if log_type is not None and "Log Type" not in header:
            raise TraceFormatError(f"{path}: no 'Log Type' column to select {log_type!r} rows by")
        reader.fieldnames = header
        try:
            for row in reader:
                if log_type is not None and (row.get("Log Type") or "").strip() != log_type:
                    continue
                try:
                    values = [float(row[column]) for column in _REQUIRED_COLUMNS]
                except (TypeError, ValueError):
                    raise TraceFormatError(f"{path}, line {reader.line_num}: {_REQUIRED_COLUMNS} must be numbers, "
                                           f"got {[row.get(c) for c in _REQUIRED_COLUMNS]}") from None
                if not all(np.isfinite(values)) or min(values) < 0:
                    raise TraceFormatError(f"{path}, line {reader.line_num}: timestamps and token counts must be "
                                           f"finite and ≥ 0, got {values}")
                arrivals.append(values[0])
                requests.append(int(values[1]))
                responses.append(int(values[2]))
        except (UnicodeDecodeError, csv.Error) as error:
            raise TraceFormatError(f"{path}, line {reader.line_num}: not CSV ({error})") from error
    if not arrivals:
        raise TraceFormatError(f"{path}: no requests" + (f" of log type {log_type!r}" if log_type else ""))
    arrival = np.asarray(arrivals, dtype=float)
    order = np.argsort(arrival, kind="stable")
    arrival = (arrival[order] - arrival[order][0]) / rate_scale
    duration = float(np.floor(arrival[-1]) + 1.0)
    return Trace(arrival, np.asarray(requests, dtype=np.int64)[order], np.asarray(responses, dtype=np.int64)[order],
                 duration, name or Path(path).stem)


def write_burstgpt(trace: Trace, path: str | Path, model: str = "ChatGPT", log_type: str = "Conversation log") -> None:
    """Write a trace in BurstGPT's CSV format (one session per request, no elapsed time)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(BURSTGPT_COLUMNS)
        for i, (t, req, resp) in enumerate(zip(trace.arrival_s, trace.request_tokens, trace.response_tokens, strict=True)):
            writer.writerow([f"{t:.3f}", i, 0, model, int(req), int(resp), int(req + resp), log_type])


@dataclass(frozen=True)
class WorkloadProfile:
    """The shape of a generated workload."""

    mean_rate_rps: float = 20.0
    interarrival_cv: float = 1.5  # Gamma inter-arrivals: shape = 1/cv^2; BurstGPT reports CV > 1
    daily_amplitude: float = 0.8  # 0 = flat; peaks late morning and mid afternoon
    weekend_factor: float = 0.5
    flash_crowds_per_day: float = 0.0
    flash_multiplier: tuple[float, float] = (3.0, 6.0)
    flash_duration_s: tuple[float, float] = (120.0, 900.0)
    erratic_bursts_per_day: float = 0.0  # API-style: hour-long plateaus of changed load
    zipf_exponent: float = 2.0  # request tokens ~ Zipf–Mandelbrot: P(n) ∝ (n + offset)^-exponent
    zipf_offset: float = 250.0
    max_request_tokens: int = 8192
    response_base_tokens: float = 120.0  # median response = base + slope × request tokens
    response_slope: float = 0.165
    response_sigma: float = 0.6
    max_response_tokens: int = 2048


WORKLOADS: dict[str, WorkloadProfile] = {
    "conversation": WorkloadProfile(),
    "api": WorkloadProfile(mean_rate_rps=15.0, interarrival_cv=2.5, daily_amplitude=0.2, erratic_bursts_per_day=6.0),
    "flash": WorkloadProfile(mean_rate_rps=12.0, interarrival_cv=2.0, daily_amplitude=0.6, flash_crowds_per_day=8.0),
}


def _daytime_bumps(hour: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((hour - 10.5) / 2.0) ** 2) + 0.9 * np.exp(-0.5 * ((hour - 15.0) / 2.0) ** 2)


_DAILY_BUMP_MEAN = float(_daytime_bumps(np.linspace(0.0, 24.0, 1440, endpoint=False)).mean())


def _rate_curve_rps(
    profile: WorkloadProfile, rng: np.random.Generator, seconds: int, start_day: int, start_s: float = 0.0,
) -> np.ndarray:
    t = np.arange(seconds, dtype=float) + start_s
    hour = (t % SECONDS_PER_DAY) / 3600.0
    # Two daytime peaks over a night-time trough, normalised to a mean of 1 over the day.
    shape = 1.0 + profile.daily_amplitude * (_daytime_bumps(hour) / _DAILY_BUMP_MEAN - 1.0)
    rate = profile.mean_rate_rps * np.maximum(shape, 0.05)
    day = start_day + (t // SECONDS_PER_DAY).astype(int)
    rate = np.where(day % 7 >= 5, rate * profile.weekend_factor, rate)
    days = seconds / SECONDS_PER_DAY
    for _ in range(rng.poisson(profile.erratic_bursts_per_day * days)):
        start = start_s + rng.uniform(0, seconds)
        length = rng.uniform(1800, 7200)
        rate[(t >= start) & (t < start + length)] *= rng.uniform(0.3, 2.5)
    for _ in range(rng.poisson(profile.flash_crowds_per_day * days)):
        start = start_s + rng.uniform(0, seconds)
        length = rng.uniform(*profile.flash_duration_s)
        peak = rng.uniform(*profile.flash_multiplier)
        inside = (t >= start) & (t < start + length)
        ramp = np.clip((t[inside] - start) / 15.0, 0.0, 1.0)  # a crowd arrives within seconds
        rate[inside] *= 1.0 + (peak - 1.0) * ramp
    return rate


def _zipf_mandelbrot(rng: np.random.Generator, size: int, exponent: float, offset: float, maximum: int) -> np.ndarray:
    values = np.arange(1, maximum + 1, dtype=float)
    cdf = np.cumsum((values + offset) ** -exponent)
    return np.searchsorted(cdf, rng.uniform(0.0, cdf[-1], size)).astype(np.int64) + 1


def generate_trace(
    profile: WorkloadProfile, seed: int | np.random.SeedSequence, duration_s: float = SECONDS_PER_DAY,
    start_day: int = 0, name: str = "generated", start_time_of_day_s: float = 0.0,
) -> Trace:
    """A seeded trace: Gamma renewal arrivals time-warped through the daily/burst rate curve, starting
    `start_time_of_day_s` into day `start_day` (training generates hours at any time of day this way,
    without generating the whole day around them)."""
    rng = np.random.default_rng(seed)
    seconds = int(np.ceil(duration_s))
    rate = _rate_curve_rps(profile, rng, seconds, start_day, start_time_of_day_s)
    return trace_from_rate(rate, profile, rng, name, (start_day * SECONDS_PER_DAY + start_time_of_day_s) % SECONDS_PER_DAY)


def trace_from_rate(
    rate: np.ndarray, profile: WorkloadProfile, rng: np.random.Generator, name: str, start_time_of_day_s: float = 0.0,
) -> Trace:
    """Requests whose arrival intensity follows `rate` (requests/s, one value a second) with Gamma
    inter-arrival times of the profile's CV, and token lengths from the profile."""
    seconds = rate.size
    cumulative = np.concatenate([[0.0], np.cumsum(rate)])  # expected arrivals by each second
    shape = 1.0 / profile.interarrival_cv**2
    expected = cumulative[-1]
    count_guess = int(expected + 6.0 * np.sqrt(expected * profile.interarrival_cv**2 + 1.0) + 16)
    operational = np.cumsum(rng.gamma(shape, 1.0 / shape, count_guess))  # unit-rate renewal process
    operational = operational[operational < expected]
    arrival = np.interp(operational, cumulative, np.arange(seconds + 1, dtype=float))
    n = arrival.size
    request = _zipf_mandelbrot(rng, n, profile.zipf_exponent, profile.zipf_offset, profile.max_request_tokens)
    median_response = profile.response_base_tokens + profile.response_slope * request
    response = np.clip(np.rint(median_response * rng.lognormal(0.0, profile.response_sigma, n)),
                       1, profile.max_response_tokens).astype(np.int64)
    return Trace(arrival, request, response, float(seconds), name, start_time_of_day_s)


_SPLITS = {"train": 0, "eval": 1}


def trace_seed(split: str, workload: str, index: int, base_seed: int = 2026) -> np.random.SeedSequence:
    """Seeds for training and evaluation traces come from disjoint spawn keys, so no evaluation
    trace is ever seen in training."""
    workload_key = sorted(WORKLOADS).index(workload)
    return np.random.SeedSequence(base_seed, spawn_key=(_SPLITS[split], workload_key, index))


def training_trace(workload: str, index: int, duration_s: float = SECONDS_PER_DAY) -> Trace:
    # Training days are weekdays 0..4 in rotation; evaluation uses its own seeds (and may be any day).
    return generate_trace(WORKLOADS[workload], trace_seed("train", workload, index), duration_s,
                          start_day=index % 5, name=f"{workload}-train-{index}")


def evaluation_trace(workload: str, index: int = 0, duration_s: float = SECONDS_PER_DAY) -> Trace:
    return generate_trace(WORKLOADS[workload], trace_seed("eval", workload, index), duration_s,
                          start_day=index % 5, name=f"{workload}-eval-{index}")
