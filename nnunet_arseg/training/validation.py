"""Final validation with raters: N samples per validation case scored against every rater (GED, HM-IoU, Soft-Dice,
...) into ``fold_X/validation/summary_arseg.json`` beside nnU-Net's own ``summary.json``.

Scored in the preprocessed geometry (samples and preprocessed raters share it; for 2D LIDC crops it is the original).
"""
from __future__ import annotations

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.evaluation.multirater import METRIC_NAMES, multirater_metrics_batch
from nnunet_arseg.inference.sampling_window import sample_sliding_window
from nnunet_arseg.network import unwrap_network
from nnunet_arseg.training.raters import load_raters


def rater_masks(raters_R1X: np.ndarray, label_manager, k: int) -> np.ndarray:
    """Binary masks (R, *spatial) of foreground class/region ``k`` in each rater's label map."""
    labels = label_manager.foreground_regions[k] if label_manager.has_regions else label_manager.foreground_labels[k]
    return np.isin(raters_R1X[:, 0], np.atleast_1d(labels))


def write_multirater_summary(trainer, num_samples: int, seed: int = 0) -> dict:
    """Sample every validation case of ``trainer`` and write ``summary_arseg.json``; returns its content."""
    network = unwrap_network(trainer.network)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=trainer.device, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__, None)
    lm = trainer.label_manager
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    per_case = []
    for key in dataset.identifiers:
        data, _, _, _ = dataset.load_case(key)
        samples_KN = sample_sliding_window(predictor, network, torch.from_numpy(np.asarray(data[:])), num_samples,
                                           seed)["samples_KN"].numpy()
        raters = load_raters(trainer.preprocessed_dataset_folder, key)
        case = {"case": key}
        for k in range(samples_KN.shape[0]):
            m = multirater_metrics_batch(samples_KN[k][None], rater_masks(raters, lm, k)[None])
            case[str(k)] = {name: float(m[name][0]) for name in METRIC_NAMES}
        per_case.append(case)
        trainer.print_to_log_file(f"AR-Seg multi-rater validation {key}: " + "; ".join(
            f"class {c}: " + ", ".join(f"{name} {v:.3f}" for name, v in case[c].items()) for c in case if c != "case"))
    classes = [str(k) for k in range(samples_KN.shape[0])] if per_case else []
    mean = {c: {name: float(np.nanmean([pc[c][name] for pc in per_case])) for name in METRIC_NAMES}
            for c in classes}
    summary = {"num_samples": num_samples, "seed": seed, "geometry": "preprocessed",
               "classes": {c: str(lm.foreground_regions[int(c)] if lm.has_regions else lm.foreground_labels[int(c)])
                           for c in classes},
               "mean": mean, "metric_per_case": per_case}
    folder = join(trainer.output_folder, "validation")
    maybe_mkdir_p(folder)
    save_json_atomic(summary, join(folder, "summary_arseg.json"))
    trainer.print_to_log_file("AR-Seg multi-rater validation:", mean)
    return summary
