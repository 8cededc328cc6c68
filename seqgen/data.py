"""Batch samplers over tokenized data whose whole state is a few integers, so a resumed run draws
exactly the batches an uninterrupted run would have drawn.

``ExampleSampler``   shuffled epochs over N fixed-length examples (images)
``WindowSampler``    random windows from one long token stream (text)

Every draw is a pure function of (seed, rank, counter): nothing else needs saving.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .types import SeqgenError


def _generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    g.manual_seed(seed)
    return g


class ExampleSampler:
    """Draws batches of example indices; each epoch is a fresh permutation of all N examples."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0):
        if n < 1:
            raise SeqgenError("cannot sample batches from an empty data set")
        if batch_size < 1:
            raise SeqgenError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.rank = n, batch_size, seed, rank
        self.epoch, self.cursor = 0, 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=_generator(self.seed, self.rank, self.epoch))
        return self._perm

    def next(self) -> Tensor:
        out = []
        need = self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.cursor:self.cursor + need]
            out.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


class WindowSampler:
    """Draws batches of window start offsets into a stream of ``n_tokens`` tokens."""

    def __init__(self, n_tokens: int, window: int, batch_size: int, seed: int = 0, rank: int = 0):
        if n_tokens < window:
            raise SeqgenError(f"the token stream ({n_tokens} tokens) is shorter than one window ({window}); "
                              "use more text or a smaller context")
        self.n, self.window, self.batch_size, self.seed, self.rank = n_tokens, window, batch_size, seed, rank
        self.draws = 0

    def next(self) -> Tensor:
        g = _generator(self.seed, self.rank, self.draws)
        self.draws += 1
        return torch.randint(0, self.n - self.window + 1, (self.batch_size,), generator=g)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


def step_generator(seed: int, step: int, rank: int = 0, device=None) -> torch.Generator:
    """The generator a paradigm uses at one training step (permutations, condition dropout)."""
    g = torch.Generator(device=device) if device is not None and torch.device(device).type != "cpu" else torch.Generator()
    s = ((seed * 1_000_003 + step) * 1_000_003 + rank + 7) % (2**63 - 1)
    g.manual_seed(s)
    return g
