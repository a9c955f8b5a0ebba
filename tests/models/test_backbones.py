"""Backbones load real weights (or refuse), give three levels at strides 4/8/16, and the
ResNets carry the official reflect padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize
from torch import nn

from models.backbone_weights import TORCHVISION_URLS, BackboneWeightsError, find_resnet_weights
from models.backbones import ResNetFeatures, backbone_channels, build_backbone, build_efficientnet_lite
from models.manifest import sha256_file

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _imagenet_batch(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = resize(image, (size, size), anti_aliasing=True)  # float in [0, 1]
    x = (x - MEAN) / STD
    return torch.from_numpy(x).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
@pytest.mark.parametrize(
    ("image", "classes"),
    [("chelsea", set(range(281, 286))), ("coffee", {967, 968})],  # cats; espresso / cup
)
def test_efficientnet_lite_real_imagenet_weights_classify(name, image, classes):
    model = build_efficientnet_lite(name, with_head=True).eval()  # strict load: every key of the file fits
    x = _imagenet_batch(getattr(data, image)(), 224 if name.endswith("0") else 260)
    with torch.no_grad():
        logits = model.classify(x)
    assert logits.shape == (1, 1000)
    top1 = int(logits.argmax(1))
    assert top1 in classes, f"{image}: top-1 class {top1}"


@pytest.mark.parametrize(("name", "channels"), [("efficientnet_lite0", (24, 40, 112)),
                                                 ("efficientnet_lite2", (24, 48, 120))])
@pytest.mark.parametrize("size", [256, 200])
def test_efficientnet_lite_levels(name, channels, size):
    model = build_backbone(name)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tuple(model.channels) == channels == backbone_channels(name)
    with torch.no_grad():
        levels = model(torch.randn(1, 3, size, size))
    assert [tuple(h.shape) for h in levels] == [
        (1, c, math.ceil(size / s), math.ceil(size / s)) for c, s in zip(channels, (4, 8, 16))
    ]


def test_efficientnet_lite0_feature_extractor_matches_full_network():
    """The truncated extractor (no head) computes the same levels as the full network."""
    lite0_with_head = build_efficientnet_lite("efficientnet_lite0", with_head=True).eval()
    model = build_backbone("efficientnet_lite0")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a = model(x)
        b = lite0_with_head(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_resnet_without_weights_names_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("wide_resnet50_2")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "wide_resnet50_2" in msg


def test_resnet_missing_weight_file_refused(tmp_path):
    with pytest.raises(BackboneWeightsError):
        build_backbone("resnet18", tmp_path / "nope.pth")


def _torchvision_style_state(tmp_path, drop: str | None = None, extra: str | None = None):
    torch.manual_seed(0)
    src = ResNetFeatures("resnet18")
    with torch.no_grad():  # non-default BN statistics so a failed load would show
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    state = dict(src.state_dict())
    state["layer4.0.conv1.weight"] = torch.randn(512, 256, 3, 3)
    state["layer4.0.bn1.weight"] = torch.randn(512)
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(1)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return src, path


def test_resnet18_loads_torchvision_format_with_reflect_padding(tmp_path):
    src, path = _torchvision_style_state(tmp_path)
    model = build_backbone("resnet18", path)
    assert not model.training
    assert tuple(model.channels) == (64, 128, 256)
    ref = src.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for m in convs:
        if m.kernel_size in ((3, 3), (7, 7)):
            assert m.padding_mode == "reflect", m
        else:
            assert m.kernel_size == (1, 1) and m.padding_mode == "zeros", m
    assert any(m.kernel_size == (7, 7) for m in convs)
    with torch.no_grad():
        levels = model(torch.randn(1, 3, 64, 64))
    assert [tuple(h.shape) for h in levels] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]


def _empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return hub


def test_resnet_weights_from_hub_cache(tmp_path, monkeypatch):
    hub = _empty_hub(tmp_path, monkeypatch)
    src, made = _torchvision_style_state(tmp_path)
    # The file under the name torchvision would give it: its own sha256 prefix (the real
    # file's name, resnet18-f37072fd.pth, needs the real weights).
    name = f"resnet18-{sha256_file(made)[:8]}.pth"
    made.rename(hub / name)
    monkeypatch.setitem(TORCHVISION_URLS, "resnet18", f"https://download.pytorch.org/models/{name}")
    model = build_backbone("resnet18")
    assert tuple(model.channels) == (64, 128, 256)
    assert torch.equal(model.conv1.weight, src.conv1.weight)


def test_hub_cache_files_are_hash_checked(tmp_path, monkeypatch):
    """Only torchvision's own file name is looked for, and its content must have the sha256
    prefix in that name: a random-weights file in the cache was loaded in silence before."""
    hub = _empty_hub(tmp_path, monkeypatch)
    torch.manual_seed(0)
    torch.save(ResNetFeatures("resnet18").state_dict(), hub / "resnet18-zzzzzzzz.pth")  # random init, right keys
    with pytest.raises(BackboneWeightsError, match="resnet18-f37072fd.pth"):
        find_resnet_weights("resnet18", download=False)  # a stray name is never taken
    _torchvision_style_state(hub)  # torchvision's exact name, other content
    with pytest.raises(BackboneWeightsError, match="sha256 starts .* its name says f37072fd"):
        build_backbone("resnet18")


@pytest.mark.parametrize(
    ("drop", "extra"), [("layer3.1.bn2.running_var", None), (None, "layer2.0.unexpected.weight")]
)
def test_resnet_state_dict_that_does_not_fit_is_refused(tmp_path, drop, extra):
    _, path = _torchvision_style_state(tmp_path, drop=drop, extra=extra)
    with pytest.raises(BackboneWeightsError, match="do not fit"):
        build_backbone("resnet18", path)


def test_unknown_backbone():
    with pytest.raises(ValueError):
        build_backbone("vgg16")
