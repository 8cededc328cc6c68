"""Generation is a scheduler over segments.

For every row it lays out a *plan*: the prompt (the condition pieces, each wrapped in its domain's
begin / end ids, then the begin id of the first target) and a table of *slots* for what follows: the
tokens of each target segment (in the generation order the paradigm asked for), the END of each
segment, and the BEGIN of the next.  Each slot knows its coordinates, its domain, and whether it is
sampled or forced (BEGIN / END of fixed-length segments are forced).  The scheduler prefills the
prompt into the cache and hands the plan to the target's paradigm to fill (the ``ar`` token loop
today; MaskGIT steps or next-scale passes later fill the same slots), restricting every sampled slot
to its domain's vocabulary (plus END where the segment has a variable length).  A variable-length
segment stops at its END id or at its length limit.  Rows of one batch may be in different segments
at the same step: each row walks its own slot table.

Guidance doubles the rows: rows B..2B hold the same plan with every condition replaced by the null
condition of its domain (its own length; left padding keeps every row's next token in one cache
column), and each sampled token is drawn once from the guided logits and written to both rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .examples import Piece, null_piece
from .masks import MaskSpec, causal
from .types import NUM_AXES, DomainSpec, SeqgenError, TokenSequence

DATA, END, BEGIN = 0, 1, 2  # slot kinds


@dataclass
class Target:
    """One target segment to generate in one row."""

    modality: int
    pos: Tensor  # (n, 3) local coordinates of its tokens, in layout order
    variable: bool = False  # ends itself (END id) or at n tokens
    open: bool = False  # continues a stream: no begin / end ids
    prefix: Piece | None = None  # open targets: the tokens it continues (a text prompt)


@dataclass
class Plan:
    prompt: TokenSequence  # (R, P) left-padded
    prompt_target_pos: Tensor  # (R, P, 3) coordinates each prompt token predicts
    prompt_group: Tensor  # (R, P) index of the condition piece of each prompt token, -1 elsewhere
    slot_pos: Tensor  # (R, S, 3)
    slot_mod: Tensor  # (R, S)
    slot_kind: Tensor  # (R, S) DATA / END / BEGIN
    slot_forced: Tensor  # (R, S) id to feed, -1 where sampled
    slot_target: Tensor  # (R, S) target index of the slot
    slot_index: Tensor  # (R, S) index into that target's layout (data slots)
    slot_var: Tensor  # (R, S) bool: a data slot of a variable-length segment (END allowed)
    end_slot: Tensor  # (R, S) index of the END slot of the slot's segment (-1 for open segments)
    n_slots: Tensor  # (R,)
    targets: list[list[Target]]  # per conditional row
    guided: bool = False
    out_ids: Tensor | None = None  # (R, S) filled by the paradigm
    out_values: Tensor | None = None  # (R, S, C)
    filled: Tensor | None = None  # (R, S) bool: slots that hold a generated token
    extras: dict = field(default_factory=dict)
    specs: list | None = None  # the run's domain specs (paradigms read them in prompt_mask)

    @property
    def rows(self) -> int:
        return self.slot_pos.shape[0]


class _Slots:
    """One row's slot table, built a run of slots at a time (a whole target segment in one call)."""

    def __init__(self):
        self.pos: list[Tensor] = []
        self.cols: list[Tensor] = []  # (n, 7): mod, kind, forced, target, index, var, end_slot
        self.n = 0

    def add(self, pos: Tensor, mod: int, kind: int, forced: int, target: int, index, var: bool, end: int) -> None:
        pos = pos.reshape(-1, NUM_AXES).long()
        n = len(pos)
        c = torch.tensor([mod, kind, forced, target, 0, int(var), end], dtype=torch.long).repeat(n, 1)
        c[:, 4] = index if torch.is_tensor(index) else int(index)
        self.pos.append(pos)
        self.cols.append(c)
        self.n += n

    def __len__(self) -> int:
        return self.n

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.cat(self.pos), torch.cat(self.cols)


def _wrap(piece: Piece, spec: DomainSpec, offset: int) -> tuple[list[int], Tensor, int]:
    """(ids, coordinates, next offset) of one prompt piece wrapped in begin / end ids."""
    n = piece.length
    if piece.open:
        pos = piece.pos + offset
        return piece.ids.tolist(), pos, (int(pos.max()) + 1 if n else offset)
    local = piece.pos + offset + 1
    top = int(local.max()) if n else offset
    pos = torch.cat([torch.full((1, NUM_AXES), offset), local, torch.full((1, NUM_AXES), top + 1)])
    return [spec.begin_id] + piece.ids.tolist() + [spec.end_id], pos.long(), top + 2


