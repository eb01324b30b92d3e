"""``nnUNetv2_arseg_predict``: ``nnUNetv2_predict`` with N samples per image and their extra outputs.

    nnUNetv2_arseg_predict -i IN -o OUT -d D -c 2d -f 0 [-tr nnUNetTrainerARSeg] [--num_samples N] [--seed S] \\
        [--save_samples] [--save_uncertainty] [--save_scales] [every other flag of nnUNetv2_predict]

The consensus it writes is the stock ``nnUNetv2_predict -tr nnUNetTrainerARSeg``'s for the same model, N and seed (both
run nnU-Net's sliding window over the network's per-tile consensus logits; the stock command takes N and the seed from
``nnUNet_ARSEG_NUM_SAMPLES`` / ``nnUNet_ARSEG_SEED``). Inputs are checked before nnU-Net starts; nothing is written
until they pass. One ``-o`` holds one run: cases predicted there with other settings are refused, or with
``--replace_outputs`` removed (only files this command wrote); the parts of a run (``-part_id``) share it, each
touching its own cases only.
"""
from __future__ import annotations

import argparse
import os
import sys

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnunet_arseg import env
from nnunet_arseg.inference.inputs import InputError, anchor_files, case_ids, checked_folds, input_cases, model_folder
from nnunet_arseg.prediction_files import (ARGS_FILE, ExtraOutputs, case_record_file, files_by_case,
                                           settings_changes)

PROG = "nnUNetv2_arseg_predict"


