"""The autoscaling loop's I/O edge towards Prometheus: run the PromQL `autoscaling` builds and hand back
what came out as an `autoscaling.Observed`. Blocking (HTTP): call it from a worker thread, never from
the operator's event loop."""

from __future__ import annotations

import math
from urllib.parse import urlsplit, urlunsplit

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from agentkube.operator import autoscaling

# Per query: a slow Prometheus delays one decision, never the next one indefinitely.
QUERY_TIMEOUT_S = 10.0
# A brief retry rides over a Prometheus restart; a longer one would only hold a worker thread.
RETRY = Retry(total=2, backoff_factor=0.2, status_forcelist=(429, 502, 503, 504))


class MetricsSource:
    """One Prometheus server (its URL from `agentkube operator run --prometheus-url`)."""

    def __init__(self, url: str) -> None:
        self.client = PrometheusConnect(url=url, disable_ssl=False, retry=RETRY)
        self.url = redacted(url)  # for messages: status and logs never show credentials in the URL

    def _scalar(self, promql: str) -> float | None:
        """The value of a query that yields one series at most (None when it yields none)."""
        result = self.client.custom_query(promql, params={"timeout": f"{QUERY_TIMEOUT_S:g}s"}, timeout=QUERY_TIMEOUT_S)
        if not result:
            return None
        return float(result[0]["value"][1])

    def observe(self, namespace: str, service: str) -> autoscaling.Observed:
        samples = {}
        try:
            for name, queries in autoscaling.metric_generations(namespace, service).items():
                # The first generation of Knative's names with a recent raw sample is the one this cluster
                # exports (a Knative upgrade switches by itself, within Prometheus' lookback).
                for query in queries:
                    age = self._scalar(query.age)
                    if age is None or math.isnan(age):
                        continue  # no raw sample within the lookback (or only a stale marker): not this one
                    value = self._scalar(query.value)
                    if value is not None:
                        samples[name] = autoscaling.MetricSample(value, age)
                        break
        except (requests.RequestException, PrometheusApiClientException) as error:
            return autoscaling.Observed(problem=autoscaling.PROMETHEUS_UNREACHABLE,
                                        detail=f"Prometheus at {self.url} did not answer: {type(error).__name__}")
        return autoscaling.Observed(samples)


def redacted(url: str) -> str:
    """The URL without a user name or password in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
