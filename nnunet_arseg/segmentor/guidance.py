"""Per-scale guidance from the U-Net head (method §2.4c): the dense evidence of the image at each scale's own
resolution, added to the transformer's inputs of that scale.

The prefix gives the transformer the image at the latent resolution only, while the U-Net head it is compared with
reads every skip up to full resolution. For each scale pn, the head's probability of the class and the features its
segmentation layer reads are pooled to that scale's token grid (the probability keeps ``cell`` x ``cell`` sub-cells
per token, as channels) and projected to the transformer's width. The projection's last layer starts at zero, so a
new model starts as the unguided one; the inputs are detached, so the token loss never trains the head. Sampling stays
autoregressive: each scale is still drawn from the transformer given the scales before it; the guidance is part of
the condition, like the prefix (ControlAR and CAR condition each scale the same way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HeadGuidance", "unshuffle"]


def unshuffle(x_BCs: torch.Tensor, cell: int) -> torch.Tensor:
    """Space-to-depth of (B, C, *S) by ``cell`` on every spatial axis: (B, C * cell**d, *S / cell)."""
    B, C, *S = x_BCs.shape
    d = len(S)
    x = x_BCs.reshape(B, C, *[n for s in S for n in (s // cell, cell)])
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.permute(order).reshape(B, C * cell ** d, *[s // cell for s in S])


class HeadGuidance(nn.Module):
    """The U-Net head's probability (B, 1, *S) and features (B, C, *S) -> one guidance vector per token of scales
    1..K, (B, L, D).

    Args:
        feature_channels: C, the channels the head's segmentation layer reads.
        scales: the tokenizer's token-map shapes, coarse to fine.
        dim: the transformer's width D.
        dims: 2 or 3 spatial axes; the probability keeps 8 x 8 (2D) or 4 x 4 x 4 (3D) sub-cells per token.
    """

    def __init__(self, feature_channels: int, scales, dim: int, dims: int = 2):
        super().__init__()
        self.scales = [tuple(int(n) for n in pn) for pn in scales]
        self.cell = 8 if dims == 2 else 4
        in_dim = feature_channels + self.cell ** dims
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        nn.init.zeros_(self.proj[-1].weight)
        nn.init.zeros_(self.proj[-1].bias)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, cell={self.cell}"

    def forward(self, prob_B1s: torch.Tensor, features_BCs: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if prob_B1s.ndim == 4 else F.adaptive_avg_pool3d
        prob_B1s, features_BCs = prob_B1s.detach().float(), features_BCs.detach().float()
        tokens = []
        for si, pn in enumerate(self.scales):
            fine_BCpn = unshuffle(pool(prob_B1s, tuple(n * self.cell for n in pn)), self.cell)
            x_BCpn = torch.cat((fine_BCpn, pool(features_BCs, pn)), dim=1)
            tokens.append(x_BCpn.flatten(2).transpose(1, 2))
        x_BLC = torch.cat(tokens, dim=1).to(self.proj[0].weight.dtype)
        return self.proj(x_BLC)
