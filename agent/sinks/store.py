"""The SQLite store (``<state_dir>/medqc.sqlite``): series reports, findings, per-slice results, rejected
inputs and acknowledgements. It is a sink (written on its own thread) and answers the queries of the HTTP
API and the console. WAL mode; one connection guarded by a lock (reads are short)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from medqc.agent import faults
from medqc.agent.sinks.base import Sink

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (uid TEXT PRIMARY KEY, study_uid TEXT, verdict TEXT, slices INTEGER,
    updated_at REAL, completed_at REAL, report TEXT);
CREATE TABLE IF NOT EXISTS findings (finding_id TEXT PRIMARY KEY, series_uid TEXT, check_name TEXT, severity TEXT,
    raised_at REAL, updated_at REAL, body TEXT);
CREATE INDEX IF NOT EXISTS findings_updated ON findings(updated_at);
CREATE TABLE IF NOT EXISTS slices (series_uid TEXT, sop_uid TEXT, frame INTEGER, received_at REAL, analysed_at REAL,
    body TEXT, PRIMARY KEY (sop_uid, frame));
CREATE INDEX IF NOT EXISTS slices_series ON slices(series_uid);
CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, path TEXT, sop_uid TEXT,
    series_uid TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS acks (id INTEGER PRIMARY KEY AUTOINCREMENT, finding_id TEXT, who TEXT, note TEXT, at REAL);
"""


