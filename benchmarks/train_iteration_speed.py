"""Seconds per training iteration and peak memory of AR-Seg's trainer against nnU-Net's own, in one run.

    python benchmarks/train_iteration_speed.py -d 501 [-c 2d] [-tr nnUNetTrainer nnUNetTrainerARSeg] [-n 10]

Each (trainer, phase) runs in a fresh process (peak memory is per process): it builds the trainer exactly as
``nnUNetv2_train`` does, warms up for 2 iterations, then times ``-n`` calls of ``train_step`` on batches from its own
data loader. AR-Seg is timed in both phases (tokenizer, segmentor). Prints one line per run, the ratios against the
first trainer, and the results as JSON (with ``-device cpu``: peak RSS; with cuda: ``torch.cuda.max_memory_allocated``).
``nnUNet_results`` is redirected to a temporary folder, so no real results are touched.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _worker(args) -> dict:
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
    trainer.on_train_end()
    return {"trainer": args.tr, "phase": args.phase if hasattr(trainer, "num_tokenizer_epochs") else None,
            "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size),
            "params_M": round(n_params / 1e6, 2), "s_per_iteration": round(dt, 3),
            "peak_memory_MiB": round(peak), "device": args.device, "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="2d")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerARSeg"],
                   help="trainers to time; the first is the baseline of the ratios")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("-device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("-phase", default="tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.tr = args.worker
        print(json.dumps(_worker(args)))
        return
    results = []
    for tr in args.tr:
        for phase in (("tokenizer", "segmentor") if "ARSeg" in tr else ("tokenizer",)):
            cmd = [sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p, "-n", str(args.n),
                   "-device", args.device, "--worker", tr, "-phase", phase]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(f"{tr} {results[-1]['phase'] or ''}: {results[-1]['s_per_iteration']} s/it", file=sys.stderr)
    base = results[0]
    print(f"{'trainer':<32}{'phase':<11}{'batch':>6}{'params M':>9}{'s/it':>8}{'x base':>8}{'peak MiB':>9}"
          f"{'x base':>8}")
    for r in results:
        print(f"{r['trainer']:<32}{r['phase'] or '-':<11}{r['batch_size']:>6}{r['params_M']:>9}"
              f"{r['s_per_iteration']:>8}{r['s_per_iteration'] / base['s_per_iteration']:>8.2f}"
              f"{r['peak_memory_MiB']:>9}{r['peak_memory_MiB'] / base['peak_memory_MiB']:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
