"""The shipped Grafana dashboard queries only metrics the agent really exports (and shows all of them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASH = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"
PROMQL_WORDS = {"sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "avg", "max", "min",
                "count", "topk", "label_values", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "offset", "bool", "le", "abs", "delta", "deriv", "clamp_min", "clamp_max"}
PROMETHEUS_BUILTIN = {"up"}


def metric_names(expr: str) -> set[str]:
    e = re.sub(r"label_values\(([^,)]+)(,[^)]*)?\)", r"\1", expr)  # Grafana variable query: metric, label
    e = re.sub(r'"[^"]*"', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)  # grouping labels
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e))
    return {n for n in names if n not in PROMQL_WORDS}


def exported_series() -> dict[str, str]:
    from medqc.agent.metrics import METRICS

    out = {}
    for name, (kind, _) in METRICS.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = name
        else:
            out[name] = name
    return out


def _exprs(dash: dict) -> list[str]:
    exprs = []
    for p in dash["panels"]:
        assert p.get("targets"), f"panel {p.get('title')} has no query"
        exprs += [t["expr"] for t in p["targets"]]
    exprs += [v["query"] for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return exprs


def test_parser_sees_metric_names():
    assert metric_names('histogram_quantile(0.95, sum by (le, stage) (rate(medqc_stage_seconds_bucket{job=~"$job"}[5m])))') \
        == {"medqc_stage_seconds_bucket"}
    assert metric_names("label_values(medqc_slices_received_total, job)") == {"medqc_slices_received_total"}
    assert metric_names("sum(rate(nope_total[5m])) / medqc_queue_depth") == {"nope_total", "medqc_queue_depth"}


def test_every_panel_queries_exported_metrics():
    dash = json.loads(DASH.read_text())
    exported = exported_series()
    used = set()
    for expr in _exprs(dash):
        names = metric_names(expr)
        assert names, expr
        for n in names - PROMETHEUS_BUILTIN:
            assert n in exported, f"{n!r} (in {expr!r}) is not exported by the agent (agent/metrics.py METRICS)"
            used.add(exported[n])
    from medqc.agent.metrics import METRICS

    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_dashboard_metrics_are_in_a_real_scrape():
    """The names also appear in the agent's exposition text (as rendered for /metrics)."""
    from medqc.agent.metrics import Metrics

    m = Metrics()
    m.observe("medqc_stage_seconds", 0.01, stage="infer")
    m.observe("medqc_batch_size", 4)
    m.set("medqc_backend_info", 1, backend="onnxruntime")
    scraped = {ln.split("{")[0].split(" ")[0] for ln in m.render().splitlines() if ln and not ln.startswith("#")}
    dash = json.loads(DASH.read_text())
    for expr in _exprs(dash):
        for n in metric_names(expr) - PROMETHEUS_BUILTIN:
            assert n in scraped, n
