"""``nnUNetv2_train ... -num_gpus N``: the AR-Seg trainer under nnU-Net's DDP, in two CPU processes (gloo).

Each rank builds ``nnUNetTrainerARSeg_tiny`` on real preprocessed LIDC crops, starts training as ``nnUNetv2_train``
does (rank 0 trains the dataset's tokenizer while rank 1 waits, then both load it), wraps the network in DDP as
nnU-Net does and runs the trainer's own ``train_step``.
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
    import torch.distributed as dist
    from batchgenerators.utilities.file_and_folder_operations import load_json, join
    from nnunetv2.paths import nnUNet_preprocessed
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
    from nnunet_arseg.training.variants import nnUNetTrainerARSeg_tiny

    torch.set_num_threads(1)
    folder = join(nnUNet_preprocessed, f"Dataset{DATASET_ID}_LIDC")
    # built before the process group: under DDP nnU-Net's __init__ sets the device to cuda:<rank>
    plans = {**load_json(join(folder, "nnUNetPlans.json")), "continue_training": False}  # as get_trainer_from_args
    trainer = nnUNetTrainerARSeg_tiny(plans, "2d", 0, load_json(join(folder, "dataset.json")),
                                      device=torch.device("cpu"))
    trainer.tokenizer_fit = TokenizerFitConfig(max_steps=6, batch_size=4, warmup_steps=1, eval_every=6)
    # a collective that one rank calls alone fails after this instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=90))
    # nnU-Net wraps the network in initialize() with device_ids=[rank], which DDP refuses for CPU modules: it is
    # initialised as one process, then joins the group and is wrapped below, as nnU-Net does but without device_ids
    trainer.initialize()
    trainer.is_ddp, trainer.local_rank = True, rank
    trainer._set_batch_size_and_oversample()
    # nnU-Net gives the ranks different foreground oversampling; the same on both, only their seeds set them apart
    trainer.oversample_foreground_percent = 0.5
    trainer.on_train_start()
    tokenizer = _digest(trainer.network.tokenizer.state_dict().values())
    trainer.network = DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.network))
    start = _digest(trainer.network.module.state_dict().values())
    trainer.on_train_epoch_start()
    batches, missing, losses = [], [], []
    for _ in range(STEPS):
        batch = next(trainer.dataloader_train)
        batches.append(_digest([torch.as_tensor(batch["data"])]))
        losses.append(float(trainer.train_step(batch)["loss"]))
        missing.append([n for n, p in trainer.network.module.named_parameters() if p.requires_grad and p.grad is None])
    result = {"rank": rank, "batches": batches, "missing_grads": missing, "losses": losses, "tokenizer": tokenizer,
              "start": start, "weights": _digest(trainer.network.module.state_dict().values()),
              "trainable": sum(p.requires_grad for p in trainer.network.parameters()),
              "tokenizer_file": trainer.tokenizer.path}
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
    three real train steps run through DDP: every trainable parameter gets a gradient each step, the ranks draw
    different batches and their weights stay identical."""
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
