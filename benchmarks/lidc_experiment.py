"""AR-Seg against what a lab would pick instead (the stock nnU-Net, its 5-fold ensemble, the Probabilistic U-Net) on
real LIDC-IDRI crops, on test patients no model saw, at the same wall-time budget; and AR-Seg trained on top of the
stock model (the upgrade path).

    python benchmarks/lidc_experiment.py --pool LIDC_DEV --num-train 160 --num-test 40 --budget-minutes 60 \\
        --upgrade-minutes 20 --work lidc_experiment

``--pool``: a folder of LIDC-IDRI patient folders (the LIDC-IDRI-slices layout); ``--num-train`` / ``--num-test``
patients are drawn with ``--seed`` and linked into ``WORK/split/`` (lists there). Each step runs the real command
line and leaves a marker in ``WORK/done/``; a rerun with the same ``--work`` skips finished steps and resumes an
interrupted training with ``--c`` (so the runs may span several sittings). Steps:

1. convert (training patients -> imagesTr, test patients -> imagesTs) and ``nnUNetv2_plan_and_preprocess -c 2d``;
2. the dataset's tokenizer (``nnUNetv2_arseg_train_tokenizer``, all cores): trained once per dataset and shared by
   every AR-Seg model of it, like the preprocessing; its minutes are reported beside the budgets, not in them;
3. then two lanes, each pinned to its own CPU core (``--cores``), each running its steps one after another (every
   training has its core to itself, so equal budgets buy equal compute):

   - lane A: the ``--candidates`` and ``nnUNetTrainerARSeg_small_budget``, each from scratch for
     ``--budget-minutes``, each sampled both ways an AR-Seg model samples (``sampling_rows``: the transformer's own
     draws, the default, and ``--sampler head``); folds 1 and 2 of the fold ensemble (below);
   - lane B: ``nnUNetTrainerBudget`` (nnU-Net's own trainer under our budget) from scratch for ``--budget-minutes``;
     the Probabilistic U-Net baseline ``nnUNetTrainerProbUNet_budget`` (method §6; the same data, one rater per
     example, sampled like AR-Seg) for ``--budget-minutes``; folds 0, 3 and 4 of the fold ensemble; the upgrade:
     ``nnUNetTrainerARSeg_upgrade_budget`` with ``-pretrained_weights`` of the stock model's final checkpoint (its
     U-Net, encoder frozen) for ``--upgrade-minutes``, sampled both ways and around the stock model's test
     predictions (``--anchor``, method §3.3); then, once lane A's folds are done, it scores the fold ensemble.

   The from-scratch models come first in both lanes, so a run that spans several sittings has them earliest.
   The fold ensemble is nnU-Net's own way to several masks: ``nnUNetTrainerBudget`` on folds 0-4 of the 5-fold split
   of the training cases (grouped by patient, written to ``splits_final.json`` before the lanes start), each for a
   fifth of ``--budget-minutes``, each predicting the test patients into its own folder.

   Batch 8 for every model. The from-scratch models keep a checkpoint every ``--snapshot-minutes`` for the learning
   curves. Each trained model predicts the test patients (AR-Seg and ProbUNet: ``--num_samples`` samples; nnU-Net:
   its one prediction, which the evaluator counts as N identical samples), is scored with
   ``nnUNetv2_arseg_evaluate``, and its snapshots are scored on every ``--curve-every``-th test case (the curves end
   with the final checkpoint on those cases); the fold ensemble is scored as five samples per case
   (``nnUNetv2_arseg_evaluate -i fold_0 ... fold_4``);
4. ``WORK/results.json``, ``WORK/results.md`` (the table) and ``WORK/learning_curves.png``, rewritten after every row
   (a long run can be read while it goes on).
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import threading
import time

from batchgenerators.utilities.file_and_folder_operations import (isfile, join, load_json, maybe_mkdir_p, subdirs,
                                                                  subfiles)

from nnunet_arseg.atomic import save_json_atomic, write_atomic

BIN = os.path.dirname(sys.executable)
CANDIDATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")  # --candidates
AR = "nnUNetTrainerARSeg_small_budget"
STOCK = "nnUNetTrainerBudget"
UPGRADE = "nnUNetTrainerARSeg_upgrade_budget"
NUM_FOLDS = 5
ENSEMBLE = f"{STOCK}_{NUM_FOLDS}folds"
PROBUNET = "nnUNetTrainerProbUNet_budget"
METRICS = ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus", "presence_gap", "presence_correlation")
ANCHORED = f"{UPGRADE}_anchored"
HEAD = "_head"  # suffix of an AR-Seg model's row sampled by its U-Net head's thresholds (--sampler head)
LABELS = {AR: "AR-Seg from scratch (its own draws, the default)", STOCK: "nnU-Net (stock)",
          UPGRADE: "AR-Seg upgrade of the nnU-Net model (its own draws, the default)",
          ANCHORED: "AR-Seg upgrade, sampled around the nnU-Net masks (--anchor)",
          AR + HEAD: "AR-Seg from scratch, U-Net head + presence, threshold levels (--sampler head)",
          UPGRADE + HEAD: "AR-Seg upgrade, U-Net head + presence, threshold levels (--sampler head)",
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


def run_lanes(lanes: list, cores: list) -> None:
    """Run each lane (a function of its core that runs its steps one after another) in its own thread; any lane's
    failure fails the run once every lane has stopped."""
    errors = []

    def run(lane, core):
        try:
            lane(core)
        except BaseException as e:  # SystemExit of a failed step included
            errors.append(f"{lane.__name__}: {e}")
            log(f"{lane.__name__} stopped: {e}")

    threads = [threading.Thread(target=run, args=(lane, core)) for lane, core in zip(lanes, cores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("failed: " + "; ".join(errors))


def step_seconds(work: str, step: str) -> float:
    """The wall time a finished step took (its marker's content)."""
    with open(marker(work, step)) as f:
        return float(f.read())


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


def draw_outside(pool: str, split_file: str, num: int, seed: int, exclude: list[str] = ()) -> list[str]:
    """``num`` patients of ``pool`` drawn with ``seed`` among those outside a run's split (its ``split.json``) and
    outside the ``exclude`` lists (files of one patient per line, e.g. an earlier draw's)."""
    used = {name for part in load_json(split_file)["patients"].values() for name in part}
    for path in exclude:
        with open(path) as f:
            used |= {line.strip() for line in f if line.strip()}
    rest = [name for name in patients_in(pool) if name not in used]
    if len(rest) < num:
        raise SystemExit(f"--pool {pool} has {len(rest)} patients outside {split_file}"
                         + (f" and {', '.join(exclude)}" if exclude else "") + f", fewer than the {num} asked for")
    return sorted(random.Random(seed).sample(rest, num))


def convert_patients(pool: str, names: list[str], work: str, part: str, dataset_id: int, dataset_name: str,
                     env: dict) -> str:
    """Link ``names`` into ``WORK/PART`` (listed in ``WORK/PART_patients.txt``) and convert them into
    ``env["nnUNet_raw"]`` as a dataset of their own, every case a training case (nothing trains on them; the
    evaluator finds their raters in ``labelsTr_raters``); returns its images folder."""
    maybe_mkdir_p(join(work, part))
    for name in names:
        link = join(work, part, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(join(pool, name)), link)
    write_text(join(work, f"{part}_patients.txt"), "\n".join(names) + "\n")
    maybe_mkdir_p(env["nnUNet_raw"])
    run_steps([("convert", [join(BIN, "nnUNetv2_arseg_convert_lidc"), "-i", join(work, part), "-o", env["nnUNet_raw"],
                            "-d", str(dataset_id), "-n", dataset_name, "--test_fraction", "0",
                            "--disable_progress_bar"], env)], work)
    return join(env["nnUNet_raw"], f"Dataset{dataset_id:03d}_{dataset_name}", "imagesTr")


def experiment_env(experiment: str) -> tuple[dict, str]:
    """The nnU-Net folders of a finished run (its ``--work``) and the name of its one dataset (``DatasetXXX_Name``)."""
    from nnunet_arseg.nnunet_ext import ext_trainer_value
    if not isfile(join(experiment, "split", "split.json")):
        raise SystemExit(f"{join(experiment, 'split', 'split.json')} not found: --experiment must be the --work of a "
                         "lidc_experiment.py run")
    env = dict(os.environ, nnUNet_raw=join(experiment, "nnUNet_raw"),
               nnUNet_preprocessed=join(experiment, "nnUNet_preprocessed"),
               nnUNet_results=join(experiment, "nnUNet_results"), nnUNet_extTrainer=ext_trainer_value(CANDIDATES_DIR))
    datasets = [d for d in os.listdir(env["nnUNet_raw"]) if d.startswith("Dataset")]
    if len(datasets) != 1:
        raise SystemExit(f"{env['nnUNet_raw']}: expected the experiment's one dataset, found {datasets}")
    return env, datasets[0]


def write_empty_prediction(images: str, pred_dir: str, cases: list[str], file_ending: str) -> None:
    """The all-empty prediction of ``cases`` (their images in ``images``), one mask per case (a reference row: what
    drawing nothing scores)."""
    import numpy as np
    from PIL import Image
    maybe_mkdir_p(pred_dir)
    for case in cases:
        shape = np.asarray(Image.open(join(images, f"{case}_0000{file_ending}"))).shape[:2]
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


def predict_row(work: str, env: dict, did: str, trainer: str, model_dir: str, images: str, name: str,
                num_samples: int, device: str = "cpu", core: str | None = None, extra: tuple[str, ...] = (),
                scored_by: tuple[dict, str] | None = None) -> dict:
    """One table row: the trained ``trainer`` (its fold folder ``model_dir``) predicts ``images`` into
    ``WORK/predictions/NAME`` (``extra``: more predictor flags), scored by the evaluator, with its training facts and
    the prediction's wall time per case. ``scored_by``: the ``(env, dataset id)`` whose raters score the images when
    they are not of the model's dataset."""
    pred = join(work, "predictions", name)
    predict(work, env, did, trainer, images, pred, name, num_samples, device=device, core=core, extra=extra)
    num_cases = len(subfiles(images, suffix="_0000.png", join=False))
    score_env, score_did = scored_by or (env, did)
    return {"metrics": evaluate(work, score_env, score_did, pred, name, num_samples),
            "training": training_facts(model_dir),
            "seconds_per_case": step_seconds(work, f"predict_{name}") / num_cases}


def train_cmd(did: str, trainer: str, fold: str, fold_dir: str, device: str, core: str | None = None,
              extra: list[str] = ()) -> list[str]:
    """``nnUNetv2_train`` of one fold, pinned to ``core``: with ``--c`` where ``fold_dir`` has a checkpoint to resume
    from, else with ``extra``."""
    resume = ["--c"] if isfile(join(fold_dir, "checkpoint_latest.pth")) else []
    pin = ["taskset", "-c", core] if core else []
    return pin + [join(BIN, "nnUNetv2_train"), did, "2d", fold, "-tr", trainer, "-device", device] + \
        (resume or list(extra))


def learning_curve(work: str, env: dict, did: str, trainer: str, fold_dir: str, name: str, curve_images: str,
                   row: dict, pred: str, num_samples: int, device: str = "cpu", core: str | None = None,
                   extra: tuple[str, ...] = ()) -> list[dict]:
    """A trained model's learning curve: each ``checkpoint_<m>min.pth`` snapshot of ``fold_dir`` predicts and is
    scored on ``curve_images`` (``WORK/curves/<name>_<m>min``), then the final checkpoint on the same cases, from the
    per-case metrics of its full test prediction ``pred`` (``row``: its table row)."""
    curve = []
    for snap in sorted(subfiles(fold_dir, prefix="checkpoint_", suffix="min.pth", join=False)):
        minutes = int(snap[len("checkpoint_"):-len("min.pth")])
        tag = f"{name}_{minutes:03d}min"
        snap_pred = join(work, "curves", tag)
        predict(work, env, did, trainer, curve_images, snap_pred, tag, num_samples, checkpoint=snap, device=device,
                core=core, extra=extra)
        curve.append({"minutes": minutes, **evaluate(work, env, did, snap_pred, tag, num_samples, curve_images)})
    curve_cases = {f[:-len("_0000.png")] for f in subfiles(curve_images, suffix="_0000.png", join=False)}
    return curve + [{"minutes": row["training"]["epoch_minutes"], "final": True,
                     **mean_over(join(pred, "summary_arseg.json"), curve_cases)}]


def sampling_rows(trainer: str, model_dir: str) -> list[tuple[str, tuple[str, ...]]]:
    """The rows of a trained model (``model_dir``: its trainer folder), each ``(name, predictor flags)``, the flags
    explicit so that a row means the same whatever the predictor's default. An AR-Seg model with a U-Net head: the
    transformer's own draws (the default sampler, row ``trainer``) and the head's thresholds (the baseline sampler,
    ``trainer`` + ``HEAD``); any other model: its own prediction or samples."""
    kwargs = load_json(join(model_dir, "plans.json"))["configurations"]["2d"]["architecture"].get("arch_kwargs", {})
    if not kwargs.get("aux_head"):
        return [(trainer, ())]
    return [(trainer, ("--sampler", "autoregressive")), (trainer + HEAD, ("--sampler", "head"))]


def plot_curves(curves: dict, path: str, ensemble: dict | None = None, styles: dict | None = None,
                targets: dict | None = None) -> None:
    """The learning curves; ``ensemble`` (its row) adds the fold ensemble as one point at its folds' total minutes
    (it has no snapshots: each fold trains a fifth of the budget); ``styles``: matplotlib keywords of a curve (by its
    key); ``targets``: a dashed line at a metric's target value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, metric in zip(axes, ("GED", "HM-IoU", "Soft-Dice")):
        for trainer, points in curves.items():
            if points:
                ax.plot([p["minutes"] for p in points], [p[metric] for p in points],
                        **{"marker": "o", "linestyle": "-", **(styles or {}).get(trainer, {})},
                        label=LABELS.get(trainer, trainer))
        if targets and metric in targets:
            ax.axhline(targets[metric], color="0.4", linestyle="--", linewidth=1, label="target")
        if ensemble is not None:
            ax.plot([ensemble["training"]["epoch_minutes"]], [ensemble["metrics"][metric]], "k*", markersize=11,
                    label=LABELS[ENSEMBLE] + " (all test cases)")
        ax.set_title(metric + (" (lower is better)" if metric == "GED" else " (higher is better)"))
        ax.set_xlabel("training minutes"), ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_rows = -(-len(labels) // 3)
    if handles:  # below the panels, where it hides no curve
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 1))
    write_atomic(path, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


def results_table(rows: dict) -> str:
    """The rows as a markdown table; the last column: the prediction command's wall time per test case (N samples,
    start-up included) on its lane's core while the other lane ran."""
    head = ("| model | " + " | ".join(METRICS) + " | training | s / case |\n|---|" + "---|" * (len(METRICS) + 2)
            + "\n")
    body = ""
    for name, res in rows.items():
        cells = [f"{res['metrics'][m]:.3f}" if m in res["metrics"] else "" for m in METRICS]
        seconds = f"{res['seconds_per_case']:.2f}" if "seconds_per_case" in res else ""
        body += f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {res.get('training', '')} | {seconds} |\n"
    return head + body


