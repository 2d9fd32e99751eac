"""`agentkube dev up` / `status` / `down` from the command line, as a user runs them: up twice is
harmless, and down leaves no process and no directory behind."""

import json
import subprocess
import sys
from pathlib import Path

import psutil


def _agentkube(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentkube", "dev", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=300,
    )


def test_dev_up_is_idempotent_and_dev_down_leaves_nothing(tmp_path):
    state_dir = tmp_path / "dev"
    first = _agentkube("up", state_dir=state_dir)
    assert first.returncode == 0, first.stderr
    try:
        state = json.loads((state_dir / "state.json").read_text())
        records = state["processes"]
        assert {r["name"] for r in records} == {"etcd", "kube-apiserver", "kube-controller-manager", "prometheus"}
        # They run on after the command that started them has exited.
        assert all(psutil.pid_exists(r["pid"]) for r in records)

        second = _agentkube("up", state_dir=state_dir)
        assert second.returncode == 0, second.stderr
        assert "already up" in second.stderr
        assert json.loads((state_dir / "state.json").read_text())["processes"] == records

        status = _agentkube("status", state_dir=state_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "kube-apiserver" in status.stdout

        exports = _agentkube("env", state_dir=state_dir).stdout
        assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in exports
        # The exports work as a user uses them: evaluated by a shell, then the bare `kubectl` name.
        ready = subprocess.run(
            ["bash", "-c", f"{exports}\nkubectl get --raw /readyz && echo && helm version --short"],
            capture_output=True, text=True, timeout=60,
        )
        assert ready.returncode == 0, ready.stderr
        assert ready.stdout.splitlines()[0] == "ok"
        assert ready.stdout.splitlines()[1].startswith("v4.")
        # Credentials are readable by their owner only.
        assert (state_dir / "kubeconfig").stat().st_mode & 0o077 == 0
        assert state_dir.stat().st_mode & 0o077 == 0
    finally:
        down = _agentkube("down", state_dir=state_dir)
    assert down.returncode == 0, down.stderr
    assert not state_dir.exists()
    survivors = [r for r in records if psutil.pid_exists(r["pid"]) and psutil.Process(r["pid"]).status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    # No process still runs from the removed directory (a child the components spawned, say).
    assert [p.pid for p in psutil.process_iter(["cmdline"]) if str(state_dir) in " ".join(p.info["cmdline"] or [])] == []

    after = _agentkube("status", state_dir=state_dir)
    assert after.returncode == 1
