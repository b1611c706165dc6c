"""examples/medqc.toml documents every configuration key with its default; validation names the key and
the allowed values; ``medqc config check`` exit codes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medqc.toml"


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield key, "section"
            yield from _keys(hints[f.name], key + ".")
        else:
            yield key, "key"


def _lookup(data, dotted):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def test_example_documents_every_key_with_its_default():
    from medqc.config import Config, config_to_dict, load_config

    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    lines = text.splitlines()
    for key, kind in _keys(Config):
        value = _lookup(data, key)
        assert value is not KeyError, f"{key} is not in examples/medqc.toml"
        if kind == "section" or isinstance(value, dict):
            assert f"[{key}]" in text or f"[{key}." in text, f"section [{key}] missing"
            continue
        # a comment line right above the key (or its section's block) explains it
        leaf = key.rsplit(".", 1)[-1]
        idx = next(i for i, ln in enumerate(lines) if ln.startswith(f"{leaf} =") or ln.startswith(f"{leaf}="))
        above = [ln for ln in lines[max(0, idx - 6):idx] if ln.startswith("#")]
        assert above, f"{key} has no explanation above it"
    cfg = load_config(EXAMPLE)
    assert config_to_dict(cfg) == config_to_dict(Config())  # the documented values are the real defaults


@pytest.mark.parametrize("toml, needle", [
    ('log_level = "loud"', "log_level = 'loud' is not allowed; choose one of: debug, info, warning, error"),
    ('[inference]\nbackend = "cuda"', "inference.backend = 'cuda' is not allowed; choose one of: auto, tensorrt"),
    ("[dicom]\nport = 70000", "dicom.port = 70000 is out of range [0, 65535]"),
    ("[dicom]\nportt = 104", "unknown key(s) portt in [dicom]; allowed:"),
    ('[dicom]\nallowed_ips = ["10.0.0.300"]', "dicom.allowed_ips: '10.0.0.300' is not an IP address or CIDR"),
    ('[dicom.tls]\nenabled = true', "dicom.tls.enabled = true needs dicom.tls.cert and dicom.tls.key"),
    ('[http]\nbind = "localhost"', "http.bind = 'localhost' must be HOST:PORT"),
    ('[sinks.webhook]\nurl = "ftp://x"', "sinks.webhook.url = 'ftp://x' must start with http:// or https://"),
    ('[sinks.dicom]\nmin_severity = "high"', "choose one of: info, warning, critical"),
    ("[checks.artifact.thresholds]\nmetal = 1.5", "checks.artifact.thresholds.metal = 1.5 must be a probability"),
])
def test_validation_names_key_and_allowed_values(tmp_path, toml, needle):
    from medqc.config import ConfigError, load_config

    p = tmp_path / "bad.toml"
    p.write_text(toml + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)


def test_config_check_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "medqc", "config", "check", str(EXAMPLE)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nmax_associations = 0\n')
    r = subprocess.run([sys.executable, "-m", "medqc", "config", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "dicom.max_associations = 0 is out of range [1, 256]" in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "medqc", "agent", "--config", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "dicom.max_associations" in r.stderr
