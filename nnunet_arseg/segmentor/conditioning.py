"""Class condition c -> AdaLN parameters (method §2.3), as in VAR's ``AdaLNSelfAttn`` / ``AdaLNBeforeHead``.

c is a task selector (which class's binary mask to produce), so there is no class dropout and no CFG.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassCondition", "AdaLNModulation", "AdaLNBeforeHead"]


class ClassCondition(nn.Module):
    """Class index (B,) -> condition vector cond_BD."""

    def __init__(self, num_conditions: int, dim: int):
        super().__init__()
        self.num_conditions = num_conditions
        self.embed = nn.Embedding(num_conditions, dim)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)

    def forward(self, cls_B: torch.Tensor) -> torch.Tensor:
        if cls_B.numel() and (int(cls_B.min()) < 0 or int(cls_B.max()) >= self.num_conditions):
            raise ValueError(f"class indices must be in [0, {self.num_conditions}), got {cls_B.tolist()}")
        return self.embed(cls_B.long())


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D, 6D): (gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, D).

    VAR's init: the scale/shift rows are multiplied by ``init_adaln`` and the gamma rows by ``init_adaln_gamma``
    (so every block starts close to the identity); the bias is zero.
    """

    def __init__(self, dim: int, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        lin = self.ada_lin[-1]
        nn.init.trunc_normal_(lin.weight, std=0.02)
        with torch.no_grad():
            lin.weight[2 * dim:].mul_(init_adaln)
            lin.weight[:2 * dim].mul_(init_adaln_gamma)
            lin.bias.zero_()

    def forward(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.dim).unbind(2)


class AdaLNBeforeHead(nn.Module):
    """Non-affine LayerNorm modulated by (scale, shift) from the condition, before the output head."""

    def __init__(self, dim: int, init_adaln: float = 0.5):
        super().__init__()
        self.dim = dim
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.trunc_normal_(self.ada_lin[-1].weight, std=0.02)
        with torch.no_grad():
            self.ada_lin[-1].weight.mul_(init_adaln)
            self.ada_lin[-1].bias.zero_()

    def forward(self, x_BLD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln(x_BLD).mul(scale.add(1)).add_(shift)
