"""Batch samplers over tokenized data whose whole state is a few integers, so a resumed run draws
exactly the batches an uninterrupted run would have drawn.

``ExampleSampler``   shuffled epochs over N examples; with several processes each rank takes its own
                     share of every epoch (rank r: positions r, r + world, ... of the permutation)
``WindowSampler``    random windows from one long token stream (text)
``MixtureSampler``   a weighted mixture of the above, one per mixture entry: each example of a batch
                     picks its entry by weight, then draws from that entry's sampler

Every draw is a pure function of (seed, rank, counters): nothing else needs saving.
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
    """Draws batches of example indices; each epoch is a fresh permutation of all N examples, shared
    out between the ``world`` ranks so that no two ranks draw the same example in one epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, stream: int = 0):
        if n < 1:
            raise SeqgenError("cannot sample batches from an empty data set")
        if batch_size < 1:
            raise SeqgenError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise SeqgenError(f"rank {rank} outside a world of {world} processes")
        if n < world:
            raise SeqgenError(f"{n} examples cannot be shared out between {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world, self.stream = n, batch_size, seed, rank, world, stream
        self.epoch, self.cursor = 0, 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:  # the same permutation on every rank; each rank keeps its own share
            perm = torch.randperm(self.n, generator=_generator(self.seed, self.stream, self.epoch))
            self._perm = perm[self.rank::self.world]
        return self._perm

    def next(self, count: int | None = None) -> Tensor:
        out = []
        need = self.batch_size if count is None else count
        while need:
            perm = self._permutation()
            take = perm[self.cursor:self.cursor + need]
            out.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= len(perm):
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


class WindowSampler:
    """Draws batches of window start offsets into a stream of ``n_tokens`` tokens."""

    def __init__(self, n_tokens: int, window: int, batch_size: int, seed: int = 0, rank: int = 0, stream: int = 0):
        if n_tokens < window:
            raise SeqgenError(f"the token stream ({n_tokens} tokens) is shorter than one window ({window}); "
                              "use more text or a smaller context")
        self.n, self.window, self.batch_size, self.seed, self.rank = n_tokens, window, batch_size, seed, rank
        self.stream = stream
        self.draws = 0

    def next(self, count: int | None = None) -> Tensor:
        g = _generator(self.seed, self.rank, self.draws) if self.stream == 0 else \
            _generator(self.seed, self.rank, self.draws, self.stream)
        self.draws += 1
        return torch.randint(0, self.n - self.window + 1, (self.batch_size if count is None else count,), generator=g)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


class MixtureSampler:
    """Batches of (entry, index) pairs from a weighted mixture of per-entry samplers.  Its state is a
    flat dict of integers (the trainer gathers it across ranks): the mixture's draw counter and each
    entry sampler's counters."""

    def __init__(self, samplers: list, weights: list[float], batch_size: int, seed: int = 0, rank: int = 0):
        if len(samplers) != len(weights) or not samplers:
            raise SeqgenError("a mixture needs one weight per entry sampler")
        self.samplers, self.batch_size, self.seed, self.rank = samplers, batch_size, seed, rank
        self.weights = torch.tensor(weights, dtype=torch.double)
        self.draws = 0

    def next(self) -> list[tuple[int, int]]:
        if len(self.samplers) == 1:
            picks = torch.zeros(self.batch_size, dtype=torch.long)
        else:
            g = _generator(self.seed, self.rank, self.draws, 77)
            picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        self.draws += 1
        out: list[tuple[int, int]] = []
        for e, sampler in enumerate(self.samplers):
            k = int((picks == e).sum())
            if k:
                out += [(e, int(i)) for i in sampler.next(k)]
        return out

    def state_dict(self) -> dict:
        state = {"draws": self.draws}
        for e, s in enumerate(self.samplers):
            state.update({f"{e}.{k}": v for k, v in s.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for e, s in enumerate(self.samplers):
            s.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{e}.")})


def step_generator(seed: int, step: int, rank: int = 0, device=None) -> torch.Generator:
    """The generator a paradigm uses at one training step (permutations, condition dropout)."""
    g = torch.Generator(device=device) if device is not None and torch.device(device).type != "cpu" else torch.Generator()
    s = ((seed * 1_000_003 + step) * 1_000_003 + rank + 7) % (2**63 - 1)
    g.manual_seed(s)
    return g
