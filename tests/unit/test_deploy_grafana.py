"""The Grafana dashboard queries only series that service.metrics exports, with their labels."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.unit.deploy_reference import ROOT, load_reference

DASHBOARD = ROOT / "deploy" / "grafana" / "lstm-serve.json"

# Labels Prometheus (Operator) attaches at scrape time, not the service.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' panels too) and every query variable."""
    stack = list(board["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert inner, f"variable {variable['name']}: unexpected query {query!r}"
            yield f"${variable['name']}", inner.group(1)


def metric_names(expr: str) -> set[str]:
    """Identifiers in `expr` that name series: not functions, keywords, labels or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = GROUPING.sub("", text)
    return {name for name in IDENT.findall(text) if name.lower() not in PROMQL_WORDS}


def selector_labels(expr: str) -> Iterator[tuple[str, str]]:
    """(metric, label) for every matcher in `metric{label=...}`."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for metric, matchers in SELECTOR.findall(text):
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
            yield metric, label


def test_metric_name_parser_sees_through_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{model=~"$m", x="b{c}"}'
        "[$__rate_interval]))) / ignoring(pod) b_total offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert set(selector_labels(expr)) == {("a_bucket", "model"), ("a_bucket", "x")}


def test_every_query_names_only_exported_series() -> None:
    exported = load_reference().series_names()
    seen: set[str] = set()
    for where, expr in expressions(dashboard()):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            seen.add(name)
            assert name in exported, f"{where}: {name!r} is not exported: {expr!r}"
    families = {spec.name for spec in exported.values()}
    unused = {f for f in families if not any(s.startswith(f) for s in seen)}
    assert not unused, f"metrics the dashboard never shows: {sorted(unused)}"


def test_every_matcher_uses_a_label_the_metric_has() -> None:
    exported = load_reference().series_names()
    for where, expr in expressions(dashboard()):
        for metric, label in selector_labels(expr):
            spec = exported[metric]
            allowed = set(spec.labels) | set(spec.extra_labels) | TARGET_LABELS
            assert label in allowed, f"{where}: {metric} has no label {label!r}: {expr!r}"


def test_histograms_are_queried_through_buckets_with_le() -> None:
    for where, expr in expressions(dashboard()):
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \((le\b|[^)]*\ble\b)", expr), (
                f"{where}: histogram_quantile needs rate(..._bucket) summed by le: {expr!r}"
            )


def test_dashboard_is_importable_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "lstm-serve" and board["title"]
    ids = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
