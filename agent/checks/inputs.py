"""input.*: what the inputs themselves say.

* input.undecodable: slices that could not be analysed (pixel data no installed decoder reads, a CT image
  whose file was cut short). They are kept in the spool's kept/ folder; the finding names how many, their
  instance range and the reasons, as soon as one arrives and again at the verdict.
* input.uids (info): the headers left the series' (or study's) UID blank and decoding derived one from when and
  where it was scanned, so the series was analysed rather than rejected; the export should be fixed.
"""

from __future__ import annotations

from medqc.agent.checks.common import finding
from medqc.agent.checks.registry import Check


def undecodable(st):
    errs = st._errors
    insts = [r.info.instance_number for r in errs if r.info.instance_number is not None]
    reasons = sorted({r.error.split(":")[0][:80] for r in errs})
    return finding(st, "input.undecodable", "warning",
                   f"{len(errs)} image(s) could not be analysed ({'; '.join(reasons[:3])}) — they are kept; "
                   f"check the transfer syntax or resend",
                   first_instance=min(insts) if insts else None, last_instance=max(insts) if insts else None,
                   details={"count": len(errs), "sop_instance_uids": [r.info.sop_instance_uid for r in errs][:50],
                            "reasons": reasons})


def stand_in_uids(st):
    """input.uids (info): the series' headers left its SeriesInstanceUID (or StudyInstanceUID) blank and decoding
    derived one from when and where it was scanned (``decode._study_series_uids``)."""
    which = st.first.stand_in_uids
    return finding(st, "input.uids", "info",
                   f"{which} blank in the headers (a de-identification or export that blanked them?): the slices are "
                   "grouped by series number, date and time, description and frame of reference under a derived "
                   "UID — fix the export so that other systems can file the series",
                   details={"derived": which.split(", "), "series_instance_uid": st.uid})


def _stream(s) -> None:
    s.put(undecodable(s.state))


def _judge(j) -> list:
    return [undecodable(j.state)] if j.state._errors else []


def _judge_uids(j) -> list:
    return [stand_in_uids(j.state)] if j.state.first.stand_in_uids else []


CHECKS = (Check("inputs", ("input.undecodable",), judge=_judge, stream=_stream, stream_errors=True, dynamic=True),
          Check("input-uids", ("input.uids",), judge=_judge_uids, dynamic=True))
