"""The node agent on the real kernel: real cgroups, real BPF programs, real processes (as root).

One node agent serves the module; each test gets its own sandbox (a runtime process registered with
`--local`). Everything is removed afterwards, pass or fail."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentkube.client import ApiError
from agentkube.ebpf.agent import CALL_OOM_SCORE_ADJ, POOL_SLOTS_PER_SANDBOX
from agentkube.ebpf.cgroups import MAIN_LEAF, detect_layout
from agentkube.ebpf.local import LocalNodeAgent
from agentkube.ebpf.models import MAX_REQUEST_BYTES, CallRecord
from agentkube.ebpf.unixhttp import request
from harness import host_address

PY = sys.executable


@pytest.fixture(scope="module")
def agent():
    assert os.geteuid() == 0, "the node agent's tests need root (cgroups and BPF)"
    with LocalNodeAgent() as node_agent:
        yield node_agent


HOST = host_address()
# What the test sandboxes' spec grants: no egress by default, the host's own address through a profile.
TOOLS = {"default": {"network": {"egress": "none"}},
         "profiles": {"lan": {"network": {"egress": "explicit", "allow": [{"cidr": f"{HOST}/32"}]}}}}


@pytest.fixture
def sandbox(agent, request):
    name = "t-" + uuid.uuid4().hex[:8]
    local = agent.sandbox(name, memory="1Gi", cpu="1", pids="512", tools=json.dumps(TOOLS))
    try:
        yield local
    finally:
        local.close()
        agent.sandboxes.remove(local)


def sandbox_status(agent, sandbox):
    return request(agent.socket, "GET", f"/v1/sandboxes/{sandbox.namespace}/{sandbox.name}")


def sandbox_dirs(sandbox_cgroup: str) -> list[Path]:
    layout = detect_layout()
    dirs = []
    for hierarchy in layout.hierarchies:
        # v1 hierarchies nest the agent's root under the agent's own cgroup: find the sandbox by name. The
        # walk can meet a call cgroup just being removed (the warm pool churns them): walk again then.
        while True:
            try:
                dirs += [p for p in hierarchy.mount.rglob(Path(sandbox_cgroup).name) if p.is_dir()]
                break
            except FileNotFoundError:
                continue
    return dirs


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_call_reports_output_exit_code_and_usage(sandbox):
    result = sandbox.client.run(["sh", "-c", "echo out; echo err >&2; /bin/true; exit 3"], memory="64Mi", timeout=30)
    assert (result.stdout, result.stderr, result.exit_code, result.signal) == ("out\n", "err\n", 3, None)
    assert result.limits.memory == 64 * 2**20 and result.sources["memory"] == "intent"
    assert result.usage.exit_code == 3 and not result.usage.timed_out
    assert result.usage.peak_memory_bytes > 0 and result.usage.cpu_seconds > 0
    assert result.usage.processes_spawned == 2  # sh, and the /bin/true it forked
    assert sandbox.client.run(["cat"], stdin="piped").stdout == "piped"


def test_memory_hog_is_oom_killed_in_its_call_while_the_sandbox_lives(sandbox):
    hog = "chunks = []\nwhile True: chunks.append(bytearray(1 << 20))"
    result = sandbox.client.run([PY, "-c", hog], memory="64Mi", timeout=60)
    assert result.signal == 9 and result.usage.oom_kills >= 1
    assert result.usage.peak_memory_bytes >= 60 * 2**20
    assert not result.usage.timed_out
    assert sandbox.process.poll() is None, "the sandbox's main process died with the call"
    assert sandbox.client.run(["echo", "still here"]).stdout == "still here\n"


def test_a_call_not_its_sandbox_is_the_kernels_first_oom_victim(agent, sandbox, eventually):
    # Pooled (a held process placed ahead) and direct (placed on the call's path): both are marked before
    # the command's first instruction, and what they start inherits it; the sandbox's runtime is not marked.
    wait_for_pool(sandbox_status(agent, sandbox)["cgroup"], eventually)
    pooled = sandbox.client.run(["sh", "-c", "cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'"])
    assert pooled.stdout.split() == [str(CALL_OOM_SCORE_ADJ)] * 2, pooled.stderr
    direct = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS), pool_size="0")
    try:
        assert direct.client.run(["cat", "/proc/self/oom_score_adj"]).stdout.strip() == str(CALL_OOM_SCORE_ADJ)
    finally:
        direct.close()
        agent.sandboxes.remove(direct)
    runtime = Path(f"/proc/{sandbox.process.pid}/oom_score_adj").read_text()
    assert runtime == Path("/proc/self/oom_score_adj").read_text()  # as it was started


def test_crossing_memory_high_is_seen_without_a_kill(agent, sandbox):
    # 256Mi max, high at 90% (230.4Mi): touch 236Mi (plus the interpreter's few MiB) and exit normally.
    grow = "b = bytearray(236 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    result = sandbox.client.run([PY, "-c", grow], memory="256Mi", timeout=60)
    assert result.exit_code == 0 and result.usage.memory_high_events >= 1
    assert result.usage.peak_memory_bytes >= result.limits.memory_high
    record = CallRecord.model_validate(request(agent.socket, "GET", f"/v1/calls/{result.call_id}"))
    assert record.memory_high_first_seen is not None  # pushed by the watcher, not inferred from the peak
    assert record.started_at <= record.memory_high_first_seen <= record.finished_at


def test_fork_bomb_is_stopped_by_the_pids_limit_and_the_machine_stays_usable(agent, sandbox):
    results = {}
    bomb = threading.Thread(target=lambda: results.setdefault("bomb", sandbox.client.run(
        ["bash", "-c", "bomb() { bomb | bomb & }; bomb; exec sleep 1000"], pids=32, cpu=0.5, timeout=5)))
    bomb.start()
    try:
        deadline = time.monotonic() + 30
        while sandbox_status(agent, sandbox)["running_calls"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # While it runs: the host starts processes, and the same sandbox runs another call.
        assert subprocess.run(["true"], timeout=30).returncode == 0
        assert sandbox.client.run(["echo", "alive"], timeout=30).stdout == "alive\n"
    finally:
        bomb.join(timeout=120)
    usage = results["bomb"].usage
    assert usage.pids_limit_hits > 0, "the pids limit never refused a fork"
    assert usage.timed_out and results["bomb"].signal == 9
    assert sandbox_status(agent, sandbox)["running_calls"] == 0


class OneShotServer:
    """A TCP server on loopback that greets each connection; stops by itself after its deadline."""

    def __init__(self, lifetime: float = 120.0, host: str = "127.0.0.1"):
        self.host = host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(b"hello")

    def close(self):
        self._stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def server():
    running = OneShotServer()
    yield running
    running.close()


def connect_script(port: int, host: str = "127.0.0.1") -> list[str]:
    code = (f"import socket\ns = socket.create_connection(({host!r}, {port}), timeout=3)\n"
            "print(s.recv(5).decode())")
    return [PY, "-c", code]


def test_network_none_blocks_the_host_and_counts_it_while_loopback_stays_open(sandbox):
    server = OneShotServer(host="0.0.0.0")
    try:
        blocked = sandbox.client.run(connect_script(server.port, HOST), network="none", timeout=30)
        assert blocked.exit_code != 0
        assert blocked.usage.connections_blocked >= 1
        loopback = sandbox.client.run(connect_script(server.port), network="none", timeout=30)
        assert (loopback.exit_code, loopback.stdout, loopback.usage.connections_blocked) == (0, "hello\n", 0)
        allowed = sandbox.client.run(connect_script(server.port, HOST), profile="lan", timeout=30)
        assert (allowed.exit_code, allowed.stdout, allowed.usage.connections_blocked) == (0, "hello\n", 0)
        assert server.accepted == 2  # the blocked attempt never reached the server
    finally:
        server.close()


def test_allow_list_admits_only_its_destinations(sandbox):
    server = OneShotServer(host="0.0.0.0")
    try:
        exact = sandbox.client.run(connect_script(server.port, HOST), network=[f"{HOST}:{server.port}"], timeout=30)
        assert exact.stdout == "hello\n" and exact.usage.connections_blocked == 0
        other_port = sandbox.client.run(connect_script(server.port, HOST), network=[f"{HOST}:{(server.port % 60000) + 1}"],
                                        timeout=30)
        assert other_port.exit_code != 0 and other_port.usage.connections_blocked >= 1
    finally:
        server.close()


def test_asking_for_a_wider_network_than_the_spec_grants_is_refused(sandbox):
    for asked in ({"network": "internet"}, {"network": "cluster"}, {"network": ["10.0.0.0/8:443"]},
                  {"network": ["pypi.org:443"]}, {"profile": "fetch"}):
        with pytest.raises(ApiError) as refused:
            sandbox.client.run(["true"], **asked)
        assert refused.value.status == 422 and refused.value.message.startswith("network:"), asked


def test_ipv6_loopback_is_the_calls_own(sandbox):
    server = OneShotServer(host="::1")
    try:
        loopback = sandbox.client.run(connect_script(server.port, "::1"), network="none", timeout=30)
        assert loopback.stdout == "hello\n" and loopback.usage.connections_blocked == 0
    finally:
        server.close()


def test_timeout_kills_a_tree_with_a_daemonized_grandchild(sandbox):
    marker = f"agentkube-daemon-{uuid.uuid4().hex}"
    daemon = f"import time; time.sleep(1000)  # {marker}"
    script = f"setsid {PY} -c '{daemon}' </dev/null >/dev/null 2>&1 & echo $!; sleep 1000"
    result = sandbox.client.run(["sh", "-c", script], timeout=2)
    assert result.usage.timed_out and result.signal == 9
    grandchild = int(result.stdout.split()[0])
    assert not Path(f"/proc/{grandchild}").exists() or grandchild not in processes_with(marker)
    assert processes_with(marker) == []


def test_daemons_left_by_a_finished_command_are_killed(sandbox):
    marker = f"agentkube-leftover-{uuid.uuid4().hex}"
    script = f"setsid {PY} -c 'import time; time.sleep(1000)  # {marker}' </dev/null >/dev/null 2>&1 & echo started"
    result = sandbox.client.run(["sh", "-c", script], timeout=30)
    assert result.exit_code == 0 and not result.usage.timed_out
    assert processes_with(marker) == []


def test_cpu_quota_throttles(sandbox):
    spin = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"
    result = sandbox.client.run([PY, "-c", spin], cpu=0.1, timeout=60)
    assert result.exit_code == 0
    assert result.usage.throttled_seconds > 0


def bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


HELD_COMM = "agentkube-held-"  # the held program's name as /proc/PID/comm shows it (15 characters)


def held_in(unified_call_dir: Path) -> int | None:
    """The held process waiting in a call cgroup of the warm pool, if that is all the cgroup holds."""
    members = (unified_call_dir / "cgroup.procs").read_text().split()
    if len(members) == 1 and Path(f"/proc/{members[0]}/comm").read_text().strip() == HELD_COMM:
        return int(members[0])
    return None


def waiting_cgroups(sandbox_cgroup: str) -> dict[str, int]:
    """The sandbox's call cgroups that wait for a call (warm pool): name -> its held process."""
    unified = detect_layout().unified.mount / sandbox_cgroup.lstrip("/")
    waiting = {}
    for child in unified.iterdir():
        if child.is_dir() and child.name != MAIN_LEAF:
            try:
                pid = held_in(child)
            except OSError:  # removed while we looked: ENOENT, or ENODEV mid-removal
                continue
            if pid is not None:
                waiting[child.name] = pid
    return waiting


