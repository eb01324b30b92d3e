"""Presence of the mask (our addition to AR-Seg): p(the class's mask is non-empty | image), drawn before the tokens.

On LIDC a third of the rater masks are empty, and whether a rater drew anything is the main ambiguity of an image.
Token by token, an empty mask is one sequence of codes among very many, so the share of empty samples follows the
sampling temperature rather than the image. With a presence head the model factorises
p(mask | f, c) = p(present | f, c) p(mask | present, f, c): each sample first draws present ~ Bernoulli(p), an absent
sample is the empty mask, and the transformer learns (and draws) the masks of present objects only.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PresenceHead", "draw_presence"]

PRESENCE_SEED_SALT = 0x5EED << 48  # the presence draws' generator differs from the token draws' of the same seed


class PresenceHead(nn.Module):
    """Image tokens (B, N, D) -> presence logits (B, num_conditions), from the tokens' mean and max (the max keeps
    the evidence of one small object). The tokens are the image prefix or the U-Net head's features
    (``presence_source``)."""

    def __init__(self, dim: int, num_conditions: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.fc = nn.Linear(2 * dim, num_conditions)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, prefix_BND: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((prefix_BND.mean(1), prefix_BND.amax(1)), dim=-1)
        return self.fc(self.norm(pooled.float())).float()


def draw_presence(logit_B: torch.Tensor, num_samples: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """Presence of N samples per image, (B, N) bool, drawn systematically: sample n of image b is present when
    (r_bn + u_b) / N < p_b, with p_b = sigmoid(logit_b / temperature), u_b uniform and r_b a random order of the N
    samples. Each sample is present with probability p_b, and the image's count of present samples is p_b N rounded
    down or up (independent draws would add binomial noise of up to 0.5 / sqrt(N) to the share). A temperature below
    1 moves p_b away from 1/2 (the samples agree more often on whether to draw; near 0 all of them follow p > 1/2),
    above 1 towards it. One generator seeded with ``seed`` (salted, so it is not the token draws' stream)."""
    if not temperature > 0:
        raise ValueError(f"presence temperature must be > 0, got {temperature}")
    generator = torch.Generator(device=logit_B.device).manual_seed((int(seed) ^ PRESENCE_SEED_SALT) % 2 ** 63)
    B = logit_B.shape[0]
    u_B1 = torch.rand(B, 1, generator=generator, device=logit_B.device)
    rank_BN = torch.rand(B, num_samples, generator=generator, device=logit_B.device).argsort(1)
    return (rank_BN + u_B1) / num_samples < torch.sigmoid(logit_B.float() / temperature).unsqueeze(1)
