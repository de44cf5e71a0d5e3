"""The gauges the session-limit alerts read (service/metrics.py), and the store gauge that a
server without a shared store does not export (an alert would read its 0 as an outage)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from service import metrics
from service.engine.session.quotas import PrincipalQuota
from service.engine.session.sessions import SessionStore


def test_the_store_gauge_is_exported_only_once_set() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("store_up_probe", "a gauge like lstm_serve_session_store_up", registry=None)
    exported = metrics.ExportedOnceSet(gauge, registry)
    assert b"store_up_probe" not in generate_latest(registry)  # no store: absent, not 0
    exported.set(1)
    exported.set(0)  # registered once, set twice
    assert registry.get_sample_value("store_up_probe") == 0


def test_the_limits_and_the_fullest_principal_are_read_from_the_store() -> None:
    store = SessionStore(max_sessions=7, idle_timeout_s=60, quota=PrincipalQuota(max_sessions=3))
    metrics.track_session_limits(store)
    read = metrics.REGISTRY.get_sample_value
    assert read("lstm_serve_max_sessions") == 7
    assert read("lstm_serve_max_sessions_per_principal") == 3
    assert read("lstm_serve_top_principal_sessions") == 0
    for owner in ("alice", "alice", "bob"):
        store.quota.added(owner)
    assert read("lstm_serve_top_principal_sessions") == 2
    store.quota.removed("alice")
    store.quota.removed("alice")
    assert read("lstm_serve_top_principal_sessions") == 1
