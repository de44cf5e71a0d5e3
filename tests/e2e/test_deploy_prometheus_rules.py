"""promtool on deploy/prometheus: the rule file and its PrometheusRule twin load (`promtool
check rules`), and every alert fires and resolves as rules.test.yml says (`promtool test
rules`). Skipped without promtool, except in CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.e2e.prometheus_tools import prometheus_binary
from tests.unit.deploy_reference import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run(
        [prometheus_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_promtool_checks_the_rule_file_and_the_prometheus_rules_groups(tmp_path: Path) -> None:
    assert "SUCCESS" in promtool("check", "rules", "rules.yml")
    twin = yaml.safe_load((PROMETHEUS / "prometheusrule.yaml").read_text(encoding="utf-8"))
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": twin["spec"]["groups"]}), encoding="utf-8")
    assert "SUCCESS" in promtool("check", "rules", str(extracted))


def test_promtool_unit_tests_every_alert_firing_and_resolving() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules.test.yml")
