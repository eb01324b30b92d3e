"""What nnU-Net's DDP ranks (``nnUNetv2_train ... -num_gpus N``) do apart, in turn or as one: each draws its own
batches, what one rank writes (the split file, the dataset's tokenizer) the others read only once it is there, and
what one rank decides (the budget's epochs) the others follow."""
from __future__ import annotations

import random
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

RANK_SEED_STRIDE = 100_000  # seeds of neighbouring ranks are this far apart, beyond any epoch offset
# how long the other ranks wait for rank 0 (which may be training the tokenizer); NCCL's own default is 10 minutes
RANK0_FIRST_TIMEOUT = timedelta(days=2)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with ``seed``, offset by ``rank`` (without DDP: rank 0, the seed itself)."""
    seed = int(seed) + RANK_SEED_STRIDE * int(rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank0_first(job: Callable[[], T]) -> T:
    """``job()`` on rank 0, then on the other ranks, which wait for it at a barrier (every rank must call this; without
    a process group it is just ``job()``). The barrier runs in a gloo group of its own with a timeout that outlasts a
    tokenizer's training, which the NCCL group nnU-Net starts would not."""
    if not (dist.is_available() and dist.is_initialized()):
        return job()
    group = dist.new_group(backend="gloo", timeout=RANK0_FIRST_TIMEOUT)
    if dist.get_rank() == 0:
        result = job()
    dist.barrier(group=group)
    if dist.get_rank() != 0:
        result = job()
    dist.destroy_process_group(group)
    return result


def rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, its result on every rank, so that decisions taken from a rank's own clock agree (every
    rank must call this; without a process group it is just ``decide()``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
