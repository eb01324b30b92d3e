"""The two training phases of AR-Seg in one nnU-Net run: which phase an epoch belongs to, what it trains, how.

Phase ``"tokenizer"`` covers epochs ``[0, E_tok)``, phase ``"segmentor"`` the rest. The phase depends on the epoch
only, so every DDP rank agrees on it without communication.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

TOKENIZER = "tokenizer"
SEGMENTOR = "segmentor"
PHASES = (TOKENIZER, SEGMENTOR)


def phase_of_epoch(epoch: int, num_tokenizer_epochs: int) -> str:
    """The phase that trains epoch ``epoch`` (0-based)."""
    return TOKENIZER if epoch < num_tokenizer_epochs else SEGMENTOR


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and ``torch.compile`` wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def set_phase_trainable(network: nn.Module, phase: str) -> list[nn.Parameter]:
    """Switch ``network.stage`` to ``phase`` and let gradients flow only into that phase's parameters.

    Tokenizer phase: the tokenizer alone. Segmentor phase: everything except the (frozen) tokenizer.
    Returns the trainable parameters.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}, expected one of {PHASES}")
    net = unwrap_network(network)
    net.stage = phase
    net.requires_grad_(False)
    trainable = net.stage_parameters()
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def _decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups as in VAR/minGPT: decay on matrices and conv kernels, none on biases, norms, embeddings."""
    decay, no_decay = [], []
    for name, p in named:
        if p.ndim >= 2 and "emb" not in name and "pos" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_phase_optimizer(network: nn.Module, phase: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (0.5, 0.9) for the tokenizer (taming/AR-Seg), AdamW (0.9, 0.95) with decay groups for the segmentor."""
    net = unwrap_network(network)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError(f"no trainable parameters in phase {phase!r}; call set_phase_trainable first")
    if phase == TOKENIZER:
        return torch.optim.Adam([p for _, p in named], lr=lr, betas=(0.5, 0.9))
    return torch.optim.AdamW(_decay_groups(named, weight_decay), lr=lr, betas=(0.9, 0.95))


class PhaseLRScheduler(_LRScheduler):
    """Poly decay within one phase, stepped with the global epoch like nnU-Net's ``PolyLRScheduler``.

    ``lr = initial_lr * (1 - (epoch - first_epoch) / num_epochs) ** exponent``; ``exponent=0`` is a constant LR
    (AR-Seg's choice for both stages), optionally after ``warmup_epochs`` of linear warm-up.
    """

    def __init__(self, optimizer, initial_lr: float, first_epoch: int, num_epochs: int, exponent: float = 0.0,
                 warmup_epochs: int = 0):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.first_epoch = first_epoch
        self.num_epochs = max(1, num_epochs)
        self.exponent = exponent
        self.warmup_epochs = warmup_epochs
        self.ctr = first_epoch
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        e = min(max(epoch - self.first_epoch, 0), self.num_epochs - 1)
        lr = self.initial_lr * (1 - e / self.num_epochs) ** self.exponent
        if e < self.warmup_epochs:
            lr *= (e + 1) / (self.warmup_epochs + 1)
        return lr

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
