"""docs/OPERATIONS.md: its metrics table is service.metrics', its settings and paths are real."""

from __future__ import annotations

import re

from lstmserve.client_cli import TOKEN_ENV
from service.config import ENV_PREFIX, FLAGS
from tests.unit.deploy_reference import ROOT, load_reference

GUIDE = ROOT / "docs" / "OPERATIONS.md"


def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_metrics_table_matches_service_metrics() -> None:
    reference = load_reference()
    assert reference.documented_table(guide()) == reference.markdown_table(), (
        "docs/OPERATIONS.md's metrics table is stale: "
        "run python deploy/tools/metrics_reference.py --write"
    )


def test_every_metric_is_documented_with_type_and_labels() -> None:
    table = load_reference().documented_table(guide())
    for spec in load_reference().exported_metrics():
        (row,) = [ln for ln in table.splitlines() if f"`{spec.series[0]}`" in ln]
        assert f"| {spec.kind} |" in row
        assert all(f"`{label}`" in row for label in spec.labels), row


def test_settings_named_in_the_guide_exist() -> None:
    known = {ENV_PREFIX + name.upper() for name in FLAGS} | {TOKEN_ENV}  # lstm-client's token
    named = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b", guide()))
    assert named - {ENV_PREFIX}, "the guide names no setting"
    assert named <= known, f"unknown settings in the guide: {sorted(named - known)}"


def test_paths_named_in_the_guide_exist() -> None:
    paths = set(re.findall(r"`((?:deploy|docs|tests|service)/[\w./{},-]+)`", guide()))
    assert paths
    for path in paths:
        for expanded in expand_braces(path):
            assert (ROOT / expanded).exists(), f"the guide names {expanded}, which is missing"


def expand_braces(path: str) -> list[str]:
    """'overlays/{cpu,gpu}' -> ['overlays/cpu', 'overlays/gpu']."""
    match = re.search(r"\{([^}]*)\}", path)
    if match is None:
        return [path]
    return [
        expanded
        for option in match.group(1).split(",")
        for expanded in expand_braces(path[: match.start()] + option + path[match.end() :])
    ]


def test_session_portability_section_points_at_the_tests_that_prove_it() -> None:
    text = guide()
    section = text[text.index("## Keeping sessions across pods") :]
    section = section[: section.index("\n## ", 1)]
    assert "not available yet" not in section
    assert "tests/e2e/test_failover.py" in section
    assert (ROOT / "tests" / "e2e" / "test_failover.py").exists()
    assert "redis://" in section and "LSTM_SERVE_SNAPSHOT_KEY" in section
