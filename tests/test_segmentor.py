"""Segmentor pieces: block-causal transformer, seeded sampling with/without KV cache, consensus, embedding."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_arseg.consensus import (binary_entropy_bits, fuse_labels, label_logits_from_frequencies, majority_vote,
                                    region_logits_from_frequencies, vote_frequency)
from nnunet_arseg.segmentor.embedding import LinearEmbedding, SVDEmbedding
from nnunet_arseg.segmentor.guidance import HeadGuidance, unshuffle
from nnunet_arseg.segmentor.sampling import REFERENCE_TEMPERATURES, sample_token_maps, temperature_schedule
from nnunet_arseg.segmentor.transformer import BlockCausalTransformer
from nnunet_arseg.tokenizer import MaskTokenizer

TINY_TOKENIZER = dict(ch=8, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=16, codebook_size=64, code_dim=8)


@pytest.fixture(scope="module")
def tokenizer_and_transformer():
    torch.manual_seed(0)
    tok = MaskTokenizer(2, (32, 32), **TINY_TOKENIZER).eval()  # latent 4x4, scales 1..4
    # gamma init 1 so every block really mixes tokens (VAR's 1e-5 would make the checks below near-trivial)
    tr = BlockCausalTransformer(6, tok.scales, tok.quantizer.C, tok.quantizer.V, num_conditions=2, width=32, depth=2,
                                heads=4, dropout=0.0, init_adaln_gamma=1.0).eval()
    return tok, tr


def test_attention_mask_is_block_causal(tokenizer_and_transformer):
    _, tr = tokenizer_and_transformer
    levels = tr.levels_T
    assert levels.tolist() == [0] * 6 + [1] + [2] * 4 + [3] * 9 + [4] * 16
    mask = tr.mask_TT
    assert mask[:6, :6].all() and not mask[:6, 6:].any()  # the prefix sees itself only
    assert mask[7:11, :11].all() and not mask[7:11, 11:].any()  # scale 2 sees prefix, scales 1-2


def test_changing_scale_k_changes_no_logit_of_earlier_scales(tokenizer_and_transformer):
    tok, tr = tokenizer_and_transformer
    torch.manual_seed(1)
    masks = (torch.rand(2, 1, 32, 32) > 0.6).float()
    idx = tok.mask_to_idx(masks)
    prefix, cls = torch.randn(2, 6, 32), torch.tensor([0, 1])
    starts = [0] + list(torch.tensor(tr.lengths).cumsum(0))
    with torch.no_grad():
        base = tr(prefix, tok.idx_to_teacher_inputs(idx), cls)
        for k in range(len(tok.scales) - 1):  # change the token map of scale k (0-based)
            changed = [i.clone() for i in idx]
            changed[k] = (changed[k] + 1 + torch.arange(changed[k].numel()).view(changed[k].shape)) % tok.quantizer.V
            logits = tr(prefix, tok.idx_to_teacher_inputs(changed), cls)
            end_k = int(starts[k + 1])  # positions predicting scales 0..k see only maps < k
            torch.testing.assert_close(logits[:, :end_k], base[:, :end_k], rtol=0, atol=1e-5)
            assert (logits[:, end_k:] - base[:, end_k:]).abs().max() > 1e-3
        # the image prefix and the class reach every position
        assert (tr(torch.randn_like(prefix), tok.idx_to_teacher_inputs(idx), cls) - base).abs().amax(-1).gt(1e-4).all()
        assert (tr(prefix, tok.idx_to_teacher_inputs(idx), 1 - cls) - base)[:, 0].abs().max() > 1e-3


def test_kv_cache_gives_the_same_samples_and_seeds_matter(tokenizer_and_transformer):
    tok, tr = tokenizer_and_transformer
    prefix, cls = torch.randn(2, 6, 32), torch.tensor([1, 0])

    def draw(seed, cache):
        idx, f_hat, partial = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, seed, top_k=20, use_cache=cache,
                                                keep_rows=torch.tensor([0, 5]))
        return idx, f_hat, partial

    cached, f_cached, partial = draw(3, True)
    uncached, f_uncached, _ = draw(3, False)
    assert [tuple(i.shape) for i in cached] == [(10, *pn) for pn in tok.scales]
    for a, b in zip(cached, uncached):
        assert torch.equal(a, b)
    torch.testing.assert_close(f_cached, f_uncached)
    assert len(partial) == len(tok.scales) and partial[-1].shape[0] == 2
    torch.testing.assert_close(partial[-1], f_cached[::5])
    again, _, _ = draw(3, True)
    other, _, _ = draw(4, True)
    assert all(torch.equal(a, b) for a, b in zip(cached, again))
    assert not all(torch.equal(a, b) for a, b in zip(cached, other))
    assert all(b.attn.cached_k is None and not b.attn.caching for b in tr.blocks)  # cache switched off again


def test_an_anchor_fixes_the_coarse_scales_of_its_rows_only(tokenizer_and_transformer):
    tok, tr = tokenizer_and_transformer
    prefix, cls = torch.randn(2, 6, 32), torch.tensor([1, 0])
    free, _, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20)
    torch.manual_seed(2)
    given = tok.mask_to_idx((torch.rand(10, 1, 32, 32) > 0.5).float())  # a token map per row
    rows = torch.arange(10) >= 5  # the samples of image 1
    for num in (len(tok.scales), 2):
        idx, _, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20, anchor=(given[:num], rows))
        uncached, _, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20, use_cache=False,
                                           anchor=(given[:num], rows))
        assert all(torch.equal(a, b) for a, b in zip(idx, uncached))
        for si in range(len(tok.scales)):
            assert torch.equal(idx[si][~rows], free[si][~rows])  # the other rows draw as without an anchor
            if si < num:
                assert torch.equal(idx[si][rows], given[si][rows])
    # with 2 anchored scales the finer ones are drawn (given the anchor), not copied
    assert any(not torch.equal(idx[si][rows], given[si][rows]) for si in range(2, len(tok.scales)))


def test_active_rows_draw_as_in_a_run_for_all_rows(tokenizer_and_transformer):
    """``active``: the transformer runs on some rows (the present samples); theirs are the draws of a run for all."""
    tok, tr = tokenizer_and_transformer
    prefix, cls = torch.randn(2, 6, 32), torch.tensor([1, 0])
    free, f_free, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20)
    active = torch.tensor([True, False, False, True, True, False, True, False, False, False])
    for cache in (True, False):
        idx, f_hat, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20, use_cache=cache,
                                          active=active)
        for a, b in zip(idx, free):
            assert torch.equal(a[active], b[active])
        torch.testing.assert_close(f_hat[active], f_free[active])
    assert any(not torch.equal(a[~active], b[~active]) for a, b in zip(idx, free))  # the others are not drawn so
    none, _, _ = sample_token_maps(tr, tok.quantizer, prefix, cls, 5, 3, top_k=20, active=torch.zeros(10, dtype=bool))
    assert [tuple(i.shape) for i in none] == [tuple(i.shape) for i in free]


def test_top_k_restricts_the_draws(tokenizer_and_transformer):
    from nnunet_arseg.segmentor.sampling import sample_top_k
    logits = torch.randn(3, 50, 64)
    g = torch.Generator().manual_seed(0)
    idx = sample_top_k(logits, 1.0, 5, g)
    allowed = logits.topk(5, dim=-1).indices
    assert (allowed == idx.unsqueeze(-1)).any(-1).all()
    distinct = torch.stack([torch.randperm(64, generator=g) for _ in range(150)]).view(3, 50, 64).float()
    assert torch.equal(sample_top_k(distinct, 1e-4, None, g), distinct.argmax(-1))  # logits 1 apart: a sure draw


def test_temperature_schedule():
    assert temperature_schedule(8) == list(REFERENCE_TEMPERATURES)
    four = temperature_schedule(4)
    assert four[0] == 1.0 and math.isclose(four[-1], 0.1) and all(a > b for a, b in zip(four, four[1:]))
    assert len(temperature_schedule(11)) == 11


@pytest.mark.parametrize("cls", [SVDEmbedding, LinearEmbedding])
@pytest.mark.parametrize("spatial", [(8, 8), (2, 4, 4)])
def test_embedding_shapes_and_gradients(cls, spatial):
    torch.manual_seed(0)
    emb = cls(12, spatial, num_tokens=10, dim=16)
    f = torch.randn(3, 12, *spatial, requires_grad=True)
    out = emb(f)
    assert out.shape == (3, 10, 16) and out.isfinite().all()
    out.square().sum().backward()
    assert f.grad.isfinite().all() and f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="spatial shape"):
        emb(torch.randn(1, 12, *[n * 2 for n in spatial]))


def test_svd_energy_cut_keeps_a_low_rank_reconstruction():
    emb = SVDEmbedding(4, (4, 4), num_tokens=16, dim=8)
    u = torch.randn(1, 16, 1)
    x = u @ torch.randn(1, 1, 4) + 1e-3 * torch.randn(1, 16, 4)  # (almost) rank 1
    out = emb.svd_tokens(x)
    # one token per pixel: the kept part is the rank-1 reconstruction, scaled by the enhancer (0 < gain < 1)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    rank1 = S[:, :1, None] * U[:, :, :1] @ Vh[:, :1]
    ratio = (out * rank1).sum() / rank1.square().sum()
    assert 0 < ratio < 1
    torch.testing.assert_close(out, ratio * rank1, atol=1e-5, rtol=1e-4)


def test_svd_embedding_gradients_finite_with_repeated_singular_values():
    """Dead (all-zero) channels give repeated zero singular values, where the SVD's own backward is inf/NaN."""
    torch.manual_seed(0)
    emb = SVDEmbedding(8, (4, 4), num_tokens=4, dim=8)
    x = torch.zeros(2, 16, 8)
    x[:, :, :2] = torch.randn(2, 16, 2)
    x.requires_grad_(True)
    emb.svd_tokens(x).square().sum().backward()
    assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.isfinite().all() for p in emb.parameters())


