"""Final validation of an AR-Seg trainer, each validation case sampled once: nnU-Net's consensus export with its
``summary.json`` (Dice of the consensus), and with raters ``fold_X/validation/summary_arseg.json`` (GED, HM-IoU,
Soft-Dice, ... of the same samples against every rater).

The loop is nnU-Net's ``perform_actual_validation`` (export workers, DDP split, next-stage exports) with a
``SamplingPredictor``, so the samples scored against the raters are the ones whose consensus nnU-Net exports. They
are scored in the preprocessed geometry (samples and preprocessed raters share it; for 2D LIDC crops it is the
original).
"""
from __future__ import annotations

import multiprocessing
import warnings
from time import sleep

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits, resample_and_save
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
from torch import distributed as dist

from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.evaluation.multirater import METRIC_NAMES, multirater_metrics_batch, nan_mean
from nnunet_arseg.sampling_window import SamplingPredictor
from nnunet_arseg.training.raters import load_raters

VALIDATION_SEED = 0


def foreground_classes(label_manager) -> list:
    """The classes the model segments: nnU-Net's foreground regions where the dataset has them, else its labels."""
    return label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels


def rater_masks(raters_R1X: np.ndarray, label_manager, k: int) -> np.ndarray:
    """Binary masks (R, *spatial) of foreground class/region ``k`` in each rater's label map."""
    labels = foreground_classes(label_manager)[k]
    return np.isin(raters_R1X[:, 0], np.atleast_1d(labels))


def rater_drawing_shares(raters_R1X: np.ndarray, label_manager) -> np.ndarray:
    """Per foreground class/region, the share of the raters whose mask holds it anywhere."""
    n_cls = len(foreground_classes(label_manager))
    return np.array([rater_masks(raters_R1X, label_manager, k).reshape(len(raters_R1X), -1).any(1).mean()
                     for k in range(n_cls)])


def case_multirater_metrics(case: str, samples_KN: np.ndarray, raters_R1X: np.ndarray, label_manager) -> dict:
    """``{"case": case, "<k>": {metric: value}}`` for each foreground class/region k."""
    out = {"case": case}
    for k in range(samples_KN.shape[0]):
        m = multirater_metrics_batch(samples_KN[k][None], rater_masks(raters_R1X, label_manager, k)[None])
        out[str(k)] = {name: float(m[name][0]) for name in METRIC_NAMES}
    return out


def multirater_summary(per_case: list[dict], label_manager, num_samples: int, seed: int, sampler: str) -> dict:
    """The content of ``summary_arseg.json``: per-class means (NaN-aware) and the per-case metrics of ``num_samples``
    samples drawn by ``sampler`` with ``seed``."""
    classes = sorted({c for pc in per_case for c in pc if c != "case"}, key=int)
    mean = {c: {name: nan_mean([pc[c][name] for pc in per_case]) for name in METRIC_NAMES} for c in classes}
    names = {c: str(label_manager.foreground_regions[int(c)] if label_manager.has_regions
                    else label_manager.foreground_labels[int(c)]) for c in classes}
    return {"num_samples": num_samples, "seed": seed, "sampler": sampler, "geometry": "preprocessed",
            "classes": names, "mean": mean, "metric_per_case": per_case}


