"""The `msflow` command line: every subcommand's options, their defaults and help.

Separate from :mod:`msflow.cli`, which runs the commands: this is the grammar alone, which
`msflow serve` builds whole too, so it imports nothing of the trainer (below; import-linter
keeps it torch-free). The handlers come in by command name, so that it imports none of them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

# torch-free (models.manifest), so that `msflow --help` stays fast and `msflow serve` never
# imports the trainer: a parser that read a default from models.recalibrate imported torch
# and scikit-learn into every server process.
from models.image_acceptance import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from models.manifest import DEFAULT_NG_RECALL, DEFAULT_TARGET_FPR

Handler = Callable[[argparse.Namespace], int]


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


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The ``msflow`` parser, each subcommand's ``func`` its handler in ``handlers`` (by
    command name, as typed: ``demo-data``, ``train`` ...)."""
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
    p.set_defaults(func=handlers["demo-data"])

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
    p.set_defaults(func=handlers["train"])

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
    p.set_defaults(func=handlers["recalibrate"])

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
    p.set_defaults(func=handlers["eval"])

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
    p.set_defaults(func=handlers["export"])

    p = sub.add_parser("bench", help="images/s and latency of every engine available here")
    p.add_argument("--model", required=True, help="model_store/<category> or a version folder")
    p.add_argument("--engines", nargs="*", default=None, help="default: all available here")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median reported)")
    p.add_argument("--out", default=None, help="JSON output (default ./bench-<category>-<version>-<host>.json; "
                   "never the model store); checked writable before the benchmark")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: the engines measured without --engines")
    p.set_defaults(func=handlers["bench"])

    p = sub.add_parser("serve", help="run the inspection API (settings from MSFLOW_* environment variables)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--store", default=None, help="model store (overrides MSFLOW_MODEL_STORE)")
    p.set_defaults(func=handlers["serve"])

    p = sub.add_parser("worker", help="run async inspection jobs from Redis (POST /v1/jobs/...); needs "
                       "MSFLOW_REDIS_URL; run any number, on any host")
    p.add_argument("--store", default=None, help="model store (overrides MSFLOW_MODEL_STORE)")
    p.add_argument("--name", default=None, help="consumer name in the group (default host-pid)")
    p.set_defaults(func=handlers["worker"])

    p = sub.add_parser("build-status", help="record a model build's progress in <store>/.build/status.json "
                       "(shown by GET /v1/models and the console)")
    p.add_argument("--store", required=True)
    p.add_argument("--stage", default="build", help="e.g. quick, full (lower-case letters, digits, - and _)")
    p.add_argument("--category", default=None, help="omit to record the state of the whole build")
    p.add_argument("--state", required=True,
                   help="a category's step (waiting, training, evaluating, exporting, served, failed) or, "
                        "without --category, the build's (running, done, failed, stopped)")
    p.add_argument("--detail", default="")
    p.set_defaults(func=handlers["build-status"])

    p = sub.add_parser("import-official", help="turn a checkpoint saved by the official MSFlow code into a run")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_model_flags(p)
    p.set_defaults(func=handlers["import-official"])
    return parser
