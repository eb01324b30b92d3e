"""A baseline sampler (ours; method §3.3), "U-Net head + presence, threshold levels": each present sample is the
model's U-Net head's probability map thresholded at a level of its own (``outline.py``), so the samples differ in
presence and outline. No coarse-to-fine scales: the head draws each mask at once. Where the head's mask at 1/2 is
empty, a present sample is the transformer's own draw (``autoregressive``)."""
from __future__ import annotations

import torch

from nnunet_arseg.segmentor.outline import outline_levels
from nnunet_arseg.segmentor.samplers.autoregressive import draw_token_maps
from nnunet_arseg.segmentor.samplers.base import ClassDraw, Sampler, SamplingOptions

__all__ = ["HeadSampler", "head_probability_logits"]


def head_probability_logits(net, x: torch.Tensor, image, options: SamplingOptions) -> torch.Tensor:
    """The U-Net head's logits at the patch (B, num_conditions, *patch), fp32, mirrored unless told otherwise."""
    return net.head_at_patch(net.head_logits(x, image.aux_logits) if options.mirror_head else image.aux_logits)


class HeadSampler(Sampler):
    """``--sampler head``: the head's probability at each present sample's own level."""

    name = "head"
    has_scales = False

    def check(self, net, anchor, options, with_scales) -> None:
        super().check(net, anchor, options, with_scales)
        if not net.aux_head:
            raise ValueError("sampler 'head' thresholds the model's U-Net head, which this model does not have "
                             "(aux_head=False)")

    def prepare(self, net, x, image, anchor, options) -> torch.Tensor:
        return head_probability_logits(net, x, image, options)

    def draw(self, d: ClassDraw, guide_B: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        n, present_N = d.num_samples, d.present_N
        head_N = (guide_B > 0).flatten(1).any(1).repeat_interleave(n)  # whether the head's mask has an object
        thresholded_N, own_N = present_N & head_N, present_N & ~head_N
        masks_N = draw_token_maps(d, own_N)[0]
        if thresholded_N.any():
            level_N = torch.logit(outline_levels(d.present_BN, d.options.outline_spread).flatten()[thresholded_N])
            image_N = torch.arange(len(guide_B), device=guide_B.device).repeat_interleave(n)[thresholded_N]
            masks_N[thresholded_N] = guide_B[image_N] > level_N.view(-1, *[1] * (guide_B.ndim - 1))
        return masks_N, None
