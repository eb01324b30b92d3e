"""AR-Seg's multi-scale mask tokenizer (method §1): binary mask -> K token maps -> mask logits, 2D or 3D.

Encoder/decoder in the taming-transformers VQGAN style (method §1.1), 1x1 quant convs, VAR residual quantizer
(method §1.3), loss Dice + BCE + VQ (method §1.4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, convert_dim_to_conv_op
from torch import nn

from nnunet_arseg.tokenizer.quantizer import MultiScaleQuantizer, default_scales

__all__ = ["MaskTokenizer", "latent_strides", "space_to_depth", "depth_to_space", "tokenizer_precision"]


def tokenizer_precision(device: torch.device):
    """Autocast off: the tokenizer encodes and decodes in fp32, the precision it was fitted in, also inside a
    trainer's or predictor's autocast (bf16/fp16 would change the tokens of a mask and the pixels of a decode)."""
    return torch.autocast(device.type, enabled=False)


def latent_strides(patch_size: tuple[int, ...], num_down: int,
                   max_stride: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Per-level strides of the encoder: an axis is halved at a level only while its current size is even and, with
    ``max_stride``, until its total stride reaches ``max_stride`` for that axis; without it, while the axis keeps two
    latent cells at least.

    So 128x128 with 4 levels gives stride 16 (latent 8x8), and a 3D patch (40, 64, 48) gives the latent
    (5, 4, 3): 40 -> 20 -> 10 -> 5 stops at the odd 5 (stride 8), 64 -> 4 and 48 -> 3 (stride 16).
    """
    sizes = list(patch_size)
    total = [1] * len(sizes)
    cap = max_stride or [2 ** num_down] * len(sizes)
    smallest = 1 if max_stride else 2
    strides = []
    for _ in range(num_down):
        level = tuple(2 if n % 2 == 0 and n // 2 >= smallest and t < c else 1 for n, t, c in zip(sizes, total, cap))
        sizes = [n // s for n, s in zip(sizes, level)]
        total = [t * s for t, s in zip(total, level)]
        strides.append(level)
    return strides


def space_to_depth(x: torch.Tensor, factor: tuple[int, ...]) -> torch.Tensor:
    """Lossless rearrangement (B, C, *S) -> (B, C * prod(factor), *S / factor), N-d ``pixel_unshuffle``."""
    B, C, *S = x.shape
    d = len(S)
    x = x.reshape(B, C, *[n for s, f in zip(S, factor) for n in (s // f, f)])
    x = x.permute(0, 1, *[2 + 2 * i + 1 for i in range(d)], *[2 + 2 * i for i in range(d)])
    return x.reshape(B, C * math.prod(factor), *[s // f for s, f in zip(S, factor)])


def depth_to_space(x: torch.Tensor, factor: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``space_to_depth``."""
    B, CF, *S = x.shape
    d = len(S)
    x = x.reshape(B, CF // math.prod(factor), *factor, *S)
    x = x.permute(0, 1, *[n for i in range(d) for n in (2 + d + i, 2 + i)])
    return x.reshape(B, CF // math.prod(factor), *[s * f for s, f in zip(S, factor)])


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in the reference (fewer when the width is not a multiple of 32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, conv_op, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), conv_op(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), conv_op(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = conv_op(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (the mid block's)."""

    def __init__(self, conv_op, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = conv_op(channels, 3 * channels, 1)
        self.proj_out = conv_op(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Conv3x3 with per-axis stride; stride-2 axes are padded (0, 1) as in the reference, others (1, 1)."""

    def __init__(self, conv_op, channels: int, stride: tuple[int, ...]):
        super().__init__()
        self.conv = conv_op(channels, channels, 3, stride=stride, padding=0)
        self.pad = [p for s in reversed(stride) for p in ((0, 1) if s == 2 else (1, 1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class Upsample(nn.Module):
    """Nearest up-sampling by the per-axis stride, then conv3x3."""

    def __init__(self, conv_op, channels: int, stride: tuple[int, ...]):
        super().__init__()
        self.conv = conv_op(channels, channels, 3, padding=1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [n * s for n, s in zip(x.shape[2:], self.stride)]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def mid_block(conv_op, c: int, dropout: float) -> nn.Sequential:
    """Res - Attn - Res at the latent resolution."""
    return nn.Sequential(ResnetBlock(conv_op, c, c, dropout), AttnBlock(conv_op, c),
                         ResnetBlock(conv_op, c, c, dropout))


class Encoder(nn.Module):
    def __init__(self, conv_op, strides, in_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        layers: list[nn.Module] = [conv_op(in_channels, ch, 3, padding=1)]
        c = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(conv_op, c, ch * mult, dropout))
                c = ch * mult
            if level < len(ch_mult) - 1:
                layers.append(Downsample(conv_op, c, strides[level]))
        layers += [mid_block(conv_op, c, dropout), norm(c), nn.SiLU(), conv_op(c, z_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, conv_op, strides, out_channels, ch, ch_mult, num_res_blocks, z_channels, dropout):
        super().__init__()
        c = ch * ch_mult[-1]
        layers: list[nn.Module] = [conv_op(z_channels, c, 3, padding=1), mid_block(conv_op, c, dropout)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(conv_op, c, ch * ch_mult[level], dropout))
                c = ch * ch_mult[level]
            if level > 0:
                layers.append(Upsample(conv_op, c, strides[level - 1]))
        layers += [norm(c), nn.SiLU(), conv_op(c, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class MaskTokenizer(nn.Module):
    """Binary mask (B, 1, *patch_size) <-> token maps over ``scales``; decodes to unclamped logits.

    Args:
        conv_op: ``nn.Conv2d``/``nn.Conv3d`` (as nnU-Net's networks take it) or the number of spatial dims (2 or 3).
        patch_size: spatial shape of the masks.
        latent_stride: total stride per axis (an int for all axes), powers of two that divide the patch size;
            None: space_to_depth * 2 ** (len(ch_mult) - 1) along every axis that stays even that long (see
            ``latent_strides``).
        ch, ch_mult, num_res_blocks, z_channels, dropout: widths of method §1.1 (defaults: the reference's; with
            ``latent_stride`` the default ``ch_mult`` is (1, 2, 2, 4, 4) cut to the number of convolution levels).
        space_to_depth: a power of two f: the mask enters as ``space_to_depth(mask, f)`` (f**d channels, lossless)
            and the decoder ends with the inverse, so no convolution runs at full resolution. A binary mask holds
            little information per pixel; this makes the autoencoder several times cheaper at the same latent.
        codebook_size, code_dim, beta, num_phi, phi_ratio, dead_code_steps: see ``MultiScaleQuantizer``.
        num_scales / scales: the token-map schedule (default ``default_scales(latent_shape)``).
    """

    def __init__(self, conv_op: type[nn.Module] | int, patch_size, ch: int = 32, ch_mult=None,
                 num_res_blocks: int = 2, z_channels: int = 128, dropout: float = 0.0, codebook_size: int = 1024,
                 code_dim: int = 32, beta: float = 0.25, num_phi: int = 4, phi_ratio: float = 0.5,
                 dead_code_steps: int = 100, num_scales: int | None = None, scales=None, space_to_depth: int = 1,
                 latent_stride=None):
        super().__init__()
        dims = conv_op if isinstance(conv_op, int) else convert_conv_op_to_dim(conv_op)
        self.patch_size = tuple(int(n) for n in patch_size)
        if dims not in (2, 3) or len(self.patch_size) != dims:
            raise ValueError(f"patch_size {self.patch_size} does not match a {dims}D conv op; give one size per axis")
        conv = convert_dim_to_conv_op(dims)
        if space_to_depth < 1 or space_to_depth & (space_to_depth - 1):
            raise ValueError(f"space_to_depth must be a power of two, got {space_to_depth}")
        num_s2d = int(math.log2(space_to_depth))
        if latent_stride is None:
            ch_mult = tuple(ch_mult or (1, 1, 2, 2, 4))
            levels = latent_strides(self.patch_size, num_s2d + len(ch_mult) - 1)
        else:
            target = (latent_stride,) * dims if isinstance(latent_stride, int) else tuple(int(s) for s in latent_stride)
            if len(target) != dims or any(t < 1 or t & (t - 1) for t in target):
                raise ValueError(f"latent_stride must be a power of two per axis, got {latent_stride}")
            num_down = max(num_s2d, max(int(math.log2(t)) for t in target))
            levels = latent_strides(self.patch_size, num_down, target)
            reached = tuple(math.prod(lv[a] for lv in levels) for a in range(dims))
            if reached != target:
                raise ValueError(f"patch_size {self.patch_size} cannot be reduced by latent_stride {target} "
                                 f"(reached {reached}); every axis must be divisible by its stride")
            ch_mult = tuple(ch_mult or (1, 2, 2, 4, 4, 4)[:num_down - num_s2d + 1])
            if len(ch_mult) != num_down - num_s2d + 1:
                raise ValueError(f"ch_mult {ch_mult} must have {num_down - num_s2d + 1} entries for latent_stride "
                                 f"{target} with space_to_depth {space_to_depth}")
        s2d_levels, conv_strides = levels[:num_s2d], levels[num_s2d:]
        self.s2d_factor = tuple(math.prod(lv[a] for lv in s2d_levels) for a in range(dims))
        conv_input = tuple(n // f for n, f in zip(self.patch_size, self.s2d_factor))
        self.strides = levels
        self.latent_shape = tuple(n // math.prod(s[a] for s in conv_strides) for a, n in enumerate(conv_input))
        self.scales = default_scales(self.latent_shape, num_scales) if scales is None else [tuple(pn) for pn in scales]
        if self.scales[-1] != self.latent_shape:
            raise ValueError(f"the last scale must be the latent shape {self.latent_shape}, got {self.scales[-1]}")
        args = (ch, tuple(ch_mult), num_res_blocks, z_channels, dropout)
        self.encoder = Encoder(conv, conv_strides, math.prod(self.s2d_factor), *args)
        self.decoder = Decoder(conv, conv_strides, math.prod(self.s2d_factor), *args)
        self.quant_conv = conv(z_channels, code_dim, 1)
        self.post_quant_conv = conv(code_dim, z_channels, 1)
        self.quantizer = MultiScaleQuantizer(self.scales, codebook_size, code_dim, beta, num_phi, phi_ratio,
                                             dead_code_steps)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, latent_shape={self.latent_shape}, strides={self.strides}"

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim != len(self.patch_size) + 2 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != self.patch_size:
            raise ValueError(f"mask must have the shape (B, 1, *{self.patch_size}), got {tuple(mask.shape)}; "
                             "crop or pad it to the tokenizer's patch size")
        return mask.float()

    def encode(self, mask_B1: torch.Tensor) -> torch.Tensor:
        """Continuous latent (B, code_dim, *latent_shape)."""
        return self.quant_conv(self.encoder(space_to_depth(self._check_mask(mask_B1), self.s2d_factor)))

    def decode_f_hat(self, f_hat_BCz: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 1, *patch_size) of a (partial) f_hat."""
        return depth_to_space(self.decoder(self.post_quant_conv(f_hat_BCz)), self.s2d_factor)

    @torch.no_grad()
    def mask_to_idx(self, mask_B1: torch.Tensor) -> list[torch.Tensor]:
        """One LongTensor (B, *pn) per scale."""
        return self.quantizer.f_to_idx(self.encode(mask_B1))

    def idx_to_logits(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_f_hat(self.quantizer.idx_to_f_hat(idx_list))

    def idx_to_scale_logits(self, idx_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits implied by the first k maps, k = 1..len(idx_list) (coarse to fine)."""
        return [self.decode_f_hat(f_hat) for f_hat in self.quantizer.idx_to_f_hat(idx_list, all_scales=True)]

    def idx_to_teacher_inputs(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, code_dim) teacher-forcing inputs of scales 2..K; see ``MultiScaleQuantizer``."""
        return self.quantizer.idx_to_teacher_inputs(idx_list)

    def forward(self, mask_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (logits (B, 1, *patch), VQ loss, batch codebook usage per scale (S,))."""
        f_hat, vq_loss, usage_S = self.quantizer(self.encode(mask_B1))
        return self.decode_f_hat(f_hat), vq_loss, usage_S

    def loss(self, mask_B1: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Dice + BCE + VQ (method §1.4) in fp32, and logs (loss terms, per-scale codebook usage: batch and EMA)."""
        logits, vq_loss, usage_S = self(mask_B1)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float().flatten(1), mask_B1.float().flatten(1)
            p = torch.sigmoid(logits)
            dice_B = (2 * (p * target).sum(1) + 1e-6) / (p.sum(1) + target.sum(1) + 1e-6)
            dice_loss = 1 - dice_B.mean()
            # same value as BCE on sigmoid(logits), without its saturation at log(0)
            bce = F.binary_cross_entropy_with_logits(logits, target)
            loss = dice_loss + bce + vq_loss
        logs = {"loss": loss.item(), "dice_loss": dice_loss.item(), "bce": bce.item(), "vq": vq_loss.item(),
                "usage_batch": usage_S.tolist(), "usage_ema": self.quantizer.ema_usage().tolist()}
        return loss, logs
