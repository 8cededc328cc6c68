"""Decoder Transformer backbone: pre-norm RMSNorm, SwiGLU MLP, grouped-query attention, N-D RoPE.

References: pre-norm residual blocks (Xiong et al., 2020), RMSNorm (Zhang & Sennrich, 2019), SwiGLU
(Shazeer, 2020), grouped-query attention (Ainslie et al., 2023), rotary embeddings (Su et al., 2021).

The backbone sees only embedded tokens (B, L, D), their N-D coordinates (B, L, 3) and a MaskSpec, so
any paradigm can drive it.  With a ``KVCache`` it consumes a prefill, single tokens, or several
tokens at a time; the mask is evaluated at absolute positions, so cached decoding equals a full
forward pass for every mask kind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.cache import KVCache
from seqgen.masks import KeyValid, MaskSpec, compile_mask
from seqgen.ops.attention import attention, resolve_impl
from seqgen.positions import RotaryND
from seqgen.registry import register_backbone
from seqgen.types import SeqgenError

log = logging.getLogger(__name__)


class SwiGLU(nn.Module):
    # Separate gate / value projections: a fused one would be split in the forward and concatenated
    # in the backward, which on CPUs costs more than the matmul fusion saves (benchmarks/bench_train.py).
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(dim, hidden, bias=False)  # value
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, impl: str, layer: int,
                cache: KVCache | None) -> Tensor:
        B, L, _ = x.shape
        H, Hk, d = self.heads, self.kv_heads, self.head_dim
        q = self.wq(x).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
        k = self.wk(x).view(B, L, Hk, d).transpose(1, 2)  # (B, Hk, L, d)
        v = self.wv(x).view(B, L, Hk, d).transpose(1, 2)
        q, k = RotaryND.rotate(q, cos, sin), RotaryND.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hk, length + L, d)
        y = attention(q, k, v, mask, impl=impl)  # (B, H, L, d)
        return self.wo(y.transpose(1, 2).reshape(B, L, H * d))


class Block(nn.Module):
    def __init__(self, cfg: "Transformer.Config"):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.kv_heads or cfg.heads)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden or _swiglu_hidden(cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, impl, layer, cache):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, impl, layer, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


def _swiglu_hidden(dim: int) -> int:
    """8/3 * dim (same parameter count as a 4x GELU MLP), rounded up to a multiple of 32."""
    return 32 * -(-int(8 * dim / 3) // 32)


@register_backbone("transformer")
class Transformer(nn.Module):
    @dataclass
    class Config:
        dim: int = 256
        """model width D"""
        layers: int = 4
        heads: int = 4
        kv_heads: int | None = None
        """key/value heads for grouped-query attention (None: same as heads)"""
        mlp_hidden: int | None = None
        """SwiGLU hidden width (None: 8/3 * dim rounded up to 32)"""
        dropout: float = 0.0
        """dropout on each block's attention and MLP outputs (before the residual add)"""
        emb_dropout: float = 0.0
        """dropout on the backbone's input (token + condition embeddings), as in GPT-2"""
        rope_base: float = 10000.0
        rope_split: tuple[float, float, float] = (1.0, 1.0, 1.0)
        """how many rotary frequencies each coordinate axis (t, h, w) gets, as weights.  An axis that is
        constant inside every segment (the channel axis of an image tokenized one code per cell) can get 0:
        its frequencies go to the others, and 1-D text, at (i, i, i), keeps ordinary RoPE either way"""
        attn_impl: str = "auto"
        """ref | sdpa | math | flex | flash_attn | auto (seqgen.ops.attention)"""
        norm_eps: float = 1e-6

        @classmethod
        def tiny(cls) -> "Transformer.Config":
            return cls(dim=32, layers=2, heads=4, kv_heads=2)

    def __init__(self, config: "Transformer.Config | None" = None):
        super().__init__()
        cfg = self.config = config or self.Config()
        if cfg.dim % cfg.heads:
            raise SeqgenError(f"transformer: dim ({cfg.dim}) must be divisible by heads ({cfg.heads})")
        kvh = cfg.kv_heads or cfg.heads
        if cfg.heads % kvh:
            raise SeqgenError(f"transformer: heads ({cfg.heads}) must be a multiple of kv_heads ({kvh})")
        resolve_impl(cfg.attn_impl)
        self.dim = cfg.dim
        self.rope = RotaryND(cfg.dim // cfg.heads, cfg.rope_base, tuple(cfg.rope_split))
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (2 * self.config.layers) ** 0.5 if name.endswith(("wo.weight", "w3.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = next(self.parameters())
        cfg = self.config
        return KVCache(cfg.layers, batch_size, cfg.kv_heads or cfg.heads, cfg.dim // cfg.heads, max_len,
                       device=device or p.device, dtype=dtype or p.dtype)

    def forward(self, x: Tensor, *, pos: Tensor, mask: MaskSpec, cache: KVCache | None = None,
                valid: Tensor | None = None, attn_impl: str | None = None) -> Tensor:
        """x (B, L, D), pos (B, L, 3) -> (B, L, D).  With a cache, x holds only the new tokens.
        valid (B, L) marks padding (None: no padding, which saves a host sync while decoding)."""
        B, L, D = x.shape
        if D != self.dim:
            raise SeqgenError(f"transformer expects width {self.dim}, got input of shape {tuple(x.shape)}")
        if tuple(pos.shape) != (B, L, 3):
            raise SeqgenError(f"positions must be (B, L, 3) = ({B}, {L}, 3); got {tuple(pos.shape)}")
        impl = resolve_impl(attn_impl or self.config.attn_impl, x.device)
        offset = 0
        if cache is not None:
            cache.check_room(L)
            offset = cache.length
        kv_len = offset + L
        if cache is not None:
            kv_valid = cache.set_valid(valid, L)
            if cache.has_padding:
                mask = mask & KeyValid(kv_valid)
        elif valid is not None and not bool(valid.all()):
            mask = mask & KeyValid(valid)
        compiled = compile_mask(mask, batch_size=B, q_len=L, kv_len=kv_len, q_offset=offset, impl=impl,
                                device=x.device)
        cos, sin = self.rope.angles(pos)
        x = self.emb_drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, compiled, impl, i, cache)
        if cache is not None:
            cache.advance(L)
        return self.norm(x)
