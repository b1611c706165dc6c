"""Named fault points: a test facility that kills the agent with SIGKILL at a chosen step, so that tests can
prove a restart on the same state directory loses nothing and duplicates nothing.

``MEDQC_FAULT_POINT=<name>`` (or ``<name>:<n>``: the n-th time the point is reached, default the first) is
read once, when this module is imported. Where it is unset (always, in production) :func:`reached` is one
comparison and returns. The points, in the order an instance meets them:

- ``spool-written``: the receiver wrote the instance to the spool (fsync, rename) and has not answered the
  C-STORE yet;
- ``acked``: the receiver is handling the next C-STORE of the association, so the sender has the previous
  instance's Success response; the previous instance is spooled and, this early, not analysed yet;
- ``analysis``: a batch has been through inference; its results are not added to the series yet;
- ``store-commit``: the SQLite store is inside the transaction that writes a series' verdict, before COMMIT;
- ``sr-send``: the DICOM SR sink has its association with the destination, before the C-STORE of the report.

The kill takes the whole agent: reached in the receiver's own process, it kills the agent process first,
then itself.

One point kills an analysis worker process only (``analysis.workers`` ≥ 1), not the agent:
``worker-crash:<SOP Instance UID>`` — a worker that has analysed that instance kills itself (SIGKILL) before
it answers, every time: a poison slice, which the agent reports as ``input.undecodable`` and survives.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

POINTS = ("spool-written", "acked", "analysis", "store-commit", "sr-send")
WORKER_CRASH = "worker-crash"


def _parse(value: str) -> tuple[str, int | str]:
    name, _, n = value.strip().partition(":")
    if name == WORKER_CRASH:
        if not n:
            raise ValueError(f"MEDQC_FAULT_POINT={value!r}: {WORKER_CRASH} needs the SOP Instance UID it crashes on "
                             f"({WORKER_CRASH}:<uid>)")
        return name, n
    if name and name not in POINTS:
        raise ValueError(f"MEDQC_FAULT_POINT={value!r}: unknown point; the points are {', '.join((*POINTS, WORKER_CRASH))}")
    return name, int(n) if n else 1


ARMED, AT = _parse(os.environ.get("MEDQC_FAULT_POINT", ""))
_count = 0
_lock = threading.Lock()


def reached(name: str) -> None:
    """Kill the agent (SIGKILL) if ``name`` is the armed point and this is its n-th arrival."""
    global _count
    if name != ARMED:
        return
    with _lock:
        _count += 1
        if _count != AT:
            return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:  # the receiver process: the agent goes first
        os.kill(parent.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def worker_crash_selector() -> str:
    """The SOP Instance UID an analysis worker crashes on (``worker-crash:<uid>``), or ''."""
    return str(AT) if ARMED == WORKER_CRASH else ""


def crash_worker() -> None:
    """Kill this analysis worker process (only it: the agent detects the death and carries on)."""
    os.kill(os.getpid(), signal.SIGKILL)
