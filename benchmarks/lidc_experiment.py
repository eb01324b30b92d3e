"""AR-Seg against the stock nnU-Net on real LIDC-IDRI crops, on test patients neither model saw, at the same
wall-time budget; and AR-Seg trained on top of that stock model (the upgrade path).

    python benchmarks/lidc_experiment.py --pool LIDC_DEV --num-train 160 --num-test 40 --budget-minutes 60 \\
        --upgrade-minutes 20 --work lidc_experiment

``--pool``: a folder of LIDC-IDRI patient folders (the LIDC-IDRI-slices layout); ``--num-train`` / ``--num-test``
patients are drawn with ``--seed`` and linked into ``WORK/split/`` (lists there). Each step runs the real command
line and leaves a marker in ``WORK/done/``; a rerun with the same ``--work`` skips finished steps and resumes an
interrupted training with ``--c`` (so the runs may span several sittings). Steps:

1. convert (training patients -> imagesTr, test patients -> imagesTs) and ``nnUNetv2_plan_and_preprocess -c 2d``;
2. the dataset's tokenizer (``nnUNetv2_arseg_train_tokenizer``, all cores): trained once per dataset and shared by
   every AR-Seg model of it, like the preprocessing; its minutes are reported beside the budgets, not in them;
3. from scratch, at the same time, each pinned to its own CPU core (``--cores``): ``nnUNetTrainerARSeg_small_budget``
   and ``nnUNetTrainerBudget`` (nnU-Net's own trainer under our budget; batch 8 both), ``--budget-minutes`` each;
   both keep a checkpoint every ``--snapshot-minutes`` for the learning curves;
4. upgrade: ``nnUNetTrainerARSeg_upgrade_budget`` with ``-pretrained_weights`` of the stock model's final checkpoint
   (its U-Net, encoder frozen) for ``--upgrade-minutes``, reusing the dataset's tokenizer; after step 3 (step 5 then
   predicts the two scratch models on the other core meanwhile), or beside AR-Seg's training on the stock model's
   core when the stock model was trained in an earlier sitting; predicted twice: on its own, and sampling around
   the stock model's test predictions (``--anchor``, method §3.3);
5. predict the test patients (AR-Seg: ``--num_samples`` samples; nnU-Net: its one prediction, which the evaluator
   counts as N identical samples) and evaluate with ``nnUNetv2_arseg_evaluate``; the snapshots on every
   ``--curve-every``-th test case (the curves end with the final checkpoint on those cases);
5b. the stock nnU-Net's own way to several masks, a fold ensemble: ``nnUNetTrainerBudget`` folds 0-4 of the
   dataset's ``splits_final.json`` (nnU-Net's 5-fold split of the training cases, written by fold 0, which trains
   first), each for a fifth of ``--budget-minutes``, two at a time on the ``--cores``; each fold predicts the test
   patients into its own folder, and ``nnUNetv2_arseg_evaluate -i fold_0 ... fold_4`` scores them as one sample each;
5c. the Probabilistic U-Net baseline (method §6): ``nnUNetTrainerProbUNet_budget`` from scratch for
   ``--budget-minutes`` on one core (the same data, one rater per example), sampled and scored like AR-Seg (its
   snapshots give a learning curve too);
6. write ``WORK/results.json``, ``WORK/results.md`` (tables) and ``WORK/learning_curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time

from batchgenerators.utilities.file_and_folder_operations import (isfile, join, load_json, maybe_mkdir_p, subdirs,
                                                                  subfiles)

from nnunet_arseg.atomic import save_json_atomic, write_atomic

BIN = os.path.dirname(sys.executable)
AR = "nnUNetTrainerARSeg_small_budget"
STOCK = "nnUNetTrainerBudget"
UPGRADE = "nnUNetTrainerARSeg_upgrade_budget"
NUM_FOLDS = 5
ENSEMBLE = f"{STOCK}_{NUM_FOLDS}folds"
PROBUNET = "nnUNetTrainerProbUNet_budget"
METRICS = ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus", "presence_gap", "presence_correlation")
ANCHORED = f"{UPGRADE}_anchored"
LABELS = {AR: "AR-Seg from scratch", STOCK: "nnU-Net (stock)", UPGRADE: "AR-Seg upgrade of the nnU-Net model",
          ANCHORED: "AR-Seg upgrade, sampled around the nnU-Net masks (--anchor)",
          ENSEMBLE: f"nnU-Net {NUM_FOLDS}-fold ensemble (1/{NUM_FOLDS} of the budget per fold), one sample per fold",
          PROBUNET: "Probabilistic U-Net (Kohl et al. 2018) from scratch", "empty": "empty mask (reference)"}


def log(msg: str) -> None:
    print(f"[lidc_experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def marker(work: str, step: str) -> str:
    return join(work, "done", step)


def start_steps(steps: list[tuple[str, list[str], dict]], work: str) -> list:
    """Start the not yet finished ``(name, cmd, env)`` steps at the same time; ``wait_steps`` collects them."""
    todo = [(n, c, e) for n, c, e in steps if not isfile(marker(work, n))]
    for n, _, _ in steps:
        if not any(n == t[0] for t in todo):
            log(f"{n}: done before, skipping")
    procs = []
    for name, cmd, env in todo:
        log(f"{name}\n  $ {shlex.join(cmd)}")
        out = open(join(work, "logs", f"{name}.log"), "a")
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), time.time(), out))
    return procs


def wait_steps(procs: list, work: str) -> None:
    """Wait for steps of ``start_steps``; each leaves its marker on success."""
    failed = []
    for name, proc, t0, out in procs:
        rc = proc.wait()
        out.close()
        if rc != 0:
            failed.append(f"{name} (exit {rc}, see {join(work, 'logs', name + '.log')})")
            continue
        with open(marker(work, name), "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
        log(f"{name}: done in {time.time() - t0:.0f} s")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def run_steps(steps: list[tuple[str, list[str], dict]], work: str) -> None:
    """Run the not yet finished ``(name, cmd, env)`` steps at the same time and wait for them."""
    wait_steps(start_steps(steps, work), work)


def patients_in(folder: str) -> list[str]:
    names = sorted(d for d in subdirs(folder, join=False) if not d.startswith("."))
    if not names:
        raise SystemExit(f"{folder}: no patient subfolders (expected LIDC-IDRI-XXXX/nodule-K/images/...)")
    return names


def split_pool(pool: str, work: str, num_train: int, num_test: int, seed: int) -> tuple[str, str]:
    """Link a seeded patient split of ``pool`` into ``WORK/split/{train,test}``; the lists go beside them."""
    patients = patients_in(pool)
    if num_train + num_test > len(patients):
        raise SystemExit(f"--pool {pool} has {len(patients)} patients, fewer than --num-train + --num-test")
    chosen = random.Random(seed).sample(patients, num_train + num_test)
    lists = {"train": sorted(chosen[:num_train]), "test": sorted(chosen[num_train:])}
    split_file = join(work, "split", "split.json")
    if isfile(split_file) and load_json(split_file)["patients"] != lists:
        raise SystemExit(f"{split_file} holds a different split (other --pool/--num-*/--seed); use another --work")
    for part, names in lists.items():
        maybe_mkdir_p(join(work, "split", part))
        for name in names:
            link = join(work, "split", part, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(join(pool, name)), link)
        write_text(join(work, "split", f"{part}_patients.txt"), "\n".join(names) + "\n")
    save_json_atomic({"seed": seed, "patients": lists}, split_file)
    return join(work, "split", "train"), join(work, "split", "test")


def write_empty_prediction(raw: str, pred_dir: str, cases: list[str], file_ending: str) -> None:
    """The all-empty prediction of ``cases``, one mask per case (a reference row: what drawing nothing scores)."""
    import numpy as np
    from PIL import Image
    maybe_mkdir_p(pred_dir)
    for case in cases:
        shape = np.asarray(Image.open(join(raw, "imagesTs", f"{case}_0000{file_ending}"))).shape[:2]
        path = join(pred_dir, case + file_ending)
        if not isfile(path):
            write_atomic(path, lambda t: Image.fromarray(np.zeros(shape, np.uint8)).save(t, format="png"))


def training_facts(fold_dir: str) -> dict:
    """Epochs, iterations and wall time from the final checkpoint's log."""
    import torch
    ckpt = torch.load(join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    logs = ckpt["logging"]
    starts, ends = logs["epoch_start_timestamps"], logs["epoch_end_timestamps"]
    out = {"epochs": int(ckpt["current_epoch"]), "epoch_minutes": round(sum(e - s for s, e in zip(starts, ends)) / 60,
                                                                        1)}
    record = join(fold_dir, "budget_tokenizer.json")
    if isfile(record):
        out["tokenizer_minutes"] = round(load_json(record)["tokenizer_seconds"] / 60, 1)
    return out


def evaluate(work: str, env: dict, did: str, pred: str, name: str, num_samples: int | None,
             cases_folder: str | None = None, folders: list[str] | None = None) -> dict:
    """``nnUNetv2_arseg_evaluate`` of ``pred`` (or of ``folders``, one sample each; the summary goes to ``pred``);
    ``num_samples``: N of a folder of one prediction per case, checked against an AR-Seg folder's samples."""
    summary = join(pred, "summary_arseg.json")
    cmd = [join(BIN, "nnUNetv2_arseg_evaluate"), "-i", *(folders or [pred]), "-d", did, "-o", summary]
    if num_samples is not None:
        cmd += ["--num_samples", str(num_samples)]
    if cases_folder:
        cmd += ["-cases", cases_folder]
    run_steps([(f"evaluate_{name}", cmd, env)], work)
    s = load_json(summary)
    return {m: s["mean"]["1"][m] for m in METRICS if m in s["mean"]["1"]} | {"num_cases": len(s["metric_per_case"])}


def mean_over(summary: str, cases: set[str]) -> dict:
    """The per-case metrics of an evaluator's ``summary`` averaged over ``cases`` (NaN ignored, as its own mean)."""
    from nnunet_arseg.evaluation.multirater import nan_mean
    per_case = [c["metrics"]["1"] for c in load_json(summary)["metric_per_case"] if c["case"] in cases]
    return {m: nan_mean([c[m] for c in per_case]) for m in METRICS if m in per_case[0]} | {
        "num_cases": len(per_case)}


def predict(work: str, env: dict, did: str, trainer: str, images: str, pred: str, name: str, num_samples: int,
            checkpoint: str = "checkpoint_final.pth", device: str = "cpu", core: str | None = None,
            extra: tuple[str, ...] = (), fold: str = "all") -> None:
    pin = ["taskset", "-c", core] if core else []
    common = ["-i", images, "-o", pred, "-d", did, "-c", "2d", "-f", fold, "-tr", trainer, "-chk", checkpoint,
              "-device", device, "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    if trainer == STOCK:  # one mask per case, scored as num_samples identical samples by the evaluator
        run_steps([(f"predict_{name}", pin + [join(BIN, "nnUNetv2_predict")] + common, env)], work)
    else:
        run_steps([(f"predict_{name}", pin + [join(BIN, "nnUNetv2_arseg_predict")] + common +
                    ["--num_samples", str(num_samples), "--save_samples", *extra], env)], work)


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("GED", "HM-IoU", "Soft-Dice")):
        for trainer, points in curves.items():
            if points:
                ax.plot([p["minutes"] for p in points], [p[metric] for p in points], "o-", label=LABELS[trainer])
        ax.set_title(metric + (" (lower is better)" if metric == "GED" else " (higher is better)"))
        ax.set_xlabel("training minutes"), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


def results_table(rows: dict) -> str:
    head = "| model | " + " | ".join(METRICS) + " | training |\n|---|" + "---|" * (len(METRICS) + 1) + "\n"
    body = ""
    for name, res in rows.items():
        cells = [f"{res['metrics'][m]:.3f}" if m in res["metrics"] else "" for m in METRICS]
        body += f"| {LABELS[name]} | " + " | ".join(cells) + f" | {res.get('training', '')} |\n"
    return head + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, help="folder of LIDC-IDRI patient folders")
    p.add_argument("--num-train", type=int, default=160)
    p.add_argument("--num-test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--budget-minutes", type=float, default=60.0,
                   help="training wall time of each from-scratch model (the fold ensemble: all its folds together)")
    p.add_argument("--upgrade-minutes", type=float, default=20.0, help="AR-Seg training on top of the stock model")
    p.add_argument("--snapshot-minutes", type=float, default=10.0, help="checkpoint interval of the learning curves")
    p.add_argument("--curve-every", type=int, default=3, help="learning curves on every n-th test case")
    p.add_argument("--cores", default="0,1", help="CPU cores of the two simultaneous trainings (taskset); '' off")
    p.add_argument("--work", default="lidc_experiment", help="work folder (nnU-Net folders, predictions, results)")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("-d", type=int, default=601, help="dataset id inside the work folder")
    args = p.parse_args()
    work = os.path.abspath(args.work)
    for sub in ("done", "logs"):
        maybe_mkdir_p(join(work, sub))
    train_dir, test_dir = split_pool(args.pool, work, args.num_train, args.num_test, args.seed)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from nnunet_arseg.nnunet_ext import EXT_DIR
    env = dict(os.environ, nnUNet_raw=join(work, "nnUNet_raw"), nnUNet_preprocessed=join(work, "nnUNet_preprocessed"),
               nnUNet_results=join(work, "nnUNet_results"), nnUNet_extTrainer=EXT_DIR, nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planning breaks with 0; set for training only
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        maybe_mkdir_p(env[key])
    name = f"Dataset{args.d:03d}_LIDCExp"
    raw, did = join(env["nnUNet_raw"], name), str(args.d)
    run_steps([("convert", [join(BIN, "nnUNetv2_arseg_convert_lidc"), "-i", train_dir, "--test_input", test_dir,
                            "-o", env["nnUNet_raw"], "-d", did, "-n", "LIDCExp", "--disable_progress_bar"], env)], work)
    run_steps([("plan", [join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", did, "-c", "2d", "-np", "1", "-npfp", "1",
                         "--verify_dataset_integrity", "--no_pbar"], env)], work)

    results_dir = join(env["nnUNet_results"], name)

    def fold_dir(trainer: str, fold: str = "all") -> str:
        return join(results_dir, f"{trainer}__nnUNetPlans__2d", f"fold_{fold}")

    def train_cmd(trainer: str, core: str | None, extra: list[str], fold: str = "all") -> list[str]:
        resume = ["--c"] if isfile(join(fold_dir(trainer, fold), "checkpoint_latest.pth")) else []
        pin = ["taskset", "-c", core] if core else []
        return pin + [join(BIN, "nnUNetv2_train"), did, "2d", fold, "-tr", trainer, "-device", device] + \
            (resume or extra)

    run_steps([("tokenizer", [sys.executable, "-m", "nnunet_arseg.training.train_tokenizer", did, "2d", "-tr", AR,
                              "-device", device], env)], work)
    cores = args.cores.split(",") if args.cores else [None, None]
    train_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_ARSEG_SNAPSHOT_MINUTES=str(args.snapshot_minutes))
    scratch_env = dict(train_env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.budget_minutes))
    scratch = [(f"train_{AR}", train_cmd(AR, cores[0], []), scratch_env),
               (f"train_{STOCK}", train_cmd(STOCK, cores[1], []), scratch_env)]
    stock_trained = isfile(marker(work, f"train_{STOCK}"))
    stock_final = join(fold_dir(STOCK), "checkpoint_final.pth")
    # a stock model trained in an earlier sitting frees its core: the upgrade then runs beside AR-Seg from scratch
    upgrade = (f"train_{UPGRADE}", train_cmd(UPGRADE, cores[1] if stock_trained else cores[0],
                                             ["-pretrained_weights", stock_final]),
               dict(train_env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.upgrade_minutes)))
    upgrading = []
    if stock_trained:
        run_steps(scratch + [upgrade], work)
    else:
        run_steps(scratch, work)
        upgrading = start_steps([upgrade], work)  # the scratch models are predicted on the other core meanwhile

    # every curve_every-th test case for the learning curves
    images = join(raw, "imagesTs")
    cases = sorted(f[:-len("_0000.png")] for f in subfiles(images, suffix="_0000.png", join=False))
    curve_images = join(work, "curve_images")
    maybe_mkdir_p(curve_images)
    curve_cases = cases[::args.curve_every]
    for case in curve_cases:
        link = join(curve_images, f"{case}_0000.png")
        if not os.path.lexists(link):
            os.symlink(join(images, f"{case}_0000.png"), link)

    rows, curves = {}, {}

    def predict_and_evaluate(trainer: str, core: str | None) -> None:
        pred = join(work, "predictions", trainer)
        predict(work, env, did, trainer, images, pred, trainer, args.num_samples, device=device, core=core)
        rows[trainer] = {"metrics": evaluate(work, env, did, pred, trainer, args.num_samples),
                         "training": training_facts(fold_dir(trainer))}
        curves[trainer] = []
        for snap in sorted(subfiles(fold_dir(trainer), prefix="checkpoint_", suffix="min.pth", join=False)):
            minutes = int(snap[len("checkpoint_"):-len("min.pth")])
            tag = f"{trainer}_{minutes:03d}min"
            pred = join(work, "curves", tag)
            predict(work, env, did, trainer, curve_images, pred, tag, args.num_samples, checkpoint=snap,
                    device=device, core=core)
            curves[trainer].append({"minutes": minutes, **evaluate(work, env, did, pred, tag, args.num_samples,
                                                                   curve_images)})
        # the final checkpoint on the same cases, from the full test set's per-case metrics
        curves[trainer].append({"minutes": rows[trainer]["training"]["epoch_minutes"], "final": True, **mean_over(
            join(work, "predictions", trainer, "summary_arseg.json"), set(curve_cases))})

    free_core = cores[1] if upgrading else None
    for trainer in (AR, STOCK):
        predict_and_evaluate(trainer, free_core)
    wait_steps(upgrading, work)
    predict_and_evaluate(UPGRADE, None)
    # the upgrade sampled around the stock model's own test predictions (method §3.3, all scales from them)
    pred = join(work, "predictions", ANCHORED)
    predict(work, env, did, UPGRADE, images, pred, ANCHORED, args.num_samples, device=device,
            extra=("--anchor", join(work, "predictions", STOCK)))
    rows[ANCHORED] = {"metrics": evaluate(work, env, did, pred, ANCHORED, args.num_samples),
                      "training": rows[UPGRADE]["training"]}

    # the stock fold ensemble: fold 0 first (it writes nnU-Net's splits_final.json), then two folds at a time
    fold_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_ARSEG_BUDGET_MINUTES=str(args.budget_minutes / NUM_FOLDS))
    for batch in ([0], [1, 2], [3, 4]):
        run_steps([(f"train_{STOCK}_fold{k}", train_cmd(STOCK, cores[i % len(cores)], [], fold=str(k)), fold_env)
                   for i, k in enumerate(batch)], work)
    ensemble_dir = join(work, "predictions", ENSEMBLE)
    fold_preds = [join(ensemble_dir, f"fold_{k}") for k in range(NUM_FOLDS)]
    for k, fold_pred in enumerate(fold_preds):
        predict(work, env, did, STOCK, images, fold_pred, f"{ENSEMBLE}_fold{k}", args.num_samples, device=device,
                fold=str(k))
    facts = [training_facts(fold_dir(STOCK, str(k))) for k in range(NUM_FOLDS)]
    rows[ENSEMBLE] = {"metrics": evaluate(work, env, did, ensemble_dir, ENSEMBLE, None, folders=fold_preds),
                      "training": {"epochs": [f["epochs"] for f in facts],
                                   "epoch_minutes": round(sum(f["epoch_minutes"] for f in facts), 1)}}

    # the Probabilistic U-Net baseline: AR-Seg's budget, data and sampling (method §6)
    run_steps([(f"train_{PROBUNET}", train_cmd(PROBUNET, cores[0], []), scratch_env)], work)
    predict_and_evaluate(PROBUNET, None)

    pred = join(work, "predictions", "empty")
    write_empty_prediction(raw, pred, cases, ".png")
    rows["empty"] = {"metrics": evaluate(work, env, did, pred, "empty", args.num_samples)}

    dataset_json = load_json(join(raw, "dataset.json"))
    tokenizer = load_json(next(join(dirpath, "summary.json") for dirpath, _, files in os.walk(results_dir)
                               if "summary.json" in files and "ARSegTokenizer" in dirpath))
    out = {"tokenizer": {k: tokenizer[k] for k in ("seconds", "steps", "heldout", "latent_shape", "scales")},
           "budget_minutes": args.budget_minutes, "upgrade_minutes": args.upgrade_minutes,
           "num_samples": args.num_samples, "device": device, "cores": args.cores, "seed": args.seed,
           "num_train_patients": args.num_train, "num_test_patients": args.num_test,
           "num_train_cases": dataset_json["numTraining"], "num_test_cases": len(cases),
           "results": rows, "learning_curves": curves}
    save_json_atomic(out, join(work, "results.json"))
    plot_curves(curves, join(work, "learning_curves.png"))
    table = results_table(rows)
    write_text(join(work, "results.md"), table)
    print(table)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
