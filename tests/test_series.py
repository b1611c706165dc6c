"""SeriesTracker: streaming findings, de-duplication, completion (count / MPPS / idle), verdicts, report."""

from __future__ import annotations

import json
import time

import pytest

from medqc.agent.records import SliceInfo, SliceResult
from medqc.agent.report import build_report, series_report
from medqc.agent.series import SeriesTracker
from medqc.config import load_config

CT = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_info(i: int, z: float, series="1.2.3.9", **kw) -> SliceInfo:
    base = dict(instance_number=i + 1, position=(-180.0, -180.0, z), orientation=AXIAL, pixel_spacing=(0.7, 0.7),
                rows=512, cols=512, patient_position="HFS", modality="CT", ctdivol=8.0, slice_thickness=2.5)
    base.update(kw)
    return SliceInfo(f"{series}.{i + 1}", series, "1.2.3", CT, **base)


def make_results(n=40, spacing=2.5, z0=0.0, scores=None, series="1.2.3.9", **kw) -> list[SliceResult]:
    """n slices arriving head to feet (z decreasing), all scores 0.01 unless ``scores`` {index: {cls: p}}."""
    out = []
    for i in range(n):
        sc = {c: 0.01 for c in ("metal", "motion", "ring", "noise", "truncation")}
        sc.update((scores or {}).get(i, {}))
        out.append(SliceResult(info=make_info(i, z0 - i * spacing, series=series, **kw), scores=sc))
    return out


@pytest.fixture
def cfg():
    return load_config()


def checks(findings):
    return sorted(f.check for f in findings)


def test_metal_run_raised_as_soon_as_min_run_reached_and_updated_not_duplicated(cfg):
    tr = SeriesTracker(cfg, {"metal": 0.5})
    res = make_results(30, scores={i: {"metal": 0.8} for i in range(10, 16)})
    raised_at = None
    seen_ids = []
    for i, r in enumerate(res):
        new = tr.add(r)
        for f in new:
            if f.check == "artifact.metal":
                seen_ids.append(f.finding_id)
                raised_at = raised_at if raised_at is not None else i
    assert raised_at == 11  # the second consecutive slice over threshold (min_run = 2)
    assert len(set(seen_ids)) == 1 and len(seen_ids) == 5  # same finding, updated as the run grew (12..15)
    st, _ = tr.complete("1.2.3.9", "idle")
    f = st.findings["1.2.3.9/artifact.metal"]
    assert (f.first_instance, f.last_instance) == (11, 16)
    assert f.z_range_mm == (-37.5, -25.0)
    assert f.severity == "critical"  # 6 slices, mean 0.8 ≥ (0.5 + 1) / 2
    assert st.verdict == "fail"
    assert sum(1 for x in st.findings.values() if x.check == "artifact.metal") == 1


def test_finding_events_have_kinds(cfg):
    """The tracker reports every change of a finding with its kind: the metal run is raised once (warning),
    escalated once when it becomes critical, 'updated' as it grows otherwise, and 'final' at the verdict; a
    finding judged only on the complete series (a gap) is first reported as 'final'. ``first_report``
    (what medqc_findings_total counts) is true once per finding."""
    from medqc.agent.series import first_report

    tr = SeriesTracker(cfg, {"metal": 0.5})
    res = make_results(30, scores={i: {"metal": 0.8} for i in range(10, 16)})
    del res[24]  # a missing slice: geometry.gap, judged on the complete series only
    metal = [(f.kind, f.severity) for r in res for f in tr.add(r) if f.check == "artifact.metal"]
    assert [k for k in metal if k[0] != "updated"] == [("raised", "warning"), ("escalated", "critical")], metal
    assert len(metal) == 5  # three more changes as the run grew, reported as updates (state, not news)
    st, changed = tr.complete("1.2.3.9", "idle")
    kinds = {f.check: f.kind for f in changed}
    assert kinds["artifact.metal"] == "final" and kinds["geometry.gap"] == "final", kinds
    f = st.findings["1.2.3.9/artifact.metal"]
    assert f.kind == "final" and f.severity == "critical" and "first_raised_at" in f.details
    assert [f.check for f in changed if first_report(f)] == ["geometry.gap"]  # metal was counted when raised
    # a slice arriving after the verdict re-opens the series; the metal run it joins is news again only if
    # its severity rises above the final one
    late = make_results(31, scores={30: {"metal": 0.8}})[30]
    assert [f.kind for f in tr.add(late) if f.check == "artifact.metal"] in ([], ["updated"])


