"""Stage 2 of AR-Seg: image embedding, class conditioning, block-causal transformer, presence, seeded sampling,
outlines around the U-Net head."""
from __future__ import annotations

from nnunet_arseg.segmentor.conditioning import AdaLNBeforeHead, AdaLNModulation, ClassCondition
from nnunet_arseg.segmentor.embedding import LinearEmbedding, SVDEmbedding, build_embedding
from nnunet_arseg.segmentor.outline import outline_levels
from nnunet_arseg.segmentor.presence import PresenceHead, draw_presence
from nnunet_arseg.segmentor.sampling import sample_token_maps, temperature_schedule
from nnunet_arseg.segmentor.transformer import BlockCausalTransformer

__all__ = ["AdaLNBeforeHead", "AdaLNModulation", "ClassCondition", "LinearEmbedding", "SVDEmbedding",
           "build_embedding", "outline_levels", "PresenceHead", "draw_presence", "sample_token_maps",
           "temperature_schedule", "BlockCausalTransformer"]
