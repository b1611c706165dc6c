"""A real Orthanc (the open-source PACS many departments route through) as a peer on loopback: its own
configuration and storage folder, free DICOM and HTTP ports, its REST API, a clean stop.

Used by ``medqc bench --soak`` (Orthanc routing every instance it stores on to the agent) and by the tests
that replay into Orthanc or let Orthanc's C-STORE SCU send a study to the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from medqc.tools.bench.harness import free_port, wait_port

ORTHANC = "/usr/sbin/Orthanc"

# Lua: forward every instance stored from the network to the modality "medqc", then delete it; an instance
# that could not be forwarded stays (held() counts it)
ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] ~= 'Lua' then
      SendToModality(instanceId, 'medqc')
      Delete(instanceId)
   end
end
"""


def executable() -> str | None:
    """Orthanc's program: Debian's path, else one on PATH; None when not installed."""
    return ORTHANC if Path(ORTHANC).exists() else shutil.which("Orthanc")


class OrthancProcess:
    """``Orthanc`` with its configuration in ``work``. ``modalities``: name → [AE title, host, port] it may
    send to; ``lua``: a script it runs (``ROUTE_LUA`` makes it a router); ``options``: further
    configuration keys (they override the defaults here)."""

    def __init__(self, work: Path, name: str = "medqc-peer", modalities: dict | None = None, lua: str | None = None,
                 check_called_aet: bool = True, **options):
        exe = executable()
        if exe is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.exe = exe
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        cfg = {"Name": name, "DicomAet": "ORTHANC", "DicomPort": self.port, "HttpPort": self.http_port,
               "StorageDirectory": str(self.work / "db"), "IndexDirectory": str(self.work / "db"),
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
               "DicomCheckCalledAet": check_called_aet, "DicomModalities": modalities or {}}
        if lua is not None:
            (self.work / "script.lua").write_text(lua)
            cfg["LuaScripts"] = [str(self.work / "script.lua")]
        cfg.update(options)
        (self.work / "orthanc.json").write_text(json.dumps(cfg))
        self.log = self.work / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        self._logf = None

    def start(self, timeout: float = 60.0) -> "OrthancProcess":
        """Start it and wait until both its REST API and its DICOM port answer; RuntimeError with the tail of
        its log when it exits or does not answer in time."""
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([self.exe, str(self.work / "orthanc.json")], stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            try:
                self.get("/system")
            except OSError:
                time.sleep(0.1)
                continue
            if wait_port(self.port, max(0.5, end - time.time()), self.proc):
                return self
        why = "exited" if self.proc.poll() is not None else f"did not answer within {timeout:g} s"
        self.stop()
        raise RuntimeError(f"Orthanc {why}: {self.log.read_text(errors='replace')[-1500:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes, timeout: float = 120):
        req = urllib.request.Request(self.url + path, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def held(self) -> int:
        """Instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])

    def errors(self) -> list[str]:
        """Error lines of its log."""
        try:
            return [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.startswith("E")]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
