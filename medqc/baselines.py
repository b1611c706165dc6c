"""Per-scanner baselines: each scanner's normal noise and ring level, learned from the site's own passed series.

The generic levels of the noise and ring checks (``medqc/analysis/noise.py``, ``medqc/analysis/fusion.py``, ``agent/checks/dose.py``) are set
from physics and published routine values; a scanner, a kernel and a slice thickness have a normal of their
own. A baseline is that normal, learned from the series of that scanner that passed with no finding:

* **key** of a series (``scanner_key``): manufacturer, model, station (StationName, else
  DeviceSerialNumber), convolution kernel (upper case, spaces collapsed), slice-thickness bucket
  (≤ 1.25, ≤ 2.5, ≤ 3.75, ≤ 5, > 5 mm) and region (``head`` where most slices hold a skull all round, the
  brain's noise scale; else ``body``). When that exact key has fewer than ``min_series`` series, the
  coarser key of the same model, kernel, thickness and region at any station (``*`` for the station)
  stands in for it.
* **per series** (``series_stats``): the median and 90th percentile over its slices of ``noise_sd_2mm``
  (σ at 2 mm, the noise a reader sees), the median of ``noise_sd`` (σ at the image's own pixel), and the
  median and 90th percentile of ``ring_contrast_hu``.
* **the noise and ring measures** a store was written with are recorded (``medqc.analysis.noise.NOISE_MEASURE``,
  ``medqc.analysis.ring.RING_MEASURE``); opened by code that measures σ at 2 mm (or the ring contrast)
  another way, the store forgets its series' noise (ring) figures, keeps the others, and learns those normals
  anew, since a normal taken with one measure misjudges series taken with another.
* **per key**: the last ``keep`` series (default 200) in an SQLite file in the state directory
  (``<state_dir>/baselines.sqlite``; each change is one transaction, so the agent and ``medqc calibrate``
  may share it). A baseline is usable from ``min_series`` series (default 5).
* **learning** (``learnable``): only from a series whose verdict is pass and which holds no finding at all
  but informational notes on geometry or coverage (gantry tilt, overscan under its margin) and findings
  withdrawn at the verdict. A series with any other finding — an artifact, a dose note, a noise index —
  never teaches a baseline.
* **judging** (``judge``): noise — the series' median σ at 2 mm over the baseline's (the median of its
  series' medians). Over ``noise_factor`` (default 1.8) times it, the series is noisy for this scanner:
  σ ∝ 1/√dose, so 1.8 × σ is the noise of 1/1.8² ≈ 31 % of the usual dose, outside the spread of passed
  series of one protocol (95th percentile over median 1.36 over the real chest's mid-chest sections; docs/
  checks.md); where a key's passed series spread wider, the top of their range is the limit instead, and
  ``medqc calibrate --show`` shows the spread. At or under the normal range (the 95th percentile of the
  baseline's series medians, never above the factor) the series is normal for this scanner, and the
  generic noise level does not raise it. Ring — the series' 90th percentile of the ring
  contrast against the 95th percentile of the baseline's series (their normal) plus ``RING_MARGIN_HU``
  (2 HU, half the generic ring level; the clean real head phantom reads 0.0–0.1 HU): over it, a ring is supported; a
  ring the generic level raised on slices within it is this scanner's normal.

This module needs neither torch nor the agent; ``agent/checks/baseline.py`` turns a judgement into findings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sqlite3
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = "baselines.sqlite"
SCHEMA_VERSION = "1"
THICKNESS_BUCKETS_MM = (1.25, 2.5, 3.75, 5.0)
MIN_SLICES = 3  # measured slices a series needs for a figure (as the noise index asks)
NOISE_FACTOR = 1.8  # default of baselines.noise_factor (see the module docstring)
NORMAL_QUANTILE = 0.95  # the top of the normal range: this quantile of the baseline's series
RING_MARGIN_HU = 2.0  # ring contrast over the scanner's normal that supports a ring
HEAD_SKULL_SHARE = 0.75  # median skull_ring at which a series is a head (medqc.analysis.measures.SKULL_SECTORS)
# findings that do not stop a passed series from teaching a baseline: notes on its geometry or coverage
# (a gantry tilt usual for head CT, an overscan under its margin) say nothing about its noise or rings
LEARN_NOTES = ("geometry.", "coverage.")

SCHEMA = """
CREATE TABLE IF NOT EXISTS baseline_series (
    key TEXT NOT NULL,          -- exact key: manufacturer|model|station|kernel|thickness|region
    coarse TEXT NOT NULL,       -- the same with * for the station
    series TEXT NOT NULL,       -- SHA-256 of the SeriesInstanceUID (first 24 hex digits): one row per series
    learned_at REAL NOT NULL,
    slices INTEGER NOT NULL,
    noise_sd_2mm_p50 REAL, noise_sd_2mm_p90 REAL, noise_sd_p50 REAL, ring_p50 REAL, ring_p90 REAL,
    PRIMARY KEY (key, series));
