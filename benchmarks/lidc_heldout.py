"""The models of a finished ``lidc_experiment.py`` run on patients no step of development used: the final check of a
recipe before it ships.

    python benchmarks/lidc_heldout.py --experiment lidc_experiment --pool LIDC_DEV \\
        --exclude lidc_anchor_scales/val_patients.txt --work lidc_heldout

``--num-test`` patients of ``--pool`` outside the experiment's split (training and test patients) and outside the
``--exclude`` lists (the validation patients of ``research/lidc_anchor_scales.py``) are drawn with ``--heldout-seed``,
linked into ``WORK/heldout/`` and converted as a dataset of their own (id ``--heldout-id``). Every from-scratch model
the experiment trained (fold ``all``; ``--trainers`` to choose) predicts them as in the experiment: nnU-Net's one mask,
the sampling models' ``--num-samples`` samples, an AR-Seg model both with and without its U-Net head
(``lidc_experiment.sampling_rows``). The empty mask is the reference row. Every row is scored by
``nnUNetv2_arseg_evaluate``; ``WORK/results.json`` and ``results.md`` are rewritten after each. Step markers as in
``lidc_experiment.py``: a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import os

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, maybe_mkdir_p, subfiles

from lidc_experiment import (LABELS, STOCK, convert_patients, draw_outside, evaluate, experiment_env, log,
                             predict_row, results_table, sampling_rows, write_empty_prediction, write_text)
from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.training.tokenizer_store import TOKENIZER_FOLDER_PREFIX


def trained_models(results_dir: str) -> list[str]:
    """The trainers with a final fold-``all`` checkpoint in ``results_dir`` (nnU-Net first, then by name)."""
    found = [d.split("__")[0] for d in sorted(os.listdir(results_dir))
             if not d.startswith(TOKENIZER_FOLDER_PREFIX)
             and isfile(join(results_dir, d, "fold_all", "checkpoint_final.pth"))]
    return sorted(found, key=lambda t: (t != STOCK, t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="--work of the lidc_experiment.py run that trained the models")
    p.add_argument("--pool", required=True, help="the LIDC-IDRI patient folders that run drew its split from")
    p.add_argument("--exclude", nargs="*", default=[], help="lists of patients (one per line) used otherwise")
    p.add_argument("--trainers", nargs="*", default=None, help="default: every model the experiment trained")
    p.add_argument("--num-test", type=int, default=40, help="held-out patients")
    p.add_argument("--heldout-seed", type=int, default=3)
    p.add_argument("--heldout-id", type=int, default=603, help="dataset id of the held-out patients' raw dataset")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--core", default="", help="CPU core to pin the predictions to (taskset); '' off")
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    p.add_argument("--work", default="lidc_heldout")
    args = p.parse_args()

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    experiment, work = os.path.abspath(args.experiment), os.path.abspath(args.work)
    env, dataset = experiment_env(experiment)
    results_dir = join(env["nnUNet_results"], dataset)
    training_seed = load_json(join(experiment, "results.json")).get("training_seed")
    trainers = args.trainers if args.trainers is not None else trained_models(results_dir)
    missing = [t for t in trainers if not isdir(join(results_dir, f"{t}__nnUNetPlans__2d", "fold_all"))]
    if missing or not trainers:
        raise SystemExit(f"{results_dir}: no trained fold_all of {missing or 'any trainer'}")
    for sub in ("done", "logs"):
        maybe_mkdir_p(join(work, sub))
    names = draw_outside(args.pool, join(experiment, "split", "split.json"), args.num_test, args.heldout_seed,
                         args.exclude)
    heldout_env = dict(env, nnUNet_raw=join(work, "nnUNet_raw"))
    images = convert_patients(args.pool, names, work, "heldout", args.heldout_id, "LIDCHeldout", heldout_env)
    cases = sorted(f[:-len("_0000.png")] for f in subfiles(images, suffix="_0000.png", join=False))
    did = str(args.heldout_id)

    rows = {}

    def record(name: str, row: dict) -> None:
        rows[name] = row
        save_json_atomic({"experiment_training_seed": training_seed,
                          "heldout_seed": args.heldout_seed, "num_patients": len(names), "num_cases": len(cases),
                          "num_samples": args.num_samples, "excluded": [os.path.abspath(f) for f in args.exclude],
                          "device": device, "results": rows}, join(work, "results.json"))
        write_text(join(work, "results.md"), results_table(rows))
        log(f"{LABELS.get(name, name)}: " + " / ".join(f"{m} {row['metrics'][m]:.3f}"
                                                      for m in ("GED", "HM-IoU", "Soft-Dice", "D_max")))

    pred = join(work, "predictions", "empty")
    write_empty_prediction(images, pred, cases, ".png")
    record("empty", {"metrics": evaluate(work, heldout_env, did, pred, "empty", args.num_samples)})
    for trainer in trainers:
        model_dir = join(results_dir, f"{trainer}__nnUNetPlans__2d")
        for name, extra in sampling_rows(trainer, model_dir):
            record(name, predict_row(work, env, dataset, trainer, join(model_dir, "fold_all"), images, name,
                                     args.num_samples, device, args.core or None, extra, (heldout_env, did)))
    print(results_table(rows))


if __name__ == "__main__":
    main()
