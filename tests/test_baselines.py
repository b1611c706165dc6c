"""Per-scanner baselines (medqc/baselines.py, agent/checks/baseline.py, medqc calibrate, the agent's learning).

Real data: the real Philips chest (sections of 8 slices copied as series of their own, noise and a ring
injected into copies in the projection domain), the real Philips head phantom and the TCIA single slices,
from ``MEDQC_REAL_CT`` (default ``../shared/real-ct``; with ``MEDQC_REQUIRE_REAL_CT=1``, or ``MEDQC_REAL_CT`` set, a missing
folder fails).
The learned store is a real SQLite file in a temporary state directory, written and read by separate
processes (``medqc calibrate``, ``medqc analyze``, ``medqc agent`` started twice).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medqc import baselines
from medqc.agent.records import SliceInfo, SliceResult
from medqc.baselines import Baselines, ScannerKey, SeriesStats
from medqc.config import ConfigError, load_config
from medqc.dcmtk import dcmtk

ROOT = Path(__file__).resolve().parents[1]
CHEST = "philips-bigbore-chest-patient"
HEAD = "philips-ingenuity-head-phantom"
TCIA = "tcia-covid19-ny-sbu-slices"
CHEST_KEY = "PHILIPS|BRILLIANCE BIG BORE|?|C|<=2.5mm|body"
# sections of the real chest (first slice, 0 = the lowest; 8 slices = 16 mm each), all without a finding once
# the site's centring tolerance is 100 mm (the patient lies 20-76 mm below the reconstruction centre there)
LEARN = (24, 32, 40, 48, 56)  # their median σ at 2 mm: 16.3, 15.1, 15.1, 14.7, 19.3 HU
HELD_OUT = 80  # 15.4 HU


def _require(what: str):
    from conftest import missing_real_ct

    missing_real_ct(f"{what} is not available")


@pytest.fixture(scope="module")
def real_ct_root() -> Path:
    root = Path(os.environ.get("MEDQC_REAL_CT") or ROOT.parent / "shared" / "real-ct")
    if not (root / CHEST).is_dir() or not (root / HEAD).is_dir():
        _require(f"the real CT folder ({root}, MEDQC_REAL_CT) with {CHEST} and {HEAD}")
    return root


def _chest_slices(root: Path):
    import pydicom

    out = []
    for f in sorted((root / CHEST).iterdir()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - licence files
            continue
        out.append((float(ds.ImagePositionPatient[2]), f))
    return [f for _, f in sorted(out)]


def _section(files, start: int, out: Path, n: int = 8, **tags) -> Path:
    """Slices ``start..start+n-1`` of the chest as a series of their own (new series and instance UIDs;
    the vendor's private tags dropped: their VRs are unknown to the writer)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    suid = generate_uid(entropy_srcs=[f"section{start}/{sorted(tags.items())}"])
    for i, f in enumerate(files[start:start + n]):
        ds = pydicom.dcmread(f)
        ds.remove_private_tags()
        ds.SeriesInstanceUID = suid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[suid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(out / f"IM{i:03d}.dcm")
    return out


@pytest.fixture(scope="module")
def chest(real_ct_root, tmp_path_factory) -> dict:
    """The learning sections, the held-out clean one, and copies of it with noise and with a ring injected."""
    from medqc.synth.inject import inject_series

    tmp = tmp_path_factory.mktemp("chest-sections")
    files = _chest_slices(real_ct_root)
    assert len(files) == 141
    d = {"learn": [_section(files, s, tmp / f"s{s}") for s in LEARN], "clean": _section(files, HELD_OUT, tmp / "clean")}
    # σ added as a dose of about a fifth gives it (the sharp kernel C keeps the generic level quiet)
    d["noisy"] = tmp / "noisy"
    d["noisy_truth"] = inject_series(d["clean"], d["noisy"], "noise", 0.02, seed=1, progress=False)
    d["ring"] = tmp / "ring"
    inject_series(d["clean"], d["ring"], "ring", 0.15, seed=1, progress=False)
    d["files"] = files
    d["tmp"] = tmp
    return d


def _site(tmp: Path, state: Path, extra: str = "") -> Path:
    p = tmp / f"site-{time.time_ns()}.toml"
    p.write_text(f'state_dir = "{state}"\n[checks]\ncentering_tolerance_mm = 100.0\n{extra}')
    return p


def _medqc(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medqc", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MEDQC_LOG_LEVEL="WARNING"))


def _series(report: dict, uid: str) -> dict:
    for s in report["series"]:
        if s["series_instance_uid"] == uid:
            return s
    raise AssertionError(f"no series {uid} in {[s['series_instance_uid'] for s in report['series']]}")


def _open(s: dict, check: str) -> list[dict]:
    return [f for f in s["findings"] if f["check"] == check and not (f.get("details") or {}).get("resolved")]


# ----------------------------------------------------------------------------------------------- units
def test_key_thickness_buckets_quantiles_and_config():
    assert [baselines.thickness_bucket(t) for t in (0.625, 1.25, 2.0, 2.5, 3.0, 5.0, 7.5, None, 0.0)] == [
        "<=1.25mm", "<=1.25mm", "<=2.5mm", "<=2.5mm", "<=3.75mm", "<=5mm", ">5mm", "?mm", "?mm"]
    assert baselines.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and baselines.quantile([], 0.5) is None
    assert baselines.quantile([10.0, 20.0], 0.9) == pytest.approx(19.0)
    info = SliceInfo("1", "2", "3", "4", manufacturer=" GE  Medical Systems", manufacturer_model="LightSpeed|VCT",
                     device_serial_number="SN 1", convolution_kernel="Br40d\\3", slice_thickness=3.0)
    key = baselines.scanner_key(info, [])
    assert key.exact == "GE MEDICAL SYSTEMS|LIGHTSPEED/VCT|SN 1|BR40D\\3|<=3.75mm|body"
    assert key.coarse == "GE MEDICAL SYSTEMS|LIGHTSPEED/VCT|*|BR40D\\3|<=3.75mm|body"
    skull = [SliceResult(info=info, measures={"skull_ring": v}) for v in (0.9, 0.8, 0.2)]
    assert baselines.scanner_key(info, skull).region == "head"
    # station name before the serial number
    assert baselines.scanner_key(SliceInfo("1", "2", "3", "4", station_name="ct4", device_serial_number="SN 1"), []).station == "CT4"
    with pytest.raises(ConfigError, match="baselines.keep"):
        load_config(None, {"baselines.min_series": 10, "baselines.keep": 5})
    with pytest.raises(ConfigError, match="baselines.noise_factor"):
        load_config(None, {"baselines.noise_factor": 1.0})


def _store_learned_then(path: Path, key, sql: str) -> None:
    """A new store (which records the measures it is written with) that learns three series under ``key``,
    then ``sql`` run on its file: what an earlier release left."""
    store = Baselines(path, min_series=2)
    assert store.noise_forgotten == 0 and store.ring_forgotten == 0
    for i in range(3):
        store.learn(key, f"uid{i}", SeriesStats(20, 20, 20, 12.0 + i, 20.0, 9.0, 0.0, 0.1 * i))
    store.close()
    reopened = Baselines(path, min_series=2)  # the same measures: nothing forgotten
    assert reopened.noise_forgotten == 0 and reopened.ring_forgotten == 0
    reopened.close()
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()


def test_a_store_measured_with_another_noise_definition_forgets_its_noise_figures_and_keeps_its_rings(tmp_path, caplog):
    from medqc.analysis.noise import NOISE_MEASURE

    path = tmp_path / "b.sqlite"
    key = ScannerKey("V", "M", "S1", "K", "<=5mm", "body")
    _store_learned_then(path, key, "UPDATE baseline_meta SET v='an earlier measure' WHERE k='noise_measure'")
    with caplog.at_level("WARNING", logger="medqc.baselines"):
        again = Baselines(path, min_series=2)
    assert again.noise_forgotten == 3 and "3 learned series" in caplog.text
    b = again.lookup(key)
    assert b.series == 3 and not b.noise_usable and b.noise_sd_2mm_hu is None
    assert b.ring_usable and b.ring_p90_hu == pytest.approx(0.1)
    db = sqlite3.connect(path)
    assert db.execute("SELECT v FROM baseline_meta WHERE k='noise_measure'").fetchone()[0] == NOISE_MEASURE
    db.close()
    # learned anew from the next passed series
    again.learn(key, "uid7", SeriesStats(20, 20, 20, 15.0, 20.0, 9.0, 0.0, 0.1))
    again.learn(key, "uid8", SeriesStats(20, 20, 20, 16.0, 20.0, 9.0, 0.0, 0.1))
    assert again.lookup(key).noise_sd_2mm_hu == pytest.approx(15.5)


def test_judge_noise_and_ring_ranges(tmp_path):
    store = Baselines(tmp_path / "b.sqlite", min_series=5)
    key = ScannerKey("V", "M", "S1", "K", "<=5mm", "body")
    for i, (n50, r90) in enumerate([(10.0, 0.1), (11.0, 0.0), (12.0, 0.2), (13.0, 0.1), (14.0, 0.0)]):
        assert store.lookup(key) is None  # under min_series: generic levels
        store.learn(key, f"uid{i}", SeriesStats(slices=20, noise_slices=20, ring_slices=20, noise_sd_2mm_p50=n50,
                                                noise_sd_2mm_p90=n50 * 1.3, ring_p50=0.0, ring_p90=r90))
    b = store.lookup(key)
    assert b.level == "scanner" and b.series == 5 and b.noise_sd_2mm_hu == 12.0
    assert b.noise_normal_max_hu == pytest.approx(13.8) and b.noise_high_above_hu == pytest.approx(21.6)
    assert b.ring_limit_hu == pytest.approx(0.18 + baselines.RING_MARGIN_HU)

    def j(n50, r90):
        return baselines.judge(SeriesStats(20, 20, 20, n50, n50, None, 0.0, r90), b)

    assert (j(13.0, 0.1).noise, j(17.0, 0.1).noise, j(21.7, 0.1).noise) == ("normal", "between", "high")
    assert j(21.7, 0.1).noise_ratio == pytest.approx(21.7 / 12.0)
    assert (j(12.0, 2.1).ring, j(12.0, 2.3).ring) == ("normal", "high")
    # the same series again replaces its figures, never counts twice; keep bounds the key
    assert store.learn(key, "uid0", SeriesStats(20, 20, 20, 10.0, 13.0, None, 0.0, 0.1)) is False
    assert store.count(key) == (5, 5)
    small = Baselines(tmp_path / "b.sqlite", min_series=2, keep=3)
    small.learn(key, "uid9", SeriesStats(20, 20, 20, 9.0, 9.0, None, 0.0, 0.0))
    assert small.count(key) == (3, 3)


# ------------------------------------------------------------------------ learning from real series
def test_calibrate_learns_real_series_and_says_what_it_skipped(real_ct_root, tmp_path):
    state = tmp_path / "state"
    paths = [real_ct_root / HEAD, real_ct_root / CHEST] + ([real_ct_root / TCIA] if (real_ct_root / TCIA).is_dir() else [])
    r = _medqc("calibrate", "--state-dir", state, "--json", "--no-progress", *paths)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["store"]) == state / "baselines.sqlite"
    learned = {x["key"]: [] for x in out["learned"]}
    for x in out["learned"]:
        learned[x["key"]].append(x)
    # the head phantom's two tilted series (a gantry-tilt note and a withdrawn coverage note do not stop
    # learning) and the whole chest
    head_key = "PHILIPS|INGENUITY CT|CT4|UB|<=2.5mm|head"
    assert set(learned) == {head_key, CHEST_KEY}
    assert len(learned[head_key]) == 2 and len(learned[CHEST_KEY]) == 1
    chest = learned[CHEST_KEY][0]["stats"]
    # a body at a routine dose; the shoulders, in the series' top tenth, 2-3 times noisier than the mid chest
    assert chest["slices"] == 141 and 12.0 < chest["noise_sd_2mm_p50"] < 25.0
    assert 1.8 * chest["noise_sd_2mm_p50"] < chest["noise_sd_2mm_p90"] < 4 * chest["noise_sd_2mm_p50"]
    assert chest["ring_p90"] < 1.5  # clean real CT: little over its noise floors (the chest reads at most 2.7 HU)
    # the plastic head phantom: a brain-scale noise figure on the few slices with enough uniform material
    assert all(0.5 < x["stats"]["noise_sd_2mm_p50"] < 15.0 and x["stats"]["noise_slices"] >= 3 for x in learned[head_key])
    shown = {e["key"]: e for e in out["baselines"]}
    assert shown[head_key]["series"] == 2 and shown[head_key]["usable"] is False  # 2 of 5
    if (real_ct_root / TCIA).is_dir():
        why = [s["reason"] for s in out["skipped"]]
        assert any(w.startswith("too few measured slices") for w in why)  # single slices
        assert any("artifact." in w or "dose.ctdivol" in w for w in why)  # never from a series with findings
    # again: the same series replace their figures, nothing is counted twice; --show reads the file back
    r = _medqc("calibrate", "--state-dir", state, "--json", "--no-progress", real_ct_root / HEAD)
    assert r.returncode == 0 and all(not x["new"] for x in json.loads(r.stdout)["learned"])
    show = json.loads(_medqc("calibrate", "--state-dir", state, "--show", "--json").stdout)
    assert {e["key"]: e["series"] for e in show["baselines"]} == {head_key: 2, CHEST_KEY: 1}
    text = _medqc("calibrate", "--state-dir", state, "--show").stdout
    assert head_key in text and "no (2/5)" in text


def test_noise_judged_against_the_learned_baseline_across_processes(chest, tmp_path):
    state = tmp_path / "state"
    site = _site(tmp_path, state)
    # before any baseline: the generic level alone, which says nothing of the injected noise (sharp kernel)
    r = _medqc("analyze", "--config", site, "--json", "--no-progress", chest["clean"], chest["noisy"])
    assert r.returncode == 0, r.stderr
    before = json.loads(r.stdout)
    noisy0 = _series(before, chest["noisy_truth"]["series_instance_uid"])
    # (the noise lifts the chest's skin markers, clipped at 2,976 HU, over the metal level: external metal,
    # information only)
    assert noisy0["verdict"] == "pass"
    assert [(f["check"], f["severity"], f["details"].get("external")) for f in noisy0["findings"]] in (
        [], [("artifact.metal", "info", True)]), noisy0["findings"]
    assert noisy0["baseline"] == {"used": False, "key": CHEST_KEY, "series": 0,
                                  "text": "no baseline for this scanner (generic levels)"}
    assert not state.exists()  # analyze creates no state

    r = _medqc("calibrate", "--config", site, "--no-progress", *chest["learn"])
    assert r.returncode == 0, r.stderr
    assert "learned 5 series (5 new)" in r.stdout and CHEST_KEY in r.stdout, r.stdout

    # another process reads what calibrate stored
    r = _medqc("analyze", "--config", site, "--json", "--no-progress", chest["clean"], chest["noisy"])
    rep = json.loads(r.stdout)
    noisy = _series(rep, chest["noisy_truth"]["series_instance_uid"])
    clean = next(s for s in rep["series"] if s is not noisy)
    b = clean["baseline"]
    assert b["used"] and b["key"] == CHEST_KEY and b["level"] == "scanner" and b["series"] == 5
    assert 14.5 < b["noise_sd_2mm_hu"] < 16.5 and b["noise_normal_max_hu"] < b["noise_high_above_hu"]
    assert b["judgement"]["noise"] == "normal" and clean["verdict"] == "pass" and not clean["findings"]
    assert CHEST_KEY in b["text"] and "5 passed series" in b["text"]
    (f,) = _open(noisy, "noise.index")
    assert f["severity"] == "warning" and f["details"]["raised_by"] == "baseline"
    assert f["details"]["ratio"] > noisy["baseline"]["noise_factor"] == 1.8
    assert noisy["baseline"]["judgement"]["noise"] == "high" and "this scanner's normal" in f["message"]

    # a series with a finding never teaches the baseline
    r = _medqc("calibrate", "--config", site, "--json", "--no-progress", chest["noisy"], chest["clean"])
    out = json.loads(r.stdout)
    (sk,) = out["skipped"]
    assert sk["series_instance_uid"] == noisy["series_instance_uid"] and "noise.index" in sk["reason"]
    assert [x["series_instance_uid"] for x in out["learned"]] == [clean["series_instance_uid"]]

    # a stricter generic level fires on the clean section; within its scanner's normal it is withdrawn,
    # while the injected noise, above the normal slices too, keeps it
    strict = _site(tmp_path, state, "[checks.artifact.thresholds]\nnoise = 0.03\n")
    rep = json.loads(_medqc("analyze", "--config", strict, "--json", "--no-progress", chest["clean"], chest["noisy"]).stdout)
    noisy = _series(rep, chest["noisy_truth"]["series_instance_uid"])
    clean = next(s for s in rep["series"] if s is not noisy)
    (w,) = [f for f in clean["findings"] if f["check"] == "artifact.noise"]
    assert w["severity"] == "info" and w["details"]["resolved"] and w["details"]["baseline_normal"]
    assert w["message"].startswith("Withdrawn: image noise") and clean["verdict"] == "pass"
    assert _open(noisy, "artifact.noise") and _open(noisy, "noise.index") and noisy["verdict"] == "warn"
    # without the baseline the same strict level raises it on the clean section
    gen = json.loads(_medqc("analyze", "--config", _site(tmp_path, tmp_path / "empty", "[checks.artifact.thresholds]\nnoise = 0.03\n"),
                            "--json", "--no-progress", chest["clean"]).stdout)
    assert _open(gen["series"][0], "artifact.noise")


def test_ring_over_the_scanners_normal_is_raised_by_the_baseline(chest, tmp_path):
    from medqc.agent.analyze import analyze
    from medqc.agent.calibrate import learn

    state = tmp_path / "state"
    cfg = load_config(_site(tmp_path, state))
    store = Baselines.from_config(cfg)
    learn([str(p) for p in chest["learn"]], cfg, store)
    store.close()
    rep = analyze([str(chest["ring"])], cfg)
    (s,) = rep["series"]
    assert s["baseline"]["used"] and s["baseline"]["ring_limit_hu"] <= 4.0  # clean real CT: normal 0-2 HU
    (f,) = _open(s, "artifact.ring")
    # the ring stands far over the scanner's normal; the generic level sees it on this section too
    judged = f["details"]["baseline"]
    assert judged["supports"] and judged["ring_p90_hu"] > max(4.0, judged["limit_hu"])
    plain = analyze([str(chest["ring"])], load_config(_site(tmp_path, tmp_path / "none")))
    assert _open(plain["series"][0], "artifact.ring")


def test_fallback_to_the_model_at_any_station_and_reset(chest, tmp_path):
    from medqc.agent.analyze import analyze
    from medqc.agent.calibrate import learn

    state = tmp_path / "state"
    cfg = load_config(_site(tmp_path, state))
    tmp = tmp_path / "stations"
    learn_dirs = [_section(chest["files"], s, tmp / f"s{s}", StationName="CT-A" if i < 3 else "CT-B")
                  for i, s in enumerate(LEARN)]
    other = _section(chest["files"], HELD_OUT, tmp / "c", StationName="CT-C")
    store = Baselines.from_config(cfg)
    res = learn([str(p) for p in learn_dirs], cfg, store)
    assert {x["key"] for x in res["learned"]} == {CHEST_KEY.replace("|?|", "|CT-A|"), CHEST_KEY.replace("|?|", "|CT-B|")}
    coarse = CHEST_KEY.replace("|?|", "|*|")
    shown = {e["key"]: e for e in res["baselines"]}
    assert shown[coarse]["series"] == 5 and shown[coarse]["usable"] and shown[coarse]["level"] == "model"
    store.close()
    (s,) = analyze([str(other)], cfg)["series"]
    b = s["baseline"]
    assert b["used"] and b["key"] == coarse and b["level"] == "model" and b["series"] == 5
    assert "this model, any station" in b["text"] and b["judgement"]["noise"] == "normal"

    # reset one station, then the model, then everything
    r = _medqc("calibrate", "--config", _site(tmp_path, state), "--reset", "--key", CHEST_KEY.replace("|?|", "|CT-B|"))
    assert r.returncode == 0 and "removed 2 series" in r.stdout, r.stdout + r.stderr
    (s,) = analyze([str(other)], cfg)["series"]
    assert not s["baseline"]["used"] and "0 of 5" in s["baseline"]["text"] and "3 for this model" in s["baseline"]["text"]
    r = _medqc("calibrate", "--config", _site(tmp_path, state), "--reset", "--key", "NO|SUCH|KEY")
    assert r.returncode == 2 and "no series stored under" in r.stderr
    r = _medqc("calibrate", "--config", _site(tmp_path, state), "--reset", "--key", coarse)
    assert r.returncode == 0 and "removed 3 series" in r.stdout
    show = json.loads(_medqc("calibrate", "--config", _site(tmp_path, state), "--show", "--json").stdout)
    assert show["baselines"] == []
    assert _medqc("calibrate", "--state-dir", state).returncode == 2  # nothing to do: a usage error


# ------------------------------------------------------------------------------- the agent learns
def _wait_port(port: int, proc, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the agent exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the agent did not listen")


def _agent_round(tmp: Path, state: Path, port: int, send: list[Path], n: int, learn_on: bool = True) -> list[dict]:
    """Start a real medqc agent, C-STORE ``send`` with DCMTK's storescu, wait for ``n`` verdicts, stop it."""
    storescu = dcmtk("storescu")
    if not storescu:
        from conftest import missing_peer

        missing_peer("DCMTK storescu is not installed (.ci/run installs it)")
    cfg = tmp / f"agent-{time.time_ns()}.toml"
    cfg.write_text("[series]\nidle_timeout_s = 0.5\n[spool]\nmin_free_mb = 0\n[http]\nenabled = false\n"
                   f"[checks]\ncentering_tolerance_mm = 100.0\n[baselines]\nlearn = {'true' if learn_on else 'false'}\n")
    out = tmp / f"out-{time.time_ns()}.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--port", str(port), "--state-dir", str(state),
                             "--config", str(cfg), "--backend", "onnxruntime"],
                            stdout=open(out, "w"), stderr=open(out.with_suffix(".log"), "w"),
                            env=dict(os.environ, TCP_NODELAY="1", MEDQC_LOG_LEVEL="INFO"))
    try:
        _wait_port(port, proc)
        for d in send:
            r = subprocess.run([storescu, "-aec", "MEDQC", "+sd", "+r", "-nh", "127.0.0.1", str(port), str(d)],
                               capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))
            assert r.returncode == 0, r.stderr
        # each series' last verdict, once it covers every slice sent (a slow machine can let the idle timeout judge
        # a series before all its slices arrived; the agent judges it again when they do)
        want = sorted(len([f for f in Path(d).rglob("*") if f.is_file() and f.suffix != ".json"]) for d in send)
        end = time.time() + 90
        while time.time() < end:
            last = {}
            for x in out.read_text().splitlines():
                if '"event":"series"' in x:
                    e = json.loads(x)
                    last[e["series_instance_uid"]] = e
            series = list(last.values())
            if len(series) >= n and sorted(e["slices"] for e in series) == want:
                break
            time.sleep(0.2)
        assert len(series) >= n, out.with_suffix(".log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    return series


def test_the_agent_learns_from_its_passed_series_and_keeps_them_across_a_restart(chest, tmp_path):
    from conftest import free_port

    state = tmp_path / "state"
    first = _agent_round(tmp_path, state, free_port(), chest["learn"], len(LEARN))
    assert [s["verdict"] for s in first] == ["pass"] * len(LEARN)
    db = sqlite3.connect(state / "baselines.sqlite")
    rows = db.execute("SELECT key, slices, noise_sd_2mm_p50 FROM baseline_series").fetchall()
    db.close()
    assert len(rows) == len(LEARN) and {r[0] for r in rows} == {CHEST_KEY} and all(r[1] == 8 for r in rows)
    assert sorted(round(r[2]) for r in rows) == [14, 14, 15, 16, 19]

    # a new agent process on the same state: judged against what the first one learned (learning off: the
    # clean section would be learned, the noisy one never)
    _agent_round(tmp_path, state, free_port(), [chest["clean"], chest["noisy"]], 2, learn_on=False)
    db = sqlite3.connect(state / "medqc.sqlite")
    reports = [json.loads(r[0]) for r in db.execute("SELECT report FROM series")]
    db.close()
    noisy = _series({"series": reports}, chest["noisy_truth"]["series_instance_uid"])
    clean = [s for s in reports if s["series_instance_uid"] not in {noisy["series_instance_uid"]}
             and s["baseline"].get("used") and s["baseline"]["judgement"]["noise"] == "normal"]
    assert clean and clean[0]["verdict"] == "pass" and clean[0]["baseline"]["series"] == len(LEARN)
    (f,) = _open(noisy, "noise.index")
    assert f["details"]["raised_by"] == "baseline" and noisy["baseline"]["key"] == CHEST_KEY
    assert noisy["verdict"] == "warn"


# ------------------------------------------------- the ring level of a scanner, on the series tracker
def _ring_series(uid: str, ring_hu: float, n: int = 20):
    """A series of ``n`` slices 5 mm apart with this ring contrast on every slice, scored as the agent scores a
    slice when the network's ring head is off (the classical evidence alone, ``fusion.fuse``)."""
    from medqc.analysis import fusion

    out = []
    for i in range(n):
        info = SliceInfo(f"{uid}.{i}", uid, "1.2.3", "1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1,
                         position=(0.0, 0.0, -5.0 * i), orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.7, 0.7),
                         rows=512, cols=512, modality="CT", slice_thickness=5.0, manufacturer="ACME",
                         manufacturer_model="RINGY 1", station_name="CT9", convolution_kernel="B30")
        m = {"ring_contrast_hu": ring_hu, "noise_sd_2mm": 20.0, "noise_ratio": 20.0 / 30.0, "skull_ring": 0.0}
        out.append(SliceResult(info=info, scores=fusion.fuse({}, m), measures=m))
    return out


