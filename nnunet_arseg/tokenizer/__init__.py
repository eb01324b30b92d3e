"""Stage 1 of AR-Seg: the multi-scale mask tokenizer."""
from __future__ import annotations

from nnunet_arseg.tokenizer.autoencoder import MaskTokenizer, tokenizer_precision
from nnunet_arseg.tokenizer.quantizer import MultiScaleQuantizer, default_scales

__all__ = ["MaskTokenizer", "MultiScaleQuantizer", "default_scales", "tokenizer_precision"]
