"""Longer budgets: a from-scratch model of ``lidc_experiment.py`` (``--trainer``, by default the recipe
``nnUNetTrainerARSeg_small_budget``) trained for each of ``--budgets`` minutes and each training seed on the patients
of a run of that script, scored like its rows. The rivals need only its data (split, preprocessing and curve cases,
all written before its tokenizer), AR-Seg its tokenizer too.

    python benchmarks/lidc_budget_curve.py --experiment lidc_experiment --budgets 60 120 240 --seeds 0 1 \\
        --work lidc_budget_curve

The schedule anneals over the whole budget, so every budget is a training of its own,
``WORK/<trainer>_b<minutes>_s<seed>/`` (its own ``nnUNet_results``, the experiment's tokenizer copied in for AR-Seg),
and a snapshot is not what a shorter budget trains: each curve shows how one training gets to its end. The trainings
run in lanes, one per ``--cores`` core (one core each, ``nnUNet_n_proc_DA=0``, as in the experiment), shared out so
that the lanes get about the same minutes, each lane's shortest first. Each trained model predicts all test cases as
in the experiment (``--num-samples`` samples drawn its default way; nnU-Net's one mask), scored by
``nnUNetv2_arseg_evaluate``; its snapshots (every ``--snapshot-minutes``) are scored on the experiment's curve cases
and each curve ends with the final checkpoint on those cases. A training whose ``checkpoint_final.pth`` exists is
not run again; step markers as in ``lidc_experiment.py``: a rerun skips what is done and resumes an interrupted
training with ``--c``. ``WORK/results.json``, ``results.md`` and ``budget_curves.png`` are rewritten after every
model, keeping the rows of other invocations with the same ``--work`` (one per ``--trainer`` at the same time, say).
"""
from __future__ import annotations

import argparse
import os
import shutil
import threading

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, maybe_mkdir_p

from lidc_experiment import (AR, METRICS, PROBUNET, STOCK, evaluate, experiment_env, learning_curve, log, plot_curves,
                             predict, run_lanes, run_steps, sampling_rows, train_cmd, training_facts, write_text)
from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.training.tokenizer_store import TOKENIZER_FOLDER_PREFIX

LINE_STYLES, MARKERS = ("-", "--", ":"), ("o", "^", "s")  # the longest budget first
SHORT_LABELS = {AR: "AR-Seg", PROBUNET: "Prob. U-Net", STOCK: "nnU-Net"}


def run_name(trainer: str, budget: float, seed: int) -> str:
    return f"{trainer}_b{budget:03g}_s{seed}"


def share_out(runs: list[tuple[float, int]], num_lanes: int) -> list[list[tuple[float, int]]]:
    """The ``(budget, seed)`` runs as one queue per lane, the longest given out first, each to the lane with the
    fewest minutes so far; each queue shortest first."""
    queues = [[] for _ in range(num_lanes)]
    for run in sorted(runs, key=lambda r: -r[0]):
        min(queues, key=lambda q: sum(budget for budget, _ in q)).append(run)
    return [sorted(q) for q in queues]


def experiment_tokenizers(results_dir: str, trainer: str) -> list[str]:
    """The experiment's tokenizer folders that ``trainer`` needs: all of them for AR-Seg, none for the rivals."""
    if trainer != AR:
        return []
    found = os.listdir(results_dir) if isdir(results_dir) else []
    tokenizers = [d for d in found if d.startswith(TOKENIZER_FOLDER_PREFIX)]
    if not tokenizers:
        raise SystemExit(f"{results_dir}: no tokenizer; run lidc_experiment.py with this --work through its "
                         "tokenizer step first")
    return tokenizers


def plot_budget_curves(rows: dict, curves: dict, path: str, targets: list[float] | None) -> None:
    """The curves of ``rows``: a colour per model and training seed, a line style per budget."""
    budgets = sorted({r["budget_minutes"] for r in rows.values()}, reverse=True)
    key = {n: (rows[n]["trainer"] != AR, rows[n]["trainer"], rows[n]["training_seed"]) for n in curves}
    colours = sorted(set(key.values()))
    labels, styles = {}, {}
    for name in sorted(curves, key=lambda n: (key[n], rows[n]["budget_minutes"])):
        trainer, budget, seed = rows[name]["trainer"], rows[name]["budget_minutes"], rows[name]["training_seed"]
        labels[name] = f"{SHORT_LABELS.get(trainer, trainer)}, {budget:g} min, training seed {seed}"
        styles[labels[name]] = {"color": f"C{colours.index(key[name]) % 10}",
                                "linestyle": LINE_STYLES[budgets.index(budget) % 3],
                                "marker": MARKERS[budgets.index(budget) % 3]}
    plot_curves({labels[n]: curves[n] for n in labels}, path, styles=styles,
                targets=dict(zip(("GED", "HM-IoU", "Soft-Dice"), targets)) if targets else None)


