"""QC checks: plain functions from a series' slices (and config / protocol rules) to findings, each
registered in ``registry.py`` (its names, settings, protocol keys, streaming and withdrawal).

``geometry`` (geometry.*), ``artifact`` (artifact.*), ``coverage`` (coverage.*), ``dose`` (dose.ctdivol,
centering.offset, noise.index), ``baseline`` (the per-scanner baselines revising noise and rings), ``inputs``
(input.undecodable); ``protocols`` (the rules that say what a series must cover), ``judged`` (what a series
could not be judged on).
"""


def __getattr__(name: str):
    if name == "CHECKS":  # every check name a finding can carry, from the registry
        from medqc.agent.checks.registry import names

        return names()
    raise AttributeError(name)
