// medqc technologist console: live series over SSE, no framework, no external assets.
"use strict";
(function () {
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const q = token ? "?token=" + encodeURIComponent(token) : "";
  const series = new Map();   // uid -> view (slices accumulated)
  const alerted = new Set();  // critical finding ids already announced
  let settings = { sound: false, artifacts: [] };
  const $ = (sel, el) => (el || document).querySelector(sel);
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; };
  const who = $("#who");
  who.value = localStorage.getItem("medqc.who") || "";
  who.addEventListener("change", () => localStorage.setItem("medqc.who", who.value.trim()));
  setInterval(() => { $("#clock").textContent = new Date().toLocaleTimeString(); }, 1000);

  const NAMES = { metal: "metal", motion: "motion", ring: "ring", noise: "noise", truncation: "truncation" };

  function markClass(s, th) {
    if (s.error) return "mark err";
    if (!s.worst) return "mark s0";
    const t = (th && th[s.worst]) || 0.5;
    return "mark " + (s.score >= t ? "s2" : s.score >= 0.5 * t ? "s1" : "s0");
  }

  function markTitle(s) {
    const parts = ["slice " + (s.instance != null ? s.instance : s.k + 1)];
    if (s.error) parts.push("not analysable: " + s.error);
    else if (s.worst) parts.push(NAMES[s.worst] + " " + Math.round(100 * s.score) + "%");
    if (s.z != null) parts.push("z " + Math.round(s.z) + " mm");
    if (s.pos_mm != null) parts.push("~" + Math.round(s.pos_mm) + " mm below vertex");
    return parts.join(" · ");
  }

  function landmark(n) { return n.replace(/_/g, " "); }

  function coverageEl(c) {
    const box = el("div");
    box.appendChild(el("div", "label", "Coverage — " + c.rule + ": " + landmark(c.start) + " → " + landmark(c.end)));
    const bar = el("div", "cov");
    const [lo, hi] = c.scale_mm, span = Math.max(1, hi - lo);
    const pct = (v) => (100 * (v - lo) / span).toFixed(2) + "%";
    c.landmarks.forEach(([name, mm], i) => {
      const m = el("div", i % 2 ? "lm alt" : "lm"); m.style.left = pct(mm); m.appendChild(el("span", null, landmark(name))); bar.appendChild(m);
    });
    const req = el("div", "req"); req.style.left = pct(c.required_mm[0]); req.style.width = (100 * (c.required_mm[1] - c.required_mm[0]) / span).toFixed(2) + "%";
    req.title = "required: " + landmark(c.start) + " to " + landmark(c.end); bar.appendChild(req);
    const text = el("div", "covtext");
    if (c.scanned_mm) {
      const s = el("div", "scan"); s.style.left = pct(c.scanned_mm[0]); s.style.width = (100 * (c.scanned_mm[1] - c.scanned_mm[0]) / span).toFixed(2) + "%";
      s.title = "scanned"; bar.appendChild(s);
      const gaps = [];
      if (c.missing_top_mm > 0) { gaps.push(["bad", "missing " + Math.round(c.missing_top_mm) + " mm at the top (" + landmark(c.start) + ")"]);
        const m = el("div", "miss"); m.style.left = pct(c.required_mm[0]); m.style.width = (100 * c.missing_top_mm / span).toFixed(2) + "%"; bar.appendChild(m); }
      if (c.missing_bottom_mm > 0) { gaps.push(["bad", "missing " + Math.round(c.missing_bottom_mm) + " mm at the bottom (" + landmark(c.end) + ")"]);
        const m = el("div", "miss"); m.style.left = pct(c.scanned_mm[1]); m.style.width = (100 * c.missing_bottom_mm / span).toFixed(2) + "%"; bar.appendChild(m); }
      if (c.excess_top_mm > 0) gaps.push(["warn", Math.round(c.excess_top_mm) + " mm beyond the top"]);
      if (c.excess_bottom_mm > 0) gaps.push(["warn", Math.round(c.excess_bottom_mm) + " mm beyond the bottom"]);
      if (!gaps.length) gaps.push(["ok", "required range covered"]);
      gaps.forEach(([cls, t], i) => { if (i) text.appendChild(document.createTextNode(" · ")); text.appendChild(el("b", cls, t)); });
    } else {
      text.textContent = "scanned range not placed on the body scale yet (needs model positions or located landmarks)";
    }
    box.appendChild(bar); box.appendChild(text);
    return box;
  }

  async function ack(f, btn) {
    const name = who.value.trim();
    if (!name) { who.focus(); who.style.outline = "2px solid var(--crit)"; return; }
    btn.disabled = true;
    try {
      const r = await fetch("/api/findings/" + encodeURIComponent(f.id) + "/ack" + q, {
        method: "POST", headers: { "Content-Type": "application/json", ...(token ? { Authorization: "Bearer " + token } : {}) },
        body: JSON.stringify({ who: name }) });
      if (!r.ok) throw new Error((await r.json()).error || r.status);
      f.ack = await r.json();
      render();
    } catch (e) { btn.disabled = false; btn.textContent = "retry (" + e.message + ")"; }
  }

  function findingEl(f) {
    const li = el("li", "finding " + f.severity);
    li.dataset.check = f.check;
    li.appendChild(el("span", "sev", f.severity));
    const body = el("div", "fbody");
    body.appendChild(el("div", "fmsg", f.message));
    const meta = [f.check];
    if (f.first_instance != null) meta.push(f.first_instance === f.last_instance ? "slice " + f.first_instance : "slices " + f.first_instance + "–" + f.last_instance);
    if (f.z_range_mm) meta.push("z " + f.z_range_mm.map((v) => v.toFixed(0)).join(" to ") + " mm");
    if (f.score != null) meta.push("score " + f.score.toFixed(2));
    body.appendChild(el("div", "fmeta", meta.join(" · ")));
    li.appendChild(body);
    if (f.thumbnail) {
      const img = el("img", "thumb"); img.src = f.thumbnail.url + q; img.alt = "most affected slice " + (f.thumbnail.instance || "");
      img.title = "slice " + (f.thumbnail.instance || "") + " (click to enlarge)";
      img.addEventListener("click", () => img.classList.toggle("big"));
      li.appendChild(img);
    }
    if (f.ack) li.appendChild(el("span", "acked", "✓ " + f.ack.who + " " + new Date(f.ack.at * 1000).toLocaleTimeString()));
    else { const b = el("button", "ack", "Acknowledge"); b.addEventListener("click", () => ack(f, b)); li.appendChild(b); }
    return li;
  }

  function seriesEl(s) {
    const worst = s.findings.some((f) => f.severity === "critical" && !f.ack);
    const card = el("section", "series " + (s.verdict ? "v-" + s.verdict : "open") + (worst ? " critical" : ""));
    card.id = "s-" + s.uid; card.dataset.uid = s.uid;
    const head = el("div", "head");
    head.appendChild(el("span", "title", s.description + (s.series_number != null ? " #" + s.series_number : "")));
    const meta = [s.time, s.n_slices + (s.expected ? " / " + s.expected : "") + " slices", s.short_uid];
    if (s.patient_name) meta.unshift(s.patient_name);
    if (s.protocol_rule) meta.push("protocol " + s.protocol_rule);
    if (s.size && s.size.ssde_mgy != null) meta.push("CTDIvol " + s.size.ctdivol_mgy.toFixed(1) + " mGy · SSDE " + s.size.ssde_mgy.toFixed(1) + " mGy (Dw " + (s.size.water_eq_diameter_mm / 10).toFixed(1) + " cm)");
    head.appendChild(el("span", "meta", meta.filter(Boolean).join(" · ")));
    head.appendChild(el("span", "verdict " + (s.verdict || "open"), s.verdict ? s.verdict.toUpperCase() : "RECEIVING"));
    card.appendChild(head);
    card.appendChild(el("div", "label", "Slices, head → feet, coloured by the worst artifact score"));
    const strip = el("div", "strip");
    // head first, in table order: by the slice's position along the stack normal (z, + towards the head; taken
    // along the tilted normal on a tilted gantry), as the scanner placed it. The network's position estimate
    // (pos_mm, ~20 mm median error) only orders slices without geometry; arrival order the rest.
    const place = (sl) => sl.z != null ? [0, -sl.z] : sl.pos_mm != null ? [1, sl.pos_mm] : [2, sl.k];
    const ordered = s.slices.slice().sort((a, b) => { const p = place(a), r = place(b); return p[0] - r[0] || p[1] - r[1] || a.k - b.k; });
    for (const sl of ordered) { const m = el("div", markClass(sl, s.thresholds)); m.title = markTitle(sl); m.dataset.kind = sl.worst || ""; strip.appendChild(m); }
    card.appendChild(strip);
    if (s.coverage) card.appendChild(coverageEl(s.coverage));
    card.appendChild(el("div", "label", "Findings"));
    const ul = el("ul", "findings");
    if (!s.findings.length) ul.appendChild(el("li", "nofind", s.verdict ? "No problems found." : "No problems so far."));
    for (const f of s.findings) ul.appendChild(findingEl(f));
    card.appendChild(ul);
    const nj = Object.entries(s.not_judged || {});
    if (s.verdict && nj.length) {
      const notes = el("ul", "notjudged");
      for (const [check, why] of nj) notes.appendChild(el("li", "", "Not judged — " + check + ": " + why));
      card.appendChild(notes);
    }
    return card;
  }

  function render() {
    const list = $("#list");
    const items = [...series.values()].sort((a, b) => b.opened_at - a.opened_at);
    $("#empty") && items.length && $("#empty").remove();
    const keep = new Set();
    let prev = null;
    for (const s of items) {
      const fresh = seriesEl(s); keep.add(fresh.id);
      const old = document.getElementById(fresh.id);
      const big = old && old.querySelector(".thumb.big");
      if (old) old.replaceWith(fresh); else if (prev) prev.after(fresh); else list.prepend(fresh);
      if (big) { const t = [...fresh.querySelectorAll(".thumb")].find((i) => i.src === big.src); if (t) t.classList.add("big"); }
      prev = fresh;
    }
    for (const c of [...list.querySelectorAll("section.series")]) if (!keep.has(c.id)) c.remove();
    const crit = items.flatMap((s) => s.findings.filter((f) => f.severity === "critical" && !f.ack).map((f) => [s, f]));
    const a = $("#alert");
    if (crit.length) {
      const [s, f] = crit[0];
      a.textContent = "⚠ " + s.description + ": " + f.message + (crit.length > 1 ? "  (+" + (crit.length - 1) + " more)" : "");
      a.classList.remove("hidden");
      for (const [, g] of crit) if (!alerted.has(g.id)) { alerted.add(g.id); beep(); }
    } else a.classList.add("hidden");
  }

  let audio = null;
  function beep() {
    if (!settings.sound) return;
    try {
      audio = audio || new (window.AudioContext || window.webkitAudioContext)();
      const o = audio.createOscillator(), g = audio.createGain();
      o.frequency.value = 880; g.gain.value = 0.08; o.connect(g); g.connect(audio.destination);
      o.start(); o.stop(audio.currentTime + 0.35);
    } catch (e) { /* audio not allowed until the page was clicked */ }
  }

  function merge(v) {
    const old = series.get(v.uid);
    if (old && v.slices_from > 0) {
      const kept = old.slices.filter((s) => s.k < v.slices_from);
      v.slices = kept.concat(v.slices);
    }
    series.set(v.uid, v);
  }

  let pending = false;
  function schedule() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); } }

  function connect() {
    const es = new EventSource("/api/console/stream" + q);
    es.addEventListener("hello", (e) => { settings = JSON.parse(e.data).settings; series.clear(); $("#conn").className = "dot on"; });
    es.addEventListener("series", (e) => { merge(JSON.parse(e.data)); schedule(); });
    es.addEventListener("expired", (e) => { series.delete(JSON.parse(e.data).uid); schedule(); });
    es.onerror = () => { $("#conn").className = "dot off"; };
    es.onopen = () => { $("#conn").className = "dot on"; };
  }
  connect();
})();
