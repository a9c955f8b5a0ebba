"""The official MSFlow code's coupling subnet, for the tests that build FrEIA flows as the
official code built them (``test_flows`` against FrEIA's AllInOneBlock, ``test_official``
for official checkpoints). Test modules import this, never each other."""

from __future__ import annotations

import torch
from torch import nn


class SubnetConvLN(nn.Module):
    """The official ``subnet_conv_ln`` (conv3x3 -> LayerNorm over channels -> ReLU -> conv3x3)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)
        self.ln = nn.LayerNorm(dim_in)
        self.relu = nn.ReLU(True)
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.ln(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(self.relu(out))
