"""One thread for every call's deadline, instead of a timer thread per call."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Deadlines:
    """Runs `action()` once the wall-clock time `when` has come for a key, unless cancelled or replaced
    first. Wall clock, because deadlines are stored on disk and outlive the process that set them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._entries: dict[str, tuple[float, int, Callable[[], None]]] = {}
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
        self._thread.start()

    def schedule(self, key: str, when: float, action: Callable[[], None]) -> None:
        with self._wake:
            number = next(self._order)
            self._entries[key] = (when, number, action)
            heapq.heappush(self._heap, (when, number, key))
            if self._heap[0][2] == key:  # sooner than what the thread waits for: a wake-up per call otherwise
                self._wake.notify()

    def cancel(self, key: str) -> None:
        with self._wake:
            self._entries.pop(key, None)  # its heap item is skipped when it comes up

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed:
                    while self._heap and self._entries.get(self._heap[0][2], (0, -1))[1] != self._heap[0][1]:
                        heapq.heappop(self._heap)  # cancelled or replaced
                    if self._heap and self._heap[0][0] <= time.time():
                        _, _, key = heapq.heappop(self._heap)
                        action = self._entries.pop(key)[2]
                        break
                    self._wake.wait(timeout=min(1.0, self._heap[0][0] - time.time()) if self._heap else 1.0)
                else:
                    return
            try:
                action()
            except Exception:  # one failing action must not stop every other deadline
                import traceback

                traceback.print_exc()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)