def test_ring_within_the_scanners_normal_is_not_raised_and_one_over_it_is(tmp_path):
    from medqc.agent.series import SeriesTracker

    cfg = load_config()
    store = Baselines(tmp_path / "b.sqlite")
    # a scanner whose passed series read 3.0-3.4 HU of ring contrast (under the generic 4 HU): learned
    tr = SeriesTracker(cfg, {}, baselines=store)
    for k, ring in enumerate((3.0, 3.1, 3.2, 3.3, 3.4)):
        for r in _ring_series(f"9.{k}", ring):
            tr.add(r)
        st, _ = tr.complete(f"9.{k}", "idle")
        assert st.verdict == "pass", [f.check for f in st.findings.values()]
        ok, why = baselines.learnable(st)
        assert ok, why
        store.learn(st.scanner["key"], st.uid, st.scanner["stats"])
    # 4.5 HU on every slice: the generic level raises a ring (without a baseline, here too) ...
    plain = SeriesTracker(cfg, {})
    streamed = [f.check for r in _ring_series("9.50", 4.5) for f in plain.add(r)]
    assert "artifact.ring" in streamed
    # ... which is this scanner's normal (limit 3.4 + 2 HU): not raised while streaming, nor at the verdict
    streamed = [f.check for r in _ring_series("9.51", 4.5) for f in tr.add(r)]
    assert "artifact.ring" not in streamed
    st, _ = tr.complete("9.51", "idle")
    assert st.verdict == "pass" and st.baseline["used"] and st.baseline["judgement"]["ring"] == "normal"
    assert math.isclose(st.baseline["ring_limit_hu"], 3.38 + 2.0, abs_tol=0.01)
    # 9 HU: over the limit — raised, and the baseline supports it
    for r in _ring_series("9.52", 9.0):
        tr.add(r)
    st, _ = tr.complete("9.52", "idle")
    f = st.findings["9.52/artifact.ring"]
    assert f.severity in ("warning", "critical") and f.details["baseline"]["supports"] and st.baseline["judgement"]["ring"] == "high"
    assert not baselines.learnable(st)[0]