def call_cgroups_left(sandbox_cgroup: str) -> list[Path]:
    """Call cgroups (in any hierarchy) that are neither running a call, nor waiting in the warm pool, nor kept
    empty for a later fill (at most POOL_SLOTS_PER_SANDBOX of those: beyond that, the empty ones are left too)."""
    waiting = waiting_cgroups(sandbox_cgroup)
    try:
        others = [p for d in sandbox_dirs(sandbox_cgroup) for p in d.iterdir()
                  if p.is_dir() and p.name != MAIN_LEAF and p.name not in waiting]
        empty = [p for p in others if not (p / "cgroup.procs").read_text().split()]
    except (FileNotFoundError, OSError):  # one went while we looked: still changing
        return [Path(sandbox_cgroup)]
    spares = {p.name for p in empty}
    return [p for p in others if p not in empty or len(spares) > POOL_SLOTS_PER_SANDBOX]


def test_a_thousand_calls_leave_no_cgroup_attachment_or_process_behind(agent, sandbox, eventually):
    status = sandbox_status(agent, sandbox)
    layout = detect_layout()
    unified_dir = layout.unified.mount / status["cgroup"].lstrip("/")
    attached_before = bpftool("cgroup", "show", str(unified_dir))
    assert [p["name"] for p in attached_before] == ["egress"]
    for i in range(1000):
        result = sandbox.client.run(["/bin/true"], **({"network": "none"} if i % 2 else {"profile": "lan"}), timeout=30)
        assert result.exit_code == 0, result
    # A finished call's directories are removed just after its answer, off the call's path, or kept empty for a
    # later call of the sandbox.
    eventually(lambda: not call_cgroups_left(status["cgroup"]), timeout=30, message="call cgroups left behind")
    # What is left: the warm pool's waiting cgroups (at most its size), each with its held process alone and
    # a `none` policy; their map entries are the only ones (the module's other sandboxes are gone by now).
    # The pool refills just after the last calls, so the cgroups and map entries are compared once they agree.
    pins = Path("/sys/fs/bpf") / agent.instance

    def pool_settled() -> dict[str, int] | None:
        waiting = waiting_cgroups(status["cgroup"])
        entries = [len(bpftool("map", "dump", "pinned", str(pins / m))) for m in ("call_stats", "policies")]
        return waiting if len(waiting) == 2 and entries == [2, 2] else None  # the pool full again (its default size)

    waiting = eventually(pool_settled, timeout=30, message="the pool's waiting cgroups are the only map entries")
    for d in sandbox_dirs(status["cgroup"]):  # besides the main leaf: the kept ones, empty (call_cgroups_left)
        spares = [p for p in d.iterdir() if p.is_dir() and p.name not in waiting and p.name != MAIN_LEAF]
        assert (d / MAIN_LEAF).is_dir() and len(spares) <= POOL_SLOTS_PER_SANDBOX, spares
        assert not [p for p in spares if (p / "cgroup.procs").read_text().split()], spares
    assert bpftool("cgroup", "show", str(unified_dir)) == attached_before
    assert sandbox_status(agent, sandbox)["running_calls"] == 0
    main_pids = set((unified_dir / MAIN_LEAF / "cgroup.procs").read_text().split())
    others = main_pids - {str(sandbox.process.pid)}
    # Only the runtime and its held program's forker: no call left a process behind.
    assert str(sandbox.process.pid) in main_pids and len(others) <= 1, main_pids
    assert all(Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0--forker\0") for pid in others), others


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_restarting_the_node_agent_while_calls_run_loses_no_record_and_leaks_no_cgroup(agent, sandbox, tmp_path, crash,
                                                                                        eventually):
    release = tmp_path / "release"  # the calls run until the test creates this, after the restart
    wait_then_echo = f"i=0; while [ ! -e {release} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; echo done"
    results = []
    calls = [threading.Thread(target=lambda: results.append(sandbox.client.run(["sh", "-c", wait_then_echo], timeout=120)))
             for _ in range(3)]
    for call in calls:
        call.start()
    deadline = time.monotonic() + 30
    while sandbox_status(agent, sandbox)["running_calls"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_status(agent, sandbox)["running_calls"] == 3
    restarted_at = time.time()
    agent.restart(kill=crash)
    assert sandbox_status(agent, sandbox)["running_calls"] == 3
    # The waiting cgroups' empty records (opened at fill) read as calls that never started: removed.
    assert all(path.stat().st_size for path in (agent.state_dir / "calls").glob("*.json")
               if path.stat().st_mtime < restarted_at)
    release.touch()
    for call in calls:
        call.join(timeout=180)
    assert [r.stdout for r in results] == ["done\n"] * 3
    assert all(r.exit_code == 0 and r.usage is not None and r.usage.peak_memory_bytes > 0 for r in results)
    audit = [CallRecord.model_validate(json.loads(line)) for line in agent.audit_log.read_text().splitlines()]
    recovered = {r.call_id for r in audit if r.recovered}
    assert {r.call_id for r in results} <= recovered
    status = sandbox_status(agent, sandbox)
    eventually(lambda: not call_cgroups_left(status["cgroup"]), timeout=30, message="call cgroups left behind")
    # After the restart exactly one egress program is attached (the new process replaced the old one).
    unified_dir = detect_layout().unified.mount / status["cgroup"].lstrip("/")
    assert [p["name"] for p in bpftool("cgroup", "show", str(unified_dir))] == ["egress"]


def test_a_deadline_that_passes_while_the_agent_is_down_is_enforced_after_restart(agent, sandbox):
    results = []
    call = threading.Thread(target=lambda: results.append(sandbox.client.run(["sleep", "1000"], timeout=2)))
    call.start()
    try:
        deadline = time.monotonic() + 30

        def records() -> list[Path]:  # a waiting cgroup's record is empty until its call starts
            return [path for path in (agent.state_dir / "calls").glob("*.json") if path.stat().st_size]

        while not records() and time.monotonic() < deadline:
            time.sleep(0.05)
        record = CallRecord.model_validate_json(records()[0].read_text())
        agent.process.kill()  # a crash: no chance to clean up
        agent.process.wait()
        while time.time() <= record.deadline:  # the deadline passes while nobody watches
            time.sleep(0.05)
        agent.start()
    finally:
        call.join(timeout=120)
    (result,) = results
    assert result.usage.timed_out and result.signal == 9
    assert sandbox_status(agent, sandbox)["running_calls"] == 0


def raw_request(socket_path: Path, data: bytes) -> tuple[int, str]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(data)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
            if b"\r\n\r\n" in response:
                head, _, body = response.partition(b"\r\n\r\n")
                length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0))
                if len(body) >= length:
                    break
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2].decode()


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_outsiders_and_bad_requests_are_refused_and_the_agent_keeps_serving(agent, sandbox):
    assert oct(agent.socket.stat().st_mode & 0o777) == "0o600"
    ref = {"name": sandbox.name, "namespace": sandbox.namespace}
    # The test process is not in the sandbox: it may not place a process there.
    with pytest.raises(ApiError) as refused:
        request(agent.socket, "POST", "/v1/calls", {**ref, "pid": sandbox.process.pid, "argv": ["x"]})
    assert refused.value.status == 403 and "not the runtime" in refused.value.message

    # A tool call inside the sandbox may neither place itself nor manage sandboxes, nor get its runtime to
    # run a call with more than it has, nor read its runtime's status.
    probe = (
        "import json, os, sys\nfrom agentkube.ebpf.unixhttp import request, ApiError\nout = {}\n"
        f"for name, (socket, method, path, body) in {{"
        f"'place': ({str(agent.socket)!r}, 'POST', '/v1/calls', {{**{ref!r}, 'pid': os.getpid(), 'argv': ['x']}}),"
        f" 'create': ({str(agent.socket)!r}, 'POST', '/v1/sandboxes', {{'name': 'evil'}}),"
        f" 'delete': ({str(agent.socket)!r}, 'DELETE', '/v1/sandboxes/{sandbox.namespace}/{sandbox.name}', None),"
        f" 'run': ({str(sandbox.socket)!r}, 'POST', '/v1/run', {{'argv': ['true'], 'intent': {{'network': {{'egress': 'internet'}}}}}}),"
        f" 'status': ({str(sandbox.socket)!r}, 'GET', '/v1/status', None)}}.items():\n"
        f"    try:\n        request(socket, method, path, body); out[name] = 200\n"
        "    except ApiError as e:\n        out[name] = e.status\n"
        # ... nor in the frames the SDK speaks to the runtime
        f"from agentkube.ebpf.frames import FrameClient\nframes = FrameClient({str(sandbox.socket)!r}, upgrade=True)\n"
        "for op, fields in {'run': {'run': {'argv': ['true']}}, 'status': {}}.items():\n"
        "    try:\n        frames.send(op, fields); out[op + ' frame'] = 200\n"
        "    except ApiError as e:\n        out[op + ' frame'] = e.status\nprint(json.dumps(out))\n")
    inside = sandbox.client.run([PY, "-c", probe], network="none", timeout=60)
    assert json.loads(inside.stdout) == {"place": 403, "create": 403, "delete": 403, "run": 403, "status": 403,
                                         "run frame": 403, "status frame": 403}, inside.stderr

    cases = [
        (post("/v1/calls", b"{not json"), 400, "not JSON"),
        (post("/v1/calls", b"[1, 2]"), 400, "JSON object"),
        (post("/v1/calls", json.dumps({**ref, "pid": 5, "argv": []}).encode()), 422, "argv"),
        (post("/v1/calls", json.dumps({**ref, "pid": 5, "argv": ["x"], "surprise": 1}).encode()), 422, "surprise"),
        (post("/v1/sandboxes", json.dumps({"name": "Bad_Name"}).encode()), 422, "DNS label"),
        (post("/v1/sandboxes", json.dumps({"name": "pod", "kubernetes": {
            "pod_uid": "1f2e3d4c-0000-1111-2222-333344445555", "container_id": "ab" * 32}}).encode()), 422, "--local"),
        (post("/v1/sandboxes", json.dumps({"name": "tight", "envelope": {"memory": "lots"}}).encode()), 422, "quantity"),
        (post("/v1/calls", json.dumps({**ref, "pid": 5, "argv": ["x"], "intent": {"network": {"egress": "all"}}}).encode()),
         422, "egress"),
        (post("/v1/calls", json.dumps({**ref, "pid": 5, "argv": ["x"], "intent": {"memory": "lots"}}).encode()),
         422, "quantity"),
        (post("/v1/calls", b"x" * (MAX_REQUEST_BYTES + 1)), 413, "limit"),
        (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
        (b"PUT /v1/calls HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 501, ""),
        (b"GET /v1/sandboxes/default/missing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no sandbox"),
    ]
    for data, status, message in cases:
        got_status, body = raw_request(agent.socket, data)
        assert got_status == status and message in body, (data[:60], got_status, body)

    with pytest.raises(ApiError) as too_big:
        sandbox.client.run(["true"], memory="8Gi")
    assert too_big.value.status == 422 and "envelope" in too_big.value.message
    with pytest.raises(ValidationError, match="not a domain name"):  # the SDK checks before sending
        sandbox.client.run(["true"], network=["nowhere:80"])

    assert agent.process.poll() is None
    assert sandbox.client.run(["echo", "ok"]).stdout == "ok\n"


def test_nothing_of_one_sandbox_can_be_placed_finished_read_or_killed_from_another(agent, sandbox):
    other = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS))
    try:
        victim = {"name": other.name, "namespace": other.namespace}
        running = threading.Thread(target=lambda: other.client.run(["sleep", "3"], timeout=30))
        running.start()
        deadline = time.monotonic() + 30
        while sandbox_status(agent, other)["running_calls"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        call_id = next(iter(json.loads(p.read_text())["call_id"] for p in (agent.state_dir / "calls").glob("*.json")
                            if p.stat().st_size))  # a waiting cgroup's record is empty until its call starts
        # From a call of `sandbox`: every route of the agent and of the other sandbox's runtime, about `other`.
        probe = (
            "import json\nfrom agentkube.ebpf.unixhttp import request, ApiError\nout = {}\n"
            f"for name, (socket, method, path, body) in {{"
            f"'place': ({str(agent.socket)!r}, 'POST', '/v1/calls', {{**{victim!r}, 'pid': 2, 'argv': ['x']}}),"
            f" 'finish': ({str(agent.socket)!r}, 'POST', '/v1/calls/{call_id}/finish', {{}}),"
            f" 'read': ({str(agent.socket)!r}, 'GET', '/v1/calls/{call_id}', None),"
            f" 'status': ({str(agent.socket)!r}, 'GET', '/v1/sandboxes/{other.namespace}/{other.name}', None),"
            f" 'kill': ({str(agent.socket)!r}, 'DELETE', '/v1/sandboxes/{other.namespace}/{other.name}', None),"
            f" 'run': ({str(other.socket)!r}, 'POST', '/v1/run', {{'argv': ['true']}})}}.items():\n"
            "    try:\n        request(socket, method, path, body); out[name] = 200\n"
            "    except ApiError as e:\n        out[name] = e.status\nprint(json.dumps(out))\n")
        inside = sandbox.client.run([PY, "-c", probe], network="none", timeout=60)
        assert json.loads(inside.stdout) == dict.fromkeys(["place", "finish", "read", "status", "kill", "run"], 403), inside.stderr
        assert sandbox_status(agent, other)["running_calls"] == 1  # untouched: neither finished nor killed
        running.join(timeout=60)
        assert sandbox_status(agent, other)["running_calls"] == 0
    finally:
        other.close()
        agent.sandboxes.remove(other)


def test_calls_are_audited_and_exported_with_bounded_labels(agent, sandbox):
    result = sandbox.client.run(["echo", "metrics"], profile="shell")
    audit = [json.loads(line) for line in agent.audit_log.read_text().splitlines()]
    mine = next(r for r in audit if r["call_id"] == result.call_id)
    assert mine["profile"] == "shell" and mine["usage"]["exit_code"] == 0 and mine["executed"] == ["echo"]
    metrics = request(agent.socket, "GET", "/metrics")
    line = (f'agentkube_tool_calls_total{{namespace="{sandbox.namespace}",outcome="ok",profile="shell",'
            f'sandbox="{sandbox.name}"}}')
    assert line in metrics
    assert result.call_id not in metrics
    assert CallRecord.model_validate(request(agent.socket, "GET", f"/v1/calls/{result.call_id}")).usage == result.usage
    activity = sandbox.client.status().last_activity
    assert activity >= mine["finished_at"] - 1e-3


def test_maps_pinned_by_another_version_of_the_programs_are_replaced():
    """An upgrade that changes a map's layout finds the old version's pinned map: the verifier would refuse
    the new programs against it, so the agent starts with fresh maps instead of failing."""
    instance = f"agentkube-stale-{uuid.uuid4().hex[:8]}"
    pins = Path("/sys/fs/bpf") / instance
    pins.mkdir(parents=True)
    subprocess.run(["bpftool", "map", "create", str(pins / "call_stats"), "type", "hash", "key", "8", "value", "8",
                    "entries", "16", "name", "call_stats"], check=True)
    with LocalNodeAgent(instance=instance) as agent:
        local = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS))
        try:
            assert local.client.run(["echo", "fresh"]).stdout == "fresh\n"
        finally:
            local.close()
        assert "replacing maps pinned by another version" in agent.log.read_text()
    assert not pins.exists()


