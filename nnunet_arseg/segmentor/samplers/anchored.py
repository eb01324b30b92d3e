"""Sampling around given masks (method §3.3): the first S token maps of a present sample are the anchor mask's own
tokens and the transformer draws the finer ones given them (VAR's teacher-forced editing); with every scale given, a
present sample is the anchor mask itself. The anchor is an outside mask (``--anchor FOLDER``, e.g. a stock nnU-Net's
prediction) or the model's own U-Net head's mask at 1/2. Where a class's anchor is empty, the samples are the
transformer's own draws."""
from __future__ import annotations

import torch

from nnunet_arseg.segmentor.samplers.autoregressive import draw_token_maps
from nnunet_arseg.segmentor.samplers.base import ClassDraw, Sampler
from nnunet_arseg.segmentor.samplers.head import head_probability_logits
from nnunet_arseg.tokenizer import tokenizer_precision

__all__ = ["AnchoredSampler"]


class AnchoredSampler(Sampler):
    """``--sampler anchored``: coarse scales from the anchor, finer scales from the transformer."""

    name = "anchored"

    def check(self, net, anchor, options, with_scales) -> None:
        num_scales = len(net.tokenizer.scales)
        if options.anchor_scales is not None and not 0 <= options.anchor_scales <= num_scales:
            raise ValueError(f"anchor_scales must be in 0 .. {num_scales} (the tokenizer's scales), got "
                             f"{options.anchor_scales}")
        if anchor is None and not net.aux_head:
            raise ValueError("sampler 'anchored' without anchor masks samples around the model's U-Net head, which "
                             "this model does not have (aux_head=False); give the anchor masks")
        if anchor is not None and tuple(anchor.shape[1:]) != (net.num_conditions, *net.patch_size):
            raise ValueError(f"anchor must have the shape (B, {net.num_conditions}, *{net.patch_size}) (one mask per "
                             f"condition class), got {tuple(anchor.shape)}")

    def prepare(self, net, x, image, anchor, options) -> torch.Tensor:
        return anchor.bool() if anchor is not None else head_probability_logits(net, x, image, options) > 0

    def draw(self, d: ClassDraw, guide_B: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        net, n = d.net, d.num_samples
        num_scales = len(net.tokenizer.scales)
        scales = num_scales if d.options.anchor_scales is None else d.options.anchor_scales
        if scales == 0:
            return draw_token_maps(d, d.present_N)
        mask_B1 = guide_B[:, None].float()
        with tokenizer_precision(mask_B1.device):
            idx_anchor = net.tokenizer.mask_to_idx(mask_B1)[:scales]
        anchored_N = mask_B1.flatten(1).amax(1).gt(0).repeat_interleave(n)
        given = ([idx.repeat_interleave(n, dim=0) for idx in idx_anchor], anchored_N)
        # every token map given: the anchor's own mask, not its tokenized reconstruction
        copied_N = d.present_N & anchored_N if scales == num_scales else torch.zeros_like(anchored_N)
        masks_N, partial = draw_token_maps(d, d.present_N & ~copied_N, given)
        masks_N[copied_N] = guide_B.repeat_interleave(n, dim=0)[copied_N]
        return masks_N, partial
