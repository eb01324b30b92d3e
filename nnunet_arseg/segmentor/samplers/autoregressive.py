"""AR-Seg's own samples (method §3.1), the default: each present sample's token maps are drawn scale by scale by the
next-scale transformer, conditioned on the image and the class, and decoded by the mask tokenizer."""
from __future__ import annotations

import torch

from nnunet_arseg.segmentor.samplers.base import ClassDraw, Sampler
from nnunet_arseg.segmentor.sampling import sample_token_maps, temperature_schedule

__all__ = ["AutoregressiveSampler", "draw_token_maps"]


def draw_token_maps(d: ClassDraw, rows_N: torch.Tensor,
                    given: tuple[list[torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The transformer's draws of the rows ``rows_N`` (B * N,) bool, decoded (the other rows empty), and with
    ``d.with_scales`` the shown samples' partial f_hats. ``given``: coarse token maps that replace the draws of the
    rows it marks (``sample_token_maps``'s ``anchor``; the finer scales are then drawn given them)."""
    if not rows_N.any() and not d.with_scales:  # nothing to draw: no transformer pass at all
        return d.empty_masks(), None
    net, options = d.net, d.options
    B = d.present_BN.shape[0]
    cls_B = torch.full((B,), d.c, dtype=torch.long, device=rows_N.device)
    temperatures = [t * options.temperature for t in temperature_schedule(len(net.tokenizer.scales))]
    active = rows_N if net.presence_head is not None or not rows_N.all() else None
    idx_list, f_hat, partial = sample_token_maps(
        net.transformer, net.tokenizer.quantizer, d.image.prefix_BND,
        cls_B, d.num_samples, seed=d.seed, top_k=net.top_k, temperatures=temperatures, use_cache=options.use_cache,
        keep_rows=d.shown_N if d.with_scales else None, anchor=given, active=active,
        guide_BLD=net.guide_tokens(d.image, cls_B))
    masks_N = d.empty_masks()
    if rows_N.any():  # an absent sample is the empty mask: its token draw is never decoded
        masks_N[rows_N] = net.decode_masks(f_hat[rows_N], [idx[rows_N] for idx in idx_list])
    return masks_N, partial if d.with_scales else None


class AutoregressiveSampler(Sampler):
    """``--sampler autoregressive``: the transformer draws every scale of every present sample."""

    name = "autoregressive"

    def draw(self, d: ClassDraw, guide_B: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        return draw_token_maps(d, d.present_N)
