"""Model card (markdown) from a training run's metrics dict (``metrics.json``)."""

from __future__ import annotations

import math
from pathlib import Path

LIMITATIONS = """\
- Trained only on physics-based **synthetic** CT (``medqc.synth``). Real scanners differ in
  reconstruction kernels, iterative reconstruction texture, beam hardening, scatter, patient anatomy and
  pathology; the synthetic validation figures are an upper bound, not a promise for real data.
- Thresholds were chosen on synthetic validation slices at a fixed specificity; on real data the false
  alarm rate per slice can differ. The agent aggregates per series, which damps single-slice errors.
- Position is a per-slice regression on the reference body scale (``medqc.analysis.anatomy``); the agent fits it
  robustly against slice z per series. It is meaningless on phantoms and outside the body range, and
  unusual anatomy (children, amputations, situs, post-surgical) was not modelled.
- Artifact labels are per slice: a slice counts as positive when the generator's severity for that class
  is at least the positive threshold given above; fainter artifacts are not scored.
- Not a medical device. It flags image-quality problems for a technologist to look at; it does not
  diagnose.
"""


def _f(v, nd=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{nd}f}"
    return str(v)


def _artifact_table(part: dict) -> list[str]:
    rows = ["| class | n pos | n neg | AUROC | sens @ 95 % spec | threshold | sens @ thr | spec @ thr |", "|---|---|---|---|---|---|---|---|"]
    for name, d in part.get("artifacts", {}).items():
        rows.append(
            f"| {name} | {d.get('n_pos')} | {d.get('n_neg')} | {_f(d.get('auroc'))} | {_f(d.get('sens_at_95spec'))} | "
            f"{_f(d.get('threshold'), 4)} | {_f(d.get('sensitivity'))} | {_f(d.get('specificity'))} |"
        )
    return rows


def _position_line(part: dict) -> str:
    p = part.get("position", {})
    if not p.get("n"):
        return "no slices with a position label"
    return (f"n = {p['n']}: median |error| {_f(p['median_abs_mm'], 1)} mm, mean |error| {_f(p['mean_abs_mm'], 1)} mm, "
            f"90th percentile {_f(p['p90_abs_mm'], 1)} mm, bias {_f(p['bias_mm'], 1)} mm")


def _augment_line(m: dict) -> str:
    a = m.get("augment")
    if not isinstance(a, dict):
        return "- Augmentation in training: random left-right mirroring."
    g, c, t = a["geometry"], a["calibration"], a["texture"]
    return (f"- Augmentation in training (models/augment.py): random left-right mirroring; geometry (p {g['p']}: rotation "
            f"±{g['rotation_deg']}°, scale {g['scale'][0]}–{g['scale'][1]}, shift ±{g['shift_mm']} mm); calibration (p {c['p']}: "
            f"water offset ±{c['water_offset_hu']} HU, gain ±{100 * c['gain']:.0f} %); texture (p {t['p']}: smoothing/sharpening, "
            f"added correlated noise {t['noise_hu'][0]}–{t['noise_hu'][1]} HU; {', '.join(t['labels_not_trained_when_applied'])} "
            "not trained on those slices).")


