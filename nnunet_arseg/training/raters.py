"""Multi-rater training data: rater masks preprocessed like nnU-Net labels, and datasets that draw one rater per case.

Raw layout (docs/design.md, "Multi-rater datasets"): ``labelsTr_raters/<case>_r<k><ext>`` beside ``labelsTr/``, with
``dataset.json["arseg"] = {"num_raters": R, "raters_folder": ..., "patient_of_case": {...}}``; every case has raters
k = 0..R-1 unless ``"raters_of_case": {case: [k, ...]}`` lists the ones it has. Preprocessed raters go to
``<preprocessed dataset>/<data identifier>_raters/<case>.npz`` (key ``raters``: int8, shape ``(R_case, 1, *spatial)``
for the R_case raters the case has, the geometry of the case's preprocessed ``seg``). The folder sits *beside* the
data folder so that nnU-Net's ``infer_dataset_class`` never sees it.
"""
from __future__ import annotations

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, maybe_mkdir_p
from nnunetv2.training.dataloading.nnunet_dataset import (nnUNetBaseDataset, nnUNetDatasetBlosc2,
                                                          nnUNetDatasetNumpy)
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.evaluation.casefiles import declared_raters


def rater_info(dataset_json: dict) -> dict | None:
    """The ``"arseg"`` block of ``dataset.json`` if it declares raters (``num_raters`` >= 1), else None."""
    info = dataset_json.get("arseg")
    if not info or int(info.get("num_raters", 0)) < 1:
        return None
    return info


def raters_folder_of(preprocessed_data_folder: str) -> str:
    """``<preprocessed dataset>/<data identifier>_raters`` for ``<preprocessed dataset>/<data identifier>``."""
    return preprocessed_data_folder.rstrip("/\\") + "_raters"


def raw_rater_files(raw_dataset_folder: str, dataset_json: dict, case: str) -> list[str]:
    """The raw rater label files of ``case`` (those ``declared_raters`` names); raises FileNotFoundError naming the
    first missing one."""
    info = rater_info(dataset_json)
    folder = join(raw_dataset_folder, info.get("raters_folder", "labelsTr_raters"))
    listed = case in (info.get("raters_of_case") or {})
    files = []
    for k in declared_raters(info, case):
        f = join(folder, f"{case}_r{k}{dataset_json['file_ending']}")
        if not isfile(f):
            raise FileNotFoundError(
                f"rater file {f} is missing: dataset.json " +
                (f"lists rater {k} for case {case} in 'raters_of_case'" if listed else
                 f"declares {info['num_raters']} raters and no 'raters_of_case' entry for {case}, so it needs all") +
                ". Restore the file, list the raters each case has in dataset.json['arseg']['raters_of_case'] "
                "(nnUNetv2_arseg_convert_folders writes it), or remove the 'arseg' block to train on the consensus "
                "labels only.")
        files.append(f)
    return files


def preprocess_raters(raw_dataset_folder: str, preprocessed_data_folder: str, identifiers: list[str],
                      plans_manager, configuration_manager, dataset_json: dict, log=print) -> str:
    """Preprocess every rater file of ``identifiers`` with the stock preprocessor's ``run_case`` (once; existing
    outputs are kept). Returns the raters folder."""
    out_folder = raters_folder_of(preprocessed_data_folder)
    todo = [k for k in identifiers if not isfile(join(out_folder, k + ".npz"))]
    if not todo:
        return out_folder
    if not isdir(raw_dataset_folder):
        raise FileNotFoundError(f"the raw dataset {raw_dataset_folder} is needed once to preprocess the rater masks "
                                f"of {len(todo)} cases (set nnUNet_raw to the folder that holds it)")
    maybe_mkdir_p(out_folder)
    cases = get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    log(f"Preprocessing the rater masks of {len(todo)} cases into {out_folder}")
    for k in todo:
        if k not in cases:
            raise KeyError(f"case {k} is in the preprocessed data but not in the raw dataset {raw_dataset_folder}")
        segs = []
        for f in raw_rater_files(raw_dataset_folder, dataset_json, k):
            _, seg, _ = preprocessor.run_case(cases[k]["images"], f, plans_manager, configuration_manager,
                                              dataset_json)
            segs.append(seg.astype(np.int8))
        raters_RX = np.stack(segs)
        write_atomic(join(out_folder, k + ".npz"), lambda tmp: np.savez_compressed(tmp, raters=raters_RX))
    return out_folder


def load_raters(preprocessed_data_folder: str, identifier: str) -> np.ndarray:
    """The preprocessed rater stack ``(R_case, 1, *spatial)`` (int8) of one case: the raters it has."""
    return np.load(join(raters_folder_of(preprocessed_data_folder), identifier + ".npz"))["raters"]


class _RaterDrawingMixin:
    """``load_case`` returns the segmentation of one rater, drawn uniformly among those the case has, instead of the
    consensus."""

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        raters = load_raters(self.source_folder, identifier)
        seg = raters[np.random.randint(len(raters))].astype(np.int16)
        return data, seg, seg_prev, properties


class nnUNetDatasetBlosc2Raters(_RaterDrawingMixin, nnUNetDatasetBlosc2):
    pass


class nnUNetDatasetNumpyRaters(_RaterDrawingMixin, nnUNetDatasetNumpy):
    pass


_RATER_CLASSES = {nnUNetDatasetBlosc2: nnUNetDatasetBlosc2Raters, nnUNetDatasetNumpy: nnUNetDatasetNumpyRaters}


def rater_dataset_class(stock_class: type[nnUNetBaseDataset]) -> type[nnUNetBaseDataset]:
    """The rater-drawing subclass of the stock dataset class nnU-Net inferred for the preprocessed folder."""
    if stock_class in _RATER_CLASSES.values():
        return stock_class
    if stock_class not in _RATER_CLASSES:
        raise TypeError(f"no rater-drawing dataset for {stock_class.__name__}; expected one of "
                        f"{[c.__name__ for c in _RATER_CLASSES]}")
    return _RATER_CLASSES[stock_class]
