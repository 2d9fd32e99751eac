"""A continuous-batching model server's behaviour, as pure functions of its in-flight requests.

Each decode iteration advances every in-flight request by one token and takes
`decode_step_s(c) = base_step_s + per_request_step_s × c` for `c` requests in the batch: at small `c`
the step is bound by reading the weights (constant), at large `c` by compute (linear). So throughput
`c / step(c)` rises with concurrency and flattens past the knee `base_step_s / per_request_step_s`,
while each request's latency keeps growing with `c`. Prompt tokens (prefill) cost a fraction of a
decode step each. Requests beyond the pod's hard limit wait in a queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ModelServerConfig", "ColdStartConfig", "decode_step_s", "service_time_s", "sample_cold_starts_s"]


@dataclass(frozen=True)
class ModelServerConfig:
    """One pod of an LLM server (defaults: roughly a 7–8B model in vLLM on one 24 GB GPU)."""

    base_step_s: float = 0.025
    per_request_step_s: float = 0.0004
    prefill_token_cost: float = 0.05  # one prompt token costs this fraction of a decode token
    max_batch: int = 256  # the server's own limit on concurrent sequences (the pod's hard limit)

    @property
    def knee_concurrency(self) -> float:
        return self.base_step_s / self.per_request_step_s

    def work_tokens(self, request_tokens, response_tokens):
        """A request's service demand in decode-token units."""
        return response_tokens + self.prefill_token_cost * request_tokens


def decode_step_s(config: ModelServerConfig, concurrency):
    """Seconds per decode iteration with `concurrency` requests in the batch (scalar or array)."""
    batch = np.minimum(np.maximum(concurrency, 1.0), config.max_batch) if isinstance(concurrency, np.ndarray) \
        else min(max(float(concurrency), 1.0), float(config.max_batch))
    return config.base_step_s + config.per_request_step_s * batch


def service_time_s(config: ModelServerConfig, request_tokens, response_tokens, concurrency):
    """Seconds one request spends in service at a steady batch of `concurrency` requests."""
    return config.work_tokens(request_tokens, response_tokens) * decode_step_s(config, concurrency)


@dataclass(frozen=True)
class ColdStartConfig:
    """Pod start-up: a log-normal cold start fitted to "Serverless Cold Starts and Where to Find Them"
    (EuroSys 2025: mean 3.24 s, sd 7.10 s) plus the time to load the model's weights onto the GPU."""

    mean_s: float = 3.24
    sd_s: float = 7.10
    model_load_s: float = 20.0

    @property
    def lognormal_mu_sigma(self) -> tuple[float, float]:
        # Moment matching: sigma^2 = ln(1 + sd^2/mean^2), mu = ln(mean) - sigma^2/2.
        sigma2 = math.log1p((self.sd_s / self.mean_s) ** 2)
        return math.log(self.mean_s) - sigma2 / 2.0, math.sqrt(sigma2)


def sample_cold_starts_s(config: ColdStartConfig, rng: np.random.Generator, size: int) -> np.ndarray:
    """Seconds from a pod's creation until it is ready, for `size` pods."""
    mu, sigma = config.lognormal_mu_sigma
    return rng.lognormal(mu, sigma, size) + config.model_load_s
