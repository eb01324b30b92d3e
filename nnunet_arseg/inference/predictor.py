"""``ARSegPredictor``: nnU-Net's predictor for ``nnUNetv2_arseg_predict``. The consensus logits and samples of each
case come from ``SamplingPredictor`` (nnU-Net's own sliding window, so the consensus is that of ``nnUNetv2_predict``);
each case is written by ``outputs.export_case`` (extras, then the consensus, atomically) in nnU-Net's export worker
processes, after the case's record (the run's settings), and ``--continue_prediction`` skips only the cases that
have every requested output."""
from __future__ import annotations

import multiprocessing
import os
import time
from time import sleep

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import isfile, join, maybe_mkdir_p
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.prediction_files import ExtraOutputs, case_files, case_record_file
from nnunet_arseg.inference.outputs import export_case
from nnunet_arseg.sampling_window import SamplingPredictor


class ARSegPredictor(SamplingPredictor):
    """``SamplingPredictor`` that writes the extra outputs of each case beside nnU-Net's consensus."""

    def __init__(self, *args, extras: ExtraOutputs = ExtraOutputs(), **kwargs):
        super().__init__(*args, with_scales=extras.scales, **kwargs)
        self.extras = extras
        self.record: dict | None = None  # the run's settings, written as each case's record before its files

    def samples_per_case(self) -> int:
        """N per fold model times the number of fold models."""
        return self.eval_settings()[0] * len(self.list_of_parameters or [None])

    def case_is_complete(self, output_file_truncated: str, save_probabilities: bool = False) -> bool:
        return all(isfile(f) for f in case_files(output_file_truncated, self.dataset_json["file_ending"],
                                                 self.samples_per_case(), self.extras, save_probabilities))

    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder,
                                       output_folder_or_list_of_truncated_output_files,
                                       folder_with_segs_from_prev_stage: str = None, overwrite: bool = True,
                                       part_id: int = 0, num_parts: int = 1, save_probabilities: bool = False):
        """nnU-Net's lists; without ``overwrite``, the cases lacking any requested output (not only the consensus)."""
        inputs, outputs, prev = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, True, part_id, num_parts, save_probabilities)
        if overwrite or outputs is None:
            return inputs, outputs, prev
        todo = [i for i, o in enumerate(outputs) if not self.case_is_complete(o, save_probabilities)]
        print(f"--continue_prediction: {len(outputs) - len(todo)} of {len(outputs)} cases have every requested "
              f"output; predicting the other {len(todo)}")
        return [inputs[i] for i in todo], [outputs[i] for i in todo], [prev[i] for i in todo]

    def _predict_cases(self, cases, save_probabilities: bool, pool=None) -> list:
        """Sample each case of ``cases`` (dicts with ``data``, ``data_properties``, ``ofile``) and write it, in
        ``pool`` (at most two cases queued per worker, as nnU-Net does) or here."""
        workers = list(pool._pool) if pool is not None else []
        results = []
        for case in cases:
            data, ofile, properties = case['data'], case['ofile'], case['data_properties']
            if isinstance(data, str):  # nnU-Net's preprocessing workers may hand over a temporary .npy
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            while pool is not None and check_workers_alive_and_busy(pool, workers, results, allowed_num_queued=2):
                sleep(0.1)
            if ofile is not None and self.record is not None:
                record = case_record_file(*os.path.split(ofile))
                maybe_mkdir_p(os.path.dirname(record))
                save_json_atomic(self.record, record)
            started = time.time()
            logits, drawn = self.sample_case(data)
            if ofile is None:
                args = (logits.numpy(), self.plans_manager, self.configuration_manager, self.label_manager,
                        properties, save_probabilities)
                func = convert_predicted_logits_to_segmentation_with_correct_shape
            else:
                args = (logits.numpy(), drawn.samples_KN.numpy(),
                        None if drawn.scales_KS is None else drawn.scales_KS.numpy(), properties,
                        self.configuration_manager, self.plans_manager, self.dataset_json, ofile, save_probabilities,
                        self.extras)
                func = export_case
                print(f"{os.path.basename(ofile)}: {drawn.samples_KN.shape[1]} samples in "
                      f"{time.time() - started:.1f} s", flush=True)
            results.append(pool.apply_async(func, args) if pool is not None else func(*args))
        if pool is None:
            return results
        out = []
        for r in results:
            while True:
                if not all(w.is_alive() for w in workers):
                    raise RuntimeError('An export worker died; it was likely killed by the OS for lack of memory '
                                       '(use fewer workers: -nps)')
                try:
                    out.append(r.get(timeout=0.1))
                    break
                except multiprocessing.TimeoutError:
                    pass
        return out

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """nnU-Net's loop over preprocessed cases, each case written by ``export_case`` in the export workers."""
        with multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export) as pool:
            results = self._predict_cases(data_iterator, save_probabilities, pool)
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return results

    def predict_from_files_sequential(self, list_of_lists_or_source_folder,
                                      output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's in-process prediction (``-npp 0 -nps 0``): the same cases, written by ``export_case`` here."""
        output_folder = output_folder_or_list_of_truncated_output_files
        if isinstance(output_folder, list):
            output_folder = os.path.dirname(output_folder[0]) or os.path.curdir
        if output_folder is not None:  # what nnU-Net's own in-process loop writes beside the predictions
            maybe_mkdir_p(output_folder)
            call = {"list_of_lists_or_source_folder": list_of_lists_or_source_folder,
                    "output_folder_or_list_of_truncated_output_files":
                        output_folder_or_list_of_truncated_output_files,
                    "save_probabilities": save_probabilities, "overwrite": overwrite,
                    "folder_with_segs_from_prev_stage": folder_with_segs_from_prev_stage}
            recursive_fix_for_json_export(call)
            save_json_atomic(call, join(output_folder, 'predict_from_raw_data_args.json'))
            save_json_atomic(self.dataset_json, join(output_folder, 'dataset.json'))
            save_json_atomic(self.plans_manager.plans, join(output_folder, 'plans.json'))
        if self.configuration_manager.previous_stage_name is not None and folder_with_segs_from_prev_stage is None:
            raise ValueError(f"configuration {self.configuration_manager.configuration_name} is a cascade stage: give "
                             f"the predictions of {self.configuration_manager.previous_stage_name} "
                             f"(-prev_stage_predictions)")
        inputs, outputs, prev = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        outputs = outputs or [None] * len(inputs)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)

        def cases():
            for files, ofile, prev_seg in zip(inputs, outputs, prev):
                data, seg, properties = preprocessor.run_case(files, prev_seg, self.plans_manager,
                                                              self.configuration_manager, self.dataset_json)
                if prev_seg is not None:
                    data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], self.label_manager.foreground_labels,
                                                                        data.dtype)))
                yield {'data': torch.from_numpy(data), 'data_properties': properties, 'ofile': ofile}

        results = self._predict_cases(cases(), save_probabilities)
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return results
