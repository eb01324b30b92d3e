"""What every sampler of an ``ARSegNetwork`` shares: the sampling options, one class's draw, and the interface.

A sampler turns one condition class's presence draws into masks. The network builds, encodes the image once and
delegates (``ARSegNetwork.sample``): ``check`` refuses what the model or the request lacks, ``prepare`` computes what
the classes share (e.g. the U-Net head's probabilities), ``draw`` draws the masks of one class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from nnunet_arseg.segmentor.outline import OUTLINE_SPREAD, check_outline_spread

__all__ = ["SamplingOptions", "ClassDraw", "Sampler", "first_drawn"]


@dataclass(frozen=True)
class SamplingOptions:
    """How samples are drawn; each sampler reads the options that apply to it.

    temperature: factor on the transformer's per-scale temperatures (below 1: closer to its most likely mask).
    presence_temperature: divides the presence logit (``draw_presence``; below 1: the samples agree more often on
        whether to draw).
    outline_spread: ``head``: the levels of an image's drawn samples spread over 1/2 +- this (``outline.py``).
    anchor_scales: ``anchored``: how many coarse token maps come from the anchor (None: all).
    mirror_head: the U-Net head's logits averaged over the image's mirrorings (``ARSegNetwork.head_logits``).
    use_cache: the transformer's KV cache (same samples, faster).
    """

    temperature: float = 1.0
    presence_temperature: float = 1.0
    outline_spread: float = OUTLINE_SPREAD
    anchor_scales: int | None = None
    mirror_head: bool = True
    use_cache: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.presence_temperature > 0:
            raise ValueError(f"presence_temperature must be > 0, got {self.presence_temperature}")
        check_outline_spread(self.outline_spread)
        if self.anchor_scales is not None and self.anchor_scales < 0:
            raise ValueError(f"anchor_scales must be >= 0, got {self.anchor_scales}")


def first_drawn(present_BN: torch.Tensor) -> torch.Tensor:
    """Per image, the index of its first sample that draws a mask (0 when none does): the sample whose
    coarse-to-fine masks ``ARSegNetwork.sample(with_scales=True)`` shows."""
    return present_BN.to(torch.uint8).argmax(1)


@dataclass
class ClassDraw:
    """The draws of one condition class ``c`` for a batch of B images by ``net`` (an ``ARSegNetwork``) from its
    ``image`` (its ``ImageEncoding``): N samples each, rows b * N + n, with the presence already drawn (``present_BN``;
    all True without a presence head) and ``seed`` the class's seed."""

    net: nn.Module
    image: NamedTuple
    c: int
    num_samples: int
    seed: int
    present_BN: torch.Tensor
    with_scales: bool
    options: SamplingOptions

    @property
    def present_N(self) -> torch.Tensor:
        return self.present_BN.flatten()

    @property
    def shown_N(self) -> torch.Tensor:
        """The row of each image's shown sample (``first_drawn``)."""
        B = self.present_BN.shape[0]
        return torch.arange(B, device=self.present_BN.device) * self.num_samples + first_drawn(self.present_BN)

    def empty_masks(self) -> torch.Tensor:
        return torch.zeros(self.present_BN.numel(), *self.net.patch_size, dtype=torch.bool,
                           device=self.present_BN.device)


class Sampler:
    """One way of drawing the samples (a module of its own under ``segmentor/samplers``)."""

    name: ClassVar[str]
    has_scales: ClassVar[bool] = True  # whether ``draw`` returns the transformer's partial f_hats

    def check(self, net: nn.Module, anchor: torch.Tensor | None, options: SamplingOptions,
              with_scales: bool) -> None:
        """Refuse (ValueError) what ``net`` lacks for this sampler or what it does not take."""
        if anchor is not None:
            raise ValueError(f"sampler {self.name!r} takes no anchor masks; sample around them with sampler='anchored'")
        if with_scales and not self.has_scales:
            raise ValueError(f"sampler {self.name!r} draws each mask at once: it has no coarse-to-fine scales to show")

    def prepare(self, net: nn.Module, x: torch.Tensor, image: NamedTuple, anchor: torch.Tensor | None,
                options: SamplingOptions) -> torch.Tensor | None:
        """What every class's draw needs, (B, num_conditions, *patch), or None."""
        return None

    def draw(self, d: ClassDraw, guide_B: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The class's masks (B * N, *patch) bool, absent samples empty, and with ``d.with_scales`` the partial
        f_hats of the shown samples after each scale (``ClassDraw.shown_N``)."""
        raise NotImplementedError
