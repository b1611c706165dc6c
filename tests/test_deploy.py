"""The container images (Dockerfile.x86, Dockerfile.jetson) and the wheel they install.

The images cannot be built here (no Docker engine, no NVIDIA registry), so these tests check what can be
checked without one: the Dockerfiles are parsed (continuations, heredocs, ARG substitution) and their
facts compared with the project itself, the entrypoint script is syntax-checked and really started, and
the wheel the build stage produces from exactly the COPY'd sources installs into a clean venv (runtime
dependencies only, no torch) where ``medqc --help`` and ``medqc analyze`` work on a synthetic study."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from conftest import free_port, missing_peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.x86", "Dockerfile.jetson"]
PY = sys.executable


# ---- a small Dockerfile parser -------------------------------------------------------------------------
def parse_dockerfile(text: str) -> list[dict]:
    """Instructions as dicts {op, args, flags, heredoc, line}. Handles comments, backslash continuations and
    ``<<'EOF'`` heredocs (BuildKit syntax 1.4+)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        raw = lines[i]
        if not raw.strip() or raw.lstrip().startswith("#"):
            i += 1
            continue
        start, buf = i, raw
        while buf.endswith("\\"):
            i += 1
            nxt = lines[i]
            if nxt.lstrip().startswith("#"):
                continue
            buf = buf[:-1] + " " + nxt.strip()
        i += 1
        heredoc = None
        m = re.search(r"<<-?(['\"]?)(\w+)\1", buf)
        if m:
            end = m.group(2)
            body = []
            while lines[i] != end:
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body) + "\n"
        op, _, rest = buf.strip().partition(" ")
        words = shlex.split(rest) if not rest.strip().startswith("[") else None
        flags = {}
        if words:
            while words and words[0].startswith("--"):
                k, _, v = words.pop(0)[2:].partition("=")
                flags[k] = v
        out.append({"op": op.upper(), "rest": rest.strip(), "words": words, "flags": flags, "heredoc": heredoc, "line": start + 1})
    return out


def substitute(value: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def stages(instrs: list[dict]) -> tuple[dict, list[dict]]:
    """(global ARG defaults, [{name, image, instrs}])"""
    gargs, result = {}, []
    for ins in instrs:
        if ins["op"] == "ARG" and not result:
            k, _, v = ins["rest"].partition("=")
            gargs[k] = v.strip('"')
        elif ins["op"] == "FROM":
            w = ins["words"]
            name = w[2] if len(w) >= 3 and w[1].upper() == "AS" else None
            result.append({"name": name, "image": substitute(w[0], gargs), "instrs": []})
        elif result:
            result[-1]["instrs"].append(ins)
    return gargs, result


def entrypoint_script(instrs: list[dict]) -> tuple[str, str]:
    """(path, script text) of the ENTRYPOINT, whose file the Dockerfile writes with a COPY heredoc."""
    import json

    ep = [i for i in instrs if i["op"] == "ENTRYPOINT"][-1]
    argv = json.loads(ep["rest"])
    path = argv[0]
    for ins in instrs:
        if ins["op"] == "COPY" and ins["heredoc"] and ins["words"][-1] == path:
            assert ins["flags"].get("chmod") in ("0755", "755", "0555", "555"), "entrypoint must be executable"
            return path, ins["heredoc"]
    raise AssertionError(f"ENTRYPOINT {path} is not written by the Dockerfile")


@pytest.fixture(scope="module", params=DOCKERFILES)
def dockerfile(request):
    path = ROOT / request.param
    assert path.is_file(), f"{request.param} is missing"
    instrs = parse_dockerfile(path.read_text())
    gargs, st = stages(instrs)
    return {"name": request.param, "instrs": instrs, "args": gargs, "stages": st}


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- static checks --------------------------------------------------------------------------------------
def test_base_images_pinned_by_tag(dockerfile):
    assert len(dockerfile["stages"]) >= 2, "multi-stage: a build stage and a runtime stage"
    for st in dockerfile["stages"]:
        image = st["image"]
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        assert image.startswith("nvcr.io/nvidia/"), f"{image}: NVIDIA TensorRT / L4T base expected"
        repo, _, tag = image.rpartition(":")
        assert tag and "/" not in tag and tag != "latest", f"{image} is not pinned by tag"
        assert re.fullmatch(r"(\d{2}\.\d{2}-py3|r\d+\.\d+\.\d+)", tag), f"{image}: unexpected tag form {tag!r}"
    want = "tensorrt" if dockerfile["name"].endswith("x86") else "l4t-jetpack"
    assert want in dockerfile["stages"][-1]["image"]


def test_copy_sources_exist_and_pass_dockerignore(dockerfile):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(rel: str) -> bool:  # Docker semantics: last matching pattern wins, "!" re-includes
        state = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:].rstrip("/") if neg else p.rstrip("/")
            if fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/"):
                state = not neg
        return state

    n = 0
    for st in dockerfile["stages"]:
        for ins in st["instrs"]:
            if ins["op"] != "COPY" or "from" in ins["flags"] or ins["heredoc"]:
                continue
            for src in ins["words"][:-1]:
                assert (ROOT / src).exists(), f"{dockerfile['name']}:{ins['line']}: COPY source {src} does not exist"
                assert not ignored(src.rstrip("/")), f"{src} is excluded by .dockerignore"
                n += 1
    assert n >= 5
    # the runtime stage gets the wheel, never the source tree
    runtime = dockerfile["stages"][-1]["instrs"]
    assert not [i for i in runtime if i["op"] == "COPY" and "from" not in i["flags"] and not i["heredoc"]]
    assert any(i["op"] == "COPY" and i["flags"].get("from") == dockerfile["stages"][0]["name"] for i in runtime)
    assert any(i["op"] == "RUN" and ".whl" in i["rest"] and "pip install" in i["rest"] for i in runtime)


