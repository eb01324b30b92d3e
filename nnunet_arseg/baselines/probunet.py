"""``ProbUNetNetwork``: the Probabilistic U-Net (Kohl et al., NeurIPS 2018, "A Probabilistic U-Net for Segmentation
of Ambiguous Images") over the plans' U-Net, a baseline that samples through AR-Seg's predictor (docs/method.md §6).

A prior net (image) and a posterior net (image + mask) each give an axis-aligned Gaussian over a latent z; fcomb,
three 1x1 convolutions, combines the U-Net's last decoder features with z broadcast over space, and the U-Net's own
1x1 segmentation layer turns the result into logits. Training: reconstruction of the drawn rater's mask with z from
the posterior + beta * KL(posterior || prior). Sampling: z from the prior, the image encoded once for all N samples.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from nnunet_arseg.consensus import consensus_logits
from nnunet_arseg.network import ARSegNetwork, _locate, content_seed, decode_to_stage, wrap_stock_architecture

__all__ = ["ProbUNetNetwork", "LatentGaussian", "build_probunet_architecture", "PROBUNET_CLASS_NAME"]

PROBUNET_CLASS_NAME = "nnunet_arseg.baselines.probunet.ProbUNetNetwork"


def _unet(encoder_class, input_channels: int, num_classes: int, unet_kwargs: dict) -> nn.Module:
    """The plans' U-Net class with its own initialisation."""
    unet = encoder_class(input_channels=input_channels, num_classes=num_classes, deep_supervision=False, **unet_kwargs)
    if hasattr(unet, "initialize"):
        unet.apply(unet.initialize)
    return unet