CREATE INDEX IF NOT EXISTS baseline_series_coarse ON baseline_series(coarse, learned_at);
CREATE TABLE IF NOT EXISTS baseline_meta (k TEXT PRIMARY KEY, v TEXT);
"""
STAT_FIELDS = ("noise_sd_2mm_p50", "noise_sd_2mm_p90", "noise_sd_p50", "ring_p50", "ring_p90")
NOISE_FIELDS = ("noise_sd_2mm_p50", "noise_sd_2mm_p90")
RING_FIELDS = ("ring_p50", "ring_p90")
log = logging.getLogger("medqc.baselines")


# ------------------------------------------------------------------------------------------------ key
def _norm(v) -> str:
    s = " ".join(str(v or "").replace("|", "/").split()).upper()
    return s or "?"


def thickness_bucket(t) -> str:
    if t is None or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        return "?mm"
    for edge in THICKNESS_BUCKETS_MM:
        if t <= edge + 1e-6:
            return f"<={edge:g}mm"
    return f">{THICKNESS_BUCKETS_MM[-1]:g}mm"


@dataclass(frozen=True)
class ScannerKey:
    manufacturer: str
    model: str
    station: str
    kernel: str
    thickness: str
    region: str

    @property
    def exact(self) -> str:
        return "|".join((self.manufacturer, self.model, self.station, self.kernel, self.thickness, self.region))

    @property
    def coarse(self) -> str:
        return "|".join((self.manufacturer, self.model, "*", self.kernel, self.thickness, self.region))


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def scanner_key(info, results) -> ScannerKey:
    """The key of a series: header facts of its first axial slice ``info`` (a ``SliceInfo``) and the region
    from its analysed slices ``results`` (``SliceResult``: head where the median ``skull_ring`` shows a
    skull all round)."""
    skull = [r.measures.get("skull_ring") for r in results if not r.error and _finite(r.measures.get("skull_ring"))]
    region = "head" if skull and statistics.median(skull) >= HEAD_SKULL_SHARE else "body"
    station = getattr(info, "station_name", "") or getattr(info, "device_serial_number", "")
    return ScannerKey(_norm(info.manufacturer), _norm(getattr(info, "manufacturer_model", "")), _norm(station),
                      _norm(info.convolution_kernel), thickness_bucket(info.slice_thickness), region)


# ------------------------------------------------------------------------------------------ statistics
def quantile(vals, q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default) of ``vals``; None when empty."""
    v = sorted(vals)
    if not v:
        return None
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass(frozen=True)
class SeriesStats:
    slices: int  # analysed slices
    noise_slices: int  # ... with a noise figure (σ at 2 mm)
    ring_slices: int  # ... with a ring figure
    noise_sd_2mm_p50: float | None = None
    noise_sd_2mm_p90: float | None = None
    noise_sd_p50: float | None = None
    ring_p50: float | None = None
    ring_p90: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def series_stats(results, noise_results=None) -> SeriesStats:
    """Robust figures of a series from its analysed slices (``SliceResult``). ``noise_results``: the slices
    to read the noise on (default all; the judgement leaves out those whose σ is an artifact's). A figure
    needs ``MIN_SLICES`` measured slices, else it is None."""
    ok = [r for r in results if not r.error]
    nres = ok if noise_results is None else [r for r in noise_results if not r.error]

    def vals(rs, k):
        return [float(r.measures[k]) for r in rs if _finite(r.measures.get(k))]

    n2 = vals(nres, "noise_sd_2mm")
    nn = vals(nres, "noise_sd")
    ring = [max(0.0, v) for v in vals(ok, "ring_contrast_hu")]
    enough = len(n2) >= MIN_SLICES
    return SeriesStats(
        slices=len(ok), noise_slices=len(n2), ring_slices=len(ring),
        noise_sd_2mm_p50=quantile(n2, 0.5) if enough else None,
        noise_sd_2mm_p90=quantile(n2, 0.9) if enough else None,
        noise_sd_p50=quantile(nn, 0.5) if len(nn) >= MIN_SLICES else None,
        ring_p50=quantile(ring, 0.5) if len(ring) >= MIN_SLICES else None,
        ring_p90=quantile(ring, 0.9) if len(ring) >= MIN_SLICES else None,
    )


