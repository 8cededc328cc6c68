"""One mask language for every paradigm's attention pattern.

A ``MaskSpec`` is a predicate over (batch row b, query index q, key index k), True where the query
may attend to the key.  Indices are absolute sequence indices: with a KV cache the queries of a
step start at the cache length.  Specs compose with ``&`` and ``|``:

    causal()                     k <= q                         (next-token AR)
    full()                       always                         (masked / bidirectional)
    prefix(n)                    k < n  or  k <= q              (bidirectional condition, causal rest)
    block_causal(segment)        seg[k] <= seg[q]               (block diffusion, VAR scales, video frames)
    block_causal(block_size=s)   k // s <= q // s               (same, blocks of equal size)
    same_document(segment)       seg[q] == seg[k]               (packed sequences)
    within(group)                grp[q] == grp[k] >= 0          (bidirectional inside groups: or it with causal)
    sliding_window(w)            q - k < w                      (combine with causal)

``compile_mask`` turns a spec into what an attention implementation consumes: nothing (full), the
``is_causal`` flag (plain causal), a dense bool tensor (``ref`` / ``sdpa``), or a FlexAttention
``BlockMask`` (cached per spec and shape: building one costs more than the attention itself).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .types import SeqgenError

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class MaskSpec:
    """Base class; subclasses implement ``mod(b, h, q, k)`` with broadcastable index tensors."""

    #: True when the predicate reads a per-row tensor (segments, padding); then masks are (B, ...).
    batch_dependent: bool = False

    def mod(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def key(self) -> Any:
        """A hashable key identifying the pattern, or None when it holds data that is not hashed."""
        return None

    def to(self, device) -> "MaskSpec":
        return self

    @property
    def kind(self) -> str:
        return type(self).__name__

    def __and__(self, other: "MaskSpec") -> "MaskSpec":
        return And(self, other)

    def __or__(self, other: "MaskSpec") -> "MaskSpec":
        return Or(self, other)

    def __repr__(self) -> str:
        return f"{self.kind}()"

    def dense(self, batch_size: int, q_len: int, kv_len: int, q_offset: int = 0, device=None) -> Tensor:
        """(B or 1, 1, Lq, Lk) bool: True = attend."""
        B = batch_size if self.batch_dependent else 1
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q = (torch.arange(q_len, device=device) + q_offset).view(1, 1, q_len, 1)
        k = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
        m = self.mod(b, h, q, k)
        return m.expand(B, 1, q_len, kv_len)


class Causal(MaskSpec):
    def mod(self, b, h, q, k):
        return q >= k

    def key(self):
        return ("causal",)


class Full(MaskSpec):
    def mod(self, b, h, q, k):
        return (q >= 0) | (k >= 0)

    def key(self):
        return ("full",)


class Prefix(MaskSpec):
    """The first n tokens attend to each other freely; the rest is causal."""

    def __init__(self, n: int):
        if n < 0:
            raise SeqgenError(f"prefix length must be >= 0, got {n}")
        self.n = int(n)

    def mod(self, b, h, q, k):
        return (k < self.n) | (q >= k)

    def key(self):
        return ("prefix", self.n)

    def __repr__(self):
        return f"Prefix({self.n})"


class SlidingWindow(MaskSpec):
    """Keys at most w - 1 steps before the query (and any later key: combine with causal)."""

    def __init__(self, w: int):
        if w < 1:
            raise SeqgenError(f"sliding window must be >= 1, got {w}")
        self.w = int(w)

    def mod(self, b, h, q, k):
        return q - k < self.w

    def key(self):
        return ("window", self.w)

    def __repr__(self):
        return f"SlidingWindow({self.w})"


class _SegmentMask(MaskSpec):
    batch_dependent = True

    def __init__(self, segment: Tensor):
        if segment.dim() != 2:
            raise SeqgenError(f"segment ids must be (B, L); got shape {tuple(segment.shape)}")
        self.segment = segment.long()

    def to(self, device):
        return type(self)(self.segment.to(device))

    def __repr__(self):
        return f"{self.kind}(segment={tuple(self.segment.shape)})"


class BlockCausal(_SegmentMask):
    """Bidirectional inside a block, causal across blocks.  Segment ids must not decrease along L."""

    def __init__(self, segment: Tensor | None = None, block_size: int | None = None):
        if (segment is None) == (block_size is None):
            raise SeqgenError("block_causal needs exactly one of segment (B, L) ids or block_size")
        self.block_size = block_size
        if segment is not None:
            super().__init__(segment)
            if segment.shape[1] > 1 and bool((segment[:, 1:] < segment[:, :-1]).any()):
                raise SeqgenError("block_causal segment ids must be non-decreasing along the sequence")
        else:
            if block_size < 1:
                raise SeqgenError(f"block_size must be >= 1, got {block_size}")
            self.segment = None
            self.batch_dependent = False

    def mod(self, b, h, q, k):
        if self.segment is None:
            return k // self.block_size <= q // self.block_size
        return self.segment[b, k] <= self.segment[b, q]

    def key(self):
        return None if self.segment is not None else ("block_causal", self.block_size)

    def to(self, device):
        return self if self.segment is None else BlockCausal(self.segment.to(device))

    def __repr__(self):
        return f"BlockCausal(block_size={self.block_size})" if self.segment is None else super().__repr__()


class SameDocument(_SegmentMask):
    """Tokens attend only inside their own document (packing several documents in one row)."""

    def mod(self, b, h, q, k):
        return self.segment[b, q] == self.segment[b, k]


class Within(_SegmentMask):
    """Tokens of one group see each other in both directions; tokens of group -1 belong to none.
    ``causal() | within(group)`` is a prefix-LM pattern per segment: condition segments read
    bidirectionally, everything else causal."""

    def mod(self, b, h, q, k):
        g = self.segment[b, q]
        return (g == self.segment[b, k]) & (g >= 0)


class KeyValid(MaskSpec):
    """Hide padding keys.  A query always sees itself, so a padding row never has an empty softmax."""

    batch_dependent = True

    def __init__(self, valid: Tensor):
        self.valid = valid.bool()

    def mod(self, b, h, q, k):
        return self.valid[b, k] | (q == k)

    def to(self, device):
        return KeyValid(self.valid.to(device))


class And(MaskSpec):
    def __init__(self, a: MaskSpec, b: MaskSpec):
        self.a, self.b = a, b
        self.batch_dependent = a.batch_dependent or b.batch_dependent

    def mod(self, b, h, q, k):
        return self.a.mod(b, h, q, k) & self.b.mod(b, h, q, k)

    def key(self):
        ka, kb = self.a.key(), self.b.key()
        return None if ka is None or kb is None else ("and", ka, kb)

    def to(self, device):
        return And(self.a.to(device), self.b.to(device))

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class Or(And):
    def mod(self, b, h, q, k):
        return self.a.mod(b, h, q, k) | self.b.mod(b, h, q, k)

    def key(self):
        k = super().key()
        return None if k is None else ("or",) + k[1:]

    def to(self, device):
        return Or(self.a.to(device), self.b.to(device))

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


# ------------------------------------------------------------------ constructors (the public language)
def causal() -> MaskSpec:
    return Causal()


def full() -> MaskSpec:
    return Full()


def prefix(n: int) -> MaskSpec:
    return Prefix(n)


def block_causal(segment: Tensor | None = None, *, block_size: int | None = None) -> MaskSpec:
    return BlockCausal(segment, block_size)


def same_document(segment: Tensor) -> MaskSpec:
    return SameDocument(segment)


def within(group: Tensor) -> MaskSpec:
    return Within(group)


def sliding_window(w: int) -> MaskSpec:
    return SlidingWindow(w)


MASK_KINDS = {"causal": causal, "full": full, "prefix": prefix, "block_causal": block_causal,
              "same_document": same_document, "within": within, "sliding_window": sliding_window}


def is_plain(spec: MaskSpec, kind: type) -> bool:
    return type(spec) is kind


# ------------------------------------------------------------------ compilation
@dataclass
class CompiledMask:
    """What one attention call needs.  Exactly one of the forms is set (or none: attend to all)."""

    q_len: int
    kv_len: int
    is_causal: bool = False
    dense: Tensor | None = None  # (B or 1, 1, Lq, Lk) bool
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask
    spec: MaskSpec | None = None
    q_offset: int = 0

    @property
    def is_full(self) -> bool:
        return not self.is_causal and self.dense is None and self.block_mask is None

    def as_dense(self, batch_size: int, device) -> Tensor | None:
        """Dense form whatever was compiled (the reference path uses it)."""
        if self.dense is not None:
            return self.dense
        if self.spec is None:
            if self.is_causal:
                return Causal().dense(1, self.q_len, self.kv_len, self.q_offset, device)
            return None
        return self.spec.dense(batch_size, self.q_len, self.kv_len, self.q_offset, device)


_BLOCK_MASK_CACHE: "OrderedDict[Any, Any]" = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64


def compile_mask(spec: MaskSpec, *, batch_size: int, q_len: int, kv_len: int, q_offset: int = 0,
                 impl: str = "sdpa", device=None) -> CompiledMask:
    """Compile a spec for one attention call.

    impl "flex" builds a BlockMask (cached by ``spec.key()`` and shape); "ref" / "sdpa" get a dense
    mask unless the pattern is plain causal (``is_causal``) or attends everywhere (nothing).
    """
    if q_offset + q_len > kv_len:
        raise SeqgenError(f"queries end at {q_offset + q_len} but only {kv_len} keys exist")
    if is_plain(spec, Full):
        return CompiledMask(q_len, kv_len, spec=spec, q_offset=q_offset)
    if is_plain(spec, Causal):
        if q_offset == kv_len - q_len and q_len == 1:
            return CompiledMask(q_len, kv_len, spec=spec, q_offset=q_offset)  # the newest token sees all
        if q_offset == 0 and q_len == kv_len and impl != "flex":
            return CompiledMask(q_len, kv_len, is_causal=True, spec=spec, q_offset=q_offset)
    if impl == "flex":
        return CompiledMask(q_len, kv_len, block_mask=_block_mask(spec, batch_size, q_len, kv_len, q_offset, device),
                            spec=spec, q_offset=q_offset)
    return CompiledMask(q_len, kv_len, dense=spec.dense(batch_size, q_len, kv_len, q_offset, device),
                        spec=spec, q_offset=q_offset)


def _block_mask(spec: MaskSpec, batch_size: int, q_len: int, kv_len: int, q_offset: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device) if device is not None else torch.device("cpu")  # torch's default is cuda

    B = batch_size if spec.batch_dependent else None
    key = spec.key()
    cache_key = None if key is None else (key, B, q_len, kv_len, q_offset, str(device))
    if cache_key is not None and cache_key in _BLOCK_MASK_CACHE:
        _BLOCK_MASK_CACHE.move_to_end(cache_key)
        return _BLOCK_MASK_CACHE[cache_key]

    def mask_mod(b, h, q_idx, kv_idx):
        return spec.mod(b, h, q_idx + q_offset, kv_idx)

    # On GPU, build the mask with a compiled kernel: masks that hold per-row segments (packing, block
    # diffusion) change every batch and cannot be cached, and the eager build costs tens of ms there.
    bm = create_block_mask(mask_mod, B, None, q_len, kv_len, device=device, _compile=device.type == "cuda")
    if cache_key is not None:
        _BLOCK_MASK_CACHE[cache_key] = bm
        while len(_BLOCK_MASK_CACHE) > _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASK_CACHE.popitem(last=False)
    return bm


def block_mask_cache_info() -> dict:
    return {"entries": len(_BLOCK_MASK_CACHE), "capacity": _BLOCK_MASK_CACHE_SIZE}
