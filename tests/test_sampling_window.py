"""sampling_window.py: the samples drawn inside nnU-Net's own sliding window (tiles, mirroring, folds) are recorded and
stitched, and the consensus logits are exactly the stock predictor's."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_arseg.consensus import majority_vote
from nnunet_arseg.network import ARSegNetwork, build_arseg_architecture, content_seed
from nnunet_arseg.sampling_window import SamplingPredictor, TileRecorder

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1}, "numTraining": 0,
                "file_ending": ".png"}


def small_plans(patch=(32, 32)) -> dict:
    dims = len(patch)
    conv, norm = ("Conv2d", "InstanceNorm2d") if dims == 2 else ("Conv3d", "InstanceNorm3d")
    stock = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32],
                             "conv_op": f"torch.nn.modules.conv.{conv}", "kernel_sizes": [[3] * dims] * 3,
                             "strides": [[1] * dims] + [[2] * dims] * 2, "n_conv_per_stage": [1] * 3,
                             "n_conv_per_stage_decoder": [1] * 2, "conv_bias": True,
                             "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                             "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                             "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                             "nonlin_kwargs": {"inplace": True}},
             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    arch = build_arseg_architecture(stock, patch, preset_name="tiny", num_samples=3, num_prefix_tokens=16, tokenizer={
        "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 8, "codebook_size": 32, "code_dim": 8},
        transformer={"width": 32, "depth": 1, "heads": 2, "dropout": 0.0})
    return {"dataset_name": "Dataset999_Unit", "plans_name": "nnUNetPlans", "image_reader_writer": "NaturalImage2DIO",
            "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": [1, *patch],
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"c": {"data_identifier": "u", "preprocessor_name": "DefaultPreprocessor",
                                     "batch_size": 2, "patch_size": list(patch), "spacing": [1.0] * dims,
                                     "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                                     "architecture": arch}}}


def predictors(plans: dict, mirror_axes=None, **ours):
    """A stock and an AR-Seg predictor on the same network (random weights, seeded)."""
    pm = PlansManager(plans)
    cm = pm.get_configuration("c")
    torch.manual_seed(0)
    kw = dict(cm.network_arch_init_kwargs)
    net = ARSegNetwork(1, 2, **kw).eval()
    out = []
    for cls, extra in ((nnUNetPredictor, {}), (SamplingPredictor, ours)):
        p = cls(tile_step_size=0.5, use_mirroring=mirror_axes is not None, device=torch.device("cpu"),
                allow_tqdm=False, **extra)
        p.manual_initialization(net, pm, cm, None, DATASET_JSON, "nnUNetTrainerARSeg", mirror_axes)
        out.append(p)
    return net, out


@pytest.mark.parametrize("shape,mirror_axes", [((1, 32, 32), None), ((1, 32, 32), (0, 1)), ((1, 50, 41), None),
                                               ((1, 50, 41), (0, 1))])
def test_consensus_logits_are_the_stock_predictors(shape, mirror_axes, monkeypatch):
    monkeypatch.setenv("nnUNet_ARSEG_NUM_SAMPLES", "4")
    monkeypatch.setenv("nnUNet_ARSEG_SEED", "2")
    net, (stock, ours) = predictors(small_plans(), mirror_axes, num_samples=4, seed=2)
    data = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    expected = stock.predict_sliding_window_return_logits(data)
    logits, drawn = ours.sample_case(data)
    assert torch.equal(logits, expected.cpu())
    assert drawn.samples_KN.shape == (1, 4, *shape) and drawn.samples_KN.dtype == torch.bool
    assert net.eval_sampling is None  # set only while the window runs
    if shape[1:] == (32, 32):  # one tile: the samples are the tile's draws; unmirrored, the consensus is their majority
        tile = net.sample(data[None, :, 0], 4, content_seed(2, data[None, :, 0]))["samples"][0]
        assert torch.equal(drawn.samples_KN[:, :, 0], tile)
        if mirror_axes is None:
            assert torch.equal(logits.argmax(0) == 1, majority_vote(drawn.samples_KN[0], 0))
    # mirroring averages the logits of the mirrored passes, but the samples are those of the unmirrored pass
    _, (_, plain) = predictors(small_plans(), None, num_samples=4, seed=2)
    assert torch.equal(plain.sample_case(data)[1].samples_KN, drawn.samples_KN)


def test_multi_tile_stitching_and_folds():
    net, (_, ours) = predictors(small_plans(), None, num_samples=3, seed=0, with_scales=True)
    data = torch.randn((1, 1, 50, 41), generator=torch.Generator().manual_seed(3))
    logits, drawn = ours.sample_case(data)
    S = len(net.tokenizer.scales)
    assert drawn.scales_KS.shape == (1, S, 32, 32)
    # every tile's draws, blended per sample: where one tile alone covers a pixel, its draws are kept as they are
    tile = data[None, :, 0, :32, :32]
    corner = net.sample(tile, 3, content_seed(0, tile), with_scales=True)
    assert torch.equal(drawn.samples_KN[:, :, 0, :8, :8], corner["samples"][0, :, :, :8, :8])
    assert torch.equal(drawn.scales_KS, corner["scales"][0])  # the first tile's coarse-to-fine masks
    # two fold models: N samples each, logits averaged by nnU-Net
    ours.list_of_parameters = [net.state_dict(), net.state_dict()]
    logits2, drawn2 = ours.sample_case(data)
    assert drawn2.samples_KN.shape[1] == 6 and torch.equal(drawn2.samples_KN[:, 3:], drawn2.samples_KN[:, :3])
    torch.testing.assert_close(logits2, logits)


def test_the_sampler_and_its_options_reach_the_network_through_the_window():
    """``SamplingPredictor(sampler=...)`` draws with that sampler (what each draws: test_network.py); without it, the
    autoregressive default; ``mirror_head=False`` (``--disable_tta``) and the outline spread reach it too."""
    net, (_, ours) = predictors(small_plans(), None, num_samples=4, seed=2, sampler="anchored")
    data = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(5))
    tile = data[None, :, 0]
    plain = net.encode_image(tile).aux_logits
    head = net.head_masks(net.head_logits(tile, plain))  # averaged over the tile's mirrorings
    assert head.any() and not head.all()  # random weights: a head mask of both values
    around = dict(num_samples=4, seed=content_seed(2, tile), sampler="anchored")
    drawn = ours.sample_case(data)[1].samples_KN[:, :, 0]
    assert torch.equal(drawn, net.sample(tile, **around, anchor=head)["samples"][0])
    _, (_, default) = predictors(small_plans(), None, num_samples=4, seed=2)
    own = default.sample_case(data)[1].samples_KN[:, :, 0]
    assert torch.equal(own, net.sample(tile, 4, content_seed(2, tile))["samples"][0])
    assert not torch.equal(drawn, own)
    _, (_, unmirrored) = predictors(small_plans(), None, num_samples=4, seed=2, sampler="anchored",
                                    mirror_head=False)  # --disable_tta
    assert torch.equal(unmirrored.sample_case(data)[1].samples_KN[:, :, 0],
                       net.sample(tile, **around, anchor=net.head_masks(plain))["samples"][0])
    _, (_, spread) = predictors(small_plans(), None, num_samples=4, seed=2, sampler="head", outline_spread=0.25)
    levels = spread.sample_case(data)[1].samples_KN[:, :, 0]
    head_draws = dict(num_samples=4, seed=content_seed(2, tile), sampler="head")
    assert torch.equal(levels, net.sample(tile, **head_draws, outline_spread=0.25)["samples"][0])
    assert not torch.equal(levels, net.sample(tile, **head_draws)["samples"][0])  # the default spread: 0.5
    assert spread.eval_sampler() == "head" and default.eval_sampler() == "autoregressive"


def test_3d_tiles(monkeypatch):
    monkeypatch.setenv("nnUNet_ARSEG_NUM_SAMPLES", "2")
    _, (stock, ours) = predictors(small_plans((8, 16, 16)), (0, 1, 2), num_samples=2)
    data = torch.randn((1, 12, 20, 16), generator=torch.Generator().manual_seed(4))
    logits, drawn = ours.sample_case(data)
    assert torch.equal(logits, stock.predict_sliding_window_return_logits(data).cpu())
    assert drawn.samples_KN.shape == (1, 2, 12, 20, 16) and drawn.samples_KN.any() and not drawn.samples_KN.all()
    _, (_, plain) = predictors(small_plans((8, 16, 16)), None, num_samples=2)
    assert torch.equal(plain.sample_case(data)[1].samples_KN, drawn.samples_KN)


def test_content_seed_and_recorder_contract():
    x = torch.randn(1, 1, 8, 8)
    assert content_seed(0, x) == content_seed(0, x.clone()) < 2 ** 48
    assert len({content_seed(0, x), content_seed(1, x), content_seed(0, x.flip(-1))}) == 3
    rec = TileRecorder()
    with pytest.raises(RuntimeError, match="outside a tile"):
        rec.record(torch.zeros(1, 2, 8, 8, dtype=torch.bool))
    rec.start_window((8, 8), [(slice(None), slice(0, 8), slice(0, 8))], (8, 8))
    with pytest.raises(RuntimeError, match="0 of 1 tiles"):
        rec.finish_window((slice(None), slice(0, 8), slice(0, 8)))
