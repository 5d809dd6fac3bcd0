"""The example alert rules and the dashboard name only metrics the relay serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from app.metrics import GAUGES, SPECS
from tests.harness import ROOT

MONITORING = ROOT / "monitoring"
METRIC = re.compile(r"\brelay_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def served(name: str) -> bool:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in SPECS:
            return True
    return name in GAUGES or (name in SPECS and SPECS[name].kind != "counter")


def rules() -> list[dict]:
    document = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_are_well_formed():
    found = rules()
    names = {rule["alert"] for rule in found}
    assert {
        "RelayQueueStalled",
        "RelayFailedDeliveriesGrowing",
        "RelayWebhookRejectionSpike",
    } <= names
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_alerts_and_dashboard_use_served_metrics():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [rule["expr"] for rule in rules()] + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used and all(served(name) for name in used), sorted(used)
    # Every metric the relay serves is on the dashboard.
    assert {name.removesuffix("_bucket") for name in used} >= set(GAUGES)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules_and_their_tests():
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        done = subprocess.run(
            ["promtool", *args], cwd=MONITORING, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
