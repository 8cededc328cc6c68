"""The ``series`` domain adapter (the README's "Adding a domain adapter" shows this class verbatim;
seqgen finds it through this package's ``seqgen.domains`` entry point)."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqgen import DomainSpec, SeqgenError, TokenSequence


class SeriesAdapter:
    """Windows of `length` values in [0, 1] <-> `length` tokens, each value binned into `bins` ids."""

    variable_length = False  # every item has `length` tokens
    unit = "sample"          # eval reports bits per sample
    sample_suffix = ".csv"

    @dataclass
    class Config:
        bins: int = 64
        length: int = 32

        @classmethod
        def tiny(cls):
            return cls(bins=16, length=8)

    def __init__(self, config=None):
        self.config = config or self.Config()
        self.spec = DomainSpec("series", vocab_size=self.config.bins, pos_axes=1)

    def encode(self, items):  # (N, length) floats -> (N, length) ids at positions 0..length-1
        x = torch.as_tensor(np.asarray(items, dtype=np.float32))
        if x.dim() != 2 or x.shape[1] != self.config.length:
            raise SeqgenError(f"series: expected items of {self.config.length} values, got {tuple(x.shape)}")
        ids = (x.clamp(0, 1) * self.config.bins).long().clamp(max=self.config.bins - 1)
        return TokenSequence.from_ids(ids)

    def decode(self, seq):  # tokens in any order (pos says where each goes) -> N arrays of bin centres
        ids = seq.ids.gather(1, seq.pos[..., 0].argsort(dim=1)).cpu()
        return list(((ids.float() + 0.5) / self.config.bins).numpy())

    def layout(self, n, length=None):  # what to generate: `length` tokens at positions 0..length-1
        return TokenSequence.from_ids(torch.zeros(n, self.config.length, dtype=torch.long))

    def units(self, seq):  # one token stands for one sample
        return torch.ones(seq.ids.shape)

    def write_samples(self, items, path, **_):  # one series per CSV row
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(path, np.stack(items), delimiter=",", fmt="%.5f")
        return Path(path)

    def example_batch(self, n, generator=None):  # noisy sine waves
        t = torch.linspace(0, 2 * torch.pi, self.config.length)
        phase = torch.rand(n, 1, generator=generator) * 2 * torch.pi
        noise = torch.rand(n, self.config.length, generator=generator) * 0.1
        return list((0.45 + 0.4 * torch.sin(t + phase) + noise).numpy())
