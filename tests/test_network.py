"""ARSegNetwork: built by nnU-Net from plans, 2D/3D shapes, eval logits, and overfitting real LIDC slices."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_arseg.consensus import fuse_labels, majority_vote, vote_frequency
from nnunet_arseg.network import ARSegNetwork, build_arseg_architecture, class_seed, content_seed, first_drawn
from nnunet_arseg.segmentor.presence import draw_presence
from nnunet_arseg.segmentor.sampling import sample_token_maps
from nnunet_arseg.sampling_window import EvalSampling
from nnunet_arseg.tokenizer.fit import TokenizerFitConfig, fit_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_TOKENIZER = {"ch": 8, "num_res_blocks": 1, "z_channels": 16, "codebook_size": 64, "code_dim": 8,
                  "space_to_depth": 4, "latent_stride": 16}
TINY_TRANSFORMER = {"width": 32, "depth": 2, "heads": 4, "dropout": 0.0}


def stock_architecture(dims: int, n_stages: int, features: list[int]) -> dict:
    """The ``architecture`` entry nnU-Net 2.8.1's default planner writes (PlainConvUNet)."""
    conv, norm = ("Conv2d", "InstanceNorm2d") if dims == 2 else ("Conv3d", "InstanceNorm3d")
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages, "features_per_stage": features,
                            "conv_op": f"torch.nn.modules.conv.{conv}", "kernel_sizes": [[3] * dims] * n_stages,
                            "strides": [[1] * dims] + [[2] * dims] * (n_stages - 1),
                            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans_with_arseg(patch_2d=(128, 128), patch_3d=(16, 32, 32), **overrides) -> dict:
    """A plans dict as nnU-Net writes it, plus ``arseg_2d``/``arseg_3d`` configurations inheriting from the stock
    ones."""
    stock_2d = stock_architecture(2, 6, [32, 64, 128, 256, 512, 512])
    stock_3d = stock_architecture(3, 4, [8, 16, 32, 64])
    common = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 4,
              "median_image_size_in_voxels": [128.0, 128.0], "spacing": [1.0, 1.0],
              "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None},
              "batch_dice": True}
    tiny = {"tokenizer": TINY_TOKENIZER, "transformer": TINY_TRANSFORMER, **overrides}
    return {"dataset_name": "Dataset501_LIDC", "plans_name": "nnUNetPlans_arseg",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [1, 128, 128], "image_reader_writer": "NaturalImage2DIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {
                "2d": {**common, "patch_size": list(patch_2d), "architecture": stock_2d},
                "3d_fullres": {**common, "patch_size": list(patch_3d), "spacing": [1.0, 1.0, 1.0],
                               "median_image_size_in_voxels": [16.0, 32.0, 32.0], "architecture": stock_3d},
                "arseg_2d": {"inherits_from": "2d",
                             "architecture": build_arseg_architecture(stock_2d, patch_2d, preset_name="tiny", **tiny)},
                "arseg_3d": {"inherits_from": "3d_fullres",
                             "architecture": build_arseg_architecture(stock_3d, patch_3d, preset_name="tiny", **tiny)}},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


def build(plans: dict, configuration: str, num_outputs: int) -> ARSegNetwork:
    """Exactly nnU-Net's path: PlansManager -> ConfigurationManager -> the stock trainer's static builder."""
    pm = PlansManager(plans)
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(configuration), 1, num_outputs,
                                                    enable_deep_supervision=False)


def test_build_arseg_architecture_keeps_stock_kwargs_and_is_json():
    stock = stock_architecture(2, 6, [32, 64, 128, 256, 512, 512])
    before = copy.deepcopy(stock)
    arch = build_arseg_architecture(stock, (128, 128), transformer={"depth": 4}, num_samples=8, aux_head=True)
    assert stock == before  # the stock entry is not modified
    assert arch["network_class_name"] == "nnunet_arseg.network.ARSegNetwork"
    kw = arch["arch_kwargs"]
    assert {k: kw[k] for k in stock["arch_kwargs"]} == stock["arch_kwargs"]
    assert kw["encoder_class_name"] == stock["network_class_name"] and kw["patch_size"] == [128, 128]
    assert kw["transformer"] == {"depth": 4}  # the reference preset keeps the module defaults (width 256, 8 heads)
    assert kw["num_samples"] == 8 and kw["aux_head"] is True and kw["presence"] is True
    assert kw["prefix_source"] == "decoder" and kw["embedding"] == "linear"  # the measured recipe is the default
    assert arch["_kw_requires_import"] == stock["_kw_requires_import"]
    with pytest.raises(ValueError, match="preset"):
        build_arseg_architecture(stock, (128, 128), preset_name="huge")


