"""`msflow <subcommand>`: one entry point for the offline tools and the service.

Each subcommand imports its half lazily, so `msflow train` never loads the web stack and
`msflow serve` never loads the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

# torch-free (models.manifest), so that `msflow --help` stays fast and `msflow serve` never
# imports the trainer: a parser that read a default from models.recalibrate imported torch
# and scikit-learn into every server process.
from models.image_acceptance import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from models.manifest import DEFAULT_NG_RECALL, DEFAULT_TARGET_FPR

Handler = Callable[[argparse.Namespace], int]


def _demo_data(args: argparse.Namespace) -> int:
    from models.demo_data import build_demo_dataset

    summary = build_demo_dataset(Path(args.out), seed=args.seed, n_train=args.n_train, n_calibration=args.n_calibration,
                                 n_test_good=args.n_test_good, n_test_defect=args.n_test_defect, crop=args.crop)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _build_status(args: argparse.Namespace) -> int:
    from models.build_progress import record_build, record_step

    if args.category:
        record_step(Path(args.store), args.stage, args.category, args.state, args.detail)
    else:
        record_build(Path(args.store), args.state)
    return 0


def _model_config(args: argparse.Namespace) -> "object":
    from models.msflow import MSFlowConfig

    return MSFlowConfig(backbone=args.backbone, input_size=args.input_size,
                        parallel_blocks=tuple(args.blocks), clamp=args.clamp,
                        cond_channels=args.cond_channels, pool=args.pool, top_k=args.top_k)


def _train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train

    name = args.category or Path(args.data).name
    out = Path(args.out) if args.out else Path("runs") / name / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    cfg = TrainConfig(
        data=Path(args.data), category=args.category, out=out, model=_model_config(args),
        backbone_weights=args.backbone_weights, lr=args.lr, meta_epochs=args.meta_epochs,
        sub_epochs=args.sub_epochs, warmup_meta_epochs=args.warmup_meta_epochs,
        decay_milestones=tuple(args.decay_milestones), batch_size=args.batch_size,
        holdout_fraction=args.holdout_fraction, seed=args.seed, device=args.device, amp=args.amp,
        include_reviewed_ok=Path(args.include_reviewed_ok) if args.include_reviewed_ok else None,
    )
    run = train(cfg, resume=args.resume)
    if args.include_reviewed_ok:
        count = json.loads((run / "config.json").read_text()).get("reviewed_ok_images")
        print(f"training normals include {count} operator-confirmed OK image(s) from {args.include_reviewed_ok}")
    print(f"run written to {run}")
    return 0


def _recalibrate(args: argparse.Namespace) -> int:
    from models.data import DataError
    from models.manifest import ManifestError
    from models.recalibrate import RecalibrationError, recalibrate

    try:
        version_dir, _ = recalibrate(args.store, args.category, review_store=args.review_store, version=args.version,
                                     target_recall=args.target_recall, calibration_images=args.calibration_images,
                                     max_fpr=args.max_fpr, dry_run=args.dry_run,
                                     accept_small_sample=args.accept_small_sample,
                                     threshold_overrides=args.threshold_overrides)
    except (RecalibrationError, ManifestError, DataError) as exc:  # what to fix is in the message
        print(f"msflow recalibrate: {exc}", file=sys.stderr)
        return 2
    if version_dir is not None:
        print(f"written to {version_dir} (the server loads it within MSFLOW_STORE_POLL_S)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_run

    report = evaluate_run(args.run, data=args.data, category=args.category, device=args.device,
                          batch_size=args.batch_size, threshold=args.threshold, version=args.version,
                          target_fpr=args.target_fpr)
    keys = ("category", "image_auroc", "pixel_auroc", "aupro", "best_f1")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    blocks = {**report["per_defect_type"], **{f"tier {t}": b for t, b in report.get("per_tier", {}).items()}}
    for name, block in blocks.items():
        print(f"  {name:>14}: image AUROC {_metric(block['image_auroc'])}  pixel AUROC "
              f"{_metric(block['pixel_auroc'])}  AUPRO {_metric(block['aupro'])}")
    v = report["verdict"]
    print(f"at threshold {v['threshold']:.4g} ({v['threshold_source']['kind']}): false alarms "
          f"{v['good']['false_alarms']}/{v['good']['n']} good parts (FPR {_share(v['good']['fpr'])}, 95% bound "
          f"{_share(v['good']['fpr_upper_95'])}); missed {v['defective']['missed']}/{v['defective']['n']} defects")
    for tier, d in v.get("per_tier", {}).items():
        print(f"  recall {tier:>8}: {d['detected']}/{d['n']} ({_share(d['recall'])})")
    print(f"report: {Path(args.run) / 'report.json'}")
    return 0


def _metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # undefined: a set without defects, or without goods


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"  # a rate of no part (a test set without good ones)


def _export(args: argparse.Namespace) -> int:
    from models.export import export_run

    version_dir = export_run(args.run, args.store, category=args.category, validation=args.validation,
                             score_output=args.score_output, tensorrt=args.tensorrt,
                             trt_batches=(args.trt_min_batch, args.trt_opt_batch, args.trt_max_batch),
                             calibration_images=args.calibration_images, policy=args.policy,
                             target_fpr=args.target_fpr, target_recall=args.target_recall,
                             map_sigma=args.map_sigma,
                             warn=lambda line: print(f"msflow export: warning: {line}", file=sys.stderr))
    print(f"exported to {version_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from msflow.bench import run_bench

    return run_bench(args)


def _check_store(args: argparse.Namespace) -> None:
    """The model store serve and worker will read (--store, else MSFLOW_MODEL_STORE): refused
    here in one line when it is no readable folder, rather than by the app's start-up, whose
    traceback uvicorn prints before "Application startup failed" (exit 3)."""
    from service.config import Settings

    store = Path(args.store) if args.store else Settings().model_store
    if not store.exists():
        raise FileNotFoundError(f"model store {store} does not exist (--store or MSFLOW_MODEL_STORE)")
    if not store.is_dir():
        raise NotADirectoryError(f"model store {store} is not a folder (--store or MSFLOW_MODEL_STORE)")
    if not os.access(store, os.R_OK | os.X_OK):
        raise PermissionError(f"model store {store} is not readable by this user")


def _serve(args: argparse.Namespace) -> int:
    _check_store(args)
    from service.supervisor import serve

    return serve(args)


def _worker(args: argparse.Namespace) -> int:
    _check_store(args)
    from service.worker import run_worker

    return run_worker(args)


def _import_official(args: argparse.Namespace) -> int:
    from models.official import import_official_run

    run = import_official_run(args.checkpoint, Path(args.out), _model_config(args), args.backbone_weights,
                              warn=lambda line: print(f"msflow import-official: warning: {line}", file=sys.stderr))
    print(f"run written to {run}")
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (paper defaults)")
    g.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0 | efficientnet_lite2 (embedded weights) | wide_resnet50_2 | resnet18 "
                        "(checked against models.backbones.BACKBONES when the model is built)")
    g.add_argument("--backbone-weights", default=None, help="torchvision-format .pth for ResNet backbones")
    g.add_argument("--input-size", type=int, default=256, help="square input size (multiple of 32; paper: 512)")
    g.add_argument("--blocks", type=int, nargs=3, default=[2, 5, 8], help="coupling blocks per level")
    g.add_argument("--clamp", type=float, default=1.9)
    g.add_argument("--cond-channels", type=int, default=64)
    g.add_argument("--pool", default="avg", choices=["avg", "max", "none"])
    g.add_argument("--top-k", type=float, default=0.03, help="fraction of pixels averaged for the image score")


def _add_image_limits(p: argparse.ArgumentParser) -> None:
    """Every command that reads images refuses what the server would (models.image_acceptance):
    the same limits for a model's training, evaluation, export and recalibration, by default
    the server's own (MSFLOW_MAX_IMAGE_PIXELS, MSFLOW_MAX_UPLOAD_BYTES where set), so that a set
    trained past a default is not refused by the commands after it."""
    p.add_argument("--max-image-pixels", type=int, default=_server_limit("MSFLOW_MAX_IMAGE_PIXELS",
                                                                         DEFAULT_MAX_IMAGE_PIXELS), metavar="N",
                   help="width x height an image may have, checked from its header before decoding; more is refused "
                        "as the server refuses it (default: MSFLOW_MAX_IMAGE_PIXELS where set, else the server's "
                        "default; here %(default)s)")
    p.add_argument("--max-image-bytes", type=int, default=_server_limit("MSFLOW_MAX_UPLOAD_BYTES",
                                                                        DEFAULT_MAX_IMAGE_BYTES), metavar="N",
                   help="bytes an image file may have; more is refused as the server refuses its upload (default: "
                        "MSFLOW_MAX_UPLOAD_BYTES where set, else the server's default; here %(default)s)")


def _server_limit(variable: str, default: int) -> int:
    value = os.environ.get(variable, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def _defaults_of(module: str, function: str) -> dict[str, object]:
    """A function's keyword defaults, so the CLI states no default a second time."""
    import importlib
    import inspect

    params = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msflow", description="MSFlow visual inspection: train, evaluate, "
                                     "export and serve anomaly detection models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="build the demo MVTec-layout data set from scikit-image textures")
    p.add_argument("--out", default="data/demo")
    demo = _defaults_of("models.demo_data", "build_demo_dataset")
    p.add_argument("--seed", type=int, default=demo["seed"])
    p.add_argument("--n-train", type=int, default=demo["n_train"])
    p.add_argument("--n-calibration", type=int, default=demo["n_calibration"],
                   help="normals for the threshold, from a strip of the photograph training never sees")
    p.add_argument("--n-test-good", type=int, default=demo["n_test_good"])
    p.add_argument("--n-test-defect", type=int, default=demo["n_test_defect"],
                   help="spread evenly over 4 defect types x 2 recipes (subtle, visible)")
    p.add_argument("--crop", type=int, default=demo["crop"])
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("train", help="train an MSFlow on the normal images of one category")
    p.add_argument("--data", required=True, help="MVTec-layout root, or a folder of good images")
    p.add_argument("--category", default=None, help="category under --data (omit for a plain folder)")
    p.add_argument("--out", default=None, help="run folder (default runs/<category>/<timestamp>)")
    _add_model_flags(p)
    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--meta-epochs", type=int, default=25)
    g.add_argument("--sub-epochs", type=int, default=4)
    g.add_argument("--warmup-meta-epochs", type=int, default=3)
    g.add_argument("--decay-milestones", type=int, nargs="*", default=[70, 90], help="in sub-epochs")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="normal images kept out of training for model selection and calibration")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA, then CPU), cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA)")
    g.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    p.add_argument("--include-reviewed-ok", default=None, metavar="STORE",
                   help="add the category's operator-confirmed OK images from this review store (or a model store "
                        "holding .review) to the training normals; the count goes into config.json and the manifest")
    _add_image_limits(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("recalibrate", help="refit the ok and ng bounds from calibration normals plus labelled reviews; "
                       "writes a new version reusing the engine files")
    p.add_argument("--category", required=True)
    p.add_argument("--store", default="model_store")
    p.add_argument("--review-store", default=None, help="default: <store>/.review (MSFLOW_REVIEW_STORE of the server)")
    p.add_argument("--version", default=None, help="version to start from (default: the newest)")
    p.add_argument("--target-recall", type=float,
                   default=DEFAULT_NG_RECALL, help="goal: share of labelled NG at or above the ok bound, at the lowest false-alarm rate")
    p.add_argument("--calibration-images", default=None,
                   help="the version's calibration normals, when its manifest's folder is not reachable here")
    p.add_argument("--max-fpr", type=float, default=None,
                   help="ceiling on the 95%% upper bound of the new false-alarm rate on the calibration normals "
                        "(default 0.1); a version above it, and above the source version's bound, is refused")
    p.add_argument("--dry-run", action="store_true", help="print the before/after table; write nothing")
    p.add_argument("--threshold-overrides", default=None,
                   help="where the server keeps threshold overrides (MSFLOW_THRESHOLD_OVERRIDES_DIR; default: the "
                        "store): an override of the source version is not carried over, and that is said")
    p.add_argument("--accept-small-sample", action="store_true",
                   help="publish even where a bound moves on fewer than 10 labels of a class (default: refused, "
                        "after the table). Each bound may move only on at least 10 labels of each class that "
                        "moves it: NG labels set both bounds (the ok bound under them, the ng bound at their "
                        "lowest kept score); OK labels a bound where an OK part is the highest known good under "
                        "it, or, with no NG labels, the ok bound's false-alarm quantile")
    _add_image_limits(p)
    p.set_defaults(func=_recalibrate)

    p = sub.add_parser("eval", help="evaluate a run: AUROC, pixel AUROC, AUPRO, F1; report.json and pictures")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default=None, help="default: the run's training data root")
    p.add_argument("--category", default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ..., auto (CUDA, then CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    g = p.add_argument_group("verdict threshold (default: calibrated as export does)")
    g.add_argument("--threshold", type=float, default=None, help="raw image_score_log threshold (finite)")
    g.add_argument("--version", default=None, help="a version folder exported from this run's checkpoint.pt: "
                   "use its threshold (another model's is refused)")
    g.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR)
    _add_image_limits(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="export a run to the model store: one ONNX graph, manifest, calibration")
    p.add_argument("--run", required=True)
    p.add_argument("--store", default="model_store")
    p.add_argument("--category", default=None, help="default: the category the run's config records (a run that "
                   "records none, imported or trained on a plain folder, needs it)")
    p.add_argument("--validation", default=None,
                   help="MVTec-layout root with labelled anomalies for F1-optimal calibration")
    p.add_argument("--score-output", default="image_score_log", choices=["image_score_log", "absolute_score"],
                   help="which graph output the threshold applies to")
    p.add_argument("--calibration-images", default=None,
                   help="folder of normal images not used in training (default: the data set's calibration/good, "
                        "else the run's training holdout, with a warning)")
    p.add_argument("--policy", default="target_fpr", choices=["target_fpr", "target_recall", "f1_optimal"],
                   help="target_recall and f1_optimal need labelled anomalies (--validation)")
    p.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                   help="share of calibration normals the threshold may flag")
    p.add_argument("--target-recall", type=float, default=None,
                   help="with --policy target_recall: share of labelled anomalies to flag")
    p.add_argument("--map-sigma", type=float, default=None,
                   help="Gaussian smoothing (input pixels, 0 to 32) of the served anomaly map (default: the run's)")
    p.add_argument("--tensorrt", action="store_true", help="also build an FP16 TensorRT plan (CUDA host)")
    p.add_argument("--trt-min-batch", type=int, default=1)
    p.add_argument("--trt-opt-batch", type=int, default=8)
    p.add_argument("--trt-max-batch", type=int, default=32)
    _add_image_limits(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="images/s and latency of every engine available here")
    p.add_argument("--model", required=True, help="model_store/<category> or a version folder")
    p.add_argument("--engines", nargs="*", default=None, help="default: all available here")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median reported)")
    p.add_argument("--out", default=None, help="JSON output (default ./bench-<category>-<version>-<host>.json; "
                   "never the model store); checked writable before the benchmark")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: the engines measured without --engines")
    p.set_defaults(func=_bench)

    p = sub.add_parser("serve", help="run the inspection API (settings from MSFLOW_* environment variables)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--store", default=None, help="model store (overrides MSFLOW_MODEL_STORE)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run async inspection jobs from Redis (POST /v1/jobs/...); needs "
                       "MSFLOW_REDIS_URL; run any number, on any host")
    p.add_argument("--store", default=None, help="model store (overrides MSFLOW_MODEL_STORE)")
    p.add_argument("--name", default=None, help="consumer name in the group (default host-pid)")
    p.set_defaults(func=_worker)

    p = sub.add_parser("build-status", help="record a model build's progress in <store>/.build/status.json "
                       "(shown by GET /v1/models and the console)")
    p.add_argument("--store", required=True)
    p.add_argument("--stage", default="build", help="e.g. quick, full (lower-case letters, digits, - and _)")
    p.add_argument("--category", default=None, help="omit to record the state of the whole build")
    p.add_argument("--state", required=True,
                   help="a category's step (waiting, training, evaluating, exporting, served, failed) or, "
                        "without --category, the build's (running, done, failed, stopped)")
    p.add_argument("--detail", default="")
    p.set_defaults(func=_build_status)

    p = sub.add_parser("import-official", help="turn a checkpoint saved by the official MSFlow code into a run")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_model_flags(p)
    p.set_defaults(func=_import_official)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input: ValueError (pydantic's ValidationError, a
    ManifestError and the tools' own checks are ValueErrors), OSError, the engines'
    EngineError (a RuntimeError: `bench --model` of a folder that is no model version) and
    TensorRTUnavailable (`export --tensorrt` on a host without TensorRT or a GPU). Taken
    from sys.modules, so a command that never loaded the service does not import it here."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (("service.engines.base", "EngineError"), ("models.tensorrt_build", "TensorRTUnavailable")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_image_pixels", None) is not None:
        if args.max_image_pixels <= 0 or args.max_image_bytes <= 0:
            parser.error("--max-image-pixels and --max-image-bytes must be positive")
        from models.image_acceptance import configure_pillow, set_max_image_bytes

        configure_pillow(args.max_image_pixels)  # what a server with these limits accepts, nothing more
        set_max_image_bytes(args.max_image_bytes)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:  # evaluated only when something was raised
        # What the user can fix (a setting out of range, bad data, a missing or unreadable
        # run or store, a model folder no engine can load) in one line, not a traceback;
        # errors of other kinds keep theirs.
        first = str(exc).strip().splitlines()
        print(f"msflow {args.command}: {type(exc).__name__}: {' '.join(first[:4])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: a stopped command, not a crash. uvicorn re-raises the SIGINT it shut down
        # on, which ended `msflow serve` (and ./scripts/demo.sh) in a KeyboardInterrupt
        # traceback. Left uncaught, minus its traceback: Python then flushes stdout and runs
        # the exit hooks before it dies by SIGINT (status -2, so a calling script stops too).
        # Killing ourselves here instead lost what the command had printed to a file or pipe.
        print(f"msflow {args.command}: interrupted", file=sys.stderr)
        sys.excepthook = _quiet_on_interrupt
        raise


def _quiet_on_interrupt(kind: type[BaseException], exc: BaseException, tb: TracebackType | None,
                        default: Callable[..., object] = sys.excepthook) -> None:
    """sys.excepthook once main said "interrupted": no traceback for the Ctrl-C."""
    if not issubclass(kind, KeyboardInterrupt):
        default(kind, exc, tb)


if __name__ == "__main__":
    sys.exit(main())
