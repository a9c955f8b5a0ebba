"""Parity of every engine available here against ONNX Runtime on CPU, on real demo images.

``python -m msflow.parity --model model_store/<category> --out parity.json``

The reference is ``onnxruntime-cpu`` (the engine the export was checked and calibrated
with). Each other engine runs the same images (held-out normals of the source run, then
the labelled test images of its data set: normal and defective) and is compared on what
the service returns:

- the normalised score (``Calibration.normalise_score``, threshold at 0.5) and the verdict;
- the anomaly map, relative to the calibrated heatmap range ``map_high - map_low`` (the
  colour scale a user sees).

Tolerances by precision (stated in the report):

- ``fp32`` CPU engines (torch-cpu): raw max abs difference <= 1e-4 x max(1, |reference|),
  the export's own parity bar.
- ``fp32`` GPU engines (onnxruntime-cuda, torch-cuda; cuDNN may use TF32): normalised
  score within 0.005, map p99 within 1 % and max within 5 % of the heatmap range.
- ``fp16`` engines (tensorrt, torch-cuda-fp16, +cudagraphs): normalised score within 0.02,
  map p99 within 5 % and max within 20 % of the heatmap range.

The verdict is the service's three-way one (ok, review, ng). For the GPU classes a verdict may
only flip for an image whose reference score lies within the score tolerance of the bound it
crosses (the threshold, or the ng bound). The first image is run again in another batch (alone, or
beside the second where batches are of one), and its answer held to the same tolerance against
its answer in the first batch. Exit status 0 when every engine that ran is within
its tolerance, 1 otherwise; engines that cannot run on this host are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Calibration, Manifest
from msflow.engine_catalog import (CPU_ENGINES, CUDA_ENGINES, holdout_samples, make_engine, resolve_version,
                           test_samples, unavailable_reason)

REFERENCE = "onnxruntime-cpu"
DEFAULT_ENGINES = ("torch-cpu", *CUDA_ENGINES)
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32-cpu": {"raw_rel": 1e-4},
    "fp32-gpu": {"score": 0.005, "map_p99": 0.01, "map_max": 0.05},
    "fp16": {"score": 0.02, "map_p99": 0.05, "map_max": 0.20},
}


def precision_class(name: str, manifest: Manifest) -> str:
    if name == "tensorrt":
        return "fp16" if manifest.tensorrt is None or manifest.tensorrt.precision == "fp16" else "fp32-gpu"
    if "fp16" in name:
        return "fp16"
    if name in CPU_ENGINES:
        return "fp32-cpu"
    return "fp32-gpu"


def parity_images(manifest: Manifest, limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` real images: held-out normals first, then test images (a mix of
    normal and defective); labels are ``good`` or the defect type."""
    from models.data_loading import load_images

    holdout = holdout_samples(manifest)
    tests = test_samples(manifest)
    defective = [s for s in tests if s.label == 1]
    normal_tests = [s for s in tests if s.label == 0]
    half = limit // 2
    chosen = (holdout + normal_tests)[: max(limit - min(len(defective), half), 0)]
    chosen += defective[: limit - len(chosen)]
    if not chosen:
        relative = bool(manifest.source_run) and not Path(manifest.source_run).is_absolute()
        raise SystemExit(f"no demo images found for {manifest.category}: the source run {manifest.source_run} "
                         "and its data set are gone" + (" (a relative path, written by an export from before paths "
                                                        "were stored absolute: re-export the run)" if relative else ""))
    return load_images(chosen, manifest.input_size), [s.defect_type for s in chosen]


def run_batched(engine: Any, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for i in range(0, len(images), batch):
        s, m = engine.run(images[i : i + batch])
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores), np.concatenate(maps)


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], calibration: Calibration,
            precision: str) -> dict[str, Any]:
    """Differences of ``got`` from ``ref`` and whether they are within ``precision``'s tolerance."""
    (s_ref, m_ref), (s_got, m_got) = ref, got
    norm = np.vectorize(calibration.normalise_score, otypes=[np.float64])
    n_ref, n_got = norm(s_ref.astype(np.float64)), norm(s_got.astype(np.float64))
    map_diff = np.abs(m_got.astype(np.float64) - m_ref)
    span = max(calibration.map_high - calibration.map_low, 1e-12)
    scale = max(float(np.abs(s_ref).max()), float(np.abs(m_ref).max()))
    # The three-way verdict the service answers (ok / review / ng), from the raw score.
    verdict = np.vectorize(calibration.verdict, otypes=[object])
    verdict_ref, verdict_got = verdict(s_ref.astype(np.float64)), verdict(s_got.astype(np.float64))
    metrics = {
        "score_max_abs": float(np.abs(s_got - s_ref).max()),
        "score_normalised_max_abs": float(np.abs(n_got - n_ref).max()),
        "map_max_abs": float(map_diff.max()),
        "map_p99_abs": float(np.percentile(map_diff, 99)),
        "map_p99_of_range": float(np.percentile(map_diff, 99) / span),
        "map_max_of_range": float(map_diff.max() / span),
        "reference_scale": scale,
        "verdict_flips": int((verdict_ref != verdict_got).sum()),
        "finite": bool(np.isfinite(s_got).all() and np.isfinite(m_got).all()),
    }
    tol = TOLERANCES[precision]
    failures = []
    if not metrics["finite"]:
        failures.append("non-finite outputs")
    if precision == "fp32-cpu":
        bar = tol["raw_rel"] * max(1.0, scale)
        if max(metrics["score_max_abs"], metrics["map_max_abs"]) > bar:
            failures.append(f"raw difference {max(metrics['score_max_abs'], metrics['map_max_abs']):.3g} > {bar:.3g}")
    else:
        if metrics["score_normalised_max_abs"] > tol["score"]:
            failures.append(f"normalised score differs by {metrics['score_normalised_max_abs']:.4f} > {tol['score']}")
        if metrics["map_p99_of_range"] > tol["map_p99"]:
            failures.append(f"map p99 difference {metrics['map_p99_of_range']:.2%} of the heatmap range "
                            f"> {tol['map_p99']:.0%}")
        if metrics["map_max_of_range"] > tol["map_max"]:
            failures.append(f"map max difference {metrics['map_max_of_range']:.2%} of the heatmap range "
                            f"> {tol['map_max']:.0%}")
        flipped = verdict_ref != verdict_got
        # Explained: the reference score lies within the score tolerance (normalised units:
        # the span) of the bound it crossed, the ok bound or the ng bound.
        raw = s_ref.astype(np.float64)
        near = ((np.abs(raw - calibration.threshold) / calibration.span <= tol["score"])
                | (np.abs(raw - calibration.ng_bound) / calibration.span <= tol["score"]))
        unexplained = flipped & ~near
        if unexplained.any():
            failures.append(f"{int(unexplained.sum())} verdict(s) flipped for images away from the bounds")
    return {"metrics": metrics, "tolerance": tol, "passed": not failures, "failures": failures}