def test_nnunet_builds_it_from_plans_with_a_frozen_tokenizer():
    plans = plans_with_arseg()
    net = build(plans, "arseg_2d", 2)
    assert isinstance(net, ARSegNetwork) and net.num_conditions == 1
    assert isinstance(net.encoder.stages[0][0].convs[0].conv, torch.nn.Conv2d)  # the plans' own U-Net encoder
    assert net.encoder.output_channels == [32] * 6  # the tiny preset caps the plans' widths
    assert net.tokenizer.scales[-1] == (8, 8) and net.tokenizer.s2d_factor == (4, 4)
    assert net.prefix_source == "decoder" and net.embedding.num_tokens == 64  # one prefix token per latent cell
    assert not any(p.requires_grad for p in net.tokenizer.parameters())
    net.train()
    assert not net.tokenizer.training and net.transformer.training
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable.isdisjoint(id(p) for p in net.tokenizer.parameters())
    assert {id(p) for p in net.encoder.parameters()} <= trainable
    frozen_encoder = {id(p) for p in net.trainable_parameters(freeze_encoder=True)}
    assert frozen_encoder.isdisjoint(id(p) for p in net.encoder.parameters())
    other = build(plans, "arseg_2d", 2)
    other.load_state_dict(net.state_dict())
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # the U-Net view shares the modules and is keyed like a stock nnU-Net checkpoint
    view = net.image_model()
    assert view.encoder is net.encoder and view.decoder is net.decoder
    assert all(k.startswith(("encoder.", "decoder.")) for k in view.state_dict())


def test_training_losses_2d_labels_with_aux_head():
    plans = plans_with_arseg(aux_head=True, aux_full_resolution=False)  # the head stops at the prefix's stage
    net = build(plans, "arseg_2d", 3)  # background + 2 labels -> 2 condition classes
    assert net.num_conditions == 2
    x, mask = torch.randn(2, 1, 128, 128), torch.zeros(2, 1, 128, 128)
    mask[:, :, 40:70, 50:90] = 1
    out = net(x, mask=mask, cls=torch.tensor([1, 0]))
    assert set(out) == {"loss", "token_ce", "token_acc", "aux_loss", "presence_bce"}
    out["loss"].backward()
    assert net.transformer.head.weight.grad is not None
    assert net.decoder.seg_layers[net.feature_stage].weight.grad is not None  # the aux head at the prefix stage
    assert net.decoder.seg_layers[-1].weight.grad is None  # the decoder stops there
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None
    assert all(p.grad is None for p in net.tokenizer.parameters())
    with torch.no_grad():
        pred = net(x, mask=mask, cls=torch.tensor([1, 0]), with_prediction=True)["prediction"]
    assert pred.shape == mask.shape and pred.isfinite().all()
    with pytest.raises(ValueError, match="cls is required"):
        net(x, mask=mask)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(1, 1, 64, 64), mask=mask[:1], cls=0)


def test_a_full_resolution_head_beside_the_decoder_prefix():
    """``aux_full_resolution``: the prefix is the same decoder stage's (same weights, same prefix), the head's logits
    come from the decoder's last stage at the patch size, the mask ``--sampler head`` thresholds."""
    torch.manual_seed(0)
    latent = build(plans_with_arseg(aux_full_resolution=False), "arseg_2d", 2).eval()
    full = build(plans_with_arseg(), "arseg_2d", 2).eval()  # the recipe's head
    full.load_state_dict(latent.state_dict())
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        prefix_latent, logits_latent = latent.encode_image(x)[:2]
        prefix_full, logits_full = full.encode_image(x)[:2]
        assert torch.equal(prefix_full, prefix_latent)
        assert logits_latent.shape[2:] == full.tokenizer.latent_shape and logits_full.shape == (2, 1, 128, 128)
        assert full.head_stage() == len(full.decoder.stages) - 1 and latent.head_stage() == latent.feature_stage
        assert torch.equal(full.head_masks(logits_full), logits_full > 0)


def test_the_presence_head_can_pool_the_u_net_heads_features():
    """``presence_source="head"``: the presence head pools the full-resolution features the head's segmentation layer
    reads, detached (its BCE trains the presence head only), and the samples are drawn from it."""
    torch.manual_seed(0)
    net = build(plans_with_arseg(presence_source="head"), "arseg_2d", 2)
    x = torch.randn(2, 1, 128, 128)
    prefix_BND, aux_logits, presence_BND = net.encode_image(x)[:3]
    width = net.decoder.seg_layers[-1].in_channels
    assert presence_BND.shape == (2, 128 * 128, width) and net.presence_head.fc.in_features == 2 * width
    assert not presence_BND.requires_grad and prefix_BND.requires_grad and aux_logits.requires_grad
    net.presence_head(presence_BND).sum().backward()
    assert net.presence_head.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(net.encoder.parameters()) + list(net.decoder.parameters()))
    net.eval()
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(-30.0)  # never present: every sample empty, whatever the head draws
        assert not net.sample(x, num_samples=4, seed=0)["samples"].any()
        net.presence_head.fc.bias.fill_(30.0)
        net.decoder.seg_layers[-1].bias -= aux_logits.median()  # about half the head's pixels foreground
        assert net.sample(x, num_samples=4, seed=0)["samples"].flatten(2).any(-1).all()
    for bad, match in (({"presence_source": "image"}, "presence_source must be one of"),
                       ({"presence_source": "head", "aux_head": False, "prefix_source": "encoder"},
                        "set aux_head=True")):
        with pytest.raises(ValueError, match=match):
            build(plans_with_arseg(**bad), "arseg_2d", 2)


