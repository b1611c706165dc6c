"""Learning the per-scanner baselines from the agent's own passed series (``[baselines] learn``).

A sink like the others (its own thread: the SQLite write never delays the analysis; a failure is logged
and the agent carries on): at each verdict, a series that ``medqc.baselines.learnable`` admits — verdict
pass, no finding but notes on geometry or coverage — is stored under its scanner key with the figures its
final judgement worked out (``series.scanner``). A series completed again (a late slice) replaces its figures.
"""

from __future__ import annotations

import logging

from medqc import baselines
from medqc.agent.sinks.base import Sink

log = logging.getLogger("medqc.agent.baselines")


class BaselineSink(Sink):
    name = "baselines"

    def __init__(self, store: baselines.Baselines):
        self.store = store

    def on_series(self, series) -> None:  # a SeriesEvent
        ok, why = baselines.learnable(series)
        if not ok:
            log.debug("series %s not learned: %s", series.uid, why)
            return
        key, stats = series.scanner["key"], series.scanner["stats"]
        if self.store.learn(key, series.uid, stats):
            n, _ = self.store.count(key)
            log.info("baseline %s: learned a passed series (%d stored, %d needed)", key.exact, n, self.store.min_series)
