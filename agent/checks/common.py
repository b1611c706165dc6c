"""Small helpers shared by the check functions."""

from __future__ import annotations

import math
import time

from medqc.agent.records import Finding


def finding(state, check: str, severity: str, message: str, key: str = "", **kw) -> Finding:
    """A finding for ``state``'s series with the stable id ``<series>/<check>[/<key>]``."""
    fid = f"{state.uid}/{check}" + (f"/{key}" if key else "")
    return Finding(check=check, severity=severity, message=message, series_instance_uid=state.uid,
                   study_instance_uid=state.study_uid, raised_at=time.time(), finding_id=fid, **kw)


def slice_z(result, seq: int) -> float:
    z = result.info.z
    if z is not None:
        return float(z)
    if result.info.instance_number is not None:
        return -float(result.info.instance_number)  # no geometry: instance order stands in for position
    return -float(seq)


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def mm(v: float) -> str:
    return f"{abs(v):.0f} mm"