class LatentGaussian(nn.Module):
    """The prior or posterior net: an encoder of the plans' U-Net class (its own weights) whose deepest features,
    averaged over space, give the mean and log standard deviation of an axis-aligned Gaussian over z (1x1 conv)."""

    def __init__(self, encoder_class, input_channels: int, latent_dim: int, unet_kwargs: dict):
        super().__init__()
        self.encoder = _unet(encoder_class, input_channels, 1, unet_kwargs).encoder
        self.to_params = nn.Linear(self.encoder.output_channels[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> Independent:
        f_BF = self.encoder(x)[-1].flatten(2).mean(2)
        mu_BL, log_sigma_BL = self.to_params(f_BF).float().chunk(2, dim=1)
        return Independent(Normal(mu_BL, log_sigma_BL.exp()), 1)


class ProbUNetNetwork(nn.Module):
    """The Probabilistic U-Net for one nnU-Net configuration, with ``ARSegNetwork``'s eval contract (design.md,
    "Network contract"): eval ``network(x)`` returns the consensus logits of N samples, ``sample`` draws them.

    Args:
        input_channels, num_classes: from nnU-Net (``num_classes`` = ``label_manager.num_segmentation_heads``).
        encoder_class_name: the plans' own U-Net class: the segmentation U-Net, and the encoders of the prior and
            posterior nets (the same kwargs; the posterior has one more input channel per foreground class/region).
        latent_dim: size of z (6, the paper's); fcomb_convs: 1x1 convolutions of fcomb before the segmentation
            layer (3, the paper's); beta: weight of the KL term (1, the paper's).
        has_regions: nnU-Net regions (sigmoid per region) or labels (softmax over the heads).
        num_samples: default N of the eval forward.
        deep_supervision: accepted from nnU-Net; unused.
        **unet_kwargs: the plans' U-Net kwargs (conv_op, n_stages, features_per_stage, strides, ...).
    """

    def __init__(self, input_channels: int, num_classes: int, encoder_class_name: str =
                 "dynamic_network_architectures.architectures.unet.PlainConvUNet", latent_dim: int = 6,
                 fcomb_convs: int = 3, beta: float = 1.0, has_regions: bool = False, num_samples: int = 16,
                 deep_supervision: bool = False, **unet_kwargs):
        super().__init__()
        self.input_channels, self.num_classes, self.has_regions = int(input_channels), int(num_classes), has_regions
        self.num_conditions = self.num_classes if has_regions else self.num_classes - 1
        if self.num_conditions < 1:
            raise ValueError(f"num_classes={num_classes} leaves no foreground class to segment "
                             f"(has_regions={has_regions})")
        self.latent_dim, self.beta, self.num_samples = int(latent_dim), float(beta), int(num_samples)
        for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
            if unet_kwargs.get(key) is not None:
                unet_kwargs[key] = _locate(unet_kwargs[key], key)
        unet_class = _locate(encoder_class_name, "encoder_class_name")
        unet = _unet(unet_class, input_channels, num_classes, unet_kwargs)
        self.encoder, self.decoder = unet.encoder, unet.decoder
        self.prior = LatentGaussian(unet_class, input_channels, self.latent_dim, unet_kwargs)
        self.posterior = LatentGaussian(unet_class, input_channels + self.num_conditions, self.latent_dim, unet_kwargs)
        width = self.encoder.output_channels[0]
        conv_op = unet_kwargs["conv_op"]
        layers = []
        for i in range(int(fcomb_convs)):
            layers += [conv_op(width + self.latent_dim if i == 0 else width, width, kernel_size=1), nn.ReLU()]
        self.fcomb = nn.Sequential(*layers)

    # ---- shared pieces ----
    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, Independent]:
        """The U-Net's last decoder features (B, F, *spatial) and the prior over z."""
        features = decode_to_stage(self.decoder, self.encoder(x), len(self.decoder.stages) - 1)[0]
        return features, self.prior(x)

    def combine(self, features: torch.Tensor, z_BL: torch.Tensor) -> torch.Tensor:
        """fcomb: logits (B, num_classes, *spatial) of the features with z broadcast over space."""
        z = z_BL.to(features.dtype).view(*z_BL.shape, *[1] * (features.ndim - 2)).expand(-1, -1, *features.shape[2:])
        return self.decoder.seg_layers[-1](self.fcomb(torch.cat((features, z), dim=1)))

    def masks_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """One binary mask per foreground class or region (B, num_conditions, *spatial): the argmax label map's
        classes (labels) or each region's logit > 0."""
        if self.has_regions:
            return logits > 0
        labels = logits.argmax(1, keepdim=True)
        return labels == torch.arange(1, self.num_classes, device=logits.device).view(1, -1, *[1] * (logits.ndim - 2))

    def reconstruction_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (labels) or BCE (regions) summed over the pixels, averaged over the batch (the ELBO's)."""
        logits = logits.float()
        if self.has_regions:
            ce = F.binary_cross_entropy_with_logits(logits, mask.float(), reduction="none")
        else:  # the masks of the labels do not overlap: label k + 1 where mask k is set, else background
            k = torch.arange(1, self.num_conditions + 1, device=mask.device).view(1, -1, *[1] * (mask.ndim - 2))
            ce = F.cross_entropy(logits, (mask.long() * k).amax(1), reduction="none")
        return ce.flatten(1).sum(1).mean()

    # ---- training ----
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, with_prediction: bool = False):
        """With ``mask`` (B, num_conditions, *spatial), one binary mask per foreground class/region: the training
        loss dict (see ``elbo_loss``). Without: eval logits (see ``consensus_logits``)."""
        if mask is None:
            return self.consensus_logits(x)
        return self.elbo_loss(x, mask, with_prediction)

    def elbo_loss(self, x: torch.Tensor, mask: torch.Tensor, with_prediction: bool = False) -> dict:
        """``loss`` = reconstruction of ``mask`` with z drawn from the posterior + beta * KL(posterior || prior)
        (``recon``, ``kl`` logged). ``with_prediction`` adds ``prediction``: the logits at the prior's mean z."""
        features, prior = self.encode_image(x)
        posterior = self.posterior(torch.cat((x, mask.to(x.dtype)), dim=1))
        recon = self.reconstruction_loss(self.combine(features, posterior.rsample()), mask)
        kl = kl_divergence(posterior, prior).mean()
        loss = recon + self.beta * kl
        out = {"loss": loss, "recon": recon.item(), "kl": kl.item()}
        if with_prediction:
            with torch.no_grad():
                out["prediction"] = self.combine(features, prior.mean)
        return out

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, x: torch.Tensor, num_samples: int | None = None, seed: int = 0, classes=None,
               with_scales: bool = False, temperature: float = 1.0, anchor: torch.Tensor | None = None,
               anchor_scales: int | None = None, chunk: int = 8) -> dict:
        """Draw N samples per image, the image encoded once: z = mu + temperature * sigma * eps of the prior, eps
        from a generator seeded with ``seed`` (on the CPU, so a seed gives the same z on every device).

        Returns ``classes`` (the condition indices K) and ``samples`` (B, K, N, *spatial) bool. ``with_scales`` and
        ``anchor`` are AR-Seg's (coarse-to-fine scales): refused here.
        """
        if with_scales or anchor is not None or anchor_scales is not None:
            raise ValueError("the Probabilistic U-Net draws each mask at once: it has no coarse-to-fine scales to "
                             "show (with_scales, --save_scales) or to take from an anchor mask (anchor, --anchor)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        n = self.num_samples if num_samples is None else int(num_samples)
        classes = list(range(self.num_conditions)) if classes is None else [int(c) for c in classes]
        was_training = self.training
        self.eval()
        try:
            features, prior = self.encode_image(x)
            eps_BNL = torch.randn(x.shape[0], n, self.latent_dim, generator=torch.Generator().manual_seed(int(seed)))
            z_BNL = prior.mean[:, None] + temperature * prior.stddev[:, None] * eps_BNL.to(x.device)
            samples = []
            for f_1, z_NL in zip(features.split(1), z_BNL):
                masks = [self.masks_from_logits(self.combine(f_1.expand(len(z), *f_1.shape[1:]), z))
                         for z in z_NL.split(chunk)]
                samples.append(torch.cat(masks)[:, classes].transpose(0, 1))
        finally:
            self.train(was_training)
        return {"classes": classes, "samples": torch.stack(samples)}

    # what the eval forward draws: set by a predictor around its sliding window (``nnunet_arseg.sampling_window``)
    eval_sampling = None
    # N, base seed and temperature factor of the eval forward, read as AR-Seg reads them (the factor scales sigma)
    eval_settings = ARSegNetwork.eval_settings
    # one way to sample: z from the prior net (the sampler recorded with a prediction)
    samplers = ("prior",)
    default_sampler = "prior"
    eval_sampler = ARSegNetwork.eval_sampler

    def consensus_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval output (B, num_classes, *spatial): the consensus logits of N samples per image (``consensus.py``),
        each image's z drawn with a seed made of the base seed and the image's content (``content_seed``), as
        ``ARSegNetwork`` does; a recorder in ``eval_sampling`` receives the samples."""
        if x.shape[1] != self.input_channels:
            raise ValueError(f"the input has {x.shape[1]} channels, the image {self.input_channels}: the Probabilistic "
                             f"U-Net cannot sample around anchor masks (-prev_stage_predictions, --anchor)")
        n, seed, temperature = self.eval_settings()
        recorder = getattr(self.eval_sampling, "recorder", None)
        logits = []
        for x_1 in x.split(1):
            samples = self.sample(x_1, n, content_seed(seed, x_1), temperature=temperature)["samples"]
            if recorder is not None:
                recorder.record(samples[0])
            logits.append(consensus_logits(samples, self.has_regions, sample_dim=2, class_dim=1))
        return torch.cat(logits)


def build_probunet_architecture(stock_architecture: dict, max_features_per_stage: int | None = None,
                                **network_kwargs) -> dict:
    """The plans' stock ``architecture`` entry turned into the Probabilistic U-Net's (``wrap_stock_architecture``
    with ``network_kwargs``: latent_dim, beta, has_regions, num_samples, ...)."""
    return wrap_stock_architecture(stock_architecture, PROBUNET_CLASS_NAME, max_features_per_stage, **network_kwargs)
