"""The four component protocols (structural: a class conforms without inheriting from anything).

tests/test_conformance.py checks every registered component against them.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .masks import MaskSpec
from .types import Batch, DomainSpec, TokenSequence


@runtime_checkable
class DomainAdapter(Protocol):
    """Raw data <-> TokenSequence."""

    spec: DomainSpec

    def encode(self, raw: Any) -> TokenSequence: ...  # raw batch -> tokens

    def decode(self, seq: TokenSequence) -> Any: ...  # tokens -> raw (inverse up to quantization)

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> Any: ...  # tiny synthetic batch


@runtime_checkable
class Cache(Protocol):
    """What ``Backbone.init_cache`` returns: a KV cache or a recurrent state."""

    length: int

    def advance(self, n: int) -> None: ...

    def truncate(self, n: int) -> None: ...

    def select(self, index) -> "Cache": ...


@runtime_checkable
class Backbone(Protocol):
    """(B, L, D) embedded tokens + (B, L, 3) coordinates + a mask spec -> (B, L, D)."""

    dim: int

    def forward(self, x: Tensor, *, pos: Tensor, mask: MaskSpec, cache: Any = None,
                valid: Tensor | None = None) -> Tensor: ...

    def init_cache(self, batch_size: int, max_len: int) -> Cache: ...


@runtime_checkable
class Head(Protocol):
    """Hidden states -> loss and samples (ids (N,) for discrete heads, values (N, C) for continuous)."""

    def loss(self, h: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> tuple[Tensor, dict]: ...

    def sample(self, h: Tensor, *, generator: torch.Generator | None = None, **knobs) -> Tensor: ...


@runtime_checkable
class Paradigm(Protocol):
    """How a training example is arranged and how generation proceeds."""

    def prepare(self, data: TokenSequence, prefix: TokenSequence | None = None, **kw) -> Batch: ...

    def generate(self, model, prompt: TokenSequence, layout: TokenSequence, **knobs) -> TokenSequence: ...
