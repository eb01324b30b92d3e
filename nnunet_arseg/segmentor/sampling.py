"""Seeded per-scale sampling (method §3.1): temperature schedule, top-k, multinomial draws, scale by scale.

Every random call takes the one ``torch.Generator`` seeded here, so a seed fixes the samples. N samples of an image
are drawn as one batch (rows b * N + n). With the KV cache, the first step (image prefix and start tokens, which
are the same for all N samples of an image) runs once per image and its cache is repeated N times; without it,
the prefix and the condition are repeated N times.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_arseg.segmentor.transformer import BlockCausalTransformer

__all__ = ["REFERENCE_TEMPERATURES", "temperature_schedule", "sample_top_k", "sample_token_maps"]

REFERENCE_TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1)


def temperature_schedule(num_scales: int, reference=REFERENCE_TEMPERATURES) -> list[float]:
    """The reference's per-scale temperatures (K = 8), linearly interpolated over scale position for other K."""
    if num_scales == len(reference):
        return [float(t) for t in reference]
    if num_scales == 1:
        return [float(reference[0])]
    pos = np.linspace(0.0, 1.0, num_scales)
    return np.interp(pos, np.linspace(0.0, 1.0, len(reference)), np.asarray(reference, dtype=float)).tolist()


def sample_top_k(logits_BlV: torch.Tensor, temperature: float, top_k: int | None,
                 generator: torch.Generator) -> torch.Tensor:
    """Draw one token per position from softmax(logits / temperature) over the top-k logits (all logits with
    ``top_k`` None or 0), (B, l). The softmax and the draw run over the k kept logits only."""
    logits_NV = logits_BlV.float().reshape(-1, logits_BlV.shape[-1]) / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits_NV.shape[-1]:
        values_Nk, codes_Nk = logits_NV.topk(top_k, dim=-1, sorted=False)
        pick_N1 = torch.multinomial(values_Nk.softmax(-1), 1, generator=generator)
        return codes_Nk.gather(1, pick_N1).view(logits_BlV.shape[:-1])
    return torch.multinomial(logits_NV.softmax(-1), 1, generator=generator).view(logits_BlV.shape[:-1])


