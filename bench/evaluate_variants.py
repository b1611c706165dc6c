#!/usr/bin/env python3
"""Acquisition variants of the real CT: do the shipped operating points hold on another matrix, a targeted
field, thicker slices, a store that clips CT numbers low, a feet-first or a prone layout?

    .venv/bin/python bench/evaluate_variants.py [DIR ...] [--variants matrix-256,fov-0.5,...] [--quick]
                                                [--severities 0.4,0.7,1.0] [--kinds ...] [--block 24] [--every 8]
                                                [--cache ~/.cache/medqc-real-eval] [--out bench/results]
                                                [--name real-variants] [--no-progress]

The studies are those of ``bench/evaluate_real.py`` (``$MEDQC_REAL_CT``; the cone-beam Catphan is left out:
its rings are no acquisition variant). Every diagnostic series, clean and with each artifact injected
(``evaluate_real``'s units, injections and cache: ``medqc synth --inject`` on the original, the variant derived
from the injected study), is turned into each variant of ``medqc.synth.variants`` and analysed by the pipeline
``medqc analyze`` runs, at the shipped operating point. The variant studies are written to a temporary folder
in the cache and removed once analysed (a 1024² variant of every injected study takes ~10 GB).

Reported per variant: the findings on the clean variant series (any severity, critical; false artifact
findings), per class the per-slice AUROC and sensitivity / specificity at the threshold (patients; the head
phantom in a table of its own), how the noise, ring and air measures of each clean slice move against the
same slice of the unmodified original, and per injected block whether its finding is raised. A slice of a
``thick-K`` variant carries the mean of its sources' injected severities. Writes ``<out>/<name>.json`` and
``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate_real as er  # noqa: E402

from medqc.synth import variants as V  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIFT_MEASURES = ("noise_sd_2mm", "noise_ratio", "ring_contrast_hu", "air_dark_hu")


def variants_version() -> str:
    return hashlib.sha256(Path(V.__file__).read_bytes()).hexdigest()[:12]


def sources_of(folders: list[Path]) -> dict[str, dict]:
    """{variant SOP: {"path": its file, "sources": [source SOPs]}} over ``folders``."""
    m: dict[str, dict] = {}
    for f in folders:
        for sop, v in json.loads((f / "sources.json").read_text()).items():
            m[sop] = {"path": f / v["file"], "sources": v["sources"]}
    return m


def truncation_in_picture(injected: Path, clean: Path) -> float:
    """The injected truncation's severity as the variant's picture shows it: the share of the patient inside the
    displayed circle that the narrowed scan field replaced by its outside value (tissue over -400 HU in the clean
    variant, -1000 HU or less in the injected one), on the injector's scale (``truncation_severity``). A
    targeted field that lies inside the scan field shows no truncation: 0."""
    import numpy as np

    from medqc.synth.training import truncation_severity

    a, b = V.hu_of(_read(injected)), V.hu_of(_read(clean))
    if a.shape != b.shape:
        return 0.0
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w]
    disc = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) <= min(h, w) / 2
    body = disc & (b > -400.0)
    cut = body & (a <= -1000.0)
    return truncation_severity(float(cut.sum()) / max(int(body.sum()), 1))


@functools.lru_cache(maxsize=4096)
def _ring_peak(injected: Path, clean: Path) -> float:
    """The largest magnitude of the injected slice less its clean one, on ~2 mm pixels (``noise.pool_2mm``) inside
    the displayed circle: the injected ring pattern's peak as this picture shows it. Cached: every targeted
    variant compares against the same original."""
    import numpy as np

    from medqc.analysis.noise import pool_2mm

    da, db = _read(injected), _read(clean)
    d = V.hu_of(da) - V.hu_of(db)
    got = pool_2mm(d, float(da.PixelSpacing[0]), float(da.PixelSpacing[1])) if d.ndim == 2 else None
    if got is None:
        return 0.0
    d = np.abs(got[0])
    yy, xx = np.mgrid[0:d.shape[0], 0:d.shape[1]]
    disc = np.hypot(yy - (d.shape[0] - 1) / 2, xx - (d.shape[1] - 1) / 2) <= min(d.shape) / 2 - 1
    return float(d[disc].max()) if disc.any() else 0.0


def ring_in_picture(injected: Path, clean: Path, injected_orig: Path, clean_orig: Path, severity: float) -> float:
    """The injected ring's severity as the variant's picture shows it: a targeted field shows only the rings whose
    radius lies inside it. The ring pattern is the injected slice less its clean one (the injection adds it to
    the clean pixels); its peak (``_ring_peak``), in the variant over the original, scales the original's ring
    amplitude (``ring_target``), turned back into a severity on the injector's scale (``ring_severity``). 0 where
    the field shows none of it."""
    from medqc.synth.training import ring_severity, ring_target

    orig = _ring_peak(injected_orig, clean_orig)
    if orig <= 0.0 or severity < 0.05:
        return severity
    return ring_severity(ring_target(severity) * min(1.0, _ring_peak(injected, clean) / orig))


def _read(p: Path):
    import pydicom

    return pydicom.dcmread(str(p))


def _mean(v: list[float]) -> float | None:
    v = [x for x in v if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def variant_records(report: dict, srcmap: dict[str, dict], base: dict[str, dict], variant: str,
                    clean_file: dict[str, Path] | None = None,
                    orig_files: dict[str, tuple[Path, Path]] | None = None) -> list[dict]:
    """Per-slice records of a variant's report, each shaped as ``evaluate_real``'s (its labels apply): the
    fields of the source record (one source, or the mean truth of several), this slice's scores and
    measures, and ``base``: the source records' measures and scores for the shifts. ``clean_file``
    (original SOP → the clean variant's file): for a targeted field, truncation's truth is what the picture
    shows of it (``truncation_in_picture``), and so is a ring's (``ring_in_picture``; ``orig_files``: injected
    SOP → its file and its clean original's)."""
    out = []
    for s in report["series"]:
        for r in s["per_slice"]:
            entry = srcmap.get(r["sop_instance_uid"])
            srcs = entry["sources"] if entry else None
            if r.get("error") or not srcs:
                continue
            bs = [base[x] for x in srcs if x in base]
            if not bs:
                continue
            b0 = bs[0]
            truth: dict[str, float] = {}
            for b in bs:
                for k, v in b["truth"].items():
                    truth[k] = truth.get(k, 0.0) + v / len(bs)
            real = {}
            for b in bs:
                real.update(b["real"])
            if (clean_file is not None and variant.startswith("fov-") and b0["variant"] == "truncation"
                    and b0["sop"] in clean_file):
                truth["truncation"] = truncation_in_picture(entry["path"], clean_file[b0["sop"]])
            if (clean_file is not None and orig_files and variant.startswith("fov-") and b0["variant"] == "ring"
                    and len(srcs) == 1 and b0["sop"] in clean_file and srcs[0] in orig_files):
                truth["ring"] = ring_in_picture(entry["path"], clean_file[b0["sop"]], *orig_files[srcs[0]],
                                                truth.get("ring", 0.0))
            rec = dict(b0)
            rec.update({"truth": truth, "real": real, "changed": any(b["changed"] for b in bs),
                        "series": s["series_instance_uid"], "z": r["z"], "instance": r["instance_number"],
                        "scores": r["scores"], "measures": {k: r["measures"].get(k) for k in er.RECORD_MEASURES},
                        "acq_variant": variant, "n_sources": len(bs),
                        "base_measures": {k: _mean([b["measures"].get(k) for b in bs]) for k in SHIFT_MEASURES},
                        "base_scores": {k: _mean([float(b["scores"].get(k) or 0.0) for b in bs]) for k in b0["scores"]}})
            out.append(rec)
    return out


def shifts(recs: list[dict]) -> dict:
    """Over the clean slices of a variant: per measure, the variant's value against the original's (ratio for
    σ and the noise ratio, difference in HU for ring contrast and air streaks; quantiles), and each class's
    score over the same slices."""
    import numpy as np

    clean = [r for r in recs if r["variant"] == "clean"]
    out: dict = {"slices": len(clean)}
    for k in SHIFT_MEASURES:
        pairs = [(r["measures"].get(k), r["base_measures"].get(k)) for r in clean]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        if k in ("noise_sd_2mm", "noise_ratio"):
            v = np.array([a / b for a, b in pairs if b > 0])
            what = "ratio"
        else:
            v = np.array([a - b for a, b in pairs])
            what = "difference"
        vals = np.array([a for a, _ in pairs])
        out[k] = {"n": int(v.size), "what": what,
                  **({"median": round(float(np.median(v)), 3), "p10": round(float(np.percentile(v, 10)), 3),
                      "p90": round(float(np.percentile(v, 90)), 3),
                      "variant_max": round(float(vals.max()), 3)} if v.size else {})}
    return out


def clean_max_scores(recs: list[dict], thr: dict) -> dict:
    clean = [r for r in recs if r["variant"] == "clean"]
    return {c: {"max": round(max((float(r["scores"].get(c) or 0.0) for r in clean if c not in r["real"]), default=0.0), 3),
                "over": sum(float(r["scores"].get(c) or 0.0) >= thr[c] for r in clean if c not in r["real"])}
            for c in thr}


def series_clean_rows(report: dict, srcmap: dict, idx: dict, real_by_sop: dict) -> list[dict]:
    """``evaluate_real.series_clean`` on a variant report: its SOPs looked up through their sources."""
    vidx, vreal = {}, {}
    for sop, e in srcmap.items():
        srcs = e["sources"]
        h = idx.get(srcs[0])
        if h is not None:
            vidx[sop] = h
            r = {}
            for x in srcs:
                r.update(real_by_sop.get(x, {}))
            if r:
                vreal[sop] = r
    return er.series_clean(report, vidx, vreal)


def injected_series_rows(report: dict, jobs: list, folder_of: dict, variant_series: dict) -> list[dict]:
    """Per injected unit: is its finding raised on the variant series (``evaluate_real.series_injected``)?"""
    series = {}
    for s in report["series"]:
        series[s["series_instance_uid"]] = s
    sel, by = [], {}
    for j in jobs:
        uid = variant_series.get(str(folder_of.get(j.out.name)))
        if uid in series:
            by[j.truth["series_instance_uid"]] = series[uid]
            sel.append(j)
    return er.series_injected(sel, by)


def coverage_rows(variant: str | None, cases: list, vroot: Path, cfg, backend: str, progress: bool) -> list[dict]:
    """``bench/coverage_cases.py``'s real chest cases (the Philips patient: complete, cut, no lung, neck,
    abdomens) as ``variant`` shows them (None: as they are): the coverage checks raised against the expected."""
    import pydicom

    folders = {}
    if variant is not None and variant.startswith("fov-"):  # a field already targeted is not narrowed again
        cases = [c for c in cases if "displayed field" not in c[0] and "mm field" not in c[0]]
    for name, folder, expected in cases:
        if variant is None:
            folders[name] = folder
            continue
        out = vroot / "coverage" / Path(folder).name
        V.write_variant(V.read_series_of(sorted(Path(folder).glob("*.dcm"))), out, variant, tag="coverage")
        folders[name] = out
    uid_of = {str(pydicom.dcmread(str(sorted(Path(f).glob("*.dcm"))[0]), stop_before_pixels=True).SeriesInstanceUID): n
              for n, f in folders.items()}
    rep = er.run_pipeline(list(folders.values()), cfg, None, backend, progress)
    rows = []
    for s in rep["series"]:
        name = uid_of.get(s["series_instance_uid"])
        if name is None:
            continue
        expected = next(e for n, _, e in cases if n == name)
        got = {f["check"] for f in s["findings"] if f["check"].startswith("coverage.") and f["check"] != "coverage.overscan"
               and not (f.get("details") or {}).get("resolved")}
        rows.append({"case": name, "expected": sorted(expected), "got": sorted(got), "ok": got == expected,
                     "verdict": s["verdict"], "slices": s["slices"],
                     "geometry": sorted(f["check"] for f in s["findings"] if f["check"].startswith("geometry."))})
    return rows


def evaluate(dirs: list[Path], variants: list[str], kinds: list[str], severities: list[float], block: int, every: int,
             cache: Path, backend: str, progress: bool, seed: int = 0) -> dict:
    import dataclasses

    from medqc import ARTIFACTS
    from medqc.config import load_config

    t0 = time.time()
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, enabled=False))
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    thr, bundle_info = er.operating_point(cfg, None)
    idx = er.header_index(dirs)
    clean = er.run_pipeline(dirs, cfg, None, backend, progress)
    # the diagnostic series only (the cone-beam series is no acquisition of a diagnostic scanner)
    clean["series"] = [s for s in clean["series"]
                       if s["per_slice"] and idx.get(s["per_slice"][0]["sop_instance_uid"], {}).get("cone_beam") is False]
    units = er.pick_units(clean, idx, block, every)
    jobs = er.plan_jobs(units, kinds, severities, seed, cache)
    er.run_injections(jobs, cache, 2, progress)
    inj = er.run_pipeline([j.out for j in jobs], cfg, None, backend, progress) if jobs else {"series": []}
    real = er.real_artifacts(clean, idx)
    base = {r["sop"]: r for r in er.clean_records(clean, idx, real)}
    irecs, iseries = er.injected_records(inj, jobs, idx, real)
    # injected records keyed by the injected SOP (the records carry the source's SOP)
    inj_sop, orig_files = {}, {}
    by_unit_sop = {(r["unit"], r["variant"], r["severity"], r["sop"]): r for r in irecs}
    for j in jobs:
        for t in j.truth["slices"]:
            r = by_unit_sop.get((j.unit.uid, j.artifact, j.severity, t["source_sop_instance_uid"]))
            if r is not None:
                inj_sop[t["sop_instance_uid"]] = r
                orig_files[t["sop_instance_uid"]] = (j.out / t["file"], idx[t["source_sop_instance_uid"]]["path"])

    def summary(recs: list[dict], rows_clean: list[dict], rows_inj: list[dict]) -> dict:
        pat = [r for r in recs if "phantom" not in r["study"].lower()]
        ph = [r for r in recs if "phantom" in r["study"].lower()]
        return {
            "slices": {"clean": sum(r["variant"] == "clean" for r in recs), "injected": sum(r["variant"] != "clean" for r in recs)},
            "classes_patients": {c: er.class_metrics(pat, c, thr[c], severities) for c in ARTIFACTS},
            "classes_phantom": {c: er.class_metrics(ph, c, thr[c], severities) for c in ARTIFACTS} if ph else {},
            "per_scanner": {sc: {c: er.class_metrics([r for r in pat if r["scanner"] == sc], c, thr[c], severities)
                                 for c in ARTIFACTS} for sc in sorted({r["scanner"] for r in pat})},
            "clean_max_scores": clean_max_scores(pat, thr),
            "series_clean": rows_clean, "series_clean_summary": er.clean_summary(rows_clean),
            "series_clean_summary_patients": er.clean_summary([r for r in rows_clean if "phantom" not in r["study"].lower()]),
            "series_injected_summary": er.injected_summary(rows_inj),
        }

    import coverage_cases

    cov_tmp = tempfile.TemporaryDirectory(prefix="medqc-variants-")
    cases = coverage_cases.chest_cases(Path(cov_tmp.name))
    orig_recs = list(base.values()) + irecs
    results = {"original": summary(orig_recs, er.series_clean(clean, idx, real), er.series_injected(jobs, iseries))}
    results["original"]["shifts"] = None
    results["original"]["coverage"] = coverage_rows(None, cases, cache, cfg, backend, progress)
    series_src = {}
    for s in clean["series"]:
        series_src[s["series_instance_uid"]] = [r["sop_instance_uid"] for r in s["per_slice"] if r["sop_instance_uid"] in idx]
    vver = variants_version()
    # a targeted field is centred on the clean series' trunk, for its injected copies too (an artifact such as a
    # narrowed scan field moves the trunk's box: the crops would not match)
    centres = {uid: V.trunk_centre(V.read_series_of([idx[x]["path"] for x in sops])) for uid, sops in series_src.items()}
    timing = {}
    for v in variants:
        tv = time.time()
        vroot = Path(tempfile.mkdtemp(prefix=f".variant-{v}-", dir=str(cache)))  # removed once analysed
        # clean: each diagnostic series of the originals (its files, read again in head-first order)
        cfolders = []
        for uid, sops in series_src.items():
            key = hashlib.sha256("/".join(sorted(er.file_sha256(idx[x]["path"]) for x in sops)).encode()).hexdigest()[:20]
            got = V.write_variant(V.read_series_of([idx[x]["path"] for x in sops]), vroot / f"clean-{key}", v, tag="clean",
                                  centre=centres.get(uid))
            if got is not None:
                cfolders.append(got)
        ifolders, folder_of = [], {}
        for j in jobs:
            got = V.write_variant(V.read_series_of(sorted(p for p in j.out.iterdir() if p.suffix == ".dcm")),
                                  vroot / j.out.name, v, tag=j.out.name, centre=centres.get(j.unit.series))
            if got is not None:
                ifolders.append(got)
                folder_of[j.out.name] = got
        t_build = time.time() - tv
        crep = er.run_pipeline(cfolders, cfg, None, backend, progress)
        irep = er.run_pipeline(ifolders, cfg, None, backend, progress) if ifolders else {"series": []}
        csrc, isrc = sources_of(cfolders), sources_of(ifolders)
        clean_file = {e["sources"][0]: e["path"] for e in csrc.values() if len(e["sources"]) == 1}
        recs = variant_records(crep, csrc, base, v) + variant_records(irep, isrc, inj_sop, v, clean_file, orig_files)
        vs = {}  # the variant series UID of each folder, from its first file
        import pydicom

        for f in ifolders:
            first = sorted(f.glob("*.dcm"))[0]
            vs[str(f)] = str(pydicom.dcmread(str(first), stop_before_pixels=True).SeriesInstanceUID)
        rows_clean = series_clean_rows(crep, csrc, idx, real)
        rows_inj = injected_series_rows(irep, jobs, folder_of, vs)
        res = summary(recs, rows_clean, rows_inj)
        res["coverage"] = coverage_rows(v, cases, vroot, cfg, backend, progress)
        shutil.rmtree(vroot, ignore_errors=True)
        # a targeted field that lies inside the scan field shows none of the injected truncation: not expected
        pos: dict[tuple, int] = {}
        for r in recs:
            if r["variant"] != "clean" and r["truth"].get(r["variant"], 0.0) >= er.POS_SEVERITY:
                key = (r["unit"], r["variant"], r["severity"])
                pos[key] = pos.get(key, 0) + 1
        for row in rows_inj:
            row["positive_slices"] = pos.get((row["unit"], row["kind"], row["severity"]), 0)
            row["expected"] = row["expected"] and row["positive_slices"] > 0
        res["series_injected_summary"] = er.injected_summary(rows_inj)
        res["shifts"] = shifts(recs)
        res["shifts_by_scanner"] = {sc: shifts([r for r in recs if r["scanner"] == sc])
                                    for sc in sorted({r["scanner"] for r in recs})}
        results[v] = res
        timing[v] = {"build_s": round(t_build, 1), "total_s": round(time.time() - tv, 1)}
        if progress:
            print(f"{v}: {timing[v]}", file=sys.stderr)
    cov_tmp.cleanup()
    return {"schema": "medqc.real-variants/1", "backend": backend, "bundle": bundle_info, "thresholds": thr,
            "kinds": kinds, "severities": severities, "block": block, "every": every, "seed": seed,
            "injector": er.injector_version(), "variants_code": vver, "variants": variants,
            "jobs": len(jobs), "injected_slices": sum(len(j.unit.files) for j in jobs),
            "seconds": {"total": round(time.time() - t0, 1), "per_variant": timing}, "results": results}


