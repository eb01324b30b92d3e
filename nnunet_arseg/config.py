"""Every size and default of an AR-Seg model in one place: ``ARSegConfig`` and its presets.

A trainer variant picks a preset and may override fields; ``ARSegConfig.arch_kwargs`` turns it into the plans'
``arch_kwargs`` (JSON), from which nnU-Net and the predictor build ``ARSegNetwork``; ``ARSegConfig.from_arch_kwargs``
reads it back. ``tokenizer`` and ``transformer`` hold ``MaskTokenizer`` / ``BlockCausalTransformer`` keyword
arguments beyond their (reference) defaults; the tokenizer's ``latent_stride`` is chosen from the data by the trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["ARSegConfig", "PRESETS", "RECIPE", "SIZE_FIELDS", "DEFAULT_NUM_SAMPLES", "REFERENCE_TOP_K_SHARE", "preset"]

DEFAULT_NUM_SAMPLES = 16  # samples per image (the paper's N for LIDC)
REFERENCE_TOP_K_SHARE = 100 / 1024  # the reference samples from the 100 best of its 1,024 codes


@dataclass(frozen=True)
class ARSegConfig:
    """One AR-Seg model. Fields (see docs/method.md):

    tokenizer / transformer: extra kwargs of ``MaskTokenizer`` / ``BlockCausalTransformer``.
    embedding: ``"svd"`` (the paper's SVD ⊕ MLP) or ``"linear"``; num_prefix_tokens: N_f (encoder prefix).
    prefix_source: ``"encoder"`` (stage ``feature_stage``, None: the deepest with >= N_f positions) or ``"decoder"``
        (the U-Net decoder stage at the tokenizer's latent resolution; needs ``aux_head``).
    aux_head, aux_weight: train the plans' U-Net decoder on the same mask (Dice + BCE), a dense signal.
    aux_full_resolution: with the decoder prefix, run the decoder past the prefix's stage to full resolution for the
        head; else the head stops at the prefix's stage. The head trains the image model with a dense signal and is
        what ``--sampler head`` thresholds (method §3.3).
    presence: each sample first draws whether its mask is non-empty, from a presence head on the image prefix; the
        transformer then learns the non-empty masks only (``segmentor/presence.py``). presence_weight: the weight of
        its BCE in the loss. presence_source: what the presence head pools, ``"prefix"`` (the image prefix) or
        ``"head"`` (the U-Net decoder features the aux head's segmentation layer reads, detached; needs ``aux_head``).
    head_guidance: each scale's token inputs also get the U-Net head's probability and features at that scale's
        resolution (``segmentor/guidance.py``; needs ``aux_head``).
    max_features_per_stage: cap on the plans' U-Net widths (None: the plans' own, as a stock model of them).
    num_samples: default N; top_k: codes kept when sampling (None: the reference's share of the codebook, 0: all).
    has_regions: one condition class per nnU-Net region (else per foreground label); set from dataset.json.
    regions: with has_regions, the labels of each region (nnU-Net's foreground regions, in condition order): an anchor
        label map's region masks (method §3.3); set from dataset.json.
    """

    tokenizer: dict = field(default_factory=dict)
    transformer: dict = field(default_factory=dict)
    embedding: str = "svd"
    num_prefix_tokens: int = 256
    prefix_source: str = "encoder"
    feature_stage: int | None = None
    aux_head: bool = False
    aux_weight: float = 1.0
    aux_full_resolution: bool = False
    presence: bool = False
    presence_weight: float = 1.0
    presence_source: str = "prefix"
    head_guidance: bool = False
    max_features_per_stage: int | None = None
    num_samples: int = DEFAULT_NUM_SAMPLES
    top_k: int | None = None
    has_regions: bool = False
    regions: list | None = None

    def replace(self, **overrides) -> ARSegConfig:
        """A copy with ``overrides``; ``tokenizer``/``transformer`` are merged key by key."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown AR-Seg settings {sorted(unknown)}; known: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        for key in ("tokenizer", "transformer"):
            if overrides.get(key) is not None:
                overrides[key] = {**getattr(self, key), **overrides[key]}
        return dataclasses.replace(self, **overrides)

    def arch_kwargs(self) -> dict:
        """The network's keyword arguments (everything but the U-Net cap, which applies to the plans' widths)."""
        kwargs = dataclasses.asdict(self)
        kwargs.pop("max_features_per_stage")
        return kwargs

    @classmethod
    def from_arch_kwargs(cls, arch_kwargs: dict) -> ARSegConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in arch_kwargs.items() if k in names})


# What the measurements favour (docs/results.md), shared by every preset: the prefix from the U-Net decoder at the
# latent resolution, the U-Net decoder trained as a dense auxiliary head run to full resolution, the presence head, a
# linear prefix embedding. The presets differ only in sizes (a test asserts it).
RECIPE = {"embedding": "linear", "prefix_source": "decoder", "aux_head": True, "aux_full_resolution": True,
          "presence": True}
SIZE_FIELDS = ("tokenizer", "transformer", "max_features_per_stage", "num_prefix_tokens")

PRESETS = {
    # the paper's sizes (tokenizer 4.4 M parameters, transformer width 256, depth 8, the plans' own U-Net), for GPUs
    "reference": ARSegConfig(**RECIPE),
    # a CPU-sized model for budgets of minutes to hours
    "small": ARSegConfig(tokenizer={"ch": 32, "num_res_blocks": 1, "z_channels": 32, "space_to_depth": 4},
                         transformer={"width": 128, "depth": 3, "heads": 4, "dropout": 0.0},
                         max_features_per_stage=64, **RECIPE),
    # smoke tests and the demo
    "tiny": ARSegConfig(tokenizer={"ch": 16, "num_res_blocks": 1, "z_channels": 16, "codebook_size": 256,
                                   "code_dim": 16, "space_to_depth": 4},
                        transformer={"width": 64, "depth": 2, "heads": 4, "dropout": 0.0},
                        max_features_per_stage=32, **RECIPE),
}


def preset(name: str, **overrides) -> ARSegConfig:
    """``PRESETS[name]`` with ``overrides``; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].replace(**overrides)
