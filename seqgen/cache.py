"""Decoding caches.  A backbone's ``init_cache`` returns one; paradigms only use this small surface:

    cache.length          tokens already consumed
    cache.advance(n)      called by the backbone after it appended n tokens in every layer
    cache.truncate(n)     roll back to the first n tokens (speculative / parallel decoding)
    cache.select(index)   keep some batch rows (e.g. drop finished samples)

``KVCache`` is a static buffer (gpt-fast style): keys and values for all layers are preallocated
for ``max_len`` tokens, so appends are in-place copies and shapes stay fixed.  An SSM backbone
returns its own state object with the same methods.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .types import SeqgenError


class KVCache:
    def __init__(self, layers: int, batch_size: int, kv_heads: int, head_dim: int, max_len: int,
                 device=None, dtype=torch.float32):
        shape = (layers, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self.has_padding = False  # any appended token invalid? (keeps decoding free of host syncs)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise SeqgenError(f"KV cache full: holds {self.length} of {self.max_len} tokens, "
                              f"cannot append {n}; create it with a larger max_len")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values (B, Hkv, n, d) of one layer; return all keys/values so far."""
        n = k.shape[2]
        end = self.length + n
        if self.k.dtype != k.dtype:  # autocast may change the compute dtype after creation
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def set_valid(self, valid: Tensor | None, n: int) -> Tensor:
        """Record which of the n new tokens are real (None: all of them); return the (B, length + n)
        validity of all keys."""
        if valid is None:
            self.valid[:, self.length:self.length + n] = True
        else:
            self.valid[:, self.length:self.length + n] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        return self.valid[:, :self.length + n]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise SeqgenError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n
        self.has_padding = self.has_padding and not bool(self.valid[:, :n].all())

    def select(self, index) -> "KVCache":
        self.k, self.v, self.valid = self.k[:, index], self.v[:, index], self.valid[index]
        return self
