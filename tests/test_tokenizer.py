"""MaskTokenizer / MultiScaleQuantizer on real masks: shapes, training, determinism, teacher-forcing causality."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from nnunet_arseg.tokenizer import MaskTokenizer, MultiScaleQuantizer, default_scales
from nnunet_arseg.tokenizer.autoencoder import latent_strides

TINY = {"ch": 8, "ch_mult": (1, 1, 2, 2, 4), "z_channels": 16, "codebook_size": 64}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs on a shared CPU: several OpenMP threads fighting over busy cores are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lidc_masks(root, size: int = 128) -> torch.Tensor:
    """All non-empty rater masks of the demo crops (nodules are centred), centre-cropped to size x size."""
    paths = sorted(root.glob("LIDC-IDRI-*/nodule-*/mask-*/slice-*.png"))
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
    assert default_scales((8, 8)) == [(k, k) for k in range(1, 9)]
    assert default_scales((4, 8)) == [(1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (3, 6), (4, 7), (4, 8)]
    assert default_scales((2, 2), num_scales=4) == [(1, 1), (2, 2)]
    assert latent_strides((40, 64, 48), 4) == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
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
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 4.39) < 0.01  # §1.5
    assert model.quantizer.phi_of_scale == [0, 0, 1, 1, 2, 2, 3, 3]  # §1.3: {1,2}, {3,4}, {5,6}, {7,8}
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


def test_lidc_round_trip_after_short_training(lidc_demo):
    torch.manual_seed(0)
    x = lidc_masks(lidc_demo, 48)  # 99.6% of the foreground of the dev set lies in the central 48x48
    assert len(x) > 300  # real rater masks of the 8 demo patients
    model = MaskTokenizer(2, (48, 48), ch=8, ch_mult=(1, 2, 2, 4), z_channels=32, codebook_size=256,
                          dead_code_steps=10)
    untrained = dice(model.eval().idx_to_logits(model.mask_to_idx(x)), x)
    losses = train(model, x, steps=100, lr=3e-3, batch_size=8)
    with torch.no_grad():
        trained = dice(model.eval().idx_to_logits(model.mask_to_idx(x)), x)
    print(f"untrained Dice {untrained:.3f}, trained {trained:.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert untrained < 0.4 < trained


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