def render_card(m: dict) -> str:
    ort = m.get("ort_cpu", {})
    lines = [
        f"# Model card: {m.get('model')} ({m.get('version', 'medqc QC network')})",
        "",
        "Per axial CT slice: multi-label artifact scores (metal, motion, ring, noise, truncation) and the",
        "slice's craniocaudal position in reference mm below the vertex (``medqc.analysis.anatomy``).",
        "",
        "## Architecture",
        "",
        f"- `{m.get('model')}` {m.get('kwargs')}: two strided 3×3 convolutions, depthwise-separable inverted",
        "  residual blocks down to 1/32 resolution, global average + max pooling, two small MLP heads",
        "  (artifact logits; position / 1000, scaled back to mm inside the graph).",
        "- Input: HU slices and their geometry; the preprocessing runs inside the exported graph (`medqc.models.slice_input`,",
        "  parameters in the bundle manifest; the same module made the training cache): 2 mm pixels, 256², HU windows",
        "  (-160..240, -1000..1000, 0..3000) as channels plus the field-of-view mask.",
        f"- Parameters: {m.get('params'):,}; FLOPs per slice: {m.get('flops_per_slice', 0) / 1e9:.3f} G.",
        f"- ONNX Runtime CPU, {ort.get('threads', 2)} threads, batch {ort.get('batch', 16)}: "
        f"**{_f(ort.get('ms_per_slice'))} ms/slice** ({_f(ort.get('slices_per_s'), 0)} slices/s) on a {ort.get('cpu_count', '?')}-core machine"
        + (f" (error: {ort['error']})" if "error" in ort else "") + ".",
        *[f"- Shipped `{k}` file ({v.get('input', 'preprocessing + network')}), {v.get('threads', 2)} threads, batch "
          f"{v.get('batch', 1)}: {_f(v.get('ms_per_slice'))} ms/slice ({_f(v.get('slices_per_s'), 0)} slices/s)."
          for k, v in m.get("ort_cpu_shipped", {}).items()],
        "- Timings were taken on the shared 2-core development machine while other work ran; treat them as upper bounds.",
        "",
        "## Training data",
        "",
        f"- Generator: `medqc.synth.training.sample_training_slices` (physics-based synthetic CT), seed {m.get('seed')}.",
        f"- {m.get('n_train_generated')} slices generated, {m.get('n_train')} used for training after removing the",
        f"  held-out parameter ranges; validation: {m.get('n_val')} slices from held-out seeds, of which",
        f"  {m.get('n_val_heldout_params')} fall in held-out parameter ranges: `{'`, `'.join(m.get('holdout_rules', []))}`.",
        *([f"- Recipe (from the generator): {m['generator_doc']}"] if m.get("generator_doc") else []),
        *([f"- Generator version of the cached data: {m.get('generator_version') or 'untagged'}"
           f" (installed generator: {m.get('generator_version_installed') or 'untagged'})."] if "generator_version" in m else []),
        *([f"- Note: {m['data_note']}"] if m.get("data_note") else []),
        f"- Labels: artifact positive when the generator's severity >= {m.get('positive_at_severity')}, negative when it is 0;",
        "  fainter severities are neither trained nor scored for that class. Position: the generator's reference",
        "  body coordinate (slices without one do not train the position head).",
        _augment_line(m),
        *([f"- Real clean CT mixed into training as negatives (no position label, noise not trained on them): "
           f"{m['real_negatives']['slices']} slices, {100 * m['real_negatives']['batch_fraction']:.0f} % of each batch "
           f"({'; '.join(m['real_negatives']['series'])})."] if (m.get("real_negatives") or {}).get("slices") else []),
        *([f"- Real CT with artifacts injected (`medqc synth --inject`, labelled by its truth.json; no position label, "
           f"noise trained only where injected): {m['real_injected']['slices']} slices "
           f"({'; '.join(m['real_injected']['series'])}), drawn into the same "
           f"{100 * m['real_negatives']['batch_fraction']:.0f} % of each batch as the real clean slices."]
          if (m.get("real_injected") or {}).get("slices") else []),
        f"- Training label prevalence: {', '.join(f'{k} {v:.2f}' for k, v in m.get('train_label_prevalence', {}).items())}.",
        "",
        "### Randomised variations (from the generator's per-slice description)",
        "",
    ]
    summ = m.get("data_summary", {})
    if summ:
        lines += ["| parameter | range / values |", "|---|---|"]
        for k, d in summ.items():
            if "values" in d:
                desc = ", ".join(f"{v} ({n})" for v, n in d["values"].items())
            elif "min" in d:
                if d.get("distinct", 0) <= 1:
                    continue
                desc = f"{d['min']:.4g} … {d['max']:.4g} ({d['distinct']} distinct)"
            else:
                desc = f"{d.get('distinct')} distinct values"
            if "values" in d and len(d["values"]) <= 1:
                continue
            lines.append(f"| {k} | {desc} |")
    else:
        lines.append("(the generator gave no per-slice description)")
    hs = m.get("heldout_summary", {})
    rules = m.get("holdout_rules", [])
    if hs and rules:
        keys = [r.split(">")[0].split("<")[0].split("=")[0] for r in rules]
        rows = [(k, d) for k, d in hs.items() if k in keys]
        if rows:
            lines += ["", "Held-out validation slices (parameters excluded from training):", "", "| parameter | range / values |", "|---|---|"]
            for k, d in rows:
                desc = ", ".join(f"{v} ({n})" for v, n in d["values"].items()) if "values" in d else f"{d.get('min', 0):.4g} … {d.get('max', 0):.4g}"
                lines.append(f"| {k} | {desc} |")
    lines += [
        "",
        "## Optimisation",
        "",
        f"- AdamW, lr {m.get('lr')}, warm-up then cosine decay, batch {m.get('batch_size')}, {m.get('steps')} steps "
        f"({m.get('epochs')} epochs), device {m.get('device')}{' with AMP' if m.get('amp') else ''}.",
        "- Loss: BCE with logits (positive weight = negatives/positives, clipped to 1..5) + 0.5 × smooth L1 on",
        "  position / 100 mm (beta 0.5).",
        f"- Data generation {m.get('data_seconds')} s, optimisation {m.get('train_seconds')} s"
        + (" (schedule shortened to fit the time budget)" if m.get("schedule_shortened_by_time_budget") else "") + ".",
        "",
        "## Validation (synthetic, held-out seeds)",
        "",
        f"Thresholds are chosen per class at {m.get('threshold_specificity')} specificity on this validation set.",
        "",
    ]
    val = m.get("validation", {})
    titles = {"all": "All validation slices", "in_range": "Parameters inside the training ranges",
              "heldout_params": "Held-out phantom parameters (never seen in training)"}
    for key in ("all", "in_range", "heldout_params"):
        if key in val:
            lines += [f"### {titles[key]} (n = {val[key].get('n')})", ""] + _artifact_table(val[key]) + [
                "", f"Position: {_position_line(val[key])}.", ""]
    real = m.get("real_ct")
    lines += ["## Real CT", ""]
    if real:
        for r in real:
            lines.append(f"- **{r.get('name')}**: {r.get('summary')}")
    else:
        lines.append("Not evaluated in this run (see the shipped card in `models/cards/`).")
    files = m.get("bundle_files")
    if files:
        lines += ["", "## Shipped bundle (`models/default`)", "", "| file | precision | bytes | sha256 |", "|---|---|---|---|"]
        for k, f in files.items():
            lines.append(f"| {f.get('path')} | {f.get('precision', k)} | {m.get('bundle_bytes', {}).get(k, '?')} | `{str(f.get('sha256'))[:16]}…` |")
    dis = m.get("disabled_labels") or {}
    if dis:
        lines += ["", "**Switched off in the shipped bundle** (validation AUROC below the shipping minimum; threshold set to",
                  "0.9999): " + ", ".join(f"{k} (AUROC {v:.3f})" for k, v in dis.items()) + ". The agent drops the network's",
                  "score for these and decides them from the classical detectors alone where physics gives a signal",
                  "(noise, truncation, ring; docs/checks.md), at the classical threshold 0.5."]
    allv = m.get("validation", {}).get("all", {})
    if allv:
        met = [k for k, v in allv.get("artifacts", {}).items() if (v.get("auroc") or 0) >= 0.97]
        med = allv.get("position", {}).get("median_abs_mm")
        lines += ["", "## Targets (synthetic validation)", "",
                  f"- AUROC >= 0.97 per class: met for {', '.join(met) if met else 'no class'}; not met for "
                  f"{', '.join(k for k in allv.get('artifacts', {}) if k not in met) or 'none'}.",
                  f"- Median position error <= 10 mm: {'met' if med is not None and med <= 10 else 'not met'} ({_f(med, 1)} mm per slice)."]
    lines += ["", "## Chosen thresholds", "", "| class | probability threshold |", "|---|---|"]
    for k, v in m.get("thresholds", {}).items():
        lines.append(f"| {k} | {v:.4f} |")
    lines += ["", "## Limitations", "", LIMITATIONS]
    return "\n".join(lines) + "\n"


def write_card(path: Path, metrics: dict) -> Path:
    path = Path(path)
    path.write_text(render_card(metrics))
    return path