def test_user_not_root_ports_healthcheck_volume(dockerfile):
    from medqc.config import Config

    cfg = Config()
    runtime = dockerfile["stages"][-1]["instrs"]
    users = [i["rest"].split(":")[0] for i in runtime if i["op"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the container must not run as root"
    assert any("useradd" in i["rest"] and users[-1] in i["rest"] for i in runtime if i["op"] == "RUN")

    exposed = {int(w.split("/")[0]) for i in runtime if i["op"] == "EXPOSE" for w in i["words"]}
    http_port = int(cfg.http.bind.rpartition(":")[2])
    assert exposed == {cfg.dicom.port, http_port} == {11112, 8480}

    env = " ".join(i["rest"] for i in runtime if i["op"] == "ENV")
    # inside the container HTTP must listen on all interfaces, or the published port reaches nothing
    assert f"MEDQC_HTTP=0.0.0.0:{http_port}" in env
    assert f"MEDQC_DICOM_PORT={cfg.dicom.port}" in env
    assert "STATE_DIRECTORY=/var/lib/medqc" in env

    hc = [i for i in runtime if i["op"] == "HEALTHCHECK"]
    assert len(hc) == 1 and f"127.0.0.1:{http_port}/healthz" in hc[0]["rest"]
    assert "start-period" in hc[0]["flags"], "the first start builds the engine: HEALTHCHECK needs a start period"
    vols = [i["rest"] for i in runtime if i["op"] == "VOLUME"]
    assert vols and "/var/lib/medqc" in vols[0]


def test_entrypoint_script(dockerfile, tmp_path):
    path, script = entrypoint_script(dockerfile["instrs"])
    f = tmp_path / "entry.sh"
    f.write_text(script)
    r = subprocess.run(["sh", "-n", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # every command it execs is this project's console script with arguments `medqc agent` accepts
    scripts = _pyproject()["project"]["scripts"]
    execs = re.findall(r"^\s*exec (\S+) (.*?)(?<!\\)$", script.replace("\\\n", " "), re.M)
    assert execs and all(cmd in scripts for cmd, _ in execs), execs
    agent_line = [a for c, a in execs if a.startswith("agent")][0]
    argv = shlex.split(re.sub(r'"\$\{?(\w+)(?::-[^}"]*)?\}?"', r"X\1", agent_line).replace('"$@"', ""))
    argv = [a if not a.startswith("X") else ("11112" if "PORT" in a else "auto" if "BACKEND" in a else "0.0.0.0:8480" if "HTTP" in a else "/x") for a in argv]
    from medqc.cli import build_parser

    ns = build_parser().parse_args(argv)
    assert ns.command == "agent" and ns.http == "0.0.0.0:8480" and ns.port == 11112
    # the embedded Python snippets compile
    for snippet in re.findall(r"<<'PY'\n(.*?)\nPY\n", script, re.S):
        compile(snippet, "entrypoint-snippet", "exec")
    # the engine build uses the real export command and its flags
    engine = re.search(r"medqc export engine ([^|]*)", script.replace("\\\n", " ")).group(1)
    eargs = build_parser().parse_args(["export", "engine"] + [w for w in shlex.split(re.sub(r'"[^"]*"', "X", engine))])
    assert eargs.fp16 and eargs.export_command == "engine"


def test_entrypoints_identical():
    a, b = (entrypoint_script(parse_dockerfile((ROOT / n).read_text()))[1] for n in DOCKERFILES)
    assert a == b, "the x86 and Jetson entrypoints drifted apart"


def test_entrypoint_starts_the_agent_without_gpu(tiny_bundle, tmp_path):
    """Run the real entrypoint: no GPU here, so the engine check reports it and the agent starts on ONNX
    Runtime with the state dir and ports from the environment; DICOM C-ECHO answers; SIGTERM stops it."""
    _, script = entrypoint_script(parse_dockerfile((ROOT / "Dockerfile.x86").read_text()))
    entry = tmp_path / "medqc-container"
    entry.write_text(script)
    entry.chmod(0o755)
    dport, hport = free_port(), free_port()
    cfgf = tmp_path / "agent.toml"
    cfgf.write_text('[dicom]\nbind = "127.0.0.1"\n')
    env = {**os.environ, "PATH": f"{Path(PY).parent}:{os.environ['PATH']}", "STATE_DIRECTORY": str(tmp_path / "state"),
           "MEDQC_BUNDLE": str(tiny_bundle), "MEDQC_HTTP": f"127.0.0.1:{hport}", "MEDQC_DICOM_PORT": str(dport),
           "MEDQC_BACKEND": "onnxruntime", "MEDQC_ENGINE": "auto", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path / "log.txt"
    with open(log, "wb") as lf:
        p = subprocess.Popen([str(entry), "agent", "--config", str(cfgf)], env=env, stdout=lf, stderr=subprocess.STDOUT)
    try:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ok, deadline = False, time.time() + 45
        while time.time() < deadline and p.poll() is None and not ok:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 2
            assoc = ae.associate("127.0.0.1", dport, ae_title="MEDQC")
            if assoc.is_established:
                st = assoc.send_c_echo()
                ok = bool(st) and st.Status == 0
                assoc.release()
            else:
                time.sleep(0.3)
        text = log.read_text(errors="replace")
        assert ok, f"agent did not answer C-ECHO on {dport}:\n{text[-3000:]}"
        assert "no TensorRT engine" in text, text[-3000:]
        assert (tmp_path / "state").is_dir()
        # the image's HEALTHCHECK command itself, pointed at this agent's HTTP port
        hc = [i for i in parse_dockerfile((ROOT / "Dockerfile.x86").read_text()) if i["op"] == "HEALTHCHECK"][0]
        cmd = hc["rest"].split(" CMD ", 1)[1] if " CMD " in hc["rest"] else hc["rest"].split("CMD ", 1)[1]
        cmd = cmd.replace("127.0.0.1:8480", f"127.0.0.1:{hport}").replace("python3 ", f"{PY} ", 1)
        deadline = time.time() + 20
        while True:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
            if r.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert r.returncode == 0, (cmd, r.stderr[-1500:], log.read_text(errors="replace")[-2000:])
        import urllib.request

        page = urllib.request.urlopen(f"http://127.0.0.1:{hport}/", timeout=5).read().decode()
        assert "medqc" in page and "/static/console.js" in page
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    assert p.returncode == 0, log.read_text(errors="replace")[-3000:]


# ---- the wheel ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_from_copied_sources_installs_clean_and_analyzes(tiny_bundle, tmp_path):
    """Build the wheel from exactly what the build stage COPYs, install it into a clean venv (runtime
    dependencies only), and run the installed ``medqc`` on a synthetic study written by the dev venv."""
    import shutil

    instrs = parse_dockerfile((ROOT / "Dockerfile.x86").read_text())
    build_stage = stages(instrs)[1][0]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for ins in build_stage["instrs"]:
        if ins["op"] == "COPY" and not ins["heredoc"]:
            for src in ins["words"][:-1]:
                s = ROOT / src
                if s.is_dir():
                    shutil.copytree(s, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(s, ctx / src)
    t0 = time.time()
    r = subprocess.run([PY, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(tmp_path / "dist"), str(ctx)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("medqc-*.whl"))
    t_build = time.time() - t0
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("medqc/agent/static/index.html", "medqc/agent/static/console.js", "medqc/agent/static/console.css",
                 "medqc/agent/protocols.toml", "medqc/agent/console.py"):
        assert need in names, f"{need} missing from the wheel"

    vdir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(vdir)
    vpy = vdir / "bin" / "python"
    r = subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    t_install = time.time() - t0 - t_build
    probe = subprocess.run([str(vpy), "-c", "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ["True", "True"], "runtime install must have onnxruntime and must not pull torch"

    medqc = vdir / "bin" / "medqc"
    r = subprocess.run([str(medqc), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "analyze" in r.stdout and "agent" in r.stdout

    study = tmp_path / "study"
    r = subprocess.run([PY, "-m", "medqc", "synth", "--region", "head", "--slices", "12", "--matrix", "128",
                        "--artifact", "metal:0.8@4-7", "--short-top", "30", "--no-progress", str(study)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    for extra in (["--backend", "none"], ["--backend", "onnxruntime", "--bundle", str(tiny_bundle)]):
        r = subprocess.run([str(medqc), "analyze", "--json", "--no-progress", *extra, str(study)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        rep = json.loads(r.stdout)
        assert r.returncode == (1 if rep["series"][0]["verdict"] == "fail" else 0), r.stderr[-2000:]
        assert rep["schema"] == "medqc.report/1"
        (s,) = rep["series"]
        assert s["slices"] == 12 and len(s["per_slice"]) == 12
        checks = {f["check"] for f in s["findings"]}
        assert "artifact.metal" in checks, checks
        metal = [f for f in s["findings"] if f["check"] == "artifact.metal"][0]
        assert 3 <= metal["first_instance"] <= metal["last_instance"] <= 8
    # the installed agent serves the console from the installed package
    import urllib.request

    dport, hport = free_port(), free_port()
    cfgf = tmp_path / "agent.toml"
    cfgf.write_text('[dicom]\nbind = "127.0.0.1"\n')
    p = subprocess.Popen([str(medqc), "agent", "--config", str(cfgf), "--port", str(dport), "--http", f"127.0.0.1:{hport}",
                          "--backend", "onnxruntime", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "state")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        js, deadline = None, time.time() + 30
        while js is None and time.time() < deadline and p.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{hport}/", timeout=2).read().decode()
                js = urllib.request.urlopen(f"http://127.0.0.1:{hport}/static/console.js", timeout=2).read()
            except OSError:
                time.sleep(0.3)
        assert js and "EventSource" in js.decode() and "/static/console.css" in page
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    print(f"wheel build {t_build:.1f} s, clean install {t_install:.1f} s")


def test_pyproject_python_floor():
    proj = _pyproject()
    assert proj["project"]["requires-python"] == ">=3.10"
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in proj["project"]["dependencies"])


def test_systemd_unit_in_the_guide_verifies(tmp_path):
    """The unit printed in docs/deploy.md passes ``systemd-analyze verify`` without a warning, and its
    ExecStart is a command line ``medqc`` accepts."""
    import shutil

    doc = (ROOT / "docs" / "deploy.md").read_text()
    units = re.findall(r"```ini\n(.*?)```", doc, re.S)
    assert units, "docs/deploy.md has no systemd unit"
    unit = units[0]
    assert "Type=notify" in unit and "User=medqc" in unit and "StateDirectory=medqc" in unit
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert exec_start[0].endswith("/medqc")
    from medqc.cli import build_parser

    ns = build_parser().parse_args(exec_start[1:])
    assert ns.command == "agent"
    tool = shutil.which("systemd-analyze")
    if not tool:
        missing_peer("systemd-analyze is not installed (.ci/run installs systemd)")
    medqc = Path(PY).parent / "medqc"
    f = tmp_path / "medqc.service"
    f.write_text(unit.replace(exec_start[0], str(medqc)))
    r = subprocess.run([tool, "verify", str(f)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stderr + r.stdout).splitlines() if str(f) in ln or "medqc.service" in ln]
    assert r.returncode == 0 and not problems, r.stderr
