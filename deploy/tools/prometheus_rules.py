"""deploy/prometheus/rules.yml (the one source of the rules) as a Prometheus Operator
PrometheusRule: deploy/prometheus/prometheusrule.yaml.

  python deploy/tools/prometheus_rules.py            print the PrometheusRule
  python deploy/tools/prometheus_rules.py --write    rewrite deploy/prometheus/prometheusrule.yaml
  python deploy/tools/prometheus_rules.py --check    exit 1 when the file is stale
tests/unit/test_deploy_prometheus.py fails while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "prometheus" / "prometheusrule.yaml"
SERVICE_MONITOR = ROOT / "deploy" / "k8s" / "monitoring" / "servicemonitor.yaml"
HEADER = (
    "# GENERATED from deploy/prometheus/rules.yml by deploy/tools/prometheus_rules.py --write:\n"
    "# edit that file, not this one. The Prometheus Operator's twin of the plain rule file;\n"
    "# apply with `kubectl apply -k deploy/prometheus` (namespace lstm-serve).\n"
)


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    """The `groups` of the plain Prometheus rule file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]


def selector_labels() -> dict[str, str]:
    """The labels the Prometheus Operator selects rules by: those of the ServiceMonitor
    (kube-prometheus-stack picks both by its release label)."""
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text(encoding="utf-8"))
    return dict(monitor["metadata"]["labels"])


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "lstm-serve", "labels": selector_labels()},
        "spec": {"groups": groups},
    }


def rendered() -> str:
    body = yaml.safe_dump(
        prometheus_rule(rule_groups()), sort_keys=False, allow_unicode=True, width=100
    )
    return HEADER + body


def main(argv: list[str]) -> int:
    if argv[1:] == ["--write"]:
        PROMETHEUS_RULE.write_text(rendered(), encoding="utf-8")
        return 0
    if argv[1:] == ["--check"]:
        if PROMETHEUS_RULE.read_text(encoding="utf-8") != rendered():
            print(f"{PROMETHEUS_RULE} is stale: run {argv[0]} --write", file=sys.stderr)
            return 1
        return 0
    print(rendered(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
