"""Metric names: every series the dashboard and the alert rules query is one the service or the controller exports."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from monitoring.metrics import ControllerMetrics, controller_metrics
from services.metrics import service_metrics
from tests.support.data import ROOT

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}


def series(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def queried() -> set[str]:
    files = [*(ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"), ROOT / "deploy" / "prometheus" / "tuneloop.rules.yml"]
    return {name for path in files for name in re.findall(r"tuneloop_[a-z_]+", path.read_text())}


def test_every_queried_series_is_exported() -> None:
    controller = CollectorRegistry()
    ControllerMetrics(controller)
    service = CollectorRegistry()
    for metric in vars(service_metrics()).values():
        service.register(metric)
    exported = series(controller) | series(service)
    assert queried() - exported == set()


def test_each_controller_gets_its_own_registry_when_asked() -> None:
    first, second = ControllerMetrics(CollectorRegistry()), ControllerMetrics(CollectorRegistry())
    first.ingest.stored.inc(3)
    assert first.registry.get_sample_value("tuneloop_controller_feedback_stored_total") == 3
    assert second.registry.get_sample_value("tuneloop_controller_feedback_stored_total") == 0


def test_a_second_controller_in_one_process_shares_the_process_wide_metrics() -> None:
    # Each call registered the series again: a second Controller in one process raised "Duplicated timeseries".
    assert controller_metrics() is controller_metrics()