@pytest.mark.parametrize("configuration,shape", [("arseg_2d", (2, 1, 128, 128)), ("arseg_3d", (2, 1, 16, 32, 32))])
def test_head_guidance_conditions_every_scale_on_the_detached_head_and_keeps_sampling_autoregressive(configuration,
                                                                                                     shape):
    """``head_guidance``: a new model's guidance is zero (it starts as the unguided model), its inputs are the
    detached head (the token loss never trains the head through it), and once trained it changes the transformer's
    draws, which the KV cache and the full recomputation draw alike."""
    torch.manual_seed(0)
    net = build(plans_with_arseg(head_guidance=True), configuration, 2)
    plain = build(plans_with_arseg(), configuration, 2)
    plain.load_state_dict(net.state_dict(), strict=False)
    x, mask = torch.randn(*shape), (torch.rand(shape) > 0.7).float()
    image = net.encode_image(x)
    guide_BLD = net.guide_tokens(image, torch.zeros(2, dtype=torch.long))
    assert guide_BLD.shape == (2, sum(net.transformer.lengths), net.transformer.width) and not guide_BLD.any()
    guide_BLD.sum().backward()
    assert all(p.grad is None for p in list(net.encoder.parameters()) + list(net.decoder.parameters()))
    assert net.guidance.proj[-1].weight.grad.abs().sum() > 0
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net.sample(x, 6, seed=3)["samples"], plain.sample(x, 6, seed=3)["samples"])
        assert torch.allclose(net(x, mask=mask)["loss"], plain(x, mask=mask)["loss"])
        for p in net.guidance.proj[-1].parameters():
            p.normal_(0, 0.5)
        guided = net.sample(x, 6, seed=3)["samples"]
        assert guided.any() and not torch.equal(guided, plain.sample(x, 6, seed=3)["samples"])
        assert torch.equal(guided, net.sample(x, 6, seed=3, use_cache=False)["samples"])
    with pytest.raises(ValueError, match="head_guidance conditions each scale on the U-Net head"):
        build(plans_with_arseg(head_guidance=True, aux_head=False, prefix_source="encoder"), configuration, 2)


@pytest.mark.parametrize("configuration,num_outputs,regions", [("arseg_2d", 3, False), ("arseg_3d", 2, True)])
def test_sample_and_eval_logits(configuration, num_outputs, regions, monkeypatch):
    torch.manual_seed(0)
    plans = plans_with_arseg(has_regions=regions, num_samples=3)
    net = build(plans, configuration, num_outputs).eval()
    patch = net.patch_size
    x = torch.randn(2, 1, *patch)
    out = net.sample(x, num_samples=4, seed=7, with_scales=True)  # the transformer's own draws
    K, S = net.num_conditions, len(net.tokenizer.scales)
    assert out["classes"] == list(range(K))
    assert out["samples"].shape == (2, K, 4, *patch) and out["samples"].dtype == torch.bool
    assert out["scales"].shape == (2, K, S, *patch)
    drawing = out["samples"].flatten(3).any(-1)  # the last scale is the first sample that draws a mask
    shown = out["samples"].gather(2, first_drawn(drawing.flatten(0, 1)).view(2, K, 1, *[1] * len(patch)).expand(
        2, K, 1, *patch))[:, :, 0]
    assert drawing.any() and torch.equal(out["scales"][:, :, -1], shown)
    again = net.sample(x, num_samples=4, seed=7, classes=[K - 1], use_cache=False)
    assert torch.equal(again["samples"][:, 0], out["samples"][:, K - 1])  # uncached, one class: same draws
    monkeypatch.setenv("nnUNet_ARSEG_NUM_SAMPLES", "5")
    with torch.inference_mode():
        logits = net(x[:1])
        assert torch.equal(logits, net(x[:1]))  # same input, same output
    assert logits.shape == (1, num_outputs, *patch) and logits.isfinite().all()
    soft = vote_frequency(net.sample(x[:1], num_samples=5, seed=content_seed(0, x[:1]))["samples"], dim=2)
    assert torch.equal(soft * 5, (soft * 5).round())  # five samples
    if regions:
        assert torch.equal(logits.sigmoid() > 0.5, soft > 0.5)
    else:
        assert torch.equal(logits.softmax(1).argmax(1), fuse_labels(soft, class_dim=1))
    # a random network's samples depend on the seed: the zero-initialised presence head keeps 2 or 3 of the 5 draws
    # per class, which of them by the seed's draw
    reseeded = []
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("nnUNet_ARSEG_SEED", seed)
        with torch.inference_mode():
            reseeded.append(torch.equal(net(x[:1]), logits))
    assert not all(reseeded)


