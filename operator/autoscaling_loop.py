"""The `policy: ppo` autoscaling loop's I/O: each turn reads the model, observes Prometheus
(`prometheus`), asks `autoscaling.decide` (pure) for the target, records the decision in status, applies
it to the Knative Service, and schedules the next turn on the operator's timers (`rechecks`)."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agentkube.operator import api, autoscaling, capacity_handlers, kube, metrics, servedmodel
from agentkube.operator.kube import SERVED_MODELS, ApiException
from agentkube.operator.rechecks import rechecks
from agentkube.operator.status import ConditionUpdate, merge_own_conditions
from agentkube.rl.observation import ActionBounds

# Loaded when used, not with the handlers: the Prometheus client (`requests` with it) only when the operator is
# given --prometheus-url, the policy (and NumPy with it, ~15 MiB resident with OpenBLAS) at the first decision of
# a `policy: ppo` model. The shard that serves models runs without either until then.
if TYPE_CHECKING:
    from agentkube.operator.prometheus import MetricsSource
    from agentkube.rl.policy import ExportedPolicy

# Attempts at writing a decision when another writer changed the status in between (a 409).
STATUS_WRITE_ATTEMPTS = 3

_metrics_source: MetricsSource | None = None


def configure_autoscaling(prometheus_url: str | None) -> None:
    """Where the loop reads Knative's metrics (None: nowhere; ppo models then run Knative's default)."""
    global _metrics_source
    if prometheus_url:
        from agentkube.operator.prometheus import MetricsSource

        _metrics_source = MetricsSource(prometheus_url)
    else:
        _metrics_source = None


@functools.cache
def _policy() -> tuple[ExportedPolicy | None, str]:
    """The exported policy (NumPy only), loaded once per process at the first decision; or None and why it
    could not be loaded (a broken file then shows in every ppo model's `Autoscaling` condition, and in the log)."""
    try:
        from agentkube.rl.policy import load_policy

        return load_policy(), ""
    except Exception as error:  # a bad file must cost the fallback target, not the operator
        logging.getLogger(__name__).error("the autoscaling policy could not be loaded: %s", error)
        return None, f"{type(error).__name__}: {error}"


def decide_served_model(namespace: str, name: str, logger: logging.Logger) -> autoscaling.Outcome | None:
    """One turn of the autoscaling loop of a `policy: ppo` model, run on the `rechecks` timers in a worker
    thread: observe, decide, record, apply, then schedule the next turn. The loop ends by itself when the
    model is deleted or its policy is no longer ppo (no turn is scheduled then)."""
    model = kube.read_own(SERVED_MODELS, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        metrics.forget_served_model(namespace, name)
        return None
    spec = api.ServedModelSpec.model_validate(model["spec"])
    if spec.autoscaling.policy != "ppo":
        metrics.forget_served_model(namespace, name)
        return None
    try:
        return _decide_and_apply(model, spec, logger)
    except Exception as error:  # one failed turn must neither stop the loop nor the operator
        logger.exception("autoscaling decision for %s/%s failed", namespace, name)
        try:
            _record_failure(namespace, name, f"{type(error).__name__}: {error}")
        except Exception:
            logger.exception("could not record the failed decision of %s/%s", namespace, name)
        return None
    finally:
        rechecks.schedule(decide_served_model, namespace, name, autoscaling.decision_interval(spec.autoscaling.ppo), logger)


def _decide_and_apply(model: dict[str, Any], spec: api.ServedModelSpec, logger: logging.Logger) -> autoscaling.Outcome:
    namespace, name = model["metadata"]["namespace"], model["metadata"]["name"]
    status = api.ServedModelStatus.model_validate(model.get("status") or {})
    current = servedmodel.concurrency_target(spec, status)
    if _metrics_source is None:
        observed = autoscaling.Observed(problem=autoscaling.PROMETHEUS_NOT_CONFIGURED,
                                        detail="the operator runs without --prometheus-url")
    else:
        observed = _metrics_source.observe(namespace, name)
    policy, policy_error = _policy()
    now = kube.now()
    outcome = autoscaling.decide(
        observed, current_target=current, autoscaling=spec.autoscaling, spot=spec.capacity.spot,
        policy=policy.decide if policy else None, bounds=policy.bounds if policy else ActionBounds(), now=now,
        policy_error=policy_error,
        # The guard's state is the last decision's reason: status holds it across turns and restarts.
        guard_engaged=status.last_decision is not None and status.last_decision.reason == autoscaling.SLO_GUARD,
    )
    decision = api.AutoscalingDecision(
        time=now, value=outcome.target, reason=outcome.reason, message=outcome.message,
        previous_value=outcome.previous_target, policy_target=outcome.policy_target, spot_share=outcome.spot_share,
        min_scale=outcome.min_scale, warm_share=outcome.warm_share, inputs=outcome.inputs,
    )
    metrics.served_model_decided(namespace, name, reason=outcome.reason, target=outcome.target,
                                 policy_target=outcome.policy_target, spot_share=outcome.spot_share)
    # The status first: it is what every reconcile reads as the target in force (one source of truth),
    # so a reconcile between the two writes already applies the new target.
    if _write_autoscaling_status(model, outcome.condition, now, concurrency_target=outcome.target,
                                 min_scale=outcome.min_scale, last_decision=decision):
        kube.set_target_in_force(namespace, name, outcome.target, outcome.min_scale)
        if spec.capacity.spot.enabled:
            # The policy's spot share, bounded by the spec, goes into the NodePools' spread domains (the
            # pod template stays, so no new Revision).
            capacity_handlers.apply_capacity(namespace, name, spec, api.ServedModelStatus(last_decision=decision))
    previous = next((c for c in status.conditions if c.type == autoscaling.CONDITION), None)
    # A warning (which Kopf also posts as an Event) when it starts falling back, not at every turn.
    log = logger.warning if not outcome.decided and (previous is None or previous.reason != outcome.reason) else logger.info
    log("autoscaling %s/%s: %s (%s)", namespace, name, outcome.message, outcome.reason)
    return outcome


def _record_failure(namespace: str, name: str, detail: str) -> None:
    model = kube.read_own(SERVED_MODELS, namespace, name)
    if model is not None:
        condition = (autoscaling.CONDITION, False, autoscaling.DECISION_FAILED, f"the decision failed: {detail}")
        _write_autoscaling_status(model, condition, kube.now())


def _write_autoscaling_status(model: dict[str, Any], condition: ConditionUpdate, now: datetime, **fields: Any) -> bool:
    """Write the loop's condition and `fields` (ServedModelStatus fields) over the status as read: the
    conditions list is written whole, and the reconcile writes it too, so a write over a newer status
    would drop the other writer's conditions. False when the model went away or stopped being `ppo`
    meanwhile (then nothing is written)."""
    namespace, name = model["metadata"]["namespace"], model["metadata"]["name"]
    for attempt in range(STATUS_WRITE_ATTEMPTS):
        old = api.ServedModelStatus.model_validate(model.get("status") or {})
        conditions = merge_own_conditions(old.conditions, [condition], now, keep={c.type for c in old.conditions})
        new = api.ServedModelStatus(conditions=conditions, **fields)
        try:
            return kube.patch_status_if_unchanged(SERVED_MODELS, namespace, name, model["metadata"]["resourceVersion"], new)
        except ApiException as error:
            if error.status != 409 or attempt == STATUS_WRITE_ATTEMPTS - 1:
                raise
        fresh = kube.read_own(SERVED_MODELS, namespace, name)
        if fresh is None or api.ServedModelSpec.model_validate(fresh["spec"]).autoscaling.policy != "ppo":
            return False  # the spec's own target is in force now: a late decision must not override it
        model = fresh
    return False

