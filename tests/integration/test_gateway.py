"""The gateway as a real process against the real API server, as its service account with the chart's
RBAC: every refusal the caller can meet before a sandbox runs anything (no token, a forged or revoked
token, no RBAC, no such sandbox, no pod yet) and the resume it asks the operator for. Calls that run are
tested on the node (tests/e2e/test_helm.py)."""

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agentkube.devenv import process
from agentkube.devenv.cluster import free_port
from agentkube.operator import api
from harness import SYSTEM_NAMESPACE, helm_template, install_operator

GATEWAY_SA = "agentkube-gateway"
RUNTIME_PORT = free_port()  # where this module's gateway dials runtimes (on loopback addresses here)
SANDBOX = {"template": {"image": "sandbox", "resources": {"limits": {"memory": "512Mi", "cpu": "1"}}}}


@pytest.fixture(scope="module")
def gateway(devenv, kubectl, tmp_path_factory) -> Iterator[str]:
    install_operator(devenv, kubectl)  # CRDs and the system namespace
    kubectl("apply", "-f", "-", input=helm_template("gateway-rbac.yaml"))
    kubectl("create", "serviceaccount", GATEWAY_SA, "-n", SYSTEM_NAMESPACE, check=False)
    token = kubectl("create", "token", GATEWAY_SA, "-n", SYSTEM_NAMESPACE, "--duration=2h").stdout.strip()
    kubeconfig = devenv.write_token_kubeconfig(GATEWAY_SA, token)
    directory = tmp_path_factory.mktemp("gateway")
    key = directory / "key"
    key.write_text("k" * 64)
    port = free_port()
    record = process.start("gateway", [sys.executable, "-m", "agentkube", "gateway", "run", "--address=127.0.0.1",
                                       f"--port={port}", f"--runtime-key-file={key}", f"--kubeconfig={kubeconfig}",
                                       f"--runtime-port={RUNTIME_PORT}"],
                           directory / "gateway.log", tie_to_parent=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (directory / "gateway.log").read_text()[-3000:]
        time.sleep(0.2)
    yield url
    process.stop([record])
    log = (directory / "gateway.log").read_text()
    assert token not in log and "k" * 64 not in log, "no secret reaches the gateway's log"


@pytest.fixture(scope="module")
def team(kubectl) -> Iterator[str]:
    """A namespace with the service accounts `agent` (bound to the users' role) and `stranger` (not)."""
    namespace = "t-gateway-refusals"
    kubectl("create", "namespace", namespace)
    kubectl("apply", "-f", "-", input=helm_template("gateway-rbac.yaml"))
    for account in ("agent", "stranger", "gone"):
        kubectl("create", "serviceaccount", account, "-n", namespace)
    kubectl("create", "rolebinding", "agent-runs", "-n", namespace, "--clusterrole=agentkube-sandbox-user",
            f"--serviceaccount={namespace}:agent")
    yield namespace
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _token(kubectl, namespace: str, account: str) -> str:
    return kubectl("create", "token", account, "-n", namespace).stdout.strip()


def _run(url: str, namespace: str, name: str, token: str | None, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/v1/namespaces/{namespace}/sandboxes/{name}/run", json={"argv": ["true"]},
                      headers=headers, timeout=timeout)


def test_every_caller_is_authenticated_and_authorized_per_sandbox(gateway, team, kubectl):
    none = _run(gateway, team, "box", None)
    assert none.status_code == 401 and "no bearer token" in none.json()["error"]
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    forged = _run(gateway, team, "box", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtZSJ9.Zm9yZ2Vk")
    assert forged.status_code == 401 and "token not accepted" in forged.json()["error"]
    revoked = _token(kubectl, team, "gone")
    kubectl("delete", "serviceaccount", "gone", "-n", team)
    assert _run(gateway, team, "box", revoked).status_code == 401
    stranger = _run(gateway, team, "box", _token(kubectl, team, "stranger"))
    assert stranger.status_code == 403
    assert f"system:serviceaccount:{team}:stranger" in stranger.json()["error"]
    assert "agentsandboxes/exec" in stranger.json()["error"]
    # Allowed, but there is no such sandbox.
    agent = _token(kubectl, team, "agent")
    missing = _run(gateway, team, "box", agent)
    assert missing.status_code == 404 and "no AgentSandbox" in missing.json()["error"]
    # The role is per namespace: the same agent is a stranger elsewhere.
    assert _run(gateway, "default", "box", agent).status_code == 403


def test_a_bad_request_is_refused_after_authorization_and_before_any_sandbox_is_looked_at(gateway, team, kubectl):
    agent = _token(kubectl, team, "agent")
    bad = httpx.post(f"{gateway}/v1/namespaces/{team}/sandboxes/box/run", content=b'{"argv": []}',
                     headers={"Authorization": f"Bearer {agent}"})
    assert bad.status_code == 422 and "argv" in bad.json()["error"]
    # A stranger learns nothing of the request's validity.
    assert httpx.post(f"{gateway}/v1/namespaces/{team}/sandboxes/box/run", content=b"{",
                      headers={"Authorization": f"Bearer {_token(kubectl, team, 'stranger')}"}).status_code == 403


def test_a_call_to_a_suspended_sandbox_asks_the_operator_to_resume_it(gateway, team, kubectl):
    """No operator runs here: the gateway's patch is what is checked (the e2e test sees the sandbox run)."""
    manifest = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "sleeper"},
                "spec": {**SANDBOX, "lifecycle": {"suspend": True}}}
    kubectl("apply", "-n", team, "-f", "-", input=json.dumps(manifest))
    agent = _token(kubectl, team, "agent")
    try:
        _run(gateway, team, "sleeper", agent, timeout=3)
    except httpx.ReadTimeout:
        pass  # it waits for the pod, which no operator here makes
    sleeper = json.loads(kubectl("get", "-n", team, "agentsandbox/sleeper", "-o", "json").stdout)
    assert sleeper["spec"]["lifecycle"]["suspend"] is False



