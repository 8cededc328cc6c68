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


class TokenShuffle(nn.Module):
    """Token-Shuffle (Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image Generation with
    Autoregressive Models"): ``group`` consecutive tokens (an s x s window of an image laid out window by
    window, group = s^2) share one backbone position.  ``fold`` concatenates their embeddings along
    channels and maps them to one (an MLP, the paper's shuffle); ``unfold`` maps a backbone state back to
    ``group`` states, one per token (unshuffle).  Padding tokens are zeroed before folding.

    The token-level reshape is an exact inverse (``split(merge(x)) == x``, tested); the MLPs around it
    are learned."""

    def __init__(self, dim: int, group: int):
        super().__init__()
        if group < 2:
            raise SeqgenError(f"token shuffle needs a group of >= 2 tokens, got {group}")
        self.group = group
        self.fold = nn.Sequential(nn.Linear(group * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.unfold = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, group * dim))

    def merge(self, t: Tensor) -> Tensor:
        """(B, L, ...) -> (B, L / group, group, ...): the tokens of each position (exact, a view)."""
        B, L = t.shape[:2]
        if L % self.group:
            raise SeqgenError(f"token shuffle: {L} tokens are not a whole number of {self.group}-token groups")
        return t.reshape(B, L // self.group, self.group, *t.shape[2:])

    @staticmethod
    def split(t: Tensor) -> Tensor:
        """(B, G, group, ...) -> (B, G * group, ...): the inverse of ``merge``."""
        return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])

    def shuffle(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """(B, L, D) token embeddings -> (B, L / group, D) position embeddings."""
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)
        g = self.merge(x)
        return self.fold(g.reshape(*g.shape[:2], -1)).to(x.dtype)  # the residual stream keeps the embeddings' dtype

    def unshuffle(self, h: Tensor) -> Tensor:
        """(B, G, D) backbone states -> (B, G * group, D), one per token."""
        B, G, D = h.shape
        return self.split(self.unfold(h).to(h.dtype).view(B, G, self.group, D))


