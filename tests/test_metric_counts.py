"""The plain-int counts of the per-event path (`server.metrics`): what a scrape reads of
them is what counting each one into its Counter as it came would have read."""

from __future__ import annotations

from prometheus_client import generate_latest

from jobwire.server.metrics import Metrics


def _scrape(metrics: Metrics) -> str:
    metrics.flush()  # as `exposition` does before every scrape
    return generate_latest(metrics.registry).decode()


def test_counts_reach_their_counters_once_each_scrape() -> None:
    metrics = Metrics()
    assert "jobwire_events_total{" not in _scrape(metrics)  # no state label before its first event
    for state in ("WORKING", "WORKING", "WORKING", "SUCCESS"):
        metrics.event(state)
    metrics.ws_deliveries.n += 2  # sent as ASGI messages
    metrics.ws_written.n += 4  # written directly
    metrics.sse_deliveries.n += 1
    text = _scrape(metrics)
    assert 'jobwire_events_total{state="WORKING"} 3.0' in text
    assert 'jobwire_events_total{state="SUCCESS"} 1.0' in text
    assert 'jobwire_deliveries_total{transport="websocket"} 6.0' in text
    assert 'jobwire_deliveries_total{transport="sse"} 1.0' in text
    assert "jobwire_direct_writes_total 4.0" in text
    # A second scrape adds what came since, and nothing twice.
    metrics.event("WORKING")
    metrics.sse_deliveries.n += 1
    text = _scrape(metrics)
    assert 'jobwire_events_total{state="WORKING"} 4.0' in text
    assert 'jobwire_events_total{state="SUCCESS"} 1.0' in text
    assert 'jobwire_deliveries_total{transport="websocket"} 6.0' in text
    assert 'jobwire_deliveries_total{transport="sse"} 2.0' in text
    assert "jobwire_direct_writes_total 4.0" in text
