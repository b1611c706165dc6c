"""agent/compose.py: one root builds the agent from the config; the parts share what they share, and
``medqc analyze`` gets the analysis alone."""

from __future__ import annotations

from conftest import free_port

from medqc.config import load_config


def test_offline_root_is_the_analysis_alone(tiny_bundle):
    from medqc.agent.compose import compose
    from medqc.agent.metrics import NullMetrics

    a = compose(load_config(), bundle=str(tiny_bundle), backend="onnxruntime", offline=True)
    try:
        assert (a.spool, a.store, a.receiver, a.watch, a.http, a.refusals) == (None,) * 6
        assert isinstance(a.metrics, NullMetrics) and a.pipeline.sinks == [] and a.tracker.streaming is False
        plot = compose(load_config(), bundle=str(tiny_bundle), backend="none", offline=True, plot=True)
        assert [s.sink for s in plot.pipeline.sinks] == [plot.thumbnails]
        assert plot.thumbnails.min_score == 0 and plot.thumbnails.blocking
        plot.pipeline.stop(0.0)
    finally:
        a.pipeline.stop(0.0)


def test_agent_root_wires_each_part_once(tiny_bundle, tmp_path):
    from medqc.agent.compose import compose
    from medqc.agent.sinks.store import Store
    from medqc.agent.web.http import Broadcaster

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "sinks.stdout.enabled": False})
    a = compose(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime")
    sinks = [s.sink for s in a.pipeline.sinks]
    assert isinstance(sinks[0], Store) and sinks[0] is a.store  # the store first
    assert [type(s) for s in sinks].count(Broadcaster) == 1 and a.http.broadcaster in sinks
    assert a.thumbnails in sinks and a.thumbnails.spool_waits  # it reads the spool files it renders
    assert a.http.api.tracker is a.tracker is a.pipeline.tracker and a.http.api.store is a.store
    assert a.http.httpd is None and not a.lifecycle.ready.is_set()  # nothing listens before start
    a.start()
    try:
        assert a.lifecycle.ready.is_set() and a.http.port and a.receiver.port
        assert [s.sink for s in a.pipeline.sinks] == sinks  # starting added no sink
    finally:
        a.stop(2.0)
    quiet = compose(load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.enabled": False,
                                       "sinks.stdout.enabled": False}), tmp_path / "state2", str(tiny_bundle), "onnxruntime")
    assert quiet.http is None and quiet.thumbnails is None
    assert [type(s.sink).__name__ for s in quiet.pipeline.sinks] == ["Store", "BaselineSink"]
    quiet.pipeline.stop(0.0)
