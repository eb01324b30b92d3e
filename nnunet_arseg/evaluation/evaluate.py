"""``nnUNetv2_arseg_evaluate``: multi-rater metrics of sampled predictions and Dice per label/region.

Scores the samples of each case against the raters it has in a converted raw dataset (GED, HM-IoU, Soft-Dice,
D_max, consensus Dice, presence calibration) and/or the consensus ``PRED/<case><ext>`` against reference labels (Dice
per nnU-Net label or region, e.g. BraTS whole tumour / tumour core / enhancing tumour). The samples are
``PRED/samples/<case>_sample<k:02d><ext>``, as many per case as the run's ``arseg_predict_args.json`` says; a folder
without ``samples/`` (a stock ``nnUNetv2_predict`` output; ``nnUNetv2_arseg_predict``'s without ``--save_samples`` is
refused) gives its one prediction per case as N identical samples; several folders give one sample each (an nnU-Net
fold ensemble).
Writes ``PRED/summary_arseg.json`` (``-o``) in nnU-Net's layout (``metric_per_case``, ``mean``, ``foreground_mean``)
plus a ``conventions`` block that says among others what the samples were.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join
from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, region_or_label_to_mask
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from tqdm import tqdm

from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.config import DEFAULT_NUM_SAMPLES
from nnunet_arseg.evaluation import casefiles
from nnunet_arseg.evaluation.multirater import (METRIC_NAMES, PRESENCE_NAMES, SOFT_DICE_THRESHOLDS,
                                                multirater_metrics_batch, nan_mean, presence_calibration)
from nnunet_arseg.evaluation.regions import (dice_per_region, foreground_labels_or_regions,
                                             label_manager_from_dataset_json)
from nnunet_arseg.io_checks import check_complete

DEFAULT_CONVENTIONS = {"empty_distance": 0.0, "thresholds": SOFT_DICE_THRESHOLDS, "eps": 1e-6,
                       "d_max_empty_dice": 1.0, "consensus_empty_dice": 0.0, "region_empty_dice": 1.0}
MEAN_METRICS = METRIC_NAMES + PRESENCE_NAMES + ("Dice", "IoU")


def evaluate_case(samples, raters, labels_or_regions: Sequence = (1,), **conventions) -> dict:
    """Multi-rater metrics of one case: ``samples`` (N, *spatial) and ``raters`` (M, *spatial) label maps (or binary).

    Each label/region is binarised with nnU-Net's ``region_or_label_to_mask``. Returns
    ``{label_or_region: {"GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus", "D_consensus_per_rater", "N", "M"}}``.
    """
    conv = {**DEFAULT_CONVENTIONS, **conventions}
    samples, raters = np.asarray(samples), np.asarray(raters)
    out = {}
    for r in labels_or_regions:
        r = tuple(r) if isinstance(r, list) else r
        s_N, y_M = region_or_label_to_mask(samples, r), region_or_label_to_mask(raters, r)
        res = multirater_metrics_batch(s_N[None], y_M[None], empty_distance=conv["empty_distance"],
                                       thresholds=conv["thresholds"], eps=conv["eps"],
                                       d_max_empty_dice=conv["d_max_empty_dice"],
                                       consensus_empty_dice=conv["consensus_empty_dice"])
        out[r] = {k: float(res[k][0]) for k in METRIC_NAMES + PRESENCE_NAMES}
        out[r]["D_consensus_per_rater"] = [float(v) for v in res["D_consensus_per_rater"][0]]
        out[r].update(N=int(samples.shape[0]), M=int(raters.shape[0]))
    return out


_FIX_PREDICTION = "predict this case again"
_FIX_REFERENCE = "restore it (e.g. convert the dataset again)"


def _read_seg(rw, path: str, fix: str) -> np.ndarray:
    """nnU-Net's ``read_seg`` of a file read to its end first; any failure is an error naming the file."""
    check_complete(path, fix)
    try:
        return rw.read_seg(path)[0]
    except Exception as e:  # readers raise many types for broken files
        raise ValueError(f"{path}: cannot read it ({e.__class__.__name__}: {e}): {fix}") from e


