"""StopRequest: turns SIGTERM and Ctrl-C (SIGINT) into a flag the training loop checks after each step."""
from __future__ import annotations

import signal
import threading


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
