"""agent/pipeline.py in-process with the tiny real ONNX model: count completion latency, sink isolation,
a bad slice inside a batch, drop-folder ingest."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest

from medqc.agent.metrics import NULL, Metrics
from medqc.agent.pipeline import Pipeline, build_analysis
from medqc.agent.sinks.base import Sink
from medqc.agent.ingest.spool import Spool
from medqc.config import load_config


class Recorder(Sink):
    name = "recorder"

    def __init__(self):
        self.slices, self.findings, self.series = [], [], []
        self.done = threading.Event()

    def on_slice(self, event):
        self.slices.append(event.result)

    def on_finding(self, finding):
        self.findings.append(finding)

    def on_series(self, series):
        self.series.append((time.time(), series.uid, series.verdict, len(series.results), series.completed_reason))
        self.done.set()


class Broken(Sink):
    name = "broken"

    def on_finding(self, finding):
        raise RuntimeError("webhook endpoint down")


class Slow(Sink):
    name = "slow"

    def on_slice(self, event):
        time.sleep(0.5)


def _series_files(real_ct: Path, tmp: Path, n: int, expected: int | None = None) -> list[Path]:
    src = sorted((real_ct / "S3010").glob("I*"), key=lambda p: int(p.name[1:]))[:n]
    out = []
    tmp.mkdir(parents=True, exist_ok=True)
    for p in src:
        ds = pydicom.dcmread(p)
        if expected is not None:
            ds.ImagesInAcquisition = expected
            # this Philips series is a step-and-shoot ("AXIAL") scan, whose count is per table position and not
            # used; written as one helical acquisition, the count completes the series
            ds.ScanOptions = "HELIX"
        q = tmp / p.name
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


def compose(cfg, bundle, backend, metrics=NULL, sinks=(), spool=None) -> Pipeline:
    """The agent's pipeline with these sinks (the composition root gives the agent its own)."""
    return Pipeline(cfg, *build_analysis(cfg, bundle, backend, metrics=metrics), spool=spool, sinks=list(sinks),
                    metrics=metrics)


def _cfg(tmp: Path, idle: float = 30.0):
    p = tmp / "c.toml"
    p.write_text(f"[series]\nidle_timeout_s = {idle}\n[inference]\nmax_wait_ms = 5\n")
    return load_config(p)


def test_count_completion_fast_and_sinks_isolated(tmp_path, real_ct, tiny_bundle):
    files = _series_files(real_ct, tmp_path / "in", 12, expected=12)
    rec, metrics = Recorder(), Metrics()
    pipe = compose(_cfg(tmp_path), str(tiny_bundle), "onnxruntime", metrics=metrics, sinks=[Broken(), Slow(), rec]).start()
    try:
        for f in files:
            pipe.submit(f)
        last = time.time()
        assert rec.done.wait(10), "no verdict"
    finally:
        pipe.stop(2.0)
    t, uid, verdict, n, reason = rec.series[0]
    assert reason == "count" and n == 12 and verdict in ("pass", "warn", "fail")
    # the slow sink (0.5 s per slice) and the broken one never delayed the verdict
    assert t - last < 1.0, f"verdict {t - last:.2f} s after the last slice"
    assert metrics.get("medqc_sink_errors_total", sink="broken") >= 1
    assert metrics.get("medqc_slices_analysed_total") == 12
    assert len(rec.slices) == 12 and all(r.scores and r.position_ref_mm is not None for r in rec.slices)


def test_bad_slice_does_not_fail_its_batch(tmp_path, real_ct, tiny_bundle):
    from medqc.agent.decode import decode_file

    files = _series_files(real_ct, tmp_path / "in", 6)
    pipe = compose(_cfg(tmp_path), str(tiny_bundle), "onnxruntime")
    items = [(d.info, d.hu) for f in files for d in decode_file(f)]
    items[2][0].pixel_spacing = (0.0, 0.0)  # impossible geometry reaching inference
    items[4] = (items[4][0], items[4][1][:, :1])  # a sliver of an image: still analysable (padded as outside the FOV)
    results = pipe.inferer.run(items)
    assert [bool(r.error) for r in results] == [False, False, True, False, False, False]
    assert all(r.scores for r in results if not r.error)
    assert results[2].info.sop_instance_uid == items[2][0].sop_instance_uid and "pixel spacing" in results[2].error


