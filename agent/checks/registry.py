"""The check registry: every check declares here what it is, and the rest follows from it.

A check (``Check``) names the findings it raises (their names are part of the interface: README,
docs/checks.md), the keys it adds to the ``[checks]`` table of the configuration, the keys it reads from a
protocol rule, whether it judges while slices arrive (``stream``), whether those findings are withdrawn
when the complete series does not show them, which of its findings explain image noise (the noise check
leaves those slices out), whether it applies to dynamic series, and its judgement of the complete series
(``judge``). The series tracker (``agent/series.py``) keeps the state and decides completion; it runs the
registered checks in order. ``medqc.config`` builds ``[checks]``, ``checks/protocols.py`` the allowed rule
keys, and the docs test the list of names from here.

Adding a check: one module in ``agent/checks/`` with its ``CHECKS``, and its name in ``MODULES`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# judgement order: geometry before coverage (coverage is not judged on non-axial slices), artifacts before
# noise (noise is not measured inside an artifact's runs), size before dose, baselines after the checks whose
# findings they revise, the undecodable inputs last
MODULES = ("geometry", "artifact", "coverage", "dose", "baseline", "inputs")


@dataclass(frozen=True)
class Check:
    """One registered check."""

    name: str  # what the check is called in the registry (its family: "artifact", "dose", ...)
    raises: tuple[str, ...]  # the check names of its findings ("artifact.metal", ...)
    judge: Callable | None = None  # judge(j: Judgement) -> findings of the complete series (``revises``: all of them)
    stream: Callable | None = None  # stream(s: Arrival) while slices arrive (``Arrival.put`` records a finding)
    stream_errors: bool = False  # ``stream`` sees the slices that could not be analysed (and only those)
    withdrawable: bool = False  # its findings raised while slices arrived are withdrawn if the whole series lacks them
    explains_noise: tuple[str, ...] = ()  # its findings whose slices' noise is the artifact's, not the dose's
    dynamic: bool = False  # judged on dynamic series (repeated table positions) too
    revises: bool = False  # ``judge`` returns the whole list of findings (it may change the others' findings)
    config: tuple = ()  # keys it adds to [checks]: (name, type, dataclasses.field(...))
    protocol_keys: tuple[str, ...] = ()  # keys it reads from a protocol rule (checks/protocols.py)
    validate: Callable | None = None  # validate(checks_config) raises medqc.config.ConfigError for a bad value


def bounded(lo=None, hi=None, **meta) -> dict:
    """A configuration value's allowed range (``medqc.config`` checks it at load)."""
    return {"range": (lo, hi), **meta}


def _load() -> tuple[Check, ...]:
    return tuple(c for m in MODULES for c in importlib.import_module(f"medqc.agent.checks.{m}").CHECKS)


_ALL: tuple[Check, ...] | None = None


def checks() -> tuple[Check, ...]:
    """Every registered check, in judgement order."""
    global _ALL
    if _ALL is None:
        _ALL = _load()
    return _ALL


def names() -> tuple[str, ...]:
    """Every check name a finding can carry (each once)."""
    return tuple(dict.fromkeys(n for c in checks() for n in c.raises))


def withdrawable(check_name: str) -> bool:
    return any(check_name in c.raises for c in checks() if c.withdrawable)


def explains_noise() -> frozenset:
    return frozenset(n for c in checks() for n in c.explains_noise)


def config_fields() -> list:
    """The keys of the ``[checks]`` table, as ``dataclasses.make_dataclass`` fields: the checks' own tables
    (``[checks.artifact]``, ...) by name, then the plain keys by name."""
    import dataclasses

    return sorted((f for c in checks() for f in c.config), key=lambda f: (not dataclasses.is_dataclass(f[1]), f[0]))


def protocol_keys() -> frozenset:
    return frozenset(k for c in checks() for k in c.protocol_keys)


# ---------------------------------------------------------------------------------- what checks get
@dataclass
class Judgement:
    """The complete series, as the final judgement sees it; ``found`` grows check by check."""

    state: object  # SeriesState
    ordered: list  # [(z, result)] in ascending z
    valid: list  # the analysed slices (no error)
    cfg: object  # the [checks] configuration
    thresholds: dict  # artifact class → threshold
    baselines: object = None  # medqc.baselines.Baselines or None
    found: list = field(default_factory=list)

    @property
    def axial(self) -> bool:
        """No orientation finding so far says the slices are not axial (or mixed)."""
        return not any(f.check == "geometry.orientation" and f.details.get("reason") in ("non-axial", "mixed")
                       for f in self.found)

    def explained_noise(self, findings=None) -> frozenset:
        return explained_noise(self.ordered, self.found if findings is None else findings)


def explained_noise(ordered, findings) -> frozenset:
    """ids of the results inside the z runs of a finding that explains noise (a metal, motion or ring run:
    σ there is the artifact's)."""
    explains = explains_noise()
    spans = [(min(z0, z1), max(z0, z1)) for f in findings
             if f.check in explains and not f.details.get("resolved")
             for z0, z1, _ in f.details.get("runs", [])]
    return frozenset(id(r) for z, r in ordered if any(lo - 0.01 <= z <= hi + 0.01 for lo, hi in spans))


@dataclass
class Arrival:
    """One slice arriving in a streaming series (``medqc agent``), as the checks' ``stream`` sees it."""

    tracker: object  # SeriesTracker: thresholds, cfg, baselines
    state: object  # SeriesState
    result: object  # SliceResult
    seq: int = -1  # its index in state.results
    z: float = 0.0
    zk: tuple = ()  # its (z, table z) position key
    stack: bool = False  # the table has moved: a stack along the patient (not dynamic, not one position)
    changed: list = field(default_factory=list)

    def put(self, finding) -> None:
        """Record a finding judged while slices arrive (the tracker sets its kind of change)."""
        self.tracker._put(self.state, finding, self.changed)