# --- the warm pool: call cgroups made, and their first process placed, before the call -------------------

def wait_for_pool(sandbox_cgroup: str, eventually, size: int = 2) -> dict[str, int]:
    eventually(lambda: len(waiting_cgroups(sandbox_cgroup)) == size, timeout=30, message="the warm pool did not fill")
    return waiting_cgroups(sandbox_cgroup)


def test_a_call_is_born_in_its_cgroup_with_its_limits_already_applied(agent, sandbox, eventually):
    status = sandbox_status(agent, sandbox)
    waiting = wait_for_pool(status["cgroup"], eventually)
    # The command's first act: where am I (every hierarchy, the v1 ones of a hybrid host included)?
    result = sandbox.client.run(["cat", "/proc/self/cgroup"], memory="48Mi", pids=40, timeout=30)
    assert result.exit_code == 0, result.stderr
    call_cgroup = f"call-{result.call_id}"
    assert call_cgroup in waiting, "the call did not run in a cgroup that was waiting before it was asked for"
    layout = detect_layout()
    paths = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in result.stdout.splitlines()}
    for hierarchy in layout.hierarchies:
        key = "" if hierarchy.version == 2 else next(k for k in paths if set(hierarchy.controllers) <= set(k.split(",")))
        assert paths[key].endswith("/" + call_cgroup), (hierarchy.name, result.stdout)
    # And under which limits: the call's own, not the pool's defaults, before its command's first instruction.
    limit = "memory.max" if layout.kind == "v2" else "memory.limit_in_bytes"
    memory = next(k for k in paths if "memory" in k.split(",")) if layout.kind == "hybrid" else ""
    mount = layout.hierarchy_for("memory").mount
    read_limit = sandbox.client.run(
        ["sh", "-c", f'cat "{mount}$(grep "^[0-9]*:{memory}:" /proc/self/cgroup | cut -d: -f3)/{limit}"'],
        memory="48Mi", timeout=30)
    assert read_limit.stdout.strip() == str(48 << 20), read_limit.stderr