def check_parity(version_dir: Path, engines: list[str], n_images: int = 16, batch: int = 8,
                 explicit: bool = False) -> dict[str, Any]:
    manifest = Manifest.read(version_dir)
    images, labels = parity_images(manifest, n_images)
    reference = make_engine(REFERENCE, version_dir, manifest, max(batch, 1))
    ref = run_batched(reference, images, batch)
    del reference
    report: dict[str, Any] = {
        "model": {"version_dir": str(version_dir), "category": manifest.category, "version": manifest.version,
                  "input_size": manifest.input_size, "score_output": manifest.calibration.score_output},
        "reference": REFERENCE,
        "images": {"count": int(len(images)), "labels": {k: labels.count(k) for k in sorted(set(labels))},
                   "batch": batch},
        "tolerances": TOLERANCES,
        "engines": {},
    }
    for name in engines:
        reason = unavailable_reason(name, manifest)
        precision = precision_class(name, manifest)
        if reason:
            report["engines"][name] = {"status": "failed" if explicit else "skipped", "reason": reason,
                                       "precision": precision}
            continue
        t0 = time.perf_counter()
        try:
            engine = make_engine(name, version_dir, manifest, max(batch, 2))  # 2: the check below
            got = run_batched(engine, images, batch)
            # The first image again in another batch composition: answers must not depend on
            # it. It ran with min(batch, n) - 1 others: now alone, or, where it ran alone
            # (batches of one), beside the second image.
            again = images[:1] if min(batch, len(images)) > 1 else images[:2]
            other = engine.run(again)
            other = (other[0][:1], other[1][:1])
            del engine
        except Exception as e:
            report["engines"][name] = {"status": "failed" if explicit else "skipped",
                                       "reason": f"{type(e).__name__}: {e}", "precision": precision}
            continue
        entry = compare(ref, got, manifest.calibration, precision)
        in_batch = (got[0][:1], got[1][:1])
        consistency = float(max(np.abs(other[0] - in_batch[0]).max(), np.abs(other[1] - in_batch[1]).max()))
        entry["metrics"]["batch_consistency_max_abs"] = consistency
        # Held to the precision's own tolerance: the server mostly runs batches of one or two,
        # so an answer that moves with the batch is an answer the comparison above never saw.
        again_check = compare(in_batch, other, manifest.calibration, precision)
        if not again_check["passed"]:
            entry["failures"] += [f"the first image in a batch of {len(again)} differs from it in a batch of "
                                  f"{min(batch, len(images))}: {f}" for f in again_check["failures"]]
            entry["passed"] = False
        entry.update(status="ok" if entry["passed"] else "out_of_tolerance", precision=precision,
                     seconds=time.perf_counter() - t0)
        report["engines"][name] = entry
    statuses = [e["status"] for e in report["engines"].values()]
    report["passed"] = all(s in ("ok", "skipped") for s in statuses)
    report["engines_checked"] = [n for n, e in report["engines"].items() if e["status"] in ("ok", "out_of_tolerance")]
    return report


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"parity against {report['reference']} on {report['images']['count']} images {report['images']['labels']}"]
    for name, e in report["engines"].items():
        if e["status"] in ("skipped", "failed"):
            lines.append(f"  {name:<28} {e['status']}: {e['reason']}")
            continue
        m = e["metrics"]
        lines.append(f"  {name:<28} {e['precision']:<8} {'PASS' if e['passed'] else 'FAIL'}  "
                     f"score {m['score_max_abs']:.3g} (normalised {m['score_normalised_max_abs']:.4f})  "
                     f"map max {m['map_max_abs']:.3g} ({m['map_max_of_range']:.2%} of range, "
                     f"p99 {m['map_p99_of_range']:.2%})  flips {m['verdict_flips']}"
                     + ("" if e["passed"] else "  <- " + "; ".join(e["failures"])))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msflow.parity", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model_store/<category> or a version folder")
    p.add_argument("--out", default=None, help="JSON report (default: print only)")
    p.add_argument("--engines", nargs="*", default=None,
                   help=f"default: {' '.join(DEFAULT_ENGINES)} (those available here)")
    p.add_argument("--images", type=int, default=16, help="number of demo images")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    version_dir = resolve_version(args.model)
    report = check_parity(version_dir, list(args.engines or DEFAULT_ENGINES), args.images, args.batch,
                          explicit=bool(args.engines))
    print(format_summary(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
