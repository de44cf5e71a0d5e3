"""docs/OPERATIONS.md, "Tracing": its flags, its one-line message, the spans and attributes it
lists, the variables it names and its collector example are the real ones. (What the spans hang
under is tests/e2e/test_tracing.py's.)"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import yaml
from opentelemetry import environment_variables as api_variables
from opentelemetry.sdk import environment_variables as sdk_variables

from service.config import FLAGS, ServerConfig
from service.tracing import EXTRA_MISSING

ROOT = Path(__file__).resolve().parents[2]
SPANS = ("admission", "queue wait", "batch", "store save", "reply")


def section() -> str:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    start = text.index("\n## Tracing\n")
    return text[start : text.index("\n## ", start + 1)]


def service_strings() -> set[str]:
    """Every string literal of service/ (span names and attribute keys are literals)."""
    found: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        found |= set(re.findall(r'"([^"\n]+)"', path.read_text(encoding="utf-8")))
    return found


def test_the_flags_table_is_the_trace_flags_with_their_defaults() -> None:
    rows = [ln for ln in section().splitlines() if ln.startswith("| `--trace-")]
    named = {re.match(r"\| `--([\w-]+)`", ln)[1].replace("-", "_") for ln in rows}  # type: ignore[index]
    assert named == {name for name in FLAGS if name.startswith("trace_")}
    defaults = {f.name: f.default for f in fields(ServerConfig) if f.name in named}
    assert defaults == {"trace_otlp_endpoint": "", "trace_sample_ratio": 1.0,
                        "trace_service_name": "lstm-serve"}  # fmt: skip
    cells = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    assert cells["`--trace-otlp-endpoint` (`LSTM_SERVE_TRACE_OTLP_ENDPOINT`)"] == "empty: off"
    assert cells["`--trace-sample-ratio` (`LSTM_SERVE_TRACE_SAMPLE_RATIO`)"] == "1"
    assert cells["`--trace-service-name` (`LSTM_SERVE_TRACE_SERVICE_NAME`)"] == "`lstm-serve`"


def test_the_missing_extra_line_is_the_servers() -> None:
    text = " ".join(section().split())
    assert f"`{EXTRA_MISSING}`" in text.replace("` `", " ")


def test_every_span_and_attribute_listed_is_one_the_server_records() -> None:
    table = [ln for ln in section().splitlines() if ln.startswith("| `")]
    literals = service_strings()
    for span in SPANS:
        assert any(ln.startswith(f"| `{span}`") for ln in table), span
        assert span in literals, span
    keys = set(re.findall(r"`((?:rpc|http|url|lstmserve)\.[a-z_.]+)`", "\n".join(table)))
    assert len(keys) >= 12, keys
    assert keys <= literals, sorted(keys - literals)


def test_the_otel_variables_named_are_the_sdks() -> None:
    named = set(re.findall(r"`(OTEL_[A-Z_]+[A-Z])`", section()))
    known = {n for n in dir(sdk_variables) + dir(api_variables) if n.startswith("OTEL_")}
    assert len(named) >= 7 and named <= known, sorted(named - known)


def test_the_collector_example_takes_otlp_grpc_and_forwards_it() -> None:
    (block,) = re.findall(r"```yaml\n(.*?)```", section(), re.S)
    config = yaml.safe_load(block)
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"] and set(pipeline["exporters"]) <= set(
        config["exporters"]
    )