def test_a_store_measured_with_another_ring_definition_forgets_its_ring_figures_and_keeps_its_noise(tmp_path, caplog):
    """The ring contrast is measured another way (the circles a displayed field's edges cut are read too): a
    store learned with the earlier measure, or before the measure was recorded, forgets its ring figures and
    keeps its noise figures."""
    from medqc.analysis.ring import RING_MEASURE

    path = tmp_path / "b.sqlite"
    key = ScannerKey("V", "M", "S1", "K", "<=5mm", "body")
    _store_learned_then(path, key, "DELETE FROM baseline_meta WHERE k='ring_measure'")  # before it was recorded
    with caplog.at_level("WARNING", logger="medqc.baselines"):
        again = Baselines(path, min_series=2)
    assert again.ring_forgotten == 3 and again.noise_forgotten == 0 and "ring figures are forgotten" in caplog.text
    b = again.lookup(key)
    assert b.series == 3 and not b.ring_usable and b.ring_p90_hu is None
    assert b.noise_usable and b.noise_sd_2mm_hu == pytest.approx(13.0)
    db = sqlite3.connect(path)
    assert db.execute("SELECT v FROM baseline_meta WHERE k='ring_measure'").fetchone()[0] == RING_MEASURE
    db.close()
    assert Baselines(path, min_series=2).ring_forgotten == 0  # recorded now: nothing more forgotten
