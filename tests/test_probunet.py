"""The Probabilistic U-Net baseline: the network on real LIDC crops (ELBO, prior and posterior, seeded sampling) and
end to end with the real nnU-Net commands (plan, train ``nnUNetTrainerProbUNet_tiny``, both predict commands,
evaluate)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lidc_model import lidc_crops
from nnunet_arseg.baselines.probunet import ProbUNetNetwork

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PY = sys.executable
BIN = Path(PY).parent
UNET = dict(n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op="torch.nn.Conv2d", kernel_sizes=[[3, 3]] * 4,
            strides=[[1, 1]] + [[2, 2]] * 3, n_conv_per_stage=[1] * 4, n_conv_per_stage_decoder=[1] * 3,
            conv_bias=True, norm_op="torch.nn.InstanceNorm2d", norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})


def small_net(seed: int = 0) -> ProbUNetNetwork:
    torch.manual_seed(seed)
    return ProbUNetNetwork(1, 2, num_samples=4, **UNET)


@pytest.fixture(scope="module")
def crops():
    """Four real 64x64 LIDC crops (z-scored) and their four raters' masks (B, 4, 64, 64)."""
    data = lidc_crops(4, size=64)
    x = torch.stack([torch.tensor(image, dtype=torch.float32) for _, image, _ in data])[:, None]
    return (x - x.mean()) / x.std(), torch.stack([torch.tensor(r, dtype=torch.float32) for _, _, r in data])


@pytest.fixture(scope="module")
def trained(crops):
    """A small network trained 30 Adam steps on one randomly drawn rater per crop; its (recon, kl) per step."""
    x, raters = crops
    net = small_net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        mask = raters[torch.arange(len(x)), torch.randint(raters.shape[1], (len(x),), generator=gen)][:, None]
        out = net(x, mask=mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["recon"], out["kl"]))
    return net.eval(), history


def test_elbo_is_reconstruction_plus_the_closed_form_kl(crops):
    x, raters = crops
    net = small_net()
    mask = raters[:, :1]
    torch.manual_seed(1)
    out = net(x, mask=mask, with_prediction=True)
    prior = net.prior(x).base_dist
    post = net.posterior(torch.cat((x, mask), 1)).base_dist
    mp, sp, mq, sq = prior.loc, prior.scale, post.loc, post.scale
    kl_B = (torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5).sum(1)
    assert (kl_B > 0).all()  # the posterior sees the mask, so it differs from the prior
    assert out["kl"] == pytest.approx(kl_B.mean().item(), rel=1e-4)
    # recon: cross-entropy summed over the pixels; at initialisation about log 2 per pixel
    assert out["recon"] == pytest.approx(out["loss"].item() - out["kl"], rel=1e-4)
    assert 0.3 * 64 * 64 < out["recon"] < 3 * 64 * 64
    assert out["prediction"].shape == (4, 2, 64, 64)
    with pytest.raises(ValueError, match="cannot sample around anchor masks"):
        net.eval()(torch.cat((x, mask), 1))
    with pytest.raises(ValueError, match="no coarse-to-fine scales"):
        net.sample(x, 2, with_scales=True)


def test_training_uses_the_posterior_and_the_loss_decreases(crops, trained):
    x, raters = crops
    net, history = trained
    calls = {"prior": 0, "posterior": 0}
    hooks = [getattr(net, k).register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for k in calls]
    try:
        net.zero_grad()
        net.beta = 0.0  # the reconstruction alone: its z is the posterior's, not the prior's
        try:
            net.train()(x, mask=raters[:, :1])["loss"].backward()
        finally:
            net.beta = 1.0
        assert calls == {"prior": 1, "posterior": 1}
        assert net.posterior.to_params.weight.grad.abs().sum() > 0
        assert not net.prior.to_params.weight.grad.any()
        calls.update(prior=0, posterior=0)
        net.eval().sample(x, 8, seed=0)
        assert calls == {"prior": 1, "posterior": 0}  # sampling: the prior, the image encoded once for all N
    finally:
        for h in hooks:
            h.remove()
    first, last = np.mean(history[:5], 0), np.mean(history[-5:], 0)
    assert last[0] < 0.95 * first[0] and last[1] < first[1], history


