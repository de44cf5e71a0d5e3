"""deploy/prometheus: the rules' one source and its PrometheusRule twin in sync, valid for the
CRD, querying only series lstm-serve exports; every alert unit-tested firing and resolving;
prometheus-adapter's rules for the sessions HPA. (promtool itself:
tests/e2e/test_deploy_prometheus_rules.py; a real Prometheus: tests/e2e/test_prometheus_real.py.)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.unit.crd_schemas import custom_resource_errors
from tests.unit.deploy_reference import ROOT, load_reference
from tests.unit.test_deploy_grafana import TARGET_LABELS, metric_names, selector_labels

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULE_TESTS = PROMETHEUS / "rules.test.yml"
# Exported by prometheus_client's process collector (Linux), not by service.metrics.
PROCESS_SERIES = {"process_start_time_seconds"}
# The alerts docs/OPERATIONS.md promises ("Alerts").
ALERTS = {
    "LstmServeSessionStoreDown", "LstmServeModelLoadFailed", "LstmServeVersionStuckDraining",
    "LstmServeSessionsNearLimit", "LstmServePrincipalNearQuota", "LstmServeChunkLatencyHigh",
    "LstmServeErrorRatioHigh", "LstmServeRestarting", "LstmServeNativeFrontRestarting",
    "LstmServeNativeFrontDown",
}  # fmt: skip
SEVERITIES = {"critical", "warning", "info"}


def load_tool() -> ModuleType:
    """deploy/tools/prometheus_rules.py as a module."""
    path = ROOT / "deploy" / "tools" / "prometheus_rules.py"
    spec = importlib.util.spec_from_file_location("prometheus_rules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rules() -> list[dict[str, Any]]:
    """Every rule of rules.yml, recording and alerting."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_the_prometheus_rule_is_generated_from_the_rule_file() -> None:
    tool = load_tool()
    assert (PROMETHEUS / "prometheusrule.yaml").read_text(encoding="utf-8") == tool.rendered(), (
        "deploy/prometheus/prometheusrule.yaml is stale: python deploy/tools/prometheus_rules.py "
        "--write"
    )
    twin = load(PROMETHEUS / "prometheusrule.yaml")
    assert twin["spec"]["groups"] == load(RULES)["groups"]


def test_the_prometheus_rule_and_pod_monitor_are_valid_for_their_crds() -> None:
    for path in (
        PROMETHEUS / "prometheusrule.yaml",
        ROOT / "deploy" / "kserve" / "podmonitor.yaml",
    ):
        errors = custom_resource_errors(load(path))
        assert not errors, f"{path.relative_to(ROOT)}: {errors}"


def test_the_operator_selects_the_rules_as_it_selects_the_service_monitor() -> None:
    rule = load(PROMETHEUS / "prometheusrule.yaml")
    monitor = load(ROOT / "deploy" / "k8s" / "monitoring" / "servicemonitor.yaml")
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    kustomization = load(PROMETHEUS / "kustomization.yaml")
    assert kustomization["resources"] == ["prometheusrule.yaml"]
    assert kustomization["namespace"] == "lstm-serve"


def test_rules_query_only_series_the_service_exports_with_their_labels() -> None:
    exported = load_reference().series_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        where = rule.get("alert") or rule["record"]
        names = metric_names(rule["expr"])
        assert names, f"{where}: no series in {rule['expr']!r}"
        unknown = names - set(exported) - recorded - PROCESS_SERIES
        assert not unknown, f"{where}: {sorted(unknown)} not exported (service/metrics.py)"
        for metric, label in selector_labels(rule["expr"]):
            if metric in exported:
                spec = exported[metric]
                allowed = set(spec.labels) | set(spec.extra_labels) | TARGET_LABELS
                assert label in allowed, f"{where}: {metric} has no label {label!r}"


def test_recording_rules_follow_the_naming_convention_and_come_first() -> None:
    groups = load(RULES)["groups"]
    recorded = [r["record"] for r in groups[0]["rules"]]
    assert recorded and all(
        re.fullmatch(r"[a-z_]+:lstm_serve_[a-z_]+:[a-z0-9_]+", r) for r in recorded
    )
    assert all("record" not in r for g in groups[1:] for r in g["rules"])


def test_every_alert_names_its_severity_and_says_what_to_do() -> None:
    found = alerts()
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert len(rule["annotations"]["description"]) > 80, f"{name}: say what to do"


def test_every_alert_is_unit_tested_firing_then_resolving() -> None:
    """rules.test.yml (run by promtool in tests/e2e/test_deploy_prometheus_rules.py) has, for
    each alert, an evaluation where it fires and a later one where it has resolved."""
    suite = load(RULE_TESTS)
    assert suite["rule_files"] == ["rules.yml"]
    shown: dict[str, set[str]] = {name: set() for name in ALERTS}
    for test in suite["tests"]:
        by_alert: dict[str, list[tuple[int, bool]]] = {}
        for case in test.get("alert_rule_test", []):
            minutes = int(str(case["eval_time"]).removesuffix("m"))
            by_alert.setdefault(case["alertname"], []).append((minutes, bool(case["exp_alerts"])))
        for name, evaluations in by_alert.items():
            evaluations.sort()
            firing = [t for t, fires in evaluations if fires]
            if firing:
                shown[name].add("firing")
            if firing and any(t > firing[0] and not fires for t, fires in evaluations):
                shown[name].add("resolved")
            if evaluations and not evaluations[0][1]:
                shown[name].add("quiet before")
    for name, seen in shown.items():
        assert seen == {"firing", "resolved", "quiet before"}, f"{name}: only {sorted(seen)}"


def test_prometheus_adapter_serves_the_metric_the_hpa_asks_for() -> None:
    values = load(PROMETHEUS / "prometheus-adapter-values.yaml")
    assert values["rules"]["default"] is False
    (rule,) = values["rules"]["custom"]
    (series,) = metric_names(rule["seriesQuery"])
    assert series in load_reference().series_names()
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"},
    }  # fmt: skip
    assert re.fullmatch(rule["name"]["matches"], series)
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    component = load(ROOT / "deploy" / "k8s" / "autoscaling" / "kustomization.yaml")
    (patch,) = component["patches"]
    operations = yaml.safe_load(patch["patch"])
    metrics = next(op["value"] for op in operations if op["path"] == "/spec/metrics")
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [rule["name"]["as"]]


def test_the_guide_lists_every_alert_and_recording_rule() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    section = text[text.index("## Alerts and recording rules") :]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"^\| `(LstmServe\w+)` \|", section, flags=re.MULTILINE))
    assert listed == ALERTS == set(alerts())
    for rule in rules():
        if "record" in rule:
            assert f"`{rule['record']}`" in section, rule["record"]
    assert "tests/e2e/test_prometheus_real.py" in section
