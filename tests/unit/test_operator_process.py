"""The operator process holds only what it uses: `agentkube operator run` loads neither the other components'
commands nor the `kubernetes` client (Kopf included), caps glibc's malloc arenas, and logs in from a service
account or a kubeconfig by itself."""

import base64
import json
import re
import subprocess
import sys
import textwrap

import kopf
import pytest

from agentkube.operator import kube, main


def test_operator_run_imports_neither_the_other_components_nor_the_kubernetes_client():
    # What `agentkube operator run` imports before Kopf starts: the CLI resolves the `operator` group, and
    # `run` then loads every handler module (shard 0/1 serves models too).
    script = textwrap.dedent("""
        import importlib, json, sys
        from agentkube.cli import app
        try:
            app(["operator", "run", "--help"], prog_name="agentkube")
        except SystemExit:
            pass
        from agentkube.operator import main
        for module in main.HANDLER_MODULES + ("agentkube.operator.autoscaling_loop",):
            importlib.import_module(module)
        importlib.import_module("agentkube.operator.autoscaling_loop").configure_autoscaling(None)
        print(json.dumps(sorted(sys.modules)))
    """)
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                           check=True).stdout.splitlines()[-1]))
    assert "kopf" in loaded and "agentkube.operator.sandbox_handlers" in loaded
    assert not {m for m in loaded if m == "kubernetes" or m.startswith("kubernetes.")}
    for other in ("agentkube.devenv", "agentkube.ebpf.commands", "agentkube.rl.cli", "agentkube.dashboard_commands",
                  "grpc", "cryptography"):
        assert other not in loaded, other
    # NumPy loads with the first decision of a `policy: ppo` model, the Prometheus client with --prometheus-url.
    for deferred in ("numpy", "agentkube.rl.policy", "agentkube.rl.simulator", "requests", "prometheus_api_client"):
        assert deferred not in loaded, deferred


def test_the_policy_and_numpy_load_with_the_first_ppo_decision():
    # In a fresh process: shard 0 configured with a Prometheus URL loads its client, not yet NumPy; the policy a
    # ppo model's turn asks for (`_policy`, what `_decide_and_apply` calls) is the shipped one, NumPy with it.
    script = textwrap.dedent("""
        import json, logging, sys
        from agentkube.operator import autoscaling_loop
        autoscaling_loop.configure_autoscaling("http://127.0.0.1:9")
        before = {m: m in sys.modules for m in ("numpy", "prometheus_api_client")}
        policy, error = autoscaling_loop._policy()
        print(json.dumps({"before": before, "numpy": "numpy" in sys.modules, "policy": policy is not None,
                          "error": error, "fields": len(policy.observation_fields) if policy else 0}))
    """)
    found = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1])
    assert found["before"] == {"numpy": False, "prometheus_api_client": True}
    assert found["numpy"] and found["policy"] and found["error"] == "" and found["fields"] > 0


def test_every_command_group_is_still_there_and_loads_when_asked_for():
    from typer.testing import CliRunner

    from agentkube.cli import GROUPS, app

    runner = CliRunner()
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0
    for name in (*GROUPS, "demo", "version", "gateway"):
        assert name in listed.output
    for name in GROUPS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "COMMAND [ARGS]" in result.output  # a group of its own, as before, not its single command
    assert runner.invoke(app, ["operator", "run", "--help"]).exit_code == 0


def _heaps_after_threads(cap: int | None) -> int:
    """glibc heaps (the main arena and one per thread arena) after 8 threads allocated, in a fresh process."""
    script = textwrap.dedent(f"""
        import ctypes, os, tempfile, threading
        from agentkube.operator import main
        if {cap!r} is not None:
            assert main.bound_malloc_arenas({cap!r})
        def allocate():
            blocks = [bytearray(4096 + i) for i in range(2000)]  # beyond Python's small-object allocator
            del blocks
        threads = [threading.Thread(target=allocate) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        path = tempfile.mktemp()
        stream = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        print(open(path).read().count("<heap nr="))
        os.unlink(path)
    """)
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not main.platform.libc_ver()[0] == "glibc", reason="malloc arenas are glibc's")
def test_malloc_arenas_are_capped_before_threads_start():
    assert _heaps_after_threads(None) > 2  # glibc's default: an arena per allocating thread, up to 8 per core
    assert _heaps_after_threads(2) <= 2
    assert _heaps_after_threads(1) == 1


def _kubeconfig(tmp_path, user: dict) -> str:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443",
                                                     "certificate-authority-data": base64.b64encode(b"ca").decode()}}],
              "users": [{"name": "u", "user": user}],
              "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_login_reads_a_kubeconfig_outside_a_pod(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", _kubeconfig(tmp_path, {"token": "abc"}))
    info = kube.login()
    assert (info.server, info.token, info.default_namespace) == ("https://127.0.0.1:6443", "abc", "team")
    assert info.as_http_headers() == {"Authorization": "Bearer abc"}


def test_login_refuses_a_kubeconfig_user_without_credentials_it_can_use(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", _kubeconfig(tmp_path, {"exec": {"command": "get-token"}}))
    with pytest.raises(kopf.LoginError, match="credential plugins"):
        kube.login()


@pytest.mark.parametrize("host, server", [("10.0.0.1", "https://10.0.0.1:443"), ("fd00::1", "https://[fd00::1]:443")])
def test_login_in_a_pod_uses_its_service_account_and_the_service_address(tmp_path, monkeypatch, host, server):
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("agentkube-system")
    (tmp_path / "ca.crt").write_text("ca")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", _kubeconfig(tmp_path, {"token": "not-this-one"}))
    info = kube.login()
    assert (info.server, info.token, info.default_namespace) == (server, "sa-token", "agentkube-system")
    assert info.ca_path == str(tmp_path / "ca.crt")


def test_paths_and_queries_are_escaped():
    assert kube.cluster_path("v1", "nodes", "n/1") == "/api/v1/nodes/n%2F1"
    assert kube.object_path("apps/v1", "ns", "deployments", "d", "scale") == "/apis/apps/v1/namespaces/ns/deployments/d/scale"
    assert kube.with_query("/api/v1/pods", labelSelector="a=b,c", fieldSelector=None) == "/api/v1/pods?labelSelector=a%3Db%2Cc"
    assert re.fullmatch(r"/api/v1/pods", kube.with_query("/api/v1/pods"))
