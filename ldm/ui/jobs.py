"""Long work (generation, diagnostics) in background threads: the page polls a job for its progress and result,
and can cancel it. A job's work function calls `job.update(fraction, message)`, which raises Cancelled once the
page asked to cancel, so work stops at its next step."""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from typing import Callable

# Errors whose message is meant for the person at the page (bad input, a missing file); anything else is a bug,
# reported with its type so that it can be told apart.
USER_ERRORS = (ValueError, FileNotFoundError)


class Cancelled(Exception):
    """Raised inside a job's work when the page cancelled it."""


class Job:
    """One piece of work: status is "running", "done", "error" or "cancelled"."""

    def __init__(self, job_id: str, kind: str):
        self.id, self.kind, self.started = job_id, kind, time.time()
        self.status, self.progress, self.message = "running", 0.0, "queued"
        self.result, self.error = None, None
        self._cancel = threading.Event()

    def update(self, fraction: float, message: str) -> None:
        """Records progress; raises Cancelled when a cancel was asked for."""
        if self._cancel.is_set():
            raise Cancelled(f"{self.kind} cancelled")
        self.progress, self.message = max(0.0, min(1.0, fraction)), message

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "progress": self.progress,
                "message": self.message, "error": self.error, "result": self.result,
                "seconds": round(time.time() - self.started, 1)}


def error_message(e: BaseException) -> str:
    """Returns the text the page shows for an exception: the message of a user error, else its type too."""
    return str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"


class Jobs:
    """The server's jobs by id; each runs `work(job)` in its own daemon thread and keeps what it returns."""

    def __init__(self, keep: int = 50):
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.keep = keep

    def start(self, kind: str, work: Callable[[Job], dict]) -> Job:
        with self._lock:
            job = Job(str(next(self._ids)), kind)
            self._jobs[job.id] = job
            for old in list(self._jobs)[:-self.keep]:  # finished or not, the oldest are forgotten
                del self._jobs[old]
        threading.Thread(target=self._run, args=(job, work), daemon=True, name=f"ldm-ui-{kind}-{job.id}").start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @staticmethod
    def _run(job: Job, work: Callable[[Job], dict]) -> None:
        try:
            job.result = work(job)
            job.status, job.progress, job.message = "done", 1.0, "done"
        except Cancelled as e:
            job.status, job.message = "cancelled", str(e)
        except Exception as e:  # noqa: BLE001 - the page shows it; the server keeps serving
            if job.cancelled:
                job.status, job.message = "cancelled", f"{job.kind} cancelled"
                return
            job.status, job.error = "error", error_message(e)
            job.message = job.error
            if not isinstance(e, USER_ERRORS):
                traceback.print_exc()