def test_lone_slice_needs_a_very_high_score(cfg):
    tr = SeriesTracker(cfg, {})
    for r in make_results(20, scores={5: {"ring": 0.7}, 12: {"motion": 0.95}}):
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert "1.2.3.9/artifact.ring" not in st.findings
    m = st.findings["1.2.3.9/artifact.motion"]
    assert m.severity == "warning" and m.first_instance == m.last_instance == 13
    assert st.verdict == "warn"


def test_network_only_classes_need_a_strong_or_long_run(cfg):
    # motion and ring have no classical evidence: min_run slices just over the threshold are not enough
    # (one confusing region puts neighbouring slices over it together); the run's mean must reach
    # (threshold + 1) / 2, or the run must span 25 mm of z (physical motion spoils at least one rotation's
    # table feed). Metal (classically gated) keeps the plain min_run rule.
    tr = SeriesTracker(cfg, {"metal": 0.5, "motion": 0.5, "ring": 0.5})
    weak = {i: {"motion": 0.65, "ring": 0.65, "metal": 0.65} for i in range(3, 6)}
    streamed = []
    for r in make_results(20, scores=weak):
        streamed += tr.add(r)
    assert checks(streamed) == ["artifact.metal"] * len(streamed)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert "1.2.3.9/artifact.motion" not in st.findings and "1.2.3.9/artifact.ring" not in st.findings
    assert "1.2.3.9/artifact.metal" in st.findings

    tr = SeriesTracker(cfg, {"motion": 0.5})
    streamed = []
    for r in make_results(20, scores={i: {"motion": 0.8} for i in range(3, 6)}):
        streamed += tr.add(r)
    assert "artifact.motion" in checks(streamed)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert st.findings["1.2.3.9/artifact.motion"].details["slices"] == 3

    # weak but long: 11 slices at 0.65, 2.5 mm apart (25 mm first to last) qualify; 10 (22.5 mm) do not
    for n, raised in ((11, True), (10, False)):
        tr = SeriesTracker(cfg, {"motion": 0.5})
        for r in make_results(30, scores={i: {"motion": 0.65} for i in range(5, 5 + n)}):
            tr.add(r)
        st, _ = tr.complete("1.2.3.9", "idle")
        assert ("1.2.3.9/artifact.motion" in st.findings) is raised, n


def test_motion_must_stand_out_from_the_series(cfg):
    """Motion is transient: a run over threshold is motion only when it stands out from the series' own
    level (real scanners shift the network's motion score on every slice)."""
    # a whole series at 0.75 (clean real CT from an unfamiliar scanner): nothing, streaming or final
    tr = SeriesTracker(cfg, {"motion": 0.58})
    streamed = []
    for r in make_results(40, scores={i: {"motion": 0.75} for i in range(40)}):
        streamed += tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert "artifact.motion" not in checks(streamed) and "1.2.3.9/artifact.motion" not in st.findings
    # the same 0.75 on a 15-slice band (37.5 mm) of a series otherwise at 0.3: raised while streaming
    tr = SeriesTracker(cfg, {"motion": 0.58})
    band = {i: {"motion": 0.75 if 20 <= i < 35 else 0.3} for i in range(40)}
    streamed = []
    for r in make_results(40, scores=band):
        streamed += tr.add(r)
    assert "artifact.motion" in checks(streamed)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert st.findings["1.2.3.9/artifact.motion"].details["slices"] == 15
    # a band at the start of the series stands out only once more of the series is in: runs of motion are
    # judged again every tenth slice (here: 12 band slices of 30, the median drops at the 30th)
    tr = SeriesTracker(cfg, {"motion": 0.58})
    first = [i for i, r in enumerate(make_results(40, scores={i: {"motion": 0.8} for i in range(0, 12)}))
             if "artifact.motion" in checks(tr.add(r))]
    assert first[:1] == [29]
    # a series too short to have a median: only a very high slice raises motion
    for top, raised in ((0.8, False), (0.95, True)):
        tr = SeriesTracker(cfg, {"motion": 0.58})
        for r in make_results(6, spacing=10.0, scores={i: {"motion": top} for i in range(6)}):
            tr.add(r)
        st, _ = tr.complete("1.2.3.9", "idle")
        assert ("1.2.3.9/artifact.motion" in st.findings) is raised, top


