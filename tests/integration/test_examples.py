"""The examples users copy from do what they say."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_local_cluster_example_runs_and_cleans_up(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "local_cluster.py")], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "kubectl says hello world" in result.stdout
