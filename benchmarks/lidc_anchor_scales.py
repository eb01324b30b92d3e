"""How many coarse scales a model with a full-resolution U-Net head should take from its head (``--anchor_head
--anchor_scales S``), chosen on validation patients that neither trained the model nor test it.

    python benchmarks/lidc_anchor_scales.py --experiment lidc_experiment --pool LIDC_DEV \\
        --trainer nnUNetTrainerARSeg_small_budget_fullHead --work lidc_anchor_scales

``--experiment``: the ``--work`` of a finished ``lidc_experiment.py`` run that trained ``--trainer`` (fold ``all``).
``--num-val`` patients of ``--pool`` outside that run's split (its ``split/split.json``) are drawn with
``--val-seed``, linked into ``WORK/val/`` and converted as a dataset of their own (``WORK/nnUNet_raw``, id
``--val-id``). The model samples them once per ``--scales`` entry (``all``: every scale from the head, so the samples
differ in presence only; ``0``: the model's own draws; S: the coarsest S scales from the head, the finer ones drawn),
each scored by ``nnUNetv2_arseg_evaluate``.

The choice (``WORK/results.json``, ``chosen``): the lowest GED; among the settings within ``--tie`` of it, the one
with the fewest scales from the head (the most of the transformer's own sampling kept). Step markers as in
``lidc_experiment.py``: a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import os
import random

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, subfiles

from lidc_experiment import (BIN, CANDIDATES_DIR, evaluate, log, patients_in, predict, results_table, run_steps,
                             step_seconds, write_text)
from nnunet_arseg.atomic import save_json_atomic


def scales_label(s: str) -> str:
    return "all scales from the head" if s == "all" else ("own draws (no anchor)" if s == "0"
                                                          else f"coarsest {s} scales from the head")


def choose(rows: dict, tie: float) -> str:
    """The setting with the lowest GED; within ``tie`` of it, the one with the fewest scales from the head."""
    best = min(r["GED"] for r in rows.values())
    close = [s for s, r in rows.items() if r["GED"] <= best + tie]
    return min(close, key=lambda s: float("inf") if s == "all" else int(s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="--work of the lidc_experiment.py run that trained --trainer")
    p.add_argument("--pool", required=True, help="the LIDC-IDRI patient folders that run drew its split from")
    p.add_argument("--trainer", required=True, help="an AR-Seg trainer with a full-resolution U-Net head")
    p.add_argument("--scales", nargs="+", default=["5", "6", "7", "all"], help="settings of --anchor_scales")
    p.add_argument("--num-val", type=int, default=40, help="validation patients")
    p.add_argument("--val-seed", type=int, default=2)
    p.add_argument("--val-id", type=int, default=602, help="dataset id of the validation patients' raw dataset")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--tie", type=float, default=0.01, help="GED difference treated as a tie")
    p.add_argument("--core", default="", help="CPU core to pin the predictions to (taskset); '' off")
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    p.add_argument("--work", default="lidc_anchor_scales")
    args = p.parse_args()
    for s in args.scales:
        if s != "all" and not s.isdigit():
            raise SystemExit(f"--scales: {s!r} is neither a number of scales nor 'all'")

    import torch

    from nnunet_arseg.nnunet_ext import ext_trainer_value
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    experiment, work = os.path.abspath(args.experiment), os.path.abspath(args.work)
    split_file = join(experiment, "split", "split.json")
    if not isfile(split_file):
        raise SystemExit(f"{split_file} not found: --experiment must be the --work of a lidc_experiment.py run")
    training_seed = load_json(join(experiment, "results.json")).get("training_seed")
    for sub in ("done", "logs", "val"):
        maybe_mkdir_p(join(work, sub))

    used = {name for part in load_json(split_file)["patients"].values() for name in part}
    rest = [name for name in patients_in(args.pool) if name not in used]
    if len(rest) < args.num_val:
        raise SystemExit(f"--pool {args.pool} has {len(rest)} patients outside the experiment's split, fewer than "
                         f"--num-val {args.num_val}")
    val = sorted(random.Random(args.val_seed).sample(rest, args.num_val))
    for name in val:
        link = join(work, "val", name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(join(args.pool, name)), link)
    write_text(join(work, "val_patients.txt"), "\n".join(val) + "\n")

    # the model as the experiment trained it; the validation patients as a raw dataset of their own (all as
    # training cases: nothing trains on them, and the evaluator finds their raters in labelsTr_raters)
    env = dict(os.environ, nnUNet_raw=join(experiment, "nnUNet_raw"),
               nnUNet_preprocessed=join(experiment, "nnUNet_preprocessed"),
               nnUNet_results=join(experiment, "nnUNet_results"), nnUNet_extTrainer=ext_trainer_value(CANDIDATES_DIR))
    val_env = dict(env, nnUNet_raw=join(work, "nnUNet_raw"))
    maybe_mkdir_p(val_env["nnUNet_raw"])
    run_steps([("convert", [join(BIN, "nnUNetv2_arseg_convert_lidc"), "-i", join(work, "val"), "-o",
                            val_env["nnUNet_raw"], "-d", str(args.val_id), "-n", "LIDCVal", "--test_fraction", "0",
                            "--disable_progress_bar"], val_env)], work)
    datasets = [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith("Dataset")]
    if len(datasets) != 1:
        raise SystemExit(f"{env['nnUNet_raw']}: expected the experiment's one dataset, found {datasets}")
    model_id = datasets[0][len("Dataset"):].split("_")[0]
    images = join(val_env["nnUNet_raw"], f"Dataset{args.val_id:03d}_LIDCVal", "imagesTr")
    cases = subfiles(images, suffix="_0000.png", join=False)

    rows = {}
    for s in args.scales:
        name = f"{args.trainer}_anchor_scales_{s}"
        extra = ("--anchor_head",) + (() if s == "all" else ("--anchor_scales", s))
        pred = join(work, "predictions", name)
        predict(work, env, model_id, args.trainer, images, pred, name, args.num_samples, device=device,
                core=args.core or None, extra=extra)
        rows[s] = {"metrics": evaluate(work, val_env, str(args.val_id), pred, name, args.num_samples),
                   "seconds_per_case": step_seconds(work, f"predict_{name}") / len(cases)}
        log(f"{scales_label(s)}: " + " / ".join(f"{m} {rows[s]['metrics'][m]:.3f}"
                                                for m in ("GED", "HM-IoU", "Soft-Dice")))
    chosen = choose({s: row["metrics"] for s, row in rows.items()}, args.tie)
    save_json_atomic({"training_seed": training_seed, "trainer": args.trainer,
                      "val_seed": args.val_seed, "num_val_patients": len(val), "num_val_cases": len(cases),
                      "num_samples": args.num_samples, "tie": args.tie, "results": rows, "chosen": chosen},
                     join(work, "results.json"))
    table = results_table({f"--anchor_head, {scales_label(s)}": row for s, row in rows.items()})
    write_text(join(work, "results.md"), table + f"\nchosen: {scales_label(chosen)}\n")
    print(table + f"\nchosen: {scales_label(chosen)}")


if __name__ == "__main__":
    main()
