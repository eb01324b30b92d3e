"""The segmentor's optimizer and learning-rate schedule (AdamW with VAR's decay groups; warm-up then cosine decay)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["decay_groups", "WarmupCosineLR"]


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups as in VAR/minGPT: decay on matrices and conv kernels, none on biases, norms, embeddings."""
    decay, no_decay = [], []
    for name, p in named:
        if p.ndim >= 2 and "emb" not in name and "pos" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosineLR(_LRScheduler):
    """``lr = initial_lr * warm-up * cosine``, stepped once per epoch like nnU-Net's ``PolyLRScheduler``.

    Linear warm-up over the first ``warmup_epochs``, then cosine decay to ``final_fraction * initial_lr`` at
    ``num_epochs``. ``num_epochs`` may change while training (wall-time budgets re-plan it); the schedule follows.
    """

    def __init__(self, optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int = 0,
                 final_fraction: float = 0.02):
        self.optimizer = optimizer
        self.initial_lr, self.num_epochs = initial_lr, max(1, num_epochs)
        self.warmup_epochs, self.final_fraction = warmup_epochs, final_fraction
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / (self.warmup_epochs + 1))
        progress = min(1.0, max(epoch - self.warmup_epochs, 0) / max(self.num_epochs - self.warmup_epochs, 1))
        cosine = self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.initial_lr * warm * cosine

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def build_optimizer(network: nn.Module, parameters: list[nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) over ``parameters`` (named through ``network``) with VAR's decay groups."""
    keep = {id(p) for p in parameters}
    named = [(n, p) for n, p in network.named_parameters() if id(p) in keep]
    return torch.optim.AdamW(decay_groups(named, weight_decay), lr=lr, betas=(0.9, 0.95))
