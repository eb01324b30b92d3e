"""N samples of a whole preprocessed case through nnU-Net's own sliding window, for every command that samples.

nnU-Net's predictor tiles the case, mirrors each tile (if allowed), averages the folds and blends the tiles; the
network's eval forward returns per-tile consensus logits (``ARSegNetwork.consensus_logits``, seeded by the tile's
content). So the consensus of ``nnUNetv2_predict``, ``nnUNetv2_arseg_predict`` and the final validation is the same
by construction. ``SamplingPredictor`` is that predictor plus a ``TileRecorder`` that receives the samples the network
drew and stitches them into the case's samples: the extra outputs and the multi-rater validation use the very draws
that made the consensus.

With mirroring, the consensus averages the logits of the mirrored passes (as nnU-Net does for any network) while the
samples are those of the unmirrored pass; with several folds, each fold draws N samples per tile, their logits are
averaged, and the samples of all folds are kept (N per fold).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_arseg.segmentor.outline import check_outline_spread

__all__ = ["EvalSampling", "TileRecorder", "CaseSamples", "SamplingPredictor", "arseg_network"]


@dataclass
class EvalSampling:
    """What ``ARSegNetwork``'s eval forward draws while a predictor runs; None leaves a setting to the network
    (``ARSegNetwork.eval_settings`` / ``eval_sampler``: the environment, else the defaults): N, base seed and
    temperature factor, a recorder for the samples, the sampler (``segmentor/samplers``), how many coarse scales an
    anchor fixes (``anchored``; None: all), whether the U-Net head is mirrored, the presence temperature and the
    outline spread (``head``)."""

    num_samples: int | None = None
    seed: int | None = None
    temperature: float | None = None
    recorder: TileRecorder | None = None
    sampler: str | None = None
    anchor_scales: int | None = None
    mirror_head: bool | None = None
    presence_temperature: float | None = None
    outline_spread: float | None = None


@dataclass
class CaseSamples:
    """The samples of one case in the preprocessed geometry: ``samples_KN`` (K, N, *spatial) bool, N for each fold
    model one after the other, and ``scales_KS`` (K, S, *patch) the coarse-to-fine masks of the first drawn sample
    of the first tile (None when not asked for)."""

    samples_KN: torch.Tensor
    scales_KS: torch.Tensor | None = None


class TileRecorder:
    """Stitches the samples the network draws tile by tile into the samples of the whole (padded) image.

    The predictor announces the window (``start_window``) and each tile (``start_tile``); the network hands over its
    draws (``record``), of which the first per tile is kept (later ones are the mirrored passes). One tile: its
    samples as they are. Several: each sample blended with nnU-Net's Gaussian tile weights, kept where > 0.5.
    """

    def __init__(self, with_scales: bool = False):
        self.with_scales = with_scales
        self.scales_KS = None
        self._slicers, self._tile, self._taken = [], -1, False
        self._acc = self._weight = self._gaussian = None

    def start_window(self, shape, slicers, patch_size) -> None:
        self._shape, self._slicers, self._tile, self._taken = tuple(shape), list(slicers), -1, True
        self._acc = self._weight = None
        self._gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                                          dtype=torch.float32, device=torch.device('cpu'))

    def start_tile(self) -> None:
        self._tile += 1
        self._taken = False

    @property
    def wants_scales(self) -> bool:
        return self.with_scales and self.scales_KS is None and not self._taken

    def record(self, samples_KN: torch.Tensor, scales_KS: torch.Tensor | None = None) -> None:
        """The draws (K, N, *patch) of the current tile."""
        if not 0 <= self._tile < len(self._slicers):
            raise RuntimeError("TileRecorder.record outside a tile: the predictor must call start_window/start_tile")
        if self._taken:
            return
        self._taken = True
        if scales_KS is not None and self.scales_KS is None:
            self.scales_KS = scales_KS.cpu()
        samples_KN = samples_KN.cpu()
        where = (slice(None), slice(None), *self._slicers[self._tile][1:])
        if self._acc is None:
            dtype = torch.bool if len(self._slicers) == 1 else torch.half
            self._acc = torch.zeros((*samples_KN.shape[:2], *self._shape), dtype=dtype)
            self._weight = torch.zeros(self._shape, dtype=torch.float)
        if len(self._slicers) == 1:
            self._acc[where] = samples_KN
        else:
            self._acc[where] += (samples_KN * self._gaussian).half()
            self._weight[self._slicers[self._tile][1:]] += self._gaussian

    def finish_window(self, revert_padding) -> torch.Tensor:
        """The stitched samples (K, N, *spatial) bool, cropped back with nnU-Net's padding slicer."""
        if self._acc is None or self._tile != len(self._slicers) - 1:
            raise RuntimeError(f"TileRecorder: {self._tile + 1} of {len(self._slicers)} tiles were drawn")
        samples = self._acc if self._acc.dtype == torch.bool else self._acc.float() > 0.5 * self._weight
        self._acc = self._weight = None
        return samples[(slice(None), slice(None), *revert_padding[1:])]


