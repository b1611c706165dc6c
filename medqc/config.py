"""One typed, frozen configuration tree, loaded from TOML and validated at load.

Sections are named after the component they configure. Every field has a default, so an empty file (or no
file) is a working configuration. Unknown keys, wrong types and out-of-range values raise ``ConfigError``
naming the key and what is allowed. The tree is passed explicitly; there are no module globals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from medqc.runners import CHOICES as BACKEND_CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, with the dotted key that caused it."""


def _choice(*allowed):
    return {"choices": allowed}


def _range(lo=None, hi=None):
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = field(default="", metadata={"help": "CA bundle to verify scanner certificates; empty: no client cert required"})


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = "MEDQC"
    bind: str = "0.0.0.0"
    port: int = field(default=11112, metadata=_range(0, 65535))
    max_associations: int = field(default=16, metadata=_range(1, 256))
    max_pdu: int = field(default=131072, metadata=_range(0, 2**32 - 1))
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_ips: tuple[str, ...] = ()
    tls: TlsConfig = TlsConfig()
    receiver_process: bool = field(default=True, metadata={
        "help": "run the DICOM receiver in its own process (no interpreter lock shared with the analysis); "
                "false: a thread of the agent's process"})


@dataclass(frozen=True)
class WatchConfig:
    dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = field(default="", metadata={"help": "default: <state_dir>/spool"})
    min_free_mb: int = field(default=512, metadata=_range(0, None))
    retention: str = field(default="delete", metadata=_choice("delete", "keep"))
    fsync: bool = field(default=True, metadata={"help": "fsync each instance before acknowledging it; false is faster and "
                                                        "survives an agent crash, but not a power loss"})


@dataclass(frozen=True)
class InferenceConfig:
    backend: str = field(default="auto", metadata=_choice(*BACKEND_CHOICES))
    bundle: str = field(default="", metadata={"help": "model bundle folder; empty: the embedded default"})
    max_batch: int = field(default=16, metadata=_range(1, 512))
    max_wait_ms: float = field(default=8.0, metadata=_range(0, 10000))
    threads: int = field(default=0, metadata=_range(0, 256))
    rebuild_engine: bool = False


WORKERS_MAX = 256


@dataclass(frozen=True)
class AnalysisConfig:
    workers: int | str = field(default="auto", metadata={
        "auto_or_int": (0, WORKERS_MAX),
        "help": "processes that decode and analyse slices: \"auto\" (the cores less one, at least 1), a number, "
                "or 0: in the agent's own process"})


# memory "auto" plans for: a worker holds its own model session (measured with the bundled model: about
# 140 MiB once warmed up, 290-305 MiB after analysing 512² series in batches of 16); the agent's own process
# (the series kept for the API and console) and the receiver process about 1 GiB together at most
WORKER_MIB = 320
AGENT_MIB = 1024
# a worker on a GPU backend also holds a CUDA context and the GPU runtime's libraries (TensorRT, CUDA torch,
# ONNX Runtime's CUDA provider) in host memory — on a Jetson, in the memory the GPU shares. A planning figure,
# not a measurement: scripts/gpu-check's pipeline step records what each worker holds on a GPU box
GPU_WORKER_MIB = 1024
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/etc/nv_tegra_release")


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes, or None where there is none or it cannot be read. Under
    systemd this is the unit's MemoryHigh= (cgroup v2 ``memory.high``), else its MemoryMax= (``memory.max``;
    cgroup v1: ``memory.limit_in_bytes``, "no limit" being a number near 2**63)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, names = Path("/sys/fs/cgroup") / path.lstrip("/"), ("memory.high", "memory.max")
        elif "memory" in controllers.split(","):
            base, names = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), ("memory.limit_in_bytes",)
        else:
            continue
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                v = (base / name).read_text().strip()
                if v and v != "max" and int(v) < 1 << 60:
                    return int(v)
    return None


