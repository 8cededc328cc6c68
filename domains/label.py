"""Class labels as a one-token domain: the condition of class-conditional generation (or, as a target,
the answer of a classifier).  A label is a segment like any other: ``[BEGIN 7 END]``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seqgen.registry import register_domain
from seqgen.types import DomainSpec, SeqgenError, TokenSequence


@register_domain("label")
class LabelDomain:
    variable_length = False
    unit = "label"
    sample_suffix = ".txt"

    @dataclass
    class Config:
        num_classes: int = 10
        names: list[str] | None = None
        """optional class names (prompts may use them)"""

        @classmethod
        def tiny(cls) -> "LabelDomain.Config":
            return cls(num_classes=10)

    def __init__(self, config: "LabelDomain.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.num_classes < 1:
            raise SeqgenError(f"label: num_classes must be >= 1, got {cfg.num_classes}")
        if cfg.names is not None and len(cfg.names) != cfg.num_classes:
            raise SeqgenError(f"label: {len(cfg.names)} names for {cfg.num_classes} classes")
        self.spec = DomainSpec("label", vocab_size=cfg.num_classes, pos_axes=1)

    def encode(self, labels) -> TokenSequence:
        """labels (N,) ints -> (N, 1) tokens at position 0."""
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.config.num_classes):
            raise SeqgenError(f"labels outside 0..{self.config.num_classes - 1}: got {int(y.min())}..{int(y.max())}")
        return TokenSequence.from_ids(y.view(-1, 1))

    def decode(self, seq: TokenSequence) -> list[int]:
        return [int(i) for i in seq.ids[:, 0].cpu()]

    def layout(self, n: int, length: int | None = None) -> TokenSequence:
        return TokenSequence.from_ids(torch.zeros(n, 1, dtype=torch.long))

    def units(self, seq: TokenSequence) -> Tensor:
        return torch.ones(seq.ids.shape)

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> list[int]:
        return torch.randint(0, self.config.num_classes, (n,), generator=generator).tolist()

    def from_prompt(self, text: str) -> int:
        """A class id ("7") or, with names, a class name."""
        text = str(text).strip()
        names = self.config.names or []
        if text in names:
            return names.index(text)
        try:
            y = int(text)
        except ValueError:
            raise SeqgenError(f"label: {text!r} is not a class id (0..{self.config.num_classes - 1})"
                              + (f" or name ({', '.join(names)})" if names else "")) from None
        if not 0 <= y < self.config.num_classes:
            raise SeqgenError(f"label: class {y} outside 0..{self.config.num_classes - 1}")
        return y

    def default_prompts(self, n: int) -> tuple[list[int], int]:
        """A sample grid with one row per class: n // classes samples of every class, in class order."""
        C = self.config.num_classes
        per = max(1, n // C)
        return [c for c in range(C) for _ in range(per)], C

    def write_samples(self, labels, path: str | Path, **_) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.config.names
        path.write_text("\n".join(names[y] if names else str(y) for y in labels) + "\n")
        return path