def build_parser() -> argparse.ArgumentParser:
    """Every flag of nnU-Net 2.8's ``nnUNetv2_predict`` (same names, defaults and meaning; ``-tr`` defaults to
    ``nnUNetTrainerARSeg``) plus ours."""
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description="nnUNetv2_predict with N samples per image "
                                "(their consensus is nnUNetv2_predict's) and the samples, uncertainty and "
                                "coarse-to-fine masks on request.")
    nn = p.add_argument_group("nnUNetv2_predict's flags")
    nn.add_argument("-i", required=True, help="input folder: CASE_0000<ext>, ... one file per channel")
    nn.add_argument("-o", required=True, help="output folder (created if missing)")
    nn.add_argument("-d", required=True, help="dataset name or ID")
    nn.add_argument("-p", default="nnUNetPlans", help="plans identifier; default nnUNetPlans")
    nn.add_argument("-tr", default="nnUNetTrainerARSeg", help="trainer the model was trained with; default "
                                                               "nnUNetTrainerARSeg")
    nn.add_argument("-c", required=True, help="configuration, e.g. 2d or 3d_fullres")
    nn.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"),
                    help="folds to use; default 0 1 2 3 4 (each draws N samples; the consensus "
                         "averages the folds' vote frequencies, as nnU-Net averages fold logits; "
                         "OUT/samples holds every fold's)")
    nn.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (fraction of the patch, <= 1); "
                                                                "default 0.5")
    nn.add_argument("--disable_tta", action="store_true",
                    help="no mirroring test-time augmentation: neither of the U-Net head whose mask the samples take "
                         "their shape from, nor nnU-Net's of the whole sampling (which AR-Seg trainers allow only "
                         "when trained as ..._mirroring)")
    nn.add_argument("--verbose", action="store_true", help="nnU-Net's verbose output")
    nn.add_argument("--save_probabilities", action="store_true", help="also write OUT/<case>.npz/.pkl (the vote "
                                                                      "frequencies as nnU-Net probabilities)")
    nn.add_argument("--continue_prediction", action="store_true",
                    help="continue an interrupted run: skip the cases predicted with these settings that have every "
                         "requested output")
    nn.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name; default checkpoint_final.pth")
    npp, nps = env.prediction_processes()
    nn.add_argument("-npp", type=int, default=npp,
                    help="preprocessing processes (0 with -nps 0: all in this process); default $nnUNet_npp or 3")
    nn.add_argument("-nps", type=int, default=nps,
                    help="export processes; default $nnUNet_nps or 3")
    nn.add_argument("-prev_stage_predictions", default=None,
                    help="predictions of the previous cascade stage (configurations with a previous stage only; to "
                         "sample around other masks use --anchor)")
    nn.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts; default 1")
    nn.add_argument("-part_id", type=int, default=0, help="which part this call predicts (0 .. num_parts - 1)")
    nn.add_argument("-device", default=None, help="cuda, cpu or mps; default cuda where torch finds a CUDA device, "
                                                  "else cpu (choose the GPU with CUDA_VISIBLE_DEVICES)")
    nn.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    nn.add_argument("--not_on_device", action="store_true", help="keep the sliding-window results on the CPU")
    ours = p.add_argument_group("AR-Seg")
    ours.add_argument("--num_samples", type=int, default=None,
                      help="samples per image and fold (>= 1); default $nnUNet_ARSEG_NUM_SAMPLES or the model's own")
    ours.add_argument("-num_samples", dest="num_samples_deprecated", type=int, default=None, help=argparse.SUPPRESS)
    ours.add_argument("--sampler", default=None, metavar="{autoregressive,head,anchored}",
                      help="how each sample is drawn, after the model's presence head has drawn whether it shows a "
                           "mask at all: autoregressive (AR-Seg: its token maps drawn scale by scale, coarse to fine, "
                           "by the next-scale transformer and decoded by the mask tokenizer), head (a baseline: the "
                           "model's U-Net head's probability map thresholded at a level of its own per sample, "
                           "--outline_spread), anchored (the coarse scales from the masks of --anchor FOLDER, else "
                           "of the model's own U-Net head, the finer ones drawn by the transformer, --anchor_scales); "
                           "default $nnUNet_ARSEG_SAMPLER or autoregressive (anchored with --anchor)")
    ours.add_argument("--seed", type=int, default=None,
                      help="base seed of the sampling (same seed, same samples); default $nnUNet_ARSEG_SEED or 0")
    ours.add_argument("--temperature", type=float, default=None,
                      help="factor on the transformer's per-scale sampling temperatures (> 0; below 1: each sample "
                           "closer to the model's most likely mask, less diversity); default $nnUNet_ARSEG_TEMPERATURE "
                           "or 1")
    ours.add_argument("--presence_temperature", type=float, default=None, metavar="T",
                      help="divides the logit of the model's presence head, whose probability p decides how many "
                           "samples draw a mask at all (> 0; below 1: p moves away from 1/2, so the samples agree "
                           "more often on whether there is an object: better single samples (D_max), less diversity "
                           "(GED); near 0 every sample draws exactly when p > 1/2); default "
                           "$nnUNet_ARSEG_PRESENCE_TEMPERATURE or 1")
    ours.add_argument("--anchor", default=None, metavar="FOLDER",
                      help="--sampler anchored around these masks (FOLDER/<case><ext>, e.g. a stock nnU-Net's "
                           "predictions of the same images): each present sample keeps the anchor's coarse scales and "
                           "the transformer draws the finer ones")
    ours.add_argument("--anchor_head", action="store_true", help=argparse.SUPPRESS)  # gone in 0.3: a clear error
    ours.add_argument("--anchor_scales", type=int, default=None, metavar="S",
                      help="--sampler anchored: how many coarse scales come from the anchor (0: none, the "
                           "transformer's own draws); default: all, i.e. each present sample is the anchor's mask")
    ours.add_argument("--outline_spread", type=float, default=None, metavar="W",
                      help="--sampler head: the levels at which the drawn samples of an image threshold the U-Net "
                           "head's probability map spread evenly over 0.5 +- W (0 <= W <= 0.5; 0: one outline per "
                           "image, the head's mask at 0.5; 0.5: a pixel is in a share of the drawn samples equal to "
                           "the head's probability); default $nnUNet_ARSEG_OUTLINE_SPREAD or 0.5")
    ours.add_argument("--save_samples", action="store_true", help="write OUT/samples/<case>_sample<k:02d><ext>")
    ours.add_argument("--save_uncertainty", action="store_true", help="write OUT/uncertainty/<case>.npz and .png")
    ours.add_argument("--save_scales", action="store_true",
                      help="write OUT/scales/<case>.png: how the first sample that draws a mask was built, coarse to "
                           "fine (scale k decodes its token maps 1..k)")
    ours.add_argument("--replace_outputs", action="store_true",
                      help="where -o holds cases predicted with other settings (another model, folds, N, seed, ...), "
                           "remove their files (those this command wrote, per OUT/arseg_cases/<case>.json) and "
                           "predict anew; without it such a folder is refused. Parts (-part_id) each remove their own "
                           "cases'")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples_deprecated is not None:
        print(f"{PROG}: warning: -num_samples is deprecated; use --num_samples", file=sys.stderr)
        if args.num_samples is not None and args.num_samples != args.num_samples_deprecated:
            parser.error("-num_samples and --num_samples disagree; give --num_samples only")
        args.num_samples = args.num_samples_deprecated
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.temperature is not None and not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.presence_temperature is not None and not args.presence_temperature > 0:
        parser.error(f"--presence_temperature must be > 0, got {args.presence_temperature}")
    if args.outline_spread is not None and not 0 <= args.outline_spread <= 0.5:
        parser.error(f"--outline_spread must be in [0, 0.5], got {args.outline_spread}")
    if args.anchor_scales is not None and args.anchor_scales < 0:
        parser.error(f"--anchor_scales must be >= 0, got {args.anchor_scales}")
    if args.anchor_head:
        parser.error("--anchor_head is gone: give --sampler head for samples that threshold the model's U-Net head, "
                     "or --sampler anchored to take the coarse scales from its head's mask")
    if args.sampler is not None and args.sampler not in ("autoregressive", "head", "anchored", "prior"):
        parser.error(f"--sampler must be autoregressive, head or anchored, got {args.sampler!r}")
    if args.anchor is not None and args.sampler not in (None, "anchored"):
        parser.error(f"--anchor FOLDER samples with --sampler anchored, not {args.sampler}; leave --sampler out")
    if args.anchor is not None and args.prev_stage_predictions is not None:
        parser.error("--anchor and -prev_stage_predictions: give one (an AR-Seg model of a cascade stage cannot be "
                     "anchored)")
    if args.device not in (None, "cpu", "cuda", "mps"):
        parser.error(f"-device must be cpu, cuda or mps, got {args.device!r}")
    if not 0 <= args.part_id < args.num_parts:
        parser.error(f"-part_id must be in 0 .. -num_parts - 1 = {args.num_parts - 1}, got {args.part_id}")
    if (args.npp == 0) != (args.nps == 0) or args.npp < 0 or args.nps < 0:
        parser.error(f"-npp and -nps: both 0 (everything in this process) or both >= 1, got {args.npp} and {args.nps}")
    if not 0 < args.step_size <= 1:
        parser.error(f"-step_size must be in (0, 1], got {args.step_size}")
    return args