def test_processes_and_files_are_authorized_each_by_its_own_permission_before_anything_else(gateway, team, kubectl):
    agent, stranger = _token(kubectl, team, "agent"), _token(kubectl, team, "stranger")
    base = f"{gateway}/v1/namespaces/{team}/sandboxes/box"

    def ask(method: str, path: str, token: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{base}/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)

    refusals = {(method, path): ask(method, path, stranger, **kwargs) for method, path, kwargs in (
        ("GET", "processes", {}), ("POST", "processes", {"json": {"argv": ["true"]}}),
        ("GET", "processes/0123456789abcdef/output", {}), ("POST", "processes/0123456789abcdef/signal", {"json": {}}),
        ("PUT", "files?path=a", {"content": b"x"}), ("GET", "files?path=a", {}), ("GET", "files?path=.&list=1", {}),
        ("DELETE", "files?path=a", {}), ("GET", "files?path=/etc/passwd", {}))}
    for (method, path), answer in refusals.items():
        assert answer.status_code == 403, (method, path, answer.text)
    assert "create agentsandboxes/exec" in refusals["GET", "processes"].json()["error"]
    for (method, path), verb in ((("PUT", "files?path=a"), "create"), (("GET", "files?path=a"), "get"),
                                 (("GET", "files?path=.&list=1"), "list"), (("DELETE", "files?path=a"), "delete")):
        assert f"may not {verb} agentsandboxes/files" in refusals[method, path].json()["error"]
    # Allowed: checked (422 for what is never valid), then the sandbox is looked for (none here: 404).
    assert ask("GET", "files?path=../x", agent).status_code == 422
    assert ask("PUT", "files?path=/etc/x", agent, content=b"x").status_code == 422
    assert ask("POST", "processes/0123456789abcdef/signal", agent, json={"signal": "SEGV"}).status_code == 422
    assert ask("GET", "processes", agent).status_code == 404 and ask("GET", "files?path=a", agent).status_code == 404
    assert ask("GET", "processes/not-an-id", agent).status_code == 404  # no such route