class SeqModel(nn.Module):
    """specs: the run's domains in modality order; heads: domain name -> head (target domains only);
    loss_weights: domain name -> weight of that head's token-mean loss (default 1);
    features: domain name -> (V, F) features of its vocabulary ids (an adapter's ``token_features``): an
    id is embedded as its row plus a learned linear map of its features (special ids: the row only);
    token_group: Token-Shuffle, tokens per backbone position (1: none; ``TokenShuffle``)."""

    def __init__(self, specs: list[DomainSpec], backbone: nn.Module, heads: dict[str, nn.Module],
                 target_pos: bool = False, max_target_pos: int = 4096, loss_weights: dict[str, float] | None = None,
                 features: dict[str, Tensor] | None = None, token_group: int = 1):
        super().__init__()
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SeqgenError(f"domain names must be unique inside one model; got {names}")
        unknown = set(heads) - set(names)
        if unknown:
            raise SeqgenError(f"heads given for unknown domains {sorted(unknown)}; domains are {names}")
        bad = set(loss_weights or {}) - set(heads)
        if bad:
            raise SeqgenError(f"loss_weights for {sorted(bad)}, which have no head; heads: {sorted(heads)}")
        self.specs = list(specs)
        self.loss_weights = {n: float((loss_weights or {}).get(n, 1.0)) for n in heads}
        self.backbone = backbone
        D = backbone.dim
        self.embeds = nn.ModuleDict()
        self.value_embeds = nn.ModuleDict()
        for s in specs:
            emb = nn.Embedding(s.table_size, D)  # vocabulary + special ids (special ids only, if continuous)
            nn.init.normal_(emb.weight, std=0.02)
            self.embeds[s.name] = emb
            if s.value_dim is not None:
                self.value_embeds[s.name] = nn.Linear(s.value_dim, D)
        self.feature_embeds = nn.ModuleDict()
        for name, f in (features or {}).items():
            s = self.specs[self.domain_index(name)]
            if f.ndim != 2 or s.vocab_size is None or f.shape[0] != s.vocab_size:
                raise SeqgenError(f"features of domain {name!r} must be (vocab_size={s.vocab_size}, F); got "
                                  f"{tuple(f.shape)}")
            self.register_buffer(f"features_{name}", f.float().clone(), persistent=True)
            self.feature_embeds[name] = nn.Linear(f.shape[1], D, bias=False)
            nn.init.normal_(self.feature_embeds[name].weight, std=0.02)
        self.heads = nn.ModuleDict(heads)
        self.target_pos = TargetPositionEmbedding(D, max_target_pos) if target_pos else None
        if token_group > 1 and target_pos:
            raise SeqgenError("token shuffle and random-order target positions cannot be combined")
        self.shuffle = TokenShuffle(D, token_group) if token_group > 1 else None

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
        """(B, L) tokens -> (B, L, D).  Each position goes through its own domain's table (value tokens of
        a continuous domain, id -1, through its linear embedding).  An id outside its domain's table is
        an error, never clamped."""
        if seq.ids is None:
            raise SeqgenError("the sequence has no ids (continuous tokens carry id -1, special tokens their id)")
        x = None
        check = seq.ids.device.type == "cpu"  # on accelerators data are validated when they enter the runtime
        single = len(self.specs) == 1
        for k, s in enumerate(self.specs):
            sel = None if single else (seq.modality == k)
            ids = seq.ids if single else torch.where(sel, seq.ids, 0)
            is_value = ids < 0
            if check and ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                if hi >= s.table_size or (lo < 0 and s.value_dim is None):
                    raise SeqgenError(f"ids outside the table of domain {s.name!r}: got [{lo}, {hi}], expected "
                                      f"0 <= id < {s.table_size} (vocabulary {s.vocab_size} + special ids)")
            e = self.embeds[s.name](ids.clamp(min=0))
            if s.name in self.feature_embeds:
                f = getattr(self, f"features_{s.name}")
                in_vocab = (ids >= 0) & (ids < s.vocab_size)
                fe = self.feature_embeds[s.name](f[torch.where(in_vocab, ids, 0)].to(e.dtype))
                e = e + fe * in_vocab.unsqueeze(-1).to(e.dtype)
            if s.value_dim is not None:
                if seq.values is not None:
                    e = torch.where(is_value.unsqueeze(-1), self.value_embeds[s.name](seq.values.to(e.dtype)), e)
                elif bool((is_value if sel is None else is_value & sel).any()):
                    # no values at all is fine when no token is a value token (a null condition stands in for
                    # the only continuous segment); value tokens without values are an error
                    raise SeqgenError(f"domain {s.name!r} is continuous but the sequence has no values")
            x = e if x is None else torch.where(sel.unsqueeze(-1), e, x)
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
        if self.shuffle is None:
            return self.backbone(x, pos=seq.pos, mask=mask, cache=cache, valid=seq.valid if padded else None, **kwargs)
        # Token-Shuffle: the backbone sees one position per group (at its last token's coordinates; a
        # group of a padded row is valid when any of its tokens is)
        merge = self.shuffle.merge
        valid = seq.valid if padded else None
        h = self.backbone(self.shuffle.shuffle(x, valid), pos=merge(seq.pos)[:, :, -1], mask=mask, cache=cache,
                          valid=None if valid is None else merge(valid).any(-1), **kwargs)
        return self.shuffle.unshuffle(h)

    def loss(self, batch: Batch, denominators: dict[str, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-mean loss over ``batch.loss_mask``; metrics hold per-domain NLL sums (nats) and counts.
        ``denominators`` (domain -> target tokens of the whole optimizer step, ``target_counts`` summed
        over its micro-batches) turns each head's mean into this micro-batch's share of the step's mean,
        so that the micro-batch losses of one step add up to the loss of one large batch exactly."""
        h = self(batch.inputs, mask=batch.mask, target_pos=batch.target_pos)
        return self.loss_from_hidden(h, batch, denominators)

    def target_counts(self, batch: Batch) -> dict[str, int]:
        """Target tokens per domain with a head (what each head's token mean divides by)."""
        return {s.name: int(self._selects(batch, k).sum()) for k, s in enumerate(self.specs) if s.name in self.heads}

    @staticmethod
    def _selects(batch: Batch, k: int) -> Tensor:
        """Positions whose target is counted for domain ``k``."""
        return batch.loss_mask & (batch.target_modality == k)

    def loss_from_hidden(self, h: Tensor, batch: Batch,
                         denominators: dict[str, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum over heads of weight x (token-mean loss of that head), or with ``denominators`` of weight x
        (this batch's share of the step's token mean).  Metrics per domain: NLL sum (nats), token count,
        and raw units (when the batch carries them); with ``batch.weights`` (an evidence bound's per-token
        weights) the NLL sum, the count and the units are weighted sums."""
        total, any_head, metrics = h.new_zeros(()), False, {}
        for k, s in enumerate(self.specs):
            if s.name not in self.heads:
                continue
            sel = self._selects(batch, k)
            if s.vocab_size is None:
                if batch.target_values is None:
                    if bool(sel.any()):
                        raise SeqgenError(f"domain {s.name!r} is continuous but the batch has no value targets")
                    continue  # no target of this domain here (an image -> caption batch with the image dropped)
                targets = batch.target_values[sel]
            else:
                targets = batch.targets[sel]
            w = None if batch.weights is None else batch.weights[sel]
            loss_k, m = self.heads[s.name].loss(h[sel], targets) if w is None else \
                self.heads[s.name].loss(h[sel], targets, weights=w)
            if denominators is not None:
                loss_k = loss_k * (m["count"] / max(int(denominators.get(s.name, 0)), 1))
            total = total + self.loss_weights[s.name] * loss_k
            any_head = True
            metrics[f"{s.name}/nll_sum"] = m["nll_sum"]
            metrics[f"{s.name}/count"] = m["count"]
            metrics[f"{s.name}/loss"] = loss_k.detach()
            if batch.units is not None:
                metrics[f"{s.name}/units"] = (batch.units[sel] if w is None else batch.units[sel] * w).sum()
        if not any_head:
            raise SeqgenError("the model has no head for any target domain of this batch")
        return total, metrics
