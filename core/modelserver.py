"""An emulated LLM server for ServedModels on the local node: an OpenAI-style completions endpoint that
behaves like a continuously batching server, without a model.

It emulates; it does not run a language model. No model weights can be fetched on the machines this
project is built on, and a real model on two shared CPU cores would serve one request a minute. What it
reproduces is what Knative's autoscaler and agentkube's policy react to: requests join the running batch
at the next decode step (continuous batching), every step advances each sequence in the batch by one
token and takes `base_step_s + per_request_step_s × batch` seconds (the server model of
`agentkube.rl.server`, the same one the simulator uses), prompt tokens cost a fraction of a decode step
each, and requests beyond `max_batch` wait for a free slot. Before it listens it waits `MODEL_LOAD_S`
seconds, as a real server loads its weights before it can answer (the simulator's `ColdStartConfig.model_load_s`),
so that Knative's readiness probe and scale-up lag see a model's start. Steps take wall-clock time (a sleep), not CPU,
so that two cores can host several pods and the timing does not depend on who else uses the machine.
The text it answers with is filler.

Settings (environment): PORT (Knative sets it), MODEL_NAME, BASE_STEP_S, PER_REQUEST_STEP_S,
PREFILL_TOKEN_COST, MAX_BATCH (the defaults are `ModelServerConfig`'s), MODEL_LOAD_S (default 0: no wait).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from agentkube.rl.server import ModelServerConfig, decode_step_s

DEFAULT_MAX_TOKENS = 16
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet")


@dataclass
class Sequence:
    """One request in service: the decode steps it still needs and the future its handler awaits."""

    prompt_tokens: int
    completion_tokens: int
    remaining_steps: float
    done: asyncio.Future = field(repr=False)


def work_steps(config: ModelServerConfig, prompt_tokens: int, completion_tokens: int) -> float:
    """A request's service demand in decode steps (prefill counted as a fraction of a step per token)."""
    return float(config.work_tokens(prompt_tokens, completion_tokens))


def admit(batch: list[Sequence], waiting: deque[Sequence], max_batch: int) -> None:
    """Move waiting requests into the batch while it has room (FIFO), as a continuous batcher does at
    every step boundary."""
    while waiting and len(batch) < max_batch:
        batch.append(waiting.popleft())


def step(batch: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """One decode step: every sequence advances by one token. Returns (still running, finished)."""
    running: list[Sequence] = []
    finished: list[Sequence] = []
    for sequence in batch:
        sequence.remaining_steps -= 1.0
        (finished if sequence.remaining_steps <= 0 else running).append(sequence)
    return running, finished


class Engine:
    """The batching loop: one task that steps while there is work and sleeps on an event otherwise."""

    def __init__(self, config: ModelServerConfig) -> None:
        self.config = config
        self.batch: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.wake = asyncio.Event()
        self.steps = 0

    async def submit(self, prompt_tokens: int, completion_tokens: int) -> Sequence:
        sequence = Sequence(prompt_tokens, completion_tokens, work_steps(self.config, prompt_tokens, completion_tokens),
                            asyncio.get_running_loop().create_future())
        self.waiting.append(sequence)
        self.wake.set()
        await sequence.done
        return sequence

    async def run(self) -> None:
        while True:
            admit(self.batch, self.waiting, self.config.max_batch)
            if not self.batch:
                self.wake.clear()
                await self.wake.wait()
                continue
            await asyncio.sleep(decode_step_s(self.config, len(self.batch)))
            self.batch, finished = step(self.batch)
            self.steps += 1
            for sequence in finished:
                if not sequence.done.done():
                    sequence.done.set_result(None)


def config_from_env(environ: dict[str, str]) -> ModelServerConfig:
    defaults = ModelServerConfig()
    return ModelServerConfig(
        base_step_s=float(environ.get("BASE_STEP_S", defaults.base_step_s)),
        per_request_step_s=float(environ.get("PER_REQUEST_STEP_S", defaults.per_request_step_s)),
        prefill_token_cost=float(environ.get("PREFILL_TOKEN_COST", defaults.prefill_token_cost)),
        max_batch=int(environ.get("MAX_BATCH", defaults.max_batch)),
    )


def completion_body(model: str, request_id: int, prompt_tokens: int, completion_tokens: int) -> dict:
    text = " ".join(itertools.islice(itertools.cycle(FILLER), completion_tokens))
    return {
        "id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_app(config: ModelServerConfig, model: str) -> web.Application:
    app = web.Application()
    engine = Engine(config)
    counter = itertools.count(1)

    async def completions(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            prompt = body.get("prompt", "")
            prompt_text = " ".join(prompt) if isinstance(prompt, list) else str(prompt)
            completion_tokens = int(body.get("max_tokens", DEFAULT_MAX_TOKENS))
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"error": {"message": "body must be a JSON object with prompt and max_tokens",
                                                "type": "invalid_request_error"}}, status=400)
        if completion_tokens < 1:
            return web.json_response({"error": {"message": "max_tokens must be at least 1",
                                                "type": "invalid_request_error"}}, status=400)
        prompt_tokens = max(1, len(prompt_text.split()))
        await engine.submit(prompt_tokens, completion_tokens)
        return web.json_response(completion_body(model, next(counter), prompt_tokens, completion_tokens))

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "agentkube"}]})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"batch": len(engine.batch), "waiting": len(engine.waiting), "steps": engine.steps})

    async def start_engine(app: web.Application):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(start_engine)
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models), web.get("/healthz", healthz)])
    return app


def model_load_s(environ: dict[str, str]) -> float:
    """The emulated weight-loading time; refused unless a finite number of seconds in [0, 600]."""
    value = float(environ.get("MODEL_LOAD_S", "0"))
    if not 0.0 <= value <= 600.0:  # also refuses NaN
        raise ValueError(f"MODEL_LOAD_S must be between 0 and 600 seconds, not {value}")
    return value


def main() -> None:
    environ = dict(os.environ)
    # Not listening while "loading": Knative's default readiness probe (TCP to the container's port, through
    # queue-proxy) keeps the pod not ready, as it would a server loading its weights.
    time.sleep(model_load_s(environ))
    web.run_app(make_app(config_from_env(environ), environ.get("MODEL_NAME", "emulated-llm")),
                port=int(environ.get("PORT", "8080")), access_log=None)


if __name__ == "__main__":
    main()