def test_presence_head_gates_the_samples_and_learns_from_empty_masks():
    net = build(plans_with_arseg(), "arseg_2d", 2)  # the tiny preset has a presence head
    assert net.presence_head is not None
    x = torch.randn(2, 1, 128, 128)
    # empty masks teach presence only: no token loss, a presence gradient
    out = net(x, mask=torch.zeros(2, 1, 128, 128), cls=0)
    assert out["token_ce"] == 0.0 and out["presence_bce"] > 0
    heavy = build(plans_with_arseg(presence_weight=4.0), "arseg_2d", 2)  # presence_weight scales its BCE only
    heavy.load_state_dict(net.state_dict())
    assert heavy.presence_weight == 4.0 and net.presence_weight == 1.0
    assert heavy(x, mask=torch.zeros(2, 1, 128, 128), cls=0)["loss"].item() == pytest.approx(
        out["loss"].item() + 3 * out["presence_bce"], rel=1e-5)
    out["loss"].backward()
    assert net.presence_head.fc.weight.grad.abs().sum() > 0 and net.transformer.head.weight.grad.abs().sum() == 0
    # a soft presence target (the raters' share) replaces the drawn mask's presence in the BCE only
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(1.0)
        logit_B = net.presence_head(net.encode_image(x).presence_BND)[:, 0]
        share_B = torch.tensor([0.25, 0.75])
        soft = net(x, mask=torch.zeros(2, 1, 128, 128), cls=0, presence_target=share_B)
        hard = net(x, mask=torch.zeros(2, 1, 128, 128), cls=0)
    assert soft["presence_bce"] == pytest.approx(F.binary_cross_entropy_with_logits(logit_B, share_B).item(),
                                                 rel=1e-5)
    assert hard["presence_bce"] == pytest.approx(F.binary_cross_entropy_with_logits(logit_B, 0 * share_B).item(),
                                                 rel=1e-5)
    assert soft["token_ce"] == 0.0 and soft["presence_bce"] < hard["presence_bce"]
    net.eval()
    bias = net.presence_head.fc.bias
    with torch.no_grad():
        bias.fill_(30.0)  # always present: the token draws decide, as without the head
        present = net.sample(x, num_samples=6, seed=3, with_scales=True)
        head, net.presence_head = net.presence_head, None
        without = net.sample(x, num_samples=6, seed=3, with_scales=True)
        net.presence_head = head
        assert torch.equal(present["samples"], without["samples"]) and present["samples"].any()
        assert torch.equal(present["scales"], without["scales"])
        bias.fill_(-30.0)  # never present: every sample and every scale is the empty mask
        absent = net.sample(x, num_samples=6, seed=3, with_scales=True)
        assert not absent["samples"].any() and not absent["scales"].any()
        bias.zero_()  # p = 1/2: some samples of the same draws are kept, the others emptied
        drawn = net.sample(x, num_samples=6, seed=3, with_scales=True)
        half = drawn["samples"]
        kept = half.flatten(3).any(-1)
        assert torch.equal(half, present["samples"] & kept[..., None, None])  # the draws of the kept samples
        assert 0 < kept.sum() < present["samples"].flatten(3).any(-1).sum()
        # the coarse-to-fine masks shown are those of each image's first present sample
        present_BN = draw_presence(net.presence_head(net.encode_image(x).presence_BND)[:, 0], 6, class_seed(3, 0))
        shown_B = first_drawn(present_BN)
        assert (shown_B > 0).any() and present_BN[torch.arange(2), shown_B].all()  # sample 0 absent somewhere
        for b in range(2):
            assert torch.equal(drawn["scales"][b, 0, -1], half[b, 0, shown_B[b]])
        # the validation prediction is empty where the head says absent
        bias.fill_(-30.0)
        net.train()
        mask = torch.zeros(2, 1, 128, 128)
        mask[:, :, 40:70, 50:90] = 1
        pred = net(x, mask=mask, cls=0, with_prediction=True)["prediction"]
        assert (pred < 0).all()


def head_net(batch: int = 1, presence_bias: float = 30.0) -> tuple[ARSegNetwork, torch.Tensor]:
    """The recipe's network (a full-resolution head) and random images on which about half of the head's pixels are
    foreground; every image's presence logit is ``presence_bias`` (its weights start at 0; 30: always present)."""
    torch.manual_seed(0)
    net = build(plans_with_arseg(), "arseg_2d", 2).eval()
    x = torch.randn(batch, 1, 128, 128)
    with torch.no_grad():
        net.decoder.seg_layers[net.head_stage()].bias -= net.encode_image(x).aux_logits.median()
        net.presence_head.fc.bias.fill_(presence_bias)
    return net, x


class KeepDraws(list):
    """The recorder role of ``TileRecorder``: keeps what the eval forward drew."""
    wants_scales = False

    def record(self, samples_KN, scales_KS=None):
        self.append(samples_KN)


def eval_draws(net: ARSegNetwork, x: torch.Tensor, num_samples: int, **sampling) -> torch.Tensor:
    """The samples (K, N, *patch) the eval forward draws for the one image ``x`` with ``EvalSampling(**sampling)``."""
    kept = KeepDraws()
    net.eval_sampling = EvalSampling(num_samples=num_samples, seed=0, recorder=kept, **sampling)
    try:
        with torch.inference_mode():
            net(x)
    finally:
        net.eval_sampling = None
    return kept[0]


