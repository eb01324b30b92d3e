"""consensus.py, the one owner of what samples give: consensus, soft map, uncertainty and the logits that nnU-Net's own
export turns into the consensus or into one sample."""
from __future__ import annotations

import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_arseg.consensus import (consensus_logits, fuse_labels, majority_vote, sample_logits, summarize,
                                    uncertainty, vote_frequency)

LABELS = LabelManager({"background": 0, "edema": 1, "tumour": 2}, regions_class_order=None)
REGIONS = LabelManager({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
                       regions_class_order=[1, 2, 3])


def random_samples(K: int, N: int, shape=(6, 7), seed: int = 0, p: float = 0.5) -> torch.Tensor:
    return torch.rand((K, N, *shape), generator=torch.Generator().manual_seed(seed)) < p


def test_consensus_logits_export_to_the_fused_majority():
    for N in (1, 4, 5):  # odd and even N (ties go to background)
        samples = random_samples(2, N, seed=N)
        seg = LABELS.convert_logits_to_segmentation(consensus_logits(samples, has_regions=False).half().float())
        assert torch.equal(torch.as_tensor(seg), fuse_labels(vote_frequency(samples, 1), class_dim=0))
        one = samples[:1]  # one foreground class: the strict majority of the samples
        seg = LABELS.convert_logits_to_segmentation(torch.cat([consensus_logits(one, False), torch.full(
            (1, *one.shape[2:]), -30.0)]))
        assert torch.equal(torch.as_tensor(seg) == 1, majority_vote(one[0], 0))
    samples = random_samples(3, 5, seed=1)
    probs = REGIONS.apply_inference_nonlin(consensus_logits(samples, has_regions=True))
    assert torch.equal(torch.as_tensor(probs) > 0.5, majority_vote(samples, 1))


def test_batched_layout_gives_the_same_logits():
    samples_BKN = torch.stack([random_samples(2, 4, seed=s) for s in (3, 4)])
    batched = consensus_logits(samples_BKN, False, sample_dim=2, class_dim=1)
    assert torch.equal(batched[1], consensus_logits(samples_BKN[1], False))


def test_sample_logits_export_each_sample():
    sample = random_samples(2, 1, seed=5)[:, 0]  # (K, *spatial)
    seg = torch.as_tensor(LABELS.convert_logits_to_segmentation(sample_logits(sample, has_regions=False)))
    expected = torch.where(sample[1], 2, torch.where(sample[0], 1, 0))  # later classes painted over earlier ones
    assert torch.equal(seg, expected) and set(seg.unique().tolist()) == {0, 1, 2}
    regions = random_samples(3, 1, seed=6)[:, 0]
    probs = torch.as_tensor(REGIONS.apply_inference_nonlin(sample_logits(regions, has_regions=True)))
    assert torch.equal(probs > 0.5, regions)


def test_uncertainty_is_positive_exactly_where_samples_disagree():
    samples = random_samples(2, 6, seed=7, p=0.8)
    samples[:, :, :2] = True  # full agreement on the first two rows
    unc = uncertainty(samples, sample_dim=1, class_dim=0)
    disagree = (samples.any(1) & ~samples.all(1)).any(0)
    assert disagree.any() and (~disagree).any()
    assert torch.equal(unc > 0, disagree)
    torch.testing.assert_close(uncertainty(samples.movedim(0, 1), sample_dim=0, class_dim=1), unc)
    summary = summarize(samples, has_regions=False)
    assert torch.equal(summary["uncertainty"], unc)
    assert torch.equal(summary["consensus"], majority_vote(samples, 1))
    assert torch.equal(summary["fused"], fuse_labels(vote_frequency(samples, 1), class_dim=0))
    assert torch.equal(summarize(samples, has_regions=True)["fused"], vote_frequency(samples, 1) > 0.5)
