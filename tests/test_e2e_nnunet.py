"""End to end with the real nnU-Net commands on real LIDC crops: convert, plan and preprocess, train the tiny AR-Seg
variant (both phases), kill and resume with ``--c``, ``--val``, predict with both commands, and check the files."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnunet_arseg.prediction_files import ARGS_FILE

pytestmark = pytest.mark.e2e

PY = sys.executable
BIN = Path(PY).parent
DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_LIDC"
TRAINER = "nnUNetTrainerARSeg_tiny"
PATIENTS = ("LIDC-IDRI-0002", "LIDC-IDRI-0005", "LIDC-IDRI-0006", "LIDC-IDRI-0010")


def _run(cmd: list[str], env: dict, timeout: int = 600) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _env(base: dict, **extra) -> dict:
    """The test's nnU-Net environment; ``nnUNet_n_proc_DA`` only where given (planning crashes with 0)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    return {**env, **base, **extra}


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def trained(lidc_demo, tmp_path_factory):
    """Converted, preprocessed and trained (with one kill + ``--c``) tiny AR-Seg model; shared by all tests."""
    root = tmp_path_factory.mktemp("e2e")
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    base = {**paths, "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(Path(__import__(
        "nnunet_arseg.nnunet_ext", fromlist=["EXT_DIR"]).EXT_DIR))}
    src = root / "lidc_in"
    src.mkdir()
    for p in PATIENTS:
        (src / p).symlink_to(lidc_demo / p)
    _run([PY, "-m", "dataset_conversion.lidc", "-i", str(src), "-d", str(DATASET_ID), "--test_fraction", "0.25",
          "--disable_progress_bar"], _env(base))
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
          "--no_pbar"], _env(base))

    train_env = _env(base, nnUNet_n_proc_DA="0")
    train_cmd = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = Path(paths["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    # run 1 is killed while the tokenizer trains, run 2 (--c) early in epoch 1 (a tenth of epoch 0's time into it:
    # epoch 0 also pays one-time costs, and a third of it has outlasted a whole later epoch; epoch 0 checkpointed),
    # run 3 finishes
    logs = [_run_until_killed(train_cmd, train_env, root / "train1.log", "tokenizer step 20/"),
            _run_until_killed(train_cmd + ["--c"], train_env, root / "train2.log", "Epoch 1\n",
                              wait=lambda out: float(re.findall(r"Epoch time: ([\d.]+) s", out)[-1]) / 10)]
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()
    saved_epoch = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"]
    logs.append(_run(train_cmd + ["--c"], train_env))
    return {"root": root, "base": base, "fold": fold, "logs": logs, "paths": paths, "saved_epoch": saved_epoch}


def _run_until_killed(cmd: list[str], env: dict, log: Path, marker: str, wait=lambda out: 0.0) -> str:
    """Start ``cmd`` and SIGKILL it ``wait(output)`` seconds after its output contains ``marker``; returns the
    output."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and marker not in log.read_text():
            time.sleep(0.1)
        if proc.poll() is None:
            time.sleep(wait(log.read_text()))
        assert proc.poll() is None, f"training ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_tokenizer_once_then_segmentor_epochs_and_resume(trained):
    log1, log2, log3 = trained["logs"]
    fold = trained["fold"]
    tok_dir = next((Path(trained["paths"]["nnUNet_results"]) / DATASET / "ARSegTokenizer__nnUNetPlans__2d").iterdir())
    # the dataset's tokenizer: trained in run 1, resumed from its own checkpoint in run 2, never again in run 3
    assert "Training the dataset's mask tokenizer" in log1 and "resuming at step 20" in log2
    assert "Training the dataset's mask tokenizer" not in log3 and "Epoch 0\n" not in log3
    # run 2 was killed inside epoch 1 (begun, never finished); run 3 continued from the epoch checkpointed before
    assert "Epoch 1\n" in log2 and log2.count("Epoch time:") == 1 and trained["saved_epoch"] == 1
    assert "checkpoint_latest.pth loaded, 1 of 3 epochs done" in log3 and "Epoch 1\n" in log3
    stored = torch.load(tok_dir / "tokenizer.pth", map_location="cpu", weights_only=False)
    assert 20 < stored["summary"]["steps"] <= 60 and (tok_dir / "progress.png").is_file()
    assert not (tok_dir / "tokenizer_latest.pth").exists() and not (tok_dir / ".lock").exists()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and ckpt["inference_allowed_mirroring_axes"] is None
    assert len(ckpt["logging"]["train_losses"]) == 3  # the logs of the killed run were kept
    # every epoch trains the segmentor, so checkpoint_best holds the dataset's tokenizer and a trained segmentor
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    for weights in (best, ckpt):
        for k, v in stored["state_dict"].items():
            assert torch.equal(weights["network_weights"]["tokenizer." + k], v), k
    plans = (fold.parent / "plans.json").read_text()
    assert "nnunet_arseg.network.ARSegNetwork" in plans and '"latent_stride"' in plans
    assert (fold / "progress.png").is_file()
    # grouped folds: no patient in both train and validation of fold 0
    import json
    pre = Path(trained["paths"]["nnUNet_preprocessed"]) / DATASET
    split = json.loads((pre / "splits_final.json").read_text())[0]
    poc = json.loads((pre / "dataset.json").read_text())["arseg"]["patient_of_case"]
    assert {poc[k] for k in split["train"]}.isdisjoint({poc[k] for k in split["val"]})
    raters = np.load(pre / "nnUNetPlans_2d_raters" / f"{split['train'][0]}.npz")["raters"]
    # as nnU-Net's own preprocessed seg: -1 marks background outside the image's nonzero region
    assert raters.shape[0] == 4 and set(np.unique(raters)) <= {-1, 0, 1} and (raters == 1).any()


@pytest.fixture(scope="module")
def trainer(trained):
    """The trained fold's trainer in this process on CPU, built and loaded from its final checkpoint as
    ``nnUNetv2_train ... --c`` does, with its real data loaders (augmentation in this process)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**trained["base"], "nnUNet_n_proc_DA": "0"}.items():
            mp.setenv(key, value)
        t = get_trainer_from_args(str(DATASET_ID), "2d", 0, TRAINER, continue_training=True,
                                  device=torch.device("cpu"))
        t.load_checkpoint(str(trained["fold"] / "checkpoint_final.pth"))
        t.dataloader_train, t.dataloader_val = t.get_dataloaders()
        yield t
    torch.set_num_threads(threads)


def test_train_steps_under_bf16_and_fp16_with_a_loss_scaler(trainer, tmp_path):
    """The real ``train_step`` from the same weights on the same batches: without autocast (nnU-Net on CPU), under
    bf16 and under fp16 with a GradScaler (nnU-Net's choice on GPUs without native bf16): the losses agree within 5 %,
    the fp16 steps went through the scaler, and its state travels with the checkpoint."""
    from nnunet_arseg.training import precision
    assert trainer.autocast_dtype is None and trainer.grad_scaler is None  # nnU-Net's CPU default
    batches = [next(trainer.dataloader_train) for _ in range(2)]
    batches = [{"data": b["data"][:2], "target": b["target"][:2]} for b in batches]  # fp16 is slow on a CPU
    weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    optimizer = trainer.optimizer.state_dict()
    losses = {}
    for dtype in (None, torch.bfloat16, torch.float16):
        trainer.network.load_state_dict(weights)
        trainer.optimizer.load_state_dict(optimizer)
        trainer.autocast_dtype, trainer.grad_scaler = dtype, precision.grad_scaler(dtype, trainer.device)
        torch.manual_seed(0)  # the classes drawn
        losses[dtype] = [float(trainer.train_step(b)["loss"]) for b in batches]
    for dtype in (torch.bfloat16, torch.float16):
        assert np.allclose(losses[dtype], losses[None], rtol=0.05), losses
    scale = trainer.grad_scaler.state_dict()
    assert scale["_growth_tracker"] == 2  # two scaled steps, none skipped for inf/NaN gradients
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    trainer.grad_scaler = precision.grad_scaler(torch.float16, trainer.device)
    trainer.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert trainer.grad_scaler.state_dict() == scale
    trainer.autocast_dtype = trainer.grad_scaler = None


def test_an_epoch_with_nothing_to_score_keeps_the_ema_pseudo_dice(trainer):
    """Validation epochs of the real ``validation_step``: one on a real slice with an empty mask, predicted empty (the
    presence head says absent), scores Dice 1 instead of NaN, so nnU-Net's EMA pseudo Dice (and with it
    checkpoint_best) keeps moving afterwards."""
    from nnunet_arseg.network import unwrap_network
    bias = unwrap_network(trainer.network).presence_head.fc.bias
    trained_bias = bias.detach().clone()
    batch = next(trainer.dataloader_val)
    empty = {**batch, "target": torch.zeros_like(batch["target"])}
    try:
        logged = len(trainer.logger.get_value("mean_fg_dice", step=None))
        for epoch, (b, presence) in enumerate(((batch, trained_bias), (empty, -30.0), (batch, trained_bias)),
                                              start=logged):
            trainer.current_epoch = epoch
            with torch.no_grad():
                bias.copy_(torch.as_tensor(presence).expand_as(bias))
                trainer.on_validation_epoch_end([trainer.validation_step(b)])
    finally:
        with torch.no_grad():
            bias.copy_(trained_bias)
    assert trainer.logger.get_value("dice_per_class_or_region", step=-2) == [1.0]
    ema = trainer.logger.get_value("ema_fg_dice", step=None)[-3:]
    assert np.isfinite(ema).all() and ema[2] != ema[1], ema


def test_final_validation_and_val_flag(trained):
    fold = trained["fold"]
    summary = fold / "validation" / "summary_arseg.json"
    assert (fold / "validation" / "summary.json").is_file() and summary.is_file()
    os.remove(summary)
    out = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu", "--val"],
               _env(trained["base"], nnUNet_n_proc_DA="0"))
    assert "Mean Validation Dice" in out
    import json
    s = json.loads(summary.read_text())
    assert s["num_samples"] == 4 and set(s["mean"]["0"]) >= {"GED", "HM-IoU", "Soft-Dice"}
    assert s["sampler"] == "autoregressive"  # the final validation draws with the default sampler
    assert all(np.isfinite(s["mean"]["0"][k]) for k in ("GED", "HM-IoU", "Soft-Dice"))


