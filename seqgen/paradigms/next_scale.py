"""Next-scale prediction (VAR: Tian et al., 2024, "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction").

A multi-scale domain (``DomainSpec.scales``, e.g. a residual multi-scale tokenizer with the ladder
1, 2, 3, 4, 5, 7 for a 7x7 grid) lays an item out scale after scale, raster inside each; every token's
coordinates put it on the shared final grid (the adapter's job).  All tokens of one scale are
predicted in one forward pass, from everything coarser.

Training (``prepare``).  The target segment's input is, for every token of scale k >= 2, the token of
scale k - 1 at its nearest parent cell (the upsampled previous scale, VAR's teacher forcing) at the
token's own coordinates; the position predicts its own token (in place).  A 1x1 first scale is
predicted from the token before the segment (the BEGIN id after the condition, like VAR's start
token) and then fed as a token of its own; a larger first scale is a block of MASK ids predicting
itself.  Attention is scale-block-causal: ``causal | within(scale)``, every token sees every earlier
token and the whole of its own scale, none of a later scale (gradient leak test).  The loss is the
mean cross-entropy over all tokens of all scales; its NLL is exact for the factorisation
p(scale 1) p(scale 2 | 1) ... with the tokens of a scale independent given the coarser ones: a
likelihood of the multi-scale codes (all scales), not of the final grid alone.

Generation (``fill``).  The prefill's last hidden state gives the 1x1 scale; every further scale is
one forward pass of its parent block (the first of them also carries the previous 1x1 token) with
the earlier scales in the KV cache: K passes in all for K scales (6 for 1, 2, 3, 4, 5, 7).
Guidance doubles the rows as in ``ar``; ``cfg_schedule: linear`` ramps the scale over the scales.
Other targets (a caption of a hybrid run) are generated next-token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..examples import Piece
from ..generate import DATA, Plan
from ..masks import causal, full, within
from ..registry import register_paradigm
from ..sampling import cfg_scale_at
from ..types import DomainSpec, SeqgenError, TokenSequence
from .ar import COND_ATTENTION, AutoRegressive
from .masked import InPlace, flat_in_place


def scale_parents(scales: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
    """(scale index (L,), parent (L,)) of every token of a multi-scale layout: the index, in layout order,
    of its nearest parent cell in the previous scale (-1 for the first scale)."""
    scale_of, parent, start, prev = [], [], 0, None
    for k, (h, w) in enumerate(scales):
        i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        i, j = i.reshape(-1), j.reshape(-1)
        scale_of.append(torch.full((h * w,), k))
        if prev is None:
            parent.append(torch.full((h * w,), -1))
        else:
            ph, pw, pstart = prev
            parent.append(pstart + (i * ph // h) * pw + (j * pw // w))
        prev = (h, w, start)
        start += h * w
    return torch.cat(scale_of), torch.cat(parent)


@register_paradigm("next_scale")
class NextScale(AutoRegressive):
    @dataclass
    class Config:
        cond_dropout: float = 0.1
        """probability of replacing the condition by the null condition (for guidance)"""
        cond_attention: str = "causal"
        """causal, or bidirectional: each condition segment's tokens see each other both ways"""

        @classmethod
        def tiny(cls) -> "NextScale.Config":
            return cls()

    def __init__(self, config: "NextScale.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.cond_attention not in COND_ATTENTION:
            raise SeqgenError(f"next_scale: unknown cond_attention {cfg.cond_attention!r}; known: {', '.join(COND_ATTENTION)}")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise SeqgenError(f"next_scale: cond_dropout must be in [0, 1); got {cfg.cond_dropout}")
        self._parents: dict = {}

    needs_target_pos = False
    nll_kind = "exact, of the multi-scale codes (every scale), not of the final grid alone"

    def permute_rate(self, progress: float) -> float:
        return 0.0

    def parents(self, spec: DomainSpec) -> tuple[Tensor, Tensor]:
        if spec.scales not in self._parents:
            self._parents[spec.scales] = scale_parents(spec.scales)
        return self._parents[spec.scales]

    @staticmethod
    def _multiscale(spec: DomainSpec, variable: bool, open_: bool) -> bool:
        if spec.scales is None:
            return False
        if variable or open_:
            raise SeqgenError(f"next_scale: domain {spec.name!r} has scales but variable-length segments")
        return True

    # ------------------------------------------------------------------ training
    def prepare(self, examples: list[list[Piece]], *, specs: list[DomainSpec], generator: torch.Generator | None = None,
                progress: float = 0.0, train: bool = True, null: bool = False, pack: int = 0):
        rows, null_cond = self.drop_conditions(examples, specs, generator, train, null)

        def arrange(p: Piece):
            spec = specs[p.modality]
            if p.role != "target" or not self._multiscale(spec, p.variable, p.open):
                return None
            return self.arrange(p, spec)
        flats = [flat_in_place(pieces, specs, arrange)[0] for pieces in rows]
        return self.collate(flats, pack=pack, null_cond=null_cond)

    def arrange(self, p: Piece, spec: DomainSpec) -> tuple[Piece, InPlace]:
        """A multi-scale target piece -> (the piece of inputs fed to ``flatten``, how it trains in place)."""
        scale_of, parent = self.parents(spec)
        L = len(parent)
        if p.length != L:
            raise SeqgenError(f"next_scale: a {spec.name!r} item must have {L} tokens (scales {list(spec.scales)}); "
                              f"got {p.length}")
        if p.values is not None or spec.vocab_size is None:
            raise SeqgenError("next_scale: continuous multi-scale tokens are not supported (discrete codes only)")
        inputs = torch.where(parent >= 0, p.ids[parent.clamp(min=0)], torch.full_like(p.ids, spec.mask_id))
        groups = scale_of.clone()
        shifted = torch.zeros(L, dtype=torch.bool)
        if spec.scales[0] == (1, 1):  # the 1x1 scale: predicted from the token before, then fed as itself
            inputs[0] = p.ids[0]
            groups[0] = -1
            shifted[0] = True
        a = replace(p, ids=inputs)
        inf = InPlace(p.ids, None, ~shifted, 1.0, groups, shifted)
        return a, inf

    # ------------------------------------------------------------------ sampling
    def generation_orders(self, plan_targets: list, order: str, generator=None) -> None:
        if order != "raster":
            raise SeqgenError(f"next_scale: sampling order {order!r} does not apply (scales go coarse to fine)")
        return None

    @torch.no_grad()
    def fill(self, model, plan: Plan, cache, h: Tensor, *, specs: list[DomainSpec],
             generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             max_context: int | None = None, progress=None, steps: int | None = None) -> Plan:
        targets = plan.targets[0]
        multi = [specs[t.modality].scales is not None for t in targets]
        if not any(multi):
            return super().fill(model, plan, cache, h, specs=specs, generator=generator, temperature=temperature,
                                top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                max_context=max_context, progress=progress, steps=steps)
        if len(targets) != 1:
            raise SeqgenError(f"next_scale: generating {len(targets)} segments in one example is not supported")
        if steps is not None:
            raise SeqgenError("next_scale: the number of passes is the number of scales; steps= does not apply")
        dev = h.device
        R = plan.rows
        B = R // 2 if plan.guided else R
        k = targets[0].modality
        spec, head = specs[k], model.head_for(k)
        scale_of, parent = (t.to(dev) for t in self.parents(spec))
        L = len(parent)
        sel = (plan.slot_target == 0) & (plan.slot_kind == DATA)
        slots = sel.nonzero()[:, 1].view(R, L).to(dev)
        rows = torch.arange(R, device=dev).unsqueeze(1)
        pos = plan.slot_pos.to(dev)[rows, slots]
        ids = torch.zeros(R, L, dtype=torch.long, device=dev)
        allowed = torch.ones(spec.head_size, dtype=torch.bool, device=dev)
        allowed[spec.end_id] = False
        K = len(spec.scales)
        starts = [0] + torch.tensor(spec.scale_lengths).cumsum(0).tolist()

        def draw(hk: Tensor, step: int) -> Tensor:
            """hk (R, n, D) -> ids (B, n), drawn once from the (guided) conditional rows."""
            n = hk.shape[1]
            s = cfg_scale_at(cfg_scale, step, K, cfg_schedule)
            hu = hk[B:].reshape(B * n, -1) if plan.guided else None
            out = head.sample(hk[:B].reshape(B * n, -1), h_uncond=hu, cfg_scale=s, generator=generator,
                              temperature=temperature, top_k=top_k, top_p=top_p, allowed=allowed.expand(B * n, -1))
            return out.view(B, n)

        def put(k_: int, drawn: Tensor) -> None:
            ids[:B, starts[k_]:starts[k_ + 1]] = drawn
            if plan.guided:
                ids[B:, starts[k_]:starts[k_ + 1]] = drawn

        first = 0
        if spec.scales[0] == (1, 1):  # the prompt's last hidden state predicts the 1x1 scale
            put(0, draw(h.unsqueeze(1), 0))
            first = 1
            if progress is not None:
                progress(1, K)
        for kk in range(first, K):
            a, b = starts[kk], starts[kk + 1]
            inputs = torch.where(parent[a:b] >= 0, ids[:, parent[a:b].clamp(min=0)], spec.mask_id)
            feed_ids, feed_pos = inputs, pos[:, a:b]
            if kk == 1 and first == 1:  # the 1x1 token goes in first, causally, then the scale's block
                feed_ids = torch.cat([ids[:, :1], inputs], 1)
                feed_pos = torch.cat([pos[:, :1], feed_pos], 1)
                group = torch.full((R, cache.length + 1 + b - a), -1, dtype=torch.long, device=dev)
                group[:, cache.length + 1:] = 1
                mask = causal() | within(group)
            else:
                mask = full()
            n = feed_ids.shape[1]
            seq = TokenSequence(ids=feed_ids, values=None, pos=feed_pos,
                                modality=torch.full((R, n), k, dtype=torch.long, device=dev),
                                valid=torch.ones(R, n, dtype=torch.bool, device=dev))
            hk = model(seq, mask=mask, cache=cache, padded=False)[:, n - (b - a):]
            put(kk, draw(hk, kk))
            if progress is not None:
                progress(kk + 1, K)
        S = plan.slot_pos.shape[1]
        out_ids = torch.zeros(R, S, dtype=torch.long, device=dev)
        filled = torch.zeros(R, S, dtype=torch.bool, device=dev)
        out_ids[rows, slots] = ids
        filled[rows, slots] = True
        plan.out_ids, plan.filled = out_ids, filled
        return plan
