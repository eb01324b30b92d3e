"""The from-scratch rows of ``lidc_experiment.py`` on one GPU: every trainer trains at the same time, for the same
minutes, on the same accelerator, then samples the test patients and is scored by the same evaluator.

    python benchmarks/lidc_gpu_side_by_side.py -d 601 --minutes 2.5 --work lidc_gpu

The dataset is taken as nnU-Net finds it (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``): converted with
``imagesTs`` / ``labelsTs_raters`` (``nnUNetv2_arseg_convert_lidc --test_input``) and preprocessed (``-c 2d``); the
dataset's tokenizer is trained first if ``nnUNet_results`` has none. A trainer's model that this ``--work`` did not
train is refused, never trained further or overwritten: give the run an ``nnUNet_results`` of its own. ``--work``
holds the step markers and logs (a rerun skips finished steps, as in ``lidc_experiment.py``), the predictions and
``results.json`` / ``results.md``.

Each trainer is one lane (a thread): ``nnUNetv2_train D 2d all`` under a wall-time budget of ``--minutes``, with
``--da_workers`` data-augmentation processes of its own (``nnUNet_n_proc_DA``), then ``--num_samples`` samples of the
test images (the stock trainer: its one mask, scored as N identical samples), an AR-Seg model both with and without
its U-Net head (``lidc_experiment.sampling_rows``). The lanes share the GPU and the CPU cores, so every
row had the same machine for the same minutes. torch.compile is off unless ``nnUNet_compile`` says otherwise: a
budget of minutes would spend its first one compiling.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from batchgenerators.utilities.file_and_folder_operations import isfile, join, maybe_mkdir_p, subfiles

from lidc_experiment import (AR, BIN, CANDIDATES_DIR, PROBUNET, STOCK, marker, predict_row, results_table, run_lanes,
                             run_steps, sampling_rows, write_text)
from nnunet_arseg.atomic import save_json_atomic

LATENT_HEAD = "nnUNetTrainerARSeg_small_budget_latentHead"  # the recipe before the full-resolution head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset id or name (converted with imagesTs, preprocessed 2d)")
    p.add_argument("--minutes", type=float, required=True, help="training wall time of every trainer")
    p.add_argument("--trainers", nargs="+", default=[STOCK, AR, LATENT_HEAD, PROBUNET])
    p.add_argument("--da_workers", type=int, default=3, help="data-augmentation processes per trainer")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--training_seed", type=int, default=None, help="nnUNet_ARSEG_TRAINING_SEED of AR-Seg and ProbUNet")
    p.add_argument("--work", default="lidc_gpu", help="step markers, logs, predictions and results")
    p.add_argument("-device", default=None, help="cuda (default where present) or cpu")
    args = p.parse_args()

    import torch

    from nnunet_arseg.nnunet_ext import ext_trainer_value
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = os.path.abspath(args.work)
    for sub in ("done", "logs"):
        maybe_mkdir_p(join(work, sub))
    name = maybe_convert_to_dataset_name(args.d)
    did = args.d
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_value(CANDIDATES_DIR))
    env.setdefault("nnUNet_compile", "f")
    train_env = dict(env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.minutes), nnUNet_n_proc_DA=str(args.da_workers))
    if args.training_seed is not None:
        train_env["nnUNet_ARSEG_TRAINING_SEED"] = str(args.training_seed)
    images = join(env["nnUNet_raw"], name, "imagesTs")
    cases = subfiles(images, suffix="_0000.png", join=False)
    if not cases:
        raise SystemExit(f"{images} holds no test images (case_0000.png): convert the dataset with its test patients")
    results_dir = join(env["nnUNet_results"], name)

    run_steps([("tokenizer", [join(BIN, "nnUNetv2_arseg_train_tokenizer"), did, "2d", "-tr", AR, "-device", device],
                env)], work)

    rows, lock = {}, threading.Lock()
    facts = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
             "minutes": args.minutes, "da_workers": args.da_workers, "training_seed": args.training_seed,
             "num_samples": args.num_samples, "num_test_cases": len(cases)}

    def record(row_name: str, row: dict) -> None:
        with lock:
            rows[row_name] = row
            save_json_atomic({**facts, "results": rows}, join(work, "results.json"))
            write_text(join(work, "results.md"), results_table(rows))

    def lane_of(trainer: str):
        fold = join(results_dir, f"{trainer}__nnUNetPlans__2d", "fold_all")

        def lane(_core) -> None:
            if isfile(join(fold, "checkpoint_final.pth")) and not isfile(marker(work, f"train_{trainer}")):
                raise SystemExit(f"{fold} holds a model this --work did not train (another run's?); point "
                                 f"nnUNet_results at another folder (with the dataset's ARSegTokenizer__* folder "
                                 f"copied into it to reuse the tokenizer) or use that run's --work")
            resume = ["--c"] if isfile(join(fold, "checkpoint_latest.pth")) else []
            run_steps([(f"train_{trainer}", [join(BIN, "nnUNetv2_train"), did, "2d", "all", "-tr", trainer,
                                             "-device", device] + resume, train_env)], work)
            for row_name, extra in sampling_rows(trainer, os.path.dirname(fold)):
                record(row_name, predict_row(work, env, did, trainer, fold, images, row_name, args.num_samples, device,
                                             extra=extra))
        lane.__name__ = f"lane_{trainer}"
        return lane

    run_lanes([lane_of(t) for t in args.trainers], [None] * len(args.trainers))
    print(results_table(rows))


if __name__ == "__main__":
    sys.exit(main())
