"""The CPU and throughput benchmarks of the serving path, briefly, each as the operator runs
it in a subprocess: ``loadtests.frontend`` (the null engine over every kind of input, a fixed
offered rate, the compiled wrk client, the real engine's CPU apart from the rest),
``loadtests.engine_link`` (the multi-process link against a local batcher),
``loadtests.frontend_modes`` (serving modes round by round) and ``loadtests.instructions``
(instruction counts by process, under callgrind)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import CATEGORY, missing
from loadtest_fixtures import ROOT, _clean_env


def _summary(cmd: list[str], out: Path) -> dict:
    """Run a benchmark (``cmd``, writing to ``out``) to completion; its summary.json."""
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def test_frontend_benchmark_on_the_null_engine(model_store, tmp_path):
    """loadtests/frontend.py, briefly: the null engine answers every kind of input, and the
    report has CPU per image, throughput, the client's own CPU and latency, and the stage
    profile. Driven over two separate servers (``--servers 2``, the floor of a split): the
    connections reach both, and the CPU of both is counted; both serve one review store
    already holding 300 items (``--review-items``) and share one Redis, and every request's
    bytes differ (``--redis --distinct``): the result cache misses every time."""
    out = tmp_path / "frontend"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "1.5",
           "--concurrency", "4", "--servers", "2", "--review-items", "300", "--review-labels", "50",
           "--redis", "--distinct", "--kinds", "jpeg256-none", "png256-inline", "jpeg2048-none", "png256-overlay",
           "--out", str(out)]
    s = _summary(cmd, out)
    assert s["engine"] == "null" and set(s["kinds"]) == {"jpeg256-none", "png256-inline", "jpeg2048-none",
                                                         "png256-overlay"}
    assert s["review_store"] == {"items": 300, "labelled": 50}  # served with a review store of that size
    assert s["redis"] and s["distinct"]
    for kind, r in s["kinds"].items():
        assert r["failures"] == 0 and r["images"] > 0, (kind, r)
        assert r["server_cpu_ms_per_image"] > 0 and r["client_cpu_ms_per_image"] > 0
        assert len(r["images_by_server"]) == 2 and min(r["images_by_server"]) > 0, r["images_by_server"]
        assert sum(r["images_by_server"]) == r["images"]
        assert r["switches_per_image"]["server"]["voluntary"] > 0  # the servers' threads waited for work
        # one Redis for both servers, and every request's bytes distinct: every lookup a miss
        assert r["cache_lookups"].get("miss", 0) >= r["images"] and r["cache_lookups"].get("hit", 0) == 0, r
        waits = r["client_latency_ms"]  # the tail shows the server's stalls (a collector's full pass, once)
        assert 0 < waits["p50"] <= waits["p99"] <= waits["p99.9"] <= waits["max"], (kind, waits)
        assert {"multipart", "decode", "resize", "regions", "json", "other"} <= set(r["profile_ms"])
    assert "heatmap_encode" in s["kinds"]["png256-inline"]["profile_ms"]
    # the answers' size, read from each answer: an inline heatmap's base64 makes it larger
    answers = {kind: r["answer_bytes"] for kind, r in s["kinds"].items()}
    assert answers["png256-inline"] > answers["jpeg256-none"] > 0, answers
    assert answers["png256-overlay"] > 5 * answers["png256-inline"], answers  # the photograph under the heatmap
    assert "KB, answers " in (out / "summary.md").read_text()
    # the collector's passes in the windows, from the server's own metric: counted, timed, bounded
    passes = {k: v for r in s["kinds"].values() for k, v in r["collector_passes"].items()}
    assert any(k.startswith("api gen") and k.endswith(" passes") and v > 0 for k, v in passes.items()), passes
    for key in (k for k in passes if k.endswith(" passes")):
        name = key[:-len(" passes")]
        assert passes[f"{name} ms"] >= 0 and passes[f"{name} longest under ms"] > 0, passes
    # (That a 2048 px JPEG decodes at 1/8 scale is checked on its pixels, not its time:
    # tests/unit/test_decode_scale.py::test_large_jpeg_decodes_at_reduced_scale_like_the_trainer.)


def test_frontend_benchmark_offers_a_fixed_rate(model_store, tmp_path):
    """``--rate``: an open loop at a fixed rate below saturation (modes compared at one load,
    with cores to spare): the server answers at the offered rate, not faster, and the report
    says what was offered."""
    out = tmp_path / "frontend-rate"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "2",
           "--rate", "40", "--kinds", "jpeg256-none", "--no-profile", "--out", str(out)]
    s = _summary(cmd, out)
    r = s["kinds"]["jpeg256-none"]
    assert s["rate"] == 40 and r["offered_per_s"] == 40 and r["failures"] == 0
    # 80 due in the window; the last answers land just after it (the window waits for them)
    assert 76 <= r["images"] <= 81 and 30 <= r["images_per_s"] <= 41, r
    assert r["mean_batch"] < 2  # one image every 25 ms: no queue for batches to form from
    assert "40 images/s offered" in (out / "summary.md").read_text()


def test_frontend_benchmark_with_the_compiled_client(model_store, tmp_path):
    """``--client wrk``: Debian's wrk loads two servers (the connections spread over both); the
    report has images, the client's CPU (a fraction of the server's: the point of a compiled
    client), the latency wrk measured, and from the servers' metrics the mean batch and the
    decode time. Options that need the answers read are refused before any server starts."""
    if shutil.which("wrk") is None:
        missing("no wrk: run scripts/install-wrk.sh")
    out = tmp_path / "frontend-wrk"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "2",
           "--client", "wrk", "--servers", "2", "--kinds", "jpeg256-none", "png256-overlay", "--no-profile",
           "--out", str(out)]
    s = _summary(cmd, out)
    overlay = s["kinds"]["png256-overlay"]  # its query (heatmap=inline&overlay=true) reached the servers
    assert overlay["failures"] == 0 and overlay["render_regions_ms"] > 0, overlay
    r = s["kinds"]["jpeg256-none"]
    assert s["client"] == "wrk" and r["failures"] == 0 and r["images"] > 0, r
    assert min(r["images_by_server"]) > 0 and sum(r["images_by_server"]) == r["images"], r["images_by_server"]
    assert 0 < r["client_cpu_ms_per_image"] < r["server_cpu_ms_per_image"] / 3, r
    assert 1 <= r["mean_batch"] <= 8 and r["decode_ms"] > 0 and r["render_regions_ms"] is None, r
    assert 0 < r["client_latency_ms"]["p50"] <= r["client_latency_ms"]["max"], r["client_latency_ms"]
    assert "8 in flight from wrk" in (out / "summary.md").read_text()
    refused = subprocess.run(cmd[:-2] + ["--rate", "50", "--out", str(tmp_path / "refused")], cwd=ROOT,
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "need the httpx client" in refused.stderr
    assert not (tmp_path / "refused" / "summary.json").exists()


def test_frontend_benchmark_splits_the_real_engines_cpu_from_the_rest(model_store, demo_root, tmp_path):
    """With the real engine the report splits the server's CPU by thread (the threads named
    engine-*: the batcher's engine thread and onnxruntime's pool) and compares it with the bare
    engine at the batch sizes the server formed; ``--image`` posts a part of the category,
    ``--rounds`` reports the medians of several windows, and the stage profile runs on the
    real model's map."""
    out = tmp_path / "frontend-onnx"
    good = sorted((demo_root / CATEGORY / "test" / "good").iterdir())[0]
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--engine", "onnx",
           "--seconds", "1", "--rounds", "2", "--concurrency", "4", "--kinds", "jpeg256-none",
           "--image", str(good), "--out", str(out)]
    summary = _summary(cmd, out)
    assert summary["image"] == str(good) and str(good) in (out / "summary.md").read_text()
    # the engine the server loaded, as it names it (on a GPU host --device cuda serves on the GPU)
    assert summary["device"] == "cpu" and summary["served_engine"].startswith("onnxruntime"), summary["served_engine"]
    assert f"onnx: {summary['served_engine']} engine" in (out / "summary.md").read_text()
    r = summary["kinds"]["jpeg256-none"]
    assert r["failures"] == 0 and sum(r["batch_mix"].values()) == r["images"] > 0
    assert set(r["bare_engine_by_batch_ms"]) == set(r["batch_mix"])
    # the engine is most of the server's CPU, and the rest is not nothing (HTTP, decode)
    assert 0.5 * r["server_cpu_ms_per_image"] < r["engine_threads_cpu_ms_per_image"] < r["server_cpu_ms_per_image"]
    assert r["outside_threads_ms"] > 0 and r["bare_engine_cpu_ms_per_image"] > 0
    # the stage profile labels and colours the real model's map of this image (run here)
    assert {"decode", "regions", "json", "other"} <= set(r["profile_ms"]) and r["profile_ms"]["regions"] > 0
    # two rounds: their images and batches add up, the figures are their medians, and each
    # round has its own bare-engine comparison (measured right after it)
    assert len(r["rounds"]) == 2 and sum(x["images"] for x in r["rounds"]) == r["images"]
    assert all(set(x["bare_engine_by_batch_ms"]) == set(x["batch_mix"]) for x in r["rounds"])
    shares = sorted(x["outside_threads_share"] for x in r["rounds"])
    assert r["outside_threads_share"] == pytest.approx(sum(shares) / 2, abs=1e-3)