def _read_stack(rw, files: list[str], allowed_values: set, fix: str) -> list[np.ndarray]:
    """Label maps of ``files`` (each (1, *spatial) as nnU-Net reads them); rejects values outside the labels."""
    read = {}
    for f in dict.fromkeys(files):  # a stock prediction is every sample of its case: read it once
        seg = _read_seg(rw, f, fix)[0]
        bad = set(np.unique(seg).tolist()) - allowed_values
        if bad:
            raise ValueError(f"{f} holds values {sorted(bad)} that are not labels of dataset.json "
                             f"{sorted(allowed_values)}; rater and sample files must be label maps "
                             f"(binary raters: 0/1, not 0/255)")
        read[f] = seg
    return [read[f] for f in files]


def _check_shapes(case: str, sample_files, samples, rater_files, raters) -> None:
    shapes = {f: a.shape for f, a in zip(list(sample_files) + list(rater_files), list(samples) + list(raters))}
    if len(set(shapes.values())) > 1:
        ref = sample_files[0]
        bad = [f"{f} {s}" for f, s in shapes.items() if s != shapes[ref]]
        raise ValueError(f"case {case}: shape mismatch: {ref} has shape {shapes[ref]} but {', '.join(bad)}. "
                         f"Samples and raters must be on the same grid (predict in the raw image geometry)")


