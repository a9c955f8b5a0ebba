"""Import checkpoints saved by the official MSFlow code (MSFLOW_SPEC.md section 7).

An official checkpoint is ``{'epoch', 'fusion_flow': sd, 'parallel_flows': [sd0, sd1, sd2],
'optimizer'?}``. The parallel flows were FrEIA ``SequenceINN``s of ``AllInOneBlock``s, the
fusion flow a FrEIA ``GraphINN`` of three ``PermuteRandom`` nodes and one fusion coupling.
This module maps those keys onto :class:`models.msflow.MSFlow` and refuses, with an
:class:`OfficialCheckpointError` naming the offending key, anything that does not fit the
model exactly: nothing is loaded unless everything fits.

Key mapping (``l`` level, ``k`` block):

- ``parallel_flows[l]['module_list.k.<name>']`` -> ``parallel_flows.l.blocks.k.<name>``, with
  ``w_perm`` / ``w_perm_inv`` (one-hot ``(C,C,1,1)`` float matrices applied as a 1x1 conv, or
  int64 index vectors ``(C,)``) converted to the index buffers ``perm`` / ``perm_inv``.
- ``fusion_flow['module_list.i.perm' / 'perm_inv']`` (three modules holding only a
  permutation; which ``i`` is which level is not stable across runs, so they are matched to
  levels by their length) -> ``fusion_flow.perm_l`` / ``fusion_flow.perm_inv_l``.
- ``fusion_flow['module_list.j.<rest>']`` for the module holding ``subnet_1`` / ``subnet_2``
  -> ``fusion_flow.coupling.<rest>``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.atomic_files import write_atomic
from models.msflow import MSFlow, MSFlowConfig
from models.runs import CHECKPOINT, RUN_OUTPUTS

__all__ = [
    "OfficialCheckpointError",
    "load_official_checkpoint",
    "convert_official_checkpoint",
    "import_official_run",
]

HOLDOUT = "holdout.json"  # a trained run's held-out normals: not this checkpoint's
_MODULE_KEY = re.compile(r"^module_list\.(\d+)\.(.+)$")
_PERM_NAMES = {"perm": "w_perm", "perm_inv": "w_perm_inv"}


class OfficialCheckpointError(ValueError):
    """An official checkpoint is unreadable or does not fit the model."""


# --------------------------------------------------------------------------- reading


def _read(checkpoint: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise OfficialCheckpointError(f"official checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data; never execute code from a file.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise OfficialCheckpointError(f"cannot read official checkpoint {path}: {e}") from e
    if not isinstance(data, Mapping):
        raise OfficialCheckpointError(f"{path}: expected a dict checkpoint, got {type(data).__name__}")
    return data


def _strip_data_parallel(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    if sd and all(k.startswith("module.module_list.") for k in sd):
        return {k.removeprefix("module."): v for k, v in sd.items()}
    return dict(sd)


def _group_by_module(sd: Mapping[str, Any], where: str) -> dict[int, dict[str, Any]]:
    groups: dict[int, dict[str, Any]] = {}
    for key, value in sd.items():
        m = _MODULE_KEY.match(key)
        if m is None:
            raise OfficialCheckpointError(f"{where}: unexpected key {key!r} (expected 'module_list.<i>.<name>')")
        if not isinstance(value, Tensor):
            raise OfficialCheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return groups


# --------------------------------------------------------------------------- permutations


def _check_permutation(perm: Tensor, channels: int, key: str) -> Tensor:
    if perm.shape != (channels,):
        raise OfficialCheckpointError(f"{key}: permutation of shape {tuple(perm.shape)}, the model expects ({channels},)")
    if not torch.equal(torch.sort(perm).values, torch.arange(channels, dtype=perm.dtype)):
        raise OfficialCheckpointError(f"{key}: not a permutation of 0..{channels - 1}")
    return perm.to(torch.int64)


def _perm_from_official(w: Tensor, channels: int, key: str) -> Tensor:
    """Index vector ``perm`` with ``out = v[:, perm]`` from either stored form of ``w_perm``."""
    w = w.detach().cpu()
    if not w.is_floating_point():
        # int64 index vector (C,)
        return _check_permutation(w, channels, key)
    if w.numel() != channels * channels or w.shape[:2] != (channels, channels) or any(s != 1 for s in w.shape[2:]):
        raise OfficialCheckpointError(
            f"{key}: one-hot permutation matrix of shape {tuple(w.shape)}, the model expects ({channels}, {channels}, 1, 1)"
        )
    m = w.reshape(channels, channels).double()
    is_binary = bool(((m == 0) | (m == 1)).all())
    if not (is_binary and bool((m.sum(0) == 1).all()) and bool((m.sum(1) == 1).all())):
        raise OfficialCheckpointError(f"{key}: not a permutation matrix (soft or learned permutations are not supported)")
    # Row i holds its 1 at column perm[i]: the 1x1 conv gives out[:, i] = v[:, perm[i]].
    return m.argmax(1)


def _perm_pair(perm: Tensor, perm_inv: Tensor, key_inv: str) -> tuple[Tensor, Tensor]:
    if not torch.equal(perm_inv, torch.argsort(perm)):
        raise OfficialCheckpointError(f"{key_inv}: is not the inverse of the forward permutation")
    return perm, perm_inv


# --------------------------------------------------------------------------- conversion


def _convert_tensor(value: Tensor, target: Tensor, key: str) -> Tensor:
    if tuple(value.shape) != tuple(target.shape):
        raise OfficialCheckpointError(
            f"{key}: shape {tuple(value.shape)} in the checkpoint, the model expects {tuple(target.shape)}"
        )
    if not value.is_floating_point():
        raise OfficialCheckpointError(f"{key}: dtype {value.dtype}, expected a floating-point tensor")
    return value.detach().to(device=target.device, dtype=target.dtype).clone()


def _convert_parallel(model: MSFlow, level: int, sd: Any) -> dict[str, Tensor]:
    where = f"parallel_flows[{level}]"
    if not isinstance(sd, Mapping):
        raise OfficialCheckpointError(f"{where}: expected a state dict, got {type(sd).__name__}")
    flow = model.parallel_flows[level]
    n_blocks = len(flow.blocks)
    channels = flow.blocks[0].channels
    groups = _group_by_module(_strip_data_parallel(sd), where)

    # A clear message for the two common mismatches before any per-key detail.
    found = sorted(groups)
    if found != list(range(n_blocks)):
        raise OfficialCheckpointError(
            f"{where}: checkpoint has blocks {found}, the model has {n_blocks} "
            f"(config parallel_blocks={tuple(model.config.parallel_blocks)})"
        )
    gs = groups[0].get("global_scale")
    if isinstance(gs, Tensor) and gs.dim() == 4 and gs.shape[1] != channels:
        raise OfficialCheckpointError(
            f"{where}.module_list.0.global_scale: level {level} has {gs.shape[1]} channels in the checkpoint, "
            f"the model's backbone {model.config.backbone!r} gives {channels}"
        )

    out: dict[str, Tensor] = {}
    for k, block in enumerate(flow.blocks):
        official = dict(groups[k])
        targets = block.state_dict()
        perms: dict[str, Tensor] = {}
        for name in targets:
            off_name = _PERM_NAMES.get(name, name)
            key = f"{where}.module_list.{k}.{off_name}"
            if off_name not in official:
                raise OfficialCheckpointError(f"{key}: missing from the checkpoint")
            value = official.pop(off_name)
            if name in _PERM_NAMES:
                perms[name] = _perm_from_official(value, channels, key)
            else:
                out[f"{level}.blocks.{k}.{name}"] = _convert_tensor(value, targets[name], key)
        if official:
            extra = ", ".join(f"{where}.module_list.{k}.{n}" for n in sorted(official))
            raise OfficialCheckpointError(f"unexpected keys in the checkpoint: {extra}")
        perm, perm_inv = _perm_pair(perms["perm"], perms["perm_inv"], f"{where}.module_list.{k}.w_perm_inv")
        out[f"{level}.blocks.{k}.perm"] = perm.to(targets["perm"].device)
        out[f"{level}.blocks.{k}.perm_inv"] = perm_inv.to(targets["perm_inv"].device)
    return out


def _convert_fusion(model: MSFlow, sd: Any) -> dict[str, Tensor]:
    where = "fusion_flow"
    if not isinstance(sd, Mapping):
        raise OfficialCheckpointError(f"{where}: expected a state dict, got {type(sd).__name__}")
    fusion = model.fusion_flow
    channels = list(fusion.channels)
    groups = _group_by_module(_strip_data_parallel(sd), where)

    perm_modules = {i: g for i, g in groups.items() if set(g) <= {"perm", "perm_inv"}}
    coupling_modules = {i: g for i, g in groups.items() if i not in perm_modules}
    for i, g in perm_modules.items():
        for name in ("perm", "perm_inv"):
            if name not in g:
                raise OfficialCheckpointError(f"{where}.module_list.{i}.{name}: missing from the checkpoint")
    if len(coupling_modules) != 1:
        raise OfficialCheckpointError(
            f"{where}: expected exactly one coupling module (keys 'module_list.<i>.subnet_1/2...'), "
            f"found modules {sorted(coupling_modules)}"
        )
    if len(perm_modules) != len(channels):
        raise OfficialCheckpointError(
            f"{where}: expected {len(channels)} permutation modules ('module_list.<i>.perm'), "
            f"found {sorted(perm_modules)}"
        )

    targets = fusion.state_dict()
    out: dict[str, Tensor] = {}

    # Permutations: matched to levels by length (the GraphINN's node order is not stable).
    for level, c in enumerate(channels):
        if channels.count(c) > 1:
            raise OfficialCheckpointError(
                f"{where}: levels {[i for i, x in enumerate(channels) if x == c]} all have {c} channels, "
                "so their permutations cannot be matched to levels by length (ambiguous)"
            )
        candidates = [i for i, g in perm_modules.items() if g["perm"].numel() == c]
        if len(candidates) != 1:
            lengths = {f"module_list.{i}.perm": int(g["perm"].numel()) for i, g in sorted(perm_modules.items())}
            raise OfficialCheckpointError(
                f"{where}: {'no' if not candidates else 'more than one'} permutation of length {c} for level "
                f"{level} (found lengths {lengths})"
            )
        i = candidates[0]
        perm = _check_permutation(perm_modules[i]["perm"].detach().cpu(), c, f"{where}.module_list.{i}.perm")
        perm_inv = _check_permutation(
            perm_modules[i]["perm_inv"].detach().cpu(), c, f"{where}.module_list.{i}.perm_inv"
        )
        _perm_pair(perm, perm_inv, f"{where}.module_list.{i}.perm_inv")
        out[f"perm_{level}"] = perm.to(targets[f"perm_{level}"].device)
        out[f"perm_inv_{level}"] = perm_inv.to(targets[f"perm_inv_{level}"].device)

    # The coupling: same sub-module names below 'coupling.'.
    (j, official), = coupling_modules.items()
    official = dict(official)
    for name, target in targets.items():
        if not name.startswith("coupling."):
            continue
        rest = name.removeprefix("coupling.")
        key = f"{where}.module_list.{j}.{rest}"
        if rest not in official:
            raise OfficialCheckpointError(f"{key}: missing from the checkpoint")
        out[name] = _convert_tensor(official.pop(rest), target, key)
    if official:
        extra = ", ".join(f"{where}.module_list.{j}.{n}" for n in sorted(official))
        raise OfficialCheckpointError(f"unexpected keys in the checkpoint: {extra}")
    return out


def convert_official_checkpoint(
    model: MSFlow, checkpoint: str | Path | Mapping[str, Any]
) -> tuple[dict[str, Tensor], int]:
    """The project flow state dict (keys ``parallel_flows.*`` and ``fusion_flow.*``, no
    backbone) for ``model`` and the epoch, from an official checkpoint. Loads nothing."""
    ckpt = _read(checkpoint)
    for key in ("parallel_flows", "fusion_flow"):
        if key not in ckpt:
            raise OfficialCheckpointError(f"{key}: missing from the checkpoint (keys: {sorted(map(str, ckpt))})")
    parallel = ckpt["parallel_flows"]
    n_levels = len(model.parallel_flows)
    if not isinstance(parallel, (list, tuple)) or len(parallel) != n_levels:
        got = len(parallel) if isinstance(parallel, (list, tuple)) else type(parallel).__name__
        raise OfficialCheckpointError(f"parallel_flows: expected a list of {n_levels} state dicts, got {got}")

    epoch = ckpt.get("epoch", 0)
    if isinstance(epoch, Tensor) and epoch.numel() == 1:
        epoch = epoch.item()
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or int(epoch) != epoch:
        raise OfficialCheckpointError(f"epoch: expected an integer, got {epoch!r}")

    state: dict[str, Tensor] = {}
    for level in range(n_levels):
        state.update({f"parallel_flows.{k}": v for k, v in _convert_parallel(model, level, parallel[level]).items()})
    state.update({f"fusion_flow.{k}": v for k, v in _convert_fusion(model, ckpt["fusion_flow"]).items()})

    expected = {k for k in model.state_dict() if not k.startswith("backbone.")}
    if set(state) != expected:  # pragma: no cover - guards the mapping itself
        raise OfficialCheckpointError(
            f"internal mapping error: missing {sorted(expected - set(state))[:5]}, extra {sorted(set(state) - expected)[:5]}"
        )
    return state, int(epoch)


def load_official_checkpoint(model: MSFlow, checkpoint: str | Path | Mapping[str, Any]) -> int:
    """Load an official MSFlow checkpoint (path or already-loaded dict) into ``model``'s
    parallel and fusion flows; return its epoch. The backbone is untouched (an official
    checkpoint has none). Raises :class:`OfficialCheckpointError` and leaves the model
    unchanged if anything does not fit."""
    state, epoch = convert_official_checkpoint(model, checkpoint)
    model.parallel_flows.load_state_dict(
        {k.removeprefix("parallel_flows."): v for k, v in state.items() if k.startswith("parallel_flows.")}, strict=True
    )
    model.fusion_flow.load_state_dict(
        {k.removeprefix("fusion_flow."): v for k, v in state.items() if k.startswith("fusion_flow.")}, strict=True
    )
    return epoch


# --------------------------------------------------------------------------- run folder


def import_official_run(
    checkpoint: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    config: MSFlowConfig,
    backbone_weights: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Turn an official checkpoint into a project run folder and return the folder.

    Writes ``out_dir/checkpoint.pt`` = ``{"config": config.model_dump(), "flows": <flow
    state dict without backbone.*>, "epoch": int, "source": "official"}`` and
    ``out_dir/config.json``. The model is built first (with real backbone weights, from
    ``backbone_weights`` or the default location) so a run that cannot be served is
    refused here rather than later.

    A folder that held another run loses that run's outputs first, as a fresh ``msflow
    train`` does (:data:`models.runs.RUN_OUTPUTS`, and its ``holdout.json``: an imported run
    has none), with a warning naming them (to ``warn``, else through :mod:`warnings`): left
    beside the new checkpoint, its report and holdout were exported as this run's metrics and
    calibration normals.
    """
    model = MSFlow(config, backbone_weights=str(backbone_weights) if backbone_weights else None)
    epoch = load_official_checkpoint(model, checkpoint)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    previous = [name for name in (*RUN_OUTPUTS, HOLDOUT) if name != CHECKPOINT and (out / name).exists()]
    for name in previous:
        (out / name).unlink()
    if previous:
        line = f"{out} held another run: removed its {', '.join(previous)} (the imported checkpoint replaces it)"
        if warn is not None:
            warn(line)
        else:
            warnings.warn(line, stacklevel=2)
    payload = {
        "config": config.model_dump(),
        "flows": {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")},
        "epoch": epoch,
        "source": "official",
    }
    write_atomic(out / "checkpoint.pt", lambda f: torch.save(payload, f))
    text = config.model_dump_json(indent=2)
    write_atomic(out / "config.json", text)
    return out