# ------------------------------------------------------------------------------------------------ output
_f, _pct = er._f, er._pct  # the real-CT evaluation's number formats, shared


def markdown(res: dict) -> str:
    from medqc import ARTIFACTS

    R = res["results"]
    names = list(R)
    patients = sorted({r["study"] for v in names for r in R[v]["series_clean"] if "phantom" not in r["study"].lower()})
    sev = ", ".join(f"{s:g}" for s in res["severities"])
    L = ["# Acquisition variants of the real CT (`bench/evaluate_variants.py`)", ""]
    if res.get("command"):
        L += [f"`{res['command']}`", ""]
    L += [f"Code {res.get('code', '?')}; backend {res['backend']}; bundle {res['bundle'].get('version', '?')}; "
          f"variants code {res['variants_code']}; injector {res['injector']}; kinds {', '.join(res['kinds'])} at "
          f"severities {sev}; blocks of {res['block']}, every {res['every']}th slice outside them; "
          f"{res['jobs']} injected studies ({res['injected_slices']} slices), each turned into every variant; "
          f"run time {res['seconds']['total']:.0f} s. Thresholds: "
          + ", ".join(f"{c} {t:.3g}" for c, t in res["thresholds"].items()) + ".", "",
          "Each variant is derived from the reconstructed images (`medqc/synth/variants.py`): `matrix-N` resampled "
          "to N² (area averaging down, band-limited up; resampling a reconstruction is not reconstructing on another "
          "matrix: the noise grain stays the 512² one, which at 2 mm, where noise and air are read, differs "
          "little), `fov-F` a targeted displayed field of F × the original round the trunk's middle, back on the "
          "same matrix (a crop, never truncation), `thick-K` K consecutive slices averaged (series of ≥ K slices "
          "only), `clip-H` a store that keeps CT numbers up to H HU (every pixel over it written as H, as the real "
          "Philips chest's store does at 2,976), `feet-first` the gantry-frame feet-first layout (columns mirrored, IOP −1\\0\\0\\0\\1\\0, FFS, "
          "numbered from the feet), `prone` rotated 180° (IOP −1\\0\\0\\0\\−1\\0, HFP). Injected variants are "
          "derived from the injected original (`medqc synth --inject`), so an artifact goes through the same "
          "resampling, cropping or averaging as the anatomy.", "",
          f"## Clean series: findings (patients: {', '.join(patients)})", "",
          "| variant | series | findings (any) | per 10 series | warning+critical | critical | false artifact findings | "
          "slices over a threshold (metal / motion / ring / noise / truncation) |", "|---|---|---|---|---|---|---|---|"]
    for v in names:
        cs = R[v]["series_clean_summary_patients"]
        over = " / ".join(str(R[v]["clean_max_scores"][c]["over"]) for c in ARTIFACTS)
        L.append(f"| {v} | {cs['series']} | {cs['findings_any_severity']} | {cs['per_10_series']['any_severity']} | "
                 f"{cs['findings_warning_or_critical']} | {cs['findings_critical']} | **{cs['false_artifact_findings']}** | {over} |")
    L += ["", "## Per slice at the shipped operating point (patients): sensitivity · AUROC", "",
          "Sensitivity over the injected slices at every severity; specificity over the clean slices in the next "
          "table.", "", "| variant | " + " | ".join(ARTIFACTS) + " |", "|---|" + "---|" * len(ARTIFACTS)]
    for v in names:
        cells = []
        for c in ARTIFACTS:
            m = R[v]["classes_patients"][c]
            cells.append(f"{_pct(m['sens_at_thr'])} · {_f(m['auroc'])} ({m['n_pos']})")
        L.append(f"| {v} | " + " | ".join(cells) + " |")
    L += ["", "Specificity on the clean slices (patients), and the highest clean score:", "",
          "| variant | " + " | ".join(ARTIFACTS) + " |", "|---|" + "---|" * len(ARTIFACTS)]
    for v in names:
        cells = [f"{_pct(R[v]['classes_patients'][c]['spec_clean_at_thr'])} (max {R[v]['clean_max_scores'][c]['max']:.2f})"
                 for c in ARTIFACTS]
        L.append(f"| {v} | " + " | ".join(cells) + " |")
    L += ["", "## How the measures move (clean slices, against the same slices of the original)", "",
          "σ at 2 mm and the noise ratio as variant / original (median, 10th–90th percentile); ring contrast and the "
          "air's dark streaks as variant − original in HU; a thick slice against the mean of its sources.", "",
          "| variant | scanner | slices | σ 2 mm | noise ratio | ring contrast (HU) | air streaks (HU) |", "|---|---|---|---|---|---|---|"]
    for v in names[1:]:
        for sc, sh in R[v]["shifts_by_scanner"].items():
            if "phantom" in sc.lower() or "Ingenuity" in sc:
                continue

            def cell(k):
                m = sh[k]
                return "—" if not m.get("n") else f"{m['median']:.2f} ({m['p10']:.2f}–{m['p90']:.2f})"
            L.append(f"| {v} | {sc} | {sh['slices']} | {cell('noise_sd_2mm')} | {cell('noise_ratio')} | "
                     f"{cell('ring_contrast_hu')} | {cell('air_dark_hu')} |")
    L += ["", "## Injected blocks: finding raised (series level, patients and phantom)", "",
          "| variant | " + " | ".join(ARTIFACTS) + " |", "|---|" + "---|" * len(ARTIFACTS)]
    for v in names:
        cells = []
        for c in ARTIFACTS:
            rows = [r for r in R[v]["series_injected_summary"] if r["kind"] == c and r["unit_kind"] == "block"]
            n, f = sum(r["series"] for r in rows), sum(r["found"] for r in rows)
            cells.append(f"{f}/{n}" if n else "—")
        L.append(f"| {v} | " + " | ".join(cells) + " |")
    L += ["", "## Coverage on the real chest's cases (`bench/coverage_cases.py`) as each variant shows them", "",
          "| variant | cases right | wrong (expected → got) | geometry findings |", "|---|---|---|---|"]
    for v in names:
        rows = R[v].get("coverage") or []
        bad = [f"{r['case']}: {r['expected']} → {r['got']}" for r in rows if not r["ok"]]
        geo = [f"{r['case']}: {', '.join(r['geometry'])}" for r in rows if r["geometry"]]
        L.append(f"| {v} | {sum(r['ok'] for r in rows)} of {len(rows)} | {'<br>'.join(bad) or '—'} | "
                 f"{'<br>'.join(geo) or '—'} |")
    L += ["", "## Head phantom (secondary: plastic, no anatomy, no soft tissue for noise)", "",
          "| variant | findings on its clean series | " + " | ".join(f"{c} sens · AUROC" for c in ARTIFACTS) + " |",
          "|---|---|" + "---|" * len(ARTIFACTS)]
    for v in names:
        ph = R[v]["classes_phantom"]
        fs = [f"{f['severity']} {f['check']}" for r in R[v]["series_clean"] if "phantom" in r["study"] for f in r["findings"]]
        cells = [f"{_pct(ph[c]['sens_at_thr'])} · {_f(ph[c]['auroc'])}" if ph else "—" for c in ARTIFACTS]
        L.append(f"| {v} | {'; '.join(fs) or '—'} | " + " | ".join(cells) + " |")
    L += ["", "## Findings on the clean variant series", ""]
    for v in names:
        rows = [(r, f) for r in R[v]["series_clean"] for f in r["findings"]]
        L.append(f"**{v}**: " + ("none." if not rows else ""))
        for r, f in rows:
            name = (r["files"][0] if r.get("files") else r["study"])
            L.append(f"- {r['study']} ({name}, {r['slices']} slices): {f['severity']} `{f['check']}` — {f['message']}")
        L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    from medqc import ARTIFACTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", metavar="DIR")
    ap.add_argument("--variants", default=",".join(V.VARIANTS))
    ap.add_argument("--quick", action="store_true", help="severity 0.7, blocks of 6, no single slices from long series")
    ap.add_argument("--severities", type=er._floats, default=None)
    ap.add_argument("--kinds", default=",".join(ARTIFACTS))
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--every", type=int, default=None)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--cache", type=Path, default=er.DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    vs = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in vs if v not in V.VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(V.VARIANTS)}")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    sev = a.severities or list(er.QUICK_SEVERITIES if a.quick else er.SEVERITIES)
    block = a.block if a.block is not None else (er.QUICK_BLOCK if a.quick else er.BLOCK)
    every = a.every if a.every is not None else (er.QUICK_EVERY if a.quick else er.EVERY)
    dirs = [Path(d) for d in a.dirs] if a.dirs else er.default_studies(a.cache)
    res = evaluate(dirs, vs, kinds, sev, block, every, a.cache, a.backend, progress=not a.no_progress)
    res["code"] = er.code_label()
    res["command"] = " ".join(["bench/evaluate_variants.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or ("real-variants-quick" if a.quick else "real-variants")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