class Store(Sink):
    name = "store"

    def __init__(self, path: str | Path, privacy=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.privacy = privacy
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction (the connection autocommits otherwise): a kill inside it leaves none of it."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------- writes
    def on_slice(self, event) -> None:
        from medqc.agent.report import _clean

        result = event.result
        i = result.info
        body = {"sop_instance_uid": i.sop_instance_uid, "instance_number": i.instance_number, "frame": i.frame,
                "z": i.z, "scores": result.scores, "position_ref_mm": result.position_ref_mm, "error": result.error,
                "received_at": i.received_at, "analysed_at": result.analysed_at}
        with self._lock, self._transaction():
            self._db.execute("INSERT OR REPLACE INTO slices VALUES (?,?,?,?,?,?)",
                             (i.series_instance_uid, i.sop_instance_uid, i.frame, i.received_at, result.analysed_at,
                              json.dumps(_clean(body))))
            self._db.execute("INSERT INTO series (uid, study_uid, verdict, slices, updated_at) VALUES (?,?,NULL,1,?) "
                             "ON CONFLICT(uid) DO UPDATE SET slices = slices + 1, updated_at = excluded.updated_at, "
                             "verdict = NULL", (i.series_instance_uid, i.study_instance_uid, time.time()))

    def on_finding(self, finding) -> None:
        from medqc.agent.report import finding_dict

        d = finding_dict(finding)
        d["series_instance_uid"] = finding.series_instance_uid
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO findings VALUES (?,?,?,?,?,?,?) ON CONFLICT(finding_id) DO UPDATE SET "
                             "severity=excluded.severity, updated_at=excluded.updated_at, body=excluded.body",
                             (finding.finding_id or f"{finding.series_instance_uid}/{finding.check}/{now}",
                              finding.series_instance_uid, finding.check,
                              finding.severity, finding.raised_at or now, now, json.dumps(d, default=str)))

    def on_series(self, series) -> None:
        """``series.report`` was built with the verdict, under the series tracker's lock."""
        with self._lock, self._transaction():
            self._db.execute("INSERT INTO series VALUES (?,?,?,?,?,?,?) ON CONFLICT(uid) DO UPDATE SET "
                             "verdict=excluded.verdict, slices=excluded.slices, updated_at=excluded.updated_at, "
                             "completed_at=excluded.completed_at, report=excluded.report",
                             (series.uid, series.study_uid, series.verdict, len(series.results), time.time(),
                              series.completed_at, json.dumps(series.report, default=str)))
            faults.reached("store-commit")

    def on_rejected(self, rec: dict) -> None:
        with self._lock:
            self._db.execute("INSERT INTO rejected (at, path, sop_uid, series_uid, reason) VALUES (?,?,?,?,?)",
                             (time.time(), rec.get("path", ""), rec.get("sop_instance_uid", ""),
                              rec.get("series_instance_uid", ""), rec.get("reason", "")))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ queries
    def series_summaries(self, limit: int, since: float = 0.0, exclude: set | frozenset = frozenset()) -> list[dict]:
        """Up to ``limit`` series updated after ``since``, newest first, as ``report.series_summary`` entries
        (the stored report without its per-slice rows; a series still open here: its counts only)."""
        from medqc.agent.report import series_summary

        with self._lock:
            rows = self._db.execute("SELECT uid, study_uid, verdict, slices, updated_at, json_remove(report, '$.per_slice') "
                                    "FROM series WHERE updated_at > ? ORDER BY updated_at DESC LIMIT ?",
                                    (float(since), int(limit) + len(exclude))).fetchall()
        out = []
        for uid, study, verdict, slices, updated, rep in rows:
            if uid in exclude:
                continue
            rep = json.loads(rep) if rep else {"series_instance_uid": uid, "study_instance_uid": study,
                                               "verdict": verdict, "slices": slices}
            out.append(series_summary(rep, updated))
        return out[:limit]

    def get_series(self, uid: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT report, verdict, slices, study_uid FROM series WHERE uid = ?", (uid,)).fetchone()
            if row is None:
                return None
            if row[0]:
                rep = json.loads(row[0])
            else:  # still open: findings and slices so far
                rep = {"series_instance_uid": uid, "verdict": None, "slices": row[2], "findings": [], "per_slice": []}
                rep["findings"] = [json.loads(b) for (b,) in self._db.execute(
                    "SELECT body FROM findings WHERE series_uid = ? ORDER BY raised_at", (uid,))]
                rep["per_slice"] = [json.loads(b) for (b,) in self._db.execute(
                    "SELECT body FROM slices WHERE series_uid = ? ORDER BY received_at", (uid,))]
            acks = self._db.execute("SELECT a.finding_id, a.who, a.note, a.at FROM acks a JOIN findings f "
                                    "ON a.finding_id = f.finding_id WHERE f.series_uid = ?", (uid,)).fetchall()
        rep["acknowledgements"] = [{"finding_id": a[0], "who": a[1], "note": a[2], "at": a[3]} for a in acks]
        return rep

    def findings(self, since: float = 0.0) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT body, updated_at FROM findings WHERE updated_at > ? ORDER BY updated_at",
                                    (float(since),)).fetchall()
        out = []
        for body, upd in rows:
            d = json.loads(body)
            d["updated_at"] = upd
            out.append(d)
        return out

    def slice_times(self, uid: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT sop_uid, frame, received_at, analysed_at FROM slices WHERE series_uid = ?",
                                    (uid,)).fetchall()
        return [{"sop_instance_uid": r[0], "frame": r[1], "received_at": r[2], "analysed_at": r[3]} for r in rows]

    def slice_instances(self) -> list[str]:
        """The SOP Instance UID of every stored slice row (one per row: a UID twice means a slice stored twice)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT sop_uid FROM slices")]

    def rejected(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT at, path, sop_uid, series_uid, reason FROM rejected ORDER BY id DESC LIMIT ?",
                                    (int(limit),)).fetchall()
        return [{"at": r[0], "path": r[1], "sop_instance_uid": r[2], "series_instance_uid": r[3], "reason": r[4]} for r in rows]

    def acknowledge(self, finding_id: str, who: str, note: str = "") -> dict:
        now = time.time()
        with self._lock:
            if self._db.execute("SELECT 1 FROM findings WHERE finding_id = ?", (finding_id,)).fetchone() is None:
                raise KeyError(f"unknown finding {finding_id}")
            self._db.execute("INSERT INTO acks (finding_id, who, note, at) VALUES (?,?,?,?)", (finding_id, who, note, now))
        return {"finding_id": finding_id, "who": who, "note": note, "at": now}
