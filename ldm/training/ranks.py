"""A dead or hung rank: bound how long the others wait for it, and name it when they stop.

What torchrun (Accelerate's multi-GPU launcher) already does on one machine: its elastic agent polls its workers
every --monitor_interval (0.1 s); when one exits (kill -9 included) it sends the others SIGTERM, then SIGKILL 30 s
later, and its "Root Cause" report names the failed rank and its exit code (-9: SIGKILL). A peer that dies closes
its sockets, so a gloo collective waiting on it fails at once ("Connection reset by peer").

What is added here, for what the agent cannot see:
- a hung rank (stopped, deadlocked, its machine unplugged: no socket is closed) leaves the others in a collective
  until the process group's timeout; `collective_timeout` sets it from --ddp-timeout (0: torch's default, 30 min
  for gloo, 10 min for NCCL).
- on another node (several `accelerate launch` agents, one per machine) a rank's agent reports only its own
  ranks: a surviving rank's error names an address ("Read error [127.0.0.1]:65180"), not the rank that died.
  While training, each rank's `Heartbeat` thread counts up a key of its own in the rendezvous store (c10d's
  TCPStore, held by node 0's launcher, not by any worker); `lost_ranks_named` turns a failed collective into an
  error naming the ranks whose count stopped (dead, or stopped as a whole process), with the checkpoint to
  continue from. A rank whose count still moves is alive: an error of the survivor's own is re-raised as it is.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

BEAT_S = 1.0          # each rank's heartbeat period (1 store write a second per rank)
SILENT_AFTER_S = 5.0  # a count unchanged this long = a lost rank; well under the agent's 30 s SIGTERM grace


class RanksLost(RuntimeError):
    """A collective failed because these ranks are gone (dead or hung)."""


def collective_timeout(seconds: float, backend: str | None = None):
    """Returns Accelerate's InitProcessGroupKwargs that bounds every collective (gloo and NCCL alike) by `seconds`
    (0: torch's default, 30 min for gloo, 10 min for NCCL) and names `backend` (None: Accelerate's choice), or None
    when there is nothing to pass."""
    from accelerate.utils import InitProcessGroupKwargs

    asked = {"timeout": timedelta(seconds=seconds), "backend": backend}
    asked = {key: value for key, value in asked.items() if value}  # timedelta(0) is falsy too
    if not asked:
        return None
    handler = InitProcessGroupKwargs(**asked)
    # Accelerate passes on only the values that differ from a default instance's (timeout 600 s): a --ddp-timeout
    # of 600 would be dropped and torch's gloo default (1800 s) used instead. Pass what was asked, always.
    handler.to_kwargs = lambda: dict(asked)
    return handler


def _key(rank: int) -> str:
    # the agent's store outlives a restart (--max_restarts): an earlier attempt's counts must not count
    return f"ldm-heartbeat:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}:{rank}"


def connect_store(timeout_s: float = 10.0):
    """Returns a client of the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT), or None where there is none."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(host_name=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=timeout_s))
    except (KeyError, ValueError, RuntimeError):  # no launcher variables, or its store is not there
        return None


class Heartbeat:
    """Context manager: a daemon thread that counts this rank's key up every BEAT_S, on a store connection of its
    own (the collectives' connections are never touched); it stops quietly when the store goes away."""

    def __init__(self, rank: int):
        self.rank, self.store, self._stop = rank, connect_store(), threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-rank{rank}", daemon=True)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self.store.set(_key(self.rank), str(count))
            except RuntimeError:  # node 0's launcher (the store) is gone
                return
            self._stop.wait(BEAT_S)

    def __enter__(self) -> "Heartbeat":
        if self.store is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def counts(store, world_size: int) -> dict[int, str]:
    """Returns each rank's heartbeat count in the store (ranks that never beat are left out)."""
    return {r: store.get(_key(r)).decode() for r in range(world_size) if store.check([_key(r)])}


def silent_ranks(store, world_size: int, wait_s: float = SILENT_AFTER_S) -> list[int] | None:
    """Returns the ranks whose heartbeat did not move in wait_s, or None when the store is unreachable (node 0's
    launcher, which holds it, died with its machine)."""
    try:
        before = counts(store, world_size)
        time.sleep(wait_s)
        after = counts(store, world_size)
    except RuntimeError:  # DistNetworkError / DistStoreError derive from RuntimeError
        return None
    return [r for r in range(world_size) if r not in after or before.get(r) == after[r]]


def lost_message(rank: int, world_size: int, missing: list[int] | None, wait_s: float, latest: str | None) -> str:
    """Returns what a surviving rank says when it stops: which ranks are gone and how to continue."""
    if missing is None:
        who = "the rendezvous store (held by node 0's launcher) is unreachable: node 0 is gone"
    else:
        who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {world_size} sent no "
               f"heartbeat for {wait_s:g} s: dead (killed, out of memory, its machine gone) or stopped")
    resume = (f"the last complete checkpoint is {latest}; relaunch with --resume latest" if latest
              else "no checkpoint was written yet; relaunch from the start")
    return f"rank {rank} stops: a collective failed and {who}; {resume}"


@contextmanager
def lost_ranks_named(accelerator, latest_checkpoint):
    """Runs the body with this rank's heartbeat; a RuntimeError in a run of several processes (a failed or timed-out
    collective) becomes a RanksLost naming the ranks that are gone, when some are; `latest_checkpoint()` returns
    the folder to continue from."""
    if accelerator.num_processes < 2:
        yield
        return
    rank, world_size = accelerator.process_index, accelerator.num_processes
    with Heartbeat(rank) as heartbeat:
        try:
            yield
        except RuntimeError as error:
            if heartbeat.store is None or isinstance(error, RanksLost):
                raise
            missing = silent_ranks(heartbeat.store, world_size)
            if missing == []:  # every rank still beats: the error is this rank's own
                raise
            raise RanksLost(lost_message(rank, world_size, missing, SILENT_AFTER_S, latest_checkpoint())) from error
