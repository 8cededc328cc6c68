"""Next-token prediction, in raster order or in random order (RAR).

Training (``prepare``).  Each example is flattened (``seqgen.examples.flatten``: every segment wrapped
in its domain's begin / end ids, coordinates past the earlier segments); inputs are flat[:-1], targets
flat[1:], and the loss counts the targets that are tokens of target segments (and the END of a
variable-length target).  Examples are padded into rows, or packed several per row
(``same_document & causal``).

Random order (RAR, Yu et al., 2024, "Randomized Autoregressive Visual Generation").  With
probability r each example's data tokens are permuted; tokens keep their true N-D coordinates (RoPE
reads them), and every input token also carries the coordinates of the token it must predict
(``Batch.target_pos``, embedded by ``TargetPositionEmbedding``) so the model knows where the next
token goes.  r is annealed: 1 until ``anneal_start`` (a fraction of training), then linearly to 0 at
``anneal_end``, after which training is plain raster order.

Condition dropout.  With probability ``cond_dropout`` an example's condition segments are replaced by
the null condition (one NULL token per segment, so the null row shows nothing of the condition, not
even its length), so one model learns p(x | c) and p(x); sampling combines them with classifier-free
guidance: logits = u + s * (c - u).

Generation (``fill``).  The scheduler (``seqgen.generate``) prefills the prompt; ``fill`` then walks
every row's slot table one token per step (rows may be in different segments at the same step), in
layout or a per-sample random order.  With guidance the conditional and null rows run as one doubled
batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..examples import Flat, Piece, flatten, null_piece, stack_rows
from ..generate import DATA, Plan, pad_prompt
from ..masks import MaskSpec, causal, same_document, within
from ..registry import register_paradigm
from ..sampling import cfg_scale_at
from ..types import Batch, DomainSpec, SeqgenError, TokenSequence

ORDERS = ("raster", "random")
COND_ATTENTION = ("causal", "bidirectional")


def _rand(shape, generator, device) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def random_orders(batch_size: int, length: int, generator=None, device=None) -> Tensor:
    """(B, L) long: an independent uniform permutation per row."""
    return _rand((batch_size, length), generator, device).argsort(dim=1)


@register_paradigm("ar")
class AutoRegressive:
    @dataclass
    class Config:
        order: str = "raster"
        """training order: raster, or random (RAR: per-sample permutations, annealed to raster)"""
        anneal_start: float = 0.0
        """random order only: fraction of training before which every example is permuted"""
        anneal_end: float = 1.0
        """random order only: fraction of training from which no example is permuted"""
        cond_dropout: float = 0.1
        """probability of replacing the condition by the null condition (for guidance)"""
        cond_attention: str = "causal"
        """causal, or bidirectional: the tokens of each condition segment see each other both ways
        (a prefix LM per segment, as in UniLM / T5's prefix mode); targets stay causal"""
        token_shuffle: int = 1
        """Token-Shuffle window side s (1: off): s^2 consecutive tokens of the target share one backbone
        position and are predicted together from the position before (the target's domain must lay
        tokens out window by window: image ``scan: windows, window: s``)"""

        @classmethod
        def tiny(cls) -> "AutoRegressive.Config":
            return cls()

    def __init__(self, config: "AutoRegressive.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.order not in ORDERS:
            raise SeqgenError(f"ar: unknown order {cfg.order!r}; known: {', '.join(ORDERS)}")
        if not 0.0 <= cfg.anneal_start <= cfg.anneal_end <= 1.0:
            raise SeqgenError(f"ar: need 0 <= anneal_start <= anneal_end <= 1; got {cfg.anneal_start}, {cfg.anneal_end}")
        if cfg.cond_attention not in COND_ATTENTION:
            raise SeqgenError(f"ar: unknown cond_attention {cfg.cond_attention!r}; known: {', '.join(COND_ATTENTION)}")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise SeqgenError(f"ar: cond_dropout must be in [0, 1); got {cfg.cond_dropout}")
        if cfg.token_shuffle < 1:
            raise SeqgenError(f"ar: token_shuffle must be >= 1, got {cfg.token_shuffle}")
        if cfg.token_shuffle > 1 and (cfg.order != "raster" or cfg.cond_attention != "causal"):
            raise SeqgenError("ar: token_shuffle works with order: raster and cond_attention: causal")

    nll_kind = "exact"

    @property
    def needs_target_pos(self) -> bool:
        return self.config.order == "random"

    @property
    def token_group(self) -> int:
        """Tokens per backbone position (Token-Shuffle: s^2)."""
        return getattr(self.config, "token_shuffle", 1) ** 2

    def permute_rate(self, progress: float) -> float:
        """RAR's r: probability that an example is trained in a random order at this point of training."""
        cfg = self.config
        if cfg.order == "raster":
            return 0.0
        if progress < cfg.anneal_start:
            return 1.0
        if progress >= cfg.anneal_end:
            return 0.0
        return 1.0 - (progress - cfg.anneal_start) / (cfg.anneal_end - cfg.anneal_start)

    # ------------------------------------------------------------------ training
    def prepare(self, examples: list[list[Piece]], *, specs: list[DomainSpec], generator: torch.Generator | None = None,
                progress: float = 0.0, train: bool = True, null: bool = False, pack: int = 0) -> Batch:
        """Arrange one batch of encoded examples.

        train:  apply condition dropout and (random order) permutations; False for evaluation
        null:   replace every condition by the null condition (how much does the condition help?)
        pack:   0 pads one example per row; n > 0 packs examples into rows of n tokens
        progress: fraction of training done, for the RAR annealing schedule
        """
        rows, null_cond = self.drop_conditions(examples, specs, generator, train, null)
        B = len(rows)
        r = self.permute_rate(progress) if train else 0.0
        permute = (_rand((B,), generator, "cpu") < r) if r > 0 else torch.zeros(B, dtype=torch.bool)
        flats = []
        for i, pieces in enumerate(rows):
            order = None
            if permute[i]:
                order = [random_orders(1, p.length, generator, "cpu")[0]
                         if p.role == "target" and not p.variable and not p.open else None for p in pieces]
            flats.append(flatten(pieces, specs, order))
        if self.token_group > 1:
            if pack:
                raise SeqgenError("ar: token_shuffle does not pack examples (train.pack: 0)")
            return self.collate_shuffled(flats, examples, null_cond)
        return self.collate(flats, pack=pack, null_cond=null_cond)

    def collate_shuffled(self, flats: list[Flat], examples: list[list[Piece]], null_cond: Tensor | None) -> Batch:
        """Token-Shuffle arrangement: each example's one fixed-length target (n tokens, a multiple of the
        group g) starts at a group boundary (invalid tokens pad the row's front), its END is dropped, and
        the row is shifted by one *group*: the g states unfolded from a position predict the g tokens of
        the next position."""
        g = self.token_group
        parts = []
        for f, ex in zip(flats, examples):
            last = ex[-1]
            if sum(p.role == "target" for p in ex) != 1 or last.role != "target" or last.variable or last.open:
                raise SeqgenError("ar: token_shuffle needs examples with one fixed-length target, the last segment")
            n = last.length
            if n % g:
                raise SeqgenError(f"ar: token_shuffle {self.config.token_shuffle}: a target of {n} tokens is not a whole "
                                  f"number of {g}-token windows; lay its domain out window by window "
                                  f"(image: scan: windows, window: {self.config.token_shuffle})")
            T = f.length - 1  # without the END
            pad = (-(T - n)) % g

            def front(t: Tensor, fill=None) -> Tensor:
                t = t[:T]
                head = t[:1].expand(pad, *t.shape[1:]) if fill is None else torch.full((pad, *t.shape[1:]), fill,
                                                                                        dtype=t.dtype)
                return torch.cat([head, t])
            ids, pos, mod = front(f.ids, 0), front(f.pos), front(f.modality)
            real = front(torch.ones(T, dtype=torch.bool), False)
            d = {"ids": ids[:-g], "pos": pos[:-g], "modality": mod[:-g], "targets": ids[g:].clamp(min=0),
                 "target_modality": mod[g:], "loss_mask": front(f.target, False)[g:], "units": front(f.units, 0.0)[g:],
                 "target_pos": pos[g:], "real": real[:-g]}
            if f.values is not None:
                v = front(f.values, 0.0)
                d["values"], d["target_values"] = v[:-g], v[g:]
            parts.append(d)
        t = stack_rows([[p] for p in parts], pad={"loss_mask": False, "real": False})
        valid = t["valid"] & t["real"]
        inputs = TokenSequence(ids=t["ids"], values=t.get("values"), pos=t["pos"], modality=t["modality"], valid=valid)
        return Batch(inputs=inputs, targets=t["targets"], target_modality=t["target_modality"],
                     loss_mask=t["loss_mask"] & t["valid"], mask=causal(), target_values=t.get("target_values"),
                     units=t["units"], doc=t["doc"], null_cond=null_cond)

    def drop_conditions(self, examples: list[list[Piece]], specs: list[DomainSpec], generator, train: bool,
                        null: bool) -> tuple[list[list[Piece]], Tensor | None]:
        """Condition dropout (every paradigm's): each example's condition pieces become the null condition
        with probability ``cond_dropout`` in training, or always with ``null``.  -> (the examples' pieces,
        (B,) bool of the dropped rows, or None when no example has a condition)."""
        B = len(examples)
        if B == 0:
            raise SeqgenError("cannot prepare an empty batch")
        drop = torch.zeros(B, dtype=torch.bool)
        if null:
            drop[:] = True
        elif train and self.config.cond_dropout > 0:
            drop = _rand((B,), generator, "cpu") < self.config.cond_dropout
        rows = [[null_piece(p.modality, specs[p.modality]) if (drop[i] and p.role == "cond") else p for p in ex]
                for i, ex in enumerate(examples)]
        return rows, (drop if any(p.role == "cond" for ex in examples for p in ex) else None)

    def collate(self, flats: list[Flat], pack: int = 0, null_cond: Tensor | None = None,
                weighted: bool = False) -> Batch:
        """Shift each flat example by one and pad (or pack) into rows.

        In-place targets (a flat whose ``extras`` hold ``inplace``, set by masked paradigms): those tokens
        predict their own (unmasked) id or values at their own position, count only where ``masked``,
        and see their segment both ways (``bidir`` groups); the token before such a segment predicts
        nothing.  ``weighted``: carry ``extras["weight"]`` as ``Batch.weights`` (an evidence bound)."""
        parts = []
        has_values = any(f.values is not None for f in flats)
        C = next((f.values.shape[-1] for f in flats if f.values is not None), 0)
        cond_bidir = self.config.cond_attention == "bidirectional"
        for f in flats:
            if f.length < 2:
                raise SeqgenError("an example needs at least two tokens to predict one from the other")
            group = f.group[:-1] if cond_bidir else torch.full((f.length - 1,), -1, dtype=torch.long)
            x = f.extras
            if "cond_bidir" in x:  # condition segments read both ways whatever cond_attention says (masked domains)
                group = torch.where(x["cond_bidir"][:-1] >= 0, x["cond_bidir"][:-1], group)
            v = None
            if has_values:
                v = f.values if f.values is not None else torch.zeros(f.length, C)
            if "inplace" in x:
                ip, here = x["inplace"], x["inplace"][:-1]
                orig = x["orig_ids"]
                d = {"ids": f.ids[:-1], "pos": f.pos[:-1], "modality": f.modality[:-1],
                     "targets": torch.where(here, orig[:-1], orig[1:]).clamp(min=0),
                     "target_modality": torch.where(here, f.modality[:-1], f.modality[1:]),
                     "loss_mask": torch.where(here, x["masked"][:-1], f.target[1:] & ~ip[1:]),
                     "units": torch.where(here, f.units[:-1], f.units[1:]),
                     "target_pos": torch.where(here.unsqueeze(-1), f.pos[:-1], f.pos[1:]),
                     "group": torch.where(x["bidir"][:-1] >= 0, x["bidir"][:-1], group)}
                if weighted:
                    d["weights"] = torch.where(here, x["weight"][:-1], 1.0)
                if v is not None:
                    ov = x.get("orig_values", v)
                    d["values"], d["target_values"] = v[:-1], torch.where(here.unsqueeze(-1), ov[:-1], ov[1:])
            else:
                d = {"ids": f.ids[:-1], "pos": f.pos[:-1], "modality": f.modality[:-1], "targets": f.ids[1:].clamp(min=0),
                     "target_modality": f.modality[1:], "loss_mask": f.target[1:], "units": f.units[1:],
                     "target_pos": f.pos[1:], "group": group}
                if weighted:
                    d["weights"] = torch.ones(f.length - 1)
                if v is not None:
                    d["values"], d["target_values"] = v[:-1], v[1:]
            parts.append(d)
        if pack:
            from ..examples import pack_rows

            rows = [[parts[i] for i in row] for row in pack_rows([len(p["ids"]) for p in parts], pack)]
            null_cond = None
        else:
            rows = [[p] for p in parts]
        t = stack_rows(rows, pad={"loss_mask": False, "group": -1, "weights": 0.0})
        inputs = TokenSequence(ids=t["ids"], values=t.get("values"), pos=t["pos"], modality=t["modality"],
                               valid=t["valid"], segment=t["doc"] if pack else None)
        mask = causal() | within(t["group"]) if bool((t["group"] >= 0).any()) else causal()
        if pack:
            mask = same_document(t["doc"]) & mask
        return Batch(inputs=inputs, targets=t["targets"], target_modality=t["target_modality"],
                     loss_mask=t["loss_mask"] & t["valid"], mask=mask, target_values=t.get("target_values"),
                     units=t["units"], doc=t["doc"], target_pos=t["target_pos"] if self.needs_target_pos else None,
                     null_cond=null_cond, weights=t.get("weights"))

    def _attention(self, group: Tensor) -> MaskSpec:
        """causal, or causal | within(group) for bidirectional conditions (group: the condition piece of
        each token, -1 elsewhere)."""
        if self.config.cond_attention == "bidirectional" and bool((group >= 0).any()):
            return causal() | within(group)
        return causal()

    # ------------------------------------------------------------------ sampling
    def prepare_plan(self, plan: Plan) -> Plan:
        """Token-Shuffle: the prompt is left-padded to whole groups, so the target starts at a boundary."""
        return pad_prompt(plan, self.token_group) if self.token_group > 1 else plan

    def prompt_mask(self, plan: Plan) -> MaskSpec:
        """The attention pattern of the prompt's prefill (the same as in training)."""
        return self._attention(plan.prompt_group)

    def generation_orders(self, plan_targets: list, order: str, generator=None) -> list | None:
        """Per row and target: a random permutation of a fixed-length target's tokens (order=random)."""
        if order not in ORDERS:
            raise SeqgenError(f"unknown sampling order {order!r}; known: {', '.join(ORDERS)}")
        if order == "raster":
            return None
        return [[random_orders(1, len(t.pos), generator, "cpu")[0] if not (t.variable or t.open) else None
                 for t in row] for row in plan_targets]

    @torch.no_grad()
    def fill(self, model, plan: Plan, cache, h: Tensor, *, specs: list[DomainSpec],
             generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
             max_context: int | None = None, progress=None, steps: int | None = None) -> Plan:
        """One token per step: every row samples its current slot (or feeds the forced BEGIN / END id),
        a variable-length segment ends when END is drawn, and the token goes into the cache."""
        if steps is not None:
            raise SeqgenError("steps= sets the decoding steps of masked / next-scale paradigms; next-token "
                              "decoding takes one step per token")
        if self.token_group > 1:
            return self._fill_shuffled(model, plan, cache, h, specs=specs, generator=generator, temperature=temperature,
                                       top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                       progress=progress)
        dev = h.device
        R = plan.rows
        B = R // 2 if plan.guided else R
        pos, mod, kind = plan.slot_pos.to(dev).clone(), plan.slot_mod.to(dev), plan.slot_kind.to(dev)
        forced, var, end_slot = plan.slot_forced.to(dev), plan.slot_var.to(dev), plan.end_slot.to(dev)
        n_slots = plan.n_slots.to(dev)
        S = pos.shape[1]
        out_ids = torch.zeros(R, S, dtype=torch.long, device=dev)
        filled = torch.zeros(R, S, dtype=torch.bool, device=dev)
        cont = [k for k, s in enumerate(specs) if s.vocab_size is None]
        C = specs[cont[0]].value_dim if cont else 0
        out_values = torch.zeros(R, S, C, device=dev) if cont else None
        end_of = torch.tensor([s.end_id for s in specs], device=dev)
        ptr = torch.zeros(R, dtype=torch.long, device=dev)
        rows = torch.arange(R, device=dev)
        history = plan.prompt.to(dev) if max_context else None
        total, done = int(plan.n_slots[:B].max()), 0
        while True:
            active = ptr < n_slots
            p = ptr.clamp(max=S - 1)
            k_now, m_now, f_now = kind[rows, p], mod[rows, p], forced[rows, p]
            tok = f_now.clone()
            vals = torch.zeros(R, C, device=dev) if cont else None
            need = active & (f_now < 0)
            ended = torch.zeros(R, dtype=torch.bool, device=dev)
            idx = need[:B].nonzero().squeeze(1)
            if idx.numel():
                for k in mod[idx, p[idx]].unique().tolist():
                    rk = idx[mod[idx, p[idx]] == k]
                    head = model.head_for(k)
                    s = cfg_scale if cfg_schedule == "constant" else cfg_scale_at(
                        cfg_scale, *self._progress_in_segment(plan, int(rk[0]), int(p[rk[0]])), cfg_schedule)
                    knobs = dict(generator=generator, temperature=temperature, top_k=top_k, top_p=top_p)
                    if specs[k].vocab_size is not None:
                        allowed = torch.ones(len(rk), specs[k].head_size, dtype=torch.bool, device=dev)
                        allowed[:, specs[k].end_id] = var[rk, p[rk]]
                        knobs["allowed"] = allowed
                    if plan.guided:
                        t = head.sample(h[rk], h_uncond=h[rk + B], cfg_scale=s, **knobs)
                    else:
                        t = head.sample(h[rk], **knobs)
                    both = torch.cat([rk, rk + B]) if plan.guided else rk
                    if specs[k].vocab_size is None:
                        vals[both] = (t.repeat(2, 1) if plan.guided else t).to(vals.dtype)
                        tok[both] = -1
                    else:
                        tok[both] = t.repeat(2) if plan.guided else t
            sampled_end = need & var[rows, p] & (tok == end_of[m_now])
            ended = ended | sampled_end
            write = active & (k_now == DATA) & ~sampled_end
            out_ids[rows[active], p[active]] = tok[active]
            filled[rows, p] = filled[rows, p] | write
            if cont:
                out_values[rows[active], p[active]] = vals[active]
            feed_pos = pos[rows, p]
            if bool(ended.any()):  # END drawn early: it takes this slot's place; later slots move up
                e = end_slot[rows, p]
                for r in ended.nonzero().squeeze(1).tolist():
                    gap = pos[r, e[r]] - pos[r, p[r]]
                    pos[r, e[r]:] -= gap
            new_ptr = torch.where(ended, end_slot[rows, p] + 1, ptr + 1)
            ptr = torch.where(active, new_ptr, ptr)
            done += 1
            if progress is not None:
                progress(min(done, total), total)
            left = ptr < n_slots
            if not bool(left.any()):
                break
            nxt = ptr.clamp(max=S - 1)
            if bool((~left | ((ptr == n_slots - 1) & (forced[rows, nxt] >= 0))).all()):
                break  # all that is left is each row's final END: forced, so no forward pass is needed for it
            tp = pos[rows, nxt].unsqueeze(1)
            step = TokenSequence(ids=tok.clamp(min=-1).unsqueeze(1), values=None if vals is None else vals.unsqueeze(1),
                                 pos=feed_pos.unsqueeze(1), modality=m_now.unsqueeze(1),
                                 valid=torch.ones(R, 1, dtype=torch.bool, device=dev))
            if history is not None:
                history = TokenSequence.cat(history, step, shift_positions=False)
            if cache.length + 1 > cache.max_len:  # slide the window: keep the newest half, prefill again
                # (causally: what is left of a bidirectional condition is read causally after a slide)
                keep = max(1, cache.max_len // 2)
                recent = history.slice(history.length - keep)
                cache = model.init_cache(R, cache.max_len)
                h = model(recent, mask=causal(), cache=cache, target_pos=torch.cat([recent.pos[:, 1:], tp], 1))[:, -1]
                continue
            h = model(step, mask=causal(), cache=cache, target_pos=tp, padded=False)[:, -1]
        plan.out_ids, plan.filled, plan.out_values = out_ids, filled, out_values
        return plan

    def _fill_shuffled(self, model, plan: Plan, cache, h: Tensor, *, specs, generator, temperature, top_k, top_p,
                       cfg_scale, cfg_schedule, progress) -> Plan:
        """Token-Shuffle decoding: each step draws the g tokens of the next position (one per unfolded
        state, independently) and feeds them as one group; n / g steps for n tokens."""
        targets = plan.targets[0]
        if len(targets) != 1 or targets[0].variable or targets[0].open:
            raise SeqgenError("ar: token_shuffle generates one fixed-length target per example")
        g = self.token_group
        dev = h.device
        R = plan.rows
        B = R // 2 if plan.guided else R
        if h.dim() != 3 or h.shape[1] != g:
            raise SeqgenError(f"ar: token_shuffle decoding needs the prompt's last {g} states (prefill(last={g}))")
        sel = (plan.slot_target == 0) & (plan.slot_kind == DATA)
        n = int(sel[0].sum())
        if n % g:
            raise SeqgenError(f"ar: token_shuffle: a target of {n} tokens is not a whole number of {g}-token windows")
        slots = sel.nonzero()[:, 1].view(R, n).to(dev)
        rows = torch.arange(R, device=dev).unsqueeze(1)
        pos = plan.slot_pos.to(dev)[rows, slots]
        k = targets[0].modality
        spec, head = specs[k], model.head_for(k)
        if spec.vocab_size is None:
            raise SeqgenError("ar: token_shuffle works on discrete tokens")
        allowed = torch.ones(spec.head_size, dtype=torch.bool, device=dev)
        allowed[spec.end_id] = False
        ids = torch.zeros(R, n, dtype=torch.long, device=dev)
        steps = n // g
        for i in range(steps):
            s = cfg_scale_at(cfg_scale, i, steps, cfg_schedule)
            hu = h[B:].reshape(B * g, -1) if plan.guided else None
            drawn = head.sample(h[:B].reshape(B * g, -1), h_uncond=hu, cfg_scale=s, generator=generator,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                allowed=allowed.expand(B * g, -1)).view(B, g)
            ids[:B, i * g:(i + 1) * g] = drawn
            if plan.guided:
                ids[B:, i * g:(i + 1) * g] = drawn
            if progress is not None:
                progress(i + 1, steps)
            if i == steps - 1:
                break
            step = TokenSequence(ids=ids[:, i * g:(i + 1) * g], values=None, pos=pos[:, i * g:(i + 1) * g],
                                 modality=torch.full((R, g), k, dtype=torch.long, device=dev),
                                 valid=torch.ones(R, g, dtype=torch.bool, device=dev))
            h = model(step, mask=causal(), cache=cache, padded=False)
        S = plan.slot_pos.shape[1]
        plan.out_ids = torch.zeros(R, S, dtype=torch.long, device=dev)
        plan.filled = torch.zeros(R, S, dtype=torch.bool, device=dev)
        plan.out_ids[rows, slots] = ids
        plan.filled[rows, slots] = True
        return plan

    @staticmethod
    def _progress_in_segment(plan: Plan, r: int, p: int) -> tuple[int, int]:
        """(step, steps) of row r's current segment, for guidance schedules."""
        j = int(plan.slot_target[r, p])
        n = len(plan.targets[r % len(plan.targets)][j].pos)
        first = int((plan.slot_target[r] == j).nonzero()[0])
        if int(plan.slot_kind[r, first]) != DATA:
            first += 1
        return max(0, p - first), n
