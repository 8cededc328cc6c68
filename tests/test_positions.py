"""N-D rotary positions: 1-D data is exactly ordinary RoPE; relative-position invariance per axis."""
import math

import pytest
import torch

from seqgen.positions import RotaryND, axis_assignment
from seqgen.types import SeqgenError, line_positions


def ordinary_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Textbook RoPE (RoFormer eq. 34) written independently: pair (j, j + d/2) rotated by i * base^(-2j/d)."""
    B, H, L, d = x.shape
    out = torch.empty_like(x)
    for i in range(L):
        for j in range(d // 2):
            theta = i * base ** (-2 * j / d)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, :, i, j], x[:, :, i, j + d // 2]
            out[:, :, i, j] = a * c - b * s
            out[:, :, i, j + d // 2] = a * s + b * c
    return out


@pytest.mark.parametrize("split", [(1, 1, 1), (2, 1, 1), (0, 1, 1), (1, 0, 0)])
def test_text_positions_give_exactly_ordinary_rope(split):
    d = 16
    rope = RotaryND(d, split=split).double()
    x = torch.randn(2, 3, 11, d, dtype=torch.float64)
    cos, sin = rope.angles(line_positions(11, 2))
    got = RotaryND.rotate(x, cos.double(), sin.double())
    torch.testing.assert_close(got, ordinary_rope(x), atol=1e-5, rtol=1e-5)


def test_axis_assignment_follows_split_and_interleaves():
    a = axis_assignment(12, (1, 1, 1))
    assert [a.count(i) for i in range(3)] == [4, 4, 4]
    assert a[:3] == [0, 1, 2]  # every axis gets high frequencies too
    b = axis_assignment(16, (2, 1, 1))
    assert [b.count(i) for i in range(3)] == [8, 4, 4]
    assert axis_assignment(8, (0, 1, 1)).count(0) == 0
    with pytest.raises(SeqgenError):
        axis_assignment(8, (1, 1))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_attention_logits_invariant_to_a_shift_along_one_axis(axis):
    d = 24
    rope = RotaryND(d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 20, d, generator=g)
    k = torch.randn(1, 2, 20, d, generator=g)
    pos = torch.randint(0, 8, (1, 20, 3), generator=g)

    def logits(p):
        cos, sin = rope.angles(p)
        return RotaryND.rotate(q, cos, sin) @ RotaryND.rotate(k, cos, sin).transpose(-1, -2)
    shifted = pos.clone()
    shifted[..., axis] += 37
    torch.testing.assert_close(logits(pos), logits(shifted), atol=1e-4, rtol=1e-4)
    # ... but the coordinates do matter
    other = pos.clone()
    other[0, 3, axis] += 1
    assert not torch.allclose(logits(pos), logits(other), atol=1e-3)


def test_odd_head_dim_is_rejected():
    with pytest.raises(SeqgenError, match="even"):
        RotaryND(7)
