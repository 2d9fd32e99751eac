"""A test run that is interrupted or killed leaves no control plane and no directory behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agentkube.devenv import sweep_abandoned

PROBE = Path(__file__).with_name("interrupt_probe.py")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run_probe_until_up(tmp_path: Path, eventually) -> tuple[subprocess.Popen, dict]:
    report = tmp_path / "report.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PROBE)],
        env={**os.environ, "AGENTKUBE_PROBE_REPORT": str(report)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A shell that runs us in the background ignores SIGINT, and its children inherit that; the probe
        # must see Ctrl-C as a user's pytest would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    eventually(lambda: report.exists() or child.poll() is not None, timeout=180, message="probe never came up")
    assert report.exists(), child.communicate()[0]
    return child, json.loads(report.read_text())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_tears_the_environment_down(tmp_path, eventually, sig):
    child, up = _run_probe_until_up(tmp_path, eventually)
    child.send_signal(sig)
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0
    assert not any(_alive(pid) for pid in up["pids"]), output
    assert not Path(up["root"]).exists(), output


def test_killed_run_leaves_no_process_and_the_next_run_sweeps_its_directory(tmp_path, eventually):
    child, up = _run_probe_until_up(tmp_path, eventually)
    child.kill()
    child.wait(timeout=30)
    eventually(lambda: not any(_alive(pid) for pid in up["pids"]), timeout=30, message="orphaned processes")
    stale = Path(up["root"])
    assert stale.exists()  # SIGKILL gave it no chance to clean up...
    assert stale in sweep_abandoned()  # ...so the next temporary environment does
    assert not stale.exists()
