"""MSFlow's normalizing flows in plain PyTorch (MSFLOW_SPEC.md sections 2-4).

No invertible-network framework: the official implementation used FrEIA's
``AllInOneBlock`` and a custom fusion coupling inside a ``GraphINN``; this file writes the
same computation out so the whole model exports to one ONNX graph, and keeps the official
sub-module names (``subnet.conv1/ln/conv2``, ``cross_convs``, ``conv_s``, ``conv_t``) so an
official checkpoint maps onto it key by key.

Every flow has ``forward(x) -> (z, logdet)`` and ``inverse(z) -> (x, logdet)``, where
``logdet`` is per sample ``[B]`` and the inverse's log-determinant is the negative of the
forward one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The softplus(beta=0.5) global affine scale starts at exactly 1: 0.1 * softplus(gs) = 1.
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(5.0) - 1.0)


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """The 2-D sinusoidal condition ``[channels, H, W]``: first half encodes x, second y."""
    if channels % 4:
        raise ValueError(f"positional condition needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # [half/2]
    x = torch.arange(0.0, width)[:, None] * freq  # [W, half/2]
    y = torch.arange(0.0, height)[:, None] * freq  # [H, half/2]
    pe = torch.zeros(channels, height, width)
    pe[0:half:2] = torch.sin(x).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(x).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(y).T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(y).T[:, :, None].expand(-1, -1, width)
    return pe


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (applied channels-last)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CouplingSubnet(nn.Module):
    """conv3x3 -> LayerNorm(channels) -> ReLU -> conv3x3, the official ``subnet_conv_ln``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
        self.ln = ChannelLayerNorm(dim_in)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.ln(self.conv1(x))))


class CouplingBlock(nn.Module):
    """One conditional affine coupling block, equal to FrEIA's ``AllInOneBlock`` with
    ``global_affine_type='SOFTPLUS'``, hard permutation and the pre-0.2.x clamp
    ``clamp * tanh(a)``."""

    def __init__(self, channels: int, cond_channels: int, clamp: float = 1.9) -> None:
        super().__init__()
        self.channels = channels
        self.passive = channels - channels // 2
        self.active = channels // 2
        self.clamp = clamp
        self.subnet = CouplingSubnet(self.passive + cond_channels, 2 * self.active)
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), GLOBAL_SCALE_INIT))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        perm = torch.randperm(channels)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def _scale(self) -> Tensor:
        # 0.1 * softplus(beta=0.5); a constant at inference, folded by the exporter.
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _affine_params(self, x1: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.1 * self.subnet(torch.cat([x1, cond], 1))
        s = self.clamp * torch.tanh(a[:, : self.active])
        return s, a[:, self.active :]

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.passive], x[:, self.passive :]
        s, t = self._affine_params(x1, cond)
        y2 = x2 * torch.exp(s) + t
        g = self._scale()
        v = torch.cat([x1, y2], 1) * g + self.global_offset
        hw = x.shape[2] * x.shape[3]
        logdet = s.sum((1, 2, 3)) + hw * torch.log(g).sum()
        return v.index_select(1, self.perm), logdet

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        g = self._scale()
        u = (z.index_select(1, self.perm_inv) - self.global_offset) / g
        x1, y2 = u[:, : self.passive], u[:, self.passive :]
        s, t = self._affine_params(x1, cond)
        x2 = (y2 - t) * torch.exp(-s)
        hw = z.shape[2] * z.shape[3]
        logdet = -s.sum((1, 2, 3)) - hw * torch.log(g).sum()
        return torch.cat([x1, x2], 1), logdet


class ParallelFlow(nn.Module):
    """The flow of one feature level: ``n_blocks`` conditional coupling blocks."""

    def __init__(self, channels: int, cond_channels: int, n_blocks: int, clamp: float = 1.9) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CouplingBlock(channels, cond_channels, clamp) for _ in range(n_blocks))

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for block in reversed(self.blocks):
            z, ld = block.inverse(z, cond)
            logdet = logdet + ld
        return z, logdet