def write_results(work: str, args, dataset_json: dict, num_test_cases: int, results_dir: str, rows: dict,
                  curves: dict) -> None:
    """``WORK/results.json``, ``results.md`` (the table) and ``learning_curves.png`` of the rows so far."""
    tokenizer = load_json(next(join(dirpath, "summary.json") for dirpath, _, files in os.walk(results_dir)
                               if "summary.json" in files and "ARSegTokenizer" in dirpath))
    import torch
    out = {"tokenizer": {k: tokenizer[k] for k in ("seconds", "steps", "heldout", "latent_shape", "scales")},
           "device": "cuda" if torch.cuda.is_available() else "cpu", "budget_minutes": args.budget_minutes,
           "upgrade_minutes": args.upgrade_minutes,
           "num_samples": args.num_samples, "cores": args.cores, "seed": args.seed,
           "training_seed": args.training_seed, "num_train_patients": args.num_train,
           "num_test_patients": args.num_test, "num_train_cases": dataset_json["numTraining"],
           "num_test_cases": num_test_cases, "results": rows, "learning_curves": curves}
    save_json_atomic(out, join(work, "results.json"))
    plot_curves(curves, join(work, "learning_curves.png"), rows.get(ENSEMBLE))
    write_text(join(work, "results.md"), results_table(rows))


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
    p.add_argument("--training-seed", type=int, default=None,
                   help="seed of the AR-Seg and ProbUNet trainings (nnUNet_ARSEG_TRAINING_SEED; default: the "
                        "trainers' own, 0); the stock trainer is unseeded")
    p.add_argument("--candidates", nargs="*", default=[],
                   help="candidate AR-Seg trainers (benchmarks/ext_trainers) trained from scratch for --budget-minutes "
                        "first in lane A, each sampled on its own and around its U-Net head")
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
    from nnunet_arseg.nnunet_ext import ext_trainer_value
    env = dict(os.environ, nnUNet_raw=join(work, "nnUNet_raw"), nnUNet_preprocessed=join(work, "nnUNet_preprocessed"),
               nnUNet_results=join(work, "nnUNet_results"), nnUNet_def_n_proc="1",
               nnUNet_extTrainer=ext_trainer_value(CANDIDATES_DIR))
    env.pop("nnUNet_n_proc_DA", None)  # nnU-Net's planning breaks with 0; set for training only
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        maybe_mkdir_p(env[key])
    name = f"Dataset{args.d:03d}_LIDCExp"
    raw, did = join(env["nnUNet_raw"], name), str(args.d)
    run_steps([("convert", [join(BIN, "nnUNetv2_arseg_convert_lidc"), "-i", train_dir, "--test_input", test_dir,
                            "-o", env["nnUNet_raw"], "-d", did, "-n", "LIDCExp", "--disable_progress_bar"], env)], work)
    run_steps([("plan", [join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", did, "-c", "2d", "-np", "1", "-npfp", "1",
                         "--verify_dataset_integrity", "--no_pbar"], env)], work)

    # every curve_every-th test case for the learning curves (before the tokenizer, which only AR-Seg needs)
    images = join(raw, "imagesTs")
    cases = sorted(f[:-len("_0000.png")] for f in subfiles(images, suffix="_0000.png", join=False))
    curve_images = join(work, "curve_images")
    maybe_mkdir_p(curve_images)
    curve_cases = cases[::args.curve_every]
    for case in curve_cases:
        link = join(curve_images, f"{case}_0000.png")
        if not os.path.lexists(link):
            os.symlink(join(images, f"{case}_0000.png"), link)

    results_dir = join(env["nnUNet_results"], name)

    def fold_dir(trainer: str, fold: str = "all") -> str:
        return join(results_dir, f"{trainer}__nnUNetPlans__2d", f"fold_{fold}")

    run_steps([("tokenizer", [sys.executable, "-m", "nnunet_arseg.training.train_tokenizer", did, "2d", "-tr", AR,
                              "-device", device], env)], work)
    cores = args.cores.split(",") if args.cores else [None, None]
    train_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_ARSEG_SNAPSHOT_MINUTES=str(args.snapshot_minutes))
    if args.training_seed is not None:
        train_env["nnUNet_ARSEG_TRAINING_SEED"] = str(args.training_seed)
    scratch_env = dict(train_env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.budget_minutes))
    fold_env = dict(train_env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.budget_minutes / NUM_FOLDS))
    upgrade_env = dict(train_env, nnUNet_ARSEG_BUDGET_MINUTES=str(args.upgrade_minutes))

    rows, curves = {}, {}
    results_file = join(work, "results.json")
    if isfile(results_file):  # rows of an earlier sitting (their steps are skipped)
        earlier = load_json(results_file)
        rows, curves = earlier.get("results", {}), earlier.get("learning_curves", {})
    dataset_json = load_json(join(raw, "dataset.json"))
    lock = threading.Lock()

    def record(name: str, row: dict, curve: list | None = None) -> None:
        """Add a row and write the results so far (the tables grow while the lanes run)."""
        with lock:
            rows[name] = row
            if curve is not None:
                curves[name] = curve
            write_results(work, args, dataset_json, len(cases), results_dir, rows, curves)

    def train(trainer: str, core: str | None, step_env: dict, extra: list[str] = (), fold: str = "all") -> None:
        run_steps([(f"train_{trainer}" + ("" if fold == "all" else f"_fold{fold}"),
                    train_cmd(did, trainer, fold, fold_dir(trainer, fold), device, core, extra), step_env)], work)

    def predict_and_evaluate(trainer: str, core: str | None) -> None:
        """The model's rows (``sampling_rows``), the first with its learning curve."""
        (name, extra), *variants = sampling_rows(trainer, os.path.dirname(fold_dir(trainer)))
        row = predict_row(work, env, did, trainer, fold_dir(trainer), images, name, args.num_samples, device, core,
                          extra)
        curve = learning_curve(work, env, did, trainer, fold_dir(trainer), trainer, curve_images, row,
                               join(work, "predictions", name), args.num_samples, device, core, extra)
        record(name, row, curve)
        for name, extra in variants:
            predict_variant(name, trainer, core, extra)

    def predict_variant(name: str, trainer: str, core: str | None, extra: tuple[str, ...]) -> None:
        """Another way to sample a trained model: its row shares the model's training facts."""
        record(name, predict_row(work, env, did, trainer, fold_dir(trainer), images, name, args.num_samples, device,
                                 core, extra))

    def ensemble_fold(k: int, core: str | None) -> None:
        train(STOCK, core, fold_env, fold=str(k))
        predict(work, env, did, STOCK, images, join(work, "predictions", ENSEMBLE, f"fold_{k}"), f"{ENSEMBLE}_fold{k}",
                args.num_samples, device=device, core=core, fold=str(k))

    def evaluate_ensemble() -> None:
        fold_preds = [join(work, "predictions", ENSEMBLE, f"fold_{k}") for k in range(NUM_FOLDS)]
        facts = [training_facts(fold_dir(STOCK, str(k))) for k in range(NUM_FOLDS)]
        record(ENSEMBLE, {"metrics": evaluate(work, env, did, join(work, "predictions", ENSEMBLE), ENSEMBLE, None,
                                              folders=fold_preds),
                          "training": {"epochs": [f["epochs"] for f in facts],
                                       "epoch_minutes": round(sum(f["epoch_minutes"] for f in facts), 1)},
                          "seconds_per_case": sum(step_seconds(work, f"predict_{ENSEMBLE}_fold{k}")
                                                  for k in range(NUM_FOLDS)) / len(cases)})

    # two lanes, one per core, each a queue of steps: the candidates (if any) and the scratch models first, so that a
    # run spanning several sittings has the rows under test earliest; then the fold ensemble's folds shared between
    # the lanes and the upgrade (lane B, before it waits for lane A's folds, so no core idles)
    folds_a_done = threading.Event()

    def lane_a(core: str | None) -> None:
        try:
            for trainer in [*args.candidates, AR]:
                train(trainer, core, scratch_env)
                predict_and_evaluate(trainer, core)
            for k in (1, 2):
                ensemble_fold(k, core)
        finally:
            folds_a_done.set()  # lane B scores the ensemble then (or says which fold is missing)

    def lane_b(core: str | None) -> None:
        train(STOCK, core, scratch_env)
        predict_and_evaluate(STOCK, core)
        train(PROBUNET, core, scratch_env)
        predict_and_evaluate(PROBUNET, core)
        for k in (0, 3, 4):
            ensemble_fold(k, core)
        train(UPGRADE, core, upgrade_env, ["-pretrained_weights", join(fold_dir(STOCK), "checkpoint_final.pth")])
        predict_and_evaluate(UPGRADE, core)
        # the upgrade sampled around the stock model's own test predictions (method §3.3, all scales from them)
        predict_variant(ANCHORED, UPGRADE, core, ("--anchor", join(work, "predictions", STOCK)))
        folds_a_done.wait()
        evaluate_ensemble()

    # the 5-fold split of the training cases, grouped by patient as AR-Seg's trainers group it, written before the
    # lanes start folds of the ensemble on both cores (nnU-Net's trainer uses the file it finds)
    splits_file = join(env["nnUNet_preprocessed"], name, "splits_final.json")
    if not isfile(splits_file):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_arseg.training.splits import patient_grouped_splits
        folder = join(env["nnUNet_preprocessed"], name, "nnUNetPlans_2d")
        keys = infer_dataset_class(folder).get_identifiers(folder)
        save_json_atomic(patient_grouped_splits(keys, dataset_json["arseg"]["patient_of_case"]), splits_file)
    pred = join(work, "predictions", "empty")  # the reference row, before the lanes
    write_empty_prediction(images, pred, cases, ".png")
    record("empty", {"metrics": evaluate(work, env, did, pred, "empty", args.num_samples)})
    run_lanes([lane_a, lane_b], cores)
    print(results_table(rows))


if __name__ == "__main__":
    main()
