"""Not collected on its own (no test_ prefix): test_interrupts.py runs it in a child pytest, then stops
that pytest the hard way while the environment is up."""

import json
import os
import time
from pathlib import Path


def test_hold_the_environment(devenv):
    report = {"root": str(devenv.layout.root), "pids": [p.pid for p in devenv.processes]}
    Path(os.environ["AGENTKUBE_PROBE_REPORT"]).write_text(json.dumps(report))
    time.sleep(120)  # bounded: the parent test interrupts long before this
