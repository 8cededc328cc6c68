"""SeqModel = per-domain input embeddings + one backbone + per-domain heads, routed by modality.

A model over several domains (image and text, say) keeps one embedding table and one head per domain
(modality-specific heads, as in Orthus) and routes each position by ``TokenSequence.modality`` on the
way in and by ``Batch.target_modality`` on the way out: the prediction made at the last text token of a
prompt is an image token, so it goes to the image head.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .masks import MaskSpec
from .types import NUM_AXES, Batch, DomainSpec, SeqgenError, TokenSequence


class TargetPositionEmbedding(nn.Module):
    """Learned embedding of the coordinates of the token to be predicted next (RAR's target-aware
    positional embedding, Yu et al., 2024): one table per axis, summed.  It tells a random-order model
    *where* the next token goes."""

    def __init__(self, dim: int, max_pos: int):
        super().__init__()
        self.max_pos = max_pos
        self.tables = nn.ModuleList(nn.Embedding(max_pos, dim) for _ in range(NUM_AXES))
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    def forward(self, target_pos: Tensor) -> Tensor:
        if target_pos.device.type == "cpu" and target_pos.numel() and int(target_pos.max()) >= self.max_pos:
            raise SeqgenError(f"target position {int(target_pos.max())} exceeds the model's max_target_pos "
                              f"({self.max_pos}); raise model.max_target_pos")
        tp = target_pos.clamp(min=0)
        return sum(self.tables[a](tp[..., a]) for a in range(NUM_AXES))


class SeqModel(nn.Module):
    def __init__(self, specs: list[DomainSpec], backbone: nn.Module, heads: dict[str, nn.Module],
                 target_pos: bool = False, max_target_pos: int = 4096):
        super().__init__()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SeqgenError(f"domain names must be unique inside one model; got {names}")
        unknown = set(heads) - set(names)
        if unknown:
            raise SeqgenError(f"heads given for unknown domains {sorted(unknown)}; domains are {names}")
        self.specs = list(specs)
        self.backbone = backbone
        D = backbone.dim
        self.embeds = nn.ModuleDict()
        for s in specs:
            if s.vocab_size is not None:
                emb = nn.Embedding(s.table_size, D)
                nn.init.normal_(emb.weight, std=0.02)
            else:
                emb = nn.Linear(s.value_dim, D)
            self.embeds[s.name] = emb
        self.heads = nn.ModuleDict(heads)
        self.target_pos = TargetPositionEmbedding(D, max_target_pos) if target_pos else None

    # ------------------------------------------------------------------ helpers
    def domain_index(self, name: str) -> int:
        for i, s in enumerate(self.specs):
            if s.name == name:
                return i
        raise SeqgenError(f"model has no domain {name!r}; it has {[s.name for s in self.specs]}")

    def head_for(self, index: int) -> nn.Module:
        name = self.specs[index].name
        if name not in self.heads:
            raise SeqgenError(f"model has no head for domain {name!r}: it cannot generate that domain")
        return self.heads[name]

    def init_cache(self, batch_size: int, max_len: int):
        return self.backbone.init_cache(batch_size, max_len)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ forward
    def embed(self, seq: TokenSequence, target_pos: Tensor | None = None) -> Tensor:
        """(B, L) tokens -> (B, L, D).  Each position goes through its own domain's table."""
        x = None
        for k, s in enumerate(self.specs):
            emb = self.embeds[s.name]
            if s.vocab_size is not None:
                if seq.ids is None:
                    raise SeqgenError(f"domain {s.name!r} is discrete but the sequence has no ids")
                e = emb(seq.ids.clamp(0, s.table_size - 1))
            else:
                if seq.values is None:
                    raise SeqgenError(f"domain {s.name!r} is continuous but the sequence has no values")
                e = emb(seq.values)
            if len(self.specs) == 1:
                x = e
            else:
                sel = (seq.modality == k).unsqueeze(-1)
                x = torch.where(sel, e, 0.0) if x is None else torch.where(sel, e, x)
        if self.target_pos is not None:
            if target_pos is None:
                raise SeqgenError("this model conditions on target positions (random-order AR); pass target_pos")
            x = x + self.target_pos(target_pos)
        return x

    def forward(self, seq: TokenSequence, *, mask: MaskSpec, cache: Any = None, target_pos: Tensor | None = None,
                attn_impl: str | None = None, padded: bool = True) -> Tensor:
        """Hidden states (B, L, D) for every position of ``seq``.  ``padded=False`` promises that every
        token is valid (decoding steps), so the backbone need not inspect ``seq.valid``."""
        x = self.embed(seq, target_pos)
        kwargs = {"attn_impl": attn_impl} if attn_impl is not None else {}
        return self.backbone(x, pos=seq.pos, mask=mask, cache=cache, valid=seq.valid if padded else None, **kwargs)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-mean loss over ``batch.loss_mask``; metrics hold per-domain NLL sums (nats) and counts."""
        h = self(batch.inputs, mask=batch.mask, target_pos=batch.target_pos)
        return self.loss_from_hidden(h, batch)

    def loss_from_hidden(self, h: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, count, metrics = h.new_zeros(()), 0, {}
        for k, s in enumerate(self.specs):
            if s.name not in self.heads:
                continue
            sel = batch.loss_mask if len(self.heads) == 1 else batch.loss_mask & (batch.target_modality == k)
            loss_k, m = self.heads[s.name].loss(h[sel], batch.targets[sel])
            n = m["count"]
            total = total + loss_k * n
            count = count + n
            metrics[f"{s.name}/nll_sum"] = m["nll_sum"]
            metrics[f"{s.name}/count"] = n
        if isinstance(count, int):
            raise SeqgenError("the model has no head for any target domain of this batch")
        return total / count.clamp(min=1), metrics

    def predict_head_index(self, target_modality: Tensor) -> int:
        """The single head index a decoding step uses (all rows must predict the same domain)."""
        if len(self.heads) == 1:  # no need to look (and to sync with the device)
            return next(i for i, s in enumerate(self.specs) if s.name in self.heads)
        m = target_modality.reshape(-1)
        k = int(m[0])
        if m.numel() > 1 and bool((m != k).any()):
            raise SeqgenError("one decoding step must predict one domain for all rows")
        return k
