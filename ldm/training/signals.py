"""StopRequest: turns SIGTERM and Ctrl-C (SIGINT) into a flag the training loop checks after each step."""
from __future__ import annotations

import signal
import threading
import time


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `.signal_name` instead of killing the process."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def agreed_stop_reason(accelerator, stop: StopRequest, started: float, max_minutes: float) -> str | None:
    """Returns why to stop now ("SIGTERM", "SIGINT", "max_minutes") or None, the same on every rank.

    Each rank may see a signal or the time budget at a different step; the max over ranks makes them all stop
    at the same step, so a checkpoint (which waits for every rank) never hangs.
    """
    import torch

    code = {None: 0, "SIGTERM": 1, "SIGINT": 2}.get(stop.signal_name, 1)
    if code == 0 and max_minutes > 0 and time.time() - started > max_minutes * 60:
        code = 3
    if accelerator.num_processes > 1:
        code = int(accelerator.reduce(torch.tensor(code, device=accelerator.device), "max").item())
    return {0: None, 1: "SIGTERM", 2: "SIGINT", 3: "max_minutes"}[code]
