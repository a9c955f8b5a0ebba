"""Training MSFlow on the normal images of one category.

The backbone is frozen and there is no augmentation, so its pooled features are computed
once and reused by every epoch: on a CPU that turns each epoch from a backbone pass over
every image into a pass of the (small) flows only.

Model selection never looks at the test set: a fraction of the normal training images is
held out, and the checkpoint kept is the one with the lowest held-out negative
log-likelihood (the same images later calibrate the threshold).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from models.data import (MVTecCategory, Sample, folder_of_good_images, list_images,
                         refuse_mvtec_layout_as_plain_folder, split_holdout)
from models.data_loading import load_images
from models.devices import torch_device
from models.manifest import sha256_file
from models.msflow import MSFlow, MSFlowConfig
from models.review_store import REVIEWED_OK, ReviewStore, resolve_root
from models.runs import (CHECKPOINT, LAST, RUN_OUTPUTS, RunError, read_checkpoint, save_checkpoint,
                         write_text_atomic)


class TrainConfig(BaseModel):
    """Everything that defines a training run; defaults are the paper's (MSFLOW_SPEC §6)."""

    model_config = ConfigDict(extra="forbid")

    data: Path
    category: str | None = None  # None: `data` is a plain folder of good images
    out: Path
    model: MSFlowConfig = MSFlowConfig()
    backbone_weights: str | None = None
    lr: float = 1e-4
    meta_epochs: int = Field(25, ge=1)
    sub_epochs: int = Field(4, ge=1)
    warmup_meta_epochs: int = 3
    warmup_from: float = 0.1
    decay_milestones: tuple[int, ...] = (70, 90)  # in sub-epochs, as the official code
    decay_gamma: float = 0.33
    grad_clip: float = 2.0
    batch_size: int = Field(8, ge=1)
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA, off for CPU
    include_reviewed_ok: Path | None = None  # a review store (or the model store holding one): its OK labels
    reviewed_ok_images: int | None = None  # set by train(): training normals that came from that store


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_samples(cfg: TrainConfig) -> list[Sample]:
    if cfg.category is None:
        refuse_mvtec_layout_as_plain_folder(cfg.data)
        return folder_of_good_images(cfg.data)
    return MVTecCategory(cfg.data, cfg.category).train_samples()


def reviewed_ok_samples(cfg: TrainConfig) -> list[tuple[dict[str, str], Sample]]:
    """Operator-confirmed OK images of the category from ``include_reviewed_ok`` (none without it)."""
    if cfg.include_reviewed_ok is None:
        return []
    if cfg.category is None:
        raise ValueError("--include-reviewed-ok needs --category: the review store keeps images per category")
    root = resolve_root(cfg.include_reviewed_ok)
    if not root.is_dir():
        raise ValueError(f"no review store at {cfg.include_reviewed_ok}")
    # A server makes the store's lock at start and each category's items/ at its first capture.
    # With neither, the folder is something else (the model store while MSFLOW_REVIEW_STORE is
    # elsewhere, an unpacked label export): the whole run trained on 0 reviewed images then.
    if not (root / ".lock").exists() and not (root / cfg.category / "items").is_dir():
        raise ValueError(f"{root} is not a review store: it holds no review items of {cfg.category} (give the "
                         "folder the server keeps them in: MSFLOW_REVIEW_STORE, default <model store>/.review)")
    store = ReviewStore(root)
    reviewed = store.reviewed_ok_images(cfg.category)
    # Labelled OK but unreadable now (its image or item.json gone): the store leaves it out, as
    # the API does; said here, or the count the CLI prints is short without a word.
    kept = {item.id for item, label, _ in store.labelled(cfg.category) if label.label == "ok"}
    lost = sorted({label.id for label in store.labels(cfg.category) if label.label == "ok"} - kept)
    if lost:
        logging.getLogger(__name__).warning(
            "%d operator-confirmed OK item(s) of %s left out: their image or item.json is gone (%s)", len(lost),
            cfg.category, ", ".join(lost[:10]) + (", ..." if len(lost) > 10 else ""))
    held = _data_set_images(cfg.data, cfg.category)
    if in_data := [f"{item.id} (= {held[item.image.sha256]})" for item, _ in reviewed if item.image.sha256 in held]:
        logging.getLogger(__name__).warning(
            "%d operator-confirmed OK image(s) of %s left out: the data set holds them (the same bytes), so they are "
            "no new normals, and trained on they would be in the holdout that selects the model, or the calibration "
            "or test images export and eval count as never seen: %s", len(in_data), cfg.category,
            ", ".join(in_data[:10]) + (", ..." if len(in_data) > 10 else ""))
    return [({"id": item.id, "sha256": item.image.sha256, "path": str(path)},
             Sample(path=path, label=0, defect_type="good"))
            for item, path in reviewed if item.image.sha256 not in held]


