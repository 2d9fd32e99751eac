"""The tool-call contract: quantities and durations as Kubernetes reads them, and the translation from an
intent to enforced limits: intent > profile > history > sandbox default, never above what the spec grants,
network included."""

import pytest
from pydantic import ValidationError

from agentkube.contract import (
    BUILTIN_PROFILES,
    HISTORY_MARGIN,
    MAX_ALLOW_RULES,
    MIN_CALL_MEMORY,
    CallIntent,
    EgressRule,
    Envelope,
    GiB,
    MiB,
    OutOfEnvelope,
    ToolIntent,
    ToolNetwork,
    Tools,
    command_signature,
    duration_seconds,
    fqdn_matches,
    memory_from_history,
    network_within,
    percentile,
    quantity_bytes,
    quantity_cores,
    resolve_limits,
    tool_network,
)

ENVELOPE = Envelope(memory=2 * GiB, cpu=2.0, pids=1024, timeout=3600)
TOOLS = Tools()  # the CRD's default: 512Mi, 1 CPU, 256 pids, 5m, egress none


# Every form of the Kubernetes quantity grammar (signed number, binary and decimal SI suffixes, decimal
# exponents), with the bytes Kubernetes makes of it (fractions of a byte round up).
@pytest.mark.parametrize("quantity, size", [
    ("1", 1), ("+1", 1), ("512", 512), (4096, 4096), ("5.", 5), ("0.5", 1), ("1.000001Ki", 1025),
    ("2Ki", 2 * 1024), ("64Mi", 64 * MiB), ("1.5Gi", 3 * GiB // 2), (".5Gi", GiB // 2), ("5Ti", 5 * 1024**4),
    ("6Pi", 6 * 1024**5), ("7Ei", 7 * 1024**6),
    ("500k", 500_000), ("1M", 10**6), ("2G", 2 * 10**9), ("1T", 10**12), ("1P", 10**15), ("1E", 10**18),
    ("100m", 1), ("100u", 1), ("100n", 1),
    ("129e6", 129_000_000), ("1E3", 1000), ("1e+3", 1000), ("1e-3", 1),
])
def test_memory_quantities_parse_as_kubernetes_parses_them(quantity, size):
    assert quantity_bytes(quantity) == size


@pytest.mark.parametrize("quantity, cores", [("500m", 0.5), ("2", 2.0), ("1.5", 1.5), (3, 3.0), ("250000u", 0.25),
                                              ("1e-1", 0.1), ("0.1", 0.1)])
def test_cpu_quantities_parse_as_kubernetes_parses_them(quantity, cores):
    assert quantity_cores(quantity) == pytest.approx(cores)


@pytest.mark.parametrize("bad", ["", "lots", "-5Mi", "0", 0, -1, True, "5Xi", "1.2.3", "Mi"])
def test_bad_or_non_positive_quantities_are_refused(bad):
    with pytest.raises(ValueError):
        quantity_bytes(bad)


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("100ms", 0.1),
                                           ("2h0m0s", 7200), (45, 45)])
def test_durations_parse_like_go(text, seconds):
    assert duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "soon", "0s", "-1s", True])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        duration_seconds(bad)


def test_parsed_texts_are_kept_without_changing_a_verdict():
    # Kept parses (a call's start parses the same strings every time) must answer as a fresh parse would:
    # a refusal again on the second ask, and a boolean never taken for the 1 it equals.
    for _ in range(2):
        assert quantity_bytes("512Mi") == 512 * MiB and duration_seconds("5m") == 300
        assert quantity_bytes(1) == 1 and duration_seconds(1) == 1
        for parse, bad in ((quantity_bytes, "5Xi"), (quantity_bytes, True), (duration_seconds, "soon"),
                           (duration_seconds, True)):
            with pytest.raises(ValueError):
                parse(bad)


def test_nothing_declared_takes_the_sandbox_defaults():
    resolved = resolve_limits(CallIntent(), [], TOOLS, ENVELOPE)
    assert (resolved.limits.memory, resolved.limits.cpu, resolved.limits.pids, resolved.limits.timeout) == (512 * MiB, 1.0, 256, 300)
    assert resolved.limits.network.egress == "none"
    assert set(resolved.sources.values()) == {"default"}