def test_a_large_multiframe_object_is_analysed_frame_by_frame(tmp_path, tiny_bundle):
    """An Enhanced CT object of 40 frames (past LAZY_FRAMES: each frame converted to HU only when its chunk
    is analysed) goes through the pipeline: every frame analysed once, in batches, none lost."""
    from test_decode import enhanced_ct

    from medqc.agent.decode import LAZY_FRAMES

    n = 40
    assert n > LAZY_FRAMES
    ds, _ = enhanced_ct(n, 64)
    f = tmp_path / "enhanced.dcm"
    ds.save_as(f, enforce_file_format=True)
    rec, metrics = Recorder(), Metrics()
    pipe = compose(_cfg(tmp_path, idle=0.5), str(tiny_bundle), "onnxruntime", metrics=metrics, sinks=[rec]).start()
    try:
        pipe.submit(f)
        assert rec.done.wait(15), "no verdict"
    finally:
        pipe.stop(2.0)
    assert metrics.get("medqc_slices_analysed_total") == n
    assert sorted(r.info.frame for r in rec.slices) == list(range(n))
    assert all(not r.error and r.scores for r in rec.slices)


def test_drop_folder_ingest(tmp_path, real_ct, tiny_bundle):
    from medqc.agent.ingest.watch import DropFolder

    files = _series_files(real_ct, tmp_path / "src", 5, expected=5)
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(files[0], drop / "already-there.dcm")  # present before start
    (drop / "notes.txt").write_text("not dicom")
    rec = Recorder()
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    pipe = compose(_cfg(tmp_path), str(tiny_bundle), "onnxruntime", sinks=[rec], spool=spool).start()
    watch = DropFolder([drop], spool, pipe.submit).start()
    try:
        for f in files[1:]:
            shutil.copy(f, drop / (f.name + ".part"))  # writer's temp name, renamed into place
            (drop / (f.name + ".part")).rename(drop / f.name)
        assert rec.done.wait(15), "no verdict from the drop folder"
    finally:
        watch.stop()
        pipe.stop(2.0)
    assert rec.series[0][3] == 5 and rec.series[0][4] == "count"
    assert not any(drop.iterdir())  # taken into the spool
    assert any("not a DICOM file" in r["reason"] for r in pipe.rejected)
    assert spool.pending() == []  # released after the verdict


def test_network_artifact_scores_only_within_the_trained_slice_thickness(tiny_bundle):
    """Slices thicker than the bundle's domain (partial volume over more z than the network ever saw; the
    shipped network read it as motion) keep classical evidence and position but lose the network's
    artifact scores."""
    import numpy as np

    from medqc import ARTIFACTS
    from medqc.agent.infer import Inferer
    from medqc.agent.records import SliceInfo
    from medqc.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    assert bundle.max_slice_thickness_mm == 10.0  # the default for bundles without a "domain"
    inf = Inferer(bundle, "onnxruntime")
    yy, xx = (np.mgrid[0:256, 0:256] - 127.5) * 1.4
    hu = np.where(np.hypot(xx, yy) < 120, 40.0, -1000.0).astype(np.float32)

    def info(t):
        return SliceInfo("1.2.3", "1.2", "1", "1.2.840.10008.5.1.4.1.1.2", rows=256, cols=256, pixel_spacing=(1.4, 1.4),
                         slice_thickness=t)

    thin, thick = inf.run([(info(5.0), hu), (info(20.0), hu)])
    assert set(thin.scores) == set(ARTIFACTS)  # network for every class (none switched off in this bundle)
    off = [k for k in ARTIFACTS if k not in ("metal", "truncation", "noise", "ring")]  # no classical evidence
    assert off and all(k not in thick.scores for k in off)
    assert thick.position_ref_mm is not None and thick.position_ref_mm == pytest.approx(thin.position_ref_mm)
    inf.close()


