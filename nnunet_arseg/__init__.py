"""AR-Seg for nnU-Net v2: autoregressive segmentation by next-scale mask prediction."""

__version__ = "0.3.1"  # CHANGELOG.md; pyproject.toml reads it from here