def _device(name: str):
    """The torch device, with nnU-Net's thread settings for it (as ``nnUNetv2_predict``)."""
    import multiprocessing

    import torch
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def resolve_device(requested: str | None) -> str:
    """``-device``, or without it ``cuda`` where torch finds a CUDA device and else ``cpu`` (said in one line); a
    device this machine lacks is an ``InputError`` (before nnU-Net's workers start and die on it)."""
    import torch
    if requested is None:
        if torch.cuda.is_available():
            return "cuda"
        print(f"{PROG}: no CUDA device found, predicting on the CPU (slower; -device cpu says so, -device cuda picks a "
              f"GPU)")
        return "cpu"
    found = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[requested]
    if not found:
        raise InputError(f"-device {requested}: torch finds no {requested.upper()} device on this machine (check the "
                         f"driver and CUDA_VISIBLE_DEVICES); use -device cpu, or leave -device out to use CUDA where "
                         f"present and the CPU elsewhere")
    return requested


def prepare_output_folder(out: str, settings: dict, own_cases: list[str], input_cases: list[str], file_ending: str,
                          replace: bool) -> None:
    """Keep ``out`` to one run before this call writes to it. This call handles its own cases (its part of the input)
    and the cases of ``out`` in no part of the input, never the cases of other parts: a case predicted with other
    settings (by its record, or the folder's in a folder written before cases had records) is refused or, with
    ``replace``, its files removed; files of a case without a record are refused, never removed; the temporaries a
    killed run left of its own cases are removed."""
    files = files_by_case(out, file_ending)
    folder_record = load_json(join(out, ARGS_FILE)) if isfile(join(out, ARGS_FILE)) else None
    recorded = {case for case in files if case_record_file(out, case) in files[case]}
    other, foreign = {}, []
    for case in sorted((set(own_cases) | (set(files) - set(input_cases))) & set(files)):
        record_file = case_record_file(out, case)
        if files[case] == [record_file]:  # killed before its first file
            continue
        if case in recorded:
            record = load_json(record_file)
        elif folder_record is not None and not recorded:
            record = folder_record
        else:
            foreign.append(case)
            continue
        if changes := settings_changes(record, settings):
            other[case] = changes

    def names(cases: list[str]) -> str:
        return ", ".join(cases[:5]) + (f", ... ({len(cases)} in all)" if len(cases) > 5 else "")

    if foreign:
        raise InputError(f"-o {out} holds files of case(s) {names(foreign)} that {PROG} has no record of writing "
                         f"(e.g. {files[foreign[0]][0]}); predict into another folder, or move them out of this one")
    if other:
        first = next(iter(other.values()))
        how = ", ".join(first) + ("" if all(c == first for c in other.values()) else "; others differ otherwise")
        if not replace:
            raise InputError(f"-o {out} holds the outputs of another run: case(s) {names(list(other))} were predicted "
                             f"with other settings ({how}). Pass --replace_outputs to remove their files and predict "
                             f"anew, or predict into another folder")
        for path in (p for case in other for p in files[case]):
            try:
                os.remove(path)
            except FileNotFoundError:  # another part removes the same non-input case
                pass
        print(f"{PROG}: --replace_outputs: removed the files of {len(other)} case(s) predicted with other settings "
              f"({how}) from {out}")
    stale = [p for case, temporaries in files_by_case(out, file_ending, temporaries=True).items()
             if case in own_cases for p in temporaries]
    for path in stale:
        os.remove(path)
    if stale:
        print(f"{PROG}: removed {len(stale)} temporary file(s) of an interrupted run from {out}")


