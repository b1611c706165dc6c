"""Event-driven idle waits for pynetdicom's two polling loops on an accepted association.

pynetdicom runs two threads per association, and both poll:

* the DUL reactor sleeps ``_run_loop_delay`` whenever it found nothing to do, then checks the socket and its
  outgoing queue again (1 ms by default; 0.1 ms is what a fast SCP needs, because a C-STORE response waits
  for the next poll before it is sent);
* the association reactor sleeps 1 ms between looks at its DIMSE message queue.

On two cores that polling is not free: one open association costs 15 % of a core at a 0.1 ms poll, and
every wake-up takes the interpreter lock from the inference thread. Here those idle sleeps become waits
that end the moment there is work: the DUL thread waits in ``select()`` on the peer's socket and on a
self-pipe written whenever a PDU is queued for sending; the association thread waits on an event set
whenever a DIMSE message or an ACSE primitive is queued for it, or a sending thread asks it to pause (its
checkpoint cleared: pynetdicom's send_* methods wait for that pause). Both waits are capped (``MAX_WAIT_S``), so
a timer, a kill flag or anything this module does not know of is still seen within that time.

Only the sleeps of those two threads, of exactly the two loop durations, are replaced (pynetdicom's other
sleeps, and every other thread's, go to :func:`time.sleep` unchanged). Anything unexpected in pynetdicom's
internals (another version) leaves its polling as it is: :func:`attach` returns False and nothing changes.
"""

from __future__ import annotations

import os
import select
import threading
import time
import types

MAX_WAIT_S = 0.01  # longest idle wait: timers and kill flags are seen at least this often
ASSOC_POLL_S = 0.001  # pynetdicom's association reactor sleep (association.py: time.sleep(0.001))

_installed = False
_install_lock = threading.Lock()


def _sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's dul and association modules: a hooked thread's loop sleep waits for
    work instead; everything else sleeps as asked."""
    wait = getattr(threading.current_thread(), "_medqc_idle_wait", None)
    if wait is not None:
        handled = wait(seconds)
        if handled:
            return
    time.sleep(seconds)


def _install() -> bool:
    """Point pynetdicom's dul and association modules at a ``time`` whose ``sleep`` is :func:`_sleep`."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        try:
            from pynetdicom import association as _assoc_mod
            from pynetdicom import dul as _dul_mod
        except ImportError:
            return False
        for mod in (_dul_mod, _assoc_mod):
            if getattr(mod, "time", None) is not time:
                return False  # not the module layout this was written for: keep pynetdicom's own polling
        shim = types.ModuleType("time")
        shim.__dict__.update(time.__dict__)
        shim.sleep = _sleep
        _dul_mod.time = shim
        _assoc_mod.time = shim
        _installed = True
        return True


def _wrap_put(q, after) -> None:
    put = q.put

    def put_and_wake(item, *args, **kwargs):
        put(item, *args, **kwargs)
        after()

    q.put = put_and_wake


def attach(assoc, dul_delay: float) -> bool:
    """Replace the idle polling of this acceptor association's DUL and reactor threads (call before they
    start: from an ``EVT_CONN_OPEN`` handler). ``dul_delay`` becomes the DUL's poll (its sleeps of that length are the ones replaced;
    it is also what pynetdicom polls at after the connection closes). False when pynetdicom's internals are
    not as expected; then nothing is changed."""
    try:
        dul = assoc.dul
        dimse = assoc.dimse
        out_q, user_q, msg_q = dul.to_provider_queue, dul.to_user_queue, dimse.msg_queue
        checkpoint = assoc._reactor_checkpoint  # noqa: SLF001
        sock = dul.socket.socket if dul.socket is not None else None
    except AttributeError:
        return False
    if sock is None or not all(hasattr(q, "put") and hasattr(q, "qsize") for q in (out_q, user_q, msg_q)):
        return False
    if not callable(getattr(checkpoint, "clear", None)):
        return False
    if not _install():
        return False
    dul._run_loop_delay = dul_delay  # noqa: SLF001 - pynetdicom's documented tuning attribute

    # DUL thread: select() on the socket and a self-pipe written when a PDU is queued for sending
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    closed = threading.Event()

    def wake_dul() -> None:
        if not closed.is_set():
            try:
                os.write(wfd, b"\0")
            except OSError:  # pipe full (already awake) or closed
                pass

    def dul_wait(seconds: float) -> bool:
        if seconds != dul_delay or closed.is_set():
            return False
        if out_q.qsize() or getattr(dul, "_kill_thread", False):
            return True
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted are invisible to select()
        if pending is not None and pending():
            return True
        try:
            ready, _, _ = select.select([sock, rfd], [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # socket closed under us: pynetdicom's own check reports it
            return False
        if rfd in ready:
            try:
                while os.read(rfd, 4096):
                    pass
            except OSError:
                pass
        return True

    # association thread: an event set when a DIMSE message or an ACSE primitive is queued for it
    work = threading.Event()

    def assoc_wait(seconds: float) -> bool:
        if seconds != ASSOC_POLL_S:
            return False
        work.clear()
        if (msg_q.qsize() or user_q.qsize() or not checkpoint.is_set() or getattr(assoc, "_kill", False)
                or not dul.is_alive()):
            return True
        work.wait(MAX_WAIT_S)
        return True

    _wrap_put(out_q, wake_dul)
    _wrap_put(user_q, work.set)
    _wrap_put(msg_q, work.set)
    # a thread that sends on this association (send_c_store, release, abort) first clears the reactor's
    # checkpoint and waits until the reactor has paused: wake it so that it pauses at once
    clear = checkpoint.clear

    def clear_and_wake() -> None:
        clear()
        work.set()

    checkpoint.clear = clear_and_wake
    dul._medqc_idle_wait = dul_wait  # noqa: SLF001 - the thread object carries its own wait
    assoc._medqc_idle_wait = assoc_wait  # noqa: SLF001

    def close(_event=None) -> None:
        if closed.is_set():
            return
        closed.set()
        for fd in (rfd, wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    assoc._medqc_idle_close = close  # noqa: SLF001 - called when the connection closes
    return True


def detach(assoc) -> None:
    """Release the self-pipe of an association (from an ``EVT_CONN_CLOSE`` handler)."""
    close = getattr(assoc, "_medqc_idle_close", None)
    if close is not None:
        close()