def final_validation(trainer, num_samples: int, with_raters: bool, save_probabilities: bool = False) -> None:
    """nnU-Net's final validation of ``trainer`` (``perform_actual_validation``) with ``num_samples`` samples per
    case; with ``with_raters`` also ``summary_arseg.json`` from the same samples."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    lm, cm, pm = trainer.label_manager, trainer.configuration_manager, trainer.plans_manager
    predictor = SamplingPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                  perform_everything_on_device=True, device=trainer.device, verbose=False,
                                  verbose_preprocessing=False, allow_tqdm=False, num_samples=num_samples,
                                  seed=VALIDATION_SEED)
    predictor.manual_initialization(trainer.network, pm, cm, None, trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    validation_folder = join(trainer.output_folder, 'validation')
    per_case = []
    with multiprocessing.get_context("spawn").Pool(default_num_processes) as pool:
        workers = list(pool._pool)
        maybe_mkdir_p(validation_folder)
        _, val_keys = trainer.do_split()
        if trainer.is_ddp:
            last_barrier_at_idx = len(val_keys) // dist.get_world_size() - 1
            val_keys = val_keys[trainer.local_rank:: dist.get_world_size()]
        dataset_val = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                            folder_with_segs_from_previous_stage=
                                            trainer.folder_with_segs_from_previous_stage)
        next_stages = cm.next_stage_names
        for n in next_stages or []:
            maybe_mkdir_p(join(trainer.output_folder_base, 'predicted_next_stage', n))
        results = []
        for i, key in enumerate(dataset_val.identifiers):
            while check_workers_alive_and_busy(pool, workers, results, allowed_num_queued=2):
                sleep(0.1)
            trainer.print_to_log_file(f"predicting {key}")
            data, _, seg_prev, properties = dataset_val.load_case(key)
            data = data[:]
            if trainer.is_cascaded:
                data = np.vstack((data, convert_labelmap_to_one_hot(seg_prev[:], lm.foreground_labels,
                                                                    output_dtype=data.dtype)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 'The given NumPy array is not writable'
                data = torch.from_numpy(data)
            trainer.print_to_log_file(f'{key}, shape {data.shape}, rank {trainer.local_rank}')
            logits, drawn = predictor.sample_case(data)
            results.append(pool.starmap_async(export_prediction_from_logits, (
                (logits, properties, cm, pm, trainer.dataset_json, join(validation_folder, key), save_probabilities),)))
            if with_raters:
                case = case_multirater_metrics(key, drawn.samples_KN.numpy(),
                                               load_raters(trainer.preprocessed_dataset_folder, key), lm)
                per_case.append(case)
                trainer.print_to_log_file(f"AR-Seg multi-rater validation {key}: " + "; ".join(
                    f"class {c}: " + ", ".join(f"{name} {v:.3f}" for name, v in case[c].items())
                    for c in case if c != "case"))
            for n in next_stages or []:
                next_cm = pm.get_configuration(n)
                folder = join(nnUNet_preprocessed, pm.dataset_name, next_cm.data_identifier)
                dataset_class = infer_dataset_class(folder)
                try:
                    d, _, _, _ = dataset_class(folder, [key]).load_case(key)
                except FileNotFoundError:
                    trainer.print_to_log_file(f"Predicting next stage {n} failed for case {key} because the "
                                              f"preprocessed file is missing! Run the preprocessing for this "
                                              f"configuration first!")
                    continue
                results.append(pool.starmap_async(resample_and_save, (
                    (logits, d.shape[1:], join(trainer.output_folder_base, 'predicted_next_stage', n, key), pm,
                     next_cm, properties, trainer.dataset_json, default_num_processes, dataset_class),)))
            if trainer.is_ddp and i < last_barrier_at_idx and (i + 1) % 20 == 0:
                dist.barrier()
        _ = [r.get() for r in results]

    if trainer.is_ddp:
        dist.barrier()
        if with_raters:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, per_case)
            per_case = sorted((c for part in gathered for c in part), key=lambda c: c["case"])
    if trainer.local_rank == 0:
        metrics = compute_metrics_on_folder(join(trainer.preprocessed_dataset_folder_base, 'gt_segmentations'),
                                            validation_folder, join(validation_folder, 'summary.json'),
                                            pm.image_reader_writer_class(), trainer.dataset_json["file_ending"],
                                            foreground_classes(lm),
                                            lm.ignore_label, chill=True,
                                            num_processes=default_num_processes * dist.get_world_size()
                                            if trainer.is_ddp else default_num_processes)
        for label in metrics["mean"]:
            trainer.logger.log_summary(f"final_val/class_{label}_dice", metrics["mean"][label]["Dice"])
        trainer.logger.log_summary("final_val/foreground_dice", metrics['foreground_mean']["Dice"])
        trainer.print_to_log_file("Validation complete", also_print_to_console=True)
        trainer.print_to_log_file("Mean Validation Dice: ", (metrics['foreground_mean']["Dice"]),
                                  also_print_to_console=True)
        if with_raters:
            summary = multirater_summary(per_case, lm, num_samples, VALIDATION_SEED,
                                         predictor.eval_sampler(trainer.is_cascaded))
            save_json_atomic(summary, join(validation_folder, "summary_arseg.json"))
            trainer.print_to_log_file("AR-Seg multi-rater validation:", summary["mean"])
    trainer.set_deep_supervision_enabled(True)
    compute_gaussian.cache_clear()
