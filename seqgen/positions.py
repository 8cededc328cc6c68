"""N-D rotary position embeddings with a per-axis frequency split.

Ordinary RoPE (Su et al., 2021, RoFormer eq. 34) rotates the feature pair (j, j + d/2) of a query or
key at position p by the angle p * theta_j, theta_j = base^(-2j/d), j = 0 .. d/2 - 1.

For N-D coordinates (t, h, w) each frequency index j is given to one axis a(j) and rotated by
pos[a(j)] * theta_j (the M-RoPE idea of Qwen2-VL; Lumos-1's MM-RoPE argues for spreading every axis
over the whole frequency range).  Here axes take frequencies in an interleaved pattern whose
proportions are the ``split`` weights, so every axis gets high and low frequencies.  Because the
frequencies of all axes together are exactly the ordinary ladder theta_0 .. theta_{d/2-1}, a 1-D
sequence whose index is repeated on every axis, (i, i, i), gets exactly ordinary RoPE.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .types import NUM_AXES, SeqgenError


def axis_assignment(n_freqs: int, split: tuple[float, ...]) -> list[int]:
    """Interleave frequency indices over axes in proportion to ``split`` (largest-deficit rule)."""
    if len(split) != NUM_AXES or any(s < 0 for s in split) or sum(split) <= 0:
        raise SeqgenError(f"rope split must be {NUM_AXES} non-negative weights with a positive sum; got {split}")
    total = float(sum(split))
    counts = [0] * NUM_AXES
    out = []
    for j in range(n_freqs):
        deficit = [split[a] / total * (j + 1) - counts[a] for a in range(NUM_AXES)]
        a = max(range(NUM_AXES), key=lambda i: (deficit[i], -i))
        counts[a] += 1
        out.append(a)
    return out


class RotaryND(nn.Module):
    """Rotary embedding over 3 coordinate axes.  ``split`` weights how many frequencies each axis gets."""

    def __init__(self, head_dim: int, base: float = 10000.0, split: tuple[float, ...] = (1.0, 1.0, 1.0)):
        super().__init__()
        if head_dim % 2:
            raise SeqgenError(f"rotary embeddings need an even head dimension, got {head_dim}")
        n = head_dim // 2
        inv_freq = base ** (-torch.arange(0, n, dtype=torch.float64) * 2.0 / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("axis", torch.tensor(axis_assignment(n, tuple(split)), dtype=torch.long),
                             persistent=False)
        self.head_dim = head_dim

    def angles(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos (B, L, 3) -> cos, sin of shape (B, 1, L, head_dim) (duplicated halves)."""
        p = pos.index_select(-1, self.axis).to(torch.float32)  # (B, L, n): the coordinate each frequency reads
        theta = p * self.inv_freq  # (B, L, n)
        theta = torch.cat([theta, theta], dim=-1).unsqueeze(1)  # (B, 1, L, d)
        return theta.cos(), theta.sin()

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, H, L, d): rotate pairs (j, j + d/2) ("rotate half" layout)."""
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rot.float() * sin).to(x.dtype)