def test_both_predict_commands_on_the_trained_model(trained):
    """The trained model through both commands: the same consensus (the full prediction checks, on a model that draws
    disagreeing masks, are in test_predict.py)."""
    raw = Path(trained["paths"]["nnUNet_raw"]) / DATASET
    ours, stock = trained["root"] / "pred", trained["root"] / "pred_stock"
    common = ["-i", str(raw / "imagesTs"), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device",
              "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    _run([PY, "-m", "nnunet_arseg.inference.predict", "-o", str(ours), *common, "--num_samples", "2",
          "--save_samples"], _env(trained["base"]))
    _run([str(BIN / "nnUNetv2_predict"), "-o", str(stock), *common],
         _env(trained["base"], nnUNet_ARSEG_NUM_SAMPLES="2"))
    cases = sorted(p.name for p in (raw / "imagesTs").glob("*_0000.png"))
    assert cases and sorted(p.name for p in ours.glob("*.png")) == sorted(c.replace("_0000", "") for c in cases)
    for case in cases:
        name = case.replace("_0000", "")
        np.testing.assert_array_equal(_read_png(ours / name), _read_png(stock / name))
        assert len(list((ours / "samples").glob(f"{name[:-4]}_sample*.png"))) == 2
    # the default sampler is autoregressive, in both commands (same consensus above)
    default = json.loads((ours / ARGS_FILE).read_text())
    assert default["sampler"] == "autoregressive" and default["anchor_scales"] is None
    assert default["outline_spread"] is None and default["mirror_head"] is False  # no head involved
    assert default["presence_temperature"] == 1.0
    # --sampler anchored (around its own head) and --disable_tta reach the predictor (what they draw:
    # test_network.py, test_sampling_window.py)
    log = _run([PY, "-m", "nnunet_arseg.inference.predict", "-o", str(trained["root"] / "pred_head"), *common,
                "--num_samples", "2", "--sampler", "anchored", "--anchor_scales", "3", "--disable_tta"],
               _env(trained["base"]))
    assert "sampler anchored on its U-Net head (3 coarse scale(s)" in log
    args = json.loads((trained["root"] / "pred_head" / ARGS_FILE).read_text())
    assert args["sampler"] == "anchored" and args["anchor_scales"] == 3 and args["mirror_head"] is False
    assert args["outline_spread"] is None
    # --sampler head with --presence_temperature and --outline_spread (what they draw: test_network.py)
    log = _run([PY, "-m", "nnunet_arseg.inference.predict", "-o", str(trained["root"] / "pred_presence"), *common,
                "--num_samples", "2", "--sampler", "head", "--presence_temperature", "0.5", "--outline_spread", "0.25"],
               _env(trained["base"]))
    assert "sampler head" in log and "presence temperature 0.5" in log and "outline spread 0.25" in log
    args = json.loads((trained["root"] / "pred_presence" / ARGS_FILE).read_text())
    assert args["sampler"] == "head" and args["presence_temperature"] == 0.5 and args["outline_spread"] == 0.25
    assert args["mirror_head"] is True


