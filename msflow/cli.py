"""`msflow <subcommand>`: one entry point for the offline tools and the service.

Each subcommand imports its half lazily, so `msflow train` never loads the web stack and
`msflow serve` never loads the trainer.

Here: what each subcommand does, and main (a user's error in one line, Ctrl-C without a
traceback). Its options, defaults and help are :mod:`msflow.cli_arguments`.
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

from msflow import cli_arguments


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


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`msflow.cli_arguments`), each subcommand bound to its handler
    here, looked up as the parser is built."""
    return cli_arguments.build_parser({
        "demo-data": _demo_data,
        "train": _train,
        "recalibrate": _recalibrate,
        "eval": _eval,
        "export": _export,
        "bench": _bench,
        "serve": _serve,
        "worker": _worker,
        "build-status": _build_status,
        "import-official": _import_official,
    })


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