def _pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``adaptive_avg_pool2d`` to a fixed size, as plain average pooling when the ratio is
    whole (identical numbers; exports to a simple AveragePool)."""
    h, w = x.shape[-2:]
    if h % size[0] == 0 and w % size[1] == 0:
        kh, kw = h // size[0], w // size[1]
        return x if (kh, kw) == (1, 1) else F.avg_pool2d(x, (kh, kw), (kh, kw))
    return F.adaptive_avg_pool2d(x, size)


class CrossScaleNet(nn.Module):
    """Mixes all levels at the smallest level's size and adds the mix back to each level
    (the official ``FusionNet`` with ``add=True``)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        total = sum(channels)
        self.split_channels = list(channels)
        self.conv1 = nn.Conv2d(total, total // 4, 3, 1, 1)
        self.norm = ChannelLayerNorm(total // 4)
        self.conv2 = nn.Conv2d(total // 4, total, 3, 1, 1)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        smallest = (int(xs[-1].shape[-2]), int(xs[-1].shape[-1]))
        m = torch.cat([_pool_to(x, smallest) for x in xs], 1)
        m = F.relu(self.conv2(F.relu(self.norm(self.conv1(m)))))
        parts = torch.split(m, self.split_channels, 1)
        return [
            x + F.interpolate(p, size=(int(x.shape[-2]), int(x.shape[-1])), mode="bilinear", align_corners=True)
            for x, p in zip(xs, parts)
        ]


class FusionSubnet(nn.Module):
    """Predicts per-level (s, t) from all levels: cross-scale mixing then 3x3 convs."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.cross_convs = CrossScaleNet(channels)
        self.conv_s = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)
        self.conv_t = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)

    def forward(self, xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        rs = self.cross_convs(xs)
        return [(cs(r), ct(r)) for cs, ct, r in zip(self.conv_s, self.conv_t, rs)]


class FusionCoupling(nn.Module):
    """The multi-scale coupling layer: two affine couplings whose scale and shift come
    from all levels at once, with the atan soft clamp."""

    def __init__(self, channels: Sequence[int], clamp: float = 1.9) -> None:
        super().__init__()
        if any(c % 2 for c in channels):
            raise ValueError(f"fusion coupling needs even channel counts, got {list(channels)}")
        self.half = [c // 2 for c in channels]
        self.clamp = clamp
        self.subnet_1 = FusionSubnet(self.half)
        self.subnet_2 = FusionSubnet(self.half)

    def _log_e(self, s: Tensor) -> Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x1 = [x[:, :h] for x, h in zip(xs, self.half)]
        x2 = [x[:, h:] for x, h in zip(xs, self.half)]
        st2 = self.subnet_2(x2)
        y1 = [torch.exp(self._log_e(s)) * a + t for a, (s, t) in zip(x1, st2)]
        st1 = self.subnet_1(y1)
        y2 = [torch.exp(self._log_e(s)) * b + t for b, (s, t) in zip(x2, st1)]
        zs = [torch.clamp(torch.cat([a, b], 1), -1e6, 1e6) for a, b in zip(y1, y2)]
        logdet = sum(
            self._log_e(s1).sum((1, 2, 3)) + self._log_e(s2).sum((1, 2, 3))
            for (s1, _), (s2, _) in zip(st1, st2)
        )
        return zs, logdet

    def inverse(self, zs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        y1 = [z[:, :h] for z, h in zip(zs, self.half)]
        y2 = [z[:, h:] for z, h in zip(zs, self.half)]
        st1 = self.subnet_1(y1)
        x2 = [(b - t) * torch.exp(-self._log_e(s)) for b, (s, t) in zip(y2, st1)]
        st2 = self.subnet_2(x2)
        x1 = [(a - t) * torch.exp(-self._log_e(s)) for a, (s, t) in zip(y1, st2)]
        logdet = -sum(
            self._log_e(s1).sum((1, 2, 3)) + self._log_e(s2).sum((1, 2, 3))
            for (s1, _), (s2, _) in zip(st1, st2)
        )
        return [torch.cat([a, b], 1) for a, b in zip(x1, x2)], logdet


class FusionFlow(nn.Module):
    """A fixed random channel permutation per level, then one multi-scale coupling."""

    def __init__(self, channels: Sequence[int], clamp: float = 1.9) -> None:
        super().__init__()
        self.channels = list(channels)
        for level, c in enumerate(channels):
            perm = torch.randperm(c)
            self.register_buffer(f"perm_{level}", perm)
            self.register_buffer(f"perm_inv_{level}", torch.argsort(perm))
        self.coupling = FusionCoupling(channels, clamp)

    def _perms(self, inverse: bool = False) -> list[Tensor]:
        prefix = "perm_inv_" if inverse else "perm_"
        return [getattr(self, f"{prefix}{level}") for level in range(len(self.channels))]

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        xs = [x.index_select(1, p) for x, p in zip(xs, self._perms())]
        return self.coupling(xs)

    def inverse(self, zs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        xs, logdet = self.coupling.inverse(zs)
        return [x.index_select(1, p) for x, p in zip(xs, self._perms(inverse=True))], logdet
