#!/usr/bin/env python3
"""Per-slice evaluation of the scores the agent decides on (network + classical detectors, fused), on
synthetic slices from seeds that no shipped model trained on.

    .venv/bin/python bench/evaluate_slices.py [--n 1500] [--seed 31337] [--bundle DIR] [--workers 2]
                                              [--out bench/results/slice-eval]

The model card's validation table scores the *network* alone. The agent does not use the network alone:
for the classes the bundle ships switched off it uses only the classical detectors, for metal the maximum of
network and classical evidence, for noise a noisy-OR (``medqc.analysis.fusion.fuse``), and it drops network
artifact scores on slices thicker than the bundle's domain. This script runs exactly that path
(``medqc.agent.infer.Inferer``: the shared preprocessing, the runner, ``measures.measure`` and ``fuse``)
on slices from ``medqc.synth.training.sample_training_slices`` with a header built the way the study
writer builds one (vendor kernel names, DataCollectionDiameter, ReconstructionDiameter, display centre in
ImagePositionPatient), and reports per class: AUROC and sensitivity at 95 % specificity of the fused score,
of the network alone and of the classical evidence alone, plus sensitivity and specificity at the
threshold the agent's checks use. Labels as in training: positive when the generator's severity is
>= 0.1, negative when it is 0 (fainter slices are not scored for that class).

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
POS_SEVERITY = 0.1


def _chunk(args: tuple[int, int, int]):
    """Slices ``start .. start+n-1`` of ``sample_training_slices(seed)`` (its per-slice function and RNG)."""
    from medqc.synth.training import _one

    seed, start, n = args
    return [_one(np.random.default_rng([int(seed), i, 0x5EED]), 0.5, seed, i) for i in range(start, start + n)]


def slice_info(ts, k: int):
    """The header the study writer would give this slice (``medqc.synth.dicomio.write_slice``)."""
    from medqc.agent.records import SliceInfo
    from medqc.synth.study import VENDORS

    m = ts.meta
    vendor = VENDORS[(m["seed"] * 7 + m["index"]) % len(VENDORS)]
    M = ts.hu.shape[0]
    dpx = m["fov_mm"] / M
    cx, cy = m["center_mm"]
    ipp = (cx - (M - 1) / 2 * dpx, cy - (M - 1) / 2 * dpx, -float(m["region_ref_mm"]))
    return SliceInfo(sop_instance_uid=f"2.25.{k}", series_instance_uid="2.25.1", study_instance_uid="2.25.2",
                     sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                     position=ipp, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=tuple(ts.pixel_spacing),
                     slice_thickness=float(m["thickness_mm"]), rows=M, cols=ts.hu.shape[1], kvp=float(m["kvp"]),
                     reconstruction_diameter=float(m["fov_mm"]), data_collection_diameter=min(500.0, float(m["sfov_mm"])),
                     convolution_kernel=vendor["kernels"][m["kernel"]], manufacturer=vendor["manufacturer"])


def _metrics(y: np.ndarray, s: np.ndarray, thr: float | None) -> dict:
    from medqc.models.metrics import auroc, sensitivity_at, specificity_at, threshold_at_specificity

    d = {"n_pos": int(y.sum()), "n_neg": int((1 - y).sum())}
    if d["n_pos"] == 0 or d["n_neg"] == 0:
        return d
    d["auroc"] = round(float(auroc(y, s)), 4)
    t95 = threshold_at_specificity(y, s, 0.95)
    d["sens_at_95_spec"] = round(float(sensitivity_at(y, s, t95)), 3)
    if thr is not None:
        d["threshold"] = thr
        d["sens_at_thr"] = round(float(sensitivity_at(y, s, thr)), 3)
        d["spec_at_thr"] = round(float(specificity_at(y, s, thr)), 3)
    return d


def evaluate(n: int, seed: int, bundle_dir: str | None, workers: int) -> dict:
    from medqc import ARTIFACTS
    from medqc.analysis import airstreaks
    from medqc.analysis import fusion, noise
    from medqc.agent.infer import Inferer
    from medqc.bundle import load_bundle

    t0 = time.time()
    step = 25
    jobs = [(seed, s, min(step, n - s)) for s in range(0, n, step)]
    slices = []
    with ProcessPoolExecutor(workers) as ex:
        for part in ex.map(_chunk, jobs):
            slices.extend(part)
            print(f"\rgenerated {len(slices)}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_gen = time.time() - t0

    bundle = load_bundle(bundle_dir)
    inf = Inferer(bundle, "onnxruntime")
    thr = bundle.check_thresholds
    rows = []
    t1 = time.time()
    for b in range(0, len(slices), 16):
        items = [(slice_info(ts, b + j), ts.hu.astype(np.float32)) for j, ts in enumerate(slices[b:b + 16])]
        for (info, _), ts, r in zip(items, slices[b:b + 16], inf.run(items)):
            rows.append({"sev": ts.artifacts, "scores": r.scores or {}, "measures": r.measures or {},
                         "classical": {**fusion.classical_probs(r.measures or {}),
                                       "motion": airstreaks.evidence((r.measures or {}).get("air_dark_hu", math.nan))},
                         "noise_sigma_2mm": (ts.meta.get("physics") or {}).get("noise_sigma_2mm"),
                         "pos": r.position_ref_mm,
                         "true_pos": ts.position_ref_mm, "kernel": info.convolution_kernel, "thickness": ts.meta["thickness_mm"],
                         "error": r.error})
        print(f"\ranalysed {len(rows)}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    # the network alone (every class, before drops): one more pass through the runner on the same inputs
    from medqc.runners.base import infer_slices

    o = infer_slices(inf.runner, [(ts.hu, ts.pixel_spacing, None) for ts in slices], bundle.preprocess)
    net_probs = list(1.0 / (1.0 + np.exp(-np.clip(np.asarray(o["artifact_logits"], np.float64), -60, 60))))
    inf.close()
    t_inf = time.time() - t1

    res: dict = {"schema": "medqc.slice-eval/1", "n": len(rows), "seed": seed, "bundle": bundle.name,
                 "bundle_version": bundle.version, "network_off": list(bundle.network_off),
                 "check_thresholds": thr, "seconds_generate": round(t_gen, 1), "seconds_analyse": round(t_inf, 1),
                 "classes": {}}
    labels = list(bundle.labels)
    for c in ARTIFACTS:
        sev = np.array([r["sev"].get(c, 0.0) for r in rows])
        keep = (sev == 0) | (sev >= POS_SEVERITY)
        y = (sev[keep] >= POS_SEVERITY).astype(int)
        fused = np.array([r["scores"].get(c, 0.0) for r in rows])[keep]
        cl_raw = np.array([r["classical"].get(c, math.nan) for r in rows])[keep]
        judged = np.isfinite(cl_raw)
        entry = {"agent": _metrics(y, np.nan_to_num(fused, nan=0.0), thr.get(c)),
                 "network": _metrics(y, np.array([p[labels.index(c)] for p in net_probs])[keep], None) if c in labels else None,
                 "classical": _metrics(y, np.nan_to_num(cl_raw, nan=0.0), None) if judged.any() else None,
                 "classical_judged": _metrics(y[judged], cl_raw[judged], None) if judged.any() else None,
                 "judged_fraction": round(float(judged.mean()), 3) if judged.size else None,
                 "source": ("classical" if c in bundle.network_off else
                            "network + classical" if c in fusion.CLASSICAL_CLASSES else
                            "network + air streaks" if c == "motion" else "network")}
        if c == "noise":  # sharp kernels are judged against a higher level (σ there is mostly the kernel)
            soft = np.array([not noise.sharp_kernel(r["kernel"]) for r in rows])[keep]
            entry["agent_smooth_kernels"] = _metrics(y[soft], np.nan_to_num(fused, nan=0.0)[soft], thr.get(c))
            entry["agent_sharp_kernels"] = _metrics(y[~soft], np.nan_to_num(fused, nan=0.0)[~soft], thr.get(c))
        res["classes"][c] = entry
    res["noise_measure"] = noise_measure_summary(rows)
    err = np.array([abs(r["pos"] - r["true_pos"]) for r in rows if r["pos"] is not None and r["true_pos"] is not None])
    res["position"] = {"n": int(err.size), "median_mm": round(float(np.median(err)), 1),
                       "p90_mm": round(float(np.percentile(err, 90)), 1)} if err.size else None
    return res


def noise_measure_summary(rows: list[dict]) -> dict | None:
    """How ``noise_sd_2mm`` reads the simulated σ at 2 mm at the body centre: the median and 5–95 % of their ratio,
    on every measured slice and on those with no other artifact (metal streaks and rings read as noise)."""
    def ratios(sel):
        v = np.array([r["measures"]["noise_sd_2mm"] / r["noise_sigma_2mm"] for r in sel
                      if r.get("noise_sigma_2mm") and math.isfinite(r["measures"].get("noise_sd_2mm", math.nan))])
        return ({"n": int(v.size), "median": round(float(np.median(v)), 2), "p5": round(float(np.percentile(v, 5)), 2),
                 "p95": round(float(np.percentile(v, 95)), 2)} if v.size else None)

    every = ratios(rows)
    if every is None:
        return None
    alone = ratios([r for r in rows if not any(v > 0 for k, v in r["sev"].items() if k != "noise")])
    return {"all": every, "no_other_artifact": alone}


def markdown(res: dict) -> str:
    from medqc.analysis import noise

    L = ["# Per-slice evaluation of the agent's scores (`bench/evaluate_slices.py`)", "",
         f"{res['n']} synthetic slices (`medqc.synth.training`, seed {res['seed']}: no shipped model trained on it), "
         f"bundle {res['bundle']} {res['bundle_version']}; classes switched off in the network: "
         f"{', '.join(res['network_off']) or 'none'}. Positive: generator severity >= {POS_SEVERITY}; negative: 0.", "",
         "| class | agent's source | n pos / neg | **AUROC (agent)** | sens @ 95 % spec | threshold | sens / spec @ thr | "
         "AUROC network alone | AUROC classical alone (judged fraction) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for c, e in res["classes"].items():
        a = e["agent"]
        if "auroc" not in a:
            continue
        net = e["network"]["auroc"] if e.get("network") and "auroc" in e["network"] else "—"
        cl = e["classical"]["auroc"] if e.get("classical") and "auroc" in e["classical"] else "—"
        L.append(f"| {c} | {e['source']} | {a['n_pos']} / {a['n_neg']} | **{a['auroc']:.3f}** | {a['sens_at_95_spec']:.2f} | "
                 f"{a.get('threshold', float('nan')):.3g} | {a.get('sens_at_thr', float('nan')):.2f} / "
                 f"{a.get('spec_at_thr', float('nan')):.2f} | {net} | {cl} ({e.get('judged_fraction')}) |")
    nz = res["classes"].get("noise", {}).get("agent_smooth_kernels")
    if nz and "auroc" in nz:
        L += ["", f"Noise on slices with smooth or standard kernels: AUROC {nz['auroc']:.3f}, sensitivity at 95 % "
              f"specificity {nz['sens_at_95_spec']:.2f}, at the threshold {nz['sens_at_thr']:.2f} / {nz['spec_at_thr']:.2f} "
              f"({nz['n_pos']} / {nz['n_neg']})."]
    ns = res["classes"].get("noise", {}).get("agent_sharp_kernels")
    if ns and "auroc" in ns:
        L += ["", f"Noise on slices with sharp kernels (judged against up to {noise.SHARP_NOISE_FACTOR:g} × the level in a trunk "
              "as far as their noise has the kernel's fine grain, "
              f"{noise.SHARP_HEAD_NOISE_FACTOR:g} × inside a skull): AUROC {ns['auroc']:.3f}, sensitivity / specificity at the threshold {ns['sens_at_thr']:.2f} / "
              f"{ns['spec_at_thr']:.2f} ({ns['n_pos']} / {ns['n_neg']})."]
    nm = res.get("noise_measure")
    if nm:
        a, b = nm["all"], nm.get("no_other_artifact")
        L += ["", f"`noise_sd_2mm` against the simulated σ at 2 mm at the body centre: median ratio {a['median']} (5–95 %: "
              f"{a['p5']}–{a['p95']}, n = {a['n']})"
              + (f"; {b['median']} ({b['p5']}–{b['p95']}, n = {b['n']}) on slices without another artifact." if b else ".")]
    if res.get("position"):
        p = res["position"]
        L += ["", f"Position (network, per slice): median |error| {p['median_mm']} mm, p90 {p['p90_mm']} mm (n = {p['n']}). "
              "The landmarks the coverage checks use are located per series (robust fit + lung / pelvis / skull "
              "anchors): see `bench/results/series-eval*.md`."]
    L += ["", f"Generation {res['seconds_generate']} s, analysis {res['seconds_analyse']} s on this machine.", ""]
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "slice-eval"))
    a = ap.parse_args()
    if a.n < 50:
        ap.error("--n must be at least 50")
    res = evaluate(a.n, a.seed, a.bundle, a.workers)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