def evaluate_multirater_folder(pred_folder: str | Sequence[str], dataset_json, raters_folders: Sequence[str] = (),
                               reference_folders: Sequence[str] = (), output_file: str | None = None,
                               verbose: bool = True, cases: Sequence[str] | None = None, allow_missing: bool = False,
                               num_samples: int | None = None, **conventions) -> dict:
    """Score a prediction folder (or several, one sample each); returns (and with ``output_file`` writes atomically)
    the summary dict.

    ``raters_folders``: folders with ``<case>_r<k><ext>`` (multi-rater metrics of the samples, which
    ``casefiles.samples_per_case`` finds: ``pred_folder/samples``, else ``pred_folder/<case><ext>`` counted as
    ``num_samples`` identical samples, or one sample per folder of a list); ``reference_folders``: label folders
    (Dice per label/region of the consensus ``pred_folder/<case><ext>``, one folder only). At least one of them must
    be given. The prediction must cover ``cases`` (default: every case of each rater or reference folder that holds
    a predicted case), each with the same number of samples; ``allow_missing`` scores the predicted ones only and
    says so in the summary. ``num_samples``, if given, must be the N scored.
    """
    dj = casefiles.load_dataset_json(dataset_json)
    conv = {**DEFAULT_CONVENTIONS, **conventions}
    ext = dj["file_ending"]
    keys = foreground_labels_or_regions(dj)
    raters_folders, reference_folders = list(raters_folders), list(reference_folders)
    if not raters_folders and not reference_folders:
        raise ValueError("nothing to evaluate: give rater folders (dataset.json 'arseg' block) and/or a reference "
                         "label folder (-ref FOLDER)")
    pred_folders = [pred_folder] if isinstance(pred_folder, str) else list(pred_folder)
    if len(pred_folders) > 1 and reference_folders:
        raise ValueError(f"Dice against reference labels scores one prediction per case, but {len(pred_folders)} "
                         f"folders were given: ensemble them first (nnUNetv2_ensemble) and score that folder, or "
                         f"score the folders as samples against the raters only (without -ref/--regions)")
    pred_folder = pred_folders[0] if len(pred_folders) == 1 else ", ".join(pred_folders)
    samples_folder = join(pred_folders[0], "samples") if len(pred_folders) == 1 else pred_folder
    samples_of, sample_source = (casefiles.samples_per_case(pred_folders, ext, num_samples, cases) if raters_folders
                                 else ({}, {}))
    raters_of = casefiles.rater_files_per_case(raters_folders, ext, dj) if raters_folders else {}
    consensus = casefiles.consensus_cases(pred_folders[0], ext) if len(pred_folders) == 1 else list(samples_of)
    predicted = set(consensus) | set(samples_of)
    if not predicted:
        raise FileNotFoundError(f"{pred_folder}: no predictions (*{ext}) and no samples in {samples_folder}")
    if cases is not None:
        expected, source = set(cases), f"-cases ({len(set(cases))} named)"
    else:
        expected, used = casefiles.expected_cases(predicted, raters_folders, reference_folders, ext)
        source = " and ".join(used) if used else "the reference"
    missing = casefiles.missing_cases(predicted, expected, pred_folder, source, allow_missing)
    cases = sorted(predicted & expected) if cases is not None else sorted(predicted)
    if not cases:
        raise FileNotFoundError(f"{pred_folder}: none of the {len(expected)} cases of {source} is predicted")
    _check_case_files(cases, samples_of, raters_of, consensus, pred_folder, samples_folder, raters_folders,
                      reference_folders, ext)
    if raters_folders:
        if len(pred_folders) == 1:
            record = casefiles.check_against_run_record(pred_folders[0], {c: samples_of[c] for c in cases},
                                                        sample_source)
            if record is not None and "sampler" in record:  # which way the samples were drawn (segmentor/samplers)
                sample_source["sampler"] = record["sampler"]
        casefiles.check_equal_sample_counts({c: samples_of[c] for c in cases}, samples_folder)
        sample_source["N"] = len(samples_of[cases[0]])
        if num_samples is not None and num_samples != sample_source["N"]:
            raise ValueError(f"--num_samples {num_samples}, but {pred_folder} gives N = {sample_source['N']} samples "
                             f"per case ({sample_source['source']}); --num_samples sets N only for a folder with one "
                             f"prediction per case and no samples/, elsewhere leave it out")
        if verbose and sample_source["kind"] == "one_prediction":
            print(f"{pred_folder} has no samples/: its one prediction per case is scored as N = "
                  f"{sample_source['N']} identical samples")
    coverage = {"expected": len(expected), "scored": len(cases), "missing": missing, "source": source,
                "allow_missing": bool(allow_missing), "samples": sample_source}
    if missing and verbose:
        print(f"WARNING: {len(missing)} of the {len(expected)} cases of {source} have no prediction and are left "
              f"out (--allow_missing): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    example = (samples_of[cases[0]][0] if raters_folders else join(pred_folder, cases[0] + ext))
    rw = determine_reader_writer_from_dataset_json(dj, example, verbose=False)()
    lm = label_manager_from_dataset_json(dj)
    ignore_label = lm.ignore_label
    allowed = set(float(v) for v in lm.all_labels) | ({float(ignore_label)} if ignore_label is not None else set())
    per_case = []
    for case in tqdm(cases, desc="nnUNetv2_arseg_evaluate", disable=not verbose):
        entry = {"case": case, "metrics": {}}
        if raters_folders:
            s_files, r_files = samples_of[case], raters_of[case]
            samples = _read_stack(rw, s_files, allowed, _FIX_PREDICTION)
            raters = _read_stack(rw, r_files, allowed, _FIX_REFERENCE)
            _check_shapes(case, s_files, samples, r_files, raters)
            samples, raters = np.stack(samples), np.stack(raters)
            entry.update(sample_files=list(dict.fromkeys(s_files)), rater_files=r_files)
            for k, v in evaluate_case(samples, raters, keys, **conv).items():
                entry["metrics"].setdefault(label_or_region_to_key(k), {}).update(v)
        if reference_folders:
            ref_file = casefiles.reference_file(case, reference_folders, ext)
            pred_file = join(pred_folder, case + ext)
            seg_ref, seg_pred = _read_seg(rw, ref_file, _FIX_REFERENCE), _read_seg(rw, pred_file, _FIX_PREDICTION)
            if seg_ref.shape != seg_pred.shape:
                raise ValueError(f"case {case}: reference {ref_file} has shape {seg_ref.shape} but prediction "
                                 f"{pred_file} has {seg_pred.shape}; they must be on the same grid")
            entry.update(reference_file=ref_file, prediction_file=pred_file)
            for k, v in dice_per_region(seg_ref, seg_pred, keys, ignore_label=ignore_label,
                                        empty_score=conv["region_empty_dice"]).items():
                entry["metrics"].setdefault(label_or_region_to_key(k), {}).update(v)
        per_case.append(entry)
    summary = _summarise(per_case, keys, conv, bool(raters_folders), bool(reference_folders), coverage)
    if output_file is not None:
        save_json_atomic(summary, output_file)
    return summary


def _check_case_files(cases, samples_of, raters_of, consensus, pred_folder, samples_folder, raters_folders,
                      reference_folders, ext) -> None:
    for case in cases:
        if raters_folders and case not in samples_of:
            raise FileNotFoundError(
                f"case {case}: {join(pred_folder, case + ext)} exists but there are no sample files "
                f"{case}_sample00{ext}... in {samples_folder} (N = 0). Predict with nnUNetv2_arseg_predict "
                f"--save_samples, "
                f"or evaluate only the consensus against labels with -ref FOLDER")
        if raters_folders and case not in raters_of:
            raise FileNotFoundError(
                f"case {case}: {len(samples_of[case])} samples in {samples_folder} but no rater files "
                f"{case}_r0{ext}... in {' or '.join(raters_folders)}. Is this the right dataset (-d/-raw)? "
                f"Remove predictions of cases without raters or add their rater files")
        if reference_folders and case not in consensus:
            raise FileNotFoundError(f"case {case}: samples exist but the consensus {join(pred_folder, case + ext)} "
                                    f"is missing, so its Dice cannot be computed; re-run the prediction")


def _summarise(per_case: list[dict], keys, conv: dict, multirater: bool, regions: bool, coverage: dict) -> dict:
    str_keys = [label_or_region_to_key(k) for k in keys]
    mean = {}
    for k in str_keys:
        names = {n for e in per_case for n in e["metrics"].get(k, {}) if n in MEAN_METRICS}
        mean[k] = {n: nan_mean([e["metrics"][k][n] for e in per_case]) for n in sorted(names)}
        if multirater:
            mean[k]["presence_correlation"] = presence_calibration(
                [e["metrics"][k]["presence_samples"] for e in per_case],
                [e["metrics"][k]["presence_raters"] for e in per_case])["presence_correlation"]
    fg_names = sorted({n for k in str_keys for n in mean[k]})
    foreground_mean = {n: nan_mean([mean[k][n] for k in str_keys]) for n in fg_names}
    n_values = sorted({e["metrics"][str_keys[0]]["N"] for e in per_case}) if multirater else []
    m_values = sorted({e["metrics"][str_keys[0]]["M"] for e in per_case}) if multirater else []
    return {"sampler": coverage["samples"].get("sampler"),
            "conventions": _conventions(conv, str_keys, n_values, m_values, multirater, regions, coverage),
            "foreground_mean": foreground_mean, "mean": mean, "metric_per_case": per_case}


def _conventions(conv, str_keys, n_values, m_values, multirater, regions, coverage) -> dict:
    n, source, missing = coverage["scored"], coverage["source"], coverage["missing"]
    images = (f"{n} of the {coverage['expected']} cases of {source}: {len(missing)} without a prediction left out "
              f"on purpose (--allow_missing)" if missing else
              f"all {n} cases of {source} (no first-180 subset as in BerDiff's script)")
    c = {"images": images, "cases": {k: v for k, v in coverage.items() if k != "samples"} | {
        "missing_count": len(missing)},
         "labels_or_regions": str_keys,
         "binarisation": "per foreground label/region with nnU-Net's region_or_label_to_mask (labels, or regions "
                         "of dataset.json 'labels' with regions_class_order)",
         "mean": "per label/region: mean over cases (NaN ignored); foreground_mean: mean over labels/regions "
                 "of those means (this is the single number to quote, e.g. BraTS 'Dice' = mean of WT, TC, ET)"}
    if multirater:
        c.update({
            "samples": coverage["samples"], "N": n_values, "M": m_values,
            "raters": "each case against the raters it has: all of dataset.json arseg.num_raters, or those "
                      "arseg.raters_of_case lists for it (M per case in metric_per_case)",
            "iou_distance": "d(a, b) = 1 - |a & b| / |a | b|; one empty and one non-empty mask gives d = 1",
            "empty_distance": conv["empty_distance"],
            "empty_rule": f"two empty masks: d = {conv['empty_distance']} (IoU = {1 - conv['empty_distance']})",
            "GED": "2/(N*M) sum d(s_i, y_j) - 1/N^2 sum d(s_i, s_j) - 1/M^2 sum d(y_i, y_j), self-pairs included",
            "HM-IoU": "samples and raters replicated to L = lcm(N, M); L x L cost d(y, s); "
                      "scipy.optimize.linear_sum_assignment (min cost); mean of 1 - cost over matched pairs",
            "Soft-Dice": {"P": "mean of the N binary samples", "G": "mean of the M raters",
                          "thresholds": list(conv["thresholds"]), "binarise": "strict > tau", "eps": conv["eps"],
                          "formula": "(2|P_t & G_t| + eps) / (|P_t| + |G_t| + eps), mean over tau"},
            "D_max": f"SeqSAM: for each sample the max Dice over the raters, then the mean over samples; "
                     f"empty sample vs empty rater scores {conv['d_max_empty_dice']}",
            "D_consensus": f"Dice of the strict-majority vote of the samples (> N/2) against each rater "
                           f"(D_consensus_per_rater), mean over raters (SeqSAM's D_avg); empty vs empty scores "
                           f"{conv['consensus_empty_dice']}",
            "presence": "presence_samples / presence_raters: share of non-empty samples / raters of a case; "
                        "presence_gap: their absolute difference (mean over cases); presence_correlation: Pearson "
                        "correlation of the two shares over the cases (does the model draw a mask where raters do)",
        })
    if regions:
        c["Dice"] = (f"consensus prediction PRED/<case> vs reference label, per label/region with nnU-Net's "
                     f"compute_tp_fp_fn_tn; a region empty in both reference and prediction scores "
                     f"{conv['region_empty_dice']}")
    return c


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_arseg_evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("-i", nargs="+", required=True, metavar="PRED",
                        help="prediction folder(s). One folder of nnUNetv2_arseg_predict --save_samples: its samples/ "
                             "are the samples (as many per case as its run drew). One folder without samples/ (a stock "
                             "nnUNetv2_predict output; not one of nnUNetv2_arseg_predict without --save_samples): "
                             "its one prediction per case counts as --num_samples identical samples. Several folders "
                             "(e.g. an nnU-Net fold ensemble: nnUNetv2_predict -f 0 -o P0, -f 1 -o P1, ...; then "
                             "-i P0 P1 ...): each folder's <case><ext> is one sample of the case (their samples/ "
                             "are not used)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help=f"N for a folder with one prediction per case (default {DEFAULT_NUM_SAMPLES}); "
                             f"elsewhere N comes from the files and, if given, must match it")
    parser.add_argument("-d", help="dataset ID or name (raw dataset under nnUNet_raw, raters per dataset.json)")
    parser.add_argument("-raw", help="raw dataset folder (instead of -d)")
    parser.add_argument("-ref", help="reference label folder: Dice per label/region of the consensus")
    parser.add_argument("--regions", action="store_true",
                        help="Dice per label/region of the consensus against RAW/labelsTs (or labelsTr)")
    parser.add_argument("--no_raters", action="store_true", help="skip the multi-rater metrics")
    parser.add_argument("-djfile", help="dataset.json to use (default: the raw dataset's, else PRED/dataset.json)")
    parser.add_argument("-o", help="output json (default PRED/summary_arseg.json; with several -i folders, "
                                   "summary_arseg.json in the folder holding them)")
    parser.add_argument("-cases", nargs="+", default=None,
                        help="the cases the prediction must cover and that are scored: case ids, or one folder whose "
                             "files name them (e.g. the -i folder of the prediction); default: every case of the "
                             "rater/reference folder that holds the predicted cases")
    parser.add_argument("--allow_missing", "--chill", action="store_true",
                        help="score the predicted cases even if some are missing (the summary says which); "
                             "--chill as in nnUNetv2_evaluate_folder")
    parser.add_argument("--empty_distance", type=float, default=DEFAULT_CONVENTIONS["empty_distance"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(SOFT_DICE_THRESHOLDS))
    parser.add_argument("--d_max_empty_dice", type=float, default=DEFAULT_CONVENTIONS["d_max_empty_dice"])
    parser.add_argument("--consensus_empty_dice", type=float, default=DEFAULT_CONVENTIONS["consensus_empty_dice"])
    parser.add_argument("--region_empty_dice", type=float, default=DEFAULT_CONVENTIONS["region_empty_dice"])
    args = parser.parse_args(argv)
    for folder in args.i:
        if not isdir(folder):
            parser.error(f"-i {folder}: no such folder")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num_samples {args.num_samples}: give N >= 1")
    try:
        raw = casefiles.find_raw_dataset(args.d, args.raw) if (args.d or args.raw) else None
    except (FileNotFoundError, RuntimeError) as e:
        parser.exit(2, f"nnUNetv2_arseg_evaluate: error: {e}\n")
    dj_source = args.djfile or raw or join(args.i[0], "dataset.json")
    if not (args.djfile or raw) and not isfile(dj_source):
        parser.error(f"no dataset.json: give -d DATASET, -raw FOLDER or -djfile (none in {args.i[0]})")
    dj = casefiles.load_dataset_json(dj_source)
    raters = [] if (args.no_raters or raw is None) else casefiles.rater_folders(raw, dj)
    refs = [args.ref] if args.ref else []
    auto_regions = label_manager_from_dataset_json(dj).has_regions and len(args.i) == 1
    if not refs and raw is not None and (args.regions or auto_regions):
        refs = [f for f in (join(raw, "labelsTs"), join(raw, "labelsTr")) if isdir(f)]
    if args.ref and not isdir(args.ref):
        parser.error(f"-ref {args.ref}: no such folder")
    if not raters and not refs:
        parser.error("nothing to evaluate: the dataset has no raters (dataset.json 'arseg' block with -d/-raw) "
                     "and no reference labels were given (-ref FOLDER or --regions with -d/-raw)")
    out = args.o or join(args.i[0] if len(args.i) == 1 else os.path.commonpath([os.path.abspath(f) for f in args.i]),
                         "summary_arseg.json")
    try:
        cases = casefiles.named_cases(args.cases, dj["file_ending"]) if args.cases else None
        summary = evaluate_multirater_folder(args.i, dj, raters, refs, output_file=out, cases=cases,
                                             allow_missing=args.allow_missing, num_samples=args.num_samples,
                                             empty_distance=args.empty_distance, thresholds=tuple(args.thresholds),
                                             d_max_empty_dice=args.d_max_empty_dice,
                                             consensus_empty_dice=args.consensus_empty_dice,
                                             region_empty_dice=args.region_empty_dice)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"nnUNetv2_arseg_evaluate: error: {e}\n")
    for name, value in summary["foreground_mean"].items():
        print(f"{name}: {value:.4f}")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