def build_plan(conds: list[list[Piece]], targets: list[list[Target]], specs: list[DomainSpec], *,
               guided: bool = False, orders: list[list[Tensor | None]] | None = None) -> Plan:
    """conds[b]: the encoded condition pieces of row b; targets[b]: what to generate after them.
    orders[b][j]: a permutation of target j's tokens (random order), or None for layout order."""
    B = len(conds)
    if len(targets) != B:
        raise SeqgenError(f"{B} rows of conditions but {len(targets)} rows of targets")
    rows = list(range(B))
    variants = [(b, False) for b in rows] + ([(b, True) for b in rows] if guided else [])
    # a model with a continuous domain reads values: the prompt carries them (zeros at id tokens)
    C = next((s.value_dim for s in specs if s.value_dim is not None), None)

    def wrapped_values(p: Piece, n: int) -> Tensor:
        v = torch.zeros(n, C)
        if p.values is not None:
            v[0 if p.open else 1:][:p.length] = p.values.float()
        return v
    prompts, slots = [], []
    for b, is_null in variants:
        if not targets[b]:
            raise SeqgenError("nothing to generate: a row has no target segment")
        ids, pos, prompts_mod, vals, group, offset = [], [], [], [], [], 0
        for g, p in enumerate(conds[b]):
            if is_null and p.role == "cond":
                p = null_piece(p.modality, specs[p.modality])
            i, q, offset = _wrap(p, specs[p.modality], offset)
            ids += i
            pos.append(q)
            prompts_mod += [p.modality] * len(i)
            group += [g if p.role == "cond" else -1] * len(i)
            if C is not None:
                vals.append(wrapped_values(p, len(i)))
        row_slots = _Slots()
        for j, t in enumerate(targets[b]):
            spec = specs[t.modality]
            perm = None if orders is None or orders[b][j] is None else orders[b][j]
            local = t.pos if perm is None else t.pos[perm]
            index = torch.arange(len(t.pos)) if perm is None else perm
            if t.open:
                if j != len(targets[b]) - 1:
                    raise SeqgenError("an open (stream) target must be the last segment of a row")
                if t.prefix is not None:
                    i, q, offset = _wrap(t.prefix, spec, offset)
                    ids += i
                    pos.append(q)
                    prompts_mod += [t.modality] * len(i)
                    group += [-1] * len(i)
                    if C is not None:
                        vals.append(wrapped_values(t.prefix, len(i)))
                row_slots.add(local + offset, t.modality, DATA, -1, j, index, False, -1)
                continue
            begin_pos = torch.full((NUM_AXES,), offset)
            if j == 0:  # the prompt ends with the first target's BEGIN
                ids.append(spec.begin_id)
                pos.append(begin_pos.view(1, -1))
                prompts_mod.append(t.modality)
                group.append(-1)
                if C is not None:
                    vals.append(torch.zeros(1, C))
            else:
                row_slots.add(begin_pos.view(1, -1), t.modality, BEGIN, spec.begin_id, j, -1, False, -1)
            g = local + offset + 1
            end_at = len(row_slots) + len(local)
            row_slots.add(g, t.modality, DATA, -1, j, index, t.variable, end_at)
            top = int(g.max()) if len(g) else offset
            row_slots.add(torch.full((1, NUM_AXES), top + 1), t.modality, END, spec.end_id, j, -1, False, end_at)
            offset = top + 2
        if not ids:
            raise SeqgenError("generation needs a prompt: a condition, a begin id or text to continue")
        prompts.append((torch.tensor(ids), torch.cat(pos).long(), torch.tensor(prompts_mod),
                        torch.cat(vals) if C is not None else None, torch.tensor(group, dtype=torch.long)))
        slots.append(row_slots)
    R = len(variants)
    P = max(len(p[0]) for p in prompts)
    S = max(len(s) for s in slots)
    p_ids = torch.zeros(R, P, dtype=torch.long)
    p_pos = torch.zeros(R, P, NUM_AXES, dtype=torch.long)
    p_mod = torch.zeros(R, P, dtype=torch.long)
    p_valid = torch.zeros(R, P, dtype=torch.bool)
    p_group = torch.full((R, P), -1, dtype=torch.long)
    p_vals = torch.zeros(R, P, C) if C is not None else None
    for r, (i, q, m, v, g) in enumerate(prompts):  # left padding: every row's next token is at column P
        n = len(i)
        p_ids[r, P - n:], p_pos[r, P - n:], p_mod[r, P - n:], p_valid[r, P - n:] = i, q, m, True
        p_group[r, P - n:] = g
        if v is not None:
            p_vals[r, P - n:] = v
        if n < P:
            p_pos[r, :P - n] = q[0]
    rows_t = [sl.tensors() for sl in slots]  # per row: (pos (n, 3), (n, 7) long columns)
    fields = [torch.zeros(R, S, NUM_AXES, dtype=torch.long)] + [torch.zeros(R, S, dtype=torch.long) for _ in range(5)]
    var = torch.zeros(R, S, dtype=torch.bool)
    end_slot = torch.full((R, S), -1, dtype=torch.long)
    n_slots = torch.tensor([len(s) for s in slots])
    for r, (q, cols) in enumerate(rows_t):
        n = len(q)
        fields[0][r, :n] = q
        for f in range(1, 6):  # mod, kind, forced, target, index
            fields[f][r, :n] = cols[:, f - 1]
        var[r, :n], end_slot[r, :n] = cols[:, 5].bool(), cols[:, 6]
        if n < S:  # finished rows repeat their last slot (never used)
            fields[0][r, n:] = q[n - 1]
            fields[1][r, n:] = cols[n - 1, 0]
            fields[3][r, n:] = 0
            fields[2][r, n:] = END
    first = fields[0][:, :1]
    tp = torch.cat([p_pos[:, 1:], first], 1)
    prompt = TokenSequence(ids=p_ids, values=p_vals, pos=p_pos, modality=p_mod, valid=p_valid)
    return Plan(prompt=prompt, prompt_target_pos=tp, prompt_group=p_group, slot_pos=fields[0], slot_mod=fields[1],
                slot_kind=fields[2], slot_forced=fields[3], slot_target=fields[4], slot_index=fields[5], slot_var=var,
                end_slot=end_slot, n_slots=n_slots, targets=targets, guided=guided, specs=list(specs))


