"""What ``nnUNetv2_arseg_predict`` is given, checked before nnU-Net starts: the trained model (dataset, trainer,
plans, configuration, folds, checkpoint) and the input folder (case files named ``CASE_XXXX<ext>``, with the
channels and the file format of the model's dataset.json). Each problem is an ``InputError`` that names the file or
flag, says what is wrong and how to fix it."""
from __future__ import annotations

import os
import re

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json

from nnunet_arseg.io_checks import IncompleteFileError, check_complete

__all__ = ["InputError", "model_folder", "checked_folds", "input_cases", "case_ids", "channels_in_file",
           "anchor_files"]

NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif")  # read by nnU-Net's NaturalImage2DIO: an RGB file holds 3 channels
PIL_MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 2, "RGB": 3,
                     "RGBA": 4, "CMYK": 4}


class InputError(ValueError):
    """A problem with the command's inputs, worded for the user."""


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """The trained model's folder ``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION`` (with its plans.json,
    dataset.json and a network that samples, AR-Seg's or the Probabilistic U-Net's, in ``configuration``)."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_arseg.baselines.probunet import PROBUNET_CLASS_NAME
    from nnunet_arseg.network import NETWORK_CLASS_NAME

    if not nnUNet_results.is_set():
        raise InputError("the environment variable nnUNet_results is not set; set it to the folder holding your "
                         "trained models (nnU-Net's documentation/setting_up_paths.md)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        found = "ambiguous" if "More than one" in str(e) else "unknown"
        raise InputError(f"-d {dataset}: {found} dataset: {str(e).splitlines()[0]} Give the ID or name of a trained "
                         f"dataset (a DatasetXXX_Name folder in nnUNet_results={nnUNet_results.get()})") from None
    folder = join(nnUNet_results.get(), name, convert_trainer_plans_config_to_identifier(trainer, plans, configuration))
    if not isfile(join(folder, "plans.json")) or not isfile(join(folder, "dataset.json")):
        parent = join(nnUNet_results.get(), name)
        trained = sorted(d for d in os.listdir(parent) if isdir(join(parent, d))) if isdir(parent) else []
        raise InputError(f"no trained model at {folder} (plans.json or dataset.json missing). Trained models of "
                         f"{name}: {', '.join(trained) or 'none'}. Check -tr/-p/-c, or train with nnUNetv2_train "
                         f"{dataset} {configuration} FOLD -tr {trainer} -p {plans}")
    manager = PlansManager(load_json(join(folder, "plans.json")))
    if configuration not in manager.available_configurations:
        raise InputError(f"{join(folder, 'plans.json')} has no configuration {configuration!r} "
                         f"(it has {manager.available_configurations}); check -c")
    network = manager.get_configuration(configuration).network_arch_class_name
    if network not in (NETWORK_CLASS_NAME, PROBUNET_CLASS_NAME):
        raise InputError(f"{folder} holds a model of trainer {trainer} with network {network}, not an AR-Seg model "
                         f"({NETWORK_CLASS_NAME}); predict it with nnUNetv2_predict, or pass -tr nnUNetTrainerARSeg "
                         f"(or the AR-Seg variant you trained)")
    return folder


def checked_folds(folder: str, folds, checkpoint: str) -> list:
    """The folds (``int`` or ``"all"``) after checking that each ``fold_X/<checkpoint>`` exists."""
    folds = [f if f == "all" else int(f) for f in folds]
    missing = [f for f in folds if not isfile(join(folder, f"fold_{f}", checkpoint))]
    if missing:
        have = sorted(d[5:] for d in os.listdir(folder)
                      if d.startswith("fold_") and isfile(join(folder, d, checkpoint)))
        raise InputError(f"{folder}: no {checkpoint} for fold(s) {', '.join(map(str, missing))} "
                         f"(folds with {checkpoint}: {', '.join(have) or 'none'}). Pass the trained folds with -f "
                         f"(e.g. -f {' '.join(have) or '0'}) or another checkpoint with -chk")
    return folds


def channels_in_file(path: str) -> int:
    """Image channels in one input file: PNG/BMP/TIFF by their colour mode (header only), other formats 1."""
    if not path.lower().endswith(NATURAL_IMAGE_ENDINGS):
        return 1
    from PIL import Image
    try:
        with Image.open(path) as im:
            return PIL_MODE_CHANNELS.get(im.mode, 1)
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({e}); replace it with the case's image") from None


def input_cases(folder: str, file_ending: str, channel_names: list[str]) -> list[list[str]]:
    """The files of each case in ``folder`` (cases sorted, channels in order), as nnU-Net's predictor takes them.

    Each case needs ``CASE_0000<ext>`` ... one file per channel of dataset.json (an RGB PNG counts three)."""
    if not isdir(folder):
        raise InputError(f"-i {folder}: no such folder; give the folder holding the images to predict "
                         f"(CASE_0000{file_ending}, ...)")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and isfile(join(folder, n)))
    images = [n for n in names if n.endswith(file_ending)]
    others = [n for n in names if not n.endswith(file_ending)]
    if not images:
        hint = (f"; it holds {len(others)} other file(s), e.g. {', '.join(others[:3])}: this model takes "
                f"{file_ending} images (dataset.json file_ending), convert them") if others else ""
        raise InputError(f"-i {folder}: no images ending in {file_ending}{hint}")
    if others:
        print(f"warning: -i {folder}: ignoring {len(others)} file(s) not ending in {file_ending}: "
              f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}")
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}")
    bad = [n for n in images if not pattern.fullmatch(n)]
    if bad:
        stem = bad[0][:-len(file_ending)]
        raise InputError(f"-i {folder}: {len(bad)} file(s) not named CASE_XXXX{file_ending} (XXXX: the 4-digit channel "
                         f"index, 0000 for the first): {', '.join(bad[:5])}. Rename them, e.g. {bad[0]} -> "
                         f"{stem}_0000{file_ending}")
    by_case: dict[str, dict[int, str]] = {}
    for n in images:
        m = pattern.fullmatch(n)
        by_case.setdefault(m.group(1), {})[int(m.group(2))] = join(folder, n)
    expected = len(channel_names)
    cases = []
    for case, files in sorted(by_case.items()):
        if sorted(files) != list(range(len(files))):
            raise InputError(f"case {case} in {folder}: channel files {[f'_{c:04d}' for c in sorted(files)]}; they "
                             f"must be numbered _0000 ... without gaps ({expected} channel(s): {channel_names})")
        for c in sorted(files):  # read to the end: a reader fills a cut-short volume with zeros without a word
            try:
                check_complete(files[c], fix="copy it again or remove the case from -i")
            except IncompleteFileError as e:
                raise InputError(str(e)) from None
        counts = [channels_in_file(files[c]) for c in sorted(files)]
        if sum(counts) != expected:
            detail = "; ".join(f"{os.path.basename(files[c])} has {n}" for c, n in zip(sorted(files), counts))
            colour = any(n > 1 for n in counts) and expected < sum(counts)
            raise InputError(f"case {case} in {folder}: {sum(counts)} image channel(s) ({detail}) but this model "
                             f"takes {expected} ({channel_names}, dataset.json channel_names). "
                             + ("Save the images as single-channel (grayscale) files" if colour else
                                f"Give one file per channel: {case}_0000{file_ending} ... "
                                f"{case}_{expected - 1:04d}{file_ending}"))
        cases.append([files[c] for c in sorted(files)])
    return cases


def case_ids(cases: list[list[str]], file_ending: str) -> list[str]:
    """The case identifier of each case of ``input_cases`` (its first file's name without ``_0000<ext>``)."""
    return [os.path.basename(files[0])[:-len("_0000" + file_ending)] for files in cases]


def anchor_files(folder: str, cases: list[list[str]], file_ending: str) -> None:
    """Check that ``folder`` holds one mask ``CASE<ext>`` (a label map, as nnU-Net writes predictions) per case."""
    if not isdir(folder):
        raise InputError(f"--anchor {folder}: no such folder; give the folder of the masks to sample around (e.g. "
                         f"a stock nnU-Net's nnUNetv2_predict output: CASE{file_ending} per case)")
    names = case_ids(cases, file_ending)
    missing = [n for n in names if not isfile(join(folder, n + file_ending))]
    if missing:
        raise InputError(f"--anchor {folder}: no mask for {len(missing)} of {len(names)} case(s) (e.g. "
                         f"{', '.join(m + file_ending for m in missing[:3])}); predict them first (nnUNetv2_predict "
                         f"-i <the same input> -o {folder} ...) or leave those cases out of -i")
    for n in names:
        try:
            check_complete(join(folder, n + file_ending), fix="predict that case again")
        except IncompleteFileError as e:
            raise InputError(str(e)) from None