def test_the_default_samples_are_the_transformers_draws_and_the_scales_their_partial_decodes():
    """The default sampler is autoregressive: a present sample is the tokenizer's decode of the token maps the
    transformer draws with the class's seed (``sample_token_maps``), an absent one is empty, and the coarse-to-fine
    masks shown are the partial decodes of the shown sample's own token maps (scale k: its maps 1..k). This pins the
    seeding too: the same seed keeps its samples."""
    net, x = head_net(batch=2, presence_bias=0.3)  # p = 0.57: some samples absent
    out = net.sample(x, num_samples=6, seed=4, with_scales=True)
    with torch.no_grad():
        image = net.encode_image(x)
        present_BN = draw_presence(net.presence_head(image.presence_BND)[:, 0], 6, class_seed(4, 0))
        idx_list, f_hat, _ = sample_token_maps(net.transformer, net.tokenizer.quantizer, image.prefix_BND,
                                               torch.zeros(2, dtype=torch.long), 6, seed=class_seed(4, 0),
                                               top_k=net.top_k, active=present_BN.flatten())
        decoded = (net.tokenizer.decode_f_hat(f_hat) > 0)[:, 0].view(2, 6, *net.patch_size)
        expected = decoded & present_BN[..., None, None]
        assert 0 < present_BN.sum() < 12 and expected.flatten(2).any(-1).sum() >= 4  # drawn masks, not empties
        assert torch.equal(out["samples"][:, 0], expected)
        shown_B = first_drawn(present_BN)
        for b in range(2):
            row = b * 6 + int(shown_B[b])
            partial = net.tokenizer.idx_to_scale_logits([idx[row:row + 1] for idx in idx_list])
            assert len(partial) == out["scales"].shape[2]
            for k, logits in enumerate(partial):
                assert torch.equal(out["scales"][b, 0, k], logits[0, 0] > 0)
        assert not torch.equal(out["scales"][0, 0, 0], out["scales"][0, 0, -1])  # the picture builds up


def test_presence_temperature_reaches_the_draws_of_sample_and_of_the_eval_forward(monkeypatch):
    """``presence_temperature`` divides the presence logit: near 0 every sample of an image follows p > 1/2, very
    large it draws half of them; ``EvalSampling`` hands it to the eval forward (``nnUNetv2_arseg_predict``), else
    ``nnUNet_ARSEG_PRESENCE_TEMPERATURE`` (the stock ``nnUNetv2_predict``)."""
    monkeypatch.delenv("nnUNet_ARSEG_PRESENCE_TEMPERATURE", raising=False)
    net, x = head_net(batch=2, presence_bias=0.3)  # p = sigmoid(0.3) = 0.57 for every image

    def drawn_B(samples) -> list[int]:  # a present sample is the head's non-empty mask, an absent one empty
        return samples[:, 0].flatten(2).any(-1).sum(1).tolist()

    one = dict(num_samples=8, seed=1, sampler="head", outline_spread=0.0)  # one outline per image
    assert drawn_B(net.sample(x, **one)["samples"]) in ([4, 4], [4, 5], [5, 4], [5, 5])
    assert drawn_B(net.sample(x, **one, presence_temperature=1e-3)["samples"]) == [8, 8]
    assert drawn_B(net.sample(x, **one, presence_temperature=1e3)["samples"]) == [4, 4]
    with pytest.raises(ValueError, match="presence_temperature must be > 0"):
        net.sample(x, **one, presence_temperature=-1.0)
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(-0.3)  # p = 0.43: near temperature 0 no sample draws
    for temperature, variable, expected in ((None, None, None), (1e-3, None, 0), (None, "1e-3", 0)):
        if variable is not None:
            monkeypatch.setenv("nnUNet_ARSEG_PRESENCE_TEMPERATURE", variable)
        drawn = eval_draws(net, x[:1], 8, presence_temperature=temperature, sampler="head", outline_spread=0.0)
        count = int(drawn[0].flatten(1).any(-1).sum())
        assert count == expected if expected is not None else count in (3, 4)


def test_an_anchor_mask_is_kept_where_a_sample_is_present():
    net = build(plans_with_arseg(), "arseg_2d", 2).eval()
    x = torch.randn(2, 1, 128, 128)
    anchor = torch.zeros(2, 1, 128, 128, dtype=torch.bool)
    anchor[0, 0, 40:70, 50:90] = True  # image 1 has an empty anchor
    bias = net.presence_head.fc.bias
    with torch.no_grad():
        bias.fill_(30.0)  # always present
        free = net.sample(x, num_samples=4, seed=3)["samples"]  # the transformer's own draws
        around = dict(num_samples=4, seed=3, sampler="anchored", anchor=anchor)
        drawn = net.sample(x, **around, with_scales=True)  # every scale from the anchor
        out = drawn["samples"]
        assert torch.equal(out[0, 0], anchor[0, 0].expand(4, -1, -1))  # the anchor's own mask, not a reconstruction
        assert torch.equal(drawn["scales"][0, 0, -1], anchor[0, 0])  # the finest scale shown is the sample
        own = net.tokenizer.idx_to_logits(net.tokenizer.mask_to_idx(anchor[:1].float()))[0, 0]
        assert not torch.equal(own > 0, anchor[0, 0])  # its tokenized reconstruction differs
        assert not torch.equal(out[0], free[0])
        assert torch.equal(out[1], free[1])  # an empty anchor leaves the draws free
        # with only the coarse scales given, the finer ones are drawn and decoded
        coarse = net.sample(x, **around, anchor_scales=2)["samples"]
        assert not torch.equal(coarse[0, 0], out[0, 0])
        assert torch.equal(net.sample(x, **around, anchor_scales=0)["samples"], free)
        bias.fill_(-30.0)  # presence is still the model's: never present, no mask
        assert not net.sample(x, **around)["samples"].any()
        bias.fill_(30.0)
        # the eval forward takes anchors as the channels after the image's (nnU-Net's previous-stage channels)
        x_anchor = torch.cat((x[:1], anchor[:1].float()), 1)
        drawn = net.sample(x[:1], num_samples=net.num_samples, seed=content_seed(0, x_anchor), sampler="anchored",
                           anchor=anchor[:1])["samples"]
        with torch.inference_mode():
            logits = net(x_anchor)
        assert torch.equal(logits.softmax(1).argmax(1), fuse_labels(vote_frequency(drawn, dim=2), class_dim=1))
        with pytest.raises(ValueError, match="one per foreground label"):
            net(torch.cat((x_anchor, x_anchor[:, 1:]), 1))
        with pytest.raises(ValueError, match="anchor_scales"):
            net.sample(x, **around, anchor_scales=len(net.tokenizer.scales) + 1)
        with pytest.raises(ValueError, match="takes no anchor masks"):
            net.sample(x, num_samples=2, anchor=anchor)  # anchors are the anchored sampler's


