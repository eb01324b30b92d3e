"""``ARSegPredictor``: nnU-Net's predictor that samples each image once and writes the consensus of those samples
(nnU-Net's own export) plus, on request, the samples, the uncertainty and the coarse-to-fine masks
(docs/design.md, "Prediction output")."""
from __future__ import annotations

import os
import time

import torch
from nnunetv2.inference import predict_from_raw_data as stock
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_arseg.inference.outputs import write_case_extras
from nnunet_arseg.inference.sampling_window import consensus_logits_from_samples, sample_sliding_window


def split_samples(num_samples: int, num_models: int) -> list[int]:
    """How many of the N samples each fold model draws (as even as possible; the first folds draw the extra)."""
    return [num_samples // num_models + (i < num_samples % num_models) for i in range(num_models)]


class ARSegPredictor(nnUNetPredictor):
    """Stock ``nnUNetPredictor`` whose logits come from N samples (split across the fold models), kept for the
    extra outputs of the case being exported. Mirroring TTA is not used (each image is sampled once)."""

    def __init__(self, *args, num_samples: int = 16, seed: int = 0, save_samples: bool = False,
                 save_uncertainty: bool = False, save_scales: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.save_samples, self.save_uncertainty, self.save_scales = save_samples, save_uncertainty, save_scales
        self._last = None  # samples of the case predicted last, until its extras are written

    @property
    def wants_extras(self) -> bool:
        return self.save_samples or self.save_uncertainty or self.save_scales

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._started = time.time()
        params = self.list_of_parameters or [None]
        parts, scales = [], None
        for i, (p, n) in enumerate(zip(params, split_samples(self.num_samples, len(params)))):
            if n == 0:
                continue
            net = getattr(self.network, "_orig_mod", self.network)
            if p is not None:
                net.load_state_dict(p)
            out = sample_sliding_window(self, net, data, n, self.seed + 7919 * i,
                                        with_scales=self.save_scales and i == 0, desc=f"sampling (N={n})")
            parts.append(out["samples_KN"])
            scales = out["scales_KS"] if scales is None else scales
        samples_KN = torch.cat(parts, dim=1)
        self._last = {"samples_KN": samples_KN, "scales_KS": scales}
        return consensus_logits_from_samples(samples_KN, self.label_manager.has_regions)

    def _write_extras(self, ofile: str | None, properties: dict) -> None:
        if self._last is not None and ofile is not None:
            if self.wants_extras:
                write_case_extras(self, ofile, properties, **self._last)
            print(f"{os.path.basename(ofile)}: {self.num_samples} samples in {time.time() - self._started:.1f} s",
                  flush=True)
        self._last = None

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = stock.default_num_processes):
        def with_extras():
            for item in data_iterator:
                yield item
                self._write_extras(item['ofile'], item['data_properties'])  # runs once the case was predicted

        try:
            return super().predict_from_data_iterator(with_extras(), save_probabilities,
                                                      num_processes_segmentation_export)
        finally:
            if hasattr(data_iterator, "_finish"):  # the stock method only finishes iterators it can see
                data_iterator._finish()

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """The stock sequential loop, with the extras written right after each case's in-process export (same
        signature as the stock method: nnU-Net records its arguments by introspection)."""
        stock_export = stock.export_prediction_from_logits

        def export_with_extras(prediction, properties, configuration_manager, plans_manager, dataset_json, ofile,
                               *rest, **kw):
            stock_export(prediction, properties, configuration_manager, plans_manager, dataset_json, ofile, *rest,
                         **kw)
            self._write_extras(ofile, properties)

        stock.export_prediction_from_logits = export_with_extras
        try:
            return super().predict_from_files_sequential(list_of_lists_or_source_folder,
                                                         output_folder_or_list_of_truncated_output_files,
                                                         save_probabilities, overwrite,
                                                         folder_with_segs_from_prev_stage)
        finally:
            stock.export_prediction_from_logits = stock_export
