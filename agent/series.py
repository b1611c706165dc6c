"""Series state: per SeriesInstanceUID, the slices seen so far, completion and verdict.

``SeriesTracker.add`` is called once per analysed slice (in arrival order) and returns the findings that
are new or changed (frozen ``FindingEvent``s), so sinks can show them while the patient is still on the
table. The judging is the registered checks' (``agent/checks/registry.py``): while slices arrive their
``stream`` (artifact runs, the first slice's tilt and orientation, early coverage, undecodable inputs);
offline, with ``streaming=False``, it only collects the slices.

A series completes when the expected count is reached (ImagesInAcquisition), when MPPS says so, or after
``series.idle_timeout_s`` without a new slice (``due``). ``complete`` runs every registered check's
``judge`` from scratch on the whole stack, withdraws the streaming findings of withdrawable checks that the
whole stack no longer supports, and sets the verdict: fail if any critical finding, warn if any warning,
else pass. ``finish`` does that and makes the series' frozen ``SeriesEvent`` under the same lock.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from medqc import ARTIFACTS
from medqc.agent.checks import judged as judged_checks
from medqc.agent.checks import registry
from medqc.agent.checks.common import slice_z
from medqc.agent.checks.geometry import is_localizer
from medqc.agent.checks.protocols import load_rules, match_rule, part_of_split_range
from medqc.agent.records import Finding, FindingEvent, SeriesEvent, SliceInfo, SliceResult

DEFAULT_THRESHOLD = 0.5


# ScanOptions of step-and-shoot acquisitions (GE "AXIAL MODE" / "CINE MODE", "SEQUENCE(D)", "STATIONARY"): one
# acquisition per table position
STEP_AND_SHOOT = re.compile(r"(?<![A-Z])(AXIAL|SEQUENCED?|CINE|STATIONARY)(?![A-Z])")  # also "AXIAL_CT"
DYNAMIC_MIN_SLICES = 4
DYNAMIC_REPEATS = 3


@dataclass
class SeriesState:
    uid: str
    study_uid: str
    first: SliceInfo
    results: list[SliceResult] = field(default_factory=list)
    findings: dict[str, Finding] = field(default_factory=dict)
    verdict: str | None = None
    protocol_rule: str | None = None
    completed_reason: str | None = None
    opened_at: float = 0.0
    completed_at: float | None = None
    # bookkeeping (not part of the pinned interface)
    matched_field: str = ""
    last_seen: float = 0.0
    mpps_done: bool = False
    count_used: bool = False  # completed once by the expected count: late slices then complete by idle
    coverage: dict = field(default_factory=dict)
    rule: object = field(default=None, repr=False)
    split_range: bool = False  # one part of a range split over series (posterior fossa): coverage not judged
    size: dict | None = None  # patient size and size-specific dose (checks.dose.size_specific), at completion
    not_judged: dict = field(default_factory=dict)  # check -> why it could not judge this series (checks.judged)
    baseline: dict | None = None  # the scanner baseline it was judged against, or why none (checks.baseline)
    scanner: dict = field(default_factory=dict, repr=False)  # its baseline key and figures (medqc.baselines)
    _keys: set = field(default_factory=set, repr=False)
    _order: list = field(default_factory=list, repr=False)  # sorted [(z, seq)]
    _qual: dict = field(default_factory=dict, repr=False)  # class → {seq: (z, result)}
    _rel: dict = field(default_factory=dict, repr=False)  # relative class → sorted scores of the analysed slices
    _errors: list = field(default_factory=list, repr=False)
    _zcount: dict = field(default_factory=dict, repr=False)  # (z, table z) at 0.1 mm → analysed slices there
    _air: dict = field(default_factory=dict, repr=False)  # id(result) → its unexplained air streaks (HU) or None
    _reported: dict = field(default_factory=dict, repr=False)  # finding id → severity last reported (raised / escalated)

    @property
    def dynamic(self) -> bool:
        """The same few table positions repeated over time — bolus-tracking monitoring scans, perfusion and
        other dynamic acquisitions, CT fluoroscopy — rather than a stack along the patient: every position
        held by three slices or more on average (from 4 slices on)."""
        n = len(self._order)  # every slice in _order was counted in _zcount
        return n >= DYNAMIC_MIN_SLICES and len(self._zcount) * DYNAMIC_REPEATS <= n

    @property
    def expected(self) -> int | None:
        """The slice count that completes the series: ImagesInAcquisition — except in step-and-shoot (axial,
        sequenced, cine) scanning, where scanners write it per table position, so reaching it would close
        the series after its first rotation; those series complete by MPPS or the idle timeout."""
        n = self.first.images_in_acquisition
        if STEP_AND_SHOOT.search(self.first.scan_options or ""):
            return None
        return n if n and n > 0 else None

    def ordered(self) -> list[tuple[float, SliceResult]]:
        """[(z, result)] in ascending z (slices without geometry: by instance number)."""
        return [(z, self.results[seq]) for z, seq in self._order]


RANK = {"info": 0, "warning": 1, "critical": 2}


def _same(a: Finding, b: Finding) -> bool:
    def found(f):  # details.first_raised_at is the tracker's note, not part of what was found
        return {k: v for k, v in f.details.items() if k != "first_raised_at"}

    return (a.severity, a.message, a.first_instance, a.last_instance, a.z_range_mm, a.score, found(a)) == (
        b.severity, b.message, b.first_instance, b.last_instance, b.z_range_mm, b.score, found(b))


def first_report(f: Finding) -> bool:
    """Whether this change is the first report of the finding (``medqc_findings_total`` counts these once):
    raised while slices arrive, or found only at the verdict."""
    return f.kind == "raised" or (f.kind == "final" and "first_raised_at" not in f.details)


class SeriesTracker:
    def __init__(self, cfg, thresholds: dict[str, float] | None = None, baselines=None, streaming: bool = True):
        self.cfg = cfg
        self.baselines = baselines  # medqc.baselines.Baselines: per-scanner normals (None: generic levels only)
        # False (medqc analyze): no slices arrive over time, so nothing is judged before the series is complete;
        # ``complete`` runs every check once and the report holds final findings only
        self.streaming = streaming
        th = {k: DEFAULT_THRESHOLD for k in ARTIFACTS}
        th.update({k: float(v) for k, v in (thresholds or {}).items()})
        th.update({k: float(v) for k, v in cfg.checks.artifact.thresholds.items()})
        self.thresholds = th
        self.rules = load_rules(cfg.checks.coverage.protocols or None)
        self._series: OrderedDict[str, SeriesState] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def lock(self) -> threading.RLock:
        """Held while a series changes; whoever reads a live ``SeriesState`` from another thread holds it."""
        return self._lock

    # ------------------------------------------------------------------------------------------ intake
    def add(self, result: SliceResult) -> list[FindingEvent]:
        """Take one analysed slice; the findings it changed, as frozen events."""
        with self._lock:
            return [FindingEvent.of(f) for f in self._add(result)]

    def _add(self, result: SliceResult) -> list[Finding]:
        info = result.info
        with self._lock:
            st = self._series.get(info.series_instance_uid)
            now = time.time()
            if st is None:
                st = SeriesState(uid=info.series_instance_uid, study_uid=info.study_instance_uid, first=info,
                                 opened_at=now, last_seen=now)
                rule, fld = match_rule(info, self.rules)
                st.rule, st.protocol_rule, st.matched_field = rule, (rule.name if rule else None), fld
                st.split_range = part_of_split_range(info)
                self._series[st.uid] = st
            key = (info.sop_instance_uid, info.frame)
            if key in st._keys:  # the same instance again (scanner retry, resend): ignored, never counted twice
                st.last_seen = now
                return []
            if st.verdict is not None:  # a late slice reopens the series
                st.verdict, st.completed_at, st.completed_reason = None, None, None
            st._keys.add(key)
            seq = len(st.results)
            st.results.append(result)
            st.last_seen = now
            arrival = registry.Arrival(self, st, result, seq)
            if result.error:
                st._errors.append(result)
                if self.streaming:
                    for c in self._streams(errors=True):
                        c.stream(arrival)
                return arrival.changed
            if is_localizer(info):  # a scout stored into the axial series: kept, not analysed
                return arrival.changed
            if is_localizer(st.first):  # the header facts come from the first axial slice
                st.first = info
            z = slice_z(result, seq)
            bisect.insort(st._order, (z, seq))
            # a position repeats when both its place along the slice normal and its table position do
            zk = (round(z, 1), round(info.position[2], 1) if info.position else None)
            st._zcount[zk] = st._zcount.get(zk, 0) + 1
            if not self.streaming:
                return arrival.changed
            # a stack along the patient once the table has moved; not yet (or never: bolus tracking, perfusion)
            # while it has not, where coverage, geometry and artifact runs do not apply
            arrival.z, arrival.zk, arrival.stack = z, zk, not (st.dynamic or len(st._zcount) == 1)
            for c in self._streams(errors=False):
                c.stream(arrival)
            return arrival.changed

    @staticmethod
    def _streams(errors: bool) -> list:
        return [c for c in registry.checks() if c.stream is not None and c.stream_errors == errors]

    def _put(self, st: SeriesState, f: Finding, changed: list) -> None:
        """Record a finding judged while slices arrive, with the kind of change it is (records.KINDS)."""
        old = st.findings.get(f.finding_id)
        if old is None or old.details.get("resolved"):
            f.kind = "raised"
        else:
            if _same(old, f):
                return
            f.details.setdefault("first_raised_at", old.details.get("first_raised_at", old.raised_at))
            # only a rise above the severity last reported is news; a severity that eases while slices arrive
            # is state (the console shows it), and the verdict's final event gives the judgement
            reported = st._reported.get(f.finding_id, old.severity)
            f.kind = "escalated" if RANK[f.severity] > RANK[reported] else "updated"
        if f.kind != "updated":
            st._reported[f.finding_id] = f.severity
        st.findings[f.finding_id] = f
        changed.append(f)

    # ------------------------------------------------------------------------------------- completion
    def due(self, now: float) -> list[tuple[str, str]]:
        out = []
        idle = self.cfg.series.idle_timeout_s
        with self._lock:
            for st in self._series.values():
                if st.verdict is not None:
                    continue
                if st.expected is not None and len(st._keys) >= st.expected and not st.count_used:
                    out.append((st.uid, "count"))
                elif st.mpps_done:
                    out.append((st.uid, "mpps"))
                elif now - st.last_seen >= idle:
                    out.append((st.uid, "idle"))
        return out

    def mpps_completed(self, series_uids: list[str]) -> None:
        with self._lock:
            for uid in series_uids:
                st = self._series.get(uid)
                if st is not None:
                    st.mpps_done = True

    def finish(self, series_uid: str, reason: str, privacy) -> tuple[SeriesEvent, list[FindingEvent]]:
        """``complete``, and the series as a frozen event (its report built with ``privacy``) under the lock."""
        from medqc.agent.report import series_event

        with self._lock:
            st, changed = self.complete(series_uid, reason)
            return series_event(st, privacy), changed

    def complete(self, series_uid: str, reason: str) -> tuple[SeriesState, list[FindingEvent]]:
        """Judge the whole series and set its verdict: (its state, the findings changed, as frozen events)."""
        with self._lock:
            st, changed = self._complete(series_uid, reason)
            return st, [FindingEvent.of(f) for f in changed]

    def _complete(self, series_uid: str, reason: str) -> tuple[SeriesState, list[Finding]]:
        with self._lock:
            st = self._series.get(series_uid)
            if st is None:
                raise KeyError(f"unknown series {series_uid}")
            changed: list[Finding] = []
            final = self._final_findings(st)
            final_ids = {f.finding_id for f in final}
            for f in final:  # every finding that stands is reported once more: its judgement on the whole series
                old = st.findings.get(f.finding_id)
                if old is not None:  # reported before (raised while slices arrived, or at an earlier verdict)
                    f.details["first_raised_at"] = old.details.get("first_raised_at", old.raised_at)
                    f.raised_at = old.raised_at if _same(old, f) else f.raised_at
                f.kind = "final"
                st._reported[f.finding_id] = f.severity
                st.findings[f.finding_id] = f
                changed.append(f)
            # streaming findings the whole stack no longer supports are withdrawn, not silently dropped
            for fid, old in list(st.findings.items()):
                if fid in final_ids or old.details.get("resolved"):
                    continue
                if registry.withdrawable(old.check):
                    res = Finding(**{**old.__dict__, "severity": "info", "kind": "withdrawn",
                                     "message": f"Withdrawn: the complete series does not show it (raised while slices "
                                                f"arrived: {old.message})",
                                     "details": {**old.details, "resolved": True}, "raised_at": time.time()})
                    st.findings[fid] = res
                    changed.append(res)
            sev = {f.severity for f in st.findings.values()}
            st.verdict = "fail" if "critical" in sev else "warn" if "warning" in sev else "pass"
            st.completed_reason = reason
            st.completed_at = time.time()
            if reason == "count":
                st.count_used = True
            if reason == "mpps":
                st.mpps_done = False  # a later slice re-opens the series; it then completes by idle
            self._prune()
            return st, changed

    def _final_findings(self, st: SeriesState) -> list[Finding]:
        """Every registered check on the complete series, in order (a dynamic series: those that apply to it)."""
        ordered = st.ordered()
        j = registry.Judgement(st, ordered, [r for r in st.results if not r.error], self.cfg.checks, self.thresholds,
                               self.baselines)
        st.coverage, st.size = {}, None  # set again by the checks that work them out
        for c in registry.checks():
            if c.judge is None or (st.dynamic and not c.dynamic):
                continue
            found = c.judge(j)
            j.found = list(found) if c.revises else j.found + list(found)
        if not st.dynamic:
            st.not_judged = judged_checks.not_judged(st, ordered, st.rule, st.coverage)
            if not j.axial:
                st.not_judged["coverage"] = "the slices are not axial"
        return j.found

    def _prune(self) -> None:
        keep = self.cfg.series.keep_recent
        done = [uid for uid, s in self._series.items() if s.verdict is not None]
        for uid in done[: max(0, len(done) - keep)]:
            del self._series[uid]

    # ---------------------------------------------------------------------------------------- queries
    def get(self, uid: str) -> SeriesState | None:
        with self._lock:
            return self._series.get(uid)

    def all(self) -> list[SeriesState]:
        with self._lock:
            return list(self._series.values())
