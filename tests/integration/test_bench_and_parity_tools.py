"""``msflow bench`` end to end and the parity tool on CPU, over the exported fixture store."""

from __future__ import annotations

import json
from pathlib import Path

from engine_fixtures import TEST_CATEGORY, TEST_INPUT_SIZE, _has_cuda


def test_msflow_bench_end_to_end(model_store: Path, tmp_path: Path, capsys) -> None:
    from msflow.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(model_store / TEST_CATEGORY), "--batch-sizes", "1", "2",
               "--repeats", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {(r["engine"], r["batch"]): r for r in report["results"]}
    for engine in ("onnxruntime-cpu", "torch-cpu"):
        assert report["engines"][engine]["status"] == "ok"
        for batch in (1, 2):
            row = rows[(engine, batch)]
            assert row["images_per_s"] > 0 and row["latency_ms"]["p50"] > 0
            assert row["rss_peak_mib"] is not None and row["rss_peak_mib"] >= 0
    assert set(report["ratio_onnxruntime_cpu_over_torch_cpu"]) == {"1", "2"}
    assert report["model"]["input_size"] == TEST_INPUT_SIZE
    assert "held-out" in report["settings"]["input"]
    for key in ("cpu_model", "logical_cores", "torch", "onnxruntime"):
        assert report["machine"][key]
    printed = capsys.readouterr().out
    assert "onnxruntime-cpu" in printed and "ratio onnxruntime-cpu / torch-cpu" in printed


def test_parity_tool_on_cpu(model_store: Path, tmp_path: Path) -> None:
    from msflow.parity import main

    out = tmp_path / "parity.json"
    assert main(["--model", str(model_store / TEST_CATEGORY), "--out", str(out), "--images", "6",
                 "--batch", "4"]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["engines"]["torch-cpu"]["passed"]
    assert report["images"]["count"] == 6 and "good" in report["images"]["labels"]
    if not _has_cuda():
        assert report["engines"]["tensorrt"]["status"] == "skipped"
