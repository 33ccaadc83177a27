"""The alert rules of k8s/monitoring.yaml against promtool: the manifest's own rules, checked and
unit-tested over synthetic series (tests/alerts/rules_test.yaml). Prometheus' promtool comes with
Debian's ``prometheus`` package, which CI installs; elsewhere the tests skip, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
MANIFEST = HERE.parent / "k8s" / "monitoring.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("HOTDOG_REQUIRE_PROMETHEUS"):
            pytest.fail("HOTDOG_REQUIRE_PROMETHEUS is set but promtool is not installed")
        pytest.skip("no promtool on this machine (apt-get install prometheus; CI does)")
    return path


def rule_groups() -> dict:
    """The PrometheusRule's groups, as a Prometheus rule file."""
    (rule,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def test_the_manifests_rules_pass_promtools_checks(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    done = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups()['groups'])} rules found" in done.stdout


def test_every_rule_fires_when_it_should_and_not_before(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(HERE / "alerts" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    done = subprocess.run(
        [promtool(), "test", "rules", str(tmp_path / "rules_test.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load((HERE / "alerts" / "rules_test.yaml").read_text())
    firing = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    every = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}
    assert firing == every  # each rule has a case where it fires
