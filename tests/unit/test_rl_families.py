"""Workload families: the randomised training draws, the held-out families, the closest workload, and
user traces in BurstGPT's format (clear errors on a bad file)."""

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from agentkube.rl.simulator import SimConfig
from agentkube.rl.traces import WORKLOADS, TraceFormatError, WorkloadProfile, generate_trace, load_burstgpt, training_trace
from agentkube.rl.workloads import (
    HELD_OUT_FAMILIES,
    TrainingRanges,
    closest_workload,
    held_out_trace,
    sample_training_workload,
    trace_shape,
)

HOUR = 3600


def test_training_draws_cover_the_ranges_and_vary_the_server():
    rng = np.random.default_rng(0)
    ranges = TrainingRanges()
    draws = [sample_training_workload(rng, ranges) for _ in range(400)]
    rates = np.array([p.mean_rate_rps for p, _ in draws])
    cvs = np.array([p.interarrival_cv for p, _ in draws])
    assert ranges.mean_rate_rps[0] <= rates.min() < 2.0 and 30.0 < rates.max() <= ranges.mean_rate_rps[1]
    assert ranges.interarrival_cv[0] <= cvs.min() and cvs.max() <= ranges.interarrival_cv[1]
    calm = sum(p.flash_crowds_per_day == 0 and p.erratic_bursts_per_day == 0 for p, _ in draws) / len(draws)
    assert 0.15 < calm < 0.35
    assert len({p.response_base_tokens for p, _ in draws}) > 1
    steps = {round(c.server.base_step_s, 5) for _, c in draws}
    loads = [c.cold_start.model_load_s for _, c in draws]
    assert len(steps) > 100 and min(loads) >= 10.0 and max(loads) <= 40.0
    # The batching curve keeps its shape: both decode-step terms scale together.
    base = SimConfig().server
    assert all(c.server.knee_concurrency == pytest.approx(base.knee_concurrency) for _, c in draws)


def test_generating_from_a_time_of_day_matches_the_whole_day():
    profile = replace(WORKLOADS["conversation"], interarrival_cv=1.0)
    late = generate_trace(profile, 4, HOUR, start_time_of_day_s=15 * HOUR)
    night = generate_trace(profile, 4, HOUR, start_time_of_day_s=3 * HOUR)
    assert late.start_time_of_day_s == 15 * HOUR
    assert len(late) > 2 * len(night)  # the afternoon peak against the night trough


@pytest.mark.parametrize("family", sorted(HELD_OUT_FAMILIES))
def test_held_out_families_are_seeded_and_differ_from_training(family):
    trace = held_out_trace(family, 0, 2 * HOUR)
    again = held_out_trace(family, 0, 2 * HOUR)
    assert np.array_equal(trace.arrival_s, again.arrival_s) and trace.name == f"{family}-0"
    assert len(trace) > 0 and np.all(np.diff(trace.arrival_s) >= 0) and trace.arrival_s.max() < 2 * HOUR
    assert not np.array_equal(held_out_trace(family, 1, 2 * HOUR).arrival_s[:50], trace.arrival_s[:50])


def test_held_out_processes_have_the_shapes_they_are_named_for():
    mmpp = trace_shape(held_out_trace("mmpp", 0, 6 * HOUR))
    on_off = trace_shape(held_out_trace("on-off-pareto", 0, 6 * HOUR))
    steady = trace_shape(generate_trace(WorkloadProfile(mean_rate_rps=10.0, interarrival_cv=1.0, daily_amplitude=0.0), 1, 6 * HOUR))
    assert mmpp[1] > 3 * steady[1] and on_off[1] > 3 * steady[1]
    high = trace_shape(held_out_trace("high-rate", 0))
    assert np.exp(high[0]) > 40.0  # above the training range's top rate


def test_the_closest_workload_is_found_by_rate_and_variability():
    references = {w: training_trace(w, 0) for w in sorted(WORKLOADS)}
    # Other days of each workload (flash day 1 had few crowds and reads as an API day: not used here).
    for workload, index in (("api", 1), ("api", 2), ("conversation", 1), ("flash", 2), ("flash", 3)):
        assert closest_workload(training_trace(workload, index), references) == workload


def test_a_bad_trace_file_gets_a_clear_error(tmp_path):
    header = "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    cases = {
        "missing.csv": (None, "cannot be read"),
        "columns.csv": ("time,tokens\n1,2\n", "no column 'Timestamp'"),
        "text.csv": (header + "5,1,1,ChatGPT,472,18,490,Conversation log\nsoon,2,1,ChatGPT,1,2,3,API log\n", "line 3"),
        "negative.csv": (header + "5,1,1,ChatGPT,-4,18,14,Conversation log\n", "≥ 0"),
        "empty.csv": (header, "no requests"),
        "binary.csv": (b"\xff\xfe\x00\x01" * 10, "not"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(TraceFormatError, match=expected) as raised:
            load_burstgpt(path)
        assert name in str(raised.value)


def test_rl_evaluate_refuses_a_bad_trace_before_running_anything(tmp_path):
    from agentkube.rl.cli import rl_app

    path = tmp_path / "trace.csv"
    path.write_text("time,tokens\n1,2\n")
    result = CliRunner().invoke(rl_app, ["evaluate", "--trace", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no column 'Timestamp'" in result.output
    assert not (tmp_path / "out").exists()
