"""Class labels as a one-token domain: the condition of class-conditional generation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqgen.registry import register_domain
from seqgen.types import DomainSpec, SeqgenError, TokenSequence


@register_domain("label")
class LabelDomain:
    @dataclass
    class Config:
        num_classes: int = 10
        names: list[str] | None = None

        @classmethod
        def tiny(cls) -> "LabelDomain.Config":
            return cls(num_classes=10)

    def __init__(self, config: "LabelDomain.Config | None" = None, modality: int = 1):
        self.config = config or self.Config()
        if self.config.num_classes < 1:
            raise SeqgenError(f"label: num_classes must be >= 1, got {self.config.num_classes}")
        self.spec = DomainSpec("label", vocab_size=self.config.num_classes, pos_axes=1)
        self.modality = modality

    def encode(self, labels) -> TokenSequence:
        """labels (B,) ints -> (B, 1) tokens at position 0."""
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.config.num_classes):
            raise SeqgenError(f"labels outside 0..{self.config.num_classes - 1}: got {int(y.min())}..{int(y.max())}")
        return TokenSequence.from_ids(y.view(-1, 1), modality=self.modality)

    def null(self, batch_size: int, device=None) -> TokenSequence:
        """The null condition used for classifier-free guidance."""
        ids = torch.full((batch_size, 1), self.spec.null_id, dtype=torch.long, device=device)
        return TokenSequence.from_ids(ids, modality=self.modality)

    def decode(self, seq: TokenSequence) -> np.ndarray:
        return seq.ids[:, 0].cpu().numpy()

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> np.ndarray:
        return torch.randint(0, self.config.num_classes, (n,), generator=generator).numpy()

    def layout(self, batch_size: int, device=None) -> TokenSequence:
        return TokenSequence.from_ids(torch.zeros(batch_size, 1, dtype=torch.long, device=device),
                                      modality=self.modality)
