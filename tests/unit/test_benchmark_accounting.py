"""The front-end benchmark's reading of the server's collector metric (loadtests/frontend.py)."""

from __future__ import annotations

from prometheus_client import generate_latest

from loadtests.frontend_report import collector_passes, combine, merge_passes, render, window_passes
from service.metrics import GC_PAUSE_BUCKETS, ServiceMetrics


def _scrape(metrics: ServiceMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_window_passes_counts_only_the_window_and_bounds_the_longest() -> None:
    metrics = ServiceMetrics()
    metrics.observe_gc_pauses("api", [(0, 0.0002)] * 5)  # before the window
    before = collector_passes(_scrape(metrics))
    metrics.observe_gc_pauses("api", [(0, 0.0002), (0, 0.0004), (2, 0.003)])
    metrics.observe_gc_pauses("engine", [(1, 0.001)])
    window = window_passes(before, collector_passes(_scrape(metrics)))

    assert window["api gen0 passes"] == 2 and window["api gen2 passes"] == 1 and window["engine gen1 passes"] == 1
    assert abs(window["api gen0 ms"] - 0.6) < 1e-6
    # the longest young pass (0.4 ms) lies under the first bucket bound at or above it
    assert window["api gen0 longest under ms"] == min(b for b in GC_PAUSE_BUCKETS if b >= 0.0004) * 1e3
    assert not any(key.startswith("api gen1") for key in window)  # no pass of that kind in the window


def test_a_pass_beyond_the_top_bucket_is_reported_over_it_not_as_infinity() -> None:
    metrics = ServiceMetrics()
    before = collector_passes(_scrape(metrics))
    top = max(b for b in GC_PAUSE_BUCKETS if b != float("inf"))
    metrics.observe_gc_pauses("api", [(2, 0.003), (2, top * 2)])
    window = window_passes(before, collector_passes(_scrape(metrics)))

    assert window["api gen2 longest over ms"] == top * 1e3
    assert "api gen2 longest under ms" not in window
    assert all(value != float("inf") for value in window.values())

    # over rounds: the pass over the top still shows, and the report says so
    bounded = {"api gen2 passes": 1.0, "api gen2 ms": 3.0, "api gen2 longest under ms": 5.0}
    merged = combine([{"images": 1, "collector_passes": window}, {"images": 1, "collector_passes": bounded}])
    assert merged["collector_passes"]["api gen2 passes"] == 3
    summary = {"engine": "null", "category": "brick", "input_size": 256, "concurrency": 1, "seconds": 1,
               "cpu_count": 2, "kinds": {"jpeg256-none": {
                   "bytes": 4096, "images_per_s": 1, "server_cpu_ms_per_image": 1, "server_cores": 1,
                   "client_cpu_ms_per_image": 1, "decode_ms": 1, "render_regions_ms": 1, "failures": 0,
                   "collector_passes": merged["collector_passes"]}}}
    assert f"one over {top * 1e3:g} ms" in render(summary)


def test_passes_of_several_servers_add_up() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_gc_pauses("api", [(0, 0.0002)] * 3)
    b.observe_gc_pauses("api", [(0, 0.0002), (0, 0.002)])
    b.observe_gc_pauses("engine", [(2, 0.004)])
    merged = merge_passes([collector_passes(_scrape(a)), collector_passes(_scrape(b))])
    window = window_passes({}, merged)
    assert window["api gen0 passes"] == 5 and window["engine gen2 passes"] == 1
    assert abs(window["api gen0 ms"] - 2.8) < 1e-6
    assert window["api gen0 longest under ms"] == min(x for x in GC_PAUSE_BUCKETS if x >= 0.002) * 1e3


def test_rounds_combine_into_medians_nested_figures_too() -> None:
    rounds = [{"images": 10, "server_cpu_ms_per_image": x, "threads_cpu_ms_per_image": {"loop": x},
               "switches_per_image": {"server": {"voluntary": x, "involuntary": 2 * x}}} for x in (1.0, 3.0, 2.0)]
    merged = combine(rounds)
    assert merged["images"] == 30 and merged["server_cpu_ms_per_image"] == 2.0
    assert merged["threads_cpu_ms_per_image"] == {"loop": 2.0}
    assert merged["switches_per_image"] == {"server": {"voluntary": 2.0, "involuntary": 4.0}}