def test_a_claim_from_a_warm_pool_is_authorized_on_the_pool_adopts_a_warm_pod_and_is_released(
        gateway, team, kubectl, devenv, tmp_path, eventually):
    from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

    from agentkube.client import Sandbox
    from agentkube.contract import CLAIMED_THROUGH_GATEWAY_LABEL, POOL_LABEL
    from harness import Operator

    api_client = kubernetes_client(devenv)
    operator = Operator(install_operator(devenv, kubectl), tmp_path)
    operator.start()
    try:
        pool = {"apiVersion": api.API_VERSION, "kind": "AgentSandboxPool", "metadata": {"name": "py", "namespace": team},
                "spec": {"replicas": 1, "template": SANDBOX}}
        kubectl("apply", "-f", "-", input=json.dumps(pool))
        core = CoreV1Api(api_client)
        warm = eventually(lambda: core.list_namespaced_pod(team, label_selector=f"{POOL_LABEL}=py").items,
                          message="no warm pod")[0]
        core.patch_namespaced_pod_status(warm.metadata.name, team, {"status": {  # no node here: play the kubelet
            "phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}})

        claims = f"{gateway}/v1/namespaces/{team}/pools/py/claims"
        stranger = httpx.post(claims, json={}, headers={"Authorization": f"Bearer {_token(kubectl, team, 'stranger')}"})
        assert stranger.status_code == 403 and "agentsandboxpools/claim" in stranger.json()["error"]
        agent = _token(kubectl, team, "agent")
        missing = httpx.post(f"{gateway}/v1/namespaces/{team}/pools/nope/claims", json={},
                             headers={"Authorization": f"Bearer {agent}"})
        assert missing.status_code == 404
        # The sandbox made while the pool was looked for is gone again.
        left = CustomObjectsApi(api_client).list_namespaced_custom_object(api.GROUP, api.VERSION, team, "agentsandboxes")
        assert not [s for s in left["items"] if s["spec"].get("pool") == "nope"], left

        sandbox = Sandbox.create("py", team, ttl="10m", env={"TASK": "42"}, gateway=gateway, token=agent)
        assert sandbox.claimed is not None and sandbox.claimed.warm and sandbox.claimed.pod_name == warm.metadata.name
        body = CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, team, "agentsandboxes",
                                                                         sandbox.name)
        assert body["spec"]["env"] == [{"name": "TASK", "value": "42"}]
        assert body["spec"]["lifecycle"]["expireAfter"] == "600s" and body["spec"]["lifecycle"]["shutdownPolicy"] == "Delete"
        assert body["metadata"]["labels"][CLAIMED_THROUGH_GATEWAY_LABEL] == "true"

        # Only sandboxes the gateway made for claims are released through it, only for those allowed to claim.
        forbidden = httpx.delete(f"{claims}/{sandbox.name}", headers={"Authorization": f"Bearer {_token(kubectl, team, 'stranger')}"})
        assert forbidden.status_code == 403
        kubectl("apply", "-n", team, "-f", "-", input=json.dumps({"apiVersion": api.API_VERSION, "kind": "AgentSandbox",
                                                                   "metadata": {"name": "by-hand"}, "spec": {"pool": "py"}}))
        by_hand = httpx.delete(f"{claims}/by-hand", headers={"Authorization": f"Bearer {agent}"})
        assert by_hand.status_code == 403 and "through the gateway" in by_hand.json()["error"]
        # A claim asked again under its name (its answer lost to a gateway restart) gets the sandbox it made,
        # not a second one; a name that someone else's sandbox has is refused.
        again = httpx.post(claims, json={"name": sandbox.name}, headers={"Authorization": f"Bearer {agent}"})
        assert again.status_code == 201 and again.json()["pod_name"] == sandbox.claimed.pod_name, again.text
        taken = httpx.post(claims, json={"name": "by-hand"}, headers={"Authorization": f"Bearer {agent}"})
        assert taken.status_code == 409 and "not this caller's claim" in taken.json()["error"], taken.text
        assert len([s for s in CustomObjectsApi(api_client).list_namespaced_custom_object(
            api.GROUP, api.VERSION, team, "agentsandboxes")["items"] if s["spec"].get("pool") == "py"]) == 2

        sandbox.release()

        def gone() -> bool:
            try:
                CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, team, "agentsandboxes",
                                                                          sandbox.name)
            except ApiException as error:
                return error.status == 404
            return False

        eventually(gone, message="the released sandbox is still there")
    finally:
        operator.stop()


def kubernetes_client(devenv):
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))