@torch.no_grad()
def sample_token_maps(transformer: BlockCausalTransformer, quantizer, prefix_BND: torch.Tensor, cls_B: torch.Tensor,
                      num_samples: int, seed: int, top_k: int | None = 100, temperatures=None,
                      use_cache: bool = True, keep_rows: torch.Tensor | None = None,
                      anchor: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                      active: torch.Tensor | None = None, guide_BLD: torch.Tensor | None = None):
    """Sample N token maps per image, scale by scale.

    Args:
        transformer: the block-causal transformer (put it in eval mode first).
        quantizer: the tokenizer's ``MultiScaleQuantizer`` (``embed_idx_and_next_input``).
        prefix_BND, cls_B: image prefix (encoded once) and condition class per image.
        num_samples: N; the rows of the outputs are b * N + n.
        seed: seeds the one generator of all draws.
        use_cache: KV cache on (fast) or recompute the whole sequence at every scale (same samples).
        keep_rows: also return the partial f_hat of these rows (indices into the B * N rows) after each scale.
        anchor: ``(idx_list, anchored_B)``: token maps (B * N, *pn) of the first ``len(idx_list)`` scales that replace
            the draws of the rows where ``anchored_B`` (B * N,) is set (VAR's teacher-forced editing: the finer
            scales are then drawn given them). The draws are made for every row, so the other rows' samples do not
            depend on the anchor.
        active: (B * N,) bool, the rows whose draws are used (e.g. the samples a presence draw keeps): the
            transformer runs on these only, and the other rows draw from uniform logits. Each row takes the same
            amount of the generator whatever its logits, so the active rows draw what a run for all rows draws (up
            to floating-point rounding: a smaller batch may round the logits differently).
        guide_BLD: per-scale guidance (``guidance.py``) of the positions of scales 1..K, one per image.

    Returns ``(idx_list, f_hat_BCz, partial_f_hats)``: token maps (B * N, *pn) per scale, the final f_hat
    (B * N, Cvae, *z), and a list (one per scale) of partial f_hats of the kept rows (empty without keep_rows).
    """
    scales = transformer.scales
    temps = temperature_schedule(len(scales)) if temperatures is None else list(temperatures)
    if len(temps) != len(scales):
        raise ValueError(f"need one temperature per scale ({len(scales)}), got {temps}")
    generator = torch.Generator(device=prefix_BND.device).manual_seed(int(seed))
    rows = None if active is None else active.nonzero().flatten()
    num_rows = prefix_BND.shape[0] * num_samples

    def take(t: torch.Tensor) -> torch.Tensor:  # the rows the transformer runs on
        return t if rows is None else t[rows]

    def spread(logits_rlV: torch.Tensor) -> torch.Tensor:  # their logits among uniform ones
        if rows is None:
            return logits_rlV
        return logits_rlV.new_zeros(num_rows, *logits_rlV.shape[1:]).index_copy_(0, rows, logits_rlV)

    f_hat, next_x, xs, idx_list, partial = None, None, [], [], []
    transformer.kv_caching(use_cache)
    try:
        if use_cache:  # step 0 once per image, then its cache and logits serve the N samples
            cond_BD = transformer.condition(cls_B)
            logits0_BlV = transformer.run(transformer.embed_step(0, prefix_BND, cond_BD, guide_BLD), cond_BD, 0,
                                          first_logit=transformer.num_prefix)
            transformer.repeat_cache(num_samples, rows)
        prefix_BND = prefix_BND.repeat_interleave(num_samples, dim=0)
        if guide_BLD is not None:
            guide_BLD = guide_BLD.repeat_interleave(num_samples, dim=0)
        cls_B = cls_B.repeat_interleave(num_samples, dim=0)
        cond_BD = transformer.condition(cls_B)
        for si, pn in enumerate(scales):
            length = transformer.lengths[si]
            if use_cache and si == 0:
                logits_BlV = logits0_BlV.repeat_interleave(num_samples, dim=0)
            elif rows is not None and rows.numel() == 0:
                logits_BlV = prefix_BND.new_zeros(num_rows, length, transformer.vocab_size, dtype=torch.float)
            elif use_cache:
                first = transformer.starts[si] - transformer.num_prefix
                guide = None if guide_BLD is None else take(guide_BLD)[:, first:first + length]
                h = transformer.embed_step(si, take(next_x), take(cond_BD), guide)
                logits_BlV = spread(transformer.run(h, take(cond_BD), transformer.starts[si]))
            else:
                x_BLC = torch.cat(xs, dim=1) if xs else prefix_BND.new_zeros(prefix_BND.shape[0], 0,
                                                                              quantizer.C)
                logits_BlV = spread(transformer(take(prefix_BND), take(x_BLC), take(cls_B), num_scales=si + 1,
                                                guide_BLD=None if guide_BLD is None else take(guide_BLD))[:, -length:])
            idx_Bpn = sample_top_k(logits_BlV[:, -length:], temps[si], top_k, generator).view(-1, *pn)
            if anchor is not None and si < len(anchor[0]):
                anchored = anchor[1].view(-1, *[1] * len(pn))
                idx_Bpn = torch.where(anchored, anchor[0][si].to(idx_Bpn), idx_Bpn)
            idx_list.append(idx_Bpn)
            f_hat, next_x = quantizer.embed_idx_and_next_input(si, f_hat, idx_Bpn)
            if keep_rows is not None:
                partial.append(f_hat[keep_rows])
            if next_x is not None:
                xs.append(next_x)
    finally:
        transformer.kv_caching(False)
    return idx_list, f_hat, partial