def check_sampler(args: argparse.Namespace, sampler: str, net, folder: str) -> None:
    """Refuse (``InputError``) a sampler the model cannot draw with, and the options of other samplers."""
    if sampler not in net.samplers:  # e.g. nnUNetTrainerProbUNet's one way, or a misspelt nnUNet_ARSEG_SAMPLER
        source = "--sampler" if args.sampler else env.SAMPLER
        raise InputError(f"{source} {sampler}: the model of -tr {args.tr} draws with {', '.join(net.samplers)}")
    if sampler in ("head", "anchored") and args.anchor is None and not net.aux_head:
        raise InputError(f"--sampler {sampler}: the model in {folder} was trained without its U-Net head (aux_head "
                         "False), so it has no mask of its own to "
                         + ("threshold" if sampler == "head" else "sample around; give --anchor FOLDER instead"))
    if sampler == "head" and args.save_scales:
        raise InputError("--save_scales: --sampler head takes each mask from the U-Net head at once, so there are no "
                         "coarse-to-fine scales to show; leave --save_scales out, or give --sampler autoregressive")
    if args.anchor_scales is not None and sampler != "anchored":
        raise InputError(f"--anchor_scales {args.anchor_scales}: only --sampler anchored takes coarse scales from an "
                         f"anchor (the sampler is {sampler}); add --sampler anchored, or leave --anchor_scales out")
    if args.anchor_scales is not None and args.anchor_scales > len(net.tokenizer.scales):
        raise InputError(f"--anchor_scales {args.anchor_scales}: this model's tokenizer has "
                         f"{len(net.tokenizer.scales)} scales; give 0 .. {len(net.tokenizer.scales)}")
    if args.anchor is not None and net.has_regions and net.regions is None:
        raise InputError(f"--anchor: {folder} does not record the labels of its regions (trained with an earlier "
                         "nnunet_arseg), so the anchor label maps cannot be turned into region masks; retrain it")
    if args.outline_spread is not None and sampler != "head":
        raise InputError(f"--outline_spread: only --sampler head thresholds the U-Net head's probability map (the "
                         f"sampler is {sampler}); add --sampler head, or leave --outline_spread out")


