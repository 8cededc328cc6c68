"""Masked parallel decoding: MaskGIT for discrete tokens, MAR's masked arrangement for continuous ones.

References: MaskGIT (Chang et al., 2022, "MaskGIT: Masked Generative Image Transformer"), MaskGIL /
MUSE (cosine schedule, guidance), MAR (Li et al., 2024, "Autoregressive Image Generation without
Vector Quantization": random order, several continuous tokens per step, a per-token diffusion head),
Show-o (Xie et al., 2024: next-token text and masked image tokens in one sequence and one loss).

Which segments.  Every target segment of a *masked domain* (``domains``: names from the run's
``domains:`` table; empty = every fixed-length target) is arranged in place; every other target (a
caption, any variable-length segment) stays next-token, so one batch may train both (Show-o's
arrangement: ``ar`` for captions, ``masked`` for images, one run).

Training (``prepare``).  For each masked segment of n tokens: u ~ U(0, 1), mask ratio r = gamma(u)
with gamma(u) = cos(pi u / 2) (cosine, MaskGIT sec. 3.2) or 1 - u (linear), k = max(1, ceil(r n))
positions chosen uniformly are replaced by the domain's MASK id (a continuous token: the MASK row, its
values zeroed), and the model predicts each masked token at its own position.  Attention is
bidirectional inside the segment and causal to everything before it (``causal | within``); the loss
counts the masked positions only.

Evaluation (``prepare(train=False)``).  MaskGIT defines no likelihood; this paradigm reports the
any-order evidence bound instead (ARDM, Hoogeboom et al., 2022; RADD, Ou et al., 2024):
-log p(x) <= E_{k ~ U{1..n}, |M| = k} [(n / k) sum_{i in M} -log p(x_i | x outside M)].  One draw per
image (fixed seed, so the figure is deterministic), the masked tokens' NLL weighted n / k
(``Batch.weights``): an unbiased estimate of an upper bound, reported as bits like the AR models' exact
NLL.  Next-token segments keep their exact NLL.

Generation (``fill``).  The scheduler prefills the prompt (condition + BEGIN); the segment starts all
MASK.  Step t of N runs the segment's n tokens through the model with the prompt in the KV cache (the
cache is rolled back after every step), then
  * ``confidence`` (discrete, MaskGIT): the head draws a token at every masked position and returns its
    log-probability; confidence = log p + tau_t * Gumbel noise, tau_t = choice_temperature * (1 - (t+1)/N)
    (annealed); the most confident masked positions are kept so that floor(n gamma((t+1)/N)) stay
    masked (at least one is revealed per step, all at the last);
  * ``random`` (MAR; the only choice for continuous tokens, whose head has no log-probability): a
    random order is drawn per sample and each step reveals the next tokens of it, the same counts, and
    the head draws only those tokens.
A kept token is never masked again.  Guidance doubles the rows as in ``ar`` (the null rows carry the
same tokens), at a constant scale or ramped over the steps (``cfg_schedule: linear``, as in MUSE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..examples import Flat, Piece, flatten
from ..generate import DATA, Plan
from ..masks import causal, full, within
from ..registry import register_paradigm
from ..sampling import cfg_scale_at
from ..types import DomainSpec, SeqgenError, TokenSequence
from .ar import COND_ATTENTION, AutoRegressive, _rand, random_orders

SCHEDULES = ("cosine", "linear")
SELECTIONS = ("confidence", "random")
EVAL_SEED = 20240613  # masks of the evidence bound: the same for every evaluation


def mask_ratio(u: Tensor | float, schedule: str = "cosine") -> Tensor | float:
    """gamma(u): the fraction of a segment still masked at time u in [0, 1] (1 at u = 0, 0 at u = 1)."""
    if schedule == "cosine":
        return torch.cos(u * math.pi / 2) if torch.is_tensor(u) else math.cos(u * math.pi / 2)
    if schedule == "linear":
        return 1 - u
    raise SeqgenError(f"masked: unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def _gumbel(shape, generator, device) -> Tensor:
    u = _rand(shape, generator, device).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


@dataclass
class InPlace:
    """How one piece's tokens are trained in place: their own ids / values (the piece fed to ``flatten``
    holds the inputs: MASK ids, a parent scale ...), which of them are scored, the NLL weight of the
    scored ones, and optionally a bidirectional group per token (default: the whole piece is one)."""

    ids: Tensor  # (n,)
    values: Tensor | None  # (n, C)
    scored: Tensor  # (n,) bool
    weight: float = 1.0
    groups: Tensor | None = None  # (n,) long; tokens of one group (>= 0) see each other both ways
    shifted: Tensor | None = None  # (n,) bool: tokens trained next-token instead (predicted by the token before)


GROUP_BASE = 1 << 20  # piece-local groups are offset past every piece index (condition groups)


def mark_in_place(f: Flat, pieces: list[Piece], info: list[InPlace | None]) -> None:
    """Record, per flat token, what ``AutoRegressive.collate`` needs for in-place targets: the token's own
    id / values, whether it is scored, its bidirectional group, and its weight in an evidence bound."""
    T = f.length
    inplace = torch.zeros(T, dtype=torch.bool)
    scored = torch.zeros(T, dtype=torch.bool)
    bidir = torch.full((T,), -1, dtype=torch.long)
    weight = torch.ones(T)
    orig_ids = f.ids.clone()
    orig_values = None if f.values is None else f.values.clone()
    start = 0
    for j, (p, inf) in enumerate(zip(pieces, info)):
        n = p.length
        first = start if p.open else start + 1
        if inf is not None:
            sl = slice(first, first + n)
            inplace[sl], scored[sl], weight[sl] = True, inf.scored, inf.weight
            if inf.shifted is not None:
                inplace[sl] = ~inf.shifted
            if inf.groups is None:
                bidir[sl] = j
            else:
                bidir[sl] = torch.where(inf.groups >= 0, GROUP_BASE * (j + 1) + inf.groups, -1)
            orig_ids[sl] = inf.ids
            if orig_values is not None:
                orig_values[sl] = 0 if inf.values is None else inf.values.to(orig_values.dtype)
        start += n if p.open else n + 2
    f.extras.update(inplace=inplace, masked=scored, bidir=bidir, weight=weight, orig_ids=orig_ids)
    if orig_values is not None:
        f.extras["orig_values"] = orig_values


def flat_in_place(pieces: list[Piece], specs: list[DomainSpec], arrange) -> tuple[Flat, list[Piece]]:
    """Flatten one example whose pieces ``arrange(piece)`` may rearrange for in-place training: it returns
    None (keep the piece) or (the piece of inputs, its ``InPlace`` record).  -> (the flat example, the
    pieces as flattened)."""
    arranged, info = [], []
    for p in pieces:
        out = arrange(p)
        arranged.append(p if out is None else out[0])
        info.append(None if out is None else out[1])
    f = flatten(arranged, specs)
    if any(x is not None for x in info):
        mark_in_place(f, arranged, info)
    return f, arranged


@register_paradigm("masked")
class Masked(AutoRegressive):
    @dataclass
    class Config:
        domains: list[str] = field(default_factory=list)
        """target domains arranged masked (names of the run's domains); empty: every fixed-length target.
        Other targets are trained and generated next-token (Show-o's hybrid).  Condition segments of the
        listed domains are read bidirectionally too (Show-o's omni-attention: an image attends within
        itself both ways whether it is generated or read)"""
        schedule: str = "cosine"
        """mask-ratio schedule gamma: cosine (MaskGIT) or linear"""
        steps: int = 8
        """decoding steps per segment (``seqgen sample --sample.steps`` overrides)"""
        selection: str = "confidence"
        """which masked tokens a step keeps: confidence (MaskGIT) or random (MAR); continuous tokens
        always use random (their head defines no log-probability)"""
        choice_temperature: float = 4.5
        """scale of the Gumbel noise on confidences, annealed linearly to 0 over the steps (MaskGIT)"""
        cond_dropout: float = 0.1
        """probability of replacing the condition by the null condition (for guidance)"""
        cond_attention: str = "causal"
        """causal, or bidirectional: each condition segment's tokens see each other both ways"""

        @classmethod
        def tiny(cls) -> "Masked.Config":
            return cls(steps=4)

    def __init__(self, config: "Masked.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.schedule not in SCHEDULES:
            raise SeqgenError(f"masked: unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
        if cfg.selection not in SELECTIONS:
            raise SeqgenError(f"masked: unknown selection {cfg.selection!r}; known: {', '.join(SELECTIONS)}")
        if cfg.steps < 1:
            raise SeqgenError(f"masked: steps must be >= 1, got {cfg.steps}")
        if cfg.choice_temperature < 0:
            raise SeqgenError(f"masked: choice_temperature must be >= 0, got {cfg.choice_temperature}")
        if cfg.cond_attention not in COND_ATTENTION:
            raise SeqgenError(f"masked: unknown cond_attention {cfg.cond_attention!r}; known: {', '.join(COND_ATTENTION)}")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise SeqgenError(f"masked: cond_dropout must be in [0, 1); got {cfg.cond_dropout}")

    needs_target_pos = False
    nll_kind = "upper bound: the any-order evidence bound of the masked segments, one random mask per item"

    def permute_rate(self, progress: float) -> float:
        return 0.0  # next-token segments of a hybrid run are trained in raster order

    # ------------------------------------------------------------------ which segments
    def _masked_domain(self, spec: DomainSpec, variable: bool, open_: bool) -> bool:
        names = self.config.domains
        if names and spec.name in names and (variable or open_):
            raise SeqgenError(f"masked: domain {spec.name!r} has variable-length (or stream) segments; masked "
                              "decoding needs a fixed-length layout (leave it out of paradigm.domains)")
        return not (variable or open_) and (not names or spec.name in names)

    def is_masked_piece(self, p: Piece, specs: list[DomainSpec]) -> bool:
        return p.role == "target" and self._masked_domain(specs[p.modality], p.variable, p.open)

    # ------------------------------------------------------------------ training
    def prepare(self, examples: list[list[Piece]], *, specs: list[DomainSpec], generator: torch.Generator | None = None,
                progress: float = 0.0, train: bool = True, null: bool = False, pack: int = 0):
        """Arrange a batch: masked segments in place (a random mask per segment), the rest next-token.
        ``train=False`` draws the masks of the evidence bound from a fixed seed and weights the NLL n / k."""
        if not train and generator is None:
            generator = torch.Generator().manual_seed(EVAL_SEED)
        rows, null_cond = self.drop_conditions(examples, specs, generator, train, null)
        flats, any_masked = [], False

        def arrange(p: Piece):
            nonlocal any_masked
            if not self.is_masked_piece(p, specs):
                return None
            n = p.length
            if n == 0:
                raise SeqgenError("masked: a target segment has no tokens")
            if train:
                r = float(mask_ratio(float(_rand((1,), generator, "cpu")), self.config.schedule))
                k = min(n, max(1, math.ceil(r * n)))
            else:  # the evidence bound: k uniform in 1..n
                k = min(n, 1 + int(_rand((1,), generator, "cpu") * n))
            masked = torch.zeros(n, dtype=torch.bool)
            masked[random_orders(1, n, generator, "cpu")[0][:k]] = True
            ids = p.ids.clone()
            ids[masked] = specs[p.modality].mask_id
            values = None
            if p.values is not None:
                values = p.values.clone()
                values[masked] = 0
            any_masked = True
            return replace(p, ids=ids, values=values), InPlace(p.ids, p.values, masked, n / k)

        for pieces in rows:
            f, arranged = flat_in_place(pieces, specs, arrange)
            bidir = [j for j, p in enumerate(arranged) if self.reads_both_ways(p, specs)]
            if bidir:
                inside = f.cond & torch.isin(f.piece, torch.tensor(bidir))
                f.extras["cond_bidir"] = torch.where(inside, f.piece, torch.full_like(f.piece, -1))
            flats.append(f)
        return self.collate(flats, pack=pack, null_cond=null_cond, weighted=not train and any_masked)

    def reads_both_ways(self, p: Piece, specs: list[DomainSpec]) -> bool:
        """A condition segment of a listed masked domain (not the null condition)."""
        return p.role == "cond" and not p.null and specs[p.modality].name in self.config.domains

    def prompt_mask(self, plan: Plan):
        """The prefill's pattern, as in training: condition segments of listed masked domains both ways."""
        g = plan.prompt_group
        if self.config.cond_attention != "bidirectional":
            names = self.config.domains
            specs = plan.specs or []
            listed = [k for k, s in enumerate(specs) if s.name in names]
            keep = torch.isin(plan.prompt.modality, torch.tensor(listed, dtype=torch.long)) if listed else \
                torch.zeros_like(g, dtype=torch.bool)
            g = torch.where(keep, g, torch.full_like(g, -1))
        return causal() | within(g) if bool((g >= 0).any()) else causal()

    # ------------------------------------------------------------------ sampling
    def generation_orders(self, plan_targets: list, order: str, generator=None) -> None:
        if order != "raster":
            raise SeqgenError(f"masked: sampling order {order!r} does not apply (a masked segment is decoded by "
                              "confidence or a random order per step; next-token segments go in raster order)")
        return None

    def _is_masked_target(self, t, specs: list[DomainSpec]) -> bool:
        return self._masked_domain(specs[t.modality], t.variable, t.open)

    @torch.no_grad()
    def fill(self, model, plan: Plan, cache, h: Tensor, *, specs: list[DomainSpec],
             generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             max_context: int | None = None, progress=None, steps: int | None = None) -> Plan:
        targets = plan.targets[0]
        kinds = [self._is_masked_target(t, specs) for t in targets]
        if not any(kinds):  # a next-token segment (a caption of an image -> caption entry)
            if steps is not None:
                raise SeqgenError("steps= applies to masked segments; this entry's targets are next-token")
            return super().fill(model, plan, cache, h, specs=specs, generator=generator, temperature=temperature,
                                top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                max_context=max_context, progress=progress)
        if len(targets) != 1:
            raise SeqgenError(f"masked: generating {len(targets)} segments in one example is not supported; an "
                              "entry with a masked target generates that one segment")
        N = int(steps if steps is not None else self.config.steps)
        if N < 1:
            raise SeqgenError(f"masked: steps must be >= 1, got {N}")
        dev = h.device
        R = plan.rows
        B = R // 2 if plan.guided else R
        sel = (plan.slot_target == 0) & (plan.slot_kind == DATA)
        n = int(sel[0].sum())
        slots = sel.nonzero()[:, 1].view(R, n).to(dev)  # (R, n) slot index of each token, in layout order
        rows = torch.arange(R, device=dev).unsqueeze(1)
        pos = plan.slot_pos.to(dev)[rows, slots]  # (R, n, 3)
        k = int(plan.slot_mod[0, int(slots[0, 0])])
        spec, head = specs[k], model.head_for(k)
        continuous = spec.vocab_size is None
        C = spec.value_dim if continuous else 0
        cont = [i for i, s in enumerate(specs) if s.vocab_size is None]
        C_model = specs[cont[0]].value_dim if cont else 0  # the model's value width (a run has one)
        ids = torch.full((R, n), spec.mask_id, dtype=torch.long, device=dev)
        values = torch.zeros(R, n, C_model, device=dev) if C_model else None
        known = torch.zeros(B, n, dtype=torch.bool, device=dev)
        selection = "random" if continuous else self.config.selection
        if selection == "random":
            rank = random_orders(B, n, generator, dev).argsort(1)  # rank[b, i]: when token i is revealed
        allowed = None
        if not continuous:
            allowed = torch.ones(spec.head_size, dtype=torch.bool, device=dev)
            allowed[spec.end_id] = False  # a fixed-length segment: its vocabulary only
        modality = torch.full((R, n), k, dtype=torch.long, device=dev)
        P0 = cache.length
        for t in range(N):
            seq = TokenSequence(ids=ids, values=values, pos=pos, modality=modality,
                                valid=torch.ones(R, n, dtype=torch.bool, device=dev))
            hs = model(seq, mask=full(), cache=cache, padded=False)  # (R, n, D)
            cache.truncate(P0)
            unknown = n - int(known[0].sum())
            last = t == N - 1 or unknown <= 1
            still = 0 if last else max(1, min(unknown - 1, math.floor(n * mask_ratio((t + 1) / N, self.config.schedule))))
            reveal = unknown - still
            s = cfg_scale_at(cfg_scale, t, N, cfg_schedule)
            knobs = dict(generator=generator, temperature=temperature, top_k=top_k, top_p=top_p)
            if selection == "confidence":
                hc = hs[:B].reshape(B * n, -1)
                hu = hs[B:].reshape(B * n, -1) if plan.guided else None
                drawn, logp = head.sample(hc, h_uncond=hu, cfg_scale=s, allowed=allowed.expand(B * n, -1),
                                          with_logprob=True, **knobs)
                drawn, logp = drawn.view(B, n), logp.view(B, n).float()
                tau = self.config.choice_temperature * (1 - (t + 1) / N)
                conf = logp + tau * _gumbel((B, n), generator, dev) if tau > 0 else logp
                conf = conf.masked_fill(known, float("inf"))
                keep = torch.zeros_like(known)
                keep.scatter_(1, conf.topk(n - still, dim=1).indices, True)
                new = keep & ~known
                ids[:B] = torch.where(new, drawn, ids[:B])
            else:
                done = n - unknown
                new = (rank >= done) & (rank < done + reveal)  # (B, n), `reveal` per row
                hc = hs[:B][new]
                hu = hs[B:][new] if plan.guided else None
                kn = dict(knobs)
                if not continuous:
                    kn["allowed"] = allowed.expand(len(hc), -1)
                drawn = head.sample(hc, h_uncond=hu, cfg_scale=s, **kn)
                if continuous:
                    values[:B][new] = drawn.to(values.dtype)
                    ids[:B][new] = -1
                else:
                    ids[:B][new] = drawn
            known = known | new
            if plan.guided:
                ids[B:] = ids[:B]
                if values is not None:
                    values[B:] = values[:B]
            if progress is not None:
                progress(t + 1, N)
            if last:
                break
        S = plan.slot_pos.shape[1]
        out_ids = torch.zeros(R, S, dtype=torch.long, device=dev)
        filled = torch.zeros(R, S, dtype=torch.bool, device=dev)
        out_ids[rows, slots] = ids
        filled[rows, slots] = True
        plan.out_ids, plan.filled = out_ids, filled
        if values is not None:
            out_values = torch.zeros(R, S, C_model, device=dev)
            out_values[rows, slots] = values
            plan.out_values = out_values
        plan.extras["steps"] = t + 1
        return plan
