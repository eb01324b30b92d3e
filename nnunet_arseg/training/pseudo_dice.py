"""What nnU-Net's per-epoch pseudo-Dice measures for AR-Seg, without sampling: the mask the current phase predicts
under teacher forcing (tokenizer: the reconstruction; segmentor: the per-token argmax given the true prefix)."""
from __future__ import annotations

import torch

from nnunet_arseg.training.phases import TOKENIZER, unwrap_network


@torch.no_grad()
def teacher_forced_mask_logits(network, x: torch.Tensor, mask_B1: torch.Tensor, cls_B: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, 1, *patch) of the current stage of ``network`` (an ``ARSegNetwork``, possibly wrapped)."""
    net = unwrap_network(network)
    tok = net.tokenizer
    if net.stage == TOKENIZER:
        return tok(mask_B1)[0]
    idx_list = tok.mask_to_idx(mask_B1)
    prefix_BND, _ = net.encode_image(x)
    logits_BLV = net.transformer(prefix_BND, tok.idx_to_teacher_inputs(idx_list), cls_B)
    idx_BL = logits_BLV.argmax(-1)
    pred, start = [], 0
    for si, pn in enumerate(tok.scales):
        n = int(torch.Size(pn).numel())
        pred.append(idx_BL[:, start:start + n].reshape(-1, *pn))
        start += n
    return tok.idx_to_logits(pred)
