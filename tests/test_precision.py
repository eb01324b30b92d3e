"""Mixed precision: nnU-Net's choice of autocast dtype and loss scaler per device, and the tokenizer in fp32 inside an
autocast (token targets, anchors and decodes as in fp32), on real LIDC slices. The trainer's own steps under bf16
and fp16 with a GradScaler: test_e2e_nnunet.py."""
from __future__ import annotations

import pytest
import torch
from test_network import TINY_TOKENIZER, lidc_slices

from nnunet_arseg.network import ARSegNetwork
from nnunet_arseg.training import precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net_and_slices(lidc_demo):
    """A small 2D network (random weights, seeded; no presence head, so every sample is a token draw) and 4 real
    LIDC slices with their consensus masks."""
    torch.manual_seed(0)
    net = ARSegNetwork(1, 2, patch_size=(64, 64), n_stages=4, features_per_stage=[8, 16, 32, 64],
                       conv_op=torch.nn.Conv2d, kernel_sizes=3, strides=[1, 2, 2, 2], n_conv_per_stage=1,
                       n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                       norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                       tokenizer={**TINY_TOKENIZER, "space_to_depth": 2, "latent_stride": 8},
                       transformer={"width": 64, "depth": 2, "heads": 4, "dropout": 0.0},
                       embedding="linear", prefix_source="decoder", aux_head=True, presence=False)
    return net, *lidc_slices(lidc_demo, 4)


def test_autocast_dtype_and_scaler_as_nnunet_chooses_them():
    cpu = torch.device("cpu")
    assert precision.autocast_dtype(cpu) is None  # nnU-Net trains without autocast off CUDA
    assert precision.grad_scaler(None, cpu) is None and precision.grad_scaler(torch.bfloat16, cpu) is None
    assert precision.grad_scaler(torch.float16, cpu).is_enabled()
    with precision.autocast(cpu, torch.bfloat16):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with precision.autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        native = torch.cuda.get_device_capability(gpu)[0] >= 8 or bool(torch.version.hip)
        assert precision.autocast_dtype(gpu) == (torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_targets_are_the_fp32_ones_under_autocast(net_and_slices, dtype):
    """The teacher-forcing inputs (made from the mask's tokens) are bit-identical to fp32's and fp32 themselves; the
    loss of the same weights is within 5 % of fp32's."""
    net, x, m = net_and_slices
    seen = []
    hook = net.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[1].detach().clone()))
    cls = torch.zeros(len(x), dtype=torch.long)
    try:
        net.train()
        with torch.no_grad():
            ref = net(x, mask=m, cls=cls)
            with torch.autocast("cpu", dtype=dtype):
                low = net(x, mask=m, cls=cls, with_prediction=True)
    finally:
        hook.remove()
    assert seen[1].dtype == torch.float32 and torch.equal(seen[0], seen[1])
    assert low["prediction"].dtype == torch.float32  # decoded by the tokenizer in fp32
    assert abs(low["loss"].item() - ref["loss"].item()) < 0.05 * ref["loss"].item()
    assert abs(low["token_ce"] - ref["token_ce"]) < 0.05 * ref["token_ce"]


def test_sampling_under_autocast(net_and_slices):
    """Anchored on every scale, each sample is the anchor's fp32 tokens decoded in fp32: the same masks as without
    autocast. Free draws: the transformer's bf16 logits move few draws."""
    net, x, m = net_and_slices
    net.eval()
    anchored = net.sample(x, 2, seed=0, sampler="anchored", anchor=m.bool())["samples"]
    free = net.sample(x, 4, seed=0)["samples"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net.sample(x, 2, seed=0, sampler="anchored", anchor=m.bool())["samples"], anchored)
        free_bf16 = net.sample(x, 4, seed=0)["samples"]
    assert (free_bf16 == free).float().mean() > 0.8