def _data_set_images(data: Path, category: str) -> dict[str, Path]:
    """sha256 -> path of every image of the data set's category (train, calibration, test):
    a smoke test's parts sent from it and labelled OK are none of them new (measured: a holdout
    image trained on, and export refused the run for a calibration image it had trained on)."""
    dataset = MVTecCategory(data, category)
    paths = [s.path for s in dataset.train_samples()]
    paths += [s.path for s in dataset.calibration_samples()] if dataset.has_calibration else []
    # Listed, not test_samples(): a data set without a test folder or masks still trains.
    if dataset.has_test:
        paths += [p for d in sorted(dataset.test_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
                  for p in list_images(d)]
    return {sha256_file(p): p for p in paths}


@torch.no_grad()
def extract_features(model: MSFlow, images: np.ndarray, device: torch.device, batch_size: int = 16,
                     desc: str = "features") -> list[torch.Tensor]:
    """Pooled backbone features of uint8 images ``[N,S,S,3]``, kept on ``device``."""
    levels: list[list[torch.Tensor]] = [[], [], []]
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        batch = torch.from_numpy(images[i : i + batch_size]).to(device)
        for level, f in enumerate(model.features(batch)):
            levels[level].append(f)
    return [torch.cat(fs) for fs in levels]


@torch.no_grad()
def mean_nll(model: MSFlow, features: list[torch.Tensor], batch_size: int = 32) -> float:
    """Mean negative log-likelihood per image (the training loss, without gradients)."""
    model.eval()
    total, n = 0.0, features[0].shape[0]
    for i in range(0, n, batch_size):
        zs, logdet = model.flow([f[i : i + batch_size] for f in features])
        total += float(model.nll_loss(zs, logdet)) * zs[0].shape[0]
    return total / max(n, 1)


def _schedulers(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """Linear warm-up then multi-step decay, both stepped once per sub-epoch (official)."""
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    warmup_steps = cfg.warmup_meta_epochs * cfg.sub_epochs
    if warmup_steps > 0:
        schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, cfg.warmup_from, 1.0, warmup_steps))
    if cfg.decay_milestones:
        schedulers.append(torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.decay_milestones),
                                                               cfg.decay_gamma))
    return schedulers


# Settings a --resume may change: how long the schedule runs and where it runs. Anything
# else (model, data, learning-rate schedule, batch, seed, ...) would make last.pt a different run's.
RESUME_MAY_CHANGE = frozenset({"meta_epochs", "out", "device", "amp"})


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_resumable(out: Path, cfg: TrainConfig) -> dict:
    """The run's ``last.pt`` payload, after checking that ``cfg`` continues the run stored in ``out``."""
    if not (out / LAST).is_file():
        raise RunError(f"cannot resume: no {LAST} in {out} (train without --resume to start this run)")
    if not (out / "config.json").is_file():
        raise RunError(f"cannot resume: no config.json in {out}")
    try:
        stored = TrainConfig.model_validate_json((out / "config.json").read_text())
    except ValueError as exc:
        raise RunError(f"cannot resume: unreadable {out / 'config.json'}: {exc}") from exc
    stored = stored.model_copy(update={"data": stored.data.resolve(), "include_reviewed_ok": (
        stored.include_reviewed_ok.resolve() if stored.include_reviewed_ok else None)})
    old, new = _flat(stored.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    differ = sorted(k for k in old.keys() | new.keys()
                    if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k))
    if differ:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise RunError(f"cannot resume {out}: settings differ from the stored run ({details}); "
                       f"only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on --resume")
    state = read_checkpoint(out / LAST)
    done = state.get("epoch", -1) + 1
    if done > cfg.meta_epochs:
        # Nothing would train, and config.json would then record fewer meta-epochs than its weights had.
        raise RunError(f"cannot resume {out}: it already trained {done} meta-epochs, more than --meta-epochs "
                       f"{cfg.meta_epochs}: give --meta-epochs {done} or more (more trains on)")
    return state


