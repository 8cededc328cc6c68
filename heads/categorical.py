"""Categorical head: a linear map to the domain's vocabulary plus its END id (so a variable-length
segment ends itself), cross-entropy loss, and a sampler with temperature, top-k, top-p, greedy,
classifier-free guidance and a per-row restriction of the outputs (``allowed``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.registry import register_head
from seqgen.sampling import cfg_combine, sample_logits
from seqgen.types import DomainSpec, SeqgenError


@register_head("categorical")
class CategoricalHead(nn.Module):
    defines_nll = True  # the loss is the cross-entropy: an NLL in nats

    @dataclass
    class Config:
        bias: bool = False
        label_smoothing: float = 0.0
        """training-only smoothing of the cross-entropy targets; evaluation NLL never uses it"""
        z_loss: float = 0.0
        """weight of the log-partition penalty (PaLM) that keeps logits small; 0 disables"""

        @classmethod
        def tiny(cls) -> "CategoricalHead.Config":
            return cls()

    def __init__(self, config: "CategoricalHead.Config", dim: int, spec: DomainSpec):
        super().__init__()
        if spec.vocab_size is None:
            raise SeqgenError(f"categorical head needs a discrete domain; {spec.name!r} has no vocab_size")
        self.config, self.spec = config, spec
        self.proj = nn.Linear(dim, spec.head_size, bias=config.bias)
        nn.init.normal_(self.proj.weight, std=0.02)
        if config.bias:
            nn.init.zeros_(self.proj.bias)

    def logits(self, h: Tensor) -> Tensor:
        """h (..., D) -> (..., V + 1): the vocabulary, then END."""
        return self.proj(h)

    def nll(self, h: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood in nats.  h (N, D), targets (N,) -> (N,)."""
        self._check_targets(targets)
        return F.cross_entropy(self.logits(h).float(), targets, reduction="none")

    def loss(self, h: Tensor, targets: Tensor, loss_mask: Tensor | None = None,
             weights: Tensor | None = None) -> tuple[Tensor, dict]:
        """Mean cross-entropy over positions where loss_mask is True.  h (..., D), targets (...).
        ``weights`` (...) weight each token in the reported NLL sum and count (not in the loss)."""
        if loss_mask is not None:
            h, targets = h[loss_mask], targets[loss_mask]
            weights = None if weights is None else weights[loss_mask]
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        self._check_targets(targets)
        logits = self.logits(h).float()
        nll = F.cross_entropy(logits, targets, reduction="none")
        loss = nll if self.config.label_smoothing == 0 else F.cross_entropy(
            logits, targets, reduction="none", label_smoothing=self.config.label_smoothing)
        loss = loss.mean() if loss.numel() else logits.sum() * 0
        if self.config.z_loss:
            loss = loss + self.config.z_loss * (torch.logsumexp(logits, -1).pow(2).mean() if len(logits) else 0)
        if weights is not None:
            w = weights.reshape(-1).float()
            return loss, {"nll_sum": (nll.detach() * w).sum(), "count": w.sum()}
        return loss, {"nll_sum": nll.detach().sum(), "count": torch.tensor(nll.numel(), device=h.device)}

    def sample(self, h: Tensor, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, h_uncond: Tensor | None = None,
               cfg_scale: float = 1.0, allowed: Tensor | None = None,
               with_logprob: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """h (..., D) -> ids (...).  With h_uncond, logits are guided: u + s * (c - u).  ``allowed``
        (..., V + 1) bool keeps only those outputs (the scheduler allows END only where a segment may end).
        ``with_logprob``: (ids, log-probability of each id under the distribution it was drawn from)."""
        logits = self.logits(h)
        if h_uncond is not None and cfg_scale != 1.0:
            logits = cfg_combine(logits.float(), self.logits(h_uncond).float(), cfg_scale)
        if allowed is not None:
            logits = logits.float().masked_fill(~allowed, float("-inf"))
        return sample_logits(logits, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p,
                             with_logprob=with_logprob)

    def _check_targets(self, targets: Tensor) -> None:
        # data are validated when encoded; on accelerators skip the host sync this check would cost
        if targets.device.type == "cpu" and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.spec.head_size):
            raise SeqgenError(f"targets outside the vocabulary of {self.spec.name!r}: got "
                              f"[{int(targets.min())}, {int(targets.max())}], expected 0 <= id < {self.spec.head_size} "
                              "(vocabulary + END)")