def test_the_anchored_sampler_takes_the_models_own_head_where_no_anchor_is_given():
    """``sampler="anchored"`` without anchor masks samples around the U-Net head's mask at patch size (from its logits
    averaged over the image's mirrorings unless ``mirror_head=False``), in ``sample`` and in the eval forward, as
    around an outside mask; the head sampler at one outline per image (``outline_spread=0``) gives the same masks."""
    net = build(plans_with_arseg(), "arseg_2d", 2).eval()
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(30.0)  # always present
        seg_layer = net.decoder.seg_layers[net.head_stage()]
        seg_layer.bias -= net.encode_image(x).aux_logits.median()  # about half the head's cells foreground
        plain = net.encode_image(x).aux_logits
        head = net.head_masks(net.head_logits(x, plain))
        assert head.shape == (2, 1, 128, 128) and 0.2 < head.float().mean() < 0.8
        assert not torch.equal(head, net.head_masks(plain))
        one = dict(num_samples=4, seed=3, sampler="anchored")
        assert torch.equal(net.sample(x, **one, mirror_head=False)["samples"],
                           net.sample(x, **one, anchor=net.head_masks(plain))["samples"])
        # mirroring the image mirrors the mirrored head's logits (up to float rounding)
        flipped = net.head_logits(x.flip(3), net.encode_image(x.flip(3)).aux_logits)
        assert torch.allclose(flipped.flip(3), net.head_logits(x, plain), atol=1e-4)
        out = net.sample(x, **one)["samples"]
        assert torch.equal(out, net.sample(x, **one, anchor=head)["samples"])
        assert torch.equal(out, net.sample(x, num_samples=4, seed=3, sampler="head", outline_spread=0.0)["samples"])
        assert not torch.equal(out, net.sample(x, num_samples=4, seed=3)["samples"])
        assert torch.equal(net.sample(x, **one, anchor_scales=2)["samples"],
                           net.sample(x, **one, anchor=head, anchor_scales=2)["samples"])
        net.eval_sampling = EvalSampling(num_samples=4, seed=0, sampler="anchored")
        with torch.inference_mode():
            logits = net(x[:1])
        net.eval_sampling = None
        # the head of the one image as the eval forward computes it (a batch of two may round a pixel otherwise)
        head_1 = net.head_masks(net.head_logits(x[:1], net.encode_image(x[:1]).aux_logits))
        drawn = net.sample(x[:1], num_samples=4, seed=content_seed(0, x[:1]), sampler="anchored",
                           anchor=head_1)["samples"]
        assert torch.equal(logits.softmax(1).argmax(1), fuse_labels(vote_frequency(drawn, dim=2), class_dim=1))
        with pytest.raises(ValueError, match="sampler 'head' takes no anchor masks"):
            net.sample(x, num_samples=2, sampler="head", anchor=head)