def gpu_backend_expected(backend: str) -> bool:
    """Whether the analysis workers will run a GPU backend: one named in ``inference.backend``, or "auto" on a
    machine with an NVIDIA driver (``NVIDIA_DRIVER_PATHS``: a desktop or server driver, a Jetson's L4T) and a
    GPU runtime installed (TensorRT, torch, onnxruntime-gpu), found without importing any of them (the agent's
    own process never loads a GPU runtime)."""
    if backend in GPU_BACKENDS:
        return True
    if backend != "auto" or not any(Path(p).exists() for p in NVIDIA_DRIVER_PATHS):
        return False
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("torch") is not None:
        return True
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def plan_workers(cores: int, limit_bytes: int | None, gpu: bool) -> int:
    """The worker count "auto" plans: the cores less one, at least 1, and no more than ``limit_bytes`` (the
    service's memory limit; None: none) holds after AGENT_MIB for the agent and the receiver, at WORKER_MIB a
    worker (GPU_WORKER_MIB on a GPU backend)."""
    n = max(1, cores - 1)
    if limit_bytes is not None:
        n = min(n, max(1, (limit_bytes // (1 << 20) - AGENT_MIB) // (GPU_WORKER_MIB if gpu else WORKER_MIB)))
    return n


def worker_count(cfg) -> int:
    """``analysis.workers`` as a number. "auto" is the cores this process may use less one (the agent's own
    process keeps the series, checks and sinks, the receiver process its associations), at least 1 — and no
    more than the memory limit of the service holds (``cgroup_memory_limit``, ``plan_workers``), so that a
    many-core box under a small MemoryHigh= does not start workers the kernel must throttle or kill; a worker
    on a GPU backend is planned at GPU_WORKER_MIB (``gpu_backend_expected``)."""
    w = cfg.analysis.workers
    if w != "auto":
        return int(w)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return plan_workers(cores, cgroup_memory_limit(), gpu_backend_expected(cfg.inference.backend))


@dataclass(frozen=True)
class SeriesConfig:
    idle_timeout_s: float = field(default=3.0, metadata=_range(0.1, 3600))
    keep_recent: int = field(default=200, metadata=_range(1, 100000))


def _checks_config():
    """[checks]: the keys every registered check adds (``medqc.agent.checks.registry``: a check declares its
    own settings, so adding one touches no other file)."""
    from medqc.agent.checks import registry

    cls = dataclasses.make_dataclass("ChecksConfig", registry.config_fields(), frozen=True)
    cls.__module__ = __name__
    return cls


ChecksConfig = _checks_config()


@dataclass(frozen=True)
class BaselinesConfig:
    enabled: bool = field(default=True, metadata={
        "help": "judge noise and rings against each scanner's learned baseline where one exists (medqc/baselines.py)"})
    learn: bool = field(default=True, metadata={"help": "medqc agent learns from the series it passes with no finding"})
    min_series: int = field(default=5, metadata={**_range(2, 10000), "help": "passed series a baseline needs before it is used"})
    keep: int = field(default=200, metadata={**_range(2, 100000), "help": "most recent series kept per scanner key"})
    noise_factor: float = field(default=1.8, metadata={
        **_range(1.2, 5.0), "help": "a series whose median noise is over this many times its scanner's is noisy"})
    path: str = field(default="", metadata={"help": "SQLite file; empty: <state_dir>/baselines.sqlite"})


@dataclass(frozen=True)
class HttpConfig:
    bind: str = "127.0.0.1:8480"
    token: str = field(default="", metadata={"help": "bearer token required on /api and /metrics; empty: none"})
    enabled: bool = True


@dataclass(frozen=True)
class StdoutSinkConfig:
    enabled: bool = True


@dataclass(frozen=True)
class WebhookSinkConfig:
    url: str = ""
    secret: str = field(default="", metadata={"help": "HMAC-SHA256 key for the X-Medqc-Signature header"})
    retries: int = field(default=5, metadata=_range(0, 100))
    timeout_s: float = field(default=5.0, metadata=_range(0.1, 300))
    backoff_s: float = field(default=1.0, metadata={**_range(0.01, 600), "help": "first retry delay; doubles each attempt (max 60 s)"})


@dataclass(frozen=True)
class DicomSinkConfig:
    host: str = ""
    port: int = field(default=104, metadata=_range(1, 65535))
    called_aet: str = "PACS"
    kind: str = field(default="sr", metadata=_choice("sr", "ko"))
    min_severity: str = field(default="warning", metadata=_choice("info", "warning", "critical"))


@dataclass(frozen=True)
class SinksConfig:
    stdout: StdoutSinkConfig = StdoutSinkConfig()
    webhook: WebhookSinkConfig = WebhookSinkConfig()
    dicom: DicomSinkConfig = DicomSinkConfig()


@dataclass(frozen=True)
class PrivacyConfig:
    show_patient_identifiers: bool = False


@dataclass(frozen=True)
class ConsoleConfig:
    recent_minutes: float = field(default=120.0, metadata=_range(1, 100000))
    sound: bool = False


@dataclass(frozen=True)
class Config:
    state_dir: str = field(default="", metadata={"help": "default: $STATE_DIRECTORY or ./medqc-state"})
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    dicom: DicomConfig = DicomConfig()
    watch: WatchConfig = WatchConfig()
    spool: SpoolConfig = SpoolConfig()
    inference: InferenceConfig = InferenceConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    series: SeriesConfig = SeriesConfig()
    checks: ChecksConfig = ChecksConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    http: HttpConfig = HttpConfig()
    sinks: SinksConfig = SinksConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    console: ConsoleConfig = ConsoleConfig()

    # derived paths -------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "medqc-state")

    @property
    def spool_path(self) -> Path:
        return Path(self.spool.dir) if self.spool.dir else self.state_path / "spool"


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix or 'root'}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        meta = names[name].metadata
        kwargs[name] = _coerce(typ, value, key, meta)
    return cls(**kwargs)


def _coerce(typ, value, key: str, meta):
    if "auto_or_int" in meta:  # "auto" or an integer in range
        lo, hi = meta["auto_or_int"]
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
            return value
        raise ConfigError(f'{key} = {value!r} is not allowed; use "auto" (the cores less one), {lo} (analyse in the '
                          f"agent's own process) or a number of worker processes up to {hi}")
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    origin = typing.get_origin(typ)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return tuple(value)
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
            raise ConfigError(f"{key} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
        lo, hi = meta.get("range", (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key} = {value} is out of range [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(choices)}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # a bug in this module, not user input


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    host, sep, port = cfg.http.bind.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"http.bind = {cfg.http.bind!r} must be HOST:PORT, for example 127.0.0.1:8480")
    if not (1 <= len(cfg.dicom.ae_title) <= 16) or cfg.dicom.ae_title != cfg.dicom.ae_title.strip():
        raise ConfigError(f"dicom.ae_title = {cfg.dicom.ae_title!r} must be 1-16 characters without surrounding spaces")
    if cfg.dicom.tls.enabled and not (cfg.dicom.tls.cert and cfg.dicom.tls.key):
        raise ConfigError("dicom.tls.enabled = true needs dicom.tls.cert and dicom.tls.key")
    import ipaddress

    for ip in cfg.dicom.allowed_ips:
        try:
            ipaddress.ip_network(ip.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"dicom.allowed_ips: {ip!r} is not an IP address or CIDR network (e.g. 10.1.2.0/24)") from None
    if cfg.sinks.webhook.url and not cfg.sinks.webhook.url.startswith(("http://", "https://")):
        raise ConfigError(f"sinks.webhook.url = {cfg.sinks.webhook.url!r} must start with http:// or https://")
    if cfg.baselines.keep < cfg.baselines.min_series:
        raise ConfigError(f"baselines.keep = {cfg.baselines.keep} must be at least baselines.min_series = {cfg.baselines.min_series}")
    from medqc.agent.checks import registry

    for check in registry.checks():  # each check validates what it added to [checks]
        if check.validate is not None:
            check.validate(cfg.checks)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load ``path`` (TOML; None → defaults), apply dotted-key ``overrides`` ({"dicom.port": 104})."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
