"""N samples of a whole preprocessed image, patch by patch, stitched like nnU-Net's sliding window, and the logits
that make nnU-Net's export write their consensus."""
from __future__ import annotations

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm

from nnunet_arseg.consensus import label_logits_from_frequencies, region_logits_from_frequencies, vote_frequency


@torch.inference_mode()
def sample_sliding_window(predictor, network, data_CX: torch.Tensor, num_samples: int, seed: int,
                          with_scales: bool = False, desc: str | None = None) -> dict:
    """Samples of ``network`` over the preprocessed image ``data_CX`` (C, *spatial), tiles as ``predictor`` cuts them.

    Each tile is sampled once (``seed + tile index``); overlapping tiles are blended per sample with nnU-Net's
    Gaussian weights and thresholded at 0.5 (a single tile is returned unchanged). Returns ``samples_KN``
    (K, N, *spatial) bool on the CPU and, with ``with_scales``, ``scales_KS`` (K, S, *patch) of sample 0 of the
    first tile.
    """
    patch = tuple(predictor.configuration_manager.patch_size)
    device = predictor.device
    data, revert = pad_nd_image(data_CX, patch, 'constant', {'value': 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(data.shape[1:])
    network = network.to(device).eval()
    acc = weight = scales = None
    gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=torch.device('cpu')) \
        if len(slicers) > 1 else torch.ones(patch)
    show = desc is not None and predictor.allow_tqdm and len(slicers) > 1
    for ti, sl in enumerate(tqdm(slicers, desc=desc, disable=not show)):
        tile = data[sl][None].to(device)
        out = network.sample(tile, num_samples, seed + ti, with_scales=with_scales and ti == 0)
        s_KN = out["samples"][0].cpu()
        if with_scales and ti == 0:
            scales = out["scales"][0].cpu()
        if len(slicers) == 1:
            acc = s_KN
            break
        if acc is None:
            acc = torch.zeros((*s_KN.shape[:2], *data.shape[1:]), dtype=torch.half)
            weight = torch.zeros(data.shape[1:], dtype=torch.float)
        acc[(slice(None), slice(None), *sl[1:])] += (s_KN * gaussian).half()
        weight[sl[1:]] += gaussian
    if len(slicers) == 1:
        samples = torch.zeros((*acc.shape[:2], *data.shape[1:]), dtype=torch.bool)
        samples[(slice(None), slice(None), *slicers[0][1:])] = acc
    else:
        samples = acc.float() > 0.5 * weight
    samples = samples[(slice(None), slice(None), *revert[1:])]
    return {"samples_KN": samples, "scales_KS": scales}


def consensus_logits_from_samples(samples_KN: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """(num_heads, *spatial) logits whose nnU-Net export is the consensus of the samples (see ``consensus.py``)."""
    soft_K = vote_frequency(samples_KN, dim=1)
    return region_logits_from_frequencies(soft_K) if has_regions else label_logits_from_frequencies(soft_K, 0)
