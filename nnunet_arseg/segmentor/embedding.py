"""Image embedding f (method §2.2): an encoder feature map (B, C, *s) -> a prefix of N_f tokens (B, N_f, D).

``SVDEmbedding`` is the paper's "SVD ⊕ MLP" reduction (``PositionAwareSVDSpatialReduction``) adapted to any channel
count, 2D/3D spatial shape and prefix length; ``LinearEmbedding`` is a plain projection to compare it with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SVDEmbedding", "LinearEmbedding", "build_embedding", "pool_tokens"]


def _conv_op(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def pool_tokens(x_BPC: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Average runs of consecutive (row-major) positions: (B, P, C) -> (B, num_tokens, C), as the reference pools U."""
    return F.adaptive_avg_pool1d(x_BPC.transpose(1, 2), num_tokens).transpose(1, 2)


class SVDEmbedding(nn.Module):
    """SE channel attention, learned positional map, importance map, per-sample SVD with an energy cut-off and a
    singular-value enhancer, projection back to tokens, channel MLP, plus 0.3 x a global residual branch.

    Adaptations of the reference (whose sizes are fixed at 256 x 64 x 64 -> 256 x 256):
      * the k kept components are masked (not sliced), so a batch shares one code path; the energy rule is the
        reference's (cumulative sum of S, not of S^2);
      * the reference multiplies the pixel-pooled ``U_k diag(S~)`` by ``V^T`` pairing a pixel-chunk index with a
        component index; here the pooled ``U_k diag(S~)`` (N_f x r) is multiplied by ``V^T`` (r x C), which is the
        pooled rank-k reconstruction of the feature map (N_f x C);
      * the channel MLP maps C -> D (the reference keeps C = D = 256).
    The SVD runs in fp32 with autocast off (``torch.linalg.svd(full_matrices=False)``); gradients: see ``svd_tokens``.
    """

    def __init__(self, in_channels: int, spatial_shape, num_tokens: int, dim: int, energy_ratio: float = 0.95,
                 residual_weight: float = 0.3, dropout: float = 0.1):
        super().__init__()
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        dims = len(self.spatial_shape)
        conv = _conv_op(dims)
        c = in_channels
        self.num_tokens, self.dim = num_tokens, dim
        self.energy_ratio, self.residual_weight = energy_ratio, residual_weight
        hidden = max(c // 16, 4)
        self.channel_attn = nn.Sequential(conv(c, hidden, 1), nn.ReLU(inplace=True), conv(hidden, c, 1), nn.Sigmoid())
        self.pos_map = nn.Parameter(torch.randn(1, c, *self.spatial_shape) * 0.02)
        mid = max(c // 4, 8)
        self.importance = nn.Sequential(
            conv(c, mid, 3, padding=1), nn.GroupNorm(math.gcd(8, mid), mid), nn.ReLU(inplace=True),
            conv(mid, max(mid // 2, 4), 3, padding=1), nn.ReLU(inplace=True), conv(max(mid // 2, 4), 1, 1),
            nn.Sigmoid())
        self.sv_enhancer = nn.Sequential(nn.Linear(1, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))
        self.fusion = nn.Sequential(nn.Linear(c, max(c // 2, dim // 2)), nn.LayerNorm(max(c // 2, dim // 2)),
                                    nn.ReLU(inplace=True), nn.Dropout(dropout),
                                    nn.Linear(max(c // 2, dim // 2), dim), nn.LayerNorm(dim))
        self.residual_proj = conv(c, dim, 1)

    def extra_repr(self) -> str:
        return f"spatial_shape={self.spatial_shape}, num_tokens={self.num_tokens}, dim={self.dim}, " \
               f"energy_ratio={self.energy_ratio}"

    def svd_tokens(self, x_BPC: torch.Tensor) -> torch.Tensor:
        """Pooled rank-k reconstruction (B, N_f, C) of the importance-weighted features (fp32).

        The singular vectors are computed without gradient and ``U S`` is formed as ``X V``: the forward value is
        the SVD's, and gradients reach X (and the enhancer) linearly. Back-propagating through the decomposition
        itself divides by differences of singular values, which is inf for repeated ones (e.g. dead channels) and
        made training diverge.
        """
        with torch.no_grad():
            _, S_Br, Vh_BrC = torch.linalg.svd(x_BPC, full_matrices=False)
        total_B1 = S_Br.sum(1, keepdim=True)
        # component i is kept when the energy of the components before it is below the ratio (so k >= 1)
        keep_Br = (S_Br.cumsum(1) - S_Br) < self.energy_ratio * total_B1
        s_norm = S_Br / S_Br[:, :1].clamp_min(1e-12)
        gate_Br = torch.sigmoid(self.sv_enhancer(s_norm.unsqueeze(-1)).squeeze(-1)) * keep_Br
        US_BPr = x_BPC @ Vh_BrC.transpose(1, 2)
        return pool_tokens(US_BPr * gate_Br.unsqueeze(1), self.num_tokens) @ Vh_BrC

    def forward(self, f_BCs: torch.Tensor) -> torch.Tensor:
        if tuple(f_BCs.shape[2:]) != self.spatial_shape:
            raise ValueError(f"feature map must have the spatial shape {self.spatial_shape}, got {tuple(f_BCs.shape)}")
        x = f_BCs * self.channel_attn(f_BCs.mean(tuple(range(2, f_BCs.ndim)), keepdim=True))
        x_pos = x + self.pos_map
        a_B1s = self.importance(x_pos)
        with torch.autocast(device_type=f_BCs.device.type, enabled=False):
            x_BPC = (x_pos * a_B1s).float().flatten(2).transpose(1, 2)
            svd_BNC = self.svd_tokens(x_BPC)
        tokens_BND = self.fusion(svd_BNC.to(x_pos.dtype))
        residual_BD = self.residual_proj(x_pos).mean(tuple(range(2, x_pos.ndim)))
        out_BND = tokens_BND + self.residual_weight * residual_BD.unsqueeze(1)
        return F.layer_norm(out_BND.float(), out_BND.shape[-2:]).to(out_BND.dtype)


class LinearEmbedding(nn.Module):
    """Plain projection: conv1x1 C -> D, positions pooled row-major to N_f tokens, a learned position per token."""

    def __init__(self, in_channels: int, spatial_shape, num_tokens: int, dim: int):
        super().__init__()
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.num_tokens, self.dim = num_tokens, dim
        self.proj = _conv_op(len(self.spatial_shape))(in_channels, dim, 1)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return f"spatial_shape={self.spatial_shape}, num_tokens={self.num_tokens}, dim={self.dim}"

    def forward(self, f_BCs: torch.Tensor) -> torch.Tensor:
        if tuple(f_BCs.shape[2:]) != self.spatial_shape:
            raise ValueError(f"feature map must have the spatial shape {self.spatial_shape}, got {tuple(f_BCs.shape)}")
        x_BPD = self.proj(f_BCs).flatten(2).transpose(1, 2)
        return self.norm(pool_tokens(x_BPD, self.num_tokens) + self.pos)


def build_embedding(kind: str, in_channels: int, spatial_shape, num_tokens: int, dim: int) -> nn.Module:
    """``kind`` is ``"svd"`` (the paper's) or ``"linear"``."""
    if kind == "svd":
        return SVDEmbedding(in_channels, spatial_shape, num_tokens, dim)
    if kind == "linear":
        return LinearEmbedding(in_channels, spatial_shape, num_tokens, dim)
    raise ValueError(f"embedding must be 'svd' or 'linear', got {kind!r}; set arch_kwargs['embedding'] in the plans")
