"""Examples as lists of segments, and how they become flat token rows.

An *example* is an ordered list of segments; a segment is ``(domain, raw item, role)``, role =
``cond`` (context, no loss) or ``target`` (loss; generated at sampling time).  A *recipe* says which
record fields become which segments (``caption -> scene``, ``scene -> caption``, ``label -> image``,
a text stream ...).  Once encoded, a segment is a ``Piece``: its tokens with local coordinates.

Flattening (``flatten``) wraps every piece in the begin / end ids of its domain and moves its
coordinates past the earlier pieces' (the M-RoPE rule), so an example is one token list:

    [BEGIN_label  7  END_label  BEGIN_image  p0 p1 ... p63  END_image]

Per token it records the domain (``modality``), whether the token is a prediction target, and the raw
units it stands for.  Targets are the tokens of target pieces, plus the END of a variable-length
target (so a caption learns to end itself); BEGIN ids are never targets (the generator places
them).  A piece cut from a long stream (``open``) has no begin / end ids: it is a window of text.

``collate`` turns flat examples into a padded batch, or packs several examples per row (``pack``)
with a per-token document index for the ``same_document`` mask; coordinates restart per example, so
packing does not change any example's loss (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .types import NUM_AXES, DomainSpec, SeqgenError

ROLES = ("cond", "target")


@dataclass(frozen=True)
class Segment:
    """One part of an example before encoding."""

    domain: str  # a key of the run's `domains:` table
    raw: Any  # one item in that adapter's raw form (None for a target to generate)
    role: Literal["cond", "target"]


Example = list  # list[Segment]


@dataclass
class Piece:
    """One encoded segment of one example.

    modality: index of the domain in the run's domain list
    ids:      (L,) long (-1 at value tokens of a continuous domain), values (L, C) or None
    pos:      (L, 3) long local coordinates
    units:    (L,) float raw units per token
    """

    modality: int
    ids: Tensor
    pos: Tensor
    units: Tensor
    role: str = "target"
    values: Tensor | None = None
    open: bool = False  # a window of a stream: no begin / end ids
    variable: bool = False  # the segment ends itself: its END id is predicted
    null: bool = False  # the null condition (classifier-free guidance)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def piece_of(seq, units: Tensor, i: int, modality: int, role: str, variable: bool = False,
             length: int | None = None) -> Piece:
    """Row i of an encoded (N, L) TokenSequence (its valid tokens) as a piece.  ``length``: the row's valid
    tokens are its first ``length`` (padding at the end), so the piece holds views instead of copies."""
    v = seq.valid[i] if length is None else slice(0, length)
    return Piece(modality, seq.ids[i][v], seq.pos[i][v], units[i][v], role=role,
                 values=None if seq.values is None else seq.values[i][v], variable=variable)


def encode_pieces(adapter, items, modality: int, role: str, specs: list[DomainSpec] | None = None) -> list[Piece]:
    """Raw items of one domain -> one piece per item.  With ``specs`` the tokens are validated first."""
    seq = adapter.encode(items)
    seq = seq.replace(modality=torch.full_like(seq.modality, modality))
    if specs is not None:
        seq.validate(specs)
    units = adapter.units(seq).float()
    variable = role == "target" and bool(adapter.variable_length)
    return [piece_of(seq, units, i, modality, role, variable) for i in range(len(items))]


def null_piece(modality: int, spec: DomainSpec) -> Piece:
    """The null condition of a domain: one NULL token (its own length: nothing of the real condition,
    not even its length, shows in the null row)."""
    return Piece(modality, torch.tensor([spec.null_id]), torch.zeros(1, NUM_AXES, dtype=torch.long),
                 torch.zeros(1), role="cond", null=True)


@dataclass
class Flat:
    """One example as a flat token list (T tokens)."""

    ids: Tensor  # (T,) long
    pos: Tensor  # (T, 3) long
    modality: Tensor  # (T,) long
    target: Tensor  # (T,) bool: this token is predicted (from the token before it)
    units: Tensor  # (T,) float
    piece: Tensor  # (T,) long: index of the piece the token belongs to
    cond: Tensor  # (T,) bool: the token belongs to a condition piece
    values: Tensor | None = None  # (T, C) float or None
    extras: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def group(self) -> Tensor:
        """(T,) long: the piece index of tokens of condition pieces (begin / end ids included), -1
        elsewhere: the groups of ``masks.within`` for bidirectional conditions."""
        return torch.where(self.cond, self.piece, torch.full_like(self.piece, -1))


def flatten(pieces: list[Piece], specs: list[DomainSpec], order: list[Tensor | None] | None = None) -> Flat:
    """Wrap each piece in its domain's begin / end ids and lay the pieces out one after another.

    order: per piece, an optional permutation of its tokens (random-order AR); coordinates stay the
    tokens' true ones.
    """
    C = {p.values.shape[-1] for p in pieces if p.values is not None}
    if len(C) > 1:
        raise SeqgenError(f"continuous segments of one example must share a width; got {sorted(C)}")
    C = C.pop() if C else None
    # one pass of plain Python over the pieces, then a few whole-example tensor ops (this runs for every
    # training example: per-token work stays out of the loop)
    data = []  # (start, ids, pos, coordinate shift, units, values) of each piece's own tokens
    specials = []  # (index, id, coordinate) of begin / end tokens
    runs = []  # (length, modality, is_target, piece, is_cond) of consecutive tokens sharing these
    offset, T = 0, 0
    for j, p in enumerate(pieces):
        spec = specs[p.modality]
        pid, ppos, punits, pval = p.ids, p.pos, p.units, p.values
        if order is not None and order[j] is not None:
            o = order[j]
            pid, ppos, punits = pid[o], ppos[o], punits[o]
            pval = None if pval is None else pval[o]
        n = int(pid.shape[0])
        is_target, is_cond = p.role == "target", p.role == "cond"
        if p.open:
            data.append((T, pid, ppos, offset, punits, pval))
            top = int(ppos.max()) + offset if n else offset - 1
            runs.append((n, p.modality, is_target, j, is_cond))
            T += n
            offset = top + 1
        else:
            top = int(ppos.max()) + offset + 1 if n else offset
            specials.append((T, spec.begin_id, offset))
            data.append((T + 1, pid, ppos, offset + 1, punits, pval))
            specials.append((T + 1 + n, spec.end_id, top + 1))
            runs += [(1, p.modality, False, j, is_cond), (n, p.modality, is_target, j, is_cond),
                     (1, p.modality, is_target and p.variable, j, is_cond)]
            T += n + 2
            offset = top + 2
    ids = torch.empty(T, dtype=torch.long)
    pos = torch.empty(T, NUM_AXES, dtype=torch.long)
    units = torch.zeros(T)
    values = torch.zeros(T, C) if C is not None else None
    for start, pid, ppos, shift, punits, pval in data:
        n = int(pid.shape[0])
        ids[start:start + n] = pid
        torch.add(ppos, shift, out=pos[start:start + n])
        units[start:start + n] = punits
        if pval is not None:
            values[start:start + n] = pval
    if specials:
        sp = torch.from_numpy(np.array(specials, dtype=np.int64))  # (k, 3)
        ids[sp[:, 0]] = sp[:, 1]
        pos[sp[:, 0]] = sp[:, 2:3]
    runs_np = np.array(runs, dtype=np.int64).reshape(-1, 5)
    meta = torch.from_numpy(np.repeat(runs_np[:, 1:], runs_np[:, 0], axis=0))  # (T, 4)
    return Flat(ids=ids, pos=pos, modality=meta[:, 0], target=meta[:, 1].bool(), units=units, piece=meta[:, 2],
                cond=meta[:, 3].bool(), values=values)


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: group example indices into rows of at most ``row_length`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > row_length:
            raise SeqgenError(f"an example of {lengths[i]} tokens does not fit a packed row of {row_length}; "
                              "raise train.pack")
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_length - lengths[i])
    return [sorted(r) for r in rows]


def stack_rows(parts: list[list[dict[str, Tensor]]], pad: dict[str, Any]) -> dict[str, Tensor]:
    """Rows of concatenated per-example field dicts -> padded (B, L, ...) tensors plus ``valid`` and
    ``doc`` (index of the example inside its row; -1 on padding)."""
    first = next(iter(parts[0][0]))
    sizes = [[int(p[first].shape[0]) for p in row] for row in parts]
    n = torch.tensor([sum(s) for s in sizes])
    L = int(n.max())
    res = {}
    for k in parts[0][0]:
        rows = [row[0][k] if len(row) == 1 else torch.cat([p[k] for p in row]) for row in parts]
        res[k] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad.get(k, 0))
    res["valid"] = torch.arange(L).unsqueeze(0) < n.unsqueeze(1)
    if all(len(s) == 1 for s in sizes):  # one example per row
        res["doc"] = res["valid"].long() - 1
    else:
        doc = torch.full((len(parts), L), -1, dtype=torch.long)
        for b, s in enumerate(sizes):
            doc[b, :n[b]] = torch.arange(len(s)).repeat_interleave(torch.tensor(s))
        res["doc"] = doc
    return res