def test_explicit_intent_beats_profile_and_profile_beats_default():
    resolved = resolve_limits(CallIntent(profile="shell", memory="100Mi"), [], TOOLS, ENVELOPE)
    assert resolved.limits.memory == 100 * MiB and resolved.sources["memory"] == "intent"
    assert resolved.limits.pids == BUILTIN_PROFILES["shell"].pids and resolved.sources["pids"] == "profile"
    assert resolved.limits.network.egress == "none" and resolved.sources["network"] == "profile"


def test_history_p95_with_margin_beats_default_but_not_intent():
    peaks = [100 * MiB] * 19 + [300 * MiB]  # p95 of 20 samples is the 19th value
    resolved = resolve_limits(CallIntent(), peaks, TOOLS, ENVELOPE)
    assert resolved.sources["memory"] == "history" and resolved.limits.memory == int(100 * MiB * HISTORY_MARGIN)
    assert resolve_limits(CallIntent(memory="1Gi"), peaks, TOOLS, ENVELOPE).limits.memory == GiB
    assert memory_from_history([100 * MiB, 200 * MiB]) is None


def test_history_and_profiles_are_clamped_to_the_envelope():
    assert resolve_limits(CallIntent(), [10 * GiB] * 10, TOOLS, ENVELOPE).limits.memory == ENVELOPE.memory
    build = resolve_limits(CallIntent(profile="build"), [], TOOLS, ENVELOPE)
    assert build.limits.memory == ENVELOPE.memory  # the profile's 4Gi
    assert build.limits.timeout == 1800  # under the envelope: kept


@pytest.mark.parametrize("field, value", [("memory", "3Gi"), ("cpu", "4"), ("pids", 5000), ("timeout", "2h")])
def test_explicit_requests_above_the_envelope_are_refused_naming_the_field(field, value):
    with pytest.raises(OutOfEnvelope, match=f"^{field}:"):
        resolve_limits(CallIntent(**{field: value}), [], TOOLS, ENVELOPE)


def test_memory_high_sits_below_memory_max():
    limits = resolve_limits(CallIntent(memory="64Mi"), [], TOOLS, ENVELOPE).limits
    assert MIN_CALL_MEMORY // 2 <= limits.memory_high < limits.memory


# ----- network is part of the envelope ----------------------------------------------------------------

def explicit(*rules: str) -> ToolNetwork:
    return tool_network(list(rules))


PYPI = Tools(default=ToolIntent(network=ToolNetwork()),
             profiles={"pip": ToolIntent(network=explicit("pypi.org:443", "*.pythonhosted.org:443"))})


@pytest.mark.parametrize("asked", [
    {"network": {"egress": "internet"}},  # an explicit intent
    {"network": {"egress": "cluster"}},
    {"network": {"egress": "explicit", "allow": [{"cidr": "10.0.0.0/8"}]}},
    {"network": {"egress": "explicit", "allow": [{"fqdn": "evil.example", "port": 443}]}},
    {"network": {"egress": "explicit", "allow": [{"fqdn": "pypi.org"}]}},  # any port: wider than :443
    {"profile": "fetch"},  # a built-in profile is bounded like any other
])
def test_a_network_wider_than_the_spec_grants_is_refused_whatever_asks_for_it(asked):
    with pytest.raises(OutOfEnvelope, match="^network:"):
        resolve_limits(CallIntent.model_validate(asked), [], PYPI, ENVELOPE)


def test_a_network_within_one_of_the_specs_grants_is_given():
    assert str(resolve_limits(CallIntent(profile="pip"), [], PYPI, ENVELOPE).limits.network) == "pypi.org:443,*.pythonhosted.org:443"
    narrower = CallIntent(network=explicit("files.pythonhosted.org:443"))
    assert resolve_limits(narrower, [], PYPI, ENVELOPE).limits.network == narrower.network
    internet = Tools(default=ToolIntent(network=ToolNetwork(egress="internet")))
    assert resolve_limits(CallIntent(profile="fetch"), [], internet, ENVELOPE).limits.network.egress == "internet"


