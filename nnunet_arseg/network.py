"""``ARSegNetwork``: the one ``nn.Module`` nnU-Net builds from the plans (design.md, "Network contract").

It holds the image model (the plans' own U-Net: its encoder, and its decoder as a dense auxiliary head), the image
embedding f, the block-causal transformer and the dataset's mask tokenizer (trained beforehand, frozen here).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import pydoc
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_arseg import env
from nnunet_arseg.config import REFERENCE_TOP_K_SHARE, ARSegConfig, preset
from nnunet_arseg.consensus import consensus_logits
from nnunet_arseg.segmentor.embedding import build_embedding
from nnunet_arseg.segmentor.guidance import HeadGuidance
from nnunet_arseg.segmentor.outline import OUTLINE_SPREAD
from nnunet_arseg.segmentor.presence import PresenceHead, draw_presence
from nnunet_arseg.segmentor.samplers import DEFAULT_SAMPLER, SAMPLERS, ClassDraw, SamplingOptions, get_sampler
from nnunet_arseg.segmentor.samplers.base import first_drawn  # noqa: F401 (the shown sample, part of this API)
from nnunet_arseg.segmentor.transformer import BlockCausalTransformer
from nnunet_arseg.tokenizer import MaskTokenizer, tokenizer_precision

__all__ = ["ARSegNetwork", "ImageEncoding", "build_arseg_architecture", "unwrap_network", "PREFIX_SOURCES",
           "PRESENCE_SOURCES"]

NETWORK_CLASS_NAME = "nnunet_arseg.network.ARSegNetwork"
PREFIX_SOURCES = ("encoder", "decoder")
PRESENCE_SOURCES = ("prefix", "head")


class ImageEncoding(NamedTuple):
    """What the image model gives the segmentor: the prefix (B, N_f, D), the U-Net head's logits
    (B, num_conditions, *s) or None without the aux head, the tokens the presence head pools (B, N, D_p): the
    prefix, or the features the head's segmentation layer reads (``presence_source``), and those features
    (B, C, *s) or None without the aux head."""

    prefix_BND: torch.Tensor
    aux_logits: torch.Tensor | None
    presence_BND: torch.Tensor
    head_features: torch.Tensor | None = None


class _DeepSupervisionFlag(nn.Module):
    """Stands in for ``.decoder`` without the aux head: nnU-Net's trainer sets ``decoder.deep_supervision``."""

    def __init__(self):
        super().__init__()
        self.deep_supervision = False


class ImageModel(nn.Module):
    """The plans' U-Net parts of an ``ARSegNetwork`` (the same modules, not copies), keyed as in a stock nnU-Net
    checkpoint: what ``-pretrained_weights`` of a stock model can initialise."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder


def _locate(name_or_obj, what: str):
    if not isinstance(name_or_obj, str):
        return name_or_obj
    obj = pydoc.locate(name_or_obj)
    if obj is None:
        raise ImportError(f"{what} {name_or_obj!r} (from the plans' arch_kwargs) cannot be imported; fix the name")
    return obj


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and ``torch.compile`` wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def decode_to_stage(decoder: nn.Module, skips: list[torch.Tensor], last_stage: int,
                    feature_stage: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nnU-Net's ``UNetDecoder`` run up to stage ``last_stage`` only: the features of stage ``feature_stage`` (None:
    ``last_stage``), the logits of ``last_stage``'s segmentation layer (the deep-supervision head of that
    resolution) and the features that layer reads."""
    feature_stage = last_stage if feature_stage is None else feature_stage
    x = features = skips[-1]
    for s in range(last_stage + 1):
        x = decoder.stages[s](torch.cat((decoder.transpconvs[s](x), skips[-(s + 2)]), 1))
        if s == feature_stage:
            features = x
    return features, decoder.seg_layers[last_stage](x), x


def pool_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Area down-sampling of (B, C, *S) to ``shape`` (unchanged when it already has it)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return (F.adaptive_avg_pool2d if len(shape) == 2 else F.adaptive_avg_pool3d)(x, tuple(shape))


