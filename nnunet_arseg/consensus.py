"""N binary samples -> consensus, soft map, uncertainty (method §3.2), multi-class fusion (method §3.2), and the logits
that make nnU-Net's export reproduce them.

The one place where anything is derived from samples: the network's eval forward, the predictor's extra outputs and
the final validation all call these. Pure torch functions; the sample and class axes are named arguments.
"""
from __future__ import annotations

import torch

__all__ = ["vote_frequency", "majority_vote", "binary_entropy_bits", "uncertainty", "fuse_labels", "fuse_regions",
           "label_logits_from_frequencies", "region_logits_from_frequencies", "consensus_logits", "sample_logits",
           "summarize"]


def vote_frequency(samples: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Soft map: the fraction of samples that mark each pixel (float32)."""
    return samples.float().mean(dim)


def majority_vote(samples: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Consensus: strict majority (> N / 2) of the binary samples; ties go to background (bool)."""
    return 2 * samples.long().sum(dim) > samples.shape[dim]


def binary_entropy_bits(freq: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli with probability ``freq`` (0 at 0 and 1, 1 at 0.5)."""
    p = freq.float().clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, device=p.device))


def uncertainty(samples: torch.Tensor, sample_dim: int = 1, class_dim: int = 0) -> torch.Tensor:
    """Uncertainty map: the entropy of each class's vote frequency, the largest over the classes (> 0 exactly where
    the samples disagree)."""
    entropy = binary_entropy_bits(vote_frequency(samples, sample_dim))
    return entropy.amax(class_dim if class_dim < sample_dim else class_dim - 1)


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


def consensus_logits(samples: torch.Tensor, has_regions: bool, sample_dim: int = 1, class_dim: int = 0) -> torch.Tensor:
    """Logits of the consensus (one channel per nnU-Net output head, on ``class_dim``), from binary samples with one
    entry per foreground class or region on ``class_dim`` (``class_dim < sample_dim``): nnU-Net's export of them is
    the fused label map (labels) or each region's strict majority (regions)."""
    freq = vote_frequency(samples, sample_dim)
    return region_logits_from_frequencies(freq) if has_regions else label_logits_from_frequencies(freq, class_dim)


def sample_logits(sample_K: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Logits (one channel per output head, first axis) whose nnU-Net export is this one sample (K, *spatial): +-1 per
    region, or one-hot of the label map that paints foreground class k with head k + 1, later classes over earlier."""
    if has_regions:
        return sample_K.float() * 2 - 1
    label_map = torch.zeros(sample_K.shape[1:], dtype=torch.long)
    for k in range(sample_K.shape[0]):
        label_map[sample_K[k].bool()] = k + 1
    return torch.nn.functional.one_hot(label_map, sample_K.shape[0] + 1).movedim(-1, 0).float()


def summarize(samples_KN: torch.Tensor, has_regions: bool) -> dict[str, torch.Tensor]:
    """Everything a case's samples (K, N, *spatial) give: ``consensus`` (K, *) each class's strict majority,
    ``soft`` (K, *) vote frequency, ``uncertainty`` (*) max entropy over classes, ``fused`` the label map (labels,
    method §3.2) or the region consensus (K, *)."""
    soft = vote_frequency(samples_KN, 1)
    return {"consensus": majority_vote(samples_KN, 1), "soft": soft,
            "uncertainty": binary_entropy_bits(soft).amax(0),
            "fused": fuse_regions(soft) if has_regions else fuse_labels(soft, class_dim=0)}