def run(args: argparse.Namespace) -> None:
    """Check, then predict; raises ``InputError`` before anything is written."""
    folder = model_folder(args.d, args.tr, args.p, args.c)
    folds = checked_folds(folder, args.f, args.chk)
    dataset_json = load_json(join(folder, "dataset.json"))
    channels = list((dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": "image"}).values())
    cases = input_cases(args.i, dataset_json["file_ending"], channels)
    if os.path.abspath(args.o) == os.path.abspath(args.i):
        raise InputError(f"-o {args.o} is the input folder; predict into another folder")
    if args.anchor is not None:
        if os.path.abspath(args.o) == os.path.abspath(args.anchor):
            raise InputError(f"-o {args.o} is the --anchor folder; predict into another folder")
        anchor_files(args.anchor, cases, dataset_json["file_ending"])

    from nnunet_arseg.atomic import save_json_atomic
    from nnunet_arseg.inference.predictor import ARSegPredictor
    from nnunet_arseg.nnunet_ext import ensure_ext_trainer_env
    from nnunet_arseg.segmentor.outline import OUTLINE_SPREAD

    ensure_ext_trainer_env()
    device = resolve_device(args.device)
    extras = ExtraOutputs(args.save_samples, args.save_uncertainty, args.save_scales)
    presence_temperature = env.presence_temperature() if args.presence_temperature is None else \
        args.presence_temperature
    predictor = ARSegPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                               perform_everything_on_device=not args.not_on_device, device=_device(device),
                               verbose=args.verbose, verbose_preprocessing=args.verbose,
                               allow_tqdm=not args.disable_progress_bar, num_samples=args.num_samples, seed=args.seed,
                               temperature=args.temperature, mirror_head=not args.disable_tta and env.mirror_head(),
                               presence_temperature=presence_temperature, extras=extras)
    try:
        predictor.initialize_from_trained_model_folder(folder, folds, checkpoint_name=args.chk)
    except Exception as e:  # a corrupt or incompatible checkpoint: say which, without a traceback
        raise InputError(f"{folder}: cannot load the model from {args.chk} of fold(s) {folds} "
                         f"({type(e).__name__}: {e})") from e
    num_samples, seed, temperature = predictor.eval_settings()
    from nnunet_arseg.sampling_window import arseg_network
    net = arseg_network(predictor.network)
    scale_flag = "--anchor" if args.anchor is not None else "--save_scales" if args.save_scales else None
    if scale_flag and not hasattr(net, "tokenizer"):  # e.g. nnUNetTrainerProbUNet
        raise InputError(f"{scale_flag}: the model of -tr {args.tr} draws each mask at once, without the "
                         f"coarse-to-fine scales of AR-Seg's tokenizer that {scale_flag} needs; leave it out")
    if args.presence_temperature is not None and getattr(net, "presence_head", None) is None:
        raise InputError(f"--presence_temperature: the model in {folder} has no presence head (trained with presence "
                         "off, or not AR-Seg), so nothing decides whether a sample draws a mask; leave it out")
    if args.prev_stage_predictions is not None and predictor.configuration_manager.previous_stage_name is None:
        raise InputError(f"-prev_stage_predictions {args.prev_stage_predictions}: configuration {args.c} has no "
                         "previous stage; to sample around these masks give them as --anchor")
    if args.anchor is not None and predictor.configuration_manager.previous_stage_name is not None:
        raise InputError(f"--anchor: configuration {args.c} is a cascade stage (it takes the previous stage's "
                         "predictions as input); anchor a configuration without a previous stage")
    sampler = args.sampler or ("anchored" if args.anchor is not None else env.sampler() or net.default_sampler)
    check_sampler(args, sampler, net, folder)
    around_head = sampler == "head" or (sampler == "anchored" and args.anchor is None)
    anchor_scales = outline_spread = None
    if sampler == "anchored":
        anchor_scales = len(net.tokenizer.scales) if args.anchor_scales is None else args.anchor_scales
    if sampler == "head":
        outline_spread = env.outline_spread(OUTLINE_SPREAD) if args.outline_spread is None else args.outline_spread
    predictor.sampler, predictor.anchor_scales, predictor.outline_spread = sampler, anchor_scales, outline_spread
    mirroring = list(predictor.allowed_mirroring_axes or []) if predictor.use_mirroring else []
    settings = {"model_folder": os.path.abspath(folder), "folds": folds, "checkpoint": args.chk,
                "num_samples": num_samples, "seed": seed, "temperature": temperature,
                "presence_temperature": presence_temperature,
                "anchor": None if args.anchor is None else os.path.abspath(args.anchor),
                "sampler": sampler, "anchor_scales": anchor_scales, "outline_spread": outline_spread,
                "mirror_head": bool(around_head and predictor.mirror_head),
                "step_size": args.step_size,
                "mirroring": mirroring, "samples_per_case": num_samples * len(folds), "save_samples": extras.samples,
                "save_uncertainty": extras.uncertainty, "save_scales": extras.scales,
                "save_probabilities": args.save_probabilities}
    names = case_ids(cases, dataset_json["file_ending"])
    prepare_output_folder(args.o, settings, names[args.part_id::args.num_parts], names, dataset_json["file_ending"],
                          args.replace_outputs)
    os.makedirs(args.o, exist_ok=True)
    save_json_atomic(settings, join(args.o, ARGS_FILE))
    predictor.record = settings
    head = f"its {'mirrored ' if predictor.mirror_head else ''}U-Net head"
    sampling = sampler
    if sampler == "autoregressive":
        sampling += " (the transformer draws every scale)"
    elif sampler == "head":
        sampling += f" ({head}'s probability at a level of its own per sample, outline spread {outline_spread:g})"
    elif sampler == "anchored":
        sampling += f" on {args.anchor or head} ({anchor_scales} coarse scale(s) from it, the finer ones drawn)"
    presence = "" if presence_temperature == 1 else f", presence temperature {presence_temperature:g}"
    print(f"{PROG}: {len(cases)} case(s), {num_samples} samples per case and fold ({len(folds)} fold(s)), seed {seed}, "
          f"sampler {sampling}, temperature x{temperature:g}{presence}, mirroring axes {mirroring or 'none'}")
    prev_stage = args.anchor if args.anchor is not None else args.prev_stage_predictions
    if args.npp == 0 and args.nps == 0:  # nnU-Net's in-process loop has no parts: take this part's cases here
        predictor.predict_from_files_sequential(cases[args.part_id::args.num_parts], args.o,
                                                save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction,
                                                folder_with_segs_from_prev_stage=prev_stage)
    else:
        predictor.predict_from_files(cases, args.o, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps,
                                     folder_with_segs_from_prev_stage=prev_stage,
                                     num_parts=args.num_parts, part_id=args.part_id)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        sys.exit(f"{PROG}: error: {e}")


if __name__ == "__main__":
    main()
