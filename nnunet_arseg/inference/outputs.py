"""The extra prediction outputs of one case, in the original image geometry (docs/design.md, "Prediction output"):
``samples/<case>_s<k:02d><ext>``, ``uncertainty/<case>.npz`` + ``.png``, ``scales/<case>.png``."""
from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.consensus import binary_entropy_bits


def paint_label_maps(samples_KN: torch.Tensor, label_manager) -> torch.Tensor:
    """(N, *spatial) label maps: class k's binary sample painted with its label (regions: ``regions_class_order``),
    later classes over earlier ones."""
    values = label_manager.regions_class_order if label_manager.has_regions else label_manager.foreground_labels
    out = torch.zeros(samples_KN.shape[1:], dtype=torch.uint8)
    for k, value in enumerate(values):
        out[samples_KN[k]] = int(value)
    return out


def _sample_logits(samples_KN: torch.Tensor, n: int, label_manager) -> torch.Tensor:
    """Logits whose nnU-Net export is sample ``n`` (one-hot over all labels, or +-1 per region)."""
    if label_manager.has_regions:
        return samples_KN[:, n].float() * 2 - 1
    label_map = paint_label_maps(samples_KN[:, n:n + 1], label_manager)[0].long()  # labels are consecutive
    return torch.nn.functional.one_hot(label_map, label_manager.num_segmentation_heads).movedim(-1, 0).float()


def class_membership(seg: np.ndarray, label_manager, k: int) -> np.ndarray:
    values = label_manager.foreground_regions[k] if label_manager.has_regions else label_manager.foreground_labels[k]
    return np.isin(seg, np.atleast_1d(values))


def _png(path: str, img: np.ndarray, vmax: float = 1.0, cmap: str = "gray") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    write_atomic(path, lambda p: plt.imsave(p, img, cmap=cmap, vmin=0, vmax=vmax, format="png"))


def _view_2d(arr: np.ndarray) -> np.ndarray:
    """A 2D view of a (1, H, W), (H, W) or 3D array: the slice with the largest sum along the first axis."""
    arr = np.squeeze(arr)
    while arr.ndim > 2:
        arr = arr[int(np.argmax(arr.reshape(arr.shape[0], -1).sum(1)))]
    return arr


def write_case_extras(predictor, ofile: str, properties: dict, samples_KN: torch.Tensor,
                      scales_KS: torch.Tensor | None = None) -> None:
    """Write the requested extras of the case whose consensus is ``ofile + file_ending``."""
    out_dir, case = os.path.split(ofile)
    lm, pm, cm = predictor.label_manager, predictor.plans_manager, predictor.configuration_manager
    ext = predictor.dataset_json["file_ending"]
    rw = pm.image_reader_writer_class()
    segs = [convert_predicted_logits_to_segmentation_with_correct_shape(_sample_logits(samples_KN, n, lm), pm, cm, lm,
                                                                        properties)
            for n in range(samples_KN.shape[1])]
    if predictor.save_samples:
        maybe_mkdir_p(join(out_dir, "samples"))
        for n, seg in enumerate(segs):
            write_atomic(join(out_dir, "samples", f"{case}_s{n:02d}{ext}"),
                         lambda p, s=seg: rw.write_seg(s, p, properties))
    if predictor.save_uncertainty:
        maybe_mkdir_p(join(out_dir, "uncertainty"))
        num_classes = samples_KN.shape[0]
        freq = [np.mean([class_membership(s, lm, k) for s in segs], axis=0) for k in range(num_classes)]
        unc = binary_entropy_bits(torch.from_numpy(np.stack(freq))).amax(0).numpy().astype(np.float32)
        write_atomic(join(out_dir, "uncertainty", f"{case}.npz"), lambda p: np.savez_compressed(p, uncertainty=unc))
        _png(join(out_dir, "uncertainty", f"{case}.png"), _view_2d(unc), cmap="magma")
    if predictor.save_scales and scales_KS is not None:
        maybe_mkdir_p(join(out_dir, "scales"))
        rows = [np.concatenate([_view_2d(m.numpy().astype(np.float32)) for m in per_class], axis=1)
                for per_class in scales_KS]
        _png(join(out_dir, "scales", f"{case}.png"), np.concatenate(rows, axis=0))