def outputs(plan: Plan, b: int, j: int) -> TokenSequence:
    """The generated tokens of target j of conditional row b as a (1, n) TokenSequence in layout order
    with local coordinates; ``valid`` False where a variable-length segment stopped early."""
    t = plan.targets[b][j]
    sel = (plan.slot_target[b] == j) & (plan.slot_kind[b] == DATA)
    idx = plan.slot_index[b][sel]
    n = len(t.pos)
    ids = torch.zeros(n, dtype=torch.long)
    valid = torch.zeros(n, dtype=torch.bool)
    got = plan.filled[b][sel]
    ids[idx] = plan.out_ids[b][sel].cpu()
    valid[idx] = got.cpu()
    values = None
    if plan.out_values is not None:
        values = torch.zeros(n, plan.out_values.shape[-1])
        values[idx] = plan.out_values[b][sel].cpu().float()
        values = values.unsqueeze(0)
    return TokenSequence(ids=ids.unsqueeze(0), values=values, pos=t.pos.unsqueeze(0).long(),
                         modality=torch.full((1, n), t.modality, dtype=torch.long), valid=valid.unsqueeze(0))


def prefill(model, plan: Plan, cache_len: int, device, mask: MaskSpec | None = None,
            last: int = 1) -> tuple[object, Tensor]:
    """Run the prompt through the model into a fresh cache; return (cache, hidden state at its last token),
    or with ``last`` > 1 the states (R, last, D) of its last tokens (a Token-Shuffle group).
    mask: the prompt's attention pattern (the paradigm's ``prompt_mask``; causal when None)."""
    prompt = plan.prompt.to(device)
    cache = model.init_cache(plan.rows, cache_len)
    mask = causal() if mask is None else mask.to(device)
    h = model(prompt, mask=mask, cache=cache, target_pos=plan.prompt_target_pos.to(device))
    return cache, (h[:, -1] if last == 1 else h[:, -last:])


def pad_prompt(plan: Plan, multiple: int) -> Plan:
    """Left-pad the prompt with invalid tokens to a multiple of ``multiple`` tokens (Token-Shuffle groups)."""
    P = plan.prompt.length
    extra = (-P) % multiple
    if extra == 0:
        return plan
    p = plan.prompt
    R = p.batch_size

    def front(t: Tensor, fill) -> Tensor:
        pad = t[:, :1].expand(R, extra, *t.shape[2:]).clone() if fill is None else \
            torch.full((R, extra, *t.shape[2:]), fill, dtype=t.dtype)
        return torch.cat([pad, t], 1)
    plan.prompt = TokenSequence(ids=front(p.ids, 0), values=None if p.values is None else front(p.values, 0.0),
                                pos=front(p.pos, None), modality=front(p.modality, None),
                                valid=front(p.valid, False))
    plan.prompt_target_pos = front(plan.prompt_target_pos, None)
    plan.prompt_group = front(plan.prompt_group, -1)
    return plan
