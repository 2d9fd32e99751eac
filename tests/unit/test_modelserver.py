"""The emulated LLM server's batching: requests share decode steps (continuous batching), a step's time
grows with the batch as the simulator's server model says, and the batch never exceeds its limit."""

import asyncio
from collections import deque

import pytest

from agentkube.modelserver import Engine, Sequence, admit, completion_body, config_from_env, step, work_steps
from agentkube.rl.server import ModelServerConfig, decode_step_s


def _sequence(steps: float) -> Sequence:
    return Sequence(1, 1, steps, done=None)  # type: ignore[arg-type]


def test_a_step_advances_every_sequence_by_one_token_and_releases_the_finished():
    running, finished = step([_sequence(1), _sequence(3)])
    assert [s.remaining_steps for s in running] == [2] and len(finished) == 1


def test_admission_is_fifo_up_to_the_batch_limit():
    batch, waiting = [_sequence(5)], deque(_sequence(n) for n in (1, 2, 3))
    admit(batch, waiting, max_batch=3)
    assert [s.remaining_steps for s in batch] == [5, 1, 2] and len(waiting) == 1


def test_prefill_costs_a_fraction_of_a_step_per_prompt_token():
    config = ModelServerConfig(prefill_token_cost=0.05)
    assert work_steps(config, prompt_tokens=100, completion_tokens=10) == 15.0


def test_settings_come_from_the_environment_with_the_simulators_defaults():
    assert config_from_env({}) == ModelServerConfig()
    assert config_from_env({"MAX_BATCH": "4", "BASE_STEP_S": "0.01"}).max_batch == 4


def test_concurrent_requests_share_decode_steps():
    config = ModelServerConfig(base_step_s=0.001, per_request_step_s=0.0001, prefill_token_cost=0.0)

    async def run() -> int:
        engine = Engine(config)
        loop_task = asyncio.create_task(engine.run())
        await asyncio.gather(*(engine.submit(1, 20) for _ in range(4)))
        loop_task.cancel()
        return engine.steps

    # Four requests of 20 tokens each in one batch take 20 steps, not 80.
    assert asyncio.run(run()) == 20
    assert decode_step_s(config, 4) > decode_step_s(config, 1)


def test_the_answer_is_an_openai_completion():
    body = completion_body("m", 7, prompt_tokens=3, completion_tokens=5)
    assert body["object"] == "text_completion" and len(body["choices"][0]["text"].split()) == 5
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_the_emulated_model_load_is_a_bounded_number_of_seconds():
    from agentkube.modelserver import model_load_s

    assert model_load_s({}) == 0.0 and model_load_s({"MODEL_LOAD_S": "20"}) == 20.0
    for refused in ("-1", "601", "nan", "soon"):
        with pytest.raises(ValueError):
            model_load_s({"MODEL_LOAD_S": refused})