def learnable(state) -> tuple[bool, str]:
    """Whether a completed series may teach its scanner's baseline, and why not. ``state``: a ``SeriesState``
    after its verdict (``state.scanner`` set by the final judgement)."""
    blocking = sorted({f.check for f in state.findings.values()
                       if not f.details.get("resolved") and not (f.severity == "info" and f.check.startswith(LEARN_NOTES))})
    if state.verdict != "pass":
        return False, f"verdict {state.verdict} ({', '.join(blocking)})"
    if blocking:
        return False, "finding(s): " + ", ".join(blocking)
    if getattr(state, "dynamic", False):
        return False, "dynamic series (repeated table positions)"
    sc = getattr(state, "scanner", None)
    if not sc or sc.get("stats") is None:
        return False, "not judged"
    stats = sc["stats"]
    if stats.noise_sd_2mm_p50 is None and stats.ring_p90 is None:
        return False, f"too few measured slices (noise on {stats.noise_slices}, ring on {stats.ring_slices}; {MIN_SLICES} needed)"
    return True, ""


# ------------------------------------------------------------------------------------------- baseline
@dataclass(frozen=True)
class Baseline:
    """A scanner's normal, from the series stored under ``key``."""

    key: str  # the exact key, or the coarse one (station *) when the exact key has too few series
    level: str  # "scanner" (exact key) or "model" (coarse key: any station)
    series: int
    min_series: int
    noise_factor: float
    noise_series: int = 0
    noise_sd_2mm_hu: float | None = None  # median of the series' median σ at 2 mm
    noise_normal_max_hu: float | None = None  # top of the normal range (series medians)
    noise_slice_max_hu: float | None = None  # top of the normal slice range (the series' 90th percentiles)
    noise_sd_hu: float | None = None  # median of the series' median σ at the image's own pixel
    noise_spread: float | None = None  # 95th percentile of the series medians over their median
    ring_series: int = 0
    ring_p90_hu: float | None = None  # median of the series' 90th percentile ring contrast
    ring_normal_max_hu: float | None = None  # 95th percentile of the same
    ring_margin_hu: float = RING_MARGIN_HU

    @property
    def noise_usable(self) -> bool:
        return self.noise_series >= self.min_series and self.noise_sd_2mm_hu is not None and self.noise_sd_2mm_hu > 0

    @property
    def ring_usable(self) -> bool:
        return self.ring_series >= self.min_series and self.ring_normal_max_hu is not None

    @property
    def noise_high_above_hu(self) -> float | None:
        """``noise_factor`` × the median — or the top of the normal range where the key's passed series spread
        wider than that (a series its scanner passes routinely is never noisy for it)."""
        if not self.noise_usable:
            return None
        return max(self.noise_factor * self.noise_sd_2mm_hu, self.noise_sd_2mm_hu * (self.noise_spread or 0.0))

    @property
    def ring_limit_hu(self) -> float | None:
        return self.ring_normal_max_hu + self.ring_margin_hu if self.ring_usable else None

    def to_dict(self) -> dict:
        d = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["noise_high_above_hu"] = None if self.noise_high_above_hu is None else round(self.noise_high_above_hu, 3)
        d["ring_limit_hu"] = None if self.ring_limit_hu is None else round(self.ring_limit_hu, 3)
        return d

    def text(self) -> str:
        head = (f"baseline {self.key} ({'this scanner' if self.level == 'scanner' else 'this model, any station'}, "
                f"{self.series} passed series)")
        rest = []
        if self.noise_usable:
            rest.append(f"noise σ {self.noise_sd_2mm_hu:.1f} HU at 2 mm (normal ≤ {self.noise_normal_max_hu:.1f}, "
                        f"noisy above {self.noise_high_above_hu:.1f})")
        if self.ring_usable:
            rest.append(f"ring {self.ring_p90_hu:.2f} HU (a ring above {self.ring_limit_hu:.2f})")
        return head + (": " + "; ".join(rest) if rest else "")