def call_cgroup_name(result) -> str:
    """The call cgroup a `cat /proc/self/cgroup` call ran in (its unified line)."""
    return next(line for line in result.stdout.splitlines() if line.startswith("0::")).rsplit("/", 1)[-1]


def test_an_ended_calls_cgroup_serves_a_later_call_which_is_accounted_alone(agent, sandbox, eventually, tmp_path):
    status = sandbox_status(agent, sandbox)
    wait_for_pool(status["cgroup"], eventually)
    # The first call of a new sandbox runs in a cgroup made for it (named after it): 64 MiB and some CPU.
    heavy = sandbox.client.run([PY, "-c", "x = bytearray(64 << 20); sum(range(3_000_000))"], memory="256Mi",
                               timeout=60)
    assert heavy.exit_code == 0, heavy.stderr
    assert heavy.usage.peak_memory_bytes > 64 << 20 and heavy.usage.cpu_seconds > 0.05, heavy.usage
    # A call that leaves more than page-cache crumbs charged to its cgroup (8 MiB of dirty file pages) does
    # not hand it on.
    dirty = tmp_path / "dirty"
    left = sandbox.client.run(["dd", "if=/dev/zero", f"of={dirty}", "bs=1M", "count=8"], timeout=60)
    assert left.exit_code == 0, left.stderr
    ran_in: dict[str, object] = {}
    for _ in range(12):  # the ended calls' cgroups go round through the pool: a few calls meet the heavy one's
        result = sandbox.client.run(["cat", "/proc/self/cgroup"], timeout=30)
        assert result.exit_code == 0, result.stderr
        ran_in[call_cgroup_name(result)] = result
    later = ran_in.get(f"call-{heavy.call_id}")
    assert later is not None, f"no later call ran in the first call's cgroup: {sorted(ran_in)}"
    assert later.call_id != heavy.call_id
    # Its own usage, not the cgroup's since it was made: the peak reset, the CPU counted from its start.
    assert later.usage.peak_memory_bytes < 16 << 20, later.usage
    assert later.usage.cpu_seconds < heavy.usage.cpu_seconds / 2, (later.usage, heavy.usage)
    assert f"call-{left.call_id}" not in ran_in
    eventually(lambda: not [d for d in sandbox_dirs(status["cgroup"]) if (d / f"call-{left.call_id}").exists()],
               timeout=30, message="the cgroup of the call that left 8 MiB charged was not removed")


