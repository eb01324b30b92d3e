"""How AR-Seg's cost grows with the patch, next to nnU-Net's: tokens per sample, seconds per training step and per
N-sample prediction of one patch, at 128x128, 256x256, 512x512 and a 3D patch.

    python benchmarks/cost_scaling.py [--preset small] [--batch_size 2] [--num_samples 16] [--rounds 3] [--threads 2]

For each patch size the U-Net is the one nnU-Net's planner would make (features 32 doubling to 512, stride-2 stages
down to a 4-voxel bottleneck, 2 convolutions per stage), AR-Seg wraps it at ``--preset``'s size with the latent
stride ``choose_latent_stride`` picks for objects of the LIDC nodules' median extent (10 voxels): the finest token map
is capped at 256 positions, so the sequence length stops growing once the cap is reached. A training step is forward
and backward on ``--batch_size`` random patches (nnU-Net: cross-entropy on its full-resolution output; AR-Seg: its
segmentor loss); a prediction is one patch (nnU-Net: with mirroring, 4 passes in 2D and 8 in 3D; AR-Seg: N samples).
Times are the minimum over ``--rounds`` interleaved rounds, in this one process (weights do not change timing).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_arseg.network import ARSegNetwork, build_arseg_architecture
from nnunet_arseg.training.tokenizer_store import choose_latent_stride

PATCHES = [(128, 128), (256, 256), (512, 512), (64, 128, 128)]


def stock_architecture(patch) -> dict:
    """nnU-Net's default PlainConvUNet entry for ``patch`` (as its planner sizes it)."""
    dims = len(patch)
    n_stages = int(math.log2(min(patch) / 4)) + 1
    conv, norm = ("Conv2d", "InstanceNorm2d") if dims == 2 else ("Conv3d", "InstanceNorm3d")
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages,
                            "features_per_stage": [min(32 * 2 ** i, 512) for i in range(n_stages)],
                            "conv_op": f"torch.nn.modules.conv.{conv}", "kernel_sizes": [[3] * dims] * n_stages,
                            "strides": [[1] * dims] + [[2] * dims] * (n_stages - 1),
                            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build(patch, preset: str, num_samples: int):
    import pydoc
    arch = stock_architecture(patch)
    kw = {k: pydoc.locate(v) if k in arch["_kw_requires_import"] and v else v for k, v in arch["arch_kwargs"].items()}
    stock = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **kw)
    stride = choose_latent_stride(patch, (10.0,) * len(patch))
    ours = build_arseg_architecture(arch, patch, preset, num_samples=num_samples,
                                    tokenizer={"latent_stride": list(stride)})
    ar = ARSegNetwork(1, 2, **ours["arch_kwargs"])
    return stock, ar


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for patch in PATCHES:
        stock, ar = build(patch, args.preset, args.num_samples)
        x = torch.randn(args.batch_size, 1, *patch)
        mask = torch.zeros(args.batch_size, 1, *patch)
        centre = tuple(slice(n // 2 - 5, n // 2 + 5) for n in patch)
        mask[(slice(None), slice(None), *centre)] = 1
        flips = [()] + [(d,) for d in range(2, 2 + len(patch))] + ([(2, 3)] if len(patch) == 2 else
                                                                    [(2, 3), (2, 4), (3, 4), (2, 3, 4)])

        def stock_step():
            stock.train()
            loss = F.cross_entropy(stock(x), mask[:, 0].long())
            loss.backward()

        def ar_step():
            ar.train()
            ar(x, mask=mask)["loss"].backward()

        def stock_predict():
            stock.eval()
            with torch.inference_mode():
                sum(stock(x[:1].flip(f) if f else x[:1]) for f in flips)

        def ar_predict():
            with torch.inference_mode():
                ar.sample(x[:1], args.num_samples, seed=0)

        times = {k: [] for k in ("stock_step", "ar_step", "stock_predict", "ar_predict")}
        for _ in range(args.rounds):
            for name, fn in (("stock_step", stock_step), ("ar_step", ar_step), ("stock_predict", stock_predict),
                             ("ar_predict", ar_predict)):
                times[name].append(timed(fn))
        row = {"patch": list(patch), "latent": list(ar.tokenizer.latent_shape),
               "tokens_per_sample": sum(math.prod(pn) for pn in ar.tokenizer.scales),
               "prefix_tokens": ar.transformer.num_prefix, **{k: round(min(v), 3) for k, v in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'patch':<16}{'latent':<12}{'tokens':>7}{'nnU-Net step':>13}{'AR step':>9}{'x':>6}"
          f"{'nnU-Net pred':>13}{'AR N=' + str(args.num_samples):>9}{'x':>6}{'growth nnU-Net / AR':>22}")
    for r in rows:
        growth = (f"{r['stock_predict'] / base['stock_predict']:.1f} / {r['ar_predict'] / base['ar_predict']:.1f}"
                  if len(r["patch"]) == 2 else "-")
        print(f"{'x'.join(map(str, r['patch'])):<16}{'x'.join(map(str, r['latent'])):<12}{r['tokens_per_sample']:>7}"
              f"{r['stock_step']:>13.3f}{r['ar_step']:>9.3f}{r['ar_step'] / r['stock_step']:>6.2f}"
              f"{r['stock_predict']:>13.3f}{r['ar_predict']:>9.3f}{r['ar_predict'] / r['stock_predict']:>6.2f}"
              f"{growth:>22}")
    print(json.dumps({"preset": args.preset, "threads": args.threads, "batch_size": args.batch_size,
                      "num_samples": args.num_samples, "rows": rows}))


if __name__ == "__main__":
    main()
