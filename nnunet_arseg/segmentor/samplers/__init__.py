"""The ways an ``ARSegNetwork`` draws its samples, one module each behind ``base.Sampler``:

- ``autoregressive`` (the default, AR-Seg): the next-scale transformer draws every scale of every present sample;
- ``head`` (a baseline): the U-Net head's probability map at a level of its own per present sample;
- ``anchored``: the coarse scales from an anchor mask (outside masks or the model's own head), the finer ones drawn
  by the transformer.
"""
from __future__ import annotations

from nnunet_arseg.segmentor.samplers.anchored import AnchoredSampler
from nnunet_arseg.segmentor.samplers.autoregressive import AutoregressiveSampler
from nnunet_arseg.segmentor.samplers.base import ClassDraw, Sampler, SamplingOptions, first_drawn
from nnunet_arseg.segmentor.samplers.head import HeadSampler

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "get_sampler", "Sampler", "SamplingOptions", "ClassDraw", "first_drawn"]

SAMPLERS = {s.name: s for s in (AutoregressiveSampler, HeadSampler, AnchoredSampler)}
DEFAULT_SAMPLER = AutoregressiveSampler.name


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]()
