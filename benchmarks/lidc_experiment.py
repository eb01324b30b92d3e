"""AR-Seg against the stock nnU-Net trainer on real LIDC-IDRI crops, each trained for the same wall-time budget.

    python benchmarks/lidc_experiment.py --train TRAIN_DIR --test TEST_DIR --budget-minutes 20 [--work DIR]
    python benchmarks/lidc_experiment.py --pool /tmp/lidc_dev --num-train 120 --num-test 40 --budget-minutes 20

Folders are in the LIDC-IDRI-slices layout (one subfolder per patient). ``--pool`` draws disjoint train/test patient
sets with ``--seed`` instead and links them into ``WORK/split/`` (the lists are written there). Steps, each with the
real command line: convert (train -> imagesTr, test -> imagesTs), plan and preprocess (2d), train AR-Seg and
``nnUNetTrainerBudget`` one after the other for ``--budget-minutes`` each (``nnUNet_ARSEG_BUDGET_MINUTES``), predict the
test patients (AR-Seg: N samples; nnU-Net: its one prediction linked as N identical samples), evaluate both with
``nnUNetv2_arseg_evaluate``. Prints a table and one JSON line (also ``WORK/results.json``); progress goes to stderr.
A rerun with the same ``--work`` skips finished steps and resumes an interrupted training with ``--c``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time

from batchgenerators.utilities.file_and_folder_operations import (isfile, join, load_json, maybe_mkdir_p, save_json,
                                                                  subdirs, subfiles)

from nnunet_arseg.prediction_files import sample_file

BIN = os.path.dirname(sys.executable)
STOCK_TRAINER = "nnUNetTrainerBudget"
METRICS = ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus")


def log(msg: str) -> None:
    print(f"[lidc_experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_step(name: str, cmd: list[str], env: dict, marker: str) -> None:
    """Run ``cmd`` unless ``marker`` exists; create the marker after success (stdout goes to stderr)."""
    if isfile(marker):
        log(f"{name}: done before, skipping")
        return
    log(f"{name}\n  $ {shlex.join(cmd)}")
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
    with open(marker, "w") as f:
        f.write(f"{time.time() - t0:.1f}\n")
    log(f"{name}: done in {time.time() - t0:.0f} s")


def save_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save_json(obj, tmp, sort_keys=False)
    os.replace(tmp, path)


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
    if isfile(split_file):
        if load_json(split_file)["patients"] != lists:
            raise SystemExit(f"{split_file} holds a different split (other --pool/--num-*/--seed); use another --work")
    for part, names in lists.items():
        maybe_mkdir_p(join(work, "split", part))
        for name in names:
            link = join(work, "split", part, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(join(pool, name)), link)
        with open(join(work, "split", f"{part}_patients.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    save_json_atomic({"pool": os.path.abspath(pool), "seed": seed, "patients": lists}, split_file)
    return join(work, "split", "train"), join(work, "split", "test")


def link_single_prediction_as_samples(pred_dir: str, file_ending: str, num_samples: int) -> int:
    """``PRED/samples/<case>_sampleNN<ext>``: nnU-Net's one prediction as ``num_samples`` identical samples (hard
    links)."""
    maybe_mkdir_p(join(pred_dir, "samples"))
    cases = subfiles(pred_dir, suffix=file_ending, join=False)
    for name in cases:
        for k in range(num_samples):
            dst = sample_file(pred_dir, name[:-len(file_ending)], k, file_ending)
            if not isfile(dst):
                tmp = f"{dst}.tmp{os.getpid()}"
                try:
                    os.link(join(pred_dir, name), tmp)
                except OSError:
                    shutil.copyfile(join(pred_dir, name), tmp)
                os.replace(tmp, dst)
    return len(cases)


def training_facts(fold_dir: str) -> dict:
    """Epochs, iterations and training wall time from the final checkpoint's log (for the results page)."""
    import torch

    ckpt = torch.load(join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    logs = ckpt["logging"]
    starts, ends = logs["epoch_start_timestamps"], logs["epoch_end_timestamps"]
    out = {"epochs": int(ckpt["current_epoch"]), "epoch_seconds_sum": round(float(sum(e - s for s, e in
                                                                                     zip(starts, ends))), 1)}
    if "arseg_phase" in ckpt:
        out["final_phase"] = ckpt["arseg_phase"]
    text = "".join(open(f).read() for f in subfiles(fold_dir, prefix="training_log", suffix=".txt"))
    budget_lines = [line.split(": ", 1)[-1] for line in text.splitlines() if "Wall-time budget" in line]
    out["budget_log"] = budget_lines[-3:]
    return out


def format_table(results: dict) -> str:
    rows = [["trainer"] + list(METRICS)]
    for trainer, res in results.items():
        rows.append([trainer] + [f"{res['metrics'].get(m, float('nan')):.4f}" for m in METRICS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths)] + lines[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", help="training patients (LIDC-IDRI-slices layout)")
    p.add_argument("--test", help="test patients (LIDC-IDRI-slices layout)")
    p.add_argument("--pool", help="instead of --train/--test: draw both from this folder of patients")
    p.add_argument("--num-train", type=int, default=120)
    p.add_argument("--num-test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="seed of the --pool patient split")
    p.add_argument("--budget-minutes", type=float, required=True, help="training wall time per trainer")
    p.add_argument("--work", default="lidc_experiment", help="work folder (nnU-Net folders, predictions, results)")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--fold", default="all", choices=("all", "0", "1", "2", "3", "4"))
    p.add_argument("--arseg-trainer", default="nnUNetTrainerARSeg_small_budget")
    p.add_argument("-d", type=int, default=601, help="dataset id inside the work folder")
    args = p.parse_args()
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    work = os.path.abspath(args.work)
    maybe_mkdir_p(join(work, "done"))
    if args.pool:
        train_dir, test_dir = split_pool(args.pool, work, args.num_train, args.num_test, args.seed)
    elif args.train and args.test:
        train_dir, test_dir = args.train, args.test
        if set(patients_in(train_dir)) & set(patients_in(test_dir)):
            p.error("--train and --test share patients; give disjoint folders")
    else:
        p.error("give --train and --test, or --pool")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    from nnunet_arseg.nnunet_ext import EXT_DIR
    env = dict(os.environ, nnUNet_raw=join(work, "nnUNet_raw"), nnUNet_preprocessed=join(work, "nnUNet_preprocessed"),
               nnUNet_results=join(work, "nnUNet_results"), nnUNet_extTrainer=EXT_DIR, nnUNet_def_n_proc="1")
    env.pop("nnUNet_n_proc_DA", None)  # planning breaks with 0 (nnunet-notes 5.4); set for training only
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        maybe_mkdir_p(env[key])
    name = f"Dataset{args.d:03d}_LIDCExp"
    raw = join(env["nnUNet_raw"], name)
    did, done = str(args.d), lambda step: join(work, "done", step)

    run_step("convert", [join(BIN, "nnUNetv2_arseg_convert_lidc"), "-i", train_dir, "--test_input", test_dir,
                         "-o", env["nnUNet_raw"], "-d", did, "-n", "LIDCExp", "--disable_progress_bar"],
             env, done("convert"))
    run_step("plan and preprocess", [join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", did, "-c", "2d", "-np", "1",
                                     "-npfp", "1", "--verify_dataset_integrity", "--no_pbar"], env, done("plan"))
    dataset_json = load_json(join(raw, "dataset.json"))
    ext = dataset_json["file_ending"]
    train_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_ARSEG_BUDGET_MINUTES=str(args.budget_minutes))
    results = {}
    for trainer in (args.arseg_trainer, STOCK_TRAINER):
        fold_dir = join(env["nnUNet_results"], name, f"{trainer}__nnUNetPlans__2d", f"fold_{args.fold}")
        resume = ["--c"] if any(isfile(join(fold_dir, f"checkpoint_{c}.pth")) for c in ("latest", "best")) \
            and not isfile(done(f"train_{trainer}")) else []
        run_step(f"train {trainer} for {args.budget_minutes:g} min" + (" (resuming)" if resume else ""),
                 [join(BIN, "nnUNetv2_train"), did, "2d", args.fold, "-tr", trainer, "-device", device] + resume,
                 train_env, done(f"train_{trainer}"))
    for trainer in (args.arseg_trainer, STOCK_TRAINER):
        pred = join(work, "predictions", trainer)
        common = ["-i", join(raw, "imagesTs"), "-o", pred, "-d", did, "-c", "2d", "-f", args.fold, "-tr", trainer,
                  "-device", device, "-npp", "0", "-nps", "0", "--disable_progress_bar"]
        if trainer == STOCK_TRAINER:
            run_step(f"predict {trainer}", [join(BIN, "nnUNetv2_predict")] + common, env, done(f"predict_{trainer}"))
            n_cases = link_single_prediction_as_samples(pred, ext, args.num_samples)
            log(f"{trainer}: one prediction per case linked as {args.num_samples} samples ({n_cases} cases)")
        else:
            run_step(f"predict {trainer} ({args.num_samples} samples)",
                     [join(BIN, "nnUNetv2_arseg_predict")] + common + ["--num_samples", str(args.num_samples),
                                                                       "--save_samples"],
                     env, done(f"predict_{trainer}"))
        summary = join(pred, "summary_arseg.json")
        run_step(f"evaluate {trainer}", [join(BIN, "nnUNetv2_arseg_evaluate"), "-i", pred, "-d", did, "-o", summary],
                 env, done(f"evaluate_{trainer}"))
        s = load_json(summary)
        fold_dir = join(env["nnUNet_results"], name, f"{trainer}__nnUNetPlans__2d", f"fold_{args.fold}")
        results[trainer] = {"metrics": {m: s["foreground_mean"][m] for m in METRICS if m in s["foreground_mean"]},
                            "num_test_cases": len(s["metric_per_case"]), "training": training_facts(fold_dir)}
    out = {"budget_minutes": args.budget_minutes, "num_samples": args.num_samples, "fold": args.fold,
           "device": device, "train": os.path.abspath(train_dir), "test": os.path.abspath(test_dir),
           "num_train_patients": len(patients_in(train_dir)), "num_test_patients": len(patients_in(test_dir)),
           "num_train_cases": dataset_json["numTraining"], "results": results}
    save_json_atomic(out, join(work, "results.json"))
    print(format_table(results))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
