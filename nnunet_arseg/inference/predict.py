"""``nnUNetv2_arseg_predict``: every flag of ``nnUNetv2_predict`` plus the number of samples and the extra outputs.

    nnUNetv2_arseg_predict -i IN -o OUT -d D -c 2d -f 0 -tr nnUNetTrainerARSeg -num_samples 16 \\
        [--seed S] [--save_samples] [--save_uncertainty] [--save_scales]

Our flags are taken out with ``parse_known_args``; the rest goes to nnU-Net's own ``predict_entry_point`` (its parser
is never copied), which then builds an ``ARSegPredictor``. The stock ``nnUNetv2_predict -tr nnUNetTrainerARSeg``
works too (N from ``nnUNet_ARSEG_NUM_SAMPLES`` or the checkpoint's default) after
``export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)``.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json

from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.nnunet_ext import EXT_DIR, ensure_ext_trainer_env

PROG = "nnUNetv2_arseg_predict"


def _our_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("-num_samples", type=int, default=16, help="samples per image (>= 1); default 16")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same samples); default 0")
    p.add_argument("--save_samples", action="store_true", help="write OUT/samples/<case>_sXX<ext>")
    p.add_argument("--save_uncertainty", action="store_true", help="write OUT/uncertainty/<case>.npz and .png")
    p.add_argument("--save_scales", action="store_true", help="write OUT/scales/<case>.png (coarse-to-fine, sample 0)")
    return p


def _fail(msg: str) -> None:
    sys.exit(f"{PROG}: error: {msg}")


def check_model_folder(rest: list[str]) -> str | None:
    """The model folder named by ``-d -tr -p -c``; exits with advice when it is not an AR-Seg model."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, default in (("-d", None), ("-tr", "nnUNetTrainer"), ("-p", "nnUNetPlans"), ("-c", None)):
        p.add_argument(flag, default=default)
    for flag in ("-device", "-chk", "-prev_stage_predictions", "-part_id"):  # else "-device" parses as "-d evice"
        p.add_argument(flag)
    args, _ = p.parse_known_args(rest)
    if args.d is None or args.c is None:
        return None  # let nnU-Net's parser report the missing flags
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    folder = get_output_folder(args.d, args.tr, args.p, args.c)
    plans_file = join(folder, "plans.json")
    if not isfile(plans_file):
        _fail(f"no trained model at {folder} (plans.json missing). Train it with nnUNetv2_train {args.d} {args.c} FOLD "
              f"-tr {args.tr} -p {args.p}, or check -d/-tr/-p/-c and nnUNet_results.")
    from nnunet_arseg.network import NETWORK_CLASS_NAME
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cfg = PlansManager(load_json(plans_file)).get_configuration(args.c)
    name = cfg.network_arch_class_name
    if name != NETWORK_CLASS_NAME:
        _fail(f"{folder} holds a model of trainer {args.tr} with network {name}, not an AR-Seg model "
              f"({NETWORK_CLASS_NAME}); predict it with nnUNetv2_predict, or pass -tr nnUNetTrainerARSeg (or the "
              f"AR-Seg variant you trained)")
    return folder


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = _our_parser().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        _our_parser().print_help()
        print("\nAll other flags are nnUNetv2_predict's:\n")
    elif ours.num_samples < 1:
        _fail(f"-num_samples must be >= 1, got {ours.num_samples}")
    if EXT_DIR not in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        print(f"note: {PROG} finds the AR-Seg trainers itself; for the stock nnUNetv2_train/nnUNetv2_predict run "
              f"once per shell: export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)", file=sys.stderr)
    ensure_ext_trainer_env()
    os.environ["nnUNet_ARSEG_NUM_SAMPLES"] = str(ours.num_samples)
    os.environ["nnUNet_ARSEG_SEED"] = str(ours.seed)
    if "-h" not in rest and "--help" not in rest:
        check_model_folder(rest)

    from nnunetv2.inference import predict_from_raw_data as stock
    from nnunet_arseg.inference.predictor import ARSegPredictor
    stock_predictor = stock.nnUNetPredictor
    stock.nnUNetPredictor = partial(ARSegPredictor, num_samples=ours.num_samples, seed=ours.seed,
                                    save_samples=ours.save_samples, save_uncertainty=ours.save_uncertainty,
                                    save_scales=ours.save_scales)
    sys.argv = [PROG] + rest
    try:
        stock.predict_entry_point()
    finally:
        stock.nnUNetPredictor = stock_predictor
    out = rest[rest.index("-o") + 1] if "-o" in rest else None
    if out is not None and isdir(out):
        save_json_atomic({"num_samples": ours.num_samples, "seed": ours.seed, "save_samples": ours.save_samples,
                          "save_uncertainty": ours.save_uncertainty, "save_scales": ours.save_scales,
                          "nnunet_args": rest}, join(out, "arseg_predict_args.json"))


if __name__ == "__main__":
    main()
