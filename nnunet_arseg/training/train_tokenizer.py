"""``nnUNetv2_arseg_train_tokenizer DATASET CONFIGURATION [-tr TRAINER] [-p PLANS] [-device D]``: train the dataset's
mask tokenizer ahead of the folds.

``nnUNetv2_train ... -tr nnUNetTrainerARSeg*`` trains it before its first epoch when it does not exist yet; this
command does only that step, e.g. before five folds start in parallel, or to time it on its own. The tokenizer is the
one the given trainer variant would use (its widths), stored where every fold and variant finds it; an existing one
is left as it is unless it falls short of the variant's fit settings (then it is trained further). An interrupted run
resumes where it stopped.
"""
from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_arseg_train_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("-tr", default="nnUNetTrainerARSeg", help="the AR-Seg trainer variant whose tokenizer sizes and fit "
                   "settings to use; default nnUNetTrainerARSeg (the paper's sizes)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda", "mps"))
    args = p.parse_args(argv)
    from nnunet_arseg.nnunet_ext import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_arseg.training import tokenizer_store
    from nnunet_arseg.training.trainer import nnUNetTrainerARSeg
    trainer = get_trainer_from_args(args.dataset_name_or_id, args.configuration, "all", args.tr, args.p,
                                    device=torch.device(args.device))
    if not isinstance(trainer, nnUNetTrainerARSeg):
        p.error(f"-tr {args.tr} is not an AR-Seg trainer (nnUNetTrainerARSeg or one of its variants)")
    if tokenizer_store.why_train(trainer.tokenizer, trainer.tokenizer_fit) is None:
        print(f"{trainer.tokenizer.path} exists and fits {args.tr}: nothing to train")
        return
    trainer.initialize()
    trainer.load_tokenizer()
    print(f"tokenizer stored at {trainer.tokenizer.path}")


if __name__ == "__main__":
    main()