def test_majority_vote_ties_go_to_background():
    samples = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)  # N = 4 along dim 0
    assert majority_vote(samples, dim=0).tolist() == [True, False, False]  # 3/4, 2/4 (tie), 2/4
    assert vote_frequency(samples, dim=0).tolist() == [0.75, 0.5, 0.5]
    ent = binary_entropy_bits(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    torch.testing.assert_close(ent, torch.tensor([0.0, 1.0, 0.0, 0.8112781]))


def test_label_fusion_and_logits_agree_with_nnunet_export():
    freq = torch.tensor([[0.75, 0.5, 0.0, 0.5, 1.0],  # class 1 votes
                         [0.875, 0.5, 0.25, 0.0, 1.0]])  # class 2 votes
    fused = fuse_labels(freq, class_dim=0)
    assert fused.tolist() == [2, 0, 0, 0, 1]  # argmax, > 0.5 else background, ties to the first
    logits = label_logits_from_frequencies(freq.unsqueeze(0), class_dim=1)
    assert logits.shape == (1, 3, 5) and logits.isfinite().all()
    assert torch.equal(logits.half().float().softmax(1).argmax(1)[0], fused)  # nnU-Net: fp16, softmax, argmax
    one = torch.tensor([[[0.0, 0.25, 0.5, 0.75, 1.0]]])
    probs = label_logits_from_frequencies(one, class_dim=1).softmax(1)
    torch.testing.assert_close(probs[:, 1], one[:, 0], atol=2e-4, rtol=0)  # softmax gives the frequencies back
    region = region_logits_from_frequencies(one)
    assert (region.sigmoid() > 0.5).tolist() == [[[False, False, False, True, True]]]
    assert region.isfinite().all() and region.abs().max() < 10


def test_presence_draws_follow_the_probability_and_the_seed():
    from nnunet_arseg.segmentor.presence import draw_presence
    logit_B = torch.tensor([-30.0, 30.0, 0.0, math.log(3.0), math.log(0.3 / 0.7)])  # p = 0, 1, 1/2, 3/4, 0.3
    present = draw_presence(logit_B, 16, seed=11)
    assert present.shape == (5, 16) and present.dtype == torch.bool
    assert present.sum(1).tolist()[:4] == [0, 16, 8, 12] and present[4].sum() in (4, 5)  # p N, rounded
    assert torch.equal(present, draw_presence(logit_B, 16, seed=11))
    # each sample on its own is present with probability p, over seeds
    share_N = torch.stack([draw_presence(logit_B[4:], 16, seed=s)[0] for s in range(2000)]).float().mean(0)
    assert (share_N - 0.3).abs().max() < 0.05


def test_presence_temperature_moves_the_draws_away_from_or_towards_one_half():
    from nnunet_arseg.segmentor.presence import draw_presence
    logit_B = torch.tensor([-0.5, 0.5, 2.0])  # p = 0.38, 0.62, 0.88
    assert torch.equal(draw_presence(logit_B, 16, seed=5, temperature=1.0), draw_presence(logit_B, 16, seed=5))
    assert draw_presence(logit_B, 16, seed=5).sum(1).tolist() in ([6, 9, 14], [6, 10, 14], [7, 9, 14], [7, 10, 14])
    assert draw_presence(logit_B, 16, seed=5, temperature=1e-4).sum(1).tolist() == [0, 16, 16]  # p > 1/2 decides
    assert draw_presence(logit_B, 16, seed=5, temperature=1e4).sum(1).tolist() == [8, 8, 8]
    sharper = draw_presence(logit_B, 16, seed=5, temperature=0.5).sum(1).tolist()  # p = 0.27, 0.73, 0.98
    assert sharper[0] in (4, 5) and sharper[1] in (11, 12) and sharper[2] in (15, 16)
    with pytest.raises(ValueError, match="presence temperature must be > 0"):
        draw_presence(logit_B, 16, seed=5, temperature=0.0)


def test_outline_levels_spread_the_drawn_samples_evenly_and_leave_the_absent_at_one_half():
    from nnunet_arseg.segmentor.outline import outline_levels
    present_BN = torch.tensor([[True, False, True, True], [False, False, True, False], [False] * 4])
    assert torch.allclose(outline_levels(present_BN, 0.5),
                          torch.tensor([[1 / 2, 0.5, 5 / 6, 1 / 6], [0.5] * 4, [0.5] * 4]))
    assert torch.allclose(outline_levels(present_BN, 0.25),
                          torch.tensor([[1 / 2, 0.5, 2 / 3, 1 / 3], [0.5] * 4, [0.5] * 4]))
    # the first drawn sample takes the middle stratum, the others from there up, then from the lowest
    assert torch.allclose(outline_levels(torch.ones(1, 4, dtype=torch.bool), 0.5), torch.tensor([[5, 7, 1, 3]]) / 8)
    assert torch.equal(outline_levels(present_BN, 0.0), torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match=r"outline_spread must be in \[0, 0.5\]"):
        outline_levels(present_BN, -0.1)


def test_head_guidance_keeps_each_tokens_own_sub_cells():
    """The guidance of a scale's token reads the head's probability inside that token's cell only (space-to-depth,
    as ``pixel_unshuffle`` in 2D), and one vector per token of every scale comes out."""
    x = torch.randn(2, 3, 16, 24)
    assert torch.equal(unshuffle(x, 8), torch.nn.functional.pixel_unshuffle(x, 8))
    x3 = torch.randn(1, 1, 8, 8, 4)
    y3 = unshuffle(x3, 4)
    assert y3.shape == (1, 64, 2, 2, 1) and torch.equal(y3[0, :, 1, 0, 0], x3[0, 0, 4:, :4, :].flatten())
    guidance = HeadGuidance(5, [(1, 1), (2, 2), (4, 4)], dim=16)
    torch.nn.init.normal_(guidance.proj[-1].weight)
    prob, features = torch.rand(2, 1, 32, 32), torch.randn(2, 5, 32, 32)
    out = guidance(prob, features)
    assert out.shape == (2, 1 + 4 + 16, 16)
    changed = prob.clone()
    changed[:, :, :8, :8] = 1 - changed[:, :, :8, :8]  # the top-left token of the finest scale only
    moved = (guidance(changed, features) - out).abs().sum(-1)[0]
    assert moved[5] > 0 and moved[6:].eq(0).all()  # at the finest scale only that token moves
    assert moved[0] > 0 and moved[1] > 0  # the coarser scales' cells containing it