def build_baseline(key: str, level: str, rows, min_series: int, noise_factor: float) -> Baseline:
    """A ``Baseline`` from stored rows (dicts with ``STAT_FIELDS``)."""
    med = [r["noise_sd_2mm_p50"] for r in rows if _finite(r["noise_sd_2mm_p50"])]
    p90 = [r["noise_sd_2mm_p90"] for r in rows if _finite(r["noise_sd_2mm_p90"])]
    nat = [r["noise_sd_p50"] for r in rows if _finite(r["noise_sd_p50"])]
    ring = [r["ring_p90"] for r in rows if _finite(r["ring_p90"])]
    ref = quantile(med, 0.5)
    top = quantile(med, NORMAL_QUANTILE)
    return Baseline(
        key=key, level=level, series=len(rows), min_series=min_series, noise_factor=noise_factor,
        noise_series=len(med), noise_sd_2mm_hu=ref,
        noise_normal_max_hu=None if ref is None else min(top, noise_factor * ref),
        noise_slice_max_hu=quantile(p90, NORMAL_QUANTILE), noise_sd_hu=quantile(nat, 0.5),
        noise_spread=None if not ref else top / ref,
        ring_series=len(ring), ring_p90_hu=quantile(ring, 0.5), ring_normal_max_hu=quantile(ring, NORMAL_QUANTILE),
    )


# ------------------------------------------------------------------------------------------- judgement
@dataclass(frozen=True)
class Judgement:
    """What a baseline says about one series (None: not judged on that measure)."""

    noise: str | None = None  # "high" (over the factor), "normal" (within the normal range), "between"
    noise_ratio: float | None = None  # the series' median σ at 2 mm over the baseline's
    noise_sd_2mm_hu: float | None = None
    ring: str | None = None  # "high" (90th percentile over the limit), "normal"
    ring_p90_hu: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def judge(stats: SeriesStats, baseline: Baseline | None) -> Judgement:
    """The series against its scanner's baseline (see the module docstring)."""
    if baseline is None or stats is None:
        return Judgement()
    noise = ratio = None
    if baseline.noise_usable and stats.noise_sd_2mm_p50 is not None:
        ratio = stats.noise_sd_2mm_p50 / baseline.noise_sd_2mm_hu
        if stats.noise_sd_2mm_p50 > baseline.noise_high_above_hu:
            noise = "high"
        elif stats.noise_sd_2mm_p50 <= baseline.noise_normal_max_hu:
            noise = "normal"
        else:
            noise = "between"
    ring = None
    if baseline.ring_usable and stats.ring_p90 is not None:
        ring = "high" if stats.ring_p90 > baseline.ring_limit_hu else "normal"
    return Judgement(noise=noise, noise_ratio=ratio, noise_sd_2mm_hu=stats.noise_sd_2mm_p50, ring=ring,
                     ring_p90_hu=stats.ring_p90)


