"""The ServedModel `Autoscaling` condition's type and its reasons, one per way a decision can end. Their own
module so that the operator's metrics can name them without importing the decision (`autoscaling`), which
brings NumPy (~11 MiB resident) into every operator process, one whose shard serves no model too."""

CONDITION = "Autoscaling"
DECIDED = "PolicyDecided"
METRICS_MISSING = "MetricsMissing"
METRICS_STALE = "MetricsStale"
PROMETHEUS_UNREACHABLE = "PrometheusUnreachable"
PROMETHEUS_NOT_CONFIGURED = "PrometheusNotConfigured"
DECISION_FAILED = "DecisionFailed"
SLO_GUARD = "SLOGuard"
# Every reason a turn of the loop is counted under (agentkube_autoscaling_decisions_total).
DECISION_REASONS = (DECIDED, METRICS_MISSING, METRICS_STALE, PROMETHEUS_UNREACHABLE, PROMETHEUS_NOT_CONFIGURED,
                    DECISION_FAILED)