def test_a_kept_cgroup_gives_a_later_call_none_of_an_earlier_calls_egress(agent, sandbox, eventually):
    # From inside a call: the cgroup a `lan` call ran in serves later `none` calls, which must be blocked like any.
    wait_for_pool(sandbox_status(agent, sandbox)["cgroup"], eventually)
    server = OneShotServer(host="0.0.0.0")
    probe = [PY, "-c", (
        "import socket\nprint(next(l for l in open('/proc/self/cgroup') if l.startswith('0::')).rsplit('/', 1)[-1])\n"
        f"socket.create_connection(({HOST!r}, {server.port}), timeout=1).recv(5)\nprint('connected')")]
    try:
        wide = sandbox.client.run(probe, profile="lan", timeout=30)
        assert wide.exit_code == 0 and wide.stdout.split() == [f"call-{wide.call_id}", "connected"], wide.stderr
        later = []
        for _ in range(8):  # the ended calls' cgroups go round through the pool
            narrow = sandbox.client.run(probe, network="none", timeout=30)
            assert narrow.exit_code != 0 and "connected" not in narrow.stdout and narrow.usage.connections_blocked >= 1
            later += [narrow] if narrow.stdout.split()[0] == f"call-{wide.call_id}" else []
        assert later, "no later call ran in the lan call's cgroup"
        assert server.accepted == 1
    finally:
        server.close()