def test_samples_around_the_head_threshold_its_probability_at_levels_of_their_own(monkeypatch):
    """Around the head every drawn sample is the head's probability map thresholded at its own level, the drawn
    samples' levels spread evenly over 1/2 +- ``outline_spread``: at 0.5 a pixel is in a share of them within 1/(2N)
    of its probability, at 0 each is the head's mask; the eval forward takes the spread from ``EvalSampling``, else
    ``nnUNet_ARSEG_OUTLINE_SPREAD``."""
    monkeypatch.delenv("nnUNet_ARSEG_OUTLINE_SPREAD", raising=False)
    net, x = head_net()  # always present
    with torch.no_grad():
        prob = torch.sigmoid(net.head_at_patch(net.head_logits(x, net.encode_image(x).aux_logits)))[0, 0]
        full = net.sample(x, num_samples=8, seed=3, sampler="head", outline_spread=0.5)["samples"][0, 0]
        one = net.sample(x, num_samples=8, seed=3, sampler="head", outline_spread=0.0)["samples"][0, 0]
        tight = net.sample(x, num_samples=8, seed=3, sampler="head", outline_spread=0.25)["samples"][0, 0]
    assert 0.05 < ((prob > 0.1) & (prob < 0.9)).float().mean()  # the map has levels to spread over

    def at_level(mask, level) -> bool:  # up to pixels whose probability rounds to the level
        return bool(((mask != (prob > level)) <= ((prob - level).abs() < 1e-5)).all())

    for k in range(8):  # the k-th drawn sample: stratum j = (k + 4) % 8, level (j + 1/2) / 8 (spread 0.5)
        j = (k + 4) % 8
        assert at_level(full[k], (j + 0.5) / 8)
        assert at_level(tight[k], 0.5 + 0.25 * (2 * (j + 0.5) / 8 - 1))
        assert at_level(one[k], 0.5)
    assert ((full.float().mean(0) - prob).abs() <= 1 / 16 + 1e-5).all()
    assert full[4].sum() > tight[4].sum() > one[4].sum() > tight[3].sum() > full[3].sum()  # lowest, highest levels
    with torch.no_grad():  # p = 1/2: the drawn samples share out the levels, the absent ones stay empty
        net.presence_head.fc.bias.zero_()
        half = net.sample(x, num_samples=8, seed=3, sampler="head", outline_spread=0.5)["samples"][0, 0]
        present_N = draw_presence(net.presence_head(net.encode_image(x).presence_BND)[:, 0], 8, class_seed(3, 0))[0]
    count = int(present_N.sum())
    assert 0 < count < 8 and not half[~present_N].any()
    for k, n in enumerate(present_N.nonzero()[:, 0].tolist()):
        assert at_level(half[n], ((k + count // 2) % count + 0.5) / count)
    with pytest.raises(ValueError, match=r"outline_spread must be in \[0, 0.5\]"):
        net.sample(x, num_samples=8, sampler="head", outline_spread=0.6)
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(30.0)
    seed = content_seed(0, x)
    for spread, variable, expected in ((None, None, 0.5), (0.0, None, 0.0), (None, "0", 0.0), (0.5, "0", 0.5)):
        if variable is not None:
            monkeypatch.setenv("nnUNet_ARSEG_OUTLINE_SPREAD", variable)
        drawn = eval_draws(net, x, 8, sampler="head", outline_spread=spread)
        with torch.no_grad():
            assert torch.equal(drawn, net.sample(x, num_samples=8, seed=seed, sampler="head",
                                                 outline_spread=expected)["samples"][0])


def test_the_eval_forward_draws_autoregressively_unless_told_otherwise(monkeypatch):
    """Every model's eval forward (``nnUNetv2_predict``, the final validation) draws with the autoregressive sampler,
    the transformer's own draws, whatever its head; ``EvalSampling.sampler``, else ``nnUNet_ARSEG_SAMPLER``, names
    another; anchor channels in the input mean the anchored sampler, and refuse any other."""
    monkeypatch.delenv("nnUNet_ARSEG_SAMPLER", raising=False)
    net, x = head_net()  # always present

    def draws(model, inputs=x, **sampling):
        return eval_draws(model, inputs, 4, **sampling)

    seed = content_seed(0, x)
    own = net.sample(x, num_samples=4, seed=seed)["samples"][0]
    around_head = net.sample(x, num_samples=4, seed=seed, sampler="head")["samples"][0]
    assert not torch.equal(around_head, own)
    assert torch.equal(draws(net), own)
    assert torch.equal(draws(net, sampler="autoregressive"), own)
    assert torch.equal(draws(net, sampler="head"), around_head)
    monkeypatch.setenv("nnUNet_ARSEG_SAMPLER", "head")
    assert torch.equal(draws(net), around_head)
    assert torch.equal(draws(net, sampler="autoregressive"), own)  # the predictor's choice comes first
    monkeypatch.setenv("nnUNet_ARSEG_SAMPLER", "heads")
    with pytest.raises(ValueError, match="sampler 'heads'"):
        draws(net)
    monkeypatch.delenv("nnUNet_ARSEG_SAMPLER")
    outside = torch.zeros(1, 1, 128, 128)
    outside[..., 40:90, 30:100] = 1
    with_anchor = torch.cat([x, outside], 1)
    expected = net.sample(x, num_samples=4, seed=content_seed(0, with_anchor), sampler="anchored",
                          anchor=outside.bool())["samples"][0]
    assert torch.equal(draws(net, with_anchor), expected)
    with pytest.raises(ValueError, match="only the 'anchored' sampler takes"):
        draws(net, with_anchor, sampler="head")
    latent = build(plans_with_arseg(aux_full_resolution=False), "arseg_2d", 2).eval()
    latent.load_state_dict(net.state_dict())
    assert torch.equal(draws(latent), latent.sample(x, num_samples=4, seed=seed)["samples"][0])


def test_region_anchors_are_unions_of_their_labels():
    """A region-based model takes the anchor as nnU-Net's one-hot label channels; each region samples around the
    union of its labels (nnU-Net paints nested regions as labels, e.g. BraTS)."""
    net = build(plans_with_arseg(has_regions=True, regions=[[1, 2], [2]], num_samples=3), "arseg_3d", 2).eval()
    x = torch.randn(1, 1, *net.patch_size)
    labels = torch.zeros(1, 2, *net.patch_size)
    labels[0, 0, 4:10, 8:20, 8:20] = 1  # label 1: in region 0 only
    labels[0, 1, 6:9, 12:16, 12:16] = 1  # label 2: in both regions
    regions = net.anchor_masks(labels > 0.5)
    assert torch.equal(regions[:, 0], labels.amax(1) > 0.5) and torch.equal(regions[:, 1], labels[:, 1] > 0.5)
    x_anchor = torch.cat((x, labels), 1)
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(30.0)  # always present
        drawn = net.sample(x, num_samples=3, seed=content_seed(0, x_anchor), sampler="anchored",
                           anchor=regions)["samples"]
        for k in range(2):  # every sample: its region's anchor
            assert torch.equal(drawn[0, k], regions[0, k].expand(3, *net.patch_size))
        with torch.inference_mode():
            logits = net(x_anchor)
        assert torch.equal(logits.sigmoid() > 0.5, vote_frequency(drawn, dim=2) > 0.5)
        with pytest.raises(ValueError, match=r"one per foreground label \(2: \[1, 2\]\)"):
            net(torch.cat((x_anchor, labels[:, :1]), 1))
    old = build(plans_with_arseg(has_regions=True, num_samples=3), "arseg_3d", 2)  # plans without the regions
    with pytest.raises(ValueError, match="retrain"):
        old.anchor_masks(labels > 0.5)


def lidc_slices(root, count: int, crop: int = 64):
    """The first slice of the first ``count`` nodules whose consensus (>= 3 of 4 raters) is non-empty."""
    from skimage.io import imread
    images, masks = [], []
    for nodule in sorted(root.glob("LIDC-IDRI-*/nodule-*")):
        first = sorted(nodule.glob("images/slice-*.png"))[0]
        votes = np.stack([imread(nodule / f"mask-{r}" / first.name) > 0 for r in range(4)]).sum(0)
        if (votes > 2).sum() > 20:
            images.append(imread(first))
            masks.append(votes > 2)
        if len(images) == count:
            break
    lo = (images[0].shape[0] - crop) // 2
    x = torch.tensor(np.stack(images)[:, None, lo:lo + crop, lo:lo + crop], dtype=torch.float32) / 255.0
    m = torch.tensor(np.stack(masks)[:, None, lo:lo + crop, lo:lo + crop], dtype=torch.float32)
    return (x - x.mean()) / x.std(), m


def dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    return 2 * (a & b).sum(1) / (a.sum(1) + b.sum(1)).clamp_min(1)


def test_overfits_real_lidc_slices(lidc_demo):
    """Tokenizer then segmentor on 4 real slices, each trained to a criterion under a generous step cap (so another
    CPU's arithmetic changes how many steps it takes, not whether it gets there): the sampled consensus then
    reproduces the tokenized masks, which reproduce the raters' masks."""
    torch.manual_seed(0)
    x, m = lidc_slices(lidc_demo, 4)
    net = ARSegNetwork(1, 2, patch_size=(64, 64), n_stages=4, features_per_stage=[8, 16, 32, 64],
                       conv_op=torch.nn.Conv2d, kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=1,
                       n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                       norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                       tokenizer={**TINY_TOKENIZER, "space_to_depth": 2, "latent_stride": 8},  # latent 8x8, K = 8
                       transformer={"width": 64, "depth": 2, "heads": 4, "dropout": 0.0},
                       embedding="linear", prefix_source="decoder", aux_head=True, num_samples=8)
    cfg = TokenizerFitConfig(max_steps=1500, batch_size=4, lr=1e-2, warmup_steps=20, eval_every=25,
                             target_dice=0.9, target_empty=1.0)
    net.tokenizer.requires_grad_(True)
    state = fit_tokenizer(net.tokenizer, lambda rng, b: m[rng.integers(len(m), size=b)], m, cfg, log=lambda _: None)
    net.tokenizer.requires_grad_(False)
    assert state["history"][-1]["dice_nonempty"] >= 0.9, state["history"]
    with torch.no_grad():
        recon = net.tokenizer.idx_to_logits(net.tokenizer.mask_to_idx(m)) > 0
    net.train()
    opt = torch.optim.AdamW(net.trainable_parameters(), 2e-3)
    cls = torch.zeros(len(x), dtype=torch.long)
    history = []
    for _ in range(1000):
        out = net(x, mask=m, cls=cls)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(out["token_ce"])
        if out["token_ce"] < 0.02:
            break
    assert history[0] > 3.0 and history[-1] < 0.02, history[::50]
    consensus = majority_vote(net.sample(x, 8, seed=0)["samples"], dim=2)[:, 0]
    assert dice(consensus, recon).min() > 0.9  # the segmentor reproduces the tokens it was trained on
    assert dice(recon, m).mean() >= 0.9 and dice(recon, m).min() > 0.6  # ... which reproduce the masks


def test_each_distinct_token_map_is_decoded_once_with_the_same_masks():
    net = build(plans_with_arseg(), "arseg_2d", 2).eval()
    torch.manual_seed(3)
    q = net.tokenizer.quantizer
    idx_list = [torch.randint(0, q.V, (3, *pn)) for pn in q.scales]
    idx_list = [idx[[0, 1, 0, 2, 1, 0]] for idx in idx_list]  # six rows, three distinct token maps
    f_hat = q.idx_to_f_hat(idx_list)
    calls = []
    hook = net.tokenizer.decoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with torch.no_grad():
        deduped = net.decode_masks(f_hat, idx_list)
        hook.remove()
        every_row = net.decode_masks(f_hat)
    assert sum(calls) == 3 and torch.equal(deduped, every_row)
    assert deduped.shape == (6, *net.patch_size)
