"""How many coarse scales a model with a full-resolution U-Net head should take from its head (``--sampler anchored
--anchor_scales S``), chosen on validation patients that neither trained the model nor test it.

    python benchmarks/research/lidc_anchor_scales.py --experiment lidc_experiment --pool LIDC_DEV \\
        --work lidc_anchor_scales

``--experiment``: the ``--work`` of a finished ``lidc_experiment.py`` run that trained ``--trainer`` (fold ``all``;
default: its AR-Seg model). ``--num-val`` patients of ``--pool`` outside that run's split (its ``split/split.json``) are
drawn with ``--val-seed``, linked into ``WORK/val/`` and converted as a dataset of their own (``WORK/nnUNet_raw``, id
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
import sys

from batchgenerators.utilities.file_and_folder_operations import join, load_json, maybe_mkdir_p, subfiles

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/, for lidc_experiment
from lidc_experiment import (AR, convert_patients, draw_outside, evaluate, experiment_env, log, predict,  # noqa: E402
                             results_table, step_seconds, write_text)
from nnunet_arseg.atomic import save_json_atomic  # noqa: E402


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
    p.add_argument("--trainer", default=AR, help="an AR-Seg trainer with a full-resolution U-Net head")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    experiment, work = os.path.abspath(args.experiment), os.path.abspath(args.work)
    env, dataset = experiment_env(experiment)
    training_seed = load_json(join(experiment, "results.json")).get("training_seed")
    for sub in ("done", "logs"):
        maybe_mkdir_p(join(work, sub))
    val = draw_outside(args.pool, join(experiment, "split", "split.json"), args.num_val, args.val_seed)
    val_env = dict(env, nnUNet_raw=join(work, "nnUNet_raw"))
    images = convert_patients(args.pool, val, work, "val", args.val_id, "LIDCVal", val_env)
    cases = subfiles(images, suffix="_0000.png", join=False)

    rows = {}
    for s in args.scales:
        name = f"{args.trainer}_anchor_scales_{s}"
        extra = ("--sampler", "anchored") + (() if s == "all" else ("--anchor_scales", s))
        pred = join(work, "predictions", name)
        predict(work, env, dataset, args.trainer, images, pred, name, args.num_samples, device=device,
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
    table = results_table({f"--sampler anchored, {scales_label(s)}": row for s, row in rows.items()})
    write_text(join(work, "results.md"), table + f"\nchosen: {scales_label(chosen)}\n")
    print(table + f"\nchosen: {scales_label(chosen)}")


if __name__ == "__main__":
    main()