def arseg_network(network) -> torch.nn.Module:
    """The ``ARSegNetwork`` inside a DDP or ``torch.compile`` wrapper."""
    while isinstance(network, (DistributedDataParallel, OptimizedModule)):
        network = network.module if isinstance(network, DistributedDataParallel) else network._orig_mod
    if not hasattr(network, "eval_sampling"):
        raise TypeError(f"{type(network).__name__} is not an AR-Seg network (nnunet_arseg.network.ARSegNetwork)")
    return network


class SamplingPredictor(nnUNetPredictor):
    """nnU-Net's predictor whose network draws N samples (seeded by ``seed`` and each tile's content) and hands them
    over: ``sample_case`` returns the consensus logits of a preprocessed case, as nnU-Net computes them, and its
    samples. Everything else (tiling, mirroring, fold averaging, export) is nnU-Net's."""

    def __init__(self, *args, num_samples: int | None = None, seed: int | None = None,
                 temperature: float | None = None, with_scales: bool = False, sampler: str | None = None,
                 anchor_scales: int | None = None, mirror_head: bool | None = None,
                 presence_temperature: float | None = None, outline_spread: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if num_samples is not None and int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if presence_temperature is not None and not float(presence_temperature) > 0:
            raise ValueError(f"presence_temperature must be > 0, got {presence_temperature}")
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = None if seed is None else int(seed)
        self.temperature = None if temperature is None else float(temperature)
        self.with_scales = with_scales
        self.anchor_scales = None if anchor_scales is None else int(anchor_scales)
        self.sampler = sampler
        self.mirror_head = None if mirror_head is None else bool(mirror_head)
        self.presence_temperature = None if presence_temperature is None else float(presence_temperature)
        self.outline_spread = None if outline_spread is None else check_outline_spread(outline_spread)
        self._windows: list | None = None  # the samples of each model's window, while sample_case runs
        self._recorder: TileRecorder | None = None

    def eval_settings(self) -> tuple[int, int, float]:
        """The N (per fold model), base seed and temperature factor this predictor draws with."""
        net = arseg_network(self.network)
        previous, net.eval_sampling = net.eval_sampling, EvalSampling(self.num_samples, self.seed, self.temperature)
        try:
            return net.eval_settings()
        finally:
            net.eval_sampling = previous

    def eval_sampler(self, with_anchor: bool = False) -> str:
        """The name of the sampler this predictor draws with (``ARSegNetwork.eval_sampler``)."""
        net = arseg_network(self.network)
        previous, net.eval_sampling = net.eval_sampling, EvalSampling(sampler=self.sampler)
        try:
            return net.eval_sampler(with_anchor)
        finally:
            net.eval_sampling = previous

    @torch.inference_mode()
    def sample_case(self, data_CX: torch.Tensor) -> tuple[torch.Tensor, CaseSamples]:
        """Consensus logits (num_heads, *spatial) of a preprocessed case, on the CPU, and its samples."""
        self._windows = []
        try:
            if self.list_of_parameters:
                logits = self.predict_logits_from_preprocessed_data(data_CX).cpu()
            else:  # a network given by manual_initialization without parameters (the trainer's final validation)
                logits = self.predict_sliding_window_return_logits(data_CX).cpu()
            windows = self._windows
        finally:
            self._windows = None
        return logits, CaseSamples(torch.cat([w.samples_KN for w in windows], dim=1), windows[0].scales_KS)

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        net = arseg_network(self.network)
        recording = self._windows is not None
        self._recorder = TileRecorder(self.with_scales and not self._windows) if recording else None
        net.eval_sampling = EvalSampling(self.num_samples, self.seed, self.temperature, self._recorder, self.sampler,
                                         self.anchor_scales, self.mirror_head, self.presence_temperature,
                                         self.outline_spread)
        try:
            logits = super().predict_sliding_window_return_logits(input_image)
        finally:
            net.eval_sampling = None
        if recording:
            _, revert = pad_nd_image(torch.zeros((1, *input_image.shape[1:]), dtype=torch.bool),
                                     self.configuration_manager.patch_size, 'constant', {'value': 0}, True, None)
            self._windows.append(CaseSamples(self._recorder.finish_window(revert), self._recorder.scales_KS))
            self._recorder = None
        return logits

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        if self._recorder is not None:
            self._recorder.start_window(data.shape[1:], slicers, self.configuration_manager.patch_size)
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._recorder is not None:
            self._recorder.start_tile()
        return super()._internal_maybe_mirror_and_predict(x)