class ARSegNetwork(nn.Module):
    """AR-Seg (docs/method.md) for one nnU-Net configuration; every default is ``ARSegConfig``'s.

    Args:
        input_channels, num_classes: from nnU-Net (``num_classes`` = ``label_manager.num_segmentation_heads``, the
            output heads; the condition classes are the foreground labels or the regions).
        patch_size: the configuration's patch size; tokenizer and embedding are sized for it.
        encoder_class_name: the plans' own U-Net class; its encoder is the image encoder.
        tokenizer, transformer: kwargs of ``MaskTokenizer`` / ``BlockCausalTransformer`` (sizes).
        embedding: ``"svd"`` (method §2.2) or ``"linear"``; num_prefix_tokens: N_f.
        prefix_source: ``"encoder"``: the prefix embeds encoder stage ``feature_stage`` (None: the deepest with
            >= N_f positions), as the reference embeds its image encoder's output; ``"decoder"``: it embeds the
            U-Net decoder stage whose resolution is the tokenizer's latent (one prefix token per latent cell, N_f
            set accordingly; needs ``aux_head``).
        has_regions: nnU-Net regions (one condition class per region) or labels (one per foreground label).
        regions: with has_regions, the labels of each region: anchor label maps become region masks (method §3.3).
        num_samples: default N of the eval forward; top_k: sampling top-k (None: the reference's share of the
            codebook, 100 of 1,024; 0: all codes).
        aux_head, aux_weight: train the U-Net decoder (as far as it runs, see ``encode_image``) on the same mask
            (Dice + BCE): a dense signal for the image model.
        aux_full_resolution: with the decoder prefix, the head runs the decoder to full resolution (else it stops at
            the prefix's stage).
        presence: a presence head (``segmentor/presence.py``): each sample first draws whether the mask is
            non-empty; the transformer is trained on non-empty masks only. presence_weight: its BCE's weight.
            presence_source: what it pools, ``"prefix"`` (the prefix tokens) or ``"head"`` (the U-Net decoder features
            the head's segmentation layer reads, detached; needs ``aux_head``).
        head_guidance: each scale's token inputs also get the U-Net head's probability and features at that scale's
            resolution (``segmentor/guidance.py``; needs ``aux_head``).
        deep_supervision: accepted from nnU-Net; unused (the aux head is trained at one resolution).
        **unet_kwargs: the plans' U-Net kwargs (conv_op, n_stages, features_per_stage, strides, ...).
    """

    def __init__(self, input_channels: int, num_classes: int, patch_size, encoder_class_name: str =
                 "dynamic_network_architectures.architectures.unet.PlainConvUNet", tokenizer: dict | None = None,
                 transformer: dict | None = None, embedding: str = ARSegConfig.embedding,
                 num_prefix_tokens: int = ARSegConfig.num_prefix_tokens,
                 feature_stage: int | None = ARSegConfig.feature_stage,
                 prefix_source: str = ARSegConfig.prefix_source, has_regions: bool = ARSegConfig.has_regions,
                 regions: list | None = ARSegConfig.regions,
                 num_samples: int = ARSegConfig.num_samples, top_k: int | None = ARSegConfig.top_k,
                 aux_head: bool = ARSegConfig.aux_head, aux_weight: float = ARSegConfig.aux_weight,
                 aux_full_resolution: bool = ARSegConfig.aux_full_resolution,
                 presence: bool = ARSegConfig.presence, presence_weight: float = ARSegConfig.presence_weight,
                 presence_source: str = ARSegConfig.presence_source,
                 head_guidance: bool = ARSegConfig.head_guidance, deep_supervision: bool = False, **unet_kwargs):
        super().__init__()
        self.patch_size = tuple(int(n) for n in patch_size)
        self.input_channels = int(input_channels)
        self.has_regions, self.num_classes = bool(has_regions), int(num_classes)
        self.num_conditions = self.num_classes if self.has_regions else self.num_classes - 1
        if self.num_conditions < 1:
            raise ValueError(f"num_classes={num_classes} leaves no foreground class to segment "
                             f"(has_regions={has_regions})")
        self.regions = [tuple(int(i) for i in r) for r in regions] if self.has_regions and regions else None
        if self.regions is not None and len(self.regions) != self.num_conditions:
            raise ValueError(f"regions has {len(self.regions)} entries for {self.num_conditions} region outputs")
        if prefix_source not in PREFIX_SOURCES:
            raise ValueError(f"prefix_source must be one of {PREFIX_SOURCES}, got {prefix_source!r}")
        if prefix_source == "decoder" and not aux_head:
            raise ValueError("prefix_source='decoder' embeds the U-Net decoder's features: set aux_head=True")
        if presence_source not in PRESENCE_SOURCES:
            raise ValueError(f"presence_source must be one of {PRESENCE_SOURCES}, got {presence_source!r}")
        if presence_source == "head" and not aux_head:
            raise ValueError("presence_source='head' pools the U-Net head's features: set aux_head=True")
        if head_guidance and not aux_head:
            raise ValueError("head_guidance conditions each scale on the U-Net head: set aux_head=True")
        self.presence_source = presence_source
        self.num_samples, self.aux_weight = int(num_samples), float(aux_weight)
        self.presence_weight = float(presence_weight)
        for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
            if unet_kwargs.get(key) is not None:
                unet_kwargs[key] = _locate(unet_kwargs[key], key)
        unet = _locate(encoder_class_name, "encoder_class_name")(
            input_channels=input_channels, num_classes=self.num_conditions, deep_supervision=False, **unet_kwargs)
        if hasattr(unet, "initialize"):
            unet.apply(unet.initialize)
        self.encoder = unet.encoder
        self.decoder = unet.decoder if aux_head else _DeepSupervisionFlag()
        self.aux_head = bool(aux_head)
        self.aux_full_resolution = bool(aux_full_resolution) and self.aux_head
        self.tokenizer = MaskTokenizer(len(self.patch_size), self.patch_size, **(tokenizer or {}))
        self.tokenizer.requires_grad_(False)
        codebook = self.tokenizer.quantizer.V
        self.top_k = max(1, round(codebook * REFERENCE_TOP_K_SHARE)) if top_k is None else int(top_k)

        spatial, shapes = list(self.patch_size), []
        for stride in self.encoder.strides:
            if any(n % s for n, s in zip(spatial, stride)):
                raise ValueError(f"patch_size {self.patch_size} is not divisible by the encoder strides "
                                 f"{self.encoder.strides}; use the plans' patch size")
            spatial = [n // s for n, s in zip(spatial, stride)]
            shapes.append(tuple(spatial))
        self.prefix_source = prefix_source
        if prefix_source == "decoder":
            # decoder stage s outputs the resolution of encoder stage n_stages - 2 - s; take the coarsest one that
            # is at least as fine as the latent on every axis (pooled to the latent shape when finer)
            latent = self.tokenizer.latent_shape
            matches = [s for s in range(len(shapes) - 1)
                       if all(n >= m for n, m in zip(shapes[len(shapes) - 2 - s], latent))]
            if not matches:
                raise ValueError(f"no U-Net decoder stage is as fine as the tokenizer's latent {latent}; use "
                                 f"prefix_source='encoder'")
            self.feature_stage = matches[0]
            feature_shape = latent
            channels = self.encoder.output_channels[len(shapes) - 2 - self.feature_stage]
            num_prefix_tokens = int(torch.Size(feature_shape).numel())
        else:
            if feature_stage is None:
                feature_stage = max([0] + [i for i, s in enumerate(shapes)
                                           if torch.Size(s).numel() >= num_prefix_tokens])
            self.feature_stage = int(feature_stage) % len(shapes)
            feature_shape = shapes[self.feature_stage]
            channels = self.encoder.output_channels[self.feature_stage]
        self.transformer = BlockCausalTransformer(num_prefix_tokens, self.tokenizer.scales,
                                                  self.tokenizer.quantizer.C, self.tokenizer.quantizer.V,
                                                  self.num_conditions, **(transformer or {}))
        self.embedding = build_embedding(embedding, channels, feature_shape, num_prefix_tokens,
                                         self.transformer.width)
        presence_dim = (self.transformer.width if presence_source == "prefix"
                        else self.decoder.seg_layers[self.head_stage()].in_channels)
        self.presence_head = PresenceHead(presence_dim, self.num_conditions) if presence else None
        self.guidance = (HeadGuidance(self.decoder.seg_layers[self.head_stage()].in_channels, self.tokenizer.scales,
                                      self.transformer.width, len(self.patch_size)) if head_guidance else None)
        for module in self.unused_modules():
            module.requires_grad_(False)

    def unused_modules(self) -> list[nn.Module]:
        """The U-Net parts whose output never reaches the loss (see ``encode_image``): the encoder stages deeper than
        the prefix's without the aux head, else the decoder's stages, transposed convs and segmentation layers past the
        stage it runs to. They stay (stock and earlier checkpoints load as before) but frozen, so that every parameter
        that trains gets a gradient each step, as nnU-Net's DDP (``-num_gpus``) needs."""
        if not self.aux_head:
            return list(self.encoder.stages)[self.feature_stage + 1:]
        last = self.head_stage()
        return ([m for s, m in enumerate(self.decoder.seg_layers) if s != last]
                + list(self.decoder.stages)[last + 1:] + list(self.decoder.transpconvs)[last + 1:])

    def head_stage(self) -> int:
        """The decoder stage whose segmentation layer is the aux head: the last one, or the prefix's stage where the
        decoder prefix stops the decoder there."""
        if self.prefix_source == "decoder" and not self.aux_full_resolution:
            return self.feature_stage
        return len(self.decoder.stages) - 1

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # trained beforehand; frozen here
        return self

    def trainable_parameters(self, freeze_encoder: bool = False) -> list[nn.Parameter]:
        """What the segmentor trains: everything but the tokenizer (and the image encoder when frozen). The frozen
        ``unused_modules`` stay in the list: they never get a gradient, and the optimizer's parameter groups stay
        those of earlier checkpoints (``--c``)."""
        frozen = {id(p) for p in self.tokenizer.parameters()}
        if freeze_encoder:
            frozen |= {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def image_model(self) -> ImageModel:
        """The U-Net parts as a module keyed like a stock nnU-Net checkpoint (shares the parameters)."""
        return ImageModel(self.encoder, self.decoder)

    # ---- shared pieces ----
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != len(self.patch_size) + 2 or tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"input must have the shape (B, C, *{self.patch_size}), got {tuple(x.shape)}; "
                             "AR-Seg works on whole patches of the plans' patch size")

    def encode_image(self, x: torch.Tensor) -> ImageEncoding:
        """The image's prefix, head logits and presence tokens (``ImageEncoding``): the U-Net decoder runs only as far
        as needed, to the prefix's stage (decoder prefix) or to full resolution (encoder prefix, or
        ``aux_full_resolution``)."""
        self._check_input(x)
        skips = self.encoder(x)
        if not self.aux_head:
            prefix_BND = self.embedding(skips[self.feature_stage])
            return ImageEncoding(prefix_BND, None, prefix_BND)
        if self.prefix_source == "encoder":
            _, aux_logits, head_in = decode_to_stage(self.decoder, skips, self.head_stage())
            prefix_BND = self.embedding(skips[self.feature_stage])
        else:
            features, aux_logits, head_in = decode_to_stage(self.decoder, skips, self.head_stage(), self.feature_stage)
            prefix_BND = self.embedding(pool_to(features, self.tokenizer.latent_shape))
        if self.presence_source == "prefix":
            return ImageEncoding(prefix_BND, aux_logits, prefix_BND, head_in)
        # the head's features as tokens, detached: presence reads the segmentation features without reshaping them
        return ImageEncoding(prefix_BND, aux_logits, head_in.detach().flatten(2).transpose(1, 2), head_in)

    def guide_tokens(self, image: ImageEncoding, cls_B: torch.Tensor) -> torch.Tensor | None:
        """The per-scale guidance (B, L, D) of class ``cls_B`` from the image's U-Net head, or None without
        ``head_guidance``."""
        if self.guidance is None:
            return None
        index = cls_B.view(-1, *[1] * (image.aux_logits.ndim - 1)).expand(-1, 1, *image.aux_logits.shape[2:])
        return self.guidance(torch.sigmoid(image.aux_logits.gather(1, index).float()), image.head_features)

    def _cls(self, cls: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if cls is None:
            if self.num_conditions != 1:
                raise ValueError(f"cls is required: this network has {self.num_conditions} condition classes")
            return torch.zeros(batch, dtype=torch.long, device=device)
        return torch.as_tensor(cls, device=device).long().view(-1).expand(batch)

    # ---- training ----
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls: torch.Tensor | None = None,
                with_prediction: bool = False, presence_target: torch.Tensor | None = None):
        """With ``mask``: the training loss dict (see ``segmentor_loss``). Without: eval logits (see
        ``consensus_logits``)."""
        if mask is None:
            return self.consensus_logits(x)
        return self.segmentor_loss(x, mask, self._cls(cls, x.shape[0], x.device), with_prediction, presence_target)

    def teacher_forced_logits(self, image: ImageEncoding, mask: torch.Tensor,
                              cls_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's logits (B, L, V) of every scale's tokens given the mask's own coarser scales, and those
        tokens (B, L), the targets."""
        with torch.no_grad(), tokenizer_precision(mask.device):
            idx_list = self.tokenizer.mask_to_idx(mask.float())
            x_BLC = self.tokenizer.idx_to_teacher_inputs(idx_list)
            target_BL = torch.cat([idx.flatten(1) for idx in idx_list], dim=1)
        return self.transformer(image.prefix_BND, x_BLC, cls_B, guide_BLD=self.guide_tokens(image, cls_B)), target_BL

    def segmentor_loss(self, x: torch.Tensor, mask: torch.Tensor, cls_B: torch.Tensor,
                       with_prediction: bool = False, presence_target_B: torch.Tensor | None = None) -> dict:
        """Token cross-entropy with teacher forcing (method §2.5), + the aux head's Dice + BCE against the mask at
        the head's resolution (the share of each cell covered, where pooled) if on, + the presence head's BCE if on
        (the tokens are then learned from the non-empty masks only) against ``presence_target_B`` (B,) in [0, 1]
        where given, else against whether ``mask`` is non-empty. ``with_prediction`` adds ``prediction``: the
        mask logits (B, 1, *patch) decoded from the per-token argmax (no sampling; empty where the presence head
        says absent)."""
        present_B = mask.flatten(1).amax(1) > 0.5
        image = self.encode_image(x)
        aux_logits, presence_BND = image.aux_logits, image.presence_BND
        logits_BLV, target_BL = self.teacher_forced_logits(image, mask, cls_B)
        ce_BL = F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), target_BL.reshape(-1),
                                reduction="none").view(target_BL.shape)
        hit_BL = (logits_BLV.argmax(-1) == target_BL).float()
        # with a presence head, absent masks teach presence only; a batch without any object has no token loss
        weight_B = present_B.float() if self.presence_head is not None else torch.ones_like(present_B.float())
        norm = weight_B.sum().clamp_min(1.0) * target_BL.shape[1]
        token_ce = (ce_BL * weight_B[:, None]).sum() / norm
        logs = {"token_ce": token_ce.item(), "token_acc": ((hit_BL * weight_B[:, None]).sum() / norm).item()}
        loss = token_ce
        if self.aux_head:
            aux_B1 = aux_logits.gather(1, cls_B.view(-1, *[1] * (mask.ndim - 1)).expand(-1, 1, *aux_logits.shape[2:]))
            aux = binary_dice_bce(aux_B1, pool_to(mask.float(), aux_logits.shape[2:]))  # soft target when pooled
            logs["aux_loss"] = aux.item()
            loss = loss + self.aux_weight * aux
        if self.presence_head is not None:
            presence_B = self.presence_head(presence_BND).gather(1, cls_B.view(-1, 1))[:, 0]
            target_B = present_B.float() if presence_target_B is None else presence_target_B.to(presence_B)
            presence_bce = F.binary_cross_entropy_with_logits(presence_B, target_B)
            logs["presence_bce"] = presence_bce.item()
            loss = loss + self.presence_weight * presence_bce
        logs["loss"] = loss
        if with_prediction:
            with torch.no_grad(), tokenizer_precision(x.device):
                idx_BL = logits_BLV.argmax(-1)
                pred = list(idx_BL.split(self.transformer.lengths, dim=1))
                prediction = self.tokenizer.idx_to_logits([p.reshape(-1, *pn) for p, pn in
                                                           zip(pred, self.tokenizer.scales)])
                if self.presence_head is not None:
                    absent = (presence_B < 0).view(-1, *[1] * (prediction.ndim - 1))
                    prediction = prediction.masked_fill(absent, -1e4)
                logs["prediction"] = prediction
        return logs

    # ---- sampling ----
    def decode_masks(self, f_hat_BCz: torch.Tensor, idx_list: list[torch.Tensor] | None = None,
                     chunk: int = 8) -> torch.Tensor:
        """Binary masks (B, *patch) of f_hats, decoded a few at a time. With the token maps that made them, each
        distinct token map is decoded once (samples often repeat, e.g. every empty mask is one token sequence)."""
        if idx_list is not None:
            tokens_BL = torch.cat([idx.flatten(1) for idx in idx_list], dim=1)
            unique_UL, inverse_B = torch.unique(tokens_BL, dim=0, return_inverse=True)
            if len(unique_UL) < len(tokens_BL):
                first_U = torch.full((len(unique_UL),), len(tokens_BL), dtype=torch.long, device=tokens_BL.device)
                first_U.scatter_reduce_(0, inverse_B, torch.arange(len(tokens_BL), device=tokens_BL.device), "amin")
                return self.decode_masks(f_hat_BCz[first_U])[inverse_B]
        with tokenizer_precision(f_hat_BCz.device):
            return torch.cat([self.tokenizer.decode_f_hat(f.float()) > 0 for f in f_hat_BCz.split(chunk)])[:, 0]

    samplers = tuple(SAMPLERS)  # the names ``sample`` takes (``segmentor/samplers``)
    default_sampler = DEFAULT_SAMPLER

    @torch.no_grad()
    def sample(self, x: torch.Tensor, num_samples: int | None = None, seed: int = 0, classes=None,
               with_scales: bool = False, sampler: str = DEFAULT_SAMPLER, anchor: torch.Tensor | None = None,
               **options) -> dict:
        """Draw N samples per image and class with ``sampler`` (method §3), the image encoded once; ``seed`` fixes
        them. Each sample first draws whether it shows a mask at all (the presence head, where the model has one;
        an absent sample is the empty mask), then the sampler draws the present ones (``segmentor/samplers``):

        - ``"autoregressive"`` (the default, AR-Seg): the transformer draws every scale, the tokenizer decodes;
        - ``"head"`` (a baseline): the U-Net head's probability map at a level of its own per sample;
        - ``"anchored"``: the coarse scales from ``anchor`` (B, num_conditions, *patch) bool, e.g. a stock nnU-Net's
          masks, or without it from the model's own head's mask; the transformer draws the finer ones.

        ``options``: the fields of ``SamplingOptions`` (temperature, presence_temperature, outline_spread,
        anchor_scales, mirror_head, use_cache).

        Returns a dict: ``classes`` (the condition indices K), ``samples`` (B, K, N, *patch) bool and, with
        ``with_scales``, ``scales`` (B, K, S, *patch) bool, the coarse-to-fine masks of the first sample that draws a
        mask (``first_drawn``; scale k decodes its token maps 1..k; empty at every scale when no sample draws).
        Consensus, soft map, uncertainty and logits are derived from the samples in ``nnunet_arseg.consensus``.
        """
        n = self.num_samples if num_samples is None else int(num_samples)
        options = SamplingOptions(**options)
        drawer = get_sampler(sampler)
        drawer.check(self, anchor, options, with_scales)
        classes = list(range(self.num_conditions)) if classes is None else [int(c) for c in classes]
        was_training = self.training
        self.eval()
        try:
            image = self.encode_image(x)
            guide_BK = drawer.prepare(self, x, image, anchor, options)
            presence_BK = self.presence_head(image.presence_BND) if self.presence_head is not None else None
            B, dims = x.shape[0], len(self.patch_size)
            samples, scales = [], []
            for c in classes:
                present_BN = (draw_presence(presence_BK[:, c], n, class_seed(seed, c), options.presence_temperature)
                              if presence_BK is not None
                              else torch.ones(B, n, dtype=torch.bool, device=x.device))
                d = ClassDraw(self, image, c, n, class_seed(seed, c), present_BN, with_scales, options)
                masks_N, partial = drawer.draw(d, None if guide_BK is None else guide_BK[:, c])
                samples.append(masks_N.view(B, n, *self.patch_size))
                if with_scales:  # the shown sample's coarse-to-fine masks, empty at every scale when it is absent
                    scales_BS = torch.stack([self.decode_masks(f) for f in partial], dim=1)
                    scales_BS[:, -1] = masks_N[d.shown_N]
                    scales.append(scales_BS & d.present_N[d.shown_N].view(B, 1, *[1] * dims))
        finally:
            self.train(was_training)
        out = {"classes": classes, "samples": torch.stack(samples, dim=1)}
        if with_scales:
            out["scales"] = torch.stack(scales, dim=1)
        return out

    def head_logits(self, x: torch.Tensor, aux_logits: torch.Tensor) -> torch.Tensor:
        """The U-Net head's logits of ``x`` (``aux_logits``: those of the image as it is) averaged over its mirrorings
        along every combination of spatial axes, as nnU-Net's test-time mirroring (the training flips along every
        axis)."""
        axes = range(2, x.ndim)
        flips = [dims for k in range(1, len(axes) + 1) for dims in itertools.combinations(axes, k)]
        total = aux_logits.float()
        for dims in flips:
            skips = self.encoder(torch.flip(x, dims))
            total = total + torch.flip(decode_to_stage(self.decoder, skips, self.head_stage())[1], dims).float()
        return total / (len(flips) + 1)

    def head_at_patch(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The U-Net head's logits (B, num_conditions, *patch) in fp32: those at the resolution its decoder ran to,
        interpolated to the patch."""
        mode = "bilinear" if len(self.patch_size) == 2 else "trilinear"
        return F.interpolate(aux_logits.float(), size=self.patch_size, mode=mode, align_corners=False)

    def head_masks(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The U-Net head's masks (B, num_conditions, *patch) bool: ``head_at_patch`` thresholded at 0 (probability
        0.5)."""
        return self.head_at_patch(aux_logits) > 0

    # what the eval forward draws: set by a predictor around its sliding window (``nnunet_arseg.sampling_window``)
    eval_sampling = None

    def eval_settings(self) -> tuple[int, int, float]:
        """N, base seed and temperature factor of the eval forward: those of ``eval_sampling`` where a predictor set
        them, else ``nnUNet_ARSEG_NUM_SAMPLES`` / ``_SEED`` / ``_TEMPERATURE`` (for the stock ``nnUNetv2_predict``),
        else the stored default N, seed 0 and temperature 1."""
        request = self.eval_sampling
        n = getattr(request, "num_samples", None)
        seed = getattr(request, "seed", None)
        temperature = getattr(request, "temperature", None)
        n = env.num_samples(self.num_samples) if n is None else int(n)
        seed = env.sampling_seed() if seed is None else int(seed)
        temperature = env.sampling_temperature() if temperature is None else float(temperature)
        return n, seed, temperature

    def anchor_masks(self, labels_BL: torch.Tensor) -> torch.Tensor:
        """Anchor masks (B, num_conditions, *patch) from a label map's one-hot channels (B, L, *patch), one per
        foreground label in nnU-Net's order: the labels themselves, or each region's union of its labels."""
        if not self.has_regions:
            if labels_BL.shape[1] != self.num_conditions:
                raise ValueError(f"the input has {labels_BL.shape[1]} channel(s) beyond the image's "
                                 f"{self.input_channels}; as an anchor label map they must be one per foreground "
                                 f"label ({self.num_conditions})")
            return labels_BL
        if self.regions is None:
            raise ValueError("this model does not record the labels of its regions (trained with an earlier "
                             "nnunet_arseg), so an anchor label map cannot be turned into region masks; retrain it")
        labels = sorted({i for r in self.regions for i in r} - {0})
        if labels_BL.shape[1] != len(labels):
            raise ValueError(f"the input has {labels_BL.shape[1]} channel(s) beyond the image's {self.input_channels}; "
                             f"as an anchor label map they must be one per foreground label ({len(labels)}: {labels})")
        return torch.stack([labels_BL[:, [labels.index(i) for i in r if i != 0]].any(1) for r in self.regions], 1)

    def eval_sampler(self, with_anchor: bool = False) -> str:
        """The sampler of the eval forward: ``eval_sampling.sampler`` where a predictor set it, else
        ``nnUNet_ARSEG_SAMPLER``, else ``"anchored"`` for an input with anchor channels and ``default_sampler``
        for one without."""
        name = getattr(self.eval_sampling, "sampler", None) or env.sampler()
        if name is None:
            return "anchored" if with_anchor else self.default_sampler
        if name not in self.samplers:
            raise ValueError(f"AR-Seg sampling: sampler {name!r} (nnUNet_ARSEG_SAMPLER or the predictor) must be one "
                             f"of {list(self.samplers)}")
        if with_anchor and name != "anchored":
            raise ValueError(f"the input carries anchor masks (-prev_stage_predictions, --anchor), which only the "
                             f"'anchored' sampler takes, but the sampler is {name!r}")
        return name

    def consensus_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval output (B, num_classes, *patch): the consensus logits of N samples per image (``consensus.py``), so
        nnU-Net's export writes the consensus.

        Each image draws its samples with a seed made of the base seed and the image's own content
        (``content_seed``): whoever tiles a case (``nnUNetv2_predict``, ``nnUNetv2_arseg_predict``, the final
        validation) draws the same samples for the same tile. A recorder in ``eval_sampling`` receives them.

        The sampler is ``eval_sampler``'s. Channels beyond the image's are an anchor label map, one channel per
        foreground label: nnU-Net's predictor appends them from ``folder_with_segs_from_prev_stage``
        (``nnUNetv2_arseg_predict --anchor``); see ``sample`` and ``anchor_masks``. The other options come from
        ``eval_sampling`` where set, else from the environment (``env.py``: ``nnUNet_ARSEG_PRESENCE_TEMPERATURE``,
        ``_OUTLINE_SPREAD``, ``_MIRROR_HEAD``).
        """
        n, seed, temperature = self.eval_settings()
        request = self.eval_sampling
        recorder = getattr(request, "recorder", None)
        with_anchor = x.shape[1] > self.input_channels
        sampler = self.eval_sampler(with_anchor)
        mirror_head = getattr(request, "mirror_head", None)
        presence_temperature = getattr(request, "presence_temperature", None)
        outline_spread = getattr(request, "outline_spread", None)
        options = {"temperature": temperature, "anchor_scales": getattr(request, "anchor_scales", None),
                   "mirror_head": env.mirror_head() if mirror_head is None else mirror_head,
                   "presence_temperature": (env.presence_temperature() if presence_temperature is None
                                            else presence_temperature),
                   "outline_spread": env.outline_spread(OUTLINE_SPREAD) if outline_spread is None else outline_spread}
        anchor = self.anchor_masks(x[:, self.input_channels:] > 0.5) if with_anchor else None
        logits = []
        for b, x_1 in enumerate(x.split(1)):  # the seed is of the whole input, anchor channels included
            with_scales = recorder is not None and recorder.wants_scales
            out = self.sample(x_1[:, :self.input_channels], n, content_seed(seed, x_1), with_scales=with_scales,
                              sampler=sampler, anchor=None if anchor is None else anchor[b:b + 1], **options)
            if recorder is not None:
                recorder.record(out["samples"][0], out["scales"][0] if with_scales else None)
            logits.append(consensus_logits(out["samples"], self.has_regions, sample_dim=2, class_dim=1))
        return torch.cat(logits)


def class_seed(seed: int, cls: int) -> int:
    """The seed of one condition class's draws, from the image's seed (``content_seed`` in the eval forward)."""
    return int(seed) * 1009 + int(cls)


def content_seed(seed: int, x: torch.Tensor) -> int:
    """A sampling seed (< 2**48) from a base seed and the bytes of one input image."""
    digest = hashlib.blake2b(x.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=6,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


def binary_dice_bce(logits_B1: torch.Tensor, mask_B1: torch.Tensor) -> torch.Tensor:
    """Soft Dice (per sample) + BCE on one binary channel, in fp32."""
    logits, target = logits_B1.float().flatten(1), mask_B1.float().flatten(1)
    p = torch.sigmoid(logits)
    dice_B = (2 * (p * target).sum(1) + 1e-6) / (p.sum(1) + target.sum(1) + 1e-6)
    return 1 - dice_B.mean() + F.binary_cross_entropy_with_logits(logits, target)


def wrap_stock_architecture(stock_architecture: dict, network_class_name: str, max_features_per_stage: int | None,
                            **network_kwargs) -> dict:
    """The plans' stock ``architecture`` entry turned into that of a network wrapping the plans' U-Net: the U-Net
    kwargs at the top level (so ``_kw_requires_import`` keeps working; widths capped by ``max_features_per_stage``),
    the U-Net class as ``encoder_class_name``, plus ``network_kwargs``."""
    for key in ("network_class_name", "arch_kwargs", "_kw_requires_import"):
        if key not in stock_architecture:
            raise ValueError(f"the stock architecture entry has no {key!r}; "
                             "pass plans['configurations'][c]['architecture']")
    arch_kwargs = copy.deepcopy(stock_architecture["arch_kwargs"])
    arch_kwargs.pop("deep_supervision", None)
    if max_features_per_stage is not None:
        arch_kwargs["features_per_stage"] = [min(int(f), int(max_features_per_stage))
                                             for f in arch_kwargs["features_per_stage"]]
    arch_kwargs.update(encoder_class_name=stock_architecture["network_class_name"], **network_kwargs)
    try:
        json.dumps(arch_kwargs)
    except TypeError as e:
        raise TypeError(f"{network_class_name} arch_kwargs must be JSON-serialisable for the plans file: {e}") from None
    return {"network_class_name": network_class_name, "arch_kwargs": arch_kwargs,
            "_kw_requires_import": list(stock_architecture["_kw_requires_import"])}


def build_arseg_architecture(stock_architecture: dict, patch_size, preset_name: str = "reference",
                             **overrides) -> dict:
    """Turn the plans' stock ``architecture`` entry into AR-Seg's (``wrap_stock_architecture`` with the network's own
    kwargs, ``config.preset(preset_name, **overrides).arch_kwargs()``)."""
    config = preset(preset_name, **overrides)
    return wrap_stock_architecture(stock_architecture, NETWORK_CLASS_NAME, config.max_features_per_stage,
                                   patch_size=[int(n) for n in patch_size], **config.arch_kwargs())