def test_samples_are_prior_draws_seeded_and_reproducible(crops, trained):
    x, _ = crops
    net, _ = trained
    a = net.sample(x, 6, seed=3)["samples"]
    assert a.shape == (4, 1, 6, 64, 64) and a.dtype == torch.bool
    assert torch.equal(a, net.sample(x, 6, seed=3)["samples"])
    assert not torch.equal(a, net.sample(x, 6, seed=4)["samples"])
    assert (a != a[:, :, :1]).flatten(2).any(-1).all()  # different z, different masks, on every crop
    # temperature scales the prior's sigma: near 0 every sample is the mask of the prior's mean
    cold = net.sample(x, 3, seed=3, temperature=1e-6)["samples"]
    mean_mask = net.masks_from_logits(net.combine(net.encode_image(x)[0], net.prior(x).mean))
    assert torch.equal(cold, mean_mask[:, :, None].expand_as(cold))
    # the eval forward: the consensus of N samples, each image seeded by its content (the same for the same tile)
    logits = net(x)
    assert logits.shape == (4, 2, 64, 64) and torch.isfinite(logits).all()
    assert torch.equal(net(x[2:3]), logits[2:3])


# ---------------------------------------------------------------- end to end
DATASET_ID = 511
DATASET = f"Dataset{DATASET_ID}_LIDC"
TRAINER = "nnUNetTrainerProbUNet_tiny"
PATIENTS = ("LIDC-IDRI-0002", "LIDC-IDRI-0005", "LIDC-IDRI-0006")


def _run(cmd: list[str], env: dict) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


@pytest.mark.e2e
def test_probunet_trains_predicts_and_is_scored_end_to_end(lidc_demo, nnunet_env, tmp_path, monkeypatch):
    from nnunet_arseg.evaluation import evaluate
    from nnunet_arseg.inference import predict
    from nnunet_arseg.nnunet_ext import EXT_DIR
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    src = tmp_path / "lidc_in"
    src.mkdir()
    for p in PATIENTS:
        (src / p).symlink_to(lidc_demo / p)
    _run([PY, "-m", "dataset_conversion.lidc", "-i", str(src), "-d", str(DATASET_ID), "--test_fraction", "0.34",
          "--disable_progress_bar"], env)
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
          "--no_pbar"], env)
    _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"],
         {**env, "nnUNet_n_proc_DA": "0", "nnUNet_extTrainer": EXT_DIR})

    results = Path(nnunet_env["nnUNet_results"]) / DATASET
    fold = results / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    assert sorted(p.name for p in results.iterdir()) == [f"{TRAINER}__nnUNetPlans__2d"]  # no tokenizer trained
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and all(np.isfinite(ckpt["logging"]["train_losses"]))
    assert any(k.startswith("posterior.") for k in ckpt["network_weights"])
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"] == \
        "nnunet_arseg.baselines.probunet.ProbUNetNetwork"
    summary = json.loads((fold / "validation" / "summary_arseg.json").read_text())
    assert summary["num_samples"] == 4 and np.isfinite(summary["mean"]["0"]["GED"])

    images = Path(nnunet_env["nnUNet_raw"]) / DATASET / "imagesTs"
    ours, stock = tmp_path / "pred", tmp_path / "pred_stock"
    common = ["-i", str(images), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu",
              "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    _run([str(BIN / "nnUNetv2_arseg_predict"), "-o", str(ours), *common, "--num_samples", "4", "--save_samples",
          "--save_uncertainty", "--seed", "7"], env)
    _run([str(BIN / "nnUNetv2_predict"), "-o", str(stock), *common],
         {**env, "nnUNet_ARSEG_NUM_SAMPLES": "4", "nnUNet_ARSEG_SEED": "7", "nnUNet_extTrainer": EXT_DIR})
    cases = sorted(p.name.replace("_0000", "") for p in images.glob("*_0000.png"))
    assert cases and sorted(p.name for p in ours.glob("*.png")) == cases
    for name in cases:  # the stock command gives the consensus of the same samples
        np.testing.assert_array_equal(np.asarray(Image.open(ours / name)), np.asarray(Image.open(stock / name)))
        samples = np.stack([np.asarray(Image.open(ours / "samples" / f"{name[:-4]}_sample{k:02d}.png"))
                            for k in range(4)])
        majority = (2 * (samples > 0).sum(0) > 4).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(ours / name)), majority)
        assert (ours / "uncertainty" / f"{name[:-4]}.npz").is_file()

    # in this process (the commands' own main): --save_scales refused before anything is written, then the scoring
    monkeypatch.setenv("nnUNet_extTrainer", EXT_DIR)
    with pytest.raises(SystemExit, match="--save_scales: the model of -tr nnUNetTrainerProbUNet_tiny draws each "
                                         "mask at once"):
        predict.main(["-o", str(tmp_path / "refused"), *common, "--save_scales"])
    assert not (tmp_path / "refused").exists()
    evaluate.main(["-i", str(ours), "-d", str(DATASET_ID)])
    scores = json.loads((ours / "summary_arseg.json").read_text())
    assert len(scores["metric_per_case"]) == len(cases)
    mean = next(iter(scores["mean"].values()))
    assert all(0 <= mean[k] <= 1 for k in ("HM-IoU", "Soft-Dice")) and 0 <= mean["GED"] <= 2
