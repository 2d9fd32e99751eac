"""The model server's behaviour, cold starts, and traces (BurstGPT format and the generator)."""

import math

import numpy as np
import pytest

from agentkube.rl.server import ColdStartConfig, ModelServerConfig, decode_step_s, sample_cold_starts_s, service_time_s
from agentkube.rl.spot import place_new_pods, pods_to_remove
from agentkube.rl.traces import (
    WORKLOADS,
    WorkloadProfile,
    evaluation_trace,
    generate_trace,
    load_burstgpt,
    training_trace,
    write_burstgpt,
)

SERVER = ModelServerConfig()


def test_continuous_batching_throughput_rises_to_a_knee_and_latency_grows():
    concurrency = np.array([1, 8, 32, SERVER.knee_concurrency, 256])
    step = decode_step_s(SERVER, concurrency.astype(float))
    throughput = concurrency / step
    assert np.all(np.diff(throughput) > 0) and np.all(np.diff(step) > 0)
    # Past the knee, throughput is within 2x of its ceiling 1/per_request_step; below it, far from it.
    ceiling = 1.0 / SERVER.per_request_step_s
    assert throughput[3] == pytest.approx(ceiling / 2)
    assert throughput[0] < ceiling / 50
    # The server's own batch limit caps the batch.
    assert decode_step_s(SERVER, 10_000.0) == decode_step_s(SERVER, 256.0)


def test_service_time_counts_prompt_and_response_tokens():
    at_one = service_time_s(SERVER, 1000, 200, 1.0)
    assert at_one == pytest.approx((200 + SERVER.prefill_token_cost * 1000) * (SERVER.base_step_s + SERVER.per_request_step_s))
    assert service_time_s(SERVER, 1000, 200, 64.0) > at_one


def test_cold_start_lognormal_matches_the_published_mean_and_sd():
    config = ColdStartConfig(model_load_s=0.0)
    mu, sigma = config.lognormal_mu_sigma
    assert math.exp(mu + sigma**2 / 2) == pytest.approx(3.24)
    assert math.sqrt(math.exp(sigma**2) - 1) * 3.24 == pytest.approx(7.10)
    samples = sample_cold_starts_s(config, np.random.default_rng(0), 200_000)
    assert np.median(samples) == pytest.approx(math.exp(mu), rel=0.02)
    assert samples.mean() == pytest.approx(3.24, rel=0.1)
    loaded = sample_cold_starts_s(ColdStartConfig(model_load_s=20.0), np.random.default_rng(0), 10)
    assert np.allclose(loaded - 20.0, sample_cold_starts_s(config, np.random.default_rng(0), 10))


def test_generator_is_seeded_and_bursty():
    flat = WorkloadProfile(mean_rate_rps=10.0, interarrival_cv=2.0, daily_amplitude=0.0, weekend_factor=1.0)
    one, two = generate_trace(flat, 7, 3600), generate_trace(flat, 7, 3600)
    assert np.array_equal(one.arrival_s, two.arrival_s) and np.array_equal(one.response_tokens, two.response_tokens)
    assert len(one) == pytest.approx(36_000, rel=0.1)
    gaps = np.diff(one.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)  # Gamma inter-arrivals with CV 2
    assert np.all(np.diff(one.arrival_s) >= 0)


def test_daily_cycle_peaks_in_the_day_and_weekends_are_quieter():
    trace = generate_trace(WorkloadProfile(interarrival_cv=1.0), 3, 86_400 * 7, start_day=0)
    per_hour = np.bincount((trace.arrival_s // 3600).astype(int), minlength=24 * 7).reshape(7, 24)
    weekday = per_hour[:5].mean(axis=0)
    assert weekday[10:16].mean() > 3 * weekday[0:5].mean()
    assert per_hour[5:].sum() < 0.7 * per_hour[:2].sum()  # two weekend days against two weekdays


def test_flash_crowds_multiply_the_rate():
    calm = WorkloadProfile(daily_amplitude=0.0, interarrival_cv=1.0)
    crowded = WorkloadProfile(daily_amplitude=0.0, interarrival_cv=1.0, flash_crowds_per_day=40.0)
    calm_peak = np.bincount(generate_trace(calm, 1, 86_400).arrival_s.astype(int) // 60).max()
    crowded_peak = np.bincount(generate_trace(crowded, 1, 86_400).arrival_s.astype(int) // 60).max()
    assert crowded_peak > 2.5 * calm_peak


def test_tokens_are_heavy_tailed_and_responses_grow_with_requests():
    trace = generate_trace(WORKLOADS["conversation"], 11, 3600)
    request, response = trace.request_tokens, trace.response_tokens
    assert np.percentile(request, 99) > 8 * np.median(request)  # Zipf tail
    short = np.median(response[request < 200])
    long = np.median(response[(request > 1500) & (request < 2500)])
    assert 100 <= short <= 200 and 350 <= long <= 550


def test_training_and_evaluation_traces_are_disjoint():
    train = [training_trace(w, i, 600) for w in WORKLOADS for i in range(3)]
    evaluation = [evaluation_trace(w, i, 600) for w in WORKLOADS for i in range(2)]
    fingerprints = {tuple(t.arrival_s[:5].round(6)) for t in train}
    assert len(fingerprints) == len(train)
    assert not fingerprints & {tuple(t.arrival_s[:5].round(6)) for t in evaluation}


def test_burstgpt_csv_round_trip_and_filters(tmp_path):
    path = tmp_path / "BurstGPT_sample.csv"
    path.write_text(
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,1,1.2,ChatGPT,472,18,490,Conversation log\n"
        "45,2,0.9,ChatGPT,1087,0,1087,API log\n"
        "118,3,3.1,GPT-4,417,276,693,Conversation log\n"
    )
    trace = load_burstgpt(path)
    assert trace.arrival_s.tolist() == [0.0, 40.0, 113.0] and trace.duration_s == 114.0
    assert trace.request_tokens.tolist() == [472, 1087, 417] and trace.response_tokens.tolist() == [18, 0, 276]
    conversation = load_burstgpt(path, log_type="Conversation log", rate_scale=2.0)
    assert conversation.arrival_s.tolist() == [0.0, 56.5]
    generated = generate_trace(WORKLOADS["api"], 5, 120)
    write_burstgpt(generated, tmp_path / "out.csv")
    again = load_burstgpt(tmp_path / "out.csv")
    assert np.allclose(again.arrival_s, generated.arrival_s - generated.arrival_s[0], atol=1e-3)
    assert np.array_equal(again.response_tokens, generated.response_tokens)


def test_window_rebases_time():
    trace = generate_trace(WORKLOADS["conversation"], 2, 7200)
    part = trace.window(3600, 600)
    assert part.arrival_s.min() >= 0 and part.arrival_s.max() < 600 and part.start_time_of_day_s == 3600


@pytest.mark.parametrize(
    ("count", "on_demand", "spot", "share", "to_spot"),
    [(4, 0, 0, 0.5, 2), (4, 0, 0, 0.0, 0), (3, 2, 0, 1.0, 3), (2, 0, 6, 0.5, 0)],
)
def test_new_pods_approach_the_spot_share(count, on_demand, spot, share, to_spot):
    assert place_new_pods(count, on_demand, spot, share) == to_spot


def test_removed_pods_approach_the_spot_share():
    assert pods_to_remove(2, 2, 4, 0.5) == 2  # 4 left: keep 2 spot, 2 on-demand
    assert pods_to_remove(2, 0, 4, 0.0) == 2  # only spot pods exist
    assert pods_to_remove(1, 3, 1, 1.0) == 0
