"""medqc bench --quick: the whole harness runs, and every section either ran or says why it was skipped."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import missing_peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("storescp", "agent_receive", "agent_full", "agent_full_nofsync", "inference", "naive", "scaling")


def _check_section(name: str, sec: dict) -> None:
    assert sec["status"] in ("ran", "skipped", "failed"), (name, sec)
    if sec["status"] == "ran":
        assert sec["slices_per_s"] > 0 and sec["wall_s"] > 0, (name, sec)
    else:
        assert isinstance(sec.get("reason"), str) and len(sec["reason"]) > 10, (name, sec)


def test_quick_bench_runs_and_explains_every_section(tmp_path, tiny_bundle):
    out = tmp_path / "results"
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING", TCP_NODELAY="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "medqc", "bench", "--quick", "--out", str(out), "--bundle", str(tiny_bundle)],
                       capture_output=True, text=True, timeout=180, env=env)
    elapsed = time.time() - t0
    assert r.returncode in (0, 1), r.stderr
    files = sorted(p.name for p in out.iterdir())
    jsons = [p for p in out.iterdir() if p.suffix == ".json"]
    assert len(jsons) == 1, files
    res = json.loads(jsons[0].read_text())
    stem = jsons[0].stem
    assert stem.endswith("-quick") and {f"{stem}.png", f"{stem}.md"} <= set(files)
    assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert res["schema"] == "medqc.bench/1" and res["quick"] is True
    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and "python" in m["versions"] and m["label"] in stem
    assert res["study"]["size"] == 512 and 2 <= res["study"]["slices"] <= 64
    assert res["bundle"]["name"] == "tiny-test"
    for name in SECTIONS:
        assert name in res["sections"], name
        if name == "inference":
            inf = res["sections"]["inference"]
            from medqc.runners import BACKENDS

            assert set(BACKENDS) <= set(inf)
            for b, sec in inf.items():
                _check_section(f"inference:{b}", sec)
            # ONNX Runtime CPU is a runtime dependency: it must have run on the tiny bundle
            assert inf["onnxruntime"]["status"] == "ran"
            dp = res["sections"]["decode_preprocess"]
            assert dp["status"] == "ran" and dp["decode_ms_p50"] > 0 and dp["geometry_ms_p50"] >= 0
        else:
            _check_section(name, res["sections"][name])
    # the storescp ceiling needs only DCMTK (.ci/run installs it)
    if not dcmtk("storescp"):
        missing_peer("storescp (dcmtk) is not installed (.ci/run installs it)")
    assert res["sections"]["storescp"]["status"] == "ran", res["sections"]["storescp"]
    assert res["sections"]["storescp"]["slices"] == res["study"]["slices"]
    # failures are reported in the exit status
    failed = [k for k, v in res["sections"].items() if v.get("status") == "failed"]
    assert (r.returncode == 1) == bool(failed or any(v.get("status") == "failed" for v in res["sections"]["inference"].values()))
    # the table: one row per section (and per backend), ratios to (a) where both ran
    keys = [row["key"] for row in res["table"]]
    assert keys[0] == "a" and keys[-1] == "f" and "e" in keys and keys.count("d") == len(res["sections"]["inference"]) + ("decode_preprocess" in res["sections"])
    for row in res["table"]:
        if row["slices_per_s"] and res["sections"]["storescp"]["status"] == "ran":
            assert abs(row["x_storescp"] - row["slices_per_s"] / res["sections"]["storescp"]["slices_per_s"]) < 0.02 * row["x_storescp"] + 0.01
    assert set(res["targets"]) == {"full_pipeline_slices_per_s", "cpu_ms_per_analysed_slice", "p95_slice_to_result_ms_at_60",
                                   "p95_slice_to_result_ms_at_120", "last_slice_to_verdict_s", "onnxruntime_vs_naive_torch"}
    assert "storescp" in r.stdout and "targets:" in r.stdout
    full = res["sections"]["agent_full"]
    # the agent is part of this install: it must start, and its figures come with it
    assert full["status"] == "ran", full
    assert full["slices_analysed"] == res["study"]["slices"] and full["verdict"] in ("pass", "warn", "fail")
    # CPU of the agent, its receiver process and its analysis workers from receiving to verdict: some, and no
    # more than the cores could give over that time (the wait for the verdict adds up to a second of polling)
    cpu_s = full["cpu_ms_per_slice"] * full["slices"] / 1e3
    assert 0 < cpu_s <= (full["wall_s"] + 2.0) * os.cpu_count(), (cpu_s, full["wall_s"])

    assert res["targets"]["cpu_ms_per_analysed_slice"]["value"] == full["cpu_ms_per_slice"]
    lat = full["latency_at_60"]
    assert lat["status"] == "ran", lat
    assert lat["slice_to_result_ms"]["n"] == lat["slices"] and lat["last_slice_to_verdict_s"]["n"] == 1
    assert res["targets"]["p95_slice_to_result_ms_at_60"]["value"] == lat["slice_to_result_ms"]["p95"]
    lat120 = full["latency_at_120"]
    assert lat120["status"] == "ran" and lat120["rate"] == 120.0, lat120
    assert res["targets"]["p95_slice_to_result_ms_at_120"]["value"] == lat120["slice_to_result_ms"]["p95"]
    # (f) analysis alone with 0, 1, ..., cores workers; the ratio to one worker
    sc = res["sections"]["scaling"]
    assert sc["status"] == "ran", sc
    ws = [row["workers"] for row in sc["rows"]]
    assert ws[:2] == [0, 1] and ws[-1] == m["cores"] and sc["slices"] >= 240
    one = next(row for row in sc["rows"] if row["workers"] == 1)
    assert one["x_one_worker"] == 1.0 and all(row["slices_per_s"] > 0 and row["verdict"] for row in sc["rows"])
    assert "analysis.workers" in (out / f"{stem}.md").read_text()
    assert "inference backend onnxruntime" in (out / f"{stem}.md").read_text()
    assert "Resident memory at its end: agent" in (out / f"{stem}.md").read_text()
    assert res["sections"]["agent_receive"]["status"] == "ran"
    # the backend the agent's workers ran (auto on a box without a GPU: ONNX Runtime on the CPU), as its /healthz says
    assert full["backend"] == "onnxruntime", full.get("backend")
    # scripts/gpu-check's pipeline step reads these same figures out of the bench's result on a GPU box
    summary = runpy.run_path(str(ROOT / "scripts" / "gpu-check"))["pipeline_summary"](res)
    got = summary["agent_full"]
    assert got["backend"] == "onnxruntime" and got["slices_per_s"] == full["slices_per_s"]
    assert got["cpu_ms_per_slice"] == res["targets"]["cpu_ms_per_analysed_slice"]["value"]
    assert got["p95_slice_to_result_ms_at_60"] == res["targets"]["p95_slice_to_result_ms_at_60"]["value"]
    assert got["p95_slice_to_result_ms_at_120"] == res["targets"]["p95_slice_to_result_ms_at_120"]["value"]
    assert got["last_slice_to_verdict_s_at_60"] is not None
    assert got["last_slice_to_verdict_s_at_60"] == lat["last_slice_to_verdict_s"]["max"]
    assert summary["scaling"] == sc["rows"] and summary["targets"] == res["targets"]
    # resident memory of the agent and its child processes (the receiver, one worker at least, the resource tracker)
    rss = full["rss_mib"]
    assert rss["agent"] > 30 and len(rss["children"]) >= 2 and rss["children"][0] > 30, rss
    assert abs(rss["total"] - rss["agent"] - sum(rss["children"])) < 0.5 and got["rss_mib"] == rss
    assert elapsed < 90, f"--quick took {elapsed:.0f} s"


def test_process_tree_cpu_counts_children_and_grandchildren():
    """CPU per analysed slice sums the whole tree (agent, receiver process, analysis workers): a grandchild
    (a shell's child) that burns a second of CPU is counted under this process while it lives."""
    from medqc.tools.bench.harness import descendants, process_tree_cpu_s

    burn = f"{sys.executable} -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(30)'"
    before = process_tree_cpu_s(os.getpid())
    shell = subprocess.Popen(["/bin/sh", "-c", burn + "; true"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            kids = descendants(os.getpid())
            if len(kids) >= 2 and process_tree_cpu_s(os.getpid()) - before >= 0.9:
                break
            time.sleep(0.1)
        assert shell.pid in kids and len(kids) >= 2  # the shell and its python
        assert process_tree_cpu_s(os.getpid()) - before >= 0.9
    finally:
        for pid in [*descendants(shell.pid), shell.pid]:  # the shell's python, then the shell
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, 9)
        shell.wait(10)


def test_bench_usage_errors(tmp_path):
    for args in (["--only", "xyz"], ["--slices", "1"], ["--bundle", str(tmp_path / "nope")], ["--workers", "many"]):
        r = subprocess.run([sys.executable, "-m", "medqc", "bench", "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert "error" in r.stderr


def test_extend_series_repeats_with_fresh_uids_and_continuing_positions(tmp_path):
    import pydicom

    from medqc.tools.bench.study import extend_series, write_phantom_series

    src = write_phantom_series(tmp_path / "src", 3, size=64)
    out = extend_series(src, tmp_path / "out", 7)
    dss = [pydicom.dcmread(str(p)) for p in out]
    assert len({d.SOPInstanceUID for d in dss}) == 7
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, 8))
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert all(abs((b - a) - (z[1] - z[0])) < 1e-6 for a, b in zip(z, z[1:])) and z[1] != z[0]
    assert all(int(d.ImagesInAcquisition) == 7 for d in dss)
    assert all(d.PixelData == pydicom.dcmread(str(src[i % 3])).PixelData for i, d in enumerate(dss))
