"""Coverage-guided fuzzing (atheris, libFuzzer) of the decode path: any bytes, written as a spool file, go
through ``medqc.agent.decode.decode_file``, which must return records (``Decoded``, each with its header
facts and either pixels, an error or a reason it is ignored) or reject the file with ``NotDicom``.
Anything else — another exception (a ``MemoryError`` under the address-space cap below among them), a hang
(libFuzzer ``-timeout``) — is a crash, written by libFuzzer as ``crash-<sha1>`` / ``timeout-<sha1>`` / ``oom-<sha1>`` in the working folder
(or under ``-artifact_prefix``).

    python tests/fuzz/fuzz_decode.py --seeds CORPUS [--real-ct DIR] -- CORPUS -max_total_time=600 -timeout=10

The fuzzing runs with its address space capped (``--address-space-mb``, 3072 by default), as on a box that does
not overcommit memory: an input that makes the decoding allocate far beyond the file's size then fails as a
``MemoryError`` here too, not only on such a box.

libFuzzer's own ``-rss_limit_mb`` reads the peak resident size, which Linux carries over ``exec`` from the
process that started the fuzzer: run from a test session holding real CT (1.7–1.9 GB), it measures that
session. The tests pass ``-rss_limit_mb=0`` and rely on the address-space cap.

``--seeds CORPUS`` first writes the seed inputs into CORPUS (kept between runs: libFuzzer adds what it
finds): synthetic CT slices (``medqc.synth``, 64² and 128², uncompressed), pydicom's own test files under
60 kB (JPEG, JPEG-LS, JPEG 2000, RLE, deflate, big endian, no file meta, truncated ones) and, with
``--real-ct``, the first slices of each real series (vendor headers and private tags). A crash input is
replayed with ``python tests/fuzz/fuzz_decode.py crash-<sha1>``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import pydicom  # noqa: F401 - instrumented: the parser's branches guide the search
    from medqc.agent import decode

SEED_MAX_BYTES = 600_000
_path = None


def check_one(data: bytes) -> None:
    global _path
    if _path is None:
        fd, name = tempfile.mkstemp(prefix="medqc-fuzz-", suffix=".dcm", dir=os.environ.get("MEDQC_FUZZ_TMP"))
        os.close(fd)
        _path = Path(name)
    _path.write_bytes(data)
    try:
        out = decode.decode_file(_path, received_at=0.0)
    except decode.NotDicom:
        return  # the clear rejection
    if not isinstance(out, list):
        raise TypeError(f"decode_file returned {type(out).__name__}, not a list")
    for d in out:
        if not isinstance(d, decode.Decoded) or d.info is None:
            raise TypeError(f"decode_file returned {d!r} among its records")
        if not isinstance(d.error, str) or not isinstance(d.ignored, str):
            raise TypeError("a record's error and ignored reason are strings")


def write_seeds(out: Path, real_ct: Path | None = None, per_series: int = 2) -> int:
    """Seed inputs into ``out`` (one file each, named by content hash); returns how many."""
    import glob
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    blobs: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        for matrix, region, seed in ((64, "head", 1), (128, "chest", 2)):
            d = Path(tmp) / f"synth-{matrix}"
            subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", region, "--slices", "2", "--matrix",
                            str(matrix), "--seed", str(seed), "--no-progress", str(d)], check=True, capture_output=True)
            blobs += [p.read_bytes() for p in sorted(d.glob("*.dcm"))]
    tf = Path(pydicom.__file__).parent / "data" / "test_files"
    for f in sorted(glob.glob(str(tf / "**" / "*.dcm"), recursive=True)):
        if os.path.getsize(f) < 60_000:
            blobs.append(Path(f).read_bytes())
    if real_ct is not None:
        by_dir: dict[Path, list[Path]] = {}
        for p in sorted(Path(real_ct).rglob("*")):
            if p.is_file() and p.stat().st_size < SEED_MAX_BYTES and not p.name.lower().endswith((".md", ".txt", ".json", ".csv")):
                with open(p, "rb") as fh:
                    head = fh.read(132)
                if head[128:132] == b"DICM":
                    by_dir.setdefault(p.parent, []).append(p)
        for files in by_dir.values():
            blobs += [p.read_bytes() for p in files[:per_series]]
    for b in blobs:
        (out / hashlib.sha1(b).hexdigest()).write_bytes(b)
    return len(blobs)


def main() -> None:
    warnings.simplefilter("ignore")  # pydicom warns about every odd element it reads
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--seeds", type=Path, default=None)
    ap.add_argument("--real-ct", type=Path, default=None)
    ap.add_argument("--address-space-mb", type=int, default=3072)
    ours, rest = ap.parse_known_args()
    if ours.seeds is not None:
        n = write_seeds(ours.seeds, ours.real_ct)
        print(f"{n} seed inputs in {ours.seeds}", file=sys.stderr, flush=True)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = ours.address_space_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    rest = [a for a in rest if a != "--"]
    atheris.Setup([sys.argv[0], *rest], check_one)
    try:
        atheris.Fuzz()
    finally:
        if _path is not None:
            _path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