@pytest.mark.parametrize("request_, grant, within", [
    ("none", "internet", True), ("none", "none", True), ("cluster", "internet", False), ("internet", "cluster", False),
    ("internet", "internet", True), (["203.0.113.0/24:443"], "internet", True), (["10.1.0.0/16:443"], "internet", False),
    (["169.254.169.254:80"], "internet", False), (["[::ffff:10.0.0.1]:80"], "internet", False),
    (["pypi.org:443"], "internet", False),  # a name's addresses are DNS's to say: no range vouches for it
    (["10.1.2.0/24:443"], ["10.1.0.0/16:443"], True), (["10.1.2.0/24:80"], ["10.1.0.0/16:443"], False),
    (["10.1.2.0/24:80"], ["10.1.0.0/16:*"], True), (["10.0.0.0/8:443"], ["10.1.0.0/16:443"], False),
    (["a.b.example.com:443"], ["*.example.com:443"], True), (["example.com:443"], ["*.example.com:443"], False),
    (["*.a.example.com:443"], ["*.example.com:443"], True), (["*.example.com:443"], ["a.example.com:443"], False),
    (["evil-example.com:443"], ["*.example.com:443"], False),
])
def test_network_within(request_, grant, within):
    assert network_within(tool_network(request_), tool_network(grant)) is within


def test_fqdn_patterns_match_subdomains_only():
    assert fqdn_matches("*.example.com", "x.example.com") and fqdn_matches("pypi.org", "pypi.org")
    assert not fqdn_matches("*.example.com", "example.com") and not fqdn_matches("*.example.com", "xexample.com")


@pytest.mark.parametrize("bad", ["everything", "all", "loopback", ["10.0.0.0/8"], ["300.1.1.1/32:80"],
                                 ["10.0.0.0/8:99999"], ["Bad_Name:80"], [f"10.0.0.{i}:80" for i in range(MAX_ALLOW_RULES + 1)]])
def test_bad_networks_are_refused(bad):
    with pytest.raises(ValueError):
        tool_network(bad)


def test_rules_name_exactly_one_destination():
    with pytest.raises(ValidationError, match="exactly one"):
        EgressRule(cidr="10.0.0.0/8", fqdn="a.example.com")
    with pytest.raises(ValidationError, match="exactly one"):
        EgressRule(port=443)
    with pytest.raises(ValidationError, match="only then"):
        ToolNetwork(egress="internet", allow=[EgressRule(cidr="10.0.0.0/8")])


def test_intents_validate_their_fields():
    with pytest.raises(ValidationError):
        CallIntent(profile="Not A Profile")
    for bad in ({"cpu": "-1"}, {"memory": "lots"}, {"timeout": "soon"}, {"surprise": 1}):
        with pytest.raises(ValidationError):
            CallIntent.model_validate(bad)


def test_a_sandbox_names_its_own_profiles_beside_the_built_in_ones():
    own = Tools(profiles={"test": ToolIntent(memory="3Gi", timeout="15m"), "lint": ToolIntent(cpu="250m")})
    heavier = resolve_limits(CallIntent(profile="test"), [], own, ENVELOPE)
    assert heavier.limits.memory == 2 * GiB and heavier.sources["memory"] == "profile"  # clamped to the envelope
    assert heavier.limits.timeout == 900 and heavier.limits.pids == 256
    assert resolve_limits(CallIntent(profile="lint"), [], own, ENVELOPE).limits.cpu == 0.25
    with pytest.raises(OutOfEnvelope, match="unknown profile 'gigantic'"):
        resolve_limits(CallIntent(profile="gigantic"), [], own, ENVELOPE)


def test_percentile_is_an_observed_value():
    assert percentile([5, 1, 4, 2, 3], 0.95) == 5 and percentile(list(range(1, 101)), 0.95) == 95
    with pytest.raises(ValueError):
        percentile([], 0.5)


@pytest.mark.parametrize("argv, signature", [
    (["pytest", "tests/test_x.py::test_y"], "pytest test_x.py"), (["/usr/bin/make", "-j4", "test"], "make test"),
    (["python", "-m", "pytest", "-x"], "python pytest"), (["ls"], "ls"),
])
def test_command_signature_ignores_options(argv, signature):
    assert command_signature(argv) == signature


def test_the_contracts_own_intents_are_valid():
    from agentkube.contract import DEFAULT_INTENT

    for intent in (DEFAULT_INTENT, *BUILTIN_PROFILES.values()):
        assert ToolIntent.model_validate(intent.model_dump()) == intent


def test_the_sandbox_runtime_and_the_sdk_import_without_the_kubernetes_client():
    """The sandbox image carries the runtime, the SDK and pydantic, not the Kubernetes client."""
    import subprocess
    import sys

    blocked = "import sys; sys.modules['kubernetes'] = None; sys.modules['durationpy'] = None; "
    for module in ("agentkube.ebpf.runtime", "agentkube.client", "agentkube.ebpf.commands"):
        result = subprocess.run([sys.executable, "-c", blocked + f"import {module}"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
