"""Seconds per training iteration and peak memory of AR-Seg's trainers against nnU-Net's own, in one run.

    python benchmarks/train_iteration_speed.py -d 501 [-c 2d] [-tr nnUNetTrainer nnUNetTrainerARSeg_small ...]
                                               [-batch_size 8] [-n 10] [--rounds 2] [--threads T]

Each trainer runs in a fresh process (peak memory is per process), the trainers one after the other and that
``--rounds`` times (A, B, C, A, B, C, ...), so a change of load moves every trainer. A run builds the trainer exactly as
``nnUNetv2_train`` does, with the plans' batch size replaced by ``-batch_size`` for every trainer, warms up for 2
iterations, then times ``-n`` calls of ``train_step`` on batches from its own data loader. AR-Seg's segmentor step is
timed with an untrained tokenizer written where the dataset's would be (the step's cost does not depend on weights),
so nothing trains a tokenizer here. Prints the minimum and median seconds per iteration of each trainer over the
rounds, the ratio of minima against the first trainer, peak memory (``-device cpu``: peak RSS; cuda:
``torch.cuda.max_memory_allocated``) and JSON. ``nnUNet_results`` is redirected to a temporary folder.
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

    torch.set_num_threads(args.threads)
    trainer = get_trainer_from_args(args.d, args.c, 0, args.tr, args.p, device=torch.device(args.device))
    trainer.configuration_manager.configuration["batch_size"] = args.batch_size
    if hasattr(trainer, "batch_size_cap"):
        trainer.batch_size_cap = args.batch_size
    tok = getattr(trainer, "tokenizer", None)
    if tok is not None and not tok.exists():  # an untrained tokenizer of the right shape, so none is trained here
        from nnunet_arseg.tokenizer import MaskTokenizer
        patch = list(trainer.configuration_manager.patch_size)
        os.makedirs(tok.folder, exist_ok=True)
        torch.save({"arch_kwargs": tok.arch_kwargs, "patch_size": patch, "summary": {"heldout": {"dice_nonempty": 0}},
                    "state_dict": MaskTokenizer(len(patch), patch, **tok.arch_kwargs).state_dict()}, tok.path)
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
    n_trained = sum(q.numel() for q in trainer.network.parameters() if q.requires_grad)
    trainer.on_train_end()
    return {"trainer": args.tr, "batch_size": trainer.batch_size,
            "patch_size": list(trainer.configuration_manager.patch_size), "params_M": round(n_params / 1e6, 2),
            "trained_params_M": round(n_trained / 1e6, 2), "s_per_iteration": round(dt, 3),
            "peak_memory_MiB": round(peak), "device": args.device, "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="2d")
    p.add_argument("-tr", nargs="+",
                   default=["nnUNetTrainer", "nnUNetTrainerARSeg_small", "nnUNetTrainerARSeg_upgrade"],
                   help="trainers to time; the first is the baseline of the ratios")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-batch_size", type=int, default=8, help="the same batch for every trainer")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run")
    p.add_argument("-device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.tr = args.worker
        print(json.dumps(_worker(args)))
        return
    runs: dict[str, list[dict]] = {tr: [] for tr in args.tr}
    for r in range(args.rounds):
        for tr in args.tr:
            cmd = [sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p, "-n", str(args.n),
                   "-batch_size", str(args.batch_size), "--threads", str(args.threads), "-device", args.device,
                   "--worker", tr]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[tr].append(json.loads(out))
            print(f"round {r + 1}: {tr}: {runs[tr][-1]['s_per_iteration']} s/it", file=sys.stderr)
    summary = []
    for tr, rs in runs.items():
        times = sorted(x["s_per_iteration"] for x in rs)
        summary.append({**rs[0], "s_min": times[0], "s_median": times[len(times) // 2],
                        "peak_memory_MiB": max(x["peak_memory_MiB"] for x in rs)})
    base = summary[0]
    print(f"{'trainer':<34}{'batch':>6}{'params M':>9}{'trained M':>10}{'s/it min':>9}{'median':>8}{'x base':>8}"
          f"{'peak MiB':>9}{'x base':>8}")
    for r in summary:
        print(f"{r['trainer']:<34}{r['batch_size']:>6}{r['params_M']:>9}{r['trained_params_M']:>10}{r['s_min']:>9}"
              f"{r['s_median']:>8}{r['s_min'] / base['s_min']:>8.2f}{r['peak_memory_MiB']:>9}"
              f"{r['peak_memory_MiB'] / base['peak_memory_MiB']:>8.2f}")
    print(json.dumps({"summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
