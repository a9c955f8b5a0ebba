"""A training run on disk: the one format that train, eval, export and import share.

```
runs/<category>/<name>/
  config.json         TrainConfig (with the MSFlowConfig inside)
  checkpoint.pt       selected weights: {"config", "flows", "epoch", "source", ...}
  last.pt             the latest meta-epoch, with optimiser state, for --resume
  train_log.jsonl     one line per sub-epoch / meta-epoch
  holdout.json        normal images held out from training (calibration, model selection)
  report.json         written by `msflow eval` (with test_scores.npz, roc.png, examples.png, scores.png),
                      with the sha256 of the checkpoint it scored: export takes it for those weights only
  reviewed_ok.json    the operator-confirmed OK images trained on (only with --include-reviewed-ok)
```

The backbone is never saved: it is frozen ImageNet weights, rebuilt from its name.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from models.atomic_files import write_atomic
from models.manifest import sha256_file
from models.msflow import MSFlow, MSFlowConfig

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
# What one run's train and eval write besides config.json/holdout.json: a fresh (not resumed)
# training into an existing folder removes them, so the folder never mixes two runs.
RUN_OUTPUTS = (CHECKPOINT, LAST, "train_log.jsonl", "reviewed_ok.json", "report.json", "test_scores.npz",
               "roc.png", "examples.png", "scores.png")
REPORT = "report.json"


class RunError(FileNotFoundError):
    """A run folder is missing or incomplete."""


def flow_state_dict(model: MSFlow) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def save_checkpoint(path: Path, model: MSFlow, epoch: int, source: str = "train", **extra: Any) -> None:
    """Write atomically so an interrupted run never leaves a half-written checkpoint."""
    payload = {"config": model.config.model_dump(), "flows": flow_state_dict(model), "epoch": epoch,
               "source": source, **extra}
    write_atomic(path, lambda f: torch.save(payload, f))


def write_text_atomic(path: Path, text: str) -> None:
    """A run file (config, holdout) that a reader finds old or new, never half written."""
    write_atomic(path, text)


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise RunError(f"corrupt checkpoint {path}: {exc}") from exc


def checkpoint_sha256(run: str | Path, checkpoint: str = CHECKPOINT) -> str:
    """sha256 of a run's checkpoint file: an export records it, so that the torch engine can
    tell the run was retrained or resumed in place since (same config, other weights)."""
    path = Path(run) / checkpoint
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    return sha256_file(path)


def load_model(run: str | Path, device: str | torch.device = "cpu", checkpoint: str = CHECKPOINT,
               backbone_weights: str | None = None) -> tuple[MSFlow, dict[str, Any]]:
    """The model of a run (eval mode) and its checkpoint payload (without the weights)."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run folder not found: {run}")
    payload = read_checkpoint(run / checkpoint)
    config = MSFlowConfig.model_validate(payload["config"])
    model = MSFlow(config, backbone_weights=backbone_weights or payload.get("backbone_weights"))
    missing, unexpected = model.load_state_dict(payload["flows"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise RunError(f"checkpoint {run / checkpoint} does not fit its config: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    info = {k: v for k, v in payload.items() if k not in ("flows", "optimizer", "schedulers")}
    return model.to(device).eval(), info


def read_json(path: Path) -> Any:
    """A run's JSON file; RunError when it is missing, ValueError naming it when it is not JSON
    (json's own message, "Expecting property name ...", does not say which file)."""
    if not path.is_file():
        raise RunError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def eval_report(run: Path, checkpoint_hash: str, category: str) -> tuple[dict[str, Any] | None, str | None]:
    """`msflow eval`'s report of ``run`` where it is of the checkpoint ``checkpoint_hash`` and of
    ``category``, else None and why (None, None: no report). A ``--resume`` that selects new
    weights keeps the old weights' report, and ``eval --category`` may score another category:
    export took either as the exported model's metrics (and its pictures)."""
    path = run / REPORT
    if not path.is_file():
        return None, None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        report = None
    if not isinstance(report, dict):
        return None, f"{path} is not a report of `msflow eval`: run msflow eval --run {run} to include its metrics"
    if report.get("checkpoint_sha256") != checkpoint_hash:
        return None, (f"{path} was written for other weights than {run / CHECKPOINT} (a --resume since, or an "
                      f"older msflow eval): its metrics and pictures are left out; run msflow eval --run {run} "
                      "first to include them")
    if report.get("category") != category:
        return None, (f"{path} evaluates {report.get('category')!r}, not {category!r}: its metrics and pictures "
                      f"are left out; run msflow eval --run {run} on {category!r}'s test set to include them")
    return report, None
