"""Preemption: SIGTERM or SIGINT ends a training stage at a step boundary, with a checkpoint.

What a cluster does to a job it preempts (a Kubernetes pod evicted, a spot VM reclaimed, a SLURM
job requeued) is SIGTERM, a grace period, then SIGKILL. Inside `PreemptionGuard` the first
SIGTERM or SIGINT only sets a flag: the loop finishes the step it is on, asks `stop_requested()`,
writes a checkpoint of that step and raises `Preempted`; train.py and sweep.py then exit with
`PREEMPTED_EXIT_CODE` and a re-run resumes from that checkpoint. A second signal while the first
is pending is not deferred: it gets the handler that was there before (SIGINT: KeyboardInterrupt;
SIGTERM: the default, the process ends at once).

Exit status 75 is EX_TEMPFAIL of sysexits.h ("temporary failure, retry"): distinct from 0 (done),
1 (an error) and 143 / -15 (killed by SIGTERM before a checkpoint could be written), so a job
controller can tell "preempted, checkpointed, restart me" from the others (e.g. a Kubernetes Job
`podFailurePolicy` rule `onExitCodes: {operator: In, values: [75]}`).

Multi-host: every process must stop at the same step (they take part in the same collectives,
and every process writes its shards of the checkpoint). `stop_requested()` is therefore a
collective in runs of several processes: each process contributes its own flag and all get their
logical OR, at the same step, so a signal that reached only one process stops all of them after
that step. It is one all-gather of an int32 per process per step (over gloo on CPUs), which also
makes the host wait for the step to finish before dispatching the next one. JAX's own
`multihost_utils.reached_preemption_sync_point` would avoid the per-step collective, but it sees
only the SIGTERM that the coordination service catches (not SIGINT, not a signal Python handles)
and does not exist without `jax.distributed`.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: preempted after writing a checkpoint; re-run to resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """A training stage stopped on SIGTERM / SIGINT after writing the checkpoint of `step`."""

  def __init__(self, stage: str, step: int, directory: str, signal_name: str):
    self.stage, self.step, self.directory, self.signal_name = stage, int(step), directory, signal_name
    super().__init__(f"{stage} preempted by {signal_name} after step {step}: checkpoint {step} written in "
                     f"{directory}; re-run the same command to resume (exit status {PREEMPTED_EXIT_CODE})")


# One set of handlers per process, shared by nested guards (the VAE stage runs inside train()).
_lock = threading.Lock()
_depth = 0
_previous: dict[int, object] = {}
_received: list[int] = []  # signal numbers received while a guard is active


def _handler(signum, frame):
  if _received:  # a second signal: no more deferring, act as before the guard
    previous = _previous.get(signum, signal.SIG_DFL)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    else:
      signal.raise_signal(signum)
    return
  _received.append(signum)
  log.warning("%s received: stopping after the current step with a checkpoint (send it again to stop at once)",
              signal.Signals(signum).name)


class PreemptionGuard:
  """Defers SIGTERM / SIGINT to the next step boundary while the `with` block runs.

  Usage (every process of a run, the same calls at the same steps):

    with PreemptionGuard() as guard:
      for step in ...:
        state = train_step(state, ...)
        if guard.stop_requested():
          save(step + 1, state)
          raise guard.preempted("training", step + 1, checkpoint_dir)

  Handlers can only be installed from the main thread; elsewhere the guard does nothing (signals
  keep their usual effect).
  """

  def __enter__(self) -> "PreemptionGuard":
    global _depth
    with _lock:
      if _depth == 0 and threading.current_thread() is threading.main_thread():
        _received.clear()
        for s in SIGNALS:
          _previous[s] = signal.signal(s, _handler)
      _depth += 1
    return self

  def __exit__(self, *exc) -> None:
    global _depth
    with _lock:
      _depth -= 1
      if _depth == 0 and _previous:
        for s, previous in _previous.items():
          signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        _previous.clear()
        _received.clear()

  @property
  def signal_name(self) -> str | None:
    """The signal this process received ("SIGTERM"), or None."""
    return signal.Signals(_received[0]).name if _received else None

  def stop_requested(self) -> bool:
    """True when any process of the run received SIGTERM / SIGINT (a collective with several processes)."""
    local = bool(_received)
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))  # [processes]
    return bool(np.any(flags))

  def preempted(self, stage: str, step: int, directory: str) -> Preempted:
    """The `Preempted` to raise (and log) once the checkpoint of `step` is written."""
    return Preempted(stage, step, directory, self.signal_name or "a signal to another process")
