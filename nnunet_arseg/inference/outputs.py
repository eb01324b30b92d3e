"""Writing one predicted case in the original image geometry (layout: ``files.py``): the requested extra outputs, then
nnU-Net's export of the consensus logits, each file atomically and the consensus last. Runs in nnU-Net's export
worker processes (all arguments pickle)."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)

from nnunet_arseg.atomic import fsync, temporary_name, write_atomic
from nnunet_arseg.consensus import sample_logits, uncertainty
from nnunet_arseg.prediction_files import ExtraOutputs, sample_file, scales_file, uncertainty_files


def class_membership(seg: np.ndarray, label_manager, k: int) -> np.ndarray:
    """Where the label map ``seg`` belongs to foreground class (or region) ``k``."""
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


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so the same arrays give the same bytes on every run."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def export_consensus(logits: np.ndarray, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                     output_file_truncated: str, save_probabilities: bool = False) -> None:
    """nnU-Net's ``export_prediction_from_logits`` to temporary names, then moved into place (probabilities first)."""
    tmp = str(temporary_name(output_file_truncated))
    endings = ([".npz", ".pkl"] if save_probabilities else []) + [dataset_json["file_ending"]]
    try:
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json, tmp,
                                      save_probabilities)
        for ending in endings:
            fsync(tmp + ending)
            os.replace(tmp + ending, output_file_truncated + ending)
    finally:
        for ending in endings:
            if os.path.exists(tmp + ending):
                os.remove(tmp + ending)


def export_case(logits: np.ndarray, samples_KN: np.ndarray, scales_KS: np.ndarray | None, properties: dict,
                configuration_manager, plans_manager, dataset_json: dict | str, output_file_truncated: str,
                save_probabilities: bool = False, extras: ExtraOutputs = ExtraOutputs()) -> None:
    """Write the case whose consensus is ``output_file_truncated + file_ending``: ``samples_KN`` (K, N, *spatial) and
    ``scales_KS`` are in the preprocessed geometry, as ``logits``; each sample goes through nnU-Net's own resampling
    and export."""
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    out_dir, case = os.path.split(output_file_truncated)
    ext = dataset_json["file_ending"]
    lm = plans_manager.get_label_manager(dataset_json)
    rw = plans_manager.image_reader_writer_class()
    samples_KN = torch.from_numpy(np.asarray(samples_KN))
    segs = []
    if extras.samples or extras.uncertainty:
        segs = [convert_predicted_logits_to_segmentation_with_correct_shape(
            sample_logits(samples_KN[:, n], lm.has_regions), plans_manager, configuration_manager, lm, properties)
            for n in range(samples_KN.shape[1])]
    if extras.samples:
        maybe_mkdir_p(os.path.join(out_dir, "samples"))
        for n, seg in enumerate(segs):
            write_atomic(sample_file(out_dir, case, n, ext), lambda p, s=seg: rw.write_seg(s, p, properties))
    if extras.uncertainty:
        npz, png = uncertainty_files(out_dir, case)
        maybe_mkdir_p(os.path.dirname(npz))
        member_KN = torch.from_numpy(np.stack([np.stack([class_membership(s, lm, k) for s in segs])
                                               for k in range(samples_KN.shape[0])]))
        unc = uncertainty(member_KN, sample_dim=1, class_dim=0).numpy().astype(np.float32)
        write_atomic(npz, lambda p: save_npz(p, uncertainty=unc))
        _png(png, _view_2d(unc), cmap="magma")
    if extras.scales and scales_KS is not None:
        path = scales_file(out_dir, case)
        maybe_mkdir_p(os.path.dirname(path))
        rows = [np.concatenate([_view_2d(np.asarray(m, dtype=np.float32)) for m in per_class], axis=1)
                for per_class in scales_KS]
        _png(path, np.concatenate(rows, axis=0))
    del segs
    export_consensus(logits, properties, configuration_manager, plans_manager, dataset_json, output_file_truncated,
                     save_probabilities)