# --------------------------------------------------------------------------------------------- storage
def series_id(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


class Baselines:
    """The store of learned series (SQLite, one connection guarded by a lock; WAL, so the agent and
    ``medqc calibrate`` can use one file at once)."""

    def __init__(self, path: str | Path, min_series: int = 5, keep: int = 200, noise_factor: float = NOISE_FACTOR):
        self.path = Path(path)
        self.min_series, self.keep, self.noise_factor = int(min_series), int(keep), float(noise_factor)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO baseline_meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            from medqc.analysis.noise import NOISE_MEASURE
            from medqc.analysis.ring import RING_MEASURE

            self.noise_forgotten = self._check_measure("noise", NOISE_MEASURE, NOISE_FIELDS, "ring")
            self.ring_forgotten = self._check_measure("ring", RING_MEASURE, RING_FIELDS, "noise")

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction (a cursor in BEGIN IMMEDIATE: the agent and ``medqc calibrate`` may share the
        file), committed on leaving, rolled back on any error. The caller holds ``_lock``."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def _check_measure(self, what: str, definition: str, fields: tuple[str, ...], other: str) -> int:
        """Series whose ``what`` figures were measured by another definition of it (a store from before it
        was recorded has none) lose those figures and keep the ``other`` ones: a normal taken with one
        measure would judge series taken with another. Returns how many series lost them."""
        key = f"{what}_measure"
        row = self._db.execute("SELECT v FROM baseline_meta WHERE k=?", (key,)).fetchone()
        if row is not None and row[0] == definition:
            return 0
        with self._transaction() as cur:
            n = cur.execute(f"UPDATE baseline_series SET {', '.join(f + '=NULL' for f in fields)} "
                            f"WHERE {' OR '.join(f + ' IS NOT NULL' for f in fields)}").rowcount
            cur.execute("INSERT OR REPLACE INTO baseline_meta VALUES (?, ?)", (key, definition))
        if n:
            log.warning("baselines: %d learned series were measured with an earlier definition of the %s measure; "
                        "their %s figures are forgotten (%s figures kept) and %s baselines are learned anew",
                        n, what, what, other, what)
        return n

    @classmethod
    def from_config(cls, cfg, state_dir: str | Path | None = None, create: bool = True) -> "Baselines | None":
        """The store named by ``[baselines]`` (``path``, else ``<state_dir>/baselines.sqlite``). With
        ``create`` False, None where the file does not exist yet (``medqc analyze`` creates no state)."""
        b = cfg.baselines
        path = Path(b.path) if b.path else Path(state_dir if state_dir is not None else cfg.state_path) / FILE_NAME
        if not create and not path.is_file():
            return None
        return cls(path, b.min_series, b.keep, b.noise_factor)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------------------------------- writes
    def learn(self, key: ScannerKey, uid: str, stats: SeriesStats, at: float | None = None) -> bool:
        """Store one passed series (again: its figures are replaced); keeps the last ``keep`` per key.
        True when the series was new to the key."""
        sid = series_id(uid)
        with self._lock, self._transaction() as cur:
            new = cur.execute("SELECT 1 FROM baseline_series WHERE key=? AND series=?", (key.exact, sid)).fetchone() is None
            cur.execute("INSERT OR REPLACE INTO baseline_series VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (key.exact, key.coarse, sid, time.time() if at is None else at, stats.slices,
                         *(getattr(stats, f) for f in STAT_FIELDS)))
            cur.execute("DELETE FROM baseline_series WHERE key=? AND series NOT IN (SELECT series FROM baseline_series "
                        "WHERE key=? ORDER BY learned_at DESC, rowid DESC LIMIT ?)", (key.exact, key.exact, self.keep))
        return new

    def reset(self, key: str | None = None) -> int:
        """Forget every series (``key`` None), or those of one exact key or of one coarse key (station
        ``*``). Returns how many were removed."""
        with self._lock:
            if key is None:
                n = self._db.execute("DELETE FROM baseline_series").rowcount
            else:
                n = self._db.execute("DELETE FROM baseline_series WHERE key=? OR coarse=?", (key, key)).rowcount
        return n

    # ------------------------------------------------------------------------------------------ reads
    def _rows(self, where: str, arg: str) -> list[dict]:
        with self._lock:
            cur = self._db.execute(f"SELECT * FROM baseline_series WHERE {where}=? ORDER BY learned_at DESC LIMIT ?",
                                   (arg, self.keep))
            return [dict(r) for r in cur.fetchall()]

    def count(self, key: ScannerKey) -> tuple[int, int]:
        """Series stored under the exact key and under its coarse key."""
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM baseline_series WHERE key=?", (key.exact,)).fetchone()[0]
            c = self._db.execute("SELECT COUNT(*) FROM baseline_series WHERE coarse=?", (key.coarse,)).fetchone()[0]
        return n, c

    def lookup(self, key: ScannerKey) -> Baseline | None:
        """The baseline of ``key``: its own series when it has ``min_series``, else those of the same model at
        any station when they are enough, else None (generic levels)."""
        rows = self._rows("key", key.exact)
        if len(rows) >= self.min_series:
            return build_baseline(key.exact, "scanner", rows, self.min_series, self.noise_factor)
        rows = self._rows("coarse", key.coarse)
        if len(rows) >= self.min_series:
            return build_baseline(key.coarse, "model", rows, self.min_series, self.noise_factor)
        return None

    def summary(self) -> list[dict]:
        """One entry per stored exact key, and one per coarse key shared by several stations."""
        with self._lock:
            exact = [tuple(r) for r in self._db.execute("SELECT DISTINCT key, coarse FROM baseline_series ORDER BY key")]
        out, coarse = [], {}
        for k, c in exact:
            b = build_baseline(k, "scanner", self._rows("key", k), self.min_series, self.noise_factor)
            out.append(b)
            coarse.setdefault(c, []).append(k)
        for c, ks in sorted(coarse.items()):
            if len(ks) > 1:
                out.append(build_baseline(c, "model", self._rows("coarse", c), self.min_series, self.noise_factor))
        return [{**b.to_dict(), "usable": b.series >= self.min_series} for b in out]


def describe(key: ScannerKey, baseline: Baseline | None, counts: tuple[int, int] | None, min_series: int | None,
             judgement: Judgement | None = None) -> dict:
    """The ``baseline`` entry of a series report: the baseline used (key, series, reference values, the
    judgement), or why there is none."""
    if baseline is None:
        why = "no baseline for this scanner (generic levels)"
        if counts is not None and min_series:
            why += f": {counts[0]} of {min_series} passed series learned for {key.exact}"
            if counts[1] > counts[0]:
                why += f" ({counts[1]} for this model at any station)"
        return {"used": False, "key": key.exact, "series": counts[0] if counts else 0, "text": why}
    return {"used": True, **baseline.to_dict(), "judgement": (judgement or Judgement()).to_dict(), "text": baseline.text()}
