"""VAR's multi-scale residual vector quantizer (method §1.3), for 2D and 3D latents.

Each scale ``pn`` is a tuple (one int per latent axis), so non-square and 3D latents share one code path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleQuantizer", "default_scales"]


def default_scales(latent_shape: tuple[int, ...], num_scales: int | None = None) -> list[tuple[int, ...]]:
    """Token-map shapes, coarse to fine, ending at ``latent_shape``.

    Along the longest side n the K sides grow geometrically from 1 to n (``round(n ** (k / (K - 1)))``, each at least
    one more than the last), so the finest maps, which hold most tokens, are few: n = 8 gives the reference's
    1, 2, ..., 8 and n = 16 gives 1, 2, 3, 4, 5, 7, 11, 16 (481 tokens where 1..16 would be 1,496). K defaults to
    min(n, 8). Other axes follow proportionally (``ceil``): (4, 8) gives (1, 1), (1, 2), (2, 3), ..., (4, 8).
    Consecutive repeats are dropped.
    """
    latent_shape = tuple(int(n) for n in latent_shape)
    if not latent_shape or min(latent_shape) < 1:
        raise ValueError(f"latent_shape must be a non-empty tuple of positive ints, got {latent_shape}")
    n = max(latent_shape)
    num = min(n, 8) if num_scales is None else int(num_scales)
    if num < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    sides: list[int] = []
    for k in range(num):
        side = n if num == 1 else round(n ** (k / (num - 1)))
        sides.append(min(n, max(side, sides[-1] + 1 if sides else 1)))
    scales: list[tuple[int, ...]] = []
    for side in sides:
        pn = tuple(math.ceil(m * side / n) for m in latent_shape)
        if not scales or pn != scales[-1]:
            scales.append(pn)
    return scales


class Phi(nn.Module):
    """Residual refiner phi(h) = (1 - r) h + r conv3x3(h), r = 0.5 in the reference."""

    def __init__(self, conv_op: type[nn.Module], dim: int, ratio: float):
        super().__init__()
        self.conv = conv_op(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + self.conv(h).mul(self.ratio)


class MultiScaleQuantizer(nn.Module):
    """Residual quantizer over ``scales`` with one codebook and ``num_phi`` partially shared phi refiners.

    Args:
        scales: token-map shapes, coarse to fine; the last one is the latent's spatial shape.
        codebook_size, code_dim: V and C (1024 x 32 in the reference).
        beta: commitment weight of the VQ loss.
        num_phi: number of phi convs; scale si uses the one whose tick (linspace(1/(3n), 1 - 1/(3n), n)) is
            nearest to si / (K - 1).
        dead_code_steps: a code not hit for this many training steps is re-initialised (0 turns this off).
        usage_decay: decay of the per-scale EMA of code hits.
    """

    def __init__(self, scales: list[tuple[int, ...]], codebook_size: int = 1024, code_dim: int = 32,
                 beta: float = 0.25, num_phi: int = 4, phi_ratio: float = 0.5, dead_code_steps: int = 100,
                 usage_decay: float = 0.99):
        super().__init__()
        self.scales = [tuple(int(n) for n in pn) for pn in scales]
        dims = len(self.scales[-1])
        if dims not in (2, 3) or any(len(pn) != dims for pn in self.scales):
            raise ValueError(f"scales must all be 2D or all 3D tuples, got {self.scales}")
        self.latent_shape = self.scales[-1]
        self.V, self.C, self.beta = codebook_size, code_dim, beta
        self.up_mode = "bicubic" if dims == 2 else "trilinear"
        self.dead_code_steps, self.usage_decay = dead_code_steps, usage_decay
        conv_op = nn.Conv2d if dims == 2 else nn.Conv3d
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.phis = nn.ModuleList([Phi(conv_op, code_dim, phi_ratio) for _ in range(num_phi)])
        ticks = torch.linspace(1 / (3 * num_phi), 1 - 1 / (3 * num_phi), num_phi)
        num = len(self.scales)
        self.phi_of_scale = [int((ticks - si / max(num - 1, 1)).abs().argmin()) for si in range(num)]
        self.register_buffer("ema_hit_SV", torch.zeros(num, codebook_size))
        self.register_buffer("steps_unused_V", torch.zeros(codebook_size, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"V={self.V}, C={self.C}, beta={self.beta}, scales={self.scales}, phi_of_scale={self.phi_of_scale}"

    # ---- helpers shared by training and sampling ----
    @staticmethod
    def _down(f_BCz: torch.Tensor, pn: tuple[int, ...]) -> torch.Tensor:
        """Area down-sampling (adaptive average pooling) to ``pn``."""
        if tuple(f_BCz.shape[2:]) == pn:
            return f_BCz
        return F.adaptive_avg_pool2d(f_BCz, pn) if len(pn) == 2 else F.adaptive_avg_pool3d(f_BCz, pn)

    def _embed_up(self, si: int, idx_Bpn: torch.Tensor) -> torch.Tensor:
        """phi(upsample(e[idx])): scale si's contribution to f_hat, (B, C, *z)."""
        h_BCpn = self.embedding(idx_Bpn).movedim(-1, 1).float()
        if tuple(h_BCpn.shape[2:]) != self.latent_shape:
            h_BCpn = F.interpolate(h_BCpn, size=self.latent_shape, mode=self.up_mode)
        return self.phis[self.phi_of_scale[si]](h_BCpn)

    def _nearest(self, rest_NC: torch.Tensor) -> torch.Tensor:
        emb_VC = self.embedding.weight.float()
        d_NV = rest_NC.pow(2).sum(1, keepdim=True) + emb_VC.pow(2).sum(1) - 2 * rest_NC @ emb_VC.t()
        return d_NV.argmin(1)

    # ---- training ----
    def forward(self, f_BCz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize a latent; returns (f_hat with straight-through gradient, VQ loss, batch usage per scale (S,))."""
        with torch.autocast(device_type=f_BCz.device.type, enabled=False):
            f_BCz = f_BCz.float()
            f_no_grad = f_BCz.detach()
            rest = f_no_grad.clone()
            f_hat = torch.zeros_like(rest)
            vq_loss = f_BCz.new_zeros(())
            hit_SV = f_BCz.new_zeros(len(self.scales), self.V)
            rests = []
            for si, pn in enumerate(self.scales):
                with torch.no_grad():
                    rest_NC = self._down(rest, pn).movedim(1, -1).reshape(-1, self.C)
                    idx_N = self._nearest(rest_NC)
                    hit_SV[si] = idx_N.bincount(minlength=self.V).float()
                rests.append(rest_NC)
                h = self._embed_up(si, idx_N.view(f_BCz.shape[0], *pn))
                f_hat = f_hat + h
                rest = rest - h.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BCz).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / len(self.scales)
            f_hat = (f_hat.detach() - f_no_grad) + f_BCz
            usage_S = (hit_SV > 0).float().mean(1)
            if self.training:
                self._track_usage(hit_SV, torch.cat(rests))
        return f_hat, vq_loss, usage_S

    @torch.no_grad()
    def _track_usage(self, hit_SV: torch.Tensor, rest_NC: torch.Tensor) -> None:
        """Update the usage EMA and re-initialise dead codes.

        On small data most of a 1024-code book is otherwise never hit after the first steps: those codes get no
        gradient, waste capacity and leave the few live codes to carry everything, which slows convergence. A code
        unused for ``dead_code_steps`` steps is moved onto a randomly chosen current residual vector (the vectors the
        codes are matched against), so it starts where the data is. Draws use the global torch RNG (seeded runs
        repeat exactly). Local to the process (no collectives): one process trains a tokenizer, also under DDP.
        """
        self.ema_hit_SV.mul_(self.usage_decay).add_(hit_SV, alpha=1 - self.usage_decay)
        self.steps_unused_V.add_(1)
        self.steps_unused_V[hit_SV.sum(0) > 0] = 0
        if self.dead_code_steps <= 0:
            return
        dead_V = self.steps_unused_V >= self.dead_code_steps
        num_dead = int(dead_V.sum())
        if num_dead == 0:
            return
        pick = torch.randint(0, rest_NC.shape[0], (num_dead,), device=rest_NC.device)
        weight = self.embedding.weight.data
        weight[dead_V] = rest_NC[pick].to(weight.dtype)
        self.steps_unused_V[dead_V] = 0

    def ema_usage(self) -> torch.Tensor:
        """Per scale, the fraction of codes whose EMA hit count is >= 1% of a uniform share, (S,)."""
        total_S = self.ema_hit_SV.sum(1, keepdim=True).clamp_min(1e-12)
        return (self.ema_hit_SV >= 0.01 * total_S / self.V).float().mean(1)

    # ---- tokens <-> latents ----
    @torch.no_grad()
    def f_to_idx(self, f_BCz: torch.Tensor) -> list[torch.Tensor]:
        """Token maps of a latent, one (B, *pn) LongTensor per scale (no usage tracking)."""
        with torch.autocast(device_type=f_BCz.device.type, enabled=False):
            rest = f_BCz.float().clone()
            idx_list = []
            for si, pn in enumerate(self.scales):
                idx_Bpn = self._nearest(self._down(rest, pn).movedim(1, -1).reshape(-1, self.C)).view(-1, *pn)
                idx_list.append(idx_Bpn)
                rest = rest - self._embed_up(si, idx_Bpn)
        return idx_list

    def _check_idx(self, idx_list: list[torch.Tensor]) -> None:
        shapes = [tuple(idx.shape[1:]) for idx in idx_list]
        if not idx_list or shapes != self.scales[:len(shapes)]:
            raise ValueError(f"token maps must be (B, *pn) for the first k of the scales {self.scales}, got {shapes}")

    def idx_to_f_hat(self, idx_list: list[torch.Tensor], all_scales: bool = False):
        """Cumulative f_hat of the given token maps: the last one, or (``all_scales``) one per scale."""
        self._check_idx(idx_list)
        with torch.autocast(device_type=idx_list[0].device.type, enabled=False):
            f_hat = None
            out = []
            for si, idx_Bpn in enumerate(idx_list):
                h = self._embed_up(si, idx_Bpn)
                f_hat = h if f_hat is None else f_hat + h
                out.append(f_hat)
        return out if all_scales else out[-1]

    def idx_to_teacher_inputs(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """VAR teacher-forcing inputs of scales 2..K, (B, L, C): area-down(f_hat_k, scales[k]) flattened row-major.

        Uses the first K - 1 maps only, so the inputs of scale k depend only on maps of scales < k.
        """
        self._check_idx(idx_list)
        if len(idx_list) < len(self.scales) - 1:
            raise ValueError(f"need at least {len(self.scales) - 1} token maps, got {len(idx_list)}")
        f_hat = None
        next_x = []
        for si in range(len(self.scales) - 1):
            f_hat, x_BlC = self.embed_idx_and_next_input(si, f_hat, idx_list[si])
            next_x.append(x_BlC)
        return torch.cat(next_x, dim=1)

    def embed_idx_and_next_input(self, si: int, f_hat_BCz: torch.Tensor | None, idx_Bpn: torch.Tensor):
        """One sampling step: add scale ``si``'s codes to f_hat (None = zeros) and return the input tokens of si + 1.

        Returns ``(f_hat_BCz, next_x_BlC)``; ``next_x_BlC`` is None after the last scale.
        """
        if tuple(idx_Bpn.shape[1:]) != self.scales[si]:
            raise ValueError(f"token map of scale {si} must be (B, *{self.scales[si]}), got {tuple(idx_Bpn.shape)}")
        with torch.autocast(device_type=idx_Bpn.device.type, enabled=False):
            h = self._embed_up(si, idx_Bpn)
            f_hat_BCz = h if f_hat_BCz is None else f_hat_BCz.float() + h
            if si == len(self.scales) - 1:
                return f_hat_BCz, None
            next_BCpn = self._down(f_hat_BCz, self.scales[si + 1])
        return f_hat_BCz, next_BCpn.flatten(2).transpose(1, 2)
