"""Protocol rules: which anatomy a series must cover, its dose and noise reference levels.

Rules live in ``agent/protocols.toml`` (shipped) and optionally a site file (``checks.coverage.protocols``)
whose rules are tried first. A series matches on ProtocolName, then BodyPartExamined, then
StudyDescription, case-insensitively; no match → no coverage, dose or noise-index finding.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medqc.analysis.anatomy import LANDMARKS
from medqc.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

SHIPPED = Path(__file__).resolve().parents[1] / "protocols.toml"
LANDMARK_KEYS = ("start", "end")  # the range a rule requires: landmarks of medqc.analysis.anatomy; every other key is a number


def rule_keys() -> frozenset:
    """What a rule may say: its name and patterns, and the keys the registered checks read."""
    from medqc.agent.checks.registry import protocol_keys

    return frozenset({"name", "match", *LANDMARK_KEYS}) | protocol_keys()
MATCH_FIELDS = ("protocol_name", "body_part", "study_description")
_SEP = re.compile(r"[_\-/+&,.;:()\[\]]+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class ProtocolRule:
    name: str
    patterns: tuple[str, ...]
    start: str
    end: str
    tolerance_mm: float | None = None
    overscan_margin_mm: float | None = None
    ctdivol_ref_mgy: float | None = None
    noise_ref_hu: float | None = None
    values: dict = field(default_factory=dict, repr=False, compare=False)  # every numeric key the rule sets
    _compiled: tuple = field(default=(), repr=False, compare=False)

    def matches(self, text: str) -> bool:
        return any(p.search(text) for p in self._compiled)

    def value(self, key: str) -> float | None:
        """A numeric key a registered check reads (``Check.protocol_keys``); None where the rule has none."""
        return self.values.get(key)


def normalise(text: str) -> str:
    return _SPACES.sub(" ", _SEP.sub(" ", text or "")).strip().upper()


def _num(rule: dict, key: str, where: str) -> float | None:
    v = rule.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative number, got {v!r}")
    return float(v)


def parse_rules(data: dict, source: str) -> tuple[list[ProtocolRule], bool]:
    """Validate a protocols TOML document → (rules, replace_defaults)."""
    unknown = set(data) - {"rule", "replace_defaults"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}; allowed: rule, replace_defaults")
    replace = data.get("replace_defaults", False)
    if not isinstance(replace, bool):
        raise ConfigError(f"{source}: replace_defaults must be true or false")
    rules = []
    allowed_lm = ", ".join(LANDMARKS)
    keys = rule_keys()
    numbers = sorted(keys - {"name", "match", *LANDMARK_KEYS})
    for i, r in enumerate(data.get("rule", [])):
        where = f"{source} rule #{i + 1}"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: must be a table ([[rule]])")
        bad = set(r) - keys
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(keys))}")
        name = r.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name must be a non-empty string")
        pats = r.get("match")
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
            raise ConfigError(f"{where} ({name}): match must be a non-empty list of patterns")
        for key in ("start", "end"):
            if r.get(key) not in LANDMARKS:
                raise ConfigError(f"{where} ({name}): {key} = {r.get(key)!r} is not a landmark; allowed: {allowed_lm}")
        if LANDMARKS[r["start"]] >= LANDMARKS[r["end"]]:
            raise ConfigError(f"{where} ({name}): start ({r['start']}) must lie above end ({r['end']})")
        try:
            compiled = tuple(re.compile(p, re.IGNORECASE) for p in pats)
        except re.error as e:
            raise ConfigError(f"{where} ({name}): bad pattern: {e}") from None
        values = {k: _num(r, k, where) for k in numbers}
        rules.append(ProtocolRule(
            name=name, patterns=tuple(pats), start=r["start"], end=r["end"],
            tolerance_mm=values["tolerance_mm"], overscan_margin_mm=values["overscan_margin_mm"],
            ctdivol_ref_mgy=values["ctdivol_ref_mgy"], noise_ref_hu=values["noise_ref_hu"],
            values={k: v for k, v in values.items() if v is not None}, _compiled=compiled,
        ))
    return rules, replace


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"protocol rules file not found: {path} (checks.coverage.protocols)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_rules(site_path: str | Path | None = None) -> list[ProtocolRule]:
    """Site rules (if any) first, then the shipped rules unless the site file replaces them."""
    shipped, _ = parse_rules(_read(SHIPPED), str(SHIPPED.name))
    if not site_path:
        return shipped
    site, replace = parse_rules(_read(Path(site_path)), str(site_path))
    return site if replace else site + shipped


# series that cover part of a split range on purpose: a head acquired or reconstructed as a posterior-fossa
# series (thin, skull base to tentorium) and a supratentorial one, as sequential head protocols do. Each is
# a valid series, but neither covers the head rule's vertex-to-skull-base range: coverage is not judged on it
PART_OF_SPLIT_RANGE = re.compile(r"POST(ERIOR)? ?FOSSA|\bP ?FOSSA\b|\bFOSSA POST|INFRA ?TENT|SUPRA ?TENT|"
                                 r"HINTERE SCH(AE|Ä)DELGRUBE|FOSSE POST")


def part_of_split_range(info) -> bool:
    """SeriesDescription says this series is one part of a range split over series (posterior fossa,
    supratentorial)."""
    return bool(PART_OF_SPLIT_RANGE.search(normalise(getattr(info, "series_description", "") or "")))


def match_rule(info, rules: list[ProtocolRule]) -> tuple[ProtocolRule | None, str]:
    """→ (rule, field that matched) or (None, "")."""
    for fld in MATCH_FIELDS:
        text = normalise(getattr(info, fld, "") or "")
        if not text:
            continue
        for rule in rules:
            if rule.matches(text):
                return rule, fld
    return None, ""