def test_engine_link_benchmark_compares_the_link_with_a_local_batcher(model_store, tmp_path):
    """loadtests/engine_link.py, briefly: the same images through a local batcher and through
    a real engine process, CPU per image on each side of the link, batches as configured."""
    out = tmp_path / "engine-link"
    cmd = [sys.executable, "-m", "loadtests.engine_link", "--store", str(model_store), "--seconds", "0.5",
           "--rounds", "1", "--in-flight", "1", "8", "--out", str(out)]
    s = _summary(cmd, out)
    assert [(w["mode"], w["in_flight"]) for w in s["medians"]] == [("local", 1), ("link", 1), ("local", 8), ("link", 8)]
    for w in s["medians"]:
        assert w["images_per_s"] > 0 and w["client_cpu_ms"] > 0, w
        assert (w["engine_cpu_ms"] > 0) == (w["mode"] == "link"), w  # only the link has an engine process
        assert 1 <= w["mean_batch"] <= w["in_flight"], w
    assert "the link costs" in (out / "summary.md").read_text()
    assert all(0 < us < 10_000 for us in s["bare_round_trip_cpu_us"]), s["bare_round_trip_cpu_us"]


def test_serving_modes_take_turns_and_are_compared_round_by_round(model_store, tmp_path):
    """loadtests/frontend_modes.py, briefly: two modes in each of two rounds, each mode's CPU
    per image as a ratio to the first mode's of the same round (1 for the first itself), and
    a bad mode or a mode's own option after ``--`` refused before any server starts."""
    out = tmp_path / "modes"
    cmd = [sys.executable, "-m", "loadtests.frontend_modes", "--store", str(model_store), "--modes", "one",
           "api=2", "--rounds", "2", "--out", str(out), "--", "--seconds", "1", "--kinds", "jpeg256-none",
           "--no-profile"]
    s = _summary(cmd, out)
    assert [(row["round"], row["mode"]) for row in s["rows"]] == [(1, "one"), (1, "api=2"), (2, "one"), (2, "api=2")]
    for row in s["rows"]:
        assert row["ok"] and row["cpu_ms"] > 0 and row["images_per_s"] > 0, row
        mine = next(x for x in s["rows"] if x["round"] == row["round"] and x["mode"] == "one")
        assert row["cpu_ratio"] == pytest.approx(row["cpu_ms"] / mine["cpu_ms"], abs=1e-3), row
    assert set(s["rows"][1]["by_process"]) >= {"engine process", "front ends"}, s["rows"][1]
    assert "| jpeg256-none | api=2 |" in (out / "summary.md").read_text()
    # each process role's time in the kernel (part of its CPU) and its page faults, per image
    split = json.loads((out / "round1-api2" / "summary.json").read_text())["kinds"]["jpeg256-none"]
    for role, cpu in split["processes_cpu_ms_per_image"].items():
        assert 0 <= split["kernel_cpu_ms_per_image"][role] <= cpu + 0.01, (role, split)
        assert split["minor_faults_per_image"][role] >= 0, (role, split)
    assert "faults" in (out / "round1-api2" / "summary.md").read_text()
    for bad in (["--modes", "two"], ["--modes", "api=0"], ["--modes", "one", "--", "--servers", "2"]):
        refused = subprocess.run([sys.executable, "-m", "loadtests.frontend_modes", "--store", str(model_store),
                                  "--out", str(tmp_path / "refused"), *bad], cwd=ROOT, env=_clean_env(),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "mode" in refused.stderr, (bad, refused.stderr[-500:])
        assert not (tmp_path / "refused" / "summary.json").exists()


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (Debian's package valgrind): "
                    "loadtests/instructions.py counts with it")
def test_instruction_counts_compare_modes_by_process(model_store, tmp_path):
    """loadtests/instructions.py, briefly: both modes counted under callgrind, by process
    role, the copies apart from the rest; a bad mode refused before any server starts."""
    out = tmp_path / "instructions"
    cmd = [sys.executable, "-m", "loadtests.instructions", "--store", str(model_store), "--modes", "one", "api=2",
           "--requests", "24", "--warmup", "4", "--concurrency", "4", "--out", str(out)]
    s = _summary(cmd, out)
    one, split = (r["kinds"]["jpeg256-none"] for r in s["results"])
    assert set(one["by_role"]) == {"server"} and {"front ends", "engine process"} <= set(split["by_role"])
    for figures in (one, split):
        assert figures["requests"] == 24
        # the batches the counted posts made, from /metrics (warm-ups and the warm-up posts left out)
        assert 1 <= figures["batches"] <= 24 and 1 <= figures["mean_batch"] <= 4, figures
        # a 256 px JPEG through the whole front end: millions of instructions, some in copies
        assert 1e6 < figures["instructions_per_image"] < 1e8, figures
        assert 0 < figures["copied_per_image"] < figures["instructions_per_image"], figures
        assert sum(v["instructions_per_image"] for v in figures["by_role"].values()) == pytest.approx(
            figures["instructions_per_image"], abs=len(figures["by_role"]))
    # the engine process copies (inputs out of the slots, maps into them) and does little else
    engine, front = split["by_role"]["engine process"], split["by_role"]["front ends"]
    assert engine["copied_per_image"] > 0
    assert 0 < engine["instructions_per_image"] - engine["copied_per_image"] < (
        front["instructions_per_image"] - front["copied_per_image"]) / 4, split
    assert "| jpeg256-none | api=2 |" in (out / "summary.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "loadtests.instructions", "--store", str(model_store),
                              "--modes", "one", "servers=2", "--out", str(tmp_path / "refused")], cwd=ROOT,
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "unknown mode" in refused.stderr, refused.stderr[-500:]
    assert not (tmp_path / "refused").exists()


def test_metrics_scrape_benchmark_compares_the_loop_with_and_without_the_exposition(model_store, tmp_path):
    """loadtests/metrics_scrape.py, briefly: a store of two categories behind two front ends,
    each category's series made by real inspections, and the scrape's cost to the event loop
    measured three ways (idle, the exposition on the loop, off it), with whole scrapes and
    health probes from outside."""
    cmd = [sys.executable, "-m", "loadtests.metrics_scrape", "--store", str(model_store), "--categories", "2",
           "--api-processes", "2", "--requests", "1", "--scrapes", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(TMPDIR=str(tmp_path)), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    (result,) = report["results"]
    assert report["categories"] == 2 and result["api_processes"] == 2
    assert result["samples"] > 100 and result["metrics_bytes"] > 0  # both categories' series, merged
    assert result["exposition_ms"]["n"] == result["scrape_ms"]["n"] == 2
    assert set(result["wakeup_ms"]) == {"idle", "on_loop", "off_loop"}
    assert all(w["n"] > 0 and 0 <= w["median"] <= w["max"] for w in result["wakeup_ms"].values())
    assert result["healthz_idle_ms"]["n"] > 0 and result["healthz_during_scrape_ms"]["n"] > 0