def test_a_streaming_finding_the_complete_series_does_not_show_is_withdrawn(cfg):
    """A band of high motion scores stands out while the series' level is low and is raised while slices
    arrive; the rest of the series reads as high (a scanner the network reads so everywhere), so the complete
    series does not show it: the finding stays on record as withdrawn (info, details.resolved), its message
    says so in words. Offline (``streaming=False``, medqc analyze) nothing is judged before the series is
    complete: nothing is raised, so nothing is withdrawn."""
    scores = {i: {"motion": 0.75 if 20 <= i < 35 or i >= 45 else 0.3} for i in range(120)}
    tr = SeriesTracker(cfg, {"motion": 0.58})
    streamed = []
    for r in make_results(120, scores=scores):
        streamed += tr.add(r)
    assert "artifact.motion" in checks(streamed)
    st, _ = tr.complete("1.2.3.9", "idle")
    f = st.findings["1.2.3.9/artifact.motion"]
    assert f.severity == "info" and f.details["resolved"] is True and st.verdict == "pass" and f.kind == "withdrawn"
    assert f.message.startswith("Withdrawn: the complete series does not show it (raised while slices arrived: ")

    offline = SeriesTracker(cfg, {"motion": 0.58}, streaming=False)
    assert [f for r in make_results(120, scores=scores) for f in offline.add(r)] == []
    st2, final = offline.complete("1.2.3.9", "idle")
    assert st2.verdict == "pass" and "1.2.3.9/artifact.motion" not in st2.findings
    assert sorted(st2.findings) == sorted(fid for fid, f in st.findings.items() if not f.details.get("resolved"))


def _streaked(n: int, air: dict, scores: float = 0.55, **measures) -> list[SliceResult]:
    """n slices with motion scores under the threshold everywhere and ``air_dark_hu`` per slice from ``air``
    ({index: HU}, 1.0 elsewhere: a clean real series reads 0.8-1.2)."""
    out = make_results(n, scores={i: {"motion": scores} for i in range(n)})
    for i, r in enumerate(out):
        r.measures = {"air_dark_hu": air.get(i, 1.0), **measures}
    return out


def test_a_patient_moving_all_through_the_series_is_raised_from_the_air(cfg):
    """The series-median rule cannot see motion in every rotation (the median rises with it); dark streaks
    in the free air over most of the series can: raised while streaming and at completion, on the slices
    streaked at 3 HU or more. Clean air, or streaks another artifact explains (noise here), raise nothing."""
    moved = {i: (4.0 if i % 4 else 2.0) for i in range(40)}  # 30 of 40 slices streaked, median 4 HU
    tr = SeriesTracker(cfg, {"motion": 0.58})
    streamed = []
    for r in _streaked(40, moved):
        streamed += tr.add(r)
    assert "artifact.motion" in checks(streamed)
    st, _ = tr.complete("1.2.3.9", "idle")
    f = st.findings["1.2.3.9/artifact.motion"]
    assert f.details["slices"] == 30 and f.first_instance == 2 and f.last_instance == 40
    assert f.details["air_streaks_median_hu"] == 4.0 and "dark streaks in the air around the patient" in f.message
    # a band of 15 streaked slices (35 mm) in a clean series: raised on the band, streaming and final
    tr = SeriesTracker(cfg, {"motion": 0.58})
    streamed = []
    for r in _streaked(40, {i: 4.0 for i in range(15)}):
        streamed += tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert "artifact.motion" in checks(streamed)
    assert st.findings["1.2.3.9/artifact.motion"].details["slices"] == 15
    for air, extra in (({i: 1.2 for i in range(40)}, {}),  # clean air
                       ({i: 4.0 for i in range(0, 40, 5)}, {}),  # 8 scattered slices, no band
                       ({i: 4.0 for i in range(20, 29)}, {}),  # a band of 9 slices (20 mm)
                       (moved, {"noise_ratio": 1.5})):  # heavy noise explains the streaks
        tr = SeriesTracker(cfg, {"motion": 0.58})
        streamed = []
        for r in _streaked(40, air, **extra):
            streamed += tr.add(r)
        st, _ = tr.complete("1.2.3.9", "idle")
        assert "artifact.motion" not in checks(streamed) and "1.2.3.9/artifact.motion" not in st.findings


def test_config_thresholds_override_bundle(cfg):
    cfg2 = load_config(overrides={"checks.artifact.thresholds": {"noise": 0.9}, "checks.artifact.min_run": 3})
    tr = SeriesTracker(cfg2, {"noise": 0.3})
    assert tr.thresholds["noise"] == 0.9
    for r in make_results(20, scores={i: {"noise": 0.85} for i in range(3, 9)}):
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert st.verdict == "pass" and not st.findings


