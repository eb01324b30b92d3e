"""Where ``nnUNetv2_arseg_predict`` puts each output of a case (docs/design.md, "Prediction output"): one function per
kind of file, for the predictor (writing, ``--continue_prediction``) and for whoever reads them (the evaluator).

    OUT/<case><ext>                          the consensus (nnU-Net's own export)
    OUT/samples/<case>_sample<k:02d><ext>    sample k = 0..N-1 (--save_samples)
    OUT/uncertainty/<case>.npz, .png         per-pixel uncertainty (--save_uncertainty)
    OUT/scales/<case>.png                    coarse-to-fine masks of the first drawn sample (--save_scales)
    OUT/arseg_predict_args.json              the settings of the run
    OUT/arseg_cases/<case>.json              the settings the case was predicted with (written before its files)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from nnunet_arseg.atomic import TEMPORARY

__all__ = ["ExtraOutputs", "ARGS_FILE", "sample_file", "sample_files_by_case", "uncertainty_files", "scales_file",
           "case_record_file", "files_by_case", "case_files", "RUN_KEYS", "settings_changes"]

ARGS_FILE = "arseg_predict_args.json"
CASE_RECORDS = "arseg_cases"
SAMPLE_TAG = "_sample"
# the settings that make a run: outputs of runs that differ in one of them never share a folder
RUN_KEYS = ("model_folder", "folds", "checkpoint", "num_samples", "seed", "sampler", "temperature",
            "presence_temperature", "anchor", "anchor_scales", "outline_spread", "mirror_head", "step_size",
            "mirroring")


def settings_changes(before: dict, now: dict) -> list[str]:
    """``key: old -> new`` for each setting of ``RUN_KEYS`` that differs. A key an older record lacks is not compared,
    but for the sampler: a record of 0.2 or 0.3-dev drew with that version's default, not a named one."""
    return [f"{k}: {before.get(k)} -> {now[k]}" for k in RUN_KEYS
            if (k in before or (k == "sampler" and k in now)) and before.get(k) != now[k]]


@dataclass(frozen=True)
class ExtraOutputs:
    """Which outputs beyond nnU-Net's consensus a run writes."""

    samples: bool = False
    uncertainty: bool = False
    scales: bool = False


def sample_file(out_dir: str, case: str, k: int, file_ending: str) -> str:
    return os.path.join(out_dir, "samples", f"{case}{SAMPLE_TAG}{k:02d}{file_ending}")


def sample_files_by_case(samples_dir: str, file_ending: str) -> dict[str, dict[int, str]]:
    """``{case: {k: path}}`` of the sample files in ``samples_dir`` (``{}`` if there is no such folder)."""
    if not os.path.isdir(samples_dir):
        return {}
    pattern = re.compile(rf"(.+){SAMPLE_TAG}(\d+){re.escape(file_ending)}")
    out: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(samples_dir)):
        m = pattern.fullmatch(name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(samples_dir, name)
    return out


def uncertainty_files(out_dir: str, case: str) -> tuple[str, str]:
    """The uncertainty map (``.npz``, key ``uncertainty``) and its picture (``.png``)."""
    return (os.path.join(out_dir, "uncertainty", f"{case}.npz"), os.path.join(out_dir, "uncertainty", f"{case}.png"))


def scales_file(out_dir: str, case: str) -> str:
    return os.path.join(out_dir, "scales", f"{case}.png")


def case_record_file(out_dir: str, case: str) -> str:
    """The settings ``case`` was predicted with, written before any of its files."""
    return os.path.join(out_dir, CASE_RECORDS, f"{case}.json")


def _case_of(sub: str, name: str, file_ending: str) -> str | None:
    """The case whose file of this layout ``name`` in ``OUT/sub`` is; None for any other file."""
    if sub == "samples":
        m = re.fullmatch(rf"(.+){SAMPLE_TAG}\d+{re.escape(file_ending)}", name)
        return m.group(1) if m else None
    endings = {"": (file_ending, ".npz", ".pkl"), "uncertainty": (".npz", ".png"), "scales": (".png",),
               CASE_RECORDS: (".json",)}[sub]
    return next((name[:-len(e)] for e in endings if name.endswith(e) and len(name) > len(e)), None)


def files_by_case(out_dir: str, file_ending: str, temporaries: bool = False) -> dict[str, list[str]]:
    """``{case: [path, ...]}`` of the files of this layout in ``out_dir`` (its consensus, probabilities, extras and
    record), or with ``temporaries`` of the temporaries an atomic write of one of them left (a killed run's)."""
    out: dict[str, list[str]] = {}
    for sub in ("", "samples", "uncertainty", "scales", CASE_RECORDS):
        folder = os.path.join(out_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            m = TEMPORARY.fullmatch(name)
            if temporaries != bool(m) or not os.path.isfile(os.path.join(folder, name)):
                continue
            case = _case_of(sub, m.group(1) if m else name, file_ending)
            if case is not None:
                out.setdefault(case, []).append(os.path.join(folder, name))
    return out


def case_files(output_file_truncated: str, file_ending: str, num_samples: int, extras: ExtraOutputs,
               save_probabilities: bool = False) -> list[str]:
    """Every file of one predicted case, the consensus last (it is written last, so a case is complete once it is
    there)."""
    out_dir, case = os.path.split(output_file_truncated)
    files = []
    if extras.samples:
        files += [sample_file(out_dir, case, k, file_ending) for k in range(num_samples)]
    if extras.uncertainty:
        files += list(uncertainty_files(out_dir, case))
    if extras.scales:
        files.append(scales_file(out_dir, case))
    if save_probabilities:
        files += [output_file_truncated + ".npz", output_file_truncated + ".pkl"]
    return files + [output_file_truncated + file_ending]
