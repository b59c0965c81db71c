"""Ctrl-C and SIGTERM (pre-emption) as a request: the loop finishes its step, checkpoints, and stops.

A second Ctrl-C stops at once. The flag is agreed across ranks by the loop (trainer.fit.train_step), so every
rank writes the same checkpoint and leaves together.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self) -> None:
        self.requested = False  # this process got a signal
        self.agreed = False  # some rank got one: every rank stops after this step
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then stopping "
              "(Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
