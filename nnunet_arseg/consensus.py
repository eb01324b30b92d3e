"""N binary samples -> consensus, soft map, uncertainty (reference §3.3), multi-class fusion (§3.4), and the logits
that make nnU-Net's export reproduce them. Pure torch functions; the sample axis is a named argument.
"""
from __future__ import annotations

import torch

__all__ = ["vote_frequency", "majority_vote", "binary_entropy_bits", "fuse_labels", "fuse_regions",
           "label_logits_from_frequencies", "region_logits_from_frequencies"]


def vote_frequency(samples: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Soft map: the fraction of samples that mark each pixel (float32)."""
    return samples.float().mean(dim)


def majority_vote(samples: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Consensus: strict majority (> N / 2) of the binary samples; ties go to background (bool)."""
    return 2 * samples.long().sum(dim) > samples.shape[dim]


def binary_entropy_bits(freq: torch.Tensor) -> torch.Tensor:
    """Uncertainty: entropy in bits of a Bernoulli with probability ``freq`` (0 at 0 and 1, 1 at 0.5)."""
    p = freq.float().clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, device=p.device))


def fuse_labels(freq: torch.Tensor, class_dim: int = 0) -> torch.Tensor:
    """Label map from per-foreground-class vote fractions: argmax class (1-based; the first on ties) where its
    fraction is > 0.5, else 0 (background)."""
    best, arg = freq.max(class_dim)
    return torch.where(best > 0.5, arg + 1, torch.zeros_like(arg))


def fuse_regions(freq: torch.Tensor) -> torch.Tensor:
    """Regions are independent: each one's strict majority."""
    return freq > 0.5


def label_logits_from_frequencies(freq: torch.Tensor, class_dim: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """Logits (background first) whose softmax + argmax equal ``fuse_labels``.

    q = [1 - max_c p_c, p_1, ..., p_C] normalised to sum 1 (so with one class softmax gives back [1 - p, p]);
    background wins iff max_c p_c <= 0.5 (argmax takes the first index on ties). Clamped at ``eps`` so the values
    stay finite in nnU-Net's fp16 accumulation.
    """
    bg = 1 - freq.amax(class_dim, keepdim=True)
    q = torch.cat((bg, freq), dim=class_dim).float()
    q = q / q.sum(class_dim, keepdim=True).clamp_min(1e-12)
    return torch.log(q.clamp_min(eps))


def region_logits_from_frequencies(freq: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """logit(p), clamped to [eps, 1 - eps]: sigmoid(...) > 0.5 iff p > 0.5 (strict majority)."""
    p = freq.float().clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