def test_a_refill_waits_with_the_latest_calls_limits_and_a_call_asking_for_others_still_gets_its_own(
        agent, sandbox, eventually):
    status = sandbox_status(agent, sandbox)
    layout = detect_layout()
    limit = "memory.max" if layout.kind == "v2" else "memory.limit_in_bytes"
    mount = layout.hierarchy_for("memory").mount

    def memory_path(proc_cgroup: str) -> str:  # the memory hierarchy's line of a /proc/PID/cgroup
        return next(line.split(":", 2)[2] for line in proc_cgroup.splitlines()
                    if (line.split(":")[1] == "") == (layout.kind == "v2") and
                    (layout.kind == "v2" or "memory" in line.split(":")[1].split(",")))

    def waiting_limits() -> set[int] | None:
        try:  # each waiting cgroup's memory limit, found through its held process
            return {int((mount / memory_path(Path(f"/proc/{pid}/cgroup").read_text()).lstrip("/") / limit).read_text())
                    for pid in waiting_cgroups(status["cgroup"]).values()}
        except (FileNotFoundError, ProcessLookupError, StopIteration):  # changing while we looked
            return None

    def own_limit(**intent) -> tuple[int, int]:  # read by the call itself (its cgroup goes when it ends); resolved
        controllers = "" if layout.kind == "v2" else next(
            line.split(":")[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":")[1].split(","))
        result = sandbox.client.run(
            ["sh", "-c", f'cat "{mount}$(grep "^[0-9]*:{controllers}:" /proc/self/cgroup | cut -d: -f3)/{limit}"'],
            timeout=30, **intent)
        assert result.exit_code == 0, result.stderr
        return int(result.stdout), result.limits.memory

    wait_for_pool(status["cgroup"], eventually)
    # Two calls take the two cgroups that waited under the defaults; a call's take starts its refill, whose
    # fill can reach the agent before that call's start, so the third call's refill is the first sure to
    # come after a 48Mi start.
    for _ in range(3):
        assert own_limit(memory="48Mi") == (48 << 20, 48 << 20)
    # The cgroups filled after them wait under their limits (within the envelope, as they were resolved).
    eventually(lambda: waiting_limits() == {48 << 20}, timeout=30, message="refills did not take the latest limits")
    assert own_limit(memory="48Mi") == (48 << 20, 48 << 20)  # the same intent: nothing to write at its start
    # No intent: what the agent resolves for it (history of the command, else the sandbox's default), whatever
    # its waiting cgroup held.
    held, resolved = own_limit()
    assert held == resolved != 48 << 20


