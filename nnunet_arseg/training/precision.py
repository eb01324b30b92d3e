"""Mixed precision of the segmentor's training, as nnU-Net's: autocast on CUDA only (off on CPU and MPS), in bf16
where the GPU computes it natively, else in fp16 with a ``GradScaler`` (nnU-Net's own choice on every GPU)."""
from __future__ import annotations

import torch
from nnunetv2.utilities.helpers import dummy_context

__all__ = ["autocast_dtype", "autocast", "grad_scaler"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on ``device``: None (no autocast) off CUDA; bf16 on GPUs with native bf16
    (compute capability 8 or ROCm), fp16 on older ones (V100, T4, RTX 20xx), where bf16 is emulated and slow."""
    if device.type != "cuda":
        return None
    native_bf16 = bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native_bf16 else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on the device's type; no context at all for None (MPS rejects even a
    disabled autocast in some torch versions, hence nnU-Net's ``dummy_context``)."""
    return dummy_context() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device):
    """The loss scaler fp16 needs (its gradients underflow without one); None for bf16, fp32 and no autocast."""
    if dtype != torch.float16:
        return None
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()
