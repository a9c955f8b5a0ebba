"""MSFlow: frozen backbone -> pooled multi-scale features -> parallel flows -> fusion flow
-> log-likelihood maps -> image score and anomaly maps.

One readable module, from uint8 pixels to answers, so the same code trains (on cached
features), evaluates, and exports to a single graph.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import Tensor, nn

from models.backbones import FeatureExtractor, backbone_channels, build_backbone
from models.flows import FusionFlow, ParallelFlow, positional_encoding_2d
from models.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def gaussian_kernel_1d(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian taps out to 3 sigma (``[1.0]`` for sigma 0)."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class MSFlowConfig(BaseModel):
    """Architecture of one MSFlow; defaults are the paper's (input 256 for CPU hosts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = "efficientnet_lite0"
    input_size: int = Field(256, ge=64, le=2048)
    parallel_blocks: tuple[PositiveInt, PositiveInt, PositiveInt] = (2, 5, 8)
    clamp: float = Field(1.9, gt=0.0)  # the soft clamp's bound on log-scales: 0 or below is no flow
    cond_channels: int = Field(64, ge=1)
    pool: Literal["avg", "max", "none"] = "avg"
    top_k: float = Field(0.03, gt=0.0, le=1.0)
    # Gaussian sigma (input pixels) applied to the served anomaly map and absolute score only;
    # the paper's outputs (score_map, pixel_map, image_score) are never smoothed.
    map_sigma: float = Field(4.0, ge=0.0, le=32.0)

    @field_validator("input_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        # Stride-2 stages must see even sizes for features to align with pixels.
        if v % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {v}")
        return v

    @property
    def channels(self) -> tuple[int, int, int]:
        return backbone_channels(self.backbone)

    @property
    def level_sizes(self) -> list[int]:
        """Spatial size of each level after pooling (stride s, then the 3/2/1 pool)."""
        sizes = [math.ceil(self.input_size / s) for s in (4, 8, 16)]
        return sizes if self.pool == "none" else [(n - 1) // 2 + 1 for n in sizes]

    @property
    def top_k_pixels(self) -> int:
        return max(1, int(self.input_size * self.input_size * self.top_k))


def with_map_sigma(config: MSFlowConfig, sigma: float) -> MSFlowConfig:
    """``config`` with another ``map_sigma``, validated (a ``ValidationError``, a ValueError,
    for a value out of the field's range or not a number)."""
    return MSFlowConfig.model_validate({**config.model_dump(), "map_sigma": sigma})


class MSFlowOutputs(dict[str, Tensor]):
    """Named outputs of :meth:`MSFlow.postprocess` (a dict so the exporter can pick)."""


class MSFlow(nn.Module):
    """The whole model. Input: uint8 images ``[B, S, S, 3]`` (NHWC, RGB)."""

    def __init__(self, config: MSFlowConfig, backbone: FeatureExtractor | None = None,
                 backbone_weights: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, backbone_weights)
        if tuple(self.backbone.channels) != config.channels:
            raise ValueError(f"backbone gives {self.backbone.channels} channels, config expects {config.channels}")
        c = config
        self.parallel_flows = nn.ModuleList(
            ParallelFlow(ch, c.cond_channels, n, c.clamp) for ch, n in zip(c.channels, c.parallel_blocks)
        )
        self.fusion_flow = FusionFlow(c.channels, c.clamp)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        for level, n in enumerate(c.level_sizes):
            pe = positional_encoding_2d(c.cond_channels, n, n)[None]
            self.register_buffer(f"pos_enc_{level}", pe, persistent=False)
        self.register_buffer("smoothing", gaussian_kernel_1d(c.map_sigma), persistent=False)

    # ---------------------------------------------------------------- features

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 NHWC -> ImageNet-normalised float NCHW (inside the graph, on the device)."""
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype)
        return (x - self.mean) / self.std

    def _pool(self, h: Tensor) -> Tensor:
        if self.config.pool == "avg":
            return F.avg_pool2d(h, 3, 2, 1)
        if self.config.pool == "max":
            return F.max_pool2d(h, 3, 2, 1)
        return h

    def features(self, images: Tensor) -> list[Tensor]:
        """Pooled backbone features per level; the trainer caches these."""
        return [self._pool(h) for h in self.backbone(self.normalize(images))]

    def flow_parameters(self) -> list[nn.Parameter]:
        return [*self.parallel_flows.parameters(), *self.fusion_flow.parameters()]

    # ---------------------------------------------------------------- flows

    def conditions(self, batch: int) -> list[Tensor]:
        return [getattr(self, f"pos_enc_{level}").expand(batch, -1, -1, -1) for level in range(3)]

    def flow(self, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents per level and the total log-determinant ``[B]``."""
        conds = self.conditions(features[0].shape[0])
        zs, logdet = [], features[0].new_zeros(features[0].shape[0])
        for flow, f, cond in zip(self.parallel_flows, features, conds):
            z, ld = flow(f, cond)
            zs.append(z)
            logdet = logdet + ld
        zs, fusion_logdet = self.fusion_flow(zs)
        return zs, logdet + fusion_logdet

    def inverse(self, zs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Features from latents (the flows are exactly invertible)."""
        xs, logdet = self.fusion_flow.inverse(zs)
        conds = self.conditions(zs[0].shape[0])
        out = []
        for flow, z, cond in zip(self.parallel_flows, xs, conds):
            x, ld = flow.inverse(z, cond)
            out.append(x)
            logdet = logdet + ld
        return out, logdet

    @staticmethod
    def nll_loss(zs: list[Tensor], logdet: Tensor) -> Tensor:
        """``mean_b(sum_l 0.5 * sum z_l^2 - logdet)``, the paper's training loss."""
        energy = sum(0.5 * (z**2).sum((1, 2, 3)) for z in zs)
        return (energy - logdet).mean()

    # ---------------------------------------------------------------- post-processing

    def postprocess(self, zs: list[Tensor], paper_maps: bool = True) -> MSFlowOutputs:
        """Scores and maps at input resolution.

        - ``image_score``: the paper's score, mean of the top-k of ``1 - exp(M - max M)``.
        - ``image_score_log``: ``-log(1 - image_score)`` computed stably (log-mean-exp), the
          same ranking without the float32 saturation at 1.0 that ties every image early in
          training.
        - ``score_map``: the paper's "mul" map ``1 - exp(M - max M)`` (used for AUPRO).
        - ``pixel_map``: the paper's "add" map (used for pixel AUROC).
        - ``anomaly_map``: the absolute map ``-sum_l up(logp_l)``, comparable across images
          (for heatmaps and calibration: a good part stays cool).
        - ``absolute_score``: mean of the top-k of ``anomaly_map``.

        ``paper_maps=False`` skips ``score_map`` and ``pixel_map`` (evaluation-only outputs)
        so that serving computes only what it answers.
        """
        size = (self.config.input_size, self.config.input_size)
        logps = [-0.5 * (z**2).mean(1, keepdim=True) for z in zs]
        up = [F.interpolate(lp, size=size, mode="bilinear", align_corners=True)[:, 0] for lp in logps]
        total = sum(up)  # M
        batch = total.shape[0]
        flat = total.reshape(batch, -1)
        k = self.config.top_k_pixels

        rel = flat - flat.amax(1, keepdim=True)  # M - max M <= 0
        lowest = torch.topk(-rel, k, dim=1).values  # the k most anomalous, as -rel >= 0
        log_mean_exp = torch.logsumexp(-lowest, dim=1) - math.log(k)  # log mean exp(rel_k)
        image_score = 1.0 - torch.exp(log_mean_exp)
        anomaly_map = self.smooth(-total)
        absolute_score = torch.topk(anomaly_map.reshape(batch, -1), k, dim=1).values.mean(1)
        out = MSFlowOutputs(
            image_score=image_score,
            image_score_log=-log_mean_exp,
            absolute_score=absolute_score,
            anomaly_map=anomaly_map,
        )
        if paper_maps:
            out["score_map"] = (1.0 - torch.exp(rel)).reshape_as(total)
            probs = [torch.exp(lp - lp.amax((2, 3), keepdim=True)) for lp in logps]
            add = sum(F.interpolate(p, size=size, mode="bilinear", align_corners=True)[:, 0] for p in probs)
            out["pixel_map"] = add.reshape(batch, -1).amax(1).view(batch, 1, 1) - add
        return out

    def set_map_sigma(self, sigma: float) -> None:
        """Change the served map's smoothing after training (it is post-processing only).
        Validated as the config's field is (``model_copy(update=...)`` validates nothing: a
        negative sigma went into a manifest that no engine could then read)."""
        self.config = with_map_sigma(self.config, sigma)
        self.smoothing = gaussian_kernel_1d(self.config.map_sigma).to(self.mean.device)

    def smooth(self, maps: Tensor) -> Tensor:
        """Separable Gaussian blur of ``[B, H, W]`` maps (reflect padding), a no-op at sigma 0."""
        k = self.smoothing
        if k.numel() == 1:
            return maps
        pad = k.numel() // 2
        x = F.pad(maps[:, None], (pad, pad, 0, 0), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, pad, pad), mode="reflect")
        return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]

    def forward(self, images: Tensor, paper_maps: bool = True) -> MSFlowOutputs:
        zs, _ = self.flow(self.features(images))
        return self.postprocess(zs, paper_maps)
