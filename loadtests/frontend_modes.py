"""Serving modes compared in turns: the front-end benchmark once per mode per round, and each
mode's CPU per image as a ratio to the first mode's *in the same round*.

    python -m loadtests.frontend_modes --store model_store --modes one servers=2 api=2 --rounds 3 \\
        -- --client wrk --concurrency 16 --seconds 10 --kinds jpeg256-none --no-profile

A shared two-core box drifts by 10-20% between minutes (docs/performance-log.md), more than the
differences between modes; separate runs of :mod:`loadtests.frontend` per mode compare
minutes, not modes. Here the modes take turns within each round, so a drift reaches each
alike, and the report gives every round's ratios and their median.

Modes: ``one`` (one server process), ``servers=N`` (N separate single-process servers: the
split with no link), ``api=N`` (``MSFLOW_API_PROCESSES=N``: N front ends and the engine
process). Everything after ``--`` goes to :mod:`loadtests.frontend` unchanged (except
``--rounds`` and ``--out``, which this sets).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loadtests import frontend

_COUNTED = {"servers": "--servers", "api": "--api-processes"}  # mode name -> the benchmark's option


def mode_args(mode: str) -> list[str]:
    """The benchmark's arguments for ``mode`` (``one``, ``servers=N``, ``api=N``)."""
    if mode == "one":
        return []
    name, _, count = mode.partition("=")
    if name not in _COUNTED:
        raise SystemExit(f"unknown mode {mode!r}: one, servers=N or api=N")
    if not count.isdigit() or int(count) < 1:
        raise SystemExit(f"mode {mode!r}: N must be a positive whole number")
    return [_COUNTED[name], count]


def run(modes: list[str], rounds: int, store: str, bench_args: list[str], out: Path) -> dict[str, Any]:
    for mode in modes:
        mode_args(mode)  # every mode checked before the first server starts
    if any(a in ("--rounds", "--out", "--servers", "--api-processes", "--store") for a in bench_args):
        raise SystemExit("--rounds, --out, --store and the mode's own options are set by frontend_modes")
    table: list[dict[str, Any]] = []  # one row per round, mode and kind
    for r in range(1, rounds + 1):
        for mode in modes:
            where = out / f"round{r}-{mode.replace('=', '')}"
            argv = ["--store", store, *bench_args, *mode_args(mode), "--rounds", "1", "--out", str(where)]
            with contextlib.redirect_stdout(io.StringIO()):  # each run's own report stays in its folder
                code = frontend.main(argv)
            summary = json.loads((where / "summary.json").read_text())
            for kind, result in summary["kinds"].items():
                table.append({"round": r, "mode": mode, "kind": kind, "ok": code == 0,
                              "cpu_ms": result["server_cpu_ms_per_image"], "images_per_s": result["images_per_s"],
                              "client_cpu_ms": result["client_cpu_ms_per_image"],
                              "mean_batch": result["mean_batch"],
                              "by_process": result.get("processes_cpu_ms_per_image", {})})
            print(f"round {r}, {mode}: " + "; ".join(
                f"{row['kind']} {row['cpu_ms']} ms/image, {row['images_per_s']}/s"
                for row in table if row["round"] == r and row["mode"] == mode), flush=True)
    for row in table:  # the ratio to the first mode's figure of the same round and kind
        first = next(x for x in table if x["round"] == row["round"] and x["kind"] == row["kind"]
                     and x["mode"] == modes[0])
        row["cpu_ratio"] = round(row["cpu_ms"] / first["cpu_ms"], 3) if first["cpu_ms"] else None
    return {"modes": modes, "rounds": rounds, "bench_args": bench_args, "rows": table}


def render(result: dict[str, Any]) -> str:
    modes, rows = result["modes"], result["rows"]
    lines = [f"# Serving modes in turns ({result['rounds']} rounds; benchmark arguments: "
             f"`{' '.join(result['bench_args'])}`)", "",
             f"CPU per image as a ratio to `{modes[0]}` in the same round; the median of those ratios.", "",
             "| input | mode | server CPU / image (each round) | ratio to the first mode (each round) "
             "| median ratio | images/s (median) | client CPU / image (median) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in dict.fromkeys(row["kind"] for row in rows):
        for mode in modes:
            mine = [row for row in rows if row["kind"] == kind and row["mode"] == mode]
            ratios = [row["cpu_ratio"] for row in mine if row["cpu_ratio"] is not None]
            lines.append(
                f"| {kind} | {mode} | {' / '.join(format(row['cpu_ms'], '.3f') for row in mine)} ms "
                f"| {' / '.join(format(x, '.3f') for x in ratios)} "
                f"| {statistics.median(ratios):.3f} | {statistics.median(r['images_per_s'] for r in mine):.0f} "
                f"| {statistics.median(r['client_cpu_ms'] for r in mine):.3f} ms |")
    failed = sorted({f"round {row['round']} {row['mode']}" for row in rows if not row["ok"]})
    if failed:
        lines += ["", f"Runs with failures or no images (see their folders): {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store")
    p.add_argument("--modes", nargs="+", default=["one", "servers=2", "api=2"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(own)
    out = Path(args.out or f"reports/frontend-modes-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.modes, args.rounds, args.store, bench_args, out)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (out / "summary.md").write_text(md)
    print(md)
    return 0 if all(row["ok"] for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
