"""agent/ingest/spool.py and agent/batch.py: durable writes, resume order, watermark refusal, retention."""

from __future__ import annotations

import queue
import time

import pytest

from medqc.agent.batch import MicroBatcher
from medqc.agent.ingest.spool import Spool, SpoolFull


def test_put_pending_release(tmp_path):
    sp = Spool(tmp_path / "s", min_free_mb=0)
    (sp.tmp / "crash.part").write_bytes(b"partial")  # a write interrupted by a crash
    (sp.tmp / "1.2.9.abc.100.part").write_bytes(b"x" * 60)  # shorter than its announced length: never acknowledged
    (sp.tmp / "1.2.8.abd.5.part").write_bytes(b"fsync")  # complete, but its rename was lost (power cut)
    a = sp.put(b"one", "1.2.3")
    time.sleep(0.01)
    b = sp.put(b"two", "1.2/../4")  # hostile name stays inside incoming/
    assert a.parent == sp.incoming and b.parent == sp.incoming and a.read_bytes() == b"one"
    sp2 = Spool(tmp_path / "s", min_free_mb=0)  # restart: resumes in arrival order, partials dropped
    rec = sp2.incoming / "1.2.8.abd.dcm"
    assert rec.read_bytes() == b"fsync" and not list(sp2.tmp.iterdir())
    assert [p for p in sp2.pending() if p != rec] == [a, b]
    sp2.release(a)
    sp2.release(rec)
    sp2.release(b, keep=True)
    assert sp2.pending() == [] and (sp2.kept / b.name).read_bytes() == b"two"
    keep = Spool(tmp_path / "k", min_free_mb=0, retention="keep")
    c = keep.put(b"x", "9")
    keep.release(c)
    assert (keep.kept / c.name).exists()
    with pytest.raises(ValueError, match="delete, keep"):
        Spool(tmp_path / "bad", retention="forever")


def test_low_watermark_refuses(tmp_path):
    sp = Spool(tmp_path / "s", min_free_mb=10**9)  # more than any disk has
    with pytest.raises(SpoolFull, match=r"spool disk below reserve: \d+ MB free < 1000000000 MB"):
        sp.put(b"data", "1")
    assert sp.pending() == []
    assert sp.refusal().startswith("spool disk below reserve: ") and sp.refusal().endswith(" < 1000000000 MB")
    assert Spool(tmp_path / "ok", min_free_mb=0).refusal() == ""  # this disk has more than 1 MB free


def test_micro_batcher_fills_and_times_out():
    q = queue.Queue()
    mb = MicroBatcher(q, max_batch=4, max_wait_ms=30)
    for i in range(10):
        q.put(i)
    assert mb.next(0.1) == [0, 1, 2, 3] and mb.next(0.1) == [4, 5, 6, 7]
    t0 = time.monotonic()
    assert mb.next(0.1) == [8, 9]
    assert 0.025 <= time.monotonic() - t0 < 0.2  # a partial batch waits max_wait for stragglers
    q.put(10)
    t0 = time.monotonic()
    assert mb.next(0.1) == [10] and time.monotonic() - t0 < 0.02  # a lone slice goes at once
    t0 = time.monotonic()
    assert mb.next(0.05) == [] and time.monotonic() - t0 >= 0.04
