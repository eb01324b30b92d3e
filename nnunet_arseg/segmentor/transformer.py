"""Block-causal next-scale transformer (method §2.4) with AdaLN class conditioning and a KV cache.

Sequence: [image prefix (N_f) | start tokens of scale 1 | word_embed(inputs of scales 2..K)]. The positions after the
prefix predict the tokens of scales 1..K in order (L = sum of prod(pn) positions). Start tokens are the condition plus
a learned start embedding, as in VAR; the reference reads r_1 off the last prefix token instead (equivalent, but a
first scale with more than one token needs its own positions).
Attention: a token of level l sees every key of level <= l; the prefix is level 0, scale k is level k.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_arseg.segmentor.conditioning import AdaLNBeforeHead, AdaLNModulation, ClassCondition

__all__ = ["BlockCausalTransformer", "block_causal_levels"]


def block_causal_levels(num_prefix: int, scales) -> torch.Tensor:
    """Level of every sequence position: 0 for the prefix, k for the tokens of scale k (1-based), (T,)."""
    lengths = [num_prefix] + [math.prod(pn) for pn in scales]
    return torch.cat([torch.full((n,), lvl, dtype=torch.long) for lvl, n in enumerate(lengths)])


class SelfAttention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` with an explicit boolean mask; KV cache."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be a multiple of the number of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLD: torch.Tensor, mask_LT: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LT,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, D)))


class AdaLNBlock(nn.Module):
    """Pre-LN block: x += gamma1 * Attn(LN(x)(1 + s1) + b1); x += gamma2 * FFN(LN(x)(1 + s2) + b2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, init_adaln: float,
                 init_adaln_gamma: float):
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.ada = AdaLNModulation(dim, init_adaln, init_adaln_gamma)

    def forward(self, x_BLD: torch.Tensor, cond_BD: torch.Tensor, mask_LT: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada(cond_BD)
        x_BLD = x_BLD + self.attn(self.ln(x_BLD).mul(scale1.add(1)).add_(shift1), mask_LT).mul_(gamma1)
        return x_BLD + self.ffn(self.ln(x_BLD).mul(scale2.add(1)).add_(shift2)).mul_(gamma2)


class BlockCausalTransformer(nn.Module):
    """Predicts token logits of scales 1..K from the image prefix, the class and the inputs of scales 2..K.

    Args:
        num_prefix: N_f, the number of image tokens.
        scales: token-map shapes of the tokenizer, coarse to fine.
        code_dim, vocab_size: the tokenizer's Cvae (word_embed input) and V (head output).
        num_conditions: number of condition classes (foreground labels or regions).
        width, depth, heads, mlp_ratio, dropout: method §2.4 (256, 8, 8, 4, 0.1 in the reference).
        level_embed: add a learned embedding per level (VAR; the reference has none).
        init_adaln, init_adaln_gamma: VAR's AdaLN init scaling.
    """

    def __init__(self, num_prefix: int, scales, code_dim: int, vocab_size: int, num_conditions: int, width: int = 256,
                 depth: int = 8, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 level_embed: bool = False, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5):
        super().__init__()
        self.scales = [tuple(int(n) for n in pn) for pn in scales]
        self.num_prefix, self.vocab_size, self.width = num_prefix, vocab_size, width
        self.lengths = [math.prod(pn) for pn in self.scales]
        self.starts = [num_prefix + sum(self.lengths[:si]) for si in range(len(self.scales))]
        levels_T = block_causal_levels(num_prefix, self.scales)
        self.register_buffer("levels_T", levels_T, persistent=False)
        self.register_buffer("mask_TT", levels_T[:, None] >= levels_T[None, :], persistent=False)
        self.condition = ClassCondition(num_conditions, width)
        self.word_embed = nn.Linear(code_dim, width)
        self.pos_start = nn.Parameter(torch.empty(1, self.lengths[0], width))
        self.pos_embed = nn.Parameter(torch.zeros(1, len(levels_T), width))
        self.level_embed = nn.Embedding(len(self.scales) + 1, width) if level_embed else None
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([AdaLNBlock(width, heads, mlp_ratio, dropout, init_adaln, init_adaln_gamma)
                                     for _ in range(depth)])
        self.head_norm = AdaLNBeforeHead(width, init_adaln)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_start, std=0.02)
        if self.level_embed is not None:
            nn.init.trunc_normal_(self.level_embed.weight, std=0.02)
        for m in [self.word_embed, self.head] + [b.attn.qkv for b in self.blocks] + [b.attn.proj for b in self.blocks] \
                + [lin for b in self.blocks for lin in b.ffn if isinstance(lin, nn.Linear)]:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"num_prefix={self.num_prefix}, scales={self.scales}, V={self.vocab_size}, L={sum(self.lengths)}"

    def kv_caching(self, enable: bool) -> None:
        """Switch the KV cache on (empty) or off around a sampling loop."""
        for b in self.blocks:
            b.attn.kv_caching(enable)

    def repeat_cache(self, n: int, rows: torch.Tensor | None = None) -> None:
        """Repeat every cached row n times (rows b -> b * n + i): positions computed once per image serve its n
        samples; with ``rows`` (indices into the repeated rows), keep only those."""
        for b in self.blocks:
            index = torch.arange(b.attn.cached_k.shape[0], device=b.attn.cached_k.device).repeat_interleave(n)
            if rows is not None:
                index = index[rows]
            b.attn.cached_k = b.attn.cached_k.index_select(0, index)
            b.attn.cached_v = b.attn.cached_v.index_select(0, index)

    def embed_step(self, si: int, inp: torch.Tensor, cond_BD: torch.Tensor,
                   guide_BlD: torch.Tensor | None = None) -> torch.Tensor:
        """Input features with positions: si = 0 takes the prefix (B, N_f, D) and returns [prefix | start tokens];
        si >= 1 takes the inputs (B, l, Cvae) of scale si (and of the scales after it, if l covers them).
        ``guide_BlD``: per-scale guidance (``guidance.py``) added to the positions of the scales predicted here (from
        scale 1 for si = 0, else from scale si + 1), as many as it covers."""
        if si == 0:
            sos = (cond_BD.unsqueeze(1) + self.pos_start).expand(inp.shape[0], -1, -1)
            if guide_BlD is not None:
                sos = sos + guide_BlD[:, :self.lengths[0]]
            h, start = torch.cat((inp, sos.to(inp.dtype)), dim=1), 0
        else:
            h, start = self.word_embed(inp.to(self.word_embed.weight.dtype)), self.starts[si]
            if guide_BlD is not None:
                h = h + guide_BlD[:, :h.shape[1]].to(h.dtype)
        end = start + h.shape[1]
        h = h + self.pos_embed[:, start:end]
        if self.level_embed is not None:
            h = h + self.level_embed(self.levels_T[start:end])
        return self.emb_drop(h)

    def run(self, h_BlD: torch.Tensor, cond_BD: torch.Tensor, start: int, first_logit: int = 0) -> torch.Tensor:
        """Blocks on positions [start, start + l) seeing keys [0, start + l); logits (B, l', V) of the positions from
        ``first_logit`` on (the image prefix predicts nothing, so its logits are never computed)."""
        end = start + h_BlD.shape[1]
        mask = self.mask_TT[start:end, :end]
        for b in self.blocks:
            h_BlD = b(h_BlD, cond_BD, mask)
        h_BlD = h_BlD[:, max(first_logit - start, 0):]
        return self.head(self.head_norm(h_BlD, cond_BD)).float()

    def forward(self, prefix_BND: torch.Tensor, x_BLC: torch.Tensor, cls_B: torch.Tensor,
                num_scales: int | None = None, guide_BLD: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) of scales 1..K (or of the first ``num_scales``; then x_BLC holds the
        inputs of scales 2..num_scales). ``guide_BLD``: the per-scale guidance of the positions of scales 1..K."""
        num = len(self.scales) if num_scales is None else num_scales
        expected = sum(self.lengths[1:num])
        if x_BLC.shape[1] != expected:
            raise ValueError(f"expected the inputs of scales 2..{num} ({expected} tokens), got {tuple(x_BLC.shape)}")
        cond_BD = self.condition(cls_B)
        h = self.embed_step(0, prefix_BND, cond_BD, guide_BLD)
        if num > 1:
            rest = None if guide_BLD is None else guide_BLD[:, self.lengths[0]:]
            h = torch.cat((h, self.embed_step(1, x_BLC, cond_BD, rest)), dim=1)
        return self.run(h, cond_BD, 0, first_logit=self.num_prefix)