def budget_table(rows: dict) -> str:
    """The final checkpoints on all test cases, one row per model, budget and training seed."""
    head = "| model | budget (min) | training seed | epochs | " + " | ".join(METRICS) + " |\n|---|---|---|---|" + \
        "---|" * len(METRICS) + "\n"
    return head + "".join(
        f"| {SHORT_LABELS.get(r['trainer'], r['trainer'])} | {r['budget_minutes']:g} | {r['training_seed']} | "
        f"{r['training']['epochs']} | "
        + " | ".join(f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "" for m in METRICS) + " |\n"
        for _, r in sorted(rows.items(), key=lambda kv: (kv[1]["trainer"] != AR, kv[1]["trainer"],
                                                          kv[1]["budget_minutes"], kv[1]["training_seed"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True,
                   help="--work of the lidc_experiment.py run (patients; tokenizer for AR-Seg)")
    p.add_argument("--trainer", default=AR, choices=[AR, PROBUNET, STOCK], help="the model to train")
    p.add_argument("--budgets", type=float, nargs="+", default=[60.0, 120.0, 240.0], help="training minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (nnUNet_ARSEG_TRAINING_SEED)")
    p.add_argument("--snapshot-minutes", type=float, default=30.0)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--cores", default="0,1", help="CPU cores of the simultaneous trainings (taskset); '' off")
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    p.add_argument("--targets", type=float, nargs=3, default=None, metavar=("GED", "HM_IOU", "SOFT_DICE"),
                   help="dashed lines in the figure at these values")
    p.add_argument("--work", default="lidc_budget_curve")
    args = p.parse_args()

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    experiment, work = os.path.abspath(args.experiment), os.path.abspath(args.work)
    env, dataset = experiment_env(experiment)
    tokenizers = experiment_tokenizers(join(env["nnUNet_results"], dataset), args.trainer)
    images = join(env["nnUNet_raw"], dataset, "imagesTs")
    curve_images = join(experiment, "curve_images")
    for sub in ("done", "logs"):
        maybe_mkdir_p(join(work, sub))

    results_file = join(work, "results.json")
    lock = threading.Lock()

    def record(name: str, row: dict, curve: list) -> None:
        """Add the row to those on disk, which other invocations with this ``--work`` may have added to."""
        with lock:
            earlier = load_json(results_file) if isfile(results_file) else {}
            rows, curves = earlier.get("results", {}), earlier.get("learning_curves", {})
            rows[name], curves[name] = row, curve
            save_json_atomic({"experiment": experiment, "num_samples": args.num_samples, "device": device,
                              "results": rows, "learning_curves": curves}, results_file)
            plot_budget_curves(rows, curves, join(work, "budget_curves.png"), args.targets)
            write_text(join(work, "results.md"), budget_table(rows))
        log(f"{name}: " + " / ".join(f"{m} {row['metrics'][m]:.3f}" for m in ("GED", "HM-IoU", "Soft-Dice", "D_max")))

    def train_and_score(budget: float, seed: int, core: str | None) -> None:
        trainer = args.trainer
        name = run_name(trainer, budget, seed)
        run_env = dict(env, nnUNet_results=join(work, name, "nnUNet_results"))
        results_dir = join(run_env["nnUNet_results"], dataset)
        for tokenizer in tokenizers:
            if not isdir(join(results_dir, tokenizer)):
                shutil.copytree(join(env["nnUNet_results"], dataset, tokenizer), join(results_dir, tokenizer))
        model_dir = join(results_dir, f"{trainer}__nnUNetPlans__2d")
        fold_dir = join(model_dir, "fold_all")
        if not isfile(join(fold_dir, "checkpoint_final.pth")):
            train_env = dict(run_env, nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
                             nnUNet_ARSEG_BUDGET_MINUTES=str(budget), nnUNet_ARSEG_TRAINING_SEED=str(seed),
                             nnUNet_ARSEG_SNAPSHOT_MINUTES=str(args.snapshot_minutes))
            run_steps([(f"train_{name}", train_cmd(dataset, trainer, "all", fold_dir, device, core), train_env)],
                      work)
        (_, extra), *_ = sampling_rows(trainer, model_dir)  # its default sampling, the flags explicit
        pred = join(work, "predictions", name)
        predict(work, run_env, dataset, trainer, images, pred, name, args.num_samples, device=device, core=core,
                extra=extra)
        row = {"trainer": trainer, "budget_minutes": budget, "training_seed": seed,
               "training": training_facts(fold_dir),
               "metrics": evaluate(work, run_env, dataset, pred, name, args.num_samples)}
        record(name, row, learning_curve(work, run_env, dataset, trainer, fold_dir, name, curve_images, row, pred,
                                         args.num_samples, device, core, extra))

    cores = args.cores.split(",") if args.cores else [None]
    queues = share_out([(b, s) for b in args.budgets for s in args.seeds], len(cores))

    def lane(k: int):
        def run(core: str | None) -> None:
            for budget, seed in queues[k]:
                train_and_score(budget, seed, core)
        run.__name__ = f"lane_{k}"
        return run

    run_lanes([lane(k) for k in range(len(cores))], cores)
    print(budget_table(load_json(results_file)["results"]))


if __name__ == "__main__":
    main()
