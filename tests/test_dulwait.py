"""agent/dulwait.py: pynetdicom's idle polling replaced by waits that end when there is work.

Real associations on loopback (DCMTK storescu and a pynetdicom SCU) into the agent's receiver: the waits
are attached to both threads of every accepted association, every slice is stored and answered, a slow
peer (pauses longer than the wait cap between requests) and an association released mid-wait work; and
the module falls back to pynetdicom's own polling when its internals are not the expected ones."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pydicom
import pytest
from conftest import missing_peer

from medqc.agent import dulwait
from medqc.agent.receiver import Receiver
from medqc.agent.spool import Spool
from medqc.config import load_config
from medqc.dcmtk import dcmtk


def _receiver(tmp_path, seen):
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    rx = Receiver(load_config(None), spool, lambda p, t: seen.append(p), port=0, bind="127.0.0.1")
    attached = []

    def check(event):  # runs after the receiver's own EVT_CONN_OPEN handler
        attached.append(callable(getattr(event.assoc, "_medqc_idle_wait", None))
                        and callable(getattr(event.assoc.dul, "_medqc_idle_wait", None)))

    from pynetdicom import evt

    rx.extra_handlers.append((evt.EVT_CONN_OPEN, check))
    return rx.start(), attached


def test_storescu_series_with_event_driven_waits(tmp_path, real_ct):
    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("DCMTK storescu is not installed (.ci/run installs it)")
    seen: list = []
    rx, attached = _receiver(tmp_path, seen)
    files = sorted(p for p in (real_ct / "S3010").iterdir() if p.is_file())[:20]
    try:
        r = subprocess.run([storescu, "--max-pdu", "131072", "-aec", "MEDQC", "127.0.0.1", str(rx.port), *map(str, files)],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))
        assert r.returncode == 0, r.stderr
    finally:
        rx.stop()
    assert attached == [True]
    assert len(seen) == len(files)


def test_slow_peer_and_release_while_waiting(tmp_path, real_ct):
    from pynetdicom import AE

    seen: list = []
    rx, attached = _receiver(tmp_path, seen)
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", rx.port)
        assert assoc.is_established
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ds = pydicom.dcmread(real_ct / "S3010" / "I10")
        for k in range(3):  # pauses far longer than the wait cap: both threads idle in their waits
            time.sleep(5 * dulwait.MAX_WAIT_S)
            assert assoc.send_c_echo().Status == 0x0000
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID.rsplit('.', 1)[0]}.{900 + k}"
            assert assoc.send_c_store(ds).Status == 0x0000
        time.sleep(5 * dulwait.MAX_WAIT_S)
        assoc.release()  # an A-RELEASE reaching an idle association
        assert assoc.is_released
        # a second association after the first closed (its self-pipe released)
        assoc = ae.associate("127.0.0.1", rx.port)
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.abort()
    finally:
        rx.stop()
    assert attached == [True, True]
    assert len(seen) == 3


def test_falls_back_when_internals_differ():
    # no DIMSE provider / no socket: pynetdicom's own polling stays
    assert dulwait.attach(SimpleNamespace(dul=SimpleNamespace(), dimse=None), 1e-4) is False
    dul = SimpleNamespace(to_provider_queue=None, to_user_queue=None, socket=None)
    assert dulwait.attach(SimpleNamespace(dul=dul, dimse=SimpleNamespace(msg_queue=None)), 1e-4) is False


def test_other_sleeps_pass_through():
    # a thread without the hook sleeps as asked, even through the shim
    dulwait._install()
    from pynetdicom import dul as dul_mod

    assert dul_mod.time.sleep is dulwait._sleep
    t0 = time.perf_counter()
    dul_mod.time.sleep(0.05)
    assert time.perf_counter() - t0 >= 0.045
    out = []
    th = threading.Thread(target=lambda: out.append(dul_mod.time.monotonic()))
    th.start()
    th.join()
    assert out and out[0] > 0  # the rest of the time module is untouched