class _Impostor(ThreadingHTTPServer):
    """A listener on the address the gateway dials that is not the sandbox's runtime: it records every byte
    of every request and answers the proof with something else."""

    daemon_threads = True

    def __init__(self, address: str):
        self.seen: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.seen.append(self.requestline.encode() + b"\n" + bytes(self.headers) + self.rfile.read(length))
                body = json.dumps({"proof": "0" * 64}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _record

        server = self
        super().__init__((address, RUNTIME_PORT), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_listener_on_the_sandboxs_address_that_is_not_its_runtime_gets_neither_the_token_nor_the_command(
        gateway, team, kubectl, devenv, eventually):
    """The watch's address (status.runtime) is tried first, then the pod's (the direct reads); each is a
    listener that cannot prove itself the sandbox's runtime: each is sent a nonce and nothing else, and the
    caller is told."""
    from kubernetes.client import CoreV1Api

    from agentkube.contract import SANDBOX_LABEL, runtime_token

    kubectl("apply", "-n", team, "-f", "-", input=json.dumps(
        {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "impostor"}, "spec": SANDBOX}))
    uid = kubectl("get", "-n", team, "agentsandbox/impostor", "-o", "jsonpath={.metadata.uid}").stdout
    # No operator or node here: play both, the operator's status on 127.0.0.2 and the pod's kubelet on 127.0.0.3.
    kubectl("patch", "-n", team, "agentsandbox/impostor", "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"phase": "Running", "podName": "impostor", "runtime": {"podIP": "127.0.0.2", "name": "impostor"}}}))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "impostor", "labels": {SANDBOX_LABEL: "impostor"},
        "ownerReferences": [{"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "name": "impostor", "uid": uid,
                             "controller": True}]}, "spec": {"containers": [{"name": "sandbox", "image": "sandbox"}]}}
    kubectl("apply", "-n", team, "-f", "-", input=json.dumps(pod))
    CoreV1Api(kubernetes_client(devenv)).patch_namespaced_pod_status("impostor", team, {"status": {
        "phase": "Running", "podIP": "127.0.0.3", "podIPs": [{"ip": "127.0.0.3"}],
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}})
    watched, direct = _Impostor("127.0.0.2"), _Impostor("127.0.0.3")
    agent = _token(kubectl, team, "agent")
    command = "echo the-command-itself"
    try:
        def both_asked() -> bool:
            answer = httpx.post(f"{gateway}/v1/namespaces/{team}/sandboxes/impostor/run", timeout=30,
                                json={"argv": ["sh", "-c", command]}, headers={"Authorization": f"Bearer {agent}"})
            assert answer.status_code == 502 and "is not its runtime" in answer.json()["error"], answer.text
            return bool(watched.seen and direct.seen)

        eventually(both_asked, timeout=30, message="the gateway's watch never sent it to status.runtime's address")
    finally:
        for listener in (watched, direct):
            listener.shutdown()
            listener.server_close()
    token = runtime_token(b"k" * 64, team, "impostor", uid)
    for listener in (watched, direct):
        assert listener.seen and all(request.startswith(b"GET /v1/proof?nonce=") for request in listener.seen)
        received = b"".join(listener.seen)
        assert token.encode() not in received and b"Authorization" not in received
        assert b"the-command-itself" not in received and b"argv" not in received