def check_out_folder(out: Path) -> None:
    """Refuse a run folder that is a file or lies under one, or cannot be written: otherwise
    found at the first write, after the features (minutes), as a bare errno."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out}: {existing} is a file, not a folder: choose another run folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not writable by this user: choose another run folder")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train and return the run folder.

    Everything that can fail before training (data, model, device, optimiser settings, a
    resume that does not fit) is checked first: a failure leaves an existing run folder as it was.
    """
    cfg = cfg.model_copy(update={"data": cfg.data.resolve(), "out": cfg.out.resolve(), "include_reviewed_ok": (
        cfg.include_reviewed_ok.resolve() if cfg.include_reviewed_ok else None)})
    out = cfg.out
    check_out_folder(out)
    seed_everything(cfg.seed)
    device = torch_device(cfg.device)
    use_amp = cfg.amp if cfg.amp is not None else device.type == "cuda"

    samples = training_samples(cfg)
    train_set, holdout = split_holdout(samples, cfg.holdout_fraction, cfg.seed)
    if not train_set:
        raise ValueError(f"no training images left after holding out {cfg.holdout_fraction:.0%}")
    # Operator-confirmed OK parts train only: the holdout (model selection) stays the data set's,
    # so runs with and without them select on the same images.
    reviewed = reviewed_ok_samples(cfg)
    train_set = train_set + [s for _, s in reviewed]
    cfg = cfg.model_copy(update={"reviewed_ok_images": len(reviewed) if cfg.include_reviewed_ok else None})
    state = check_resumable(out, cfg) if resume else None

    model = MSFlow(cfg.model, backbone_weights=cfg.backbone_weights).to(device)
    size = cfg.model.input_size
    t0 = time.perf_counter()
    train_feats = extract_features(model, load_images(train_set, size), device, desc="train features")
    hold_feats = extract_features(model, load_images(holdout, size), device, desc="holdout features") if holdout else None
    feature_seconds = time.perf_counter() - t0

    params = model.flow_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedulers = _schedulers(optimizer, cfg)
    start_epoch, best_nll = 0, math.inf
    if state is not None:
        try:
            model.load_state_dict(state["flows"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            for sched, sd in zip(schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(sd)
            torch.set_rng_state(state["rng"])
            start_epoch, best_nll = state["epoch"] + 1, state["best_nll"]
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise RunError(f"checkpoint {out / LAST} does not fit the run's config: {exc}") from exc

    # Training starts now: only from here on is the folder changed.
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / "config.json", cfg.model_dump_json(indent=2))
    write_text_atomic(out / "holdout.json", json.dumps([str(s.path.resolve()) for s in holdout], indent=2))
    if reviewed:
        write_text_atomic(out / REVIEWED_OK, json.dumps([row for row, _ in reviewed], indent=2))

    n = train_feats[0].shape[0]
    generator = torch.Generator().manual_seed(cfg.seed + start_epoch)
    amp_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    log = (out / "train_log.jsonl").open("a")
    log.write(json.dumps({"event": "start", "train_images": n, "reviewed_ok_images": len(reviewed),
                          "holdout_images": len(holdout),
                          "feature_seconds": round(feature_seconds, 2), "device": str(device),
                          "resume_from": start_epoch}) + "\n")
    bar = tqdm(total=(cfg.meta_epochs - start_epoch) * cfg.sub_epochs, desc=f"train {cfg.category or out.name}",
               disable=not progress)
    for epoch in range(start_epoch, cfg.meta_epochs):
        model.train()
        epoch_start = time.perf_counter()
        for sub in range(cfg.sub_epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size].to(device)
                with amp_ctx():
                    zs, logdet = model.flow([f.index_select(0, idx) for f in train_feats])
                    loss = model.nll_loss([z.float() for z in zs], logdet.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                total += loss.detach().item() * len(idx)
            lr = optimizer.param_groups[0]["lr"]
            for sched in schedulers:
                sched.step()
            train_nll = total / n
            bar.update(1)
            bar.set_postfix(nll=f"{train_nll:.4g}", lr=f"{lr:.1e}")
            log.write(json.dumps({"epoch": epoch, "sub_epoch": sub, "train_nll": train_nll, "lr": lr}) + "\n")
        holdout_nll = mean_nll(model, hold_feats) if hold_feats is not None else train_nll
        improved = holdout_nll < best_nll
        if improved:
            best_nll = holdout_nll
            save_checkpoint(out / CHECKPOINT, model, epoch, holdout_nll=holdout_nll,
                            backbone_weights=cfg.backbone_weights)
        save_checkpoint(out / LAST, model, epoch, optimizer=optimizer.state_dict(),
                        schedulers=[s.state_dict() for s in schedulers], rng=torch.get_rng_state(),
                        best_nll=best_nll)
        log.write(json.dumps({"epoch": epoch, "holdout_nll": holdout_nll, "selected": improved,
                              "seconds": round(time.perf_counter() - epoch_start, 2)}) + "\n")
        log.flush()
    bar.close()
    log.write(json.dumps({"event": "done", "best_holdout_nll": best_nll,
                          "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
    log.close()
    return out