def test_call_cgroups_serve_one_call_at_a_time_and_never_another_sandbox(agent, sandbox, eventually):
    other = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS))
    try:
        mine, theirs = sandbox_status(agent, sandbox)["cgroup"], sandbox_status(agent, other)["cgroup"]
        wait_for_pool(mine, eventually)
        wait_for_pool(theirs, eventually)
        seen: dict[str, str] = {}
        for _ in range(20):
            for who, box, root in (("mine", sandbox, mine), ("theirs", other, theirs)):
                result = box.client.run(["cat", "/proc/self/cgroup"], timeout=30)
                unified = next(line.split(":", 2)[2] for line in result.stdout.splitlines() if line.startswith("0::"))
                assert unified.startswith(root + "/"), (who, unified)  # its own sandbox's cgroup, always
                seen[unified] = who
        # An ended call's cgroup serves later calls of its own sandbox (one at a time: a call starts only in a
        # cgroup that holds its held process alone), never another's; what is left over is removed.
        assert len(seen) < 40, "no cgroup served a second call"
        eventually(lambda: not call_cgroups_left(mine) and not call_cgroups_left(theirs), timeout=30)
    finally:
        other.close()
        agent.sandboxes.remove(other)


def test_the_pool_goes_with_its_sandbox(agent, eventually):
    own_cgroups = Path("/sys/fs/bpf") / agent.instance / "sandbox_cgroups"  # each sandbox's and its main leaf's
    local = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS))
    try:
        status = sandbox_status(agent, local)
        held = wait_for_pool(status["cgroup"], eventually)
        registered = len(bpftool("map", "dump", "pinned", str(own_cgroups)))
    finally:
        local.close()
        agent.sandboxes.remove(local)
    assert sandbox_dirs(status["cgroup"]) == []  # every hierarchy: the sandbox and its waiting cgroups
    assert len(bpftool("map", "dump", "pinned", str(own_cgroups))) == registered - 2
    for pid in held.values():
        eventually(lambda pid=pid: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                   timeout=10, message=f"held process {pid} outlived its sandbox")