def _with_noisy_transformer(trained, results: Path) -> dict:
    """A copy of the trained model (its results folder) whose transformer weights carry noise of a third of each
    tensor's spread; the environment that predicts with it."""
    import shutil
    model = trained["fold"].parent
    copy = results / DATASET / model.name
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("validation", "checkpoint_latest.pth"))
    checkpoint = torch.load(copy / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    weights = checkpoint["network_weights"]
    noisy = [k for k in weights if k.startswith("transformer.") and weights[k].is_floating_point()]
    assert len(noisy) > 10
    for k in noisy:
        spread = max(weights[k].std().item() if weights[k].numel() > 1 else 0.0, 0.02)  # LayerNorm weights are 1
        weights[k] = weights[k] + torch.randn(weights[k].shape, generator=generator) * spread / 3
    torch.save(checkpoint, copy / "fold_0" / "checkpoint_final.pth")
    return _env(trained["base"], nnUNet_results=str(results))


def test_the_default_samples_change_with_the_transformer_and_the_head_baselines_hardly(trained):
    """The product is autoregressive: with noise on every transformer weight of the trained model, most non-empty
    default samples change (through the real predict command, same seed); the head sampler's samples, which take
    the U-Net head's probabilities, change far less."""
    raw = Path(trained["paths"]["nnUNet_raw"]) / DATASET
    common = ["-i", str(raw / "imagesTs"), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device",
              "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar", "--num_samples", "8", "--save_samples"]
    noisy_env = _with_noisy_transformer(trained, trained["root"] / "noisy_results")
    changed = {}
    for sampler in ("autoregressive", "head"):
        pairs = []
        for tag, env in (("plain", _env(trained["base"])), ("noisy", noisy_env)):
            out = trained["root"] / f"pred_{sampler}_{tag}"
            _run([PY, "-m", "nnunet_arseg.inference.predict", "-o", str(out), *common, "--sampler", sampler], env)
            pairs.append({p.name: _read_png(p) for p in sorted((out / "samples").glob("*.png"))})
        plain, noisy = pairs
        assert plain.keys() == noisy.keys() and len(plain) >= 16
        drawn = [name for name in plain if plain[name].any() or noisy[name].any()]
        assert len(drawn) >= 8, f"{sampler}: only {len(drawn)} of {len(plain)} samples draw a mask"
        changed[sampler] = np.mean([not np.array_equal(plain[name], noisy[name]) for name in drawn])
    assert changed["autoregressive"] > 0.5 and changed["head"] < changed["autoregressive"], changed


def test_same_training_twice_gives_the_same_model(trained):
    """``training_seed``: two trainings of fold 1 (one epoch, nnUNet_n_proc_DA=0, the dataset's tokenizer reused)
    give the same weights, losses and validation metrics; ``nnUNet_ARSEG_TRAINING_SEED`` trains another model."""
    one_epoch = "nnUNetTrainerARSeg_tinyOneEpoch"  # tests/ext_trainers
    fold1 = trained["fold"].parent.parent / f"{one_epoch}__nnUNetPlans__2d" / "fold_1"
    cmd = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "1", "-tr", one_epoch, "-device", "cpu"]
    ext = os.pathsep.join([trained["base"]["nnUNet_extTrainer"], str(Path(__file__).parent / "ext_trainers")])
    runs = []
    for k, seed in enumerate(("", "", "1")):  # "": the trainer's own seed
        _run(cmd, _env(trained["base"], nnUNet_n_proc_DA="0", nnUNet_extTrainer=ext, nnUNet_ARSEG_TRAINING_SEED=seed))
        runs.append(fold1.rename(fold1.parent / f"fold_1_run{k}"))
    a, b, c = (torch.load(r / "checkpoint_final.pth", map_location="cpu", weights_only=False) for r in runs)
    assert a["network_weights"].keys() == b["network_weights"].keys()
    for k, v in a["network_weights"].items():
        assert torch.equal(v, b["network_weights"][k]), k
    key = "transformer.head.weight"
    assert not torch.equal(a["network_weights"][key], c["network_weights"][key])  # another seed, another model
    assert len(a["logging"]["train_losses"]) == 1 and a["logging"]["train_losses"] == b["logging"]["train_losses"]
    assert (runs[0] / "validation" / "summary_arseg.json").read_text() == \
        (runs[1] / "validation" / "summary_arseg.json").read_text()
    # the losses are real per-epoch values: another fold's first epoch records a different one
    other = torch.load(trained["fold"] / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert other["logging"]["train_losses"][0] != a["logging"]["train_losses"][0]


def test_residual_encoder_plans_train_upgrade_and_sample(trained):
    """nnU-Net's recommended plans (``-pl nnUNetPlannerResEncM``) and the upgrade path: ``-pretrained_weights`` of a
    stock checkpoint of the same plans (nnU-Net's own trainer, one epoch under a wall-time budget). The upgrade
    variant loads the whole U-Net but the 1x1 segmentation layers, says so, keeps the residual encoder frozen through
    training and trains the decoder and the AR parts; ``nnUNetv2_arseg_predict -p nnUNetResEncUNetMPlans`` samples
    it."""
    plans = "nnUNetResEncUNetMPlans"
    env = _env(trained["base"], nnUNet_n_proc_DA="0")
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-pl", "nnUNetPlannerResEncM",
          "-np", "1", "-npfp", "1", "--no_pbar"], _env(trained["base"]))
    # the residual encoder's blocks as planned, its widths capped at 16 so that the test runs in a minute on a CPU
    plans_file = Path(trained["paths"]["nnUNet_preprocessed"]) / DATASET / f"{plans}.json"
    plans_json = json.loads(plans_file.read_text())
    arch = plans_json["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    arch["arch_kwargs"]["features_per_stage"] = [min(f, 16) for f in arch["arch_kwargs"]["features_per_stage"]]
    plans_file.write_text(json.dumps(plans_json, indent=2))
    results = Path(trained["paths"]["nnUNet_results"]) / DATASET
    _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "all", "-tr", "nnUNetTrainerBudget", "-p", plans,
          "-device", "cpu"], {**env, "nnUNet_ARSEG_BUDGET_MINUTES": "0.01"})
    stock_file = results / f"nnUNetTrainerBudget__{plans}__2d" / "fold_all" / "checkpoint_final.pth"
    trainer = "nnUNetTrainerARSeg_upgrade_tiny"
    out = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", trainer, "-p", plans, "-device", "cpu",
                "-pretrained_weights", str(stock_file)], env)
    assert "were loaded from the pretrained weights; not loaded, as initialised: decoder.seg_layers;" in out
    assert "trained from scratch: embedding, presence_head, transformer" in out
    fold = results / f"{trainer}__{plans}__2d" / "fold_0"
    assert "ResidualEncoderUNet" in (fold.parent / "plans.json").read_text()
    stock = torch.load(stock_file, map_location="cpu", weights_only=False)["network_weights"]
    upgraded = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = upgraded["network_weights"]
    encoder = [k for k in stock if k.startswith("encoder.")]
    assert any(".blocks." in k for k in encoder)  # the residual blocks
    assert encoder and all(torch.equal(weights[k], stock[k]) for k in encoder)  # frozen
    decoder = [k for k in stock if k.startswith("decoder.stages.")]
    assert decoder and not all(torch.equal(weights[k], stock[k]) for k in decoder)  # trained
    losses = upgraded["logging"]["train_losses"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (fold / "validation" / "summary_arseg.json").is_file()
    raw = Path(trained["paths"]["nnUNet_raw"]) / DATASET
    pred = trained["root"] / "pred_resenc"
    _run([PY, "-m", "nnunet_arseg.inference.predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
          str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "0", "-nps",
          "0", "--num_samples", "2", "--save_samples", "--disable_progress_bar"], _env(trained["base"]))
    cases = sorted(p.name.replace("_0000", "") for p in (raw / "imagesTs").glob("*_0000.png"))
    assert cases and sorted(p.name for p in pred.glob("*.png")) == cases
    assert len(list((pred / "samples").glob("*_sample*.png"))) == 2 * len(cases)
