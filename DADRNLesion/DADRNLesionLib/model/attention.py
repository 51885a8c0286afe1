"""Spatial and channel attention on the last feature map, as in DADRN (ICIP 2019) and DANet.

Spatial (position) attention, for a map A with N = H*W positions:
    B1, B2 = 1x1 projections of A to C/r channels, D = 1x1 projection to C channels
    S = B1^T B2 (N x N);  alpha = sigmoid(S) (variant A) or softmax over i (variant B)
    o_j = sum_i alpha_ji D_i;  y_j = beta * o_j + A_j, beta learnable, starting at 0.
With the sigmoid, the weights of a row do not sum to one, so o_j grows with N; it is divided by
N to keep the block's scale independent of input size (beta absorbs any constant).

Channel attention (DANet's form): E = A A^T (C x C), weights softmax(max(E) - E) over channels
(variant B) or sigmoid(max(E) - E) / C (variant A), y = gamma * (weights A) + A, gamma learnable
from 0. The paper's A/B variants of SADRN and CADRN differ only in this normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SpatialAttention", "ChannelAttention", "AttentionBlock", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("none", "spatial", "channel", "dual")


class SpatialAttention(nn.Module):
    def __init__(self, channels: int, normalisation: str = "sigmoid", reduction: int = 8):
        super().__init__()
        if normalisation not in ("sigmoid", "softmax"):
            raise ValueError(f"spatial normalisation must be 'sigmoid' or 'softmax', not {normalisation!r}")
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)  # B1
        self.key = nn.Conv2d(channels, inner, 1)  # B2
        self.value = nn.Conv2d(channels, channels, 1)  # D
        self.beta = nn.Parameter(torch.zeros(1))
        self.normalisation = normalisation

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """alpha as (batch, N_j, N_i): row j holds the weights that position j gives every i."""
        n, _, h, w = x.shape
        b1 = self.query(x).flatten(2)  # (n, c', N)
        b2 = self.key(x).flatten(2)
        s = torch.bmm(b1.transpose(1, 2), b2)  # s[:, i, j] = B1_i . B2_j
        s = s.transpose(1, 2)  # index as [j, i]
        if self.normalisation == "softmax":
            return torch.softmax(s, dim=-1)
        return torch.sigmoid(s) / (h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        alpha = self.attention(x)  # (n, N, N)
        d = self.value(x).flatten(2)  # (n, C, N)
        o = torch.bmm(d, alpha.transpose(1, 2)).view(n, c, h, w)  # o[:, :, j] = sum_i alpha[j, i] d[:, :, i]
        return self.beta * o + x


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, normalisation: str = "softmax"):
        super().__init__()
        if normalisation not in ("sigmoid", "softmax"):
            raise ValueError(f"channel normalisation must be 'sigmoid' or 'softmax', not {normalisation!r}")
        self.gamma = nn.Parameter(torch.zeros(1))
        self.normalisation = normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        a = x.flatten(2)  # (n, C, N)
        # A.A^T sums N products and overflows float16 (not bfloat16) on real feature maps.
        a_e = a.float() if a.dtype == torch.float16 else a
        energy = torch.bmm(a_e, a_e.transpose(1, 2))  # (n, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy
        if self.normalisation == "softmax":
            weights = torch.softmax(energy, dim=-1)
        else:
            weights = torch.sigmoid(energy) / c
        weights = weights.to(a.dtype)
        out = torch.bmm(weights, a).view(n, c, h, w)
        return self.gamma * out + x


class AttentionBlock(nn.Module):
    """none | spatial | channel | dual; dual fuses by sum (A) or channel concatenation (B)."""

    def __init__(self, channels: int, kind: str = "dual", normalisation: str = "softmax", fusion: str = "concat", reduction: int = 8):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, not {kind!r}")
        if fusion not in ("sum", "concat"):
            raise ValueError(f"fusion must be 'sum' or 'concat', not {fusion!r}")
        self.kind = kind
        self.fusion = fusion
        self.spatial = SpatialAttention(channels, normalisation, reduction) if kind in ("spatial", "dual") else None
        self.channel = ChannelAttention(channels, normalisation) if kind in ("channel", "dual") else None
        self.out_channels = channels * 2 if kind == "dual" and fusion == "concat" else channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "spatial":
            return self.spatial(x)
        if self.kind == "channel":
            return self.channel(x)
        ys, yc = self.spatial(x), self.channel(x)
        return ys + yc if self.fusion == "sum" else torch.cat([ys, yc], dim=1)