def test_repeated_instance_is_ignored(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(10)
    for r in res + res[3:6]:
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert len(st.results) == 10
    assert "geometry.duplicate" not in checks(st.findings.values())
    assert st.verdict == "pass"


def test_expected_count_completes_at_once(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(12, images_in_acquisition=12)
    for r in res[:11]:
        tr.add(r)
    assert tr.due(time.time()) == []
    tr.add(res[11])
    assert tr.due(time.time()) == [("1.2.3.9", "count")]
    st, _ = tr.complete("1.2.3.9", "count")
    assert st.completed_reason == "count" and st.verdict == "pass"
    assert tr.due(time.time() + 100) == []  # completed series are not due again


def test_step_and_shoot_count_is_per_table_position(cfg):
    """GE and others write ImagesInAcquisition per rotation in axial (step-and-shoot) mode: reaching it after
    the first rotation must not close the series; helical series keep completing by the count."""
    tr = SeriesTracker(cfg, {})
    res = make_results(12, images_in_acquisition=4, scan_options="AXIAL MODE")
    for r in res[:4]:
        tr.add(r)
    assert tr.due(time.time()) == []
    assert tr.get("1.2.3.9").expected is None
    tr2 = SeriesTracker(cfg, {})
    for r in make_results(4, series="1.2.3.11", images_in_acquisition=4, scan_options="HELICAL MODE"):
        tr2.add(r)
    assert tr2.due(time.time()) == [("1.2.3.11", "count")]


def test_idle_timeout_and_mpps(cfg):
    tr = SeriesTracker(cfg, {})
    for r in make_results(5):
        tr.add(r)
    for r in make_results(5, series="1.2.3.10"):
        tr.add(r)
    now = time.time()
    assert tr.due(now) == []
    tr.mpps_completed(["1.2.3.10", "9.9.9"])
    assert tr.due(now) == [("1.2.3.10", "mpps")]
    assert set(tr.due(now + cfg.series.idle_timeout_s + 0.1)) == {("1.2.3.9", "idle"), ("1.2.3.10", "mpps")}


def test_late_slice_reopens_series(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(10)
    for r in res[:9]:
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert st.verdict == "pass"
    tr.add(res[9])
    assert tr.get("1.2.3.9").verdict is None
    st, _ = tr.complete("1.2.3.9", "idle")
    assert len(st.results) == 10 and st.verdict == "pass"


def test_undecodable_slice_is_a_finding_and_kept(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(10)
    res[4].error = "decode: unsupported transfer syntax 1.2.840.10008.1.2.4.100"
    res[5].error = "decode: truncated pixel data"
    out = []
    for r in res:
        out += tr.add(r)
    assert [f.check for f in out].count("input.undecodable") == 2  # raised, then updated
    st, _ = tr.complete("1.2.3.9", "idle")
    f = st.findings["1.2.3.9/input.undecodable"]
    assert f.details["count"] == 2 and (f.first_instance, f.last_instance) == (5, 6)
    assert st.verdict == "warn"
    # their headers still place them: no geometry gap, they are reported as what they are
    assert "geometry.gap" not in checks(st.findings.values())
    rep = series_report(st, cfg.privacy)
    assert sum(1 for s in rep["per_slice"] if "error" in s) == 2


def test_keep_recent_bounds_memory():
    cfg = load_config(overrides={"series.keep_recent": 3})
    tr = SeriesTracker(cfg, {})
    for k in range(6):
        for r in make_results(3, series=f"1.2.3.{100 + k}"):
            tr.add(r)
        tr.complete(f"1.2.3.{100 + k}", "idle")
    assert [s.uid for s in tr.all()] == ["1.2.3.103", "1.2.3.104", "1.2.3.105"]


def test_report_schema_and_privacy(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(8, scores={i: {"truncation": 0.9} for i in range(2, 5)}, body_part="CHEST",
                       patient_name="DOE^JANE", patient_id="PID-77")
    for r in res:
        r.position_ref_mm = 300.0 + 2.5 * r.info.instance_number
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    rep = build_report([st], [{"path": "/in/x.dcm", "reason": "not DICOM", "extra": 1}], cfg.privacy)
    text = json.dumps(rep)
    assert "DOE" not in text and "PID-77" not in text
    assert rep["schema"] == "medqc.report/1"
    assert rep["rejected"] == [{"path": "/in/x.dcm", "reason": "not DICOM"}]
    s = rep["series"][0]
    for key in ("series_instance_uid", "body_part", "protocol_rule", "slices", "verdict", "findings", "per_slice"):
        assert key in s
    assert s["protocol_rule"] == "chest" and s["slices"] == 8 and s["body_part"] == "CHEST"
    f = [x for x in s["findings"] if x["check"] == "artifact.truncation"][0]
    for key in ("check", "severity", "first_instance", "last_instance", "z_range_mm", "score", "message"):
        assert key in f
    p = s["per_slice"][0]
    assert set(p) >= {"sop_instance_uid", "instance_number", "z", "scores", "position_ref_mm"}
    shown = load_config(overrides={"privacy.show_patient_identifiers": True})
    assert series_report(st, shown.privacy)["patient_id"] == "PID-77"


def test_no_rule_means_no_coverage_and_a_note(cfg):
    tr = SeriesTracker(cfg, {})
    for r in make_results(20, body_part="EXTREMITY", protocol_name="Knee routine"):
        r.position_ref_mm = 900.0  # would be "far below" any torso protocol
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    assert st.protocol_rule is None
    assert not [c for c in checks(st.findings.values()) if c.startswith("coverage")]
    rep = series_report(st, cfg.privacy)
    assert rep["protocol_rule"] is None and "no protocol rule" in rep["coverage_note"]


def test_slices_beyond_the_expected_count_complete_by_idle(cfg):
    tr = SeriesTracker(cfg, {})
    res = make_results(12, images_in_acquisition=10)
    for r in res[:10]:
        tr.add(r)
    assert tr.due(time.time()) == [("1.2.3.9", "count")]
    tr.complete("1.2.3.9", "count")
    for r in res[10:]:
        tr.add(r)
    assert tr.due(time.time()) == []  # no re-completion per late slice
    assert tr.due(time.time() + cfg.series.idle_timeout_s + 0.1) == [("1.2.3.9", "idle")]
    st, _ = tr.complete("1.2.3.9", "idle")
    assert len(st.results) == 12 and st.verdict == "pass"


def test_sinks_get_frozen_events_that_a_late_slice_does_not_change(cfg):
    """The events the sinks read on their own threads are snapshots taken under the tracker's lock: a late
    slice that re-opens the series (and a finding that changes afterwards) leaves the event of the verdict,
    its findings and its report as they were when the verdict was reached."""
    import dataclasses

    from medqc.agent.records import FindingEvent, SeriesEvent

    tr = SeriesTracker(cfg, {"metal": 0.5})
    res = make_results(30, scores={i: {"metal": 0.8} for i in range(10, 13)})
    for r in res[:-1]:
        raised = tr.add(r)
        assert all(isinstance(f, FindingEvent) for f in raised)
    series, changed = tr.finish("1.2.3.9", "idle", cfg.privacy)
    assert isinstance(series, SeriesEvent) and series.verdict in ("warn", "fail") and len(series.results) == 29
    metal = series.findings["1.2.3.9/artifact.metal"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        metal.severity = "info"
    report = json.dumps(series.report, sort_keys=True)
    live = tr.get("1.2.3.9").findings["1.2.3.9/artifact.metal"]
    live.details["mutated"] = True  # the live finding changes; the event keeps its own copy
    tr.add(res[-1])  # a late slice re-opens the series
    assert tr.get("1.2.3.9").verdict is None
    assert series.verdict in ("warn", "fail") and len(series.results) == 29 and "mutated" not in metal.details
    assert json.dumps(series.report, sort_keys=True) == report and series.report["slices"] == 29
    assert [f.kind for f in changed if f.check == "artifact.metal"] == ["final"]
    # the event carries every field of the finding it snapshots, with the same values
    from medqc.agent.records import Finding

    assert [f.name for f in dataclasses.fields(FindingEvent)] == [f.name for f in dataclasses.fields(Finding)]
    assert {k: v for k, v in live.to_dict().items() if k != "details"} == {k: v for k, v in FindingEvent.of(live).to_dict().items() if k != "details"}


def _implant_series(order):
    """12 slices 2.5 mm apart (z 0 → -27.5): metal at full density on slices 4-5 (indices), its partial-volumed
    end on 6 (2,400 HU) and 7 (2,300 HU, 5 mm from the metal) at its place, 8 likewise but 7.5 mm from it;
    enamel-like 2,500 HU on 3 far from the metal in-plane, cortical bone (1,800 HU) on 2. ``order``: arrival
    order of the indices."""
    res = make_results(12, scores={4: {"metal": 0.9}, 5: {"metal": 0.9}})
    at = {"metal_row_mm": 100.0, "metal_col_mm": 120.0}
    dense = {4: dict(metal_max_hu=3071.0, **at), 5: dict(metal_max_hu=3071.0, **at),
             6: dict(metal_max_hu=2400.0, metal_row_mm=105.0, metal_col_mm=118.0),
             7: dict(metal_max_hu=2300.0, metal_row_mm=104.0, metal_col_mm=119.0),
             8: dict(metal_max_hu=2300.0, metal_row_mm=104.0, metal_col_mm=119.0),
             3: dict(metal_max_hu=2500.0, metal_row_mm=200.0, metal_col_mm=250.0),
             2: dict(metal_max_hu=1800.0)}
    for i, m in dense.items():
        res[i].measures.update(m)
    return [res[i] for i in order]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("order", [tuple(range(12)), tuple(range(11, -1, -1))],
                         ids=["head-first", "feet-first"])
def test_metal_partial_volumed_beside_metal_is_metal(cfg, streaming, order):
    """An implant's end partial-volumed under the metal level, on the slices next to its full-density ones and
    where the metal lies, is metal too (midway between the threshold and the metal's score), whichever arrives
    first; dense pixels elsewhere in the slice, beyond 5 mm of z from the metal, or bone are not."""
    tr = SeriesTracker(cfg, {"metal": 0.14}, streaming=streaming)
    res = _implant_series(list(order))
    for r in res:
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    by_index = {r.info.instance_number - 1: r.scores["metal"] for r in res}
    assert by_index[6] == by_index[7] == pytest.approx(0.5 * (0.14 + 0.9))
    assert all(by_index[i] == 0.01 for i in (2, 3, 8)), by_index
    f = st.findings["1.2.3.9/artifact.metal"]
    assert (f.first_instance, f.last_instance) == (5, 8)


@pytest.mark.parametrize("streaming", [True, False])
def test_an_implant_tip_at_metal_density_beside_metal_is_metal(cfg, streaming):
    """An implant's tip that keeps metal density over a speck (under the classical area: scored under the
    threshold) beside its full slices is raised like a partial-volumed end, up to 5 mm from the metal; a raised
    slice is no source itself, so the speck 7.5 mm from the metal stays as it was, as does one far from metal."""
    res = make_results(12, scores={4: {"metal": 0.9}, 5: {"metal": 0.9}, 6: {"metal": 0.1}, 7: {"metal": 0.1},
                                   8: {"metal": 0.1}, 10: {"metal": 0.1}})
    at = {"metal_row_mm": 100.0, "metal_col_mm": 120.0}
    for i in (4, 5):
        res[i].measures.update(metal_max_hu=3500.0, metal_area_mm2=120.0, **at)
    for i in (6, 7, 8, 10):
        res[i].measures.update(metal_max_hu=3300.0, metal_area_mm2=3.0, metal_row_mm=104.0, metal_col_mm=119.0)
    tr = SeriesTracker(cfg, {"metal": 0.14}, streaming=streaming)
    for r in res:
        tr.add(r)
    tr.complete("1.2.3.9", "idle")
    by_index = {r.info.instance_number - 1: r.scores["metal"] for r in res}
    assert by_index[6] == by_index[7] == pytest.approx(0.5 * (0.14 + 0.9))
    assert by_index[8] == by_index[10] == 0.1, by_index
    assert res[6].measures["metal_beside"] == 1.0 and "metal_beside" not in res[8].measures


@pytest.mark.parametrize("inside,severity", [(1.0, "critical"), (0.0, "info")])
def test_metal_on_the_skin_is_information_not_an_alarm(cfg, inside, severity):
    """Six slices of metal: an implant (inside the patient) is critical; ECG leads or clothing on or beside the
    skin (metal_inside 0 on every slice) are information that names them, with what to do next time."""
    tr = SeriesTracker(cfg, {"metal": 0.5})
    res = make_results(20, scores={i: {"metal": 0.95} for i in range(5, 11)})
    for r in res[5:11]:
        r.measures.update(metal_max_hu=3071.0, metal_inside=inside)
    for r in res:
        tr.add(r)
    st, _ = tr.complete("1.2.3.9", "idle")
    f = st.findings["1.2.3.9/artifact.metal"]
    assert f.severity == severity
    assert f.message.startswith("External metal") == (severity == "info"), f.message
    assert st.verdict == ("fail" if severity == "critical" else "pass")