def test_inference_batches_by_geometry_and_keeps_per_slice_errors(tiny_bundle):
    """Slices of different matrices, spacings and orientations in one run: one runner call per geometry,
    each slice's result what it gets alone, in input order; a slice whose geometry is invalid gets its own
    error; a runner failing on a batch is retried slice by slice."""
    import numpy as np

    from medqc.agent.infer import Inferer
    from medqc.agent.records import SliceInfo
    from medqc.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    inf = Inferer(bundle, "onnxruntime", classical=False)

    def item(k, n, px, iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), radius=100.0):
        yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2.0) * px
        hu = np.where(np.hypot(xx - 20.0, yy) < radius + 3 * k, 40.0, -1000.0).astype(np.float32)
        return (SliceInfo(f"2.25.{k}", "1.2", "1", "1.2.840.10008.5.1.4.1.1.2", rows=n, cols=n, pixel_spacing=(px, px),
                          orientation=iop, slice_thickness=2.0), hu)

    items = [item(0, 512, 0.8), item(1, 256, 1.4), item(2, 512, 0.8), item(3, 512, 0.8, (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
             item(4, 256, 1.4), item(5, 512, 0.0)]
    calls = []
    real_infer = inf.runner.infer
    inf.runner.infer = lambda feeds: calls.append(feeds["hu"].shape) or real_infer(feeds)
    res = inf.run(items)
    assert [r.info.sop_instance_uid for r in res] == [f"2.25.{k}" for k in range(6)]
    assert sorted(calls) == sorted([(2, 512, 512), (2, 256, 256), (1, 512, 512)])  # three geometries, three calls
    assert res[5].error and "spacing" in res[5].error and not any(r.error for r in res[:5])
    alone = [inf.run([it])[0] for it in items[:5]]
    for a, b in zip(res[:5], alone):
        assert a.scores == pytest.approx(b.scores, abs=1e-6) and a.position_ref_mm == pytest.approx(b.position_ref_mm, abs=1e-3)
    assert res[0].scores != pytest.approx(res[3].scores, abs=1e-6)  # the mirrored slice is mirrored back: other pixels

    def batch_fails(feeds):  # the real runner, failing whenever it gets more than one slice
        if feeds["hu"].shape[0] > 1:
            raise RuntimeError("out of memory")
        return real_infer(feeds)

    inf.runner.infer = batch_fails
    retried = inf.run(items[:5])
    for a, b in zip(retried, alone):
        assert not a.error and a.scores == pytest.approx(b.scores, abs=1e-6)
    inf.close()


def test_warm_up_runs_the_whole_path_before_any_slice(tiny_bundle):
    """The agent runs two synthetic slices through preprocessing, the runner, the detectors and fusion before
    it accepts any: the first patient's first slices then pay no first-call setup. It leaves no trace (no
    series, no results) and never raises, with or without a network."""
    from medqc.agent.infer import Inferer
    from medqc.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    seen = []
    inf = Inferer(bundle, "onnxruntime")
    real_run = inf.run
    inf.run = lambda items: seen.append(len(items)) or real_run(items)
    took = inf.warm_up()
    assert seen == [1, 2] and 0.0 < took < 30.0
    inf.close()
    classical_only = Inferer(bundle, "none")
    assert classical_only.runner is None and classical_only.warm_up() >= 0.0
    classical_only.close()


def test_the_agent_warms_up_before_it_is_ready(tmp_path, tiny_bundle, caplog, port):
    import logging

    from medqc.agent.compose import compose as compose_agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": port, "http.enabled": False,
                             "sinks.stdout.enabled": False})
    with caplog.at_level(logging.INFO, logger="medqc.agent"):
        a = compose_agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    try:
        assert any("warmed up" in r.getMessage() for r in caplog.records)
        assert a.store is not None and not a.tracker.all()  # the warm-up slices left no series behind
    finally:
        a.stop(2.0)
