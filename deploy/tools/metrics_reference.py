"""The metrics lstm-serve exports, read from service.metrics: series names and the docs table.

  python deploy/tools/metrics_reference.py            print the markdown table
  python deploy/tools/metrics_reference.py --write    rewrite it in docs/OPERATIONS.md
tests/unit/test_deploy_docs.py fails when the docs table differs from this output, and
tests/unit/test_deploy_grafana.py checks the dashboard's queries against series_names().
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "OPERATIONS.md"
BEGIN = "<!-- metrics-reference:begin (deploy/tools/metrics_reference.py --write) -->"
END = "<!-- metrics-reference:end -->"

# The series each metric type is scraped as (prometheus_client's exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class MetricSpec:
    """One module-level metric of service.metrics."""

    name: str  # the family name, without _total for counters
    kind: str  # counter, gauge, histogram, ...
    labels: tuple[str, ...]
    help: str

    @property
    def series(self) -> tuple[str, ...]:
        return tuple(self.name + suffix for suffix in SUFFIXES[self.kind])

    @property
    def extra_labels(self) -> tuple[str, ...]:
        """Labels the exposition adds to some series: `le` on histogram buckets."""
        return ("le",) if self.kind == "histogram" else ()


def exported_metrics() -> list[MetricSpec]:
    """Every Prometheus metric defined at module level in service.metrics, by name."""
    from service import metrics

    found = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    specs = [
        MetricSpec(m._name, m._type, tuple(m._labelnames), " ".join(m._documentation.split()))
        for m in found
    ]
    bulk = [v for v in vars(metrics).values() if isinstance(v, metrics.BulkHistogram)]
    specs += [
        MetricSpec(m.name, "histogram", m.labelnames, " ".join(m.documentation.split()))
        for m in bulk
    ]  # the histograms the per-chunk path feeds a batch at a time (same exposition)
    return sorted(specs, key=lambda s: s.name)


def series_names() -> dict[str, MetricSpec]:
    """Every series name a scrape can show (e.g. lstm_serve_chunk_seconds_bucket) -> metric."""
    return {series: spec for spec in exported_metrics() for series in spec.series}


def markdown_table() -> str:
    rows = [
        "| metric (series) | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    for spec in exported_metrics():
        shown = ", ".join(f"`{s}`" for s in spec.series if not s.endswith("_created"))
        labels = ", ".join(f"`{label}`" for label in spec.labels + spec.extra_labels) or "none"
        meaning = spec.help.replace("|", "\\|")
        rows.append(f"| {shown} | {spec.kind} | {labels} | {meaning} |")
    return "\n".join(rows)


def documented_table(text: str) -> str:
    """The table between the BEGIN and END markers of docs/OPERATIONS.md."""
    start = text.index(BEGIN) + len(BEGIN)
    return text[start : text.index(END)].strip()


def write_doc(path: Path = DOC) -> None:
    text = path.read_text(encoding="utf-8")
    start = text.index(BEGIN) + len(BEGIN)
    path.write_text(
        text[:start] + "\n" + markdown_table() + "\n" + text[text.index(END) :], encoding="utf-8"
    )


def main(argv: list[str]) -> int:
    if argv[1:] == ["--write"]:
        write_doc()
        return 0
    print(markdown_table())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv))
