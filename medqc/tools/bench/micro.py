"""``medqc bench``: ingest, inference and end-to-end throughput, side by side, in one run, on one study.

Sections (each a function; each either runs or says why it was skipped):

  a. ``storescp``     DCMTK storescu → storescp (receive and write): this machine's ingest ceiling
  b. ``agent_receive`` storescu → ``medqc agent`` with inference off: what the agent's ingest costs
  c. ``agent_full``    storescu → ``medqc agent`` full pipeline (slices analysed per second), then
                       ``medqc replay`` at 60 slices/s: slice → result latency and last slice → verdict
  d. ``inference``     each available backend alone on preprocessed slices (ONNX Runtime fp32, INT8 when
                       the bundle has it, torch eager, and GPU backends where ``medqc.runners`` offers them)
  e. ``naive``         per slice: pydicom decode + preprocess + torch eager at batch 1 (no batching)

All sections use the same study (``medqc synth`` at 512², or a water-phantom series when the synth
module is not installed). Results: a table on stdout with ratios to (a) and (e), and JSON + PNG + a
Markdown table under ``--out`` (default ``bench/results``) named after the machine (GPU name, or
``cpu-<N>core``), with the machine description.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medqc.dcmtk import dcmtk as _tool
from medqc.errors import UsageError

log = logging.getLogger("medqc.bench")

SCHEMA = "medqc.bench/1"
TARGETS = {
    "full_pipeline_slices_per_s": (">=", 240.0),
    "p95_slice_to_result_ms_at_60": ("<=", 50.0),
    "last_slice_to_verdict_s": ("<=", 0.5),
    "onnxruntime_vs_naive_torch": (">=", 2.5),
}


# --------------------------------------------------------------------------------------------- helpers
def _skip(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def _failed(reason: str, **extra) -> dict:
    return {"status": "failed", "reason": reason, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _nodelay_env() -> dict:
    return dict(os.environ, TCP_NODELAY="1")  # DCMTK leaves Nagle on without it (22 slices/s on loopback)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine() -> dict:
    """What this was measured on."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "pydicom", "pynetdicom", "onnxruntime", "torch", "cv2", "tensorrt"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
    gpus = []
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):
            out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
            gpus = [dict(zip(("name", "memory", "driver"), (x.strip() for x in line.split(",")))) for line in out.splitlines() if line.strip()]
    dcmtk = ""
    storescp = _tool("storescp")
    if storescp:
        with contextlib.suppress(Exception):
            dcmtk = subprocess.run([storescp, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    label = _slug(gpus[0]["name"]) if gpus else f"cpu-{cores}core"
    return {
        "label": label,
        "cpu": cpu,
        "cores": cores,
        "memory_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "gpus": gpus,
        "versions": versions,
        "dcmtk": dcmtk,
        "commit": commit,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------------------------- the study
def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medqc" / "bench"


def make_study(folder: Path, n: int, size: int = 512, distinct: int | None = None) -> tuple[list[Path], str]:
    """``n`` axial CT slices at ``size``² in ``folder`` → (files, how they were made).

    ``medqc synth`` simulates ``distinct`` slices (default ``n``; the physics costs about a second per
    slice on 2 cores, so ``--quick`` simulates a few) and, when fewer than ``n``, the series is extended by
    repeating them with fresh SOP instance UIDs and continuing table positions. Simulated series are
    cached under ~/.cache/medqc/bench (same seed → same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    k = min(n, distinct or n)
    src, how = None, ""
    try:
        from medqc.synth import cli as _synth_cli  # noqa: F401

        import hashlib

        import medqc.synth as _synth

        h = hashlib.sha256()  # the simulator's source: a changed simulator is a new study
        for f in sorted(Path(_synth.__file__).parent.glob("*.py")):
            h.update(f.read_bytes())
        cached = _cache_dir() / f"synth-chest-{k}x{size}-seed0-{h.hexdigest()[:10]}"
        if not (cached / ".complete").is_file():
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "medqc", "synth", str(tmp), "--slices", str(k), "--matrix", str(size),
                                "--seed", "0", "--no-progress", "--workers", "2"],
                               capture_output=True, text=True, timeout=1800, env=dict(os.environ, MEDQC_LOG_LEVEL="WARNING"))
            if r.returncode == 0 and any(_is_dicom(p) for p in tmp.iterdir()):
                (tmp / ".complete").write_text("ok\n")
                shutil.rmtree(cached, ignore_errors=True)
                tmp.rename(cached)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("medqc synth failed (exit %s): %s; using a water phantom", r.returncode, r.stderr.strip()[-300:])
        if (cached / ".complete").is_file():
            src = sorted(p for p in cached.iterdir() if p.is_file() and _is_dicom(p))
            how = "medqc synth (chest, seed 0)" + (f", {k} simulated slices repeated to {n}" if k < n else "")
    except ImportError:
        pass
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("medqc synth failed: %s; using a water phantom", e)
    if not src:
        return write_phantom_series(folder, n, size), "water phantom (medqc synth not available)"
    return extend_series(src, folder, n), how


def extend_series(src: list[Path], folder: Path, n: int) -> list[Path]:
    """Copy ``src`` into ``folder`` as one series of ``n`` slices: repeated in order when ``n`` is larger,
    each copy with a fresh SOP instance UID, its InstanceNumber and a table position continuing the scan."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    dss = [pydicom.dcmread(str(p)) for p in src]
    dss.sort(key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    step = (z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 else -float(getattr(dss[0], "SliceThickness", 5.0) or 5.0)
    out = []
    for j in range(n):
        ds = dss[j % len(dss)]
        if n != len(dss) or j >= len(dss):
            ds = ds.copy()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = j + 1
            ipp = list(ds.ImagePositionPatient)
            ipp[2] = round(z[0] + j * step, 3)
            ds.ImagePositionPatient = ipp
            if "SliceLocation" in ds:
                ds.SliceLocation = ipp[2]
            if "ImagesInAcquisition" in ds:
                ds.ImagesInAcquisition = n
        q = folder / f"IM{j + 1:04d}.dcm"
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


def _is_dicom(p: Path) -> bool:
    with contextlib.suppress(OSError):
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    return False


def write_phantom_series(folder: Path, n: int, size: int = 512) -> list[Path]:
    """A 20 cm water cylinder in air with Gaussian noise, 0.7 mm pixels, 2.5 mm slices, count known."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    px = 350.0 / size
    r = np.hypot((yy - size / 2) * px, (xx - size / 2) * px)
    body = np.where(r < 100, 0.0, -1000.0)
    body = np.where(r > 175, -3024.0, body)  # outside the reconstructed field
    files = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = folder / f"CT{i + 1:04d}.dcm"
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "medqc bench", "ABDOMEN"
        ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH"
        ds.SeriesNumber, ds.InstanceNumber, ds.ImagesInAcquisition = 2, i + 1, n
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-175.0, -175.0, -2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [px, px]
        ds.SliceThickness = 2.5
        ds.KVP, ds.CTDIvol, ds.ReconstructionDiameter = 120, 10.0, 350.0
        ds.PatientPosition = "HFS"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        hu = body + np.where(body > -2000, rng.normal(0, 12, body.shape), 0)
        ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype(np.int16).tobytes()
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def reuid_copy(files: list[Path], folder: Path) -> list[Path]:
    """The same slices as a new study/series (fresh UIDs), so the agent sees a series it has not seen."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    new: dict[str, str] = {}
    out = []
    for i, p in enumerate(files):
        ds = pydicom.dcmread(str(p))
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                ds[kw].value = new.setdefault(str(ds[kw].value), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "ImagesInAcquisition" in ds:
            ds.ImagesInAcquisition = len(files)
        q = folder / f"L{i + 1:04d}.dcm"
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


# --------------------------------------------------------------------------------------------- (a) storescp
def _storescu(files: list[Path], port: int, aet: str = "ANY-SCP", timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [_tool("storescu"), "--max-pdu", "131072", "-aec", aet, "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_nodelay_env(), capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, r


def bench_storescp(files: list[Path], work: Path) -> dict:
    storescp = _tool("storescp")
    if not (storescp and _tool("storescu")):
        return _skip("DCMTK storescp/storescu not installed (apt-get install dcmtk)")
    out = work / "storescp-out"
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([storescp, "--fork", "--max-pdu", "131072", "-od", str(out), str(port)], env=_nodelay_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not _wait_port(port, 10, proc):
            return _failed("storescp did not start listening")
        wall, r = _storescu(files, port)
    finally:
        _stop(proc)
    written = sum(1 for p in out.iterdir() if p.is_file())
    if r.returncode != 0 or written != len(files):
        return _failed(f"storescu exit {r.returncode}, {written}/{len(files)} written: {r.stderr.strip()[-300:]}")
    return {"status": "ran", "slices": len(files), "wall_s": round(wall, 3), "slices_per_s": round(len(files) / wall, 1),
            "what": "storescu → storescp --fork, TCP_NODELAY, 128 KiB PDUs, files written"}


# --------------------------------------------------------------------------------------------- (b, c) agent
class Agent:
    """``medqc agent`` as a subprocess on loopback ports, configured by a TOML file."""

    def __init__(self, work: Path, bundle: str | None, inference: bool, threads: int = 0, fsync: bool | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.inference = inference
        lines = [
            f'state_dir = "{work / "state"}"',
            'log_level = "warning"',
            "[dicom]", 'ae_title = "MEDQC"', 'bind = "127.0.0.1"', f"port = {self.port}",
            "[http]", f'bind = "127.0.0.1:{self.http_port}"',
            "[series]", "idle_timeout_s = 2.0",
            *(["[spool]", f"fsync = {'true' if fsync else 'false'}"] if fsync is not None else []),
            "[sinks.stdout]", "enabled = false",
            "[inference]",
        ]
        if bundle:
            lines.append(f'bundle = "{bundle}"')
        if threads:
            lines.append(f"threads = {threads}")
        self.config = work / "medqc.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = None
        self.log = work / "agent.log"

    def start(self, timeout: float = 60.0) -> str:
        """Start; '' when listening, else the reason."""
        try:
            from medqc.agent import daemon
        except ImportError as e:
            return f"'medqc agent' is not available in this install: {e}"
        parser = argparse.ArgumentParser()
        daemon.add_arguments(parser)
        opts = set(parser._option_string_actions)  # noqa: SLF001 - the options this agent build offers
        cmd = [sys.executable, "-m", "medqc", "agent"]
        if "--config" in opts:
            cmd += ["--config", str(self.config)]
        else:
            return "'medqc agent' has no --config option"
        if not self.inference:
            if "--no-inference" not in opts:
                return "'medqc agent' has no --no-inference option (receive-only mode)"
            cmd.append("--no-inference")
        env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._logf, stderr=subprocess.STDOUT)
        if not _wait_port(self.port, timeout, self.proc):
            self.stop()
            return f"the agent did not start listening within {timeout:g} s: {self.tail()}"
        self.http_up = _wait_port(self.http_port, 2.0, self.proc)  # optional: results are read from the store
        return ""

    def tail(self, n: int = 600) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-n:].strip()
        return ""

    @property
    def db_path(self) -> Path:
        return self.work / "state" / "medqc.sqlite"

    def _query(self, sql: str, args=()) -> list:
        """Read the agent's SQLite store (WAL: readers never block its writer)."""
        import sqlite3

        if not self.db_path.is_file():
            return []
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        finally:
            con.close()

    def slice_times(self, uid: str) -> list[tuple[str, float, float]]:
        return [(r[0], r[1] or 0.0, r[2] or 0.0) for r in
                self._query("SELECT sop_uid, received_at, analysed_at FROM slices WHERE series_uid = ?", (uid,))]

    def verdict(self, uid: str) -> tuple[str | None, float | None]:
        rows = self._query("SELECT verdict, completed_at FROM series WHERE uid = ?", (uid,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def wait_series(self, uid: str, n: int, timeout: float) -> tuple[list, str | None, float | None]:
        """Wait until ``n`` slices of ``uid`` are stored with a verdict (or the timeout)."""
        deadline = time.time() + timeout
        while True:
            times = self.slice_times(uid)
            verdict, completed = self.verdict(uid)
            if (len(times) >= n and verdict) or time.time() > deadline or (self.proc is not None and self.proc.poll() is not None):
                return times, verdict, completed
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            import signal

            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self._logf.close()


def _series_uid(files: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(str(files[0]), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def bench_agent_receive(files: list[Path], work: Path, bundle: str | None) -> dict:
    if not _tool("storescu"):
        return _skip("DCMTK storescu not installed")
    agent = Agent(work / "agent-receive", bundle, inference=False)
    why = agent.start()
    if why:
        return _skip(why)
    try:
        wall, r = _storescu(files, agent.port, "MEDQC")
    finally:
        agent.stop()
    if r.returncode != 0:
        return _failed(f"storescu exit {r.returncode}: {r.stderr.strip()[-300:]}; agent: {agent.tail()}")
    return {"status": "ran", "slices": len(files), "wall_s": round(wall, 3), "slices_per_s": round(len(files) / wall, 1),
            "what": "storescu → medqc agent --no-inference (spooled and acknowledged)"}


def _config_has(dotted: str) -> bool:
    from medqc.config import load_config

    try:
        load_config(None, {dotted: False})
        return True
    except Exception:
        return False


def bench_agent_full(files: list[Path], study_dir: Path, work: Path, bundle: str | None, latency_slices: list[Path], wait_s: float = 180,
                     fsync: bool | None = None) -> dict:
    if not _tool("storescu"):
        return _skip("DCMTK storescu not installed")
    if fsync is not None and not _config_has("spool.fsync"):
        return _skip("this agent has no spool.fsync setting")
    agent = Agent(work / ("agent-full" if fsync is None else f"agent-full-fsync-{fsync}"), bundle, inference=True, fsync=fsync)
    why = agent.start()
    if why:
        return _skip(why)
    try:
        uid = _series_uid(files)
        t0 = time.time()
        wall, r = _storescu(files, agent.port, "MEDQC")
        if r.returncode != 0:
            return _failed(f"storescu exit {r.returncode}: {r.stderr.strip()[-300:]}; agent: {agent.tail()}")
        times, verdict, _ = agent.wait_series(uid, len(files), wait_s)
        done = [a for _, _, a in times if a > 0]
        res = {"status": "ran", "slices": len(files), "ingest_wall_s": round(wall, 3), "ingest_slices_per_s": round(len(files) / wall, 1),
               "slices_analysed": len(times), "verdict": verdict,
               "what": "storescu → medqc agent (spool, decode, preprocess, batch, infer, checks, store); analysed_at from the agent's store"}
        if len(done) < len(files):
            res["status"] = "failed"
            res["reason"] = f"only {len(done)} of {len(files)} slices analysed within {wait_s:g} s; agent: {agent.tail()}"
            return res
        span = max(done) - t0
        res["wall_s"] = round(span, 3)
        res["slices_per_s"] = round(len(files) / span, 1)
        lat = [(a - rcv) * 1e3 for _, rcv, a in times if a > 0 and rcv > 0]
        from medqc.tools.replay.send import percentiles

        res["slice_to_result_ms_at_full_speed"] = percentiles(lat)
        # latency at scanner pace: a fresh series (new UIDs) through medqc replay at 60 slices/s
        res["latency_at_60"] = _latency_at_rate(latency_slices, agent, 60.0)
        return res
    finally:
        agent.stop()


def _latency_at_rate(files: list[Path], agent: Agent, rate: float, wait_s: float = 60.0) -> dict:
    from medqc.tools.replay.send import percentiles, replay

    if not files:
        return _skip("no latency study")
    try:
        result, records = replay([str(p) for p in files], "127.0.0.1", agent.port, "MEDQC", "MEDQC_BENCH", "rate", rate)
    except Exception as e:
        return _failed(f"{type(e).__name__}: {e}")
    t = result["transport"]
    uid = _series_uid(files)
    times, verdict, completed = agent.wait_series(uid, len(files), wait_s)
    sent = {r.sop_instance_uid: r for r in records if r.ok}
    s2r = [(a - rcv) * 1e3 for _, rcv, a in times if a > 0 and rcv > 0]
    send2r = [(a - sent[u].sent_at) * 1e3 for u, _, a in times if a > 0 and u in sent]
    last_ack = max((r.acked_at for r in records if r.ok), default=None)
    out = {
        "status": "ran" if (t["sent"] == len(files) and len(s2r) == len(files)) else "failed",
        "rate": rate,
        "slices": t["sent"],
        "achieved_rate_slices_per_s": (t["series"][0].get("rate_slices_per_s") if t["series"] else None),
        "c_store_rtt_ms": t["c_store_rtt_ms"],
        "slice_to_result_ms": percentiles(s2r),
        "send_to_result_ms": percentiles(send2r),
        "verdict": verdict,
        "last_slice_to_verdict_s": percentiles([completed - last_ack] if (completed and last_ack) else []),
        "how": "received_at → analysed_at of each slice and the series completed_at, read from the agent's store; "
               "last slice = the C-STORE response of the last instance",
    }
    if out["status"] != "ran":
        out["reason"] = f"{t['sent']} sent, {len(s2r)} analysed, verdict {verdict!r} within {wait_s:g} s; {t['errors']}"
    return out


# --------------------------------------------------------------------------------------------- (d) inference
def _hu(ds) -> "object":
    """HU float32 of an uncompressed CT slice straight from PixelData (pixel_array is ~7x slower)."""
    import numpy as np

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and not ts.is_compressed and int(ds.BitsAllocated) == 16 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        dt = np.dtype("<i2" if int(ds.PixelRepresentation) else "<u2")
        if not ts.is_little_endian:
            dt = dt.newbyteorder(">")
        px = np.frombuffer(ds.PixelData, dtype=dt, count=int(ds.Rows) * int(ds.Columns)).reshape(int(ds.Rows), int(ds.Columns))
    else:
        px = ds.pixel_array
    return px.astype(np.float32) * np.float32(float(getattr(ds, "RescaleSlope", 1) or 1)) + np.float32(float(getattr(ds, "RescaleIntercept", 0) or 0))


def load_slices(files: list[Path], params) -> tuple["object", dict]:
    """Decode + preprocess every file once, one at a time (the agent's per-slice work, timed separately
    from inference) → (N, C, S, S) array, timing section."""
    import numpy as np
    import pydicom

    from medqc.preprocess import preprocess

    out, dec_ms, pre_ms = [], [], []
    for p in files:
        t0 = time.perf_counter()
        ds = pydicom.dcmread(str(p))
        hu = _hu(ds)
        t1 = time.perf_counter()
        out.append(preprocess(hu, tuple(float(v) for v in ds.PixelSpacing), params))
        t2 = time.perf_counter()
        dec_ms.append((t1 - t0) * 1e3)
        pre_ms.append((t2 - t1) * 1e3)
    total = sum(dec_ms) + sum(pre_ms)
    sec = {"status": "ran", "slices": len(files), "wall_s": round(total / 1e3, 3), "slices_per_s": round(len(files) / (total / 1e3), 1),
           "decode_ms_p50": round(float(np.median(dec_ms)), 3), "preprocess_ms_p50": round(float(np.median(pre_ms)), 3),
           "what": "pydicom dcmread + HU from PixelData + medqc.preprocess, one slice at a time"}
    return np.stack(out), sec


def _time_runner(runner, x, batch: int, min_s: float) -> dict:
    import numpy as np

    n = x.shape[0]
    for _ in range(2):  # warm-up (allocations, lazy init, engine tactics)
        runner.infer(x[:batch])
    done, t0, calls = 0, time.perf_counter(), []
    while True:
        for i in range(0, n, batch):
            c0 = time.perf_counter()
            runner.infer(x[i:i + batch])
            calls.append((time.perf_counter() - c0) * 1e3 / max(1, min(batch, n - i)))
            done += min(batch, n - i)
        el = time.perf_counter() - t0
        if el >= min_s:
            break
    return {"status": "ran", "batch": batch, "slices": done, "wall_s": round(el, 3), "slices_per_s": round(done / el, 1),
            "ms_per_slice_p50": round(float(np.median(calls)), 3)}


def bench_inference(bundle, x, batch: int, min_s: float, threads: int = 0) -> dict:
    from medqc.runners import available_backends, make_runner

    out = {}
    for name, (ok, why) in available_backends(bundle).items():
        if not ok:
            out[name] = _skip(why)
            continue
        if name == "torch-cuda" and (out.get("torch") or {}).get("describe", {}).get("device", "cpu") != "cpu":
            out[name] = _skip("the same runner as torch on this CUDA machine (row above)")
            continue
        opts = {"threads": threads} if (threads and name.startswith("onnxruntime")) else {}
        try:
            with make_runner(name, bundle, **opts) as runner:
                res = _time_runner(runner, x, batch, min_s)
                res["describe"] = runner.describe()
                if name == "torch" and res["describe"].get("device", "cpu") == "cpu":
                    res = _best_torch_threads(runner, x, batch, min_s, res)
        except Exception as e:
            res = _failed(f"{type(e).__name__}: {e}")
        out[name] = res
        if name == "torch" and res.get("status") == "ran" and res["describe"].get("device", "cpu") != "cpu":
            # a CUDA machine: torch on the CPU too, the eager reference for the ratio
            with contextlib.suppress(Exception), make_runner("torch", bundle, device="cpu", amp=False) as r2:
                res2 = _time_runner(r2, x, batch, min_s)
                res2["describe"] = r2.describe()
                out["torch-cpu"] = res2
        if name == "torch" and res.get("status") == "ran" and res["describe"].get("device", "cpu") != "cpu":
            out["torch-cuda-graph"] = _bench_cuda_graph(bundle, x, batch, min_s)
    return out


def _best_torch_threads(runner, x, batch: int, min_s: float, first: dict) -> dict:
    """torch on the CPU: also one thread (OpenMP busy-waiting on a shared 2-core box); keep the faster."""
    import torch

    default = torch.get_num_threads()
    first["torch_threads"] = default
    if default == 1:
        return first
    try:
        torch.set_num_threads(1)
        one = _time_runner(runner, x, batch, min_s)
    finally:
        torch.set_num_threads(default)
    one["torch_threads"] = 1
    one["describe"] = first["describe"]
    best = max((first, one), key=lambda d: d["slices_per_s"])
    best = dict(best)
    best["passes"] = [{k: d[k] for k in ("torch_threads", "slices_per_s", "ms_per_slice_p50")} for d in (first, one)]
    return best


def _bench_cuda_graph(bundle, x, batch: int, min_s: float) -> dict:
    """torch CUDA FP16 with the forward pass captured once in a CUDA graph (static batch)."""
    try:
        import torch

        from medqc.models import load_checkpoint

        _, model, _ = load_checkpoint(bundle.verify("checkpoint"))
        model = model.eval().cuda().half()
        static = torch.zeros((batch, *x.shape[1:]), device="cuda", dtype=torch.float16)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            out = model(static)
        xs = torch.from_numpy(x).half()
        n = (x.shape[0] // batch) * batch or batch
        done, t0, calls = 0, time.perf_counter(), []
        while True:
            for i in range(0, n, batch):
                c0 = time.perf_counter()
                chunk = xs[i:i + batch]
                if chunk.shape[0] < batch:
                    chunk = torch.cat([chunk, xs[: batch - chunk.shape[0]]])
                static.copy_(chunk.cuda(non_blocking=True))
                g.replay()
                _ = out[0].float().cpu()
                calls.append((time.perf_counter() - c0) * 1e3 / batch)
                done += batch
            el = time.perf_counter() - t0
            if el >= min_s:
                break
        import statistics

        return {"status": "ran", "batch": batch, "slices": done, "wall_s": round(el, 3), "slices_per_s": round(done / el, 1),
                "ms_per_slice_p50": round(statistics.median(calls), 3), "describe": {"backend": "torch", "device": "cuda", "precision": "fp16", "cuda_graph": True}}
    except Exception as e:
        return _failed(f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------- (e) naive
def bench_naive(files: list[Path], bundle, min_s: float) -> dict:
    """One slice at a time: full pydicom decode (pixel_array), HU, the shared preprocess, torch eager batch 1."""
    import numpy as np
    import pydicom

    from medqc.preprocess import preprocess
    from medqc.runners import backend_class

    try:
        ok, why = backend_class("torch").is_available(bundle)
    except Exception as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        return _skip(f"naive baseline needs torch: {why}")
    try:
        runner = backend_class("torch")(bundle, device="cpu", amp=False)
    except Exception as e:
        return _skip(f"naive baseline needs torch: {e}")
    params = bundle.preprocess
    import torch

    default_threads = torch.get_num_threads()
    passes = {}
    with runner:
        # torch's default (one OpenMP thread per core) and one thread: on a busy 2-core box OpenMP's
        # busy-waiting can make the default several times slower; the baseline gets the better of the two
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            runner.infer(np.zeros((1, *runner.input_shape), np.float32))
            infer_ms, total_ms = [], []
            t0 = time.perf_counter()
            while True:
                for p in files:
                    c0 = time.perf_counter()
                    ds = pydicom.dcmread(str(p))
                    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                    x = preprocess(hu, tuple(float(v) for v in ds.PixelSpacing), params)[None]
                    i0 = time.perf_counter()
                    runner.infer(x)
                    c1 = time.perf_counter()
                    infer_ms.append((c1 - i0) * 1e3)
                    total_ms.append((c1 - c0) * 1e3)
                el = time.perf_counter() - t0
                if el >= min_s:
                    break
            n = len(total_ms)
            passes[threads] = {"torch_threads": threads, "slices": n, "wall_s": round(el, 3), "slices_per_s": round(n / el, 1),
                               "ms_per_slice_p50": round(float(np.median(total_ms)), 3),
                               "inference_only_slices_per_s": round(1e3 / float(np.mean(infer_ms)), 1),
                               "inference_ms_p50": round(float(np.median(infer_ms)), 3)}
        torch.set_num_threads(default_threads)
    best = max(passes.values(), key=lambda d: d["slices_per_s"])
    return {"status": "ran", "batch": 1, **best, "passes": list(passes.values()), "describe": runner.describe(),
            "what": "per slice: pydicom dcmread + pixel_array + preprocess + torch eager (batch 1); the faster of torch's default threads and 1 thread"}


# --------------------------------------------------------------------------------------------- report
def _rate(sec: dict | None) -> float | None:
    if sec and sec.get("status") == "ran" and isinstance(sec.get("slices_per_s"), (int, float)):
        return float(sec["slices_per_s"])
    return None


def table_rows(res: dict) -> list[dict]:
    s = res["sections"]
    ceiling, naive = _rate(s.get("storescp")), _rate(s.get("naive"))
    rows = []

    def add(key, label, sec):
        r = _rate(sec)
        rows.append({
            "key": key, "what": label, "status": (sec or {}).get("status", "skipped"),
            "slices_per_s": r,
            "ms_per_slice": round(1e3 / r, 3) if r else None,
            "x_storescp": round(r / ceiling, 2) if (r and ceiling) else None,
            "x_naive": round(r / naive, 2) if (r and naive) else None,
            "note": (sec or {}).get("reason", ""),
        })

    add("a", "DCMTK storescu → storescp (ingest ceiling)", s.get("storescp"))
    add("b", "agent, receive only", s.get("agent_receive"))
    add("c", "agent, full pipeline (analysed)", s.get("agent_full"))
    if s.get("agent_full_nofsync"):
        add("c", "agent, full pipeline, spool.fsync = false", s.get("agent_full_nofsync"))
    if s.get("decode_preprocess"):
        add("d", "decode + preprocess (per slice, no inference)", s.get("decode_preprocess"))
    for name, sec in (s.get("inference") or {}).items():
        if isinstance(sec, dict) and "status" in sec:
            add("d", f"inference: {name}" + (f" (batch {sec['batch']})" if sec.get("batch") else ""), sec)
    add("e", "naive: pydicom + torch eager, batch 1", s.get("naive"))
    return rows


def targets(res: dict) -> dict:
    s = res["sections"]
    full = s.get("agent_full") or {}
    lat = full.get("latency_at_60") or {}
    vals = {
        "full_pipeline_slices_per_s": _rate(full),
        "p95_slice_to_result_ms_at_60": ((lat.get("slice_to_result_ms") or {}).get("p95")),
        "last_slice_to_verdict_s": ((lat.get("last_slice_to_verdict_s") or {}).get("max")),
        "onnxruntime_vs_naive_torch": None,
    }
    ort = _rate((s.get("inference") or {}).get("onnxruntime"))
    naive = s.get("naive") or {}
    if ort and naive.get("status") == "ran":
        vals["onnxruntime_vs_naive_torch"] = round(ort / naive["inference_only_slices_per_s"], 2)
    out = {}
    for k, (op, goal) in TARGETS.items():
        v = vals[k]
        out[k] = {"value": v, "target": f"{op} {goal:g}", "met": None if v is None else (v >= goal if op == ">=" else v <= goal)}
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"### {m['label']} — {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB" + (f", {m['gpus'][0]['name']}" if m["gpus"] else ""),
        "",
        f"Study: {res['study']['slices']} slices at {res['study']['size']}² ({res['study']['source']}); "
        f"bundle: {res.get('bundle', {}).get('name', '—')}; commit {m['commit']}; {res['created']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in (m.get('load_avg_at_start') or []))}.",
        "",
        "| | what | slices/s | ms/slice | × (a) | × (e) | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res["table"]:
        f = lambda v, d=1: "—" if v is None else (f"{v:,.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        note = r["note"].replace("|", "/").replace("\n", " ")[:120] if r["status"] != "ran" else ""
        lines.append(f"| {r['key']} | {r['what']} | {f(r['slices_per_s'])} | {f(r['ms_per_slice'], 3)} | {f(r['x_storescp'], 2)} | {f(r['x_naive'], 2)} | {r['status'] if r['status'] != 'ran' else ''} {note} |")
    lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {'—' if t['value'] is None else t['value']} | {t['target']} | {'—' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    lat = (res["sections"].get("agent_full") or {}).get("latency_at_60") or {}
    if lat.get("status") == "ran":
        sr = lat.get("slice_to_result_ms") or {}
        vs = lat.get("last_slice_to_verdict_s") or {}
        if sr.get("n"):
            lines += ["", f"At 60 slices/s: slice arrival → result p50 {sr['p50']} ms, p95 {sr['p95']} ms, p99 {sr['p99']} ms, max {sr['max']} ms"
                      + (f"; last slice → verdict {vs.get('max')} s" if vs.get("n") else "") + "."]
    return "\n".join(lines) + "\n"


def print_table(res: dict, out=sys.stdout) -> None:
    w = out.write
    m = res["machine"]
    w(f"medqc bench — {m['label']}: {m['cpu']}, {m['cores']} cores; study {res['study']['slices']} × {res['study']['size']}² ({res['study']['source']})\n")
    w(f"{'':2} {'what':<46} {'slices/s':>10} {'ms/slice':>9} {'×(a)':>7} {'×(e)':>7}\n")
    for r in res["table"]:
        f = lambda v, spec: format("—", ">" + spec.split(".")[0]) if v is None else format(v, spec)  # noqa: E731
        w(f"{r['key']:2} {r['what'][:46]:<46} {f(r['slices_per_s'], '10.1f')} {f(r['ms_per_slice'], '9.3f')} {f(r['x_storescp'], '7.2f')} {f(r['x_naive'], '7.2f')}")
        w(f"  [{r['status']}: {r['note'][:100]}]\n" if r["status"] != "ran" else "\n")
    w("targets:\n")
    for k, t in res["targets"].items():
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        w(f"  {k:<32} {'—' if t['value'] is None else t['value']!s:>10}  ({t['target']})  {met}\n")
    out.flush()


def write_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["table"] if r["slices_per_s"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    names = [f"{r['key']}: {r['what']}" for r in rows]
    ax1.barh(range(len(rows)), [r["slices_per_s"] for r in rows], color=["C%d" % ("abcde".index(r["key"])) for r in rows])
    ax1.set_yticks(range(len(rows)))
    ax1.set_yticklabels([n[:48] for n in names], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.axvline(240, color="k", ls="--", lw=0.8)
    ax1.text(240, len(rows) - 0.5, " 240/s target", fontsize=7, va="bottom")
    ax1.set_xlabel("slices per second (log)")
    ax1.set_title(f"{res['machine']['label']}: throughput")
    ax1.grid(True, axis="x", alpha=0.3)
    lat = (res["sections"].get("agent_full") or {}).get("latency_at_60") or {}
    sr, rtt = lat.get("slice_to_result_ms") or {}, lat.get("c_store_rtt_ms") or {}
    if sr.get("n") or rtt.get("n"):
        qs = ["p50", "p90", "p95", "p99", "max"]
        for d, label in ((rtt, "C-STORE round trip"), (sr, "slice arrival → result")):
            if d.get("n"):
                ax2.plot(qs, [d.get(q) for q in qs], marker="o", label=label)
        ax2.axhline(50, color="k", ls="--", lw=0.8, label="50 ms target (p95)")
        ax2.set_ylabel("ms")
        ax2.set_title("latency at 60 slices/s")
        ax2.legend(fontsize=8)
        ax2.grid(True, alpha=0.3)
    else:
        ax2.text(0.5, 0.5, "latency not measured\n(agent section skipped)", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- driver
def run_bench(out: Path, quick: bool = False, bundle_path: str | None = None, slices: int | None = None,
              sections: tuple[str, ...] = ("a", "b", "c", "d", "e"), threads: int = 0, keep: bool = False,
              study_dir: str | None = None) -> dict:
    from medqc.bundle import BundleError, load_bundle

    n = slices or (24 if quick else 300)
    min_s = 0.5 if quick else 3.0
    res: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick,
                 "machine": machine(), "sections": {}}
    bundle = None
    try:
        bundle = load_bundle(bundle_path)
        res["bundle"] = {"path": str(bundle.root), "name": bundle.name, "version": bundle.version,
                         "input": [bundle.preprocess.channels, bundle.preprocess.size, bundle.preprocess.size],
                         "files": sorted(bundle.manifest.get("files", {}))}
    except BundleError as e:
        res["bundle"] = {"error": str(e)}
    tmp = Path(tempfile.mkdtemp(prefix="medqc-bench-"))
    step = _Steps(len(sections) + 1)
    try:
        step("writing the study")
        study = tmp / "study"
        if study_dir:
            files = sorted(p for p in Path(study_dir).rglob("*") if p.is_file() and _is_dicom(p))
            if slices:
                files = files[:slices]
            source = f"{study_dir} ({len(files)} files)"
            with contextlib.suppress(Exception):
                import pydicom as _pd

                if "medqc" in str(_pd.dcmread(str(files[0]), stop_before_pixels=True).get("Manufacturer", "")).lower() or \
                        any((p / "truth.json").is_file() for p in (Path(study_dir), *Path(study_dir).parents[:1])):
                    source = f"medqc synth series given with --study ({len(files)} files)"
            study = Path(study_dir)
        else:
            files, source = make_study(study, n, distinct=6 if quick else None)
        lat_files = reuid_copy(files[: 30 if quick else 120], tmp / "latency-study") if "c" in sections else []
        import pydicom

        size = int(pydicom.dcmread(str(files[0]), stop_before_pixels=True).Rows)
        res["study"] = {"slices": len(files), "size": size, "source": source,
                        "bytes_per_slice": int(sum(p.stat().st_size for p in files) / max(1, len(files)))}
        S = res["sections"]
        no_model = f"no model bundle: {res['bundle'].get('error')}" if bundle is None else ""
        if "a" in sections:
            step("(a) storescu → storescp")
            S["storescp"] = bench_storescp(files, tmp)
        if "b" in sections:
            step("(b) agent, receive only")
            S["agent_receive"] = bench_agent_receive(files, tmp, bundle_path)
        if "c" in sections:
            step("(c) agent, full pipeline + latency at 60/s")
            S["agent_full"] = _skip(no_model) if no_model else bench_agent_full(files, study, tmp, bundle_path, lat_files)
            # the same without fsync before each ACK (spool.fsync = false): what durability costs here
            S["agent_full_nofsync"] = _skip(no_model) if no_model else bench_agent_full(
                files, study, tmp, bundle_path, reuid_copy(lat_files, tmp / "latency-study-2") if lat_files else [], fsync=False)
        if "d" in sections or "e" in sections:
            x = None
            if bundle is not None:
                x, S["decode_preprocess"] = load_slices(files, bundle.preprocess)
        if "d" in sections:
            step("(d) inference per backend")
            batch = 16
            S["inference"] = {"all": _skip(no_model)} if no_model else bench_inference(bundle, x, batch, min_s, threads)
        if "e" in sections:
            step("(e) naive baseline")
            S["naive"] = _skip(no_model) if no_model else bench_naive(files[: min(len(files), 60)], bundle, min_s)
    finally:
        step.close()
        if keep:
            res["workdir"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    names = {"a": "storescp", "b": "agent_receive", "c": "agent_full", "d": "inference", "e": "naive"}
    if "c" not in sections:
        res["sections"].setdefault("agent_full_nofsync", _skip(f"not selected (--only {''.join(sections)})"))
    for letter, key in names.items():
        res["sections"].setdefault(key, _skip(f"not selected (--only {''.join(sections)})"))
    res["table"] = table_rows(res)
    res["targets"] = targets(res)
    out.mkdir(parents=True, exist_ok=True)
    stem = res["machine"]["label"] + ("-quick" if quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    try:
        write_plot(res, out / f"{stem}.png")
        res["plot"] = str(out / f"{stem}.png")
    except ImportError:
        res["plot"] = None
        log.warning("matplotlib is not installed: no PNG written")
    res["json"] = str(out / f"{stem}.json")
    return res


class _Steps:
    """A tqdm progress bar over the sections (to stderr), or log lines without tqdm."""

    def __init__(self, total: int):
        self.bar = None
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="medqc bench", unit="step", file=sys.stderr, leave=False)
        self.started = False

    def __call__(self, what: str):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_postfix_str(what)
        else:
            log.info("%s", what)
        self.started = True

    def close(self):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small study and short timings (CI: under 90 s on 2 cores)")
    p.add_argument("--out", default="bench/results", metavar="DIR", help="where the JSON, PNG and Markdown table go (default bench/results)")
    p.add_argument("--bundle", default=None, metavar="DIR", help="model bundle (default: the embedded default)")
    p.add_argument("--slices", type=int, default=None, metavar="N", help="slices in the study (default 300; 24 with --quick)")
    p.add_argument("--only", default="abcde", metavar="SECTIONS", help="run only these sections, e.g. 'ad' (default abcde)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads for (d) (default: the runner's)")
    p.add_argument("--study", default=None, metavar="DIR", help="use this CT series (one series of uncompressed DICOM files) instead of a synthetic one")
    p.add_argument("--keep", action="store_true", help="keep the temporary study and agent state (path in the JSON)")


def run(args) -> int:
    only = tuple(dict.fromkeys(args.only.lower()))
    bad = [c for c in only if c not in "abcde"]
    if bad or not only:
        raise UsageError(f"--only {args.only!r}: use letters from a (storescp), b (agent receive), c (agent full), d (inference), e (naive)")
    if args.slices is not None and not 2 <= args.slices <= 5000:
        raise UsageError("--slices must be between 2 and 5000")
    if args.bundle and not Path(args.bundle).exists():
        raise UsageError(f"--bundle {args.bundle}: no such folder")
    if args.study:
        d = Path(args.study)
        if not d.is_dir() or not any(_is_dicom(p) for p in d.rglob("*") if p.is_file()):
            raise UsageError(f"--study {args.study}: not a folder with DICOM files")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    res = run_bench(Path(args.out), args.quick, args.bundle, args.slices, only, args.threads, args.keep, args.study)
    print_table(res)
    print(f"results: {res['json']}" + (f", {res['plot']}" if res.get("plot") else ""))
    failed = [k for k, v in res["sections"].items() if isinstance(v, dict) and v.get("status") == "failed"]
    failed += [f"inference:{k}" for k, v in (res["sections"].get("inference") or {}).items() if isinstance(v, dict) and v.get("status") == "failed"]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
