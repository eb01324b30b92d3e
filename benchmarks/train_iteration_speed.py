"""Seconds per training iteration and peak memory of an nnU-Net trainer on preprocessed data.

    python benchmarks/train_iteration_speed.py -d 501 -c 2d -tr nnUNetTrainerARSeg [-phase segmentor] [-n 10]

Runs in a fresh process per call (peak memory is per process): builds the trainer exactly as ``nnUNetv2_train``
does, warms up for 2 iterations, then times ``-n`` calls of ``train_step`` on batches from its own data loader.
Results (with ``-device cpu``: peak RSS; with cuda: ``torch.cuda.max_memory_allocated``) are printed as JSON.
``nnUNet_results`` is redirected to a temporary folder, so no real results are touched.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="2d")
    p.add_argument("-tr", default="nnUNetTrainerARSeg")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-phase", default="tokenizer", choices=("tokenizer", "segmentor"),
                   help="AR-Seg phase to time (ignored for other trainers)")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("-device", default="cpu")
    args = p.parse_args()
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="bench_results_")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    from nnunet_arseg.nnunet_ext import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(args.d, args.c, 0, args.tr, args.p, device=torch.device(args.device))
    if hasattr(trainer, "num_tokenizer_epochs") and args.phase == "segmentor":
        trainer.current_epoch = trainer.num_tokenizer_epochs
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    batches = [next(trainer.dataloader_train) for _ in range(args.n + 2)]
    for b in batches[:2]:
        trainer.train_step(b)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[2:]:
        trainer.train_step(b)
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.n
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    n_params = sum(q.numel() for q in trainer.network.parameters())
    print(json.dumps({"trainer": args.tr, "phase": args.phase if hasattr(trainer, "num_tokenizer_epochs") else None,
                      "batch_size": trainer.batch_size, "patch_size": trainer.configuration_manager.patch_size,
                      "params_M": round(n_params / 1e6, 2), "s_per_iteration": round(dt, 3),
                      "peak_memory_MiB": round(peak), "device": args.device, "torch_threads": torch.get_num_threads()}))
    trainer.on_train_end()


if __name__ == "__main__":
    main()
