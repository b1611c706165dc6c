"""The technologist console, end to end in a real browser.

A real agent (pynetdicom receiver, pipeline with a tiny real ONNX model and the classical detectors,
SQLite store) receives a ``medqc synth`` head study with metal slices and a short scan range from DCMTK
``storescu``; Debian's chromium, driven by Playwright, watches the console page. The strip, the coverage
bar and the findings must appear without a reload, the metal finding must carry a thumbnail, and the
acknowledgement must reach the store. A screenshot is written to the test's tmp folder (and to
``$MEDQC_CONSOLE_SCREENSHOT`` when set)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import free_port, missing_peer, need_module, run_ok  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---- unit-level: thumbnails, coverage view, privacy ----------------------------------------------------
def test_thumbnail_is_a_windowed_png():
    import cv2

    from medqc.agent.console import thumbnail_png
    from medqc.agent.records import SliceInfo

    hu = np.full((512, 512), -1000.0, np.float32)
    hu[100:400, 100:400] = 40.0  # soft tissue → mid grey in the brain window
    hu[240:260, 240:260] = 3000.0  # metal → white
    info = SliceInfo("1.2.3", "1.2", "1", "1.2.840.10008.5.1.4.1.1.2", body_part="HEAD")
    png = thumbnail_png(hu, info)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 40000
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (192, 192)
    assert img[5, 5] == 0 and img[96, 96] == 255 and 110 <= img[60, 60] <= 145


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("console-study") / "head"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "20", "--matrix", "128",
          "--artifact", "metal:0.9@8-12", "--short-top", "40", "--seed", "7", "--no-progress", str(out)], timeout=300)
    return out


@pytest.fixture
def agent(tiny_bundle, tmp_path):
    from medqc.agent.console import serve
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "inference.backend": "onnxruntime", "series.idle_timeout_s": 2.0, "sinks.stdout.enabled": False})
    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    # the agent's own HTTP server mounts the console; without the HTTP API module it serves the console alone
    own = a.http is None
    server = serve(cfg, a, bind=f"127.0.0.1:{free_port()}") if own else a.http
    try:
        yield cfg, a, server
    finally:
        if own:
            server.close()
        a.stop(5.0)


def _send(study: Path, port: int) -> None:
    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    files = sorted(str(p) for p in study.glob("*.dcm"))
    run_ok([storescu, "-aet", "CT_TEST", "-aec", "MEDQC", "127.0.0.1", str(port), *files],
         env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)


def test_console_api_privacy_and_ack(agent, study):
    cfg, a, server = agent
    base = f"http://127.0.0.1:{server.port}"
    _send(study, cfg.dicom.port)
    deadline, snap = time.time() + 60, None
    while time.time() < deadline:
        snap = json.load(urllib.request.urlopen(base + "/api/console/state", timeout=5))
        if snap["series"] and snap["series"][0]["verdict"]:
            break
        time.sleep(0.3)
    (s,) = snap["series"]
    assert s["verdict"] in ("warn", "fail") and s["n_slices"] == 20 and len(s["slices"]) == 20
    text = json.dumps(snap)
    assert "SYNTH" not in text.upper() or "patient_name" not in s  # no patient name by default
    assert "patient_name" not in s and s["short_uid"].startswith("…")
    checks = {f["check"]: f for f in s["findings"]}
    assert "artifact.metal" in checks and "coverage.top" in checks, list(checks)
    metal = checks["artifact.metal"]
    assert metal["thumbnail"] is not None
    png = urllib.request.urlopen(base + metal["thumbnail"]["url"], timeout=5).read()
    assert png[:4] == b"\x89PNG"
    cov = s["coverage"]
    assert cov["start"] == "vertex" or cov["required_mm"][0] < cov["scanned_mm"][0]
    assert cov["missing_top_mm"] > 20, cov
    # acknowledgement: who/when stored
    fid = urllib.parse.quote(metal["id"], safe="")  # ids are "<series>/<check>[/<key>]"
    req = urllib.request.Request(base + f"/api/findings/{fid}/ack", data=json.dumps({"who": "AB"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    rec = json.load(urllib.request.urlopen(req, timeout=5))
    assert rec["who"] == "AB" and abs(rec["at"] - time.time()) < 60
    stored = a.store.get_series(s["uid"])["acknowledgements"]
    assert [x["who"] for x in stored] == ["AB"]
    # bad input: clear errors
    for body, code in ((b"{}", 400), (b"not json", 400)):
        r = urllib.request.Request(base + f"/api/findings/{fid}/ack", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(r, timeout=5)
        assert e.value.code == code
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(base + "/api/findings/nope/ack", data=b'{"who":"x"}', method="POST"), timeout=5)
    assert e.value.code == 404


def test_console_live_in_chromium(agent, study, tmp_path):
    if not Path(CHROMIUM).exists():
        missing_peer("Debian chromium is not installed (.ci/run installs it)")
    sync_api = need_module("playwright.sync_api", "pip install playwright (no browser download needed)")
    cfg, a, server = agent
    url = f"http://127.0.0.1:{server.port}/"
    shot = tmp_path / "console.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_selector("#empty")
            page.wait_for_function("document.querySelector('#conn').classList.contains('on')", timeout=10000)
            t_send = time.time()
            _send(study, cfg.dicom.port)  # after the page loaded: everything below arrives live
            page.wait_for_selector("section.series .strip .mark", timeout=15000)
            t_first = time.time() - t_send
            page.wait_for_function("document.querySelectorAll('section.series .strip .mark').length === 20", timeout=30000)
            page.wait_for_selector("li.finding[data-check='artifact.metal'] img.thumb", timeout=30000)
            page.wait_for_selector("li.finding[data-check='coverage.top']", timeout=30000)
            page.wait_for_selector("section.series .verdict:not(.open)", timeout=30000)
            meta = page.inner_text("section.series .meta")  # the patient's size and dose, from the verdict on
            assert "SSDE" in meta and "Dw" in meta and "CTDIvol" in meta, meta
            marks = page.eval_on_selector_all("section.series .strip .mark", "els => els.map(e => [e.className, e.dataset.kind, e.title])")
            assert sum("s2" in c for c, _, _ in marks) >= 3, marks
            assert any(k == "metal" and "metal" in t for c, k, t in marks if "s2" in c), marks
            cov = page.inner_text("section.series .covtext")
            assert "missing" in cov and "top" in cov, cov
            assert page.locator("section.series .cov .lm").count() >= 3
            assert page.locator("section.series .cov .miss").count() >= 1
            # unacknowledged critical findings raise the banner; the page never reloaded
            crit = page.locator("li.finding.critical").count()
            assert page.is_visible("#alert") == (crit > 0)
            if crit:
                assert page.inner_text("#alert").startswith("⚠")
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
            page.fill("#who", "TS")
            page.dispatch_event("#who", "change")
            page.click("li.finding[data-check='artifact.metal'] button.ack")
            page.wait_for_selector("li.finding[data-check='artifact.metal'] .acked", timeout=10000)
            assert "TS" in page.inner_text("li.finding[data-check='artifact.metal'] .acked")
            page.screenshot(path=str(shot), full_page=True)
            assert all(r.startswith(f"http://127.0.0.1:{server.port}/") or r.startswith("data:") for r in requests), requests
        finally:
            browser.close()
    assert shot.stat().st_size > 20000
    if os.environ.get("MEDQC_CONSOLE_SCREENSHOT"):
        shutil.copy(shot, os.environ["MEDQC_CONSOLE_SCREENSHOT"])
    print(f"first mark {t_first:.2f} s after storescu started; screenshot {shot}")
    assert t_first < 10


def test_strip_in_table_order_for_a_series_sent_out_of_order(tmp_path):
    """A tilted head series with metal (injected on slices 8-19, found on a run around them), its files sent
    by storescu in a shuffled order: the strip runs head to feet by each slice's position along the (tilted)
    stack normal, so the metal run is one block of marks at its place in the table, not marks scattered by
    the network's position estimate or the arrival order."""
    import random

    import pydicom

    if not Path(CHROMIUM).exists():
        missing_peer("Debian chromium is not installed (.ci/run installs it)")
    sync_api = need_module("playwright.sync_api", "pip install playwright (no browser download needed)")
    study = tmp_path / "tilted"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "24", "--matrix", "128", "--tilt", "20",
          "--artifact", "metal:0.9@8-19", "--seed", "5", "--no-progress", str(study)], timeout=300)
    files = sorted(study.glob("*.dcm"))
    random.Random(3).shuffle(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [int(h.InstanceNumber) for h in headers] != sorted(int(h.InstanceNumber) for h in headers)

    def along_normal(h):  # position along the slice normal, + towards the head
        r, c = np.array(h.ImageOrientationPatient[:3], float), np.array(h.ImageOrientationPatient[3:], float)
        n = np.cross(r, c)
        return float(np.dot(np.array(h.ImagePositionPatient, float), n if n[2] > 0 else -n))

    table_order = [int(h.InstanceNumber) for h in sorted(headers, key=lambda h: -along_normal(h))]
    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    # the bundled model: the network's position estimates are there (and wrong by millimetres to centimetres)
    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "series.idle_timeout_s": 2.0, "sinks.stdout.enabled": False})
    a = Agent(cfg, tmp_path / "state", None, "onnxruntime").start()
    server = a.http
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.querySelector('#conn').classList.contains('on')", timeout=10000)
            run_ok([storescu, "-aet", "CT_TEST", "-aec", "MEDQC", "127.0.0.1", str(cfg.dicom.port), *map(str, files)],
                 env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
            page.wait_for_selector("section.series .verdict:not(.open)", timeout=30000)
            page.wait_for_function("document.querySelectorAll('section.series .strip .mark').length === 24", timeout=30000)
            marks = page.eval_on_selector_all("section.series .strip .mark",
                                              "els => els.map(e => [e.className, e.dataset.kind, e.title])")
            page.screenshot(path=str(tmp_path / "strip.png"), full_page=True)
            (st,) = a.tracker.all()
        finally:
            browser.close()
            a.stop(5.0)
    shown = [int(t.split(" · ")[0].removeprefix("slice ")) for _, _, t in marks]
    assert shown == table_order, (shown, table_order)
    metal = [i for i, (c, k, _) in enumerate(marks) if "s2" in c and k == "metal"]
    assert metal and metal == list(range(metal[0], metal[-1] + 1)), marks  # one block, not scattered
    assert not [m for m in marks if "s2" in m[0] and m[1] != "metal"], marks
    (f,) = [f for f in st.findings.values() if f.check == "artifact.metal"]
    assert {shown[i] for i in metal} <= set(range(f.first_instance, f.last_instance + 1)), (metal, shown, f.message)


def test_console_privacy_opt_in_and_token(tiny_bundle, tmp_path, study):
    """Patient name only when the site opts in; with http.token the API needs the bearer (or ?token=)."""
    from medqc.agent.console import serve
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "series.idle_timeout_s": 1.0, "sinks.stdout.enabled": False,
                             "privacy.show_patient_identifiers": True, "http.token": "s3cret"})
    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    own = a.http is None
    server = serve(cfg, a, bind=f"127.0.0.1:{free_port()}") if own else a.http
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(base + "/", timeout=5).status == 200  # the page itself is public
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/api/console/state", timeout=5)
        assert e.value.code == 401
        _send(study, cfg.dicom.port)
        auth = urllib.request.Request(base + "/api/console/state", headers={"Authorization": "Bearer s3cret"})
        deadline = time.time() + 30
        while time.time() < deadline:
            snap = json.load(urllib.request.urlopen(auth, timeout=5))
            if snap["series"]:
                break
            time.sleep(0.2)
        import pydicom

        name = str(pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).PatientName).replace("^", " ").strip()
        assert name and snap["series"][0].get("patient_name") == name
        snap2 = json.load(urllib.request.urlopen(base + "/api/console/state?token=s3cret", timeout=5))
        assert snap2["series"][0]["uid"] == snap["series"][0]["uid"]
    finally:
        if own:
            server.close()
        a.stop(5.0)


