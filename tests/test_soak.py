"""A one-minute soak (``medqc bench --soak 1 --senders 2``): two DCMTK storescu senders and one through a real
Orthanc router push fresh-UID copies of the real Philips chest series into a real ``medqc agent``; the
command's own checks (no failed C-STORE, nothing lost, each ACKed instance analysed once, RSS growth and
descriptors bounded) must all pass, and its JSON must show traffic on both paths. The agent keeps 3 series in
memory; the warm-up lasts until that window is full, so the growth measured after it is a leak's, not the
window's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REAL_CT, missing_peer, missing_real_ct  # noqa: E402

from medqc.tools.bench.soak import ORTHANC, STORESCU


def test_one_minute_soak_two_senders_and_an_orthanc_router(tmp_path):
    for exe in (STORESCU, ORTHANC):
        if not Path(exe).exists():
            missing_peer(f"{exe} is not installed (.ci/run installs it)")
    chest = REAL_CT.parent / "philips-bigbore-chest-patient"
    if not chest.is_dir():
        missing_real_ct(f"the real Philips chest series is not present at {chest} (set MEDQC_REAL_CT)")
    env = dict(os.environ, MEDQC_REAL_CT=str(REAL_CT.parent), TCP_NODELAY="1")
    r = subprocess.run([sys.executable, "-m", "medqc", "bench", "--soak", "1", "--senders", "2", "--keep-recent", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=env)
    files = {p.suffix for p in tmp_path.glob("soak-*")}
    assert files == {".json", ".png", ".md"}, (files, r.stderr[-3000:])
    res = json.loads(next(tmp_path.glob("soak-*.json")).read_text())
    failed = {k: v for k, v in res["checks"].items() if not v["ok"]}
    assert r.returncode == 0 and not failed, (r.returncode, failed, r.stderr[-3000:])
    assert res["payload"].startswith("philips-bigbore-chest-patient")
    assert res["cstores"]["failed"] == 0 and res["cstores"]["acked"] == res["cstores"]["attempted"] > 0
    assert res["per_sender"]["via-orthanc"]["acked"] > 0 and res["orthanc"]["held_at_end"] == 0
    assert all(v["acked"] > 0 for k, v in res["per_sender"].items() if k.startswith("direct-"))
    assert res["agent"]["analysed"] == res["cstores"]["distinct_acked_uids"] == res["agent"]["store_rows"]
    assert len(res["samples"]) > 30 and res["agent"]["rss_mib"]["peak"] > 0
    assert res["checks"]["rss_growth"]["warmup_end_s"] >= 15
