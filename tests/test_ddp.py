"""``nnUNetv2_train ... -num_gpus N``: the AR-Seg trainer under nnU-Net's DDP, in two CPU processes (gloo).

Each rank builds ``nnUNetTrainerARSeg_tiny`` (under the wall-time budget) on real preprocessed LIDC crops, has
nnU-Net's ``initialize()`` wrap its network in DDP, starts training as ``nnUNetv2_train`` does (rank 0 trains the
dataset's tokenizer while rank 1 waits, then both load it), runs the trainer's own ``train_step`` and lets the budget
decide on an epoch from clocks that differ between the ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

DATASET_ID = 981
PATIENTS = ("LIDC-IDRI-0005", "LIDC-IDRI-0014")  # the two smallest
STEPS = 3
WORLD_SIZE = 2


@pytest.mark.parametrize("configuration, overrides", [
    ("arseg_2d", {}),  # the presets' recipe: the prefix from the decoder's latent stage, the decoder run on to full
    ("arseg_3d", {}),  # resolution for the head
    ("arseg_2d", {"prefix_source": "encoder"}),  # the decoder runs to full resolution: only its last 1x1 head
    ("arseg_2d", {"aux_full_resolution": False}),  # the decoder stops at the latent's stage
    ("arseg_2d", {"prefix_source": "encoder", "aux_head": False, "embedding": "svd"}),  # no decoder, encoder cut
])
def test_what_never_reaches_the_loss_is_frozen(configuration, overrides, one_torch_thread):
    """DDP without ``find_unused_parameters`` (nnU-Net's) needs a gradient for every parameter that trains: the frozen
    U-Net parts are exactly those that get none when nothing is frozen, and the rest all get one."""
    from test_network import build, plans_with_arseg
    torch.manual_seed(0)
    net = build(plans_with_arseg(**overrides), configuration, 2).train()
    x, mask = torch.randn(2, 1, *net.patch_size), torch.zeros(2, 1, *net.patch_size)
    mask[..., 4:12, 8:20] = 1
    trains = {n for n, p in net.named_parameters() if not n.startswith("tokenizer.")}
    unused = {f"{n}.{k}" for n, m in net.named_modules() if any(m is u for u in net.unused_modules())
              for k, _ in m.named_parameters()}
    assert unused and unused == {n for n, p in net.named_parameters() if n in trains and not p.requires_grad}
    net(x, mask=mask)["loss"].backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    net.zero_grad(set_to_none=True)
    for n, p in net.named_parameters():
        p.requires_grad_(n in trains)
    net(x, mask=mask)["loss"].backward()
    assert unused == {n for n, p in net.named_parameters() if n in trains and p.grad is None}


def _digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank(rank: int, out: str) -> None:
    """One DDP rank: what ``nnUNetv2_train -num_gpus 2`` runs, on the CPU; writes what it saw to ``out``."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as stock
    import torch.distributed as dist
    from batchgenerators.utilities.file_and_folder_operations import load_json, join
    from nnunetv2.paths import nnUNet_preprocessed
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
    from nnunet_arseg.training.budget import BudgetReached, nnUNetTrainerARSeg_budget
    from nnunet_arseg.training.variants import nnUNetTrainerARSeg_tiny

    class Trainer(nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_tiny):
        pass

    torch.set_num_threads(1)
    folder = join(nnUNet_preprocessed, f"Dataset{DATASET_ID}_LIDC")
    # built before the process group: under DDP nnU-Net's __init__ sets the device to cuda:<rank>
    plans = {**load_json(join(folder, "nnUNetPlans.json")), "continue_training": False}  # as get_trainer_from_args
    trainer = Trainer(plans, "2d", 0, load_json(join(folder, "dataset.json")), device=torch.device("cpu"))
    trainer.tokenizer_fit = TokenizerFitConfig(max_steps=6, batch_size=4, eval_every=6, warmup_steps=1)
    # a collective that one rank calls alone fails after this instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=90))
    trainer.is_ddp, trainer.local_rank = True, rank  # what nnU-Net's __init__ sets under DDP
    # nnU-Net's initialize() wraps the network in DDP with device_ids=[rank], which DDP refuses for CPU modules
    stock.DDP = lambda module, device_ids=None, **kwargs: DDP(module, **kwargs)
    if rank == 0:  # a checkpoint being written when an earlier run was killed: the next start removes it
        os.makedirs(trainer.output_folder, exist_ok=True)
        Path(trainer.output_folder, ".tmp-0a1b2c3d-checkpoint_latest.pth").write_bytes(b"cut short")
    trainer.initialize()
    # nnU-Net gives the ranks different foreground oversampling; the same on both, only their seeds set them apart
    trainer.oversample_foreground_percent = 0.5
    trainer.on_train_start()
    assert isinstance(trainer.network, DDP)
    tokenizer = _digest(trainer.network.module.tokenizer.state_dict().values())
    start = _digest(trainer.network.module.state_dict().values())
    trainer.on_train_epoch_start()
    batches, missing, losses = [], [], []
    for _ in range(STEPS):
        batch = next(trainer.dataloader_train)
        batches.append(_digest([torch.as_tensor(batch["data"])]))
        losses.append(float(trainer.train_step(batch)["loss"]))
        missing.append([n for n, p in trainer.network.module.named_parameters() if p.requires_grad and p.grad is None])
    # the budget after one epoch: rank 1's clock saw it take 15 s, rank 0's 5 s; 12 s are left
    now = time.time()
    trainer.budget_seconds, trainer._budget_note, trainer.current_epoch = 12.0, None, 1
    trainer.logger.log("epoch_start_timestamps", now - 5 - 10 * rank, 0)
    trainer.logger.log("epoch_end_timestamps", now - 1, 0)
    try:
        trainer.on_epoch_start()
        budget = f"goes on, num_epochs {trainer.num_epochs}, LR schedule over {trainer.lr_scheduler.num_epochs}"
    except BudgetReached as stop:
        budget = f"stops: {stop}"
    result = {"rank": rank, "batches": batches, "missing_grads": missing, "losses": losses, "tokenizer": tokenizer,
              "start": start, "weights": _digest(trainer.network.module.state_dict().values()),
              "trainable": sum(p.requires_grad for p in trainer.network.parameters()),
              "tokenizer_file": trainer.tokenizer.path, "budget": budget,
              "fold_files": sorted(os.listdir(trainer.output_folder))}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def lidc_preprocessed(lidc_demo, tmp_path_factory):
    """Two bundled LIDC patients converted (raters, patient of each case) and preprocessed (2d), in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset, preprocess_dataset)

    from dataset_conversion.lidc import convert_lidc
    root = tmp_path_factory.mktemp("ddp")
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    src = root / "lidc_in"
    src.mkdir()
    for p in PATIENTS:
        (src / p).symlink_to(lidc_demo / p)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in paths.items():
            os.makedirs(v)
            mp.setenv(k, v)
        convert_lidc(src, paths["nnUNet_raw"], DATASET_ID, test_fraction=0, progress=False)
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, verbose=False, show_progress_bar=False)
        plan_experiment_dataset(DATASET_ID)
        preprocess_dataset(DATASET_ID, configurations=("2d",), num_processes=(1,), verbose=False)
    return paths


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_ranks_train_with_ddp_on_the_cpu(lidc_preprocessed, tmp_path, monkeypatch):
    """Rank 0 trains the tokenizer while rank 1 waits; both load the same one; the grouped split is written once;
    three real train steps run through the DDP wrapper nnU-Net's initialize() built: every trainable parameter gets a
    gradient each step, the ranks draw different batches and their weights stay identical. Rank 0 removed the
    unfinished checkpoint of a killed run; the budget's decision is rank 0's on both ranks."""
    import torch.multiprocessing as mp

    from nnunet_arseg.training import splits
    for k, v in lidc_preprocessed.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", _free_port())
    import nnunet_arseg.training.variants  # noqa: F401  (imported once, here: the forked ranks inherit it)
    context = mp.start_processes(_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=False, start_method="fork")
    deadline = time.time() + 300
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two DDP ranks did not finish within 300 s (a collective that not every rank joins?)")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE))

    assert r0["trainable"] > 0 and r0["missing_grads"] == r1["missing_grads"] == [[]] * STEPS
    assert all(np.isfinite(r["losses"]).all() for r in (r0, r1))
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"])), "both ranks trained on the same batches"
    assert r0["weights"] == r1["weights"] != r0["start"], "the steps left the ranks with different weights"
    stored = torch.load(r0["tokenizer_file"], map_location="cpu", weights_only=False)["state_dict"]
    assert r0["tokenizer"] == r1["tokenizer"] == _digest(stored.values())

    preprocessed = Path(lidc_preprocessed["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID}_LIDC"
    patient_of_case = json.loads((preprocessed / "dataset.json").read_text())["arseg"]["patient_of_case"]
    written = json.loads((preprocessed / "splits_final.json").read_text())
    assert written == splits.patient_grouped_splits(sorted(patient_of_case), patient_of_case)
    assert len(written) == len(PATIENTS)
    assert r0["budget"] == r1["budget"] == "goes on, num_epochs 2, LR schedule over 2", (r0["budget"], r1["budget"])
    assert r0["fold_files"] and not any(f.startswith(".tmp-") for f in r0["fold_files"] + r1["fold_files"])


def test_a_non_finite_step_is_never_applied_or_saved(lidc_preprocessed, monkeypatch, one_torch_thread):
    """A batch whose loss is NaN leaves the weights as they were in fp32 and bf16 (fp16's loss scaler skips such a
    step itself; fp16 convolutions take minutes on a CPU); a run of them stops training with a clear message; weights
    that are not finite are never written over the last checkpoint."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
    from nnunet_arseg.training import precision
    from nnunet_arseg.training.variants import nnUNetTrainerARSeg_tiny
    for k, v in lidc_preprocessed.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = join(lidc_preprocessed["nnUNet_preprocessed"], f"Dataset{DATASET_ID}_LIDC")
    plans = {**load_json(join(folder, "nnUNetPlans.json")), "continue_training": False}
    trainer = nnUNetTrainerARSeg_tiny(plans, "2d", 1, load_json(join(folder, "dataset.json")),
                                      device=torch.device("cpu"))
    trainer.tokenizer_fit = TokenizerFitConfig(max_steps=6, batch_size=4, eval_every=6, warmup_steps=1)
    trainer.initialize()
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    batch = next(trainer.dataloader_train)
    trainer.train_step(batch)
    latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(latest))
    saved, weights = latest.read_bytes(), {k: v.clone() for k, v in trainer.network.state_dict().items()}
    poisoned = {**batch, "data": torch.as_tensor(batch["data"]).clone()}
    poisoned["data"][0, 0, 0, 0] = float("nan")  # one voxel: the loss and every gradient are NaN
    for dtype in (None, torch.bfloat16):
        trainer.autocast_dtype, trainer.grad_scaler = dtype, precision.grad_scaler(dtype, trainer.device)
        assert not np.isfinite(trainer.train_step(poisoned)["loss"])
        changed = [k for k, v in trainer.network.state_dict().items() if not torch.equal(v, weights[k])]
        assert changed == [], f"a NaN step was applied with autocast {dtype}: {changed[:3]}"
    trainer.max_nonfinite_steps = 3
    with pytest.raises(FloatingPointError, match=r"3 training steps in a row had non-finite gradients \(NaN or inf, "
                                                 r"bf16 autocast\) and were not applied"):
        trainer.train_step(poisoned)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.network.state_dict().items())
    trainer.train_step(batch)  # a finite step starts the count anew
    assert trainer._nonfinite_in_a_row == 0
    with torch.no_grad():
        next(trainer.network.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"not writing .*checkpoint_latest.pth: \d+ weight tensors hold NaN"):
        trainer.save_checkpoint(str(latest))
    assert latest.read_bytes() == saved
