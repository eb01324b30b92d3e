"""``nnUNetv2_arseg_demo [OUTPUT_DIR]``: the whole product on the bundled LIDC sample, in one command.

Converts the bundled LIDC-IDRI crops (four raters per slice), plans and preprocesses them with nnU-Net, trains the
tiny AR-Seg variant, draws 16 samples for the patients held out from training, evaluates them against the four
raters and writes one figure per held-out case. Every step runs the real command line a user would type; a rerun
continues where an interrupted one stopped.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from importlib import resources

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, maybe_mkdir_p, subfiles

from nnunet_arseg.figures import save_panel_figure
from nnunet_arseg.prediction_files import sample_files_by_case
from nnunet_arseg.nnunet_ext import EXT_DIR

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_LIDCDemo"
TRAINER = "nnUNetTrainerARSeg_tiny_demo"
NUM_SAMPLES = 16


def demo_data_dir() -> str:
    """Folder of the bundled LIDC sample (LIDC-IDRI-slices layout)."""
    return str(resources.files("nnunet_arseg") / "demo_data" / "lidc")


def _run(step: str, cmd: list[str], env: dict[str, str], done: bool) -> None:
    if done:
        print(f"[demo] {step}: already done, skipping", flush=True)
        return
    print(f"\n[demo] {step}\n[demo] $ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True)
    print(f"[demo] {step}: done in {time.time() - t0:.0f} s", flush=True)


def _demo_env(out: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": join(out, "nnUNet_raw"),
        "nnUNet_preprocessed": join(out, "nnUNet_preprocessed"),
        "nnUNet_results": join(out, "nnUNet_results"),
        "nnUNet_extTrainer": EXT_DIR,
        "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "1"),
    })
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        maybe_mkdir_p(env[key])
    return env


def write_case_figures(raw_dataset: str, pred_dir: str, fig_dir: str, max_samples: int = 8) -> list[str]:
    """One PNG per predicted case: image, the raters, samples, consensus, uncertainty, coarse-to-fine scales."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = load_json(join(raw_dataset, "dataset.json"))
    ext = dataset_json["file_ending"]
    example = subfiles(join(raw_dataset, "imagesTs"), suffix=ext)[0]
    rw = determine_reader_writer_from_dataset_json(dataset_json, example)()
    raters_dir = join(raw_dataset, dataset_json["arseg"]["test_raters_folder"])
    num_raters = dataset_json["arseg"]["num_raters"]
    maybe_mkdir_p(fig_dir)
    written = []
    for seg_file in subfiles(pred_dir, suffix=ext, join=False):
        case = seg_file[: -len(ext)]
        image = rw.read_images([join(raw_dataset, "imagesTs", f"{case}_0000{ext}")])[0][0, 0]
        consensus = rw.read_seg(join(pred_dir, seg_file))[0][0, 0] > 0
        raters = [rw.read_seg(join(raters_dir, f"{case}_r{k}{ext}"))[0][0, 0] > 0 for k in range(num_raters)]
        sample_files = [f for _, f in sorted(sample_files_by_case(join(pred_dir, "samples"), ext)[case].items())]
        samples = [rw.read_seg(f)[0][0, 0] > 0 for f in sample_files[:max_samples]]
        uncertainty = np.load(join(pred_dir, "uncertainty", f"{case}.npz"))["uncertainty"].reshape(image.shape)
        rows = [
            ("input", [("image", image), ("consensus", consensus), ("uncertainty", uncertainty.astype(np.float32)),
                       ("sample frequency", np.mean([rw.read_seg(f)[0][0, 0] > 0 for f in sample_files], 0))]),
            ("raters", [(f"rater {k}", r) for k, r in enumerate(raters)]),
            (f"samples ({len(sample_files)})", [(f"sample {k}", s) for k, s in enumerate(samples)]),
        ]
        scales_png = join(pred_dir, "scales", f"{case}.png")
        if isfile(scales_png):  # a strip of the S coarse-to-fine masks of the first drawn sample, side by side
            import matplotlib.image as mpimg
            strip = mpimg.imread(scales_png)
            strip = (strip[..., :3].mean(-1) if strip.ndim == 3 else strip) > 0.5
            width = image.shape[1]
            rows.append(("coarse to fine (first drawn sample)",
                         [(f"scale {si + 1}", strip[:, si * width:(si + 1) * width])
                          for si in range(strip.shape[1] // width)]))
        path = join(fig_dir, f"{case}.png")
        save_panel_figure(path, rows, image=image)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="arseg_demo",
                        help="where everything goes (nnU-Net folders, predictions, figures); default ./arseg_demo")
    parser.add_argument("-device", default="cpu", help="torch device for training and prediction (default cpu)")
    args = parser.parse_args()
    out = os.path.abspath(args.output_dir)
    env = _demo_env(out)
    py = sys.executable
    bin_dir = os.path.dirname(py)
    raw_dataset = join(env["nnUNet_raw"], DATASET_NAME)
    model_dir = join(env["nnUNet_results"], DATASET_NAME, f"{TRAINER}__nnUNetPlans__2d")
    pred_dir = join(out, "predictions")
    t0 = time.time()

    _run("1/5 convert the bundled LIDC sample to an nnU-Net raw dataset",
         [join(bin_dir, "nnUNetv2_arseg_convert_lidc"), "-i", demo_data_dir(), "-o", env["nnUNet_raw"],
          "-d", str(DATASET_ID), "-n", "LIDCDemo", "--test_fraction", "0.25", "--seed", "0"],
         env, isfile(join(raw_dataset, "dataset.json")))
    _run("2/5 plan and preprocess (nnU-Net)",
         [join(bin_dir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
          "--verify_dataset_integrity"],
         env, isfile(join(env["nnUNet_preprocessed"], DATASET_NAME, "nnUNetPlans.json")))
    train_env = dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "0"))
    trained = isfile(join(model_dir, "fold_0", "checkpoint_final.pth"))
    resume = [] if trained or not isfile(join(model_dir, "fold_0", "checkpoint_latest.pth")) else ["--c"]
    _run(f"3/5 train AR-Seg ({TRAINER}, fold 0)",
         [join(bin_dir, "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", args.device] + resume,
         train_env, trained)
    # a rerun continues the prediction: an interrupted one has cases without their files (done cases are skipped)
    started = ["--continue_prediction"] if isfile(join(pred_dir, "arseg_predict_args.json")) else []
    _run(f"4/5 draw {NUM_SAMPLES} samples per held-out slice",
         [join(bin_dir, "nnUNetv2_arseg_predict"), "-i", join(raw_dataset, "imagesTs"), "-o", pred_dir,
          "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "--num_samples", str(NUM_SAMPLES),
          "--save_samples", "--save_uncertainty", "--save_scales", "-device", args.device, "-npp", "0", "-nps", "0"]
         + started, env, False)
    summary_file = join(pred_dir, "summary_arseg.json")
    _run("5/5 evaluate against the four raters (GED, HM-IoU, Soft-Dice)",
         [join(bin_dir, "nnUNetv2_arseg_evaluate"), "-i", pred_dir, "-d", str(DATASET_ID), "-o", summary_file],
         env, False)
    figures = write_case_figures(raw_dataset, pred_dir, join(out, "figures"))

    mean = load_json(summary_file)["foreground_mean"]
    print(f"\n[demo] finished in {(time.time() - t0) / 60:.1f} min")
    print("[demo] held-out slices, 16 samples each, against 4 raters: "
          + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    print(f"[demo] figures (image, raters, samples, consensus, uncertainty, scales): {join(out, 'figures')} "
          f"({len(figures)} PNG)")
    print(f"[demo] predictions: {pred_dir}\n[demo] metrics: {summary_file}")
    print(f"[demo] model, training log and progress.png: {join(model_dir, 'fold_0')}")


if __name__ == "__main__":
    main()
