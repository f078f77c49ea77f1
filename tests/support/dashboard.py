"""The shipped Grafana dashboard's queries, and the check that every panel shows data in a real Prometheus."""

from __future__ import annotations

import json
import time

from cli.processes import ROOT
from tests.support.processes import Prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tuneloop.json"

ROLLOUT_ROW = "Rollout (shadow and canary)"  # its panels have data only during a rollout: tests/test_rollout_live.py


def dashboard_queries(rows: set[str] | None = None, skip_rows: set[str] = frozenset()) -> tuple[list[tuple[str, str]], list[str]]:
    """(panel title, PromQL) of every panel target (in the given rows), and the annotations' PromQL,
    with Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$__rate_interval": "30s", "$__range": "1h", "$__interval": "5s"}

    def filled(expr: str) -> str:
        for name, value in variables.items():
            expr = expr.replace(name, value)
        return expr

    panels, row = [], ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        elif (rows is None or row in rows) and row not in skip_rows:
            panels += [(panel["title"], filled(t["expr"])) for t in panel.get("targets", [])]
    return panels, [filled(a["expr"]) for a in dashboard["annotations"]["list"]]


def assert_panels_have_data(prometheus: Prometheus, panels: list[tuple[str, str]], timeout: float = 60) -> None:
    empty = {}
    deadline = time.monotonic() + timeout
    while True:
        empty = {title: expr for title, expr in panels if not prometheus.query(expr)}
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert empty == {}, f"panels without data: {empty}"
