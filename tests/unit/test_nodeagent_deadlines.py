"""The node agent's single deadline thread: due actions run once, cancelled and replaced ones never."""

import threading
import time

from agentkube.ebpf.deadlines import Deadlines


def test_due_actions_run_and_cancelled_or_replaced_ones_do_not():
    deadlines = Deadlines()
    fired: list[str] = []
    last = threading.Event()
    try:
        now = time.time()
        deadlines.schedule("past", now - 5, lambda: fired.append("past"))
        deadlines.schedule("cancelled", now + 0.1, lambda: fired.append("cancelled"))
        deadlines.cancel("cancelled")
        deadlines.schedule("replaced", now + 0.1, lambda: fired.append("replaced-old"))
        deadlines.schedule("replaced", now + 0.2, lambda: fired.append("replaced-new"))
        deadlines.schedule("failing", now + 0.2, lambda: 1 / 0)  # must not stop the thread
        deadlines.schedule("last", now + 0.3, lambda: (fired.append("last"), last.set()))
        assert last.wait(timeout=30)
    finally:
        deadlines.close()
    assert fired == ["past", "replaced-new", "last"]
