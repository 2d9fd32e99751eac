"""The alert rules: one file in the chart, valid for promtool, every alert unit-tested with
`promtool test rules` (Debian's promtool, the real one), and the chart's PrometheusRule carries them."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agentkube import dashboards

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "agentkube" / "rules" / "agentkube.rules.yaml"
RULE_TESTS = Path(__file__).with_name("prometheus-rules-test.yaml")
ALERTS = {"AgentkubeOperatorDown", "AgentkubeOperatorShardDown", "AgentkubeOperatorNotReconciling", "AgentkubeOperatorReconcileErrors",
          "AgentkubeNodeAgentDown", "AgentkubeToolCallOOMKillsSpiking", "AgentkubeEgressBlockedSpiking",
          "AgentkubeAutoscalingFallingBack"}


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: `make deps` installs Debian's prometheus package"
    return found


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_alerts_an_operator_of_agentkube_wants_are_there():
    assert {rule["alert"] for rule in _rules()} == ALERTS


def test_promtool_checks_the_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_passes_its_promtool_unit_tests(tmp_path):
    shutil.copy(RULES, tmp_path / RULES.name)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert tested == ALERTS, f"alerts never tested firing: {ALERTS - tested}"


@pytest.mark.parametrize("job", [dashboards.OPERATOR_JOB, dashboards.NODE_AGENT_JOB])
def test_the_alerts_select_the_jobs_the_service_monitors_name(job):
    assert any(f'job="{job}"' in rule["expr"] for rule in _rules())
