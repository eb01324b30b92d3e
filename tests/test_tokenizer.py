"""MaskTokenizer / MultiScaleQuantizer on real masks: shapes, training, determinism, teacher-forcing causality."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from nnunet_arseg.tokenizer import MaskTokenizer, MultiScaleQuantizer, default_scales
from nnunet_arseg.tokenizer.autoencoder import depth_to_space, latent_strides, space_to_depth
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig, dihedral_augment, fit_tokenizer, reconstruction_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"ch": 8, "ch_mult": (1, 1, 2, 2, 4), "z_channels": 16, "codebook_size": 64}


def lidc_masks(root, size: int = 128, patients=None) -> torch.Tensor:
    """All non-empty rater masks of the demo crops (nodules are centred), centre-cropped to size x size."""
    paths = sorted(p for p in root.glob("LIDC-IDRI-*/nodule-*/mask-*/slice-*.png")
                   if patients is None or p.parts[-4] in patients)
    masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in paths]
    lo = (128 - size) // 2
    return torch.from_numpy(np.stack([m for m in masks if m.any()])[:, None, lo:lo + size, lo:lo + size]).float()


def spleen_patch(root) -> torch.Tensor:
    """The spleen mask, down-sampled (z by 2, in-plane by 4), cropped/padded to (1, 1, 16, 32, 32) around its centre."""
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "sub-spleen2_ct_seg-manual.nii.gz")))
    x = torch.from_numpy(seg[::2, ::4, ::4] > 0).float()
    centre = [int(c) for c in np.argwhere(x.numpy()).mean(0)]
    out = torch.zeros(16, 32, 32)
    src = [slice(max(c - n // 2, 0), min(c - n // 2 + n, s)) for c, n, s in zip(centre, out.shape, x.shape)]
    crop = x[tuple(src)]
    out[tuple(slice(0, n) for n in crop.shape)] = crop
    return out[None, None]


def dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred, gt = (logits > 0).flatten(1).float(), mask.flatten(1)
    return float((2 * (pred * gt).sum(1) / (pred.sum(1) + gt.sum(1)).clamp_min(1)).mean())


def train(model: MaskTokenizer, x: torch.Tensor, steps: int, lr: float = 2e-3, batch_size: int = 16) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)]
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_default_scales_and_strides():
    assert default_scales((8, 8)) == [(k, k) for k in range(1, 9)]  # the reference's schedule
    assert default_scales((16, 16)) == [(k, k) for k in (1, 2, 3, 4, 5, 7, 11, 16)]  # geometric: few fine maps
    assert default_scales((4, 8)) == [(1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (3, 6), (4, 7), (4, 8)]
    assert default_scales((2, 2), num_scales=4) == [(1, 1), (2, 2)]
    assert latent_strides((40, 64, 48), 4) == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert latent_strides((40, 64, 48), 3, max_stride=(2, 8, 4)) == [(2, 2, 2), (1, 2, 2), (1, 2, 1)]


def test_space_to_depth_and_per_axis_latent_stride():
    x = torch.randn(2, 1, 8, 12, 4)
    y = space_to_depth(x, (2, 4, 1))
    assert y.shape == (2, 8, 4, 3, 4) and torch.equal(depth_to_space(y, (2, 4, 1)), x)
    assert torch.equal(space_to_depth(x[..., 0], (2, 2)), torch.nn.functional.pixel_unshuffle(x[..., 0], 2))
    model = MaskTokenizer(3, (16, 64, 64), ch=8, num_res_blocks=1, z_channels=8, codebook_size=16, code_dim=4,
                          space_to_depth=4, latent_stride=(4, 16, 16))
    assert model.latent_shape == (4, 4, 4) and model.s2d_factor == (4, 4, 4)
    mask = (torch.rand(1, 1, 16, 64, 64) > 0.9).float()
    assert model.idx_to_logits(model.mask_to_idx(mask)).shape == mask.shape
    with pytest.raises(ValueError, match="cannot be reduced"):
        MaskTokenizer(2, (24, 24), latent_stride=16)


def test_dihedral_augment_is_exact():
    gen = torch.Generator().manual_seed(0)
    m = (torch.rand(64, 1, 8, 8) > 0.7).float()
    out = dihedral_augment(m, gen)
    assert out.shape == m.shape and torch.equal(out.sum((1, 2, 3)), m.sum((1, 2, 3)))
    assert not torch.equal(out, m)
    with pytest.raises(ValueError):
        default_scales((0, 4))


@pytest.mark.parametrize("conv_op, patch, latent", [
    (torch.nn.Conv2d, (128, 128), (8, 8)),
    (2, (64, 128), (4, 8)),
    (torch.nn.Conv3d, (20, 32, 24), (5, 4, 3)),  # 20 -> 10 -> 5 stops at the odd 5
])
def test_token_map_shapes(conv_op, patch, latent):
    torch.manual_seed(0)
    widths = TINY if len(patch) == 2 else {**TINY, "ch_mult": (1, 1, 2, 2)}
    model = MaskTokenizer(conv_op, patch, **widths).eval()
    assert model.latent_shape == latent and model.scales == default_scales(latent)
    mask = (torch.rand(2, 1, *patch) > 0.5).float()
    idx_list = model.mask_to_idx(mask)
    assert [tuple(idx.shape) for idx in idx_list] == [(2, *pn) for pn in model.scales]
    assert all(idx.dtype == torch.long and int(idx.max()) < 64 for idx in idx_list)
    L = sum(math.prod(pn) for pn in model.scales[1:])
    assert model.idx_to_teacher_inputs(idx_list).shape == (2, L, 32)
    scale_logits = model.idx_to_scale_logits(idx_list)
    assert len(scale_logits) == len(model.scales) and all(s.shape == mask.shape for s in scale_logits)
    torch.testing.assert_close(scale_logits[-1], model.idx_to_logits(idx_list))
    # stepwise sampling API reproduces the teacher inputs and the full f_hat
    f_hat, xs = None, []
    for si, idx in enumerate(idx_list):
        f_hat, next_x = model.quantizer.embed_idx_and_next_input(si, f_hat, idx)
        xs += [] if next_x is None else [next_x]
    assert next_x is None
    torch.testing.assert_close(torch.cat(xs, 1), model.idx_to_teacher_inputs(idx_list))
    torch.testing.assert_close(model.decode_f_hat(f_hat), model.idx_to_logits(idx_list))
    with pytest.raises(ValueError, match="crop or pad"):
        model.mask_to_idx(torch.zeros(2, 1, *[n + 2 for n in patch]))


def test_reference_size_and_phi_ticks():
    model = MaskTokenizer(torch.nn.Conv2d, (128, 128))
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 4.39) < 0.01  # the reference's 4.39 M
    assert model.quantizer.phi_of_scale == [0, 0, 1, 1, 2, 2, 3, 3]  # method §1.3: {1,2}, {3,4}, {5,6}, {7,8}
    assert model.quantizer.embedding.weight.shape == (1024, 32)


def test_quantizer_runs_in_fp32_under_autocast():
    q = MultiScaleQuantizer(default_scales((4, 4)), codebook_size=16, code_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_hat, vq_loss, usage = q(torch.randn(2, 8, 4, 4).bfloat16())
    assert f_hat.dtype == torch.float32 and vq_loss.dtype == torch.float32 and usage.shape == (4,)


def test_teacher_inputs_depend_only_on_coarser_scales():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(default_scales((4, 6)), codebook_size=32, code_dim=8)
    # the input block of scale si (0-based, si >= 1) is starts[si - 1]:starts[si]
    starts = np.cumsum([0] + [math.prod(pn) for pn in q.scales[1:]])
    idx_list = [torch.randint(0, 32, (2, *pn)) for pn in q.scales]
    base = q.idx_to_teacher_inputs(idx_list)
    for k in range(1, len(q.scales)):
        changed = idx_list[:k] + [(idx + 1) % 32 for idx in idx_list[k:]]
        x = q.idx_to_teacher_inputs(changed)
        torch.testing.assert_close(x[:, :starts[k]], base[:, :starts[k]], rtol=0, atol=0)  # scales 1..k (0-based <= k)
        if k < len(q.scales) - 1:
            assert not torch.allclose(x[:, starts[k]:starts[k + 1]], base[:, starts[k]:starts[k + 1]])


def test_dead_codes_are_reinitialised_from_current_latents():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(default_scales((4, 4)), codebook_size=256, code_dim=8, dead_code_steps=1).train()
    f = torch.randn(2, 8, 4, 4) * 3
    before = q.embedding.weight.detach().clone()
    idx_used = torch.cat([i.flatten() for i in q.f_to_idx(f)]).unique()
    q(f)
    after = q.embedding.weight.detach()
    unused = torch.ones(256, dtype=torch.bool)
    unused[idx_used] = False
    assert torch.equal(after[~unused], before[~unused])
    assert not torch.isclose(after[unused], before[unused]).all(1).any()
    assert after[unused].abs().max() > 10 / 256  # moved out of the tiny uniform init onto latent-scale vectors
    assert (q.steps_unused_V == 0).all()


def test_deterministic_with_seed(lidc_demo):
    x = lidc_masks(lidc_demo, 48)[:32]

    def run():
        torch.manual_seed(123)
        model = MaskTokenizer(2, (48, 48), dead_code_steps=2, **{**TINY, "ch_mult": (1, 2, 2, 4)})
        train(model, x, steps=4, batch_size=8)
        return model.mask_to_idx(x[:8]), model.state_dict()

    (idx_a, sd_a), (idx_b, sd_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_lidc_round_trip_trained_to_a_criterion_on_held_out_patients(lidc_demo):
    """Trained on 6 patients until the masks of 2 others round-trip at Dice >= 0.75 (a generous step cap: another
    CPU changes how many steps it takes, not whether it gets there); the untrained model is far from it."""
    masks = {p.name: lidc_masks(p.parent, 48, patients=[p.name]) for p in sorted(lidc_demo.glob("LIDC-IDRI-*"))}
    names = sorted(masks)
    train_x = torch.cat([masks[n] for n in names[:6]])
    heldout = torch.cat([masks[n] for n in names[6:]])
    assert len(train_x) > 200 and len(heldout) > 20  # real rater masks of disjoint patients
    torch.manual_seed(0)
    model = MaskTokenizer(2, (48, 48), ch=16, num_res_blocks=1, z_channels=16, codebook_size=256, code_dim=16,
                          space_to_depth=2, latent_stride=8, dead_code_steps=10)
    untrained = reconstruction_scores(model, heldout)["dice_nonempty"]
    cfg = TokenizerFitConfig(max_steps=2000, batch_size=16, lr=1e-2, warmup_steps=20, eval_every=50,
                             target_dice=0.75, target_empty=1.0)
    state = fit_tokenizer(model, lambda rng, b: train_x[rng.integers(len(train_x), size=b)], heldout, cfg,
                          log=lambda _: None)
    trained = state["history"][-1]["dice_nonempty"]
    print(f"untrained Dice {untrained:.3f}, trained {trained:.3f} after {state['step']} steps")
    assert untrained < 0.3 and trained >= 0.75


def test_fit_resumes_exactly(lidc_demo):
    """Stopping after an evaluation and resuming from the checkpointed state gives the same weights as one run."""
    x = lidc_masks(lidc_demo, 32)[:64]
    cfg = TokenizerFitConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, target_dice=1.01)

    def fresh():
        torch.manual_seed(1)
        return MaskTokenizer(2, (32, 32), ch=8, num_res_blocks=1, z_channels=8, codebook_size=32, code_dim=8,
                             space_to_depth=2, latent_stride=8, dead_code_steps=2)

    def draw(rng, b):
        return x[rng.integers(len(x), size=b)]

    whole = fresh()
    fit_tokenizer(whole, draw, x[:8], cfg, log=lambda _: None)
    saved = []
    first = fresh()
    fit_tokenizer(first, draw, x[:8], TokenizerFitConfig(**{**cfg.to_dict(), "max_steps": 6}),
                  checkpoint=lambda st: saved.append(copy.deepcopy(st)), log=lambda _: None)
    resumed = fresh()
    torch.manual_seed(99)  # the state restores every random generator it uses
    fit_tokenizer(resumed, draw, x[:8], cfg, state={**saved[0], "done": False}, log=lambda _: None)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_reconstruction_scores_count_each_mask():
    model = MaskTokenizer(2, (16, 16), ch=8, num_res_blocks=1, z_channels=8, codebook_size=16, code_dim=4,
                          space_to_depth=2, latent_stride=4)
    masks = torch.zeros(5, 1, 16, 16)
    masks[1:3, :, 4:9, 4:9] = 1  # two identical non-empty masks, decoded once, counted twice
    masks[3, :, 0:3, 0:2] = 1
    scores = reconstruction_scores(model, masks)
    assert scores["num_nonempty"] == 3 and scores["num_empty"] == 2
    assert 0.0 <= scores["dice_nonempty"] <= 1.0 and scores["empty_kept"] in (0.0, 0.5, 1.0)


def test_3d_spleen_shapes_and_training(spleen_crop):
    torch.manual_seed(0)
    x = spleen_patch(spleen_crop)
    assert x.sum() > 500
    model = MaskTokenizer(torch.nn.Conv3d, (16, 32, 32), ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                          z_channels=16, codebook_size=64)
    assert model.latent_shape == (2, 4, 4)
    idx_list = model.mask_to_idx(x)
    assert [tuple(i.shape[1:]) for i in idx_list] == [(1, 1, 1), (1, 2, 2), (2, 3, 3), (2, 4, 4)]
    assert model.idx_to_logits(idx_list).shape == x.shape
    batch = torch.cat([x, x.flip(-1)])
    losses = train(model, batch, steps=8, lr=2e-3)
    assert losses[-1] < losses[0] - 0.1
