"""The front-end benchmark's figures: the server's collector passes read from its metrics,
rounds combined into medians, and the Markdown report (:mod:`loadtests.frontend`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtests.procstat import TreeUsage


def server_figures(spent: TreeUsage, images: int, wall_s: float) -> dict[str, Any]:
    """The server's CPU over a window (``spent``: the processes' usage, after - before) per
    image and by where it went: threads (the engine's, the event loops', the pools'),
    processes (the front ends, the engine process, the supervisor or a single server), and by
    process role its context switches (wake-ups and preemptions), its time in the kernel and
    its minor page faults."""
    n = max(images, 1)
    return {"server_cpu_ms_per_image": round(spent.cpu_s / n * 1e3, 2),
            "server_cores": round(spent.cpu_s / wall_s, 2) if wall_s else 0.0,
            "engine_threads_cpu_ms_per_image": round(spent.threads["engine"] / n * 1e3, 2),
            "threads_cpu_ms_per_image": {group: round(s / n * 1e3, 2) for group, s in spent.threads.items()},
            "processes_cpu_ms_per_image": {role: round(s / n * 1e3, 3) for role, s in spent.roles.items() if s > 0},
            "switches_per_image": {role: {"voluntary": round(v / n, 2), "involuntary": round(i / n, 2)}
                                   for role, (v, i) in spent.switches.items() if v or i},
            "kernel_cpu_ms_per_image": {role: round(s / n * 1e3, 3) for role, s in spent.kernel_s.items()
                                        if spent.roles.get(role, 0.0) > 0},
            "minor_faults_per_image": {role: round(f / n, 2) for role, f in spent.faults.items()
                                       if spent.roles.get(role, 0.0) > 0}}


def _process_detail(figures: dict[str, Any], role: str) -> str:
    switches = figures.get("switches_per_image", {}).get(role, {"voluntary": 0, "involuntary": 0})
    kernel = figures.get("kernel_cpu_ms_per_image", {}).get(role)
    faults = figures.get("minor_faults_per_image", {}).get(role)
    return ", ".join([f"{switches['voluntary']:g} / {switches['involuntary']:g}"]
                     + ([f"kernel {kernel:g} ms"] if kernel is not None else [])
                     + ([f"{faults:g} faults"] if faults is not None else []))


def histogram_means(metrics_text: str, family: str, label: str | None = None) -> dict[str, tuple[float, float]]:
    """A histogram's (sum, count) from a ``/metrics`` body, added up over its series, by the
    value of ``label`` (all under "" without one): two scrapes give a window's mean."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            key = sample.labels.get(label, "") if label else ""
            total, count = out.get(key, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                out[key] = (total + sample.value, count)
            elif sample.name.endswith("_count"):
                out[key] = (total, count + sample.value)
    return out


def cache_lookups(metrics_text: str) -> dict[str, float]:
    """``msflow_cache_requests_total`` from a ``/metrics`` body, by result (hit, miss, error)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["result"]: sample.value for family in text_string_to_metric_families(metrics_text)
            if family.name == "msflow_cache_requests" for sample in family.samples
            if sample.name.endswith("_total")}


def window_metrics(before: Sequence[str], after: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """What the servers' metrics say of a window, from their ``/metrics`` bodies at its edges
    (one body per server): the collector's passes and the result cache's lookups by result."""
    def lookups(texts: Sequence[str]) -> dict[str, float]:
        counts = [cache_lookups(text) for text in texts]
        return {result: sum(c.get(result, 0.0) for c in counts) for result in {r for c in counts for r in c}}

    cache0, cache1 = lookups(before), lookups(after)
    passes = window_passes(merge_passes([collector_passes(t) for t in before]),
                           merge_passes([collector_passes(t) for t in after]))
    return passes, {result: count - cache0.get(result, 0.0) for result, count in sorted(cache1.items())}


def merge_passes(scrapes: Sequence[dict[tuple[str, str], tuple[float, float, dict[float, float]]]]
                 ) -> dict[tuple[str, str], tuple[float, float, dict[float, float]]]:
    """Several servers' collector histograms as one (counts, sums and buckets added)."""
    merged: dict[tuple[str, str], tuple[float, float, dict[float, float]]] = {}
    for scrape in scrapes:
        for key, (count, seconds, buckets) in scrape.items():
            count0, seconds0, buckets0 = merged.get(key, (0.0, 0.0, {}))
            merged[key] = (count0 + count, seconds0 + seconds,
                           {le: buckets0.get(le, 0.0) + buckets.get(le, 0.0) for le in {*buckets0, *buckets}})
    return merged


def collector_passes(metrics_text: str) -> dict[tuple[str, str], tuple[float, float, dict[float, float]]]:
    """``msflow_gc_pause_seconds`` from a ``/metrics`` body: (process, generation) -> (count,
    seconds, cumulative bucket counts by upper bound)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[tuple[str, str], tuple[float, float, dict[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "msflow_gc_pause_seconds":
            continue
        for sample in family.samples:
            key = (sample.labels["process"], sample.labels["generation"])
            count, seconds, buckets = found.get(key, (0.0, 0.0, {}))
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                seconds = sample.value
            elif sample.name.endswith("_bucket"):
                buckets = {**buckets, float(sample.labels["le"]): sample.value}
            found[key] = (count, seconds, buckets)
    return found


def window_passes(before: dict[tuple[str, str], tuple[float, float, dict[float, float]]],
                  after: dict[tuple[str, str], tuple[float, float, dict[float, float]]]) -> dict[str, float]:
    """The collector's passes between two scrapes, flat: per
    ``<process> gen<g>``, how many, their total ms, and the bound of the longest (ms): the
    bucket it fell under, or, for a pass beyond the histogram's top bucket, that bucket
    (``longest over ms``)."""
    out: dict[str, float] = {}
    for key, (count, seconds, buckets) in sorted(after.items()):
        count0, seconds0, buckets0 = before.get(key, (0.0, 0.0, {}))
        if count - count0 <= 0:
            continue
        name = f"{key[0]} gen{key[1]}"
        out[f"{name} passes"] = count - count0
        out[f"{name} ms"] = round((seconds - seconds0) * 1e3, 2)
        bounds = [le for le, c in buckets.items() if c - buckets0.get(le, 0.0) == count - count0 and le != float("inf")]
        if bounds:
            out[f"{name} longest under ms"] = min(bounds) * 1e3
        else:
            out[f"{name} longest over ms"] = max(le for le in buckets if le != float("inf")) * 1e3
    return out


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind's figures over its rounds: the median of each number (of each thread group's
    too), images, failures and batch mixes summed, every round kept under ``rounds``. On a
    shared box one window can drift by several percent, as much as a target's margin."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict[str, Any] = {}
    for key, first in rounds[0].items():
        if key in ("images", "failures"):
            out[key] = sum(r[key] for r in rounds)
        elif key == "collector_passes":  # over all the rounds: counts and times add up, the longest is the longest
            keys = sorted({k for r in rounds for k in r[key]})
            out[key] = {k: (max if " longest " in k else sum)(r[key][k] for r in rounds if k in r[key])
                        for k in keys}
        elif key == "cache_lookups":  # counts over all the rounds
            out[key] = {k: sum(r.get(key, {}).get(k, 0.0) for r in rounds) for k in sorted({k for r in rounds
                                                                                          for k in r.get(key, {})})}
        elif key == "images_by_server":
            out[key] = [sum(counts) for counts in zip(*(r[key] for r in rounds))]
        elif key == "batch_mix":
            out[key] = {b: sum(r[key].get(b, 0) for r in rounds) for b in sorted({b for r in rounds for b in r[key]})}
        elif isinstance(first, dict):  # each key's median over the rounds that have it (batch sizes vary)
            out[key] = _medians([r[key] for r in rounds])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = round(float(np.median([r[key] for r in rounds])), 3)
        else:
            out[key] = first
    out["rounds"] = rounds
    return out


def _medians(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Each key's median over the dicts that have it; nested dicts key by key."""
    out: dict[str, Any] = {}
    for k in sorted({k for d in dicts for k in d}):
        values = [d[k] for d in dicts if k in d]
        out[k] = _medians(values) if isinstance(values[0], dict) else round(float(np.median(values)), 3)
    return out


def render(s: dict[str, Any]) -> str:
    rounds = s.get("rounds", 1)
    placement = "" if s.get("loop_work_pixels") is None else f"; MSFLOW_LOOP_WORK_PIXELS={s['loop_work_pixels']}"
    served = s.get("served_engine")
    engine = s["engine"] if not served or served == s["engine"] else f"{s['engine']}: {served}"
    device = "" if s.get("device", "cpu") == "cpu" else f" on {s['device']}"
    per_kind = f"{s['seconds']} s per kind" + (f" in each of {rounds} rounds (medians)" if rounds > 1 else "")
    lines = [f"# Front end ({engine} engine{device}, `{s['category']}` at {s['input_size']} px, {_load(s)}, {per_kind}, "
             f"{s['cpu_count']} cores, "
             + (f"{s['servers']} separate single-process servers" if s.get("servers", 1) > 1
                else f"{s.get('api_processes', 1)} API process(es)")
             + f"; image: {s.get('image', 'skimage brick texture')}{placement}{_serving_state(s)})", "",
             "| input | images/s | server CPU / image | server cores | client CPU / image | decode (wall) | "
             "render + regions (wall) | latency at the client: p50 / p99.9 / max | failures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in s["kinds"].items():
        waits = r.get("client_latency_ms", {})
        answer = f", answers {int(r['answer_bytes']) / 1024:.1f} KB" if r.get("answer_bytes") else ""
        lines.append(f"| {kind} ({r['bytes'] // 1024} KB{answer}) | {r['images_per_s']} | {r['server_cpu_ms_per_image']} ms | "
                     f"{r['server_cores']} | {r['client_cpu_ms_per_image']} ms | {_ms(r['decode_ms'])} | "
                     f"{_ms(r['render_regions_ms'])} | {waits.get('p50')} / {waits.get('p99.9')} / {waits.get('max')} ms "
                     f"| {r['failures']} |")
    lookups = {k: r["cache_lookups"] for k, r in s["kinds"].items() if r.get("cache_lookups")}
    if lookups:
        lines += ["", "The result cache's lookups in the windows (`msflow_cache_requests_total`):", ""]
        lines += [f"- {kind}: " + ", ".join(f"{result} {count:g}" for result, count in counts.items())
                  for kind, counts in lookups.items()]
    by_process = {k: r["processes_cpu_ms_per_image"] for k, r in s["kinds"].items()
                  if r.get("processes_cpu_ms_per_image")}
    if by_process:
        lines += ["", "Server CPU per image by process (and per image: its threads' wake-ups / preemptions; "
                  "of its CPU, the kernel's; its minor page faults):", ""]
        for kind, roles in by_process.items():
            lines.append(f"- {kind}: " + ", ".join(f"{role} {ms} ms ({_process_detail(s['kinds'][kind], role)})"
                                                 for role, ms in roles.items()))
    for kind, r in s["kinds"].items():
        if "bare_engine_cpu_ms_per_image" in r:
            mix = ", ".join(f"{c} at {b}" for b, c in r["batch_mix"].items())
            lines.append(f"\n{kind}: mean batch {r['mean_batch']} (images by batch size: {mix})\n"
                         f"- by thread: the server's engine threads {r['engine_threads_cpu_ms_per_image']} ms CPU "
                         f"per image, its other threads {r['outside_threads_ms']} ms "
                         f"= {100 * (r['outside_threads_share'] or 0):.1f}% of it{_by_round(r)} "
                         f"(event loop {r['threads_cpu_ms_per_image']['loop']} ms, "
                         f"decode and other pool threads {r['threads_cpu_ms_per_image']['pool']} ms)\n"
                         f"- against the bare engine ({r['bare_engine_cpu_ms_per_image']} ms CPU per image at that "
                         f"batch mix, in-process): outside the engine {r['outside_engine_ms']} ms "
                         f"= {100 * r['outside_over_engine']:.1f}% of it")
    passes = {k: r["collector_passes"] for k, r in s["kinds"].items() if r.get("collector_passes")}
    if passes:
        lines += ["", "The collector's passes in the windows (`msflow_gc_pause_seconds`, scraped before and after "
                  "each; over all rounds):", ""]
        for kind, p in passes.items():
            names = [k[:-len(" passes")] for k in p if k.endswith(" passes")]
            lines.append(f"- {kind}: " + "; ".join(
                f"{name} {p[f'{name} passes']:g} passes, {p[f'{name} ms']:g} ms in all, "
                + (f"one over {p[f'{name} longest over ms']:g} ms" if f"{name} longest over ms" in p
                   else f"each under {p[f'{name} longest under ms']:g} ms") for name in names))
    profiled = {k: r["profile_ms"] for k, r in s["kinds"].items() if "profile_ms" in r}
    if profiled:
        stages = list(dict.fromkeys(name for p in profiled.values() for name in p))
        lines += ["", "CPU per image by stage (ms, each stage alone in one thread; other = server CPU - their sum):", "",
                  "| input | " + " | ".join(stages) + " |", "| --- |" + " --- |" * len(stages)]
        for kind, prof in profiled.items():
            lines.append(f"| {kind} | " + " | ".join(str(prof.get(name, "-")) for name in stages) + " |")
    return "\n".join(lines + [""])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value} ms"


def _load(s: dict[str, Any]) -> str:
    if s.get("client") == "wrk":
        return f"{s['concurrency']} in flight from wrk"
    if s.get("rate"):
        return f"{s['rate']:g} images/s offered (open loop, at most {s['concurrency']} in flight)"
    return f"{s['concurrency']} in flight"


def _serving_state(s: dict[str, Any]) -> str:
    """What the server ran with beyond its defaults: a filled review store, Redis, distinct uploads."""
    held = s.get("review_store")
    out = "" if not held else f"; a review store of {held['items']} items, {held['labelled']} labelled"
    if s.get("redis"):
        out += "; Redis (result cache, links)"
    if s.get("distinct"):
        out += "; every request's bytes distinct"
    return out


def _by_round(r: dict[str, Any]) -> str:
    shares = [f"{100 * (x['outside_threads_share'] or 0):.1f}%" for x in r.get("rounds", [])]
    return f" (rounds: {', '.join(shares)})" if shares else ""