def test_standalone_console_server_static_and_errors(tiny_bundle, tmp_path):
    """The console's own server (used when the HTTP API module is absent): page, assets, /healthz, and no
    way out of agent/static."""
    from medqc.agent.console import STATIC, serve
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.enabled": False,
                             "sinks.stdout.enabled": False})
    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    server = serve(cfg, a, bind=f"127.0.0.1:{free_port()}")
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert json.load(urllib.request.urlopen(base + "/healthz", timeout=5))["status"] == "ok"
        page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
        for ref in ("/static/console.js", "/static/console.css"):
            assert ref in page
            r = urllib.request.urlopen(base + ref, timeout=5)
            assert r.read() == (STATIC / ref.rsplit("/", 1)[1]).read_bytes()
        assert "http://" not in page and "https://" not in page  # offline: nothing from elsewhere
        assert "https://" not in (STATIC / "console.js").read_text() + (STATIC / "console.css").read_text()
        for bad in ("/static/..%2Fconsole.py", "/static/%2E%2Fx", "/static/nope.js", "/nothing"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + bad, timeout=5)
            assert e.value.code == 404, bad
        assert json.load(urllib.request.urlopen(base + "/api/console/state", timeout=5))["series"] == []
    finally:
        server.close()
        a.stop(5.0)
