"""Training the mask tokenizer until it reconstructs held-out masks well enough, or a step cap (method §1.4).

Knows masks and the tokenizer, nothing of nnU-Net: the caller supplies ``draw_batch`` (training masks) and held-out
masks; ``training/tokenizer_store.py`` wires this to a preprocessed nnU-Net dataset.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from nnunet_arseg.tokenizer.autoencoder import MaskTokenizer

__all__ = ["TokenizerFitConfig", "reconstruction_scores", "dihedral_augment", "fit_tokenizer"]


@dataclass(frozen=True)
class TokenizerFitConfig:
    """How the tokenizer is trained: Adam (0.5, 0.9) as the reference, linear warm-up then cosine decay over
    ``max_steps``; every ``eval_every`` steps the held-out masks are reconstructed and training stops once the Dice on
    non-empty masks reaches ``target_dice`` and the share of empty masks decoded empty reaches ``target_empty``."""

    max_steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_every: int = 250
    target_dice: float = 0.95
    target_empty: float = 0.99
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TokenizerFitConfig) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(cfg.max_steps, 1))))


def dihedral_augment(mask_B1: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips of every spatial axis and, where two axes have the same length, a random swap of them: exact
    on the pixel grid, one draw per example."""
    out = []
    dims = list(range(1, mask_B1.ndim - 1))  # spatial dims of one (1, *spatial) example
    for m in mask_B1:
        flips = [d for d in dims if torch.rand((), generator=gen) < 0.5]
        m = m.flip(flips) if flips else m
        if len(dims) >= 2 and m.shape[-1] == m.shape[-2] and torch.rand((), generator=gen) < 0.5:
            m = m.transpose(-1, -2)
        out.append(m)
    return torch.stack(out)


@torch.no_grad()
def reconstruction_scores(model: MaskTokenizer, masks_B1: torch.Tensor, batch_size: int = 32) -> dict:
    """Dice of the round trip mask -> tokens -> mask on every non-empty mask, and the share of empty masks decoded
    empty. Identical masks are decoded once and counted as often as they occur."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    unique, inverse = torch.unique(masks_B1.flatten(1).bool(), dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(unique)).cpu()
    dices, empty_kept, num_empty = [], 0, 0
    for start in range(0, len(unique), batch_size):
        m = unique[start:start + batch_size].view(-1, *masks_B1.shape[1:]).to(device)
        pred = model.idx_to_logits(model.mask_to_idx(m.float())) > 0
        inter, p_sum, m_sum = ((pred & m).flatten(1).sum(1), pred.flatten(1).sum(1), m.flatten(1).sum(1))
        for i, (n, ps, ms, it) in enumerate(zip(counts[start:start + batch_size].tolist(), p_sum.tolist(),
                                                m_sum.tolist(), inter.tolist())):
            if ms == 0:
                num_empty += n
                empty_kept += n * (ps == 0)
            else:
                dices += [2 * it / (ps + ms)] * n
    model.train(was_training)
    return {"dice_nonempty": float(np.mean(dices)) if dices else float("nan"),
            "empty_kept": empty_kept / num_empty if num_empty else float("nan"),
            "num_nonempty": len(dices), "num_empty": num_empty}


def target_reached(scores: dict, cfg: TokenizerFitConfig) -> bool:
    dice_ok = not scores["num_nonempty"] or scores["dice_nonempty"] >= cfg.target_dice
    empty_ok = not scores["num_empty"] or scores["empty_kept"] >= cfg.target_empty
    return dice_ok and empty_ok


def fit_tokenizer(model: MaskTokenizer, draw_batch: Callable[[np.random.Generator, int], torch.Tensor],
                  heldout_B1: torch.Tensor, cfg: TokenizerFitConfig, state: dict | None = None,
                  checkpoint: Callable[[dict], None] | None = None, log: Callable[[str], None] = print,
                  time_limit_s: float | None = None, on_step: Callable[[], None] | None = None) -> dict:
    """Train ``model`` in place until the held-out target or ``cfg.max_steps`` (or, for benchmarks, the first
    evaluation after ``time_limit_s`` seconds of this call); returns the final state.

    ``draw_batch(rng, batch_size)`` returns binary masks (B, 1, *patch) on the CPU. ``state`` (from an earlier call's
    ``checkpoint``, its tensors on any device) resumes exactly: model, optimizer, step, random generators and history;
    a state of only ``model``, ``step`` and ``history`` (a stored tokenizer trained further) continues with a fresh
    optimizer. A state that is done stays done unless ``cfg`` asks for more (a higher target, more steps).
    ``checkpoint(state)`` is called after every evaluation, so an interrupted run loses at most ``eval_every`` steps;
    ``on_step()`` after every step (a lock's proof of progress).
    """
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        step, history = state["step"], state["history"]
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            gen.set_state(state["torch_rng"].cpu())  # CPU generators, whatever map_location the state was loaded with
            torch.set_rng_state(state["global_torch_rng"].cpu())  # dead-code re-initialisation draws from it
        else:
            rng = np.random.default_rng([cfg.seed, step])
            gen = torch.Generator().manual_seed(cfg.seed + step)
        if history and (target_reached(history[-1], cfg) or step >= cfg.max_steps
                        or (state.get("done") and state.get("fit_config") == cfg.to_dict())):
            return {**state, "done": True}
    model.train()
    started = time.time()
    done = False
    while not done:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        masks = dihedral_augment(draw_batch(rng, cfg.batch_size).float(), gen).to(device)
        loss, logs = model.loss(masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if on_step is not None:
            on_step()
        if step % cfg.eval_every == 0 or step >= cfg.max_steps:
            scores = reconstruction_scores(model, heldout_B1)
            history.append({"step": step, "loss": logs["loss"], **scores})
            done = (target_reached(scores, cfg) or step >= cfg.max_steps
                    or (time_limit_s is not None and time.time() - started >= time_limit_s))
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "numpy_rng": rng.bit_generator.state, "torch_rng": gen.get_state(),
                     "global_torch_rng": torch.get_rng_state(), "history": history, "done": done,
                     "fit_config": cfg.to_dict()}
            if checkpoint is not None:
                checkpoint(state)
            log(f"tokenizer step {step}/{cfg.max_steps}: loss {logs['loss']:.4f}, held-out Dice (non-empty) "
                f"{scores['dice_nonempty']:.4f}, empty kept empty {scores['empty_kept']:.3f}"
                + (" -> target reached" if target_reached(scores, cfg) else ""))
    model.eval()
    return state