def test_deleting_a_sandbox_while_its_pool_refills_leaves_nothing_behind(agent, eventually):
    # A call's end starts a refill; deleting the sandbox right then must not let the new cgroup join a pool
    # that has already been taken away (it would keep its held process and map entries for ever).
    pins = Path("/sys/fs/bpf") / agent.instance
    held = []
    for _ in range(20):
        local = agent.sandbox("t-" + uuid.uuid4().hex[:8], tools=json.dumps(TOOLS))
        try:
            status = sandbox_status(agent, local)
            held += wait_for_pool(status["cgroup"], eventually).values()
            assert local.client.run(["/bin/true"], timeout=30).exit_code == 0
        finally:
            local.close()
            agent.sandboxes.remove(local)
        assert sandbox_dirs(status["cgroup"]) == []
    assert [len(bpftool("map", "dump", "pinned", str(pins / m))) for m in ("call_stats", "policies")] == [0, 0]
    eventually(lambda: not [pid for pid in held if Path(f"/proc/{pid}").exists()
                            and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]],
               timeout=10, message="a held process outlived its sandbox")


def test_a_process_slipped_into_a_waiting_cgroup_never_shares_a_call(agent, sandbox, eventually):
    # Only root can put a process into a call cgroup; if anything ever did, the call that was to use that
    # cgroup must not run beside it: the agent checks the cgroup holds its held process alone.
    status = sandbox_status(agent, sandbox)
    waiting = wait_for_pool(status["cgroup"], eventually)
    unified = detect_layout().unified.mount / status["cgroup"].lstrip("/")
    intruders = [subprocess.Popen(["sleep", "300"]) for _ in waiting]
    try:
        for intruder, name in zip(intruders, waiting, strict=True):
            (unified / name / "cgroup.procs").write_text(str(intruder.pid))
        result = sandbox.client.run(["cat", "/proc/self/cgroup"], timeout=30)
        assert result.exit_code == 0
        unified_path = next(line.split(":", 2)[2] for line in result.stdout.splitlines() if line.startswith("0::"))
        assert Path(unified_path).name not in waiting  # it ran elsewhere (directly, or in a fresh cgroup)
        for intruder in intruders:  # a tampered cgroup is discarded, what was in it killed
            assert intruder.wait(timeout=30) == -9
    finally:
        for intruder in intruders:
            intruder.kill()
            intruder.wait()


def test_a_call_can_neither_start_nor_fill_nor_finish_through_frames(agent, sandbox, eventually):
    # The runtime's framed requests, tried from inside a call: refused like the HTTP ones, before anything is
    # looked at (a waiting cgroup's id is no key to anything).
    status = sandbox_status(agent, sandbox)
    slot = next(iter(wait_for_pool(status["cgroup"], eventually))).removeprefix("call-")
    ref = {"name": sandbox.name, "namespace": sandbox.namespace}
    probe = (
        "import json, os\nfrom agentkube.ebpf.frames import FrameClient\nfrom agentkube.ebpf.unixhttp import ApiError\n"
        f"client = FrameClient({str(agent.socket)!r})\nout = {{}}\n"
        f"for name, fields in {{'start': ('start', dict(**{ref!r}, call_id={slot!r}, argv=['id'])),"
        f" 'fill': ('fill', dict(**{ref!r}, pid=os.getpid())),"
        f" 'place': ('place', dict(**{ref!r}, pid=os.getpid(), argv=['id'])),"
        f" 'finish': ('finish', dict(call_id={slot!r}))}}.items():\n"
        "    try:\n        client.request(fields[0], **fields[1]); out[name] = 200\n"
        "    except ApiError as e:\n        out[name] = e.status\n"
        # A fill with a pipe attached, as the runtime sends its held process's release pipe: refused, and the
        # agent keeps no copy of the pipe (closed before it answers: the probe then reads EOF at once).
        f"r, w = os.pipe()\nwith_pipes = FrameClient({str(agent.socket)!r}, descriptors=True)\n"
        f"try:\n    with_pipes.send('fill', dict(**{ref!r}, pid=os.getpid()), w); out['fill+pipe'] = 200\n"
        "except ApiError as e:\n    out['fill+pipe'] = e.status\n"
        "os.close(w); os.set_blocking(r, False)\n"
        "try:\n    out['pipe kept by the agent'] = os.read(r, 1) != b''\n"
        "except BlockingIOError:\n    out['pipe kept by the agent'] = True\n"
        "out['cgroup'] = open('/proc/self/cgroup').read()\nprint(json.dumps(out))\n")
    inside = sandbox.client.run([PY, "-c", probe], network="none", timeout=60)
    answers = json.loads(inside.stdout)
    # The probe's own call may have taken that very slot from the pool: finishing it is then the runtime's
    # alone (403); a slot still waiting is no running call (404). Either way nothing happens to it.
    took_the_slot = f"call-{slot}" in answers.pop("cgroup")
    assert answers == {"start": 403, "fill": 403, "place": 403, "finish": 403 if took_the_slot else 404,
                       "fill+pipe": 403, "pipe kept by the agent": False}, inside.stderr
    if not took_the_slot:
        assert slot in {name.removeprefix("call-") for name in waiting_cgroups(status["cgroup"])}  # still waiting, untouched
