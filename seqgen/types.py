"""The shared token interface: DomainSpec, TokenSequence, Batch.

Shape letters used throughout seqgen:
    B batch, L tokens, D model width, C channels of a continuous token,
    A position axes (always ``NUM_AXES`` = 3 inside the runtime), V vocabulary size.

Every domain becomes a ``TokenSequence``.  Positions are N-D coordinates: an image token at
row r, column c sits at (0, r, c); a video token at (t, h, w); a 1-D token (text, audio frame,
time step) at (i, i, i), so that N-D rotary embeddings reduce exactly to ordinary RoPE for 1-D
data (see ``seqgen.positions``).  Concatenating sequences shifts the later part's coordinates
past the earlier part's largest coordinate, as in M-RoPE (Qwen2-VL), so a class token or text
prompt followed by an image keeps every axis increasing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .masks import MaskSpec

NUM_AXES = 3

# Extra rows every domain's embedding table carries after the domain's own vocabulary (for a
# continuous domain: a table of these rows alone).  Heads predict their vocabulary plus END (so END
# sits right after the vocabulary: a categorical head's output index equals the id); the others are
# inputs only.
END_OFFSET = 0  # end of a segment: predicted, so a variable-length segment ends itself
NULL_OFFSET = 1  # null condition (classifier-free guidance)
MASK_OFFSET = 2  # [MASK] for masked / parallel paradigms
BEGIN_OFFSET = 3  # begin of a segment (the runtime places it; never predicted)
NUM_SPECIAL = 4


class SeqgenError(ValueError):
    """Bad input to seqgen: the message names the problem and the expected form."""


@dataclass(frozen=True)
class DomainSpec:
    """What a domain looks like to the model.

    name:       unique name inside one model ("image", "text", "label", ...)
    vocab_size: number of discrete token ids (None if the domain is continuous only)
    value_dim:  C, channels of a continuous token (None if discrete only)
    pos_axes:   1 for text/audio/series, 2 for images, 3 for video or voxels
    scales:     a multi-scale domain (next-scale prediction, VAR): the (h, w) token grid of every scale,
                coarse to fine.  Its items are laid out scale after scale, raster order inside a scale,
                so a segment holds sum(h * w) tokens; a token (i, j) of scale k reads, as its input, the
                token (i * h_{k-1} // h_k, j * w_{k-1} // w_k) of scale k - 1 (its nearest parent).
    """

    name: str
    vocab_size: int | None = None
    value_dim: int | None = None
    pos_axes: int = 1
    scales: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is None and self.value_dim is None:
            raise SeqgenError(f"domain {self.name!r}: give vocab_size (discrete) or value_dim (continuous)")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise SeqgenError(f"domain {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")
        if not 1 <= self.pos_axes <= NUM_AXES:
            raise SeqgenError(f"domain {self.name!r}: pos_axes must be in 1..{NUM_AXES}, got {self.pos_axes}")
        if self.scales is not None:
            sc = tuple(tuple(int(v) for v in hw) for hw in self.scales)
            if not sc or any(len(hw) != 2 or min(hw) < 1 for hw in sc):
                raise SeqgenError(f"domain {self.name!r}: scales must be a non-empty list of (h, w) grids; got {self.scales}")
            if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(sc, sc[1:])):
                raise SeqgenError(f"domain {self.name!r}: scales must grow from coarse to fine; got {sc}")
            object.__setattr__(self, "scales", sc)

    @property
    def scale_lengths(self) -> list[int]:
        """Tokens of each scale of a multi-scale domain (empty when it has one scale)."""
        return [h * w for h, w in self.scales] if self.scales else []

    @property
    def special_base(self) -> int:
        """First special id: the vocabulary size (0 for a continuous domain, whose value tokens carry
        id -1 and whose special tokens are rows of a small table of their own)."""
        return self.vocab_size or 0

    @property
    def end_id(self) -> int:
        return self.special_base + END_OFFSET

    @property
    def null_id(self) -> int:
        return self.special_base + NULL_OFFSET

    @property
    def mask_id(self) -> int:
        return self.special_base + MASK_OFFSET

    @property
    def begin_id(self) -> int:
        return self.special_base + BEGIN_OFFSET

    @property
    def table_size(self) -> int:
        """Rows of this domain's id embedding table: the vocabulary plus the special ids."""
        return self.special_base + NUM_SPECIAL

    @property
    def head_size(self) -> int:
        """Outputs of a categorical head over this domain: the vocabulary plus END."""
        if self.vocab_size is None:
            raise SeqgenError(f"domain {self.name!r} is continuous; it has no categorical outputs")
        return self.vocab_size + 1


def line_positions(length: int, batch_size: int = 1, start: int = 0, device=None) -> Tensor:
    """(B, L, 3) coordinates of a 1-D sequence: index i repeated on every axis."""
    i = torch.arange(start, start + length, device=device)
    return i.view(1, length, 1).expand(batch_size, length, NUM_AXES).clone()


@dataclass
class TokenSequence:
    """A batch of token sequences, possibly from several domains concatenated along L.

    ids:      (B, L) long, each in its own domain's vocabulary (0 where the token is continuous)
    values:   (B, L, C) float continuous tokens, or None
    pos:      (B, L, 3) long N-D coordinates
    modality: (B, L) long index into the model's list of domains
    valid:    (B, L) bool, False on padding
    segment:  (B, L) long block / document / scale id that masks may read, or None
    """

    ids: Tensor | None
    values: Tensor | None
    pos: Tensor
    modality: Tensor
    valid: Tensor
    segment: Tensor | None = None

    def __post_init__(self) -> None:
        ref = self.ids if self.ids is not None else self.values
        if ref is None:
            raise SeqgenError("TokenSequence needs ids (B, L) or values (B, L, C); got neither")
        if ref.dim() < 2:
            raise SeqgenError(f"TokenSequence ids must be (B, L); got shape {tuple(ref.shape)}")
        B, L = ref.shape[:2]
        if self.ids is not None and (self.ids.dim() != 2 or self.ids.dtype != torch.long):
            raise SeqgenError(f"TokenSequence.ids must be a (B, L) long tensor; got {tuple(self.ids.shape)} {self.ids.dtype}")
        if self.values is not None and (self.values.dim() != 3 or tuple(self.values.shape[:2]) != (B, L)):
            raise SeqgenError(f"TokenSequence.values must be (B, L, C) = ({B}, {L}, C); got {tuple(self.values.shape)}")
        for name, want in (("pos", (B, L, NUM_AXES)), ("modality", (B, L)), ("valid", (B, L))):
            t = getattr(self, name)
            if tuple(t.shape) != want:
                raise SeqgenError(f"TokenSequence.{name} must have shape {want}; got {tuple(t.shape)}")
        if self.segment is not None and tuple(self.segment.shape) != (B, L):
            raise SeqgenError(f"TokenSequence.segment must have shape {(B, L)}; got {tuple(self.segment.shape)}")
        if self.valid.dtype != torch.bool:
            raise SeqgenError(f"TokenSequence.valid must be bool; got {self.valid.dtype}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_ids(cls, ids: Tensor, pos: Tensor | None = None, modality: int = 0,
                 valid: Tensor | None = None, segment: Tensor | None = None) -> "TokenSequence":
        """A single-domain discrete sequence; positions default to a 1-D line."""
        if ids.dim() != 2:
            raise SeqgenError(f"ids must be (B, L); got shape {tuple(ids.shape)}")
        B, L = ids.shape
        pos = line_positions(L, B, device=ids.device) if pos is None else pos
        return cls(ids=ids.long(), values=None, pos=pos,
                   modality=torch.full((B, L), modality, dtype=torch.long, device=ids.device),
                   valid=torch.ones(B, L, dtype=torch.bool, device=ids.device) if valid is None else valid,
                   segment=segment)

    @classmethod
    def from_values(cls, values: Tensor, pos: Tensor | None = None, modality: int = 0,
                    valid: Tensor | None = None) -> "TokenSequence":
        if values.dim() != 3:
            raise SeqgenError(f"values must be (B, L, C); got shape {tuple(values.shape)}")
        B, L, _ = values.shape
        pos = line_positions(L, B, device=values.device) if pos is None else pos
        return cls(ids=None, values=values, pos=pos,
                   modality=torch.full((B, L), modality, dtype=torch.long, device=values.device),
                   valid=torch.ones(B, L, dtype=torch.bool, device=values.device) if valid is None else valid)

    # ---------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def _map(self, fn) -> "TokenSequence":
        return TokenSequence(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self)})

    def to(self, device) -> "TokenSequence":
        return self._map(lambda t: t.to(device))

    def slice(self, start: int, end: int | None = None) -> "TokenSequence":
        """Tokens start..end along L (positions are kept, not renumbered)."""
        return self._map(lambda t: t[:, start:end])

    def select(self, index) -> "TokenSequence":
        """Rows of the batch (an int slice, a list or a long / bool tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def gather(self, order: Tensor) -> "TokenSequence":
        """Reorder tokens per row: order (B, L) long gives, for each new slot, the old index."""
        def g(t: Tensor) -> Tensor:
            idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
            return torch.gather(t, 1, idx)
        return self._map(g)

    def repeat(self, n: int) -> "TokenSequence":
        """Stack the batch n times (used to run conditional and null-conditional rows together)."""
        return self._map(lambda t: torch.cat([t] * n, 0))

    @staticmethod
    def batch_cat(*parts: "TokenSequence") -> "TokenSequence":
        """Stack sequences of equal length along the batch."""
        lengths = {p.length for p in parts}
        if len(lengths) != 1:
            raise SeqgenError(f"batch_cat needs sequences of one length; got lengths {sorted(lengths)}")

        def cat(name):
            ts = [getattr(p, name) for p in parts]
            if all(t is None for t in ts):
                return None
            if any(t is None for t in ts):
                raise SeqgenError(f"batch_cat: field {name!r} is set in some parts but not others")
            return torch.cat(ts, 0)
        return TokenSequence(**{f.name: cat(f.name) for f in fields(TokenSequence)})

    def replace(self, **changes: Any) -> "TokenSequence":
        return replace(self, **changes)

    def next_position(self) -> Tensor:
        """(B,) one past the largest coordinate of any valid token: where an appended part starts."""
        p = self.pos.masked_fill(~self.valid.unsqueeze(-1), -1)
        return p.amax(dim=(1, 2)) + 1

    @staticmethod
    def cat(*parts: "TokenSequence", shift_positions: bool = True) -> "TokenSequence":
        """Concatenate along L.  Each later part's coordinates move past the earlier ones (M-RoPE rule)."""
        parts = [p for p in parts if p is not None and p.length > 0] or list(parts[:1])
        if len(parts) == 1:
            return parts[0]
        B = parts[0].batch_size
        for p in parts:
            if p.batch_size != B:
                raise SeqgenError(f"cannot concatenate sequences with batch sizes {[q.batch_size for q in parts]}")
        pos, offset = [], torch.zeros(B, dtype=torch.long, device=parts[0].device)
        for p in parts:
            if shift_positions:
                pos.append(p.pos + offset.view(B, 1, 1))
                offset = torch.maximum(offset, (p.pos + offset.view(B, 1, 1)).masked_fill(
                    ~p.valid.unsqueeze(-1), -1).amax(dim=(1, 2)) + 1)
            else:
                pos.append(p.pos)
        has_ids = any(p.ids is not None for p in parts)
        has_vals = any(p.values is not None for p in parts)
        if has_vals:
            C = {p.values.shape[-1] for p in parts if p.values is not None}
            if len(C) > 1:
                raise SeqgenError(f"cannot concatenate continuous tokens of different widths {sorted(C)}; "
                                  "project them to one width first")
            C = C.pop()

        def ids_of(p):
            return p.ids if p.ids is not None else torch.zeros_like(p.modality)

        def vals_of(p):
            if p.values is not None:
                return p.values
            return torch.zeros(B, p.length, C, device=p.device)

        seg = None
        if any(p.segment is not None for p in parts):
            seg = torch.cat([p.segment if p.segment is not None else torch.zeros_like(p.modality) for p in parts], 1)
        return TokenSequence(
            ids=torch.cat([ids_of(p) for p in parts], 1) if has_ids else None,
            values=torch.cat([vals_of(p) for p in parts], 1) if has_vals else None,
            pos=torch.cat(pos, 1),
            modality=torch.cat([p.modality for p in parts], 1),
            valid=torch.cat([p.valid for p in parts], 1),
            segment=seg,
        )

    # ---------------------------------------------------------------- checks
    def validate(self, specs: list[DomainSpec], allow_special: bool = False) -> "TokenSequence":
        """Check modality indices and that every id lies in its domain's vocabulary.

        allow_special admits the special ids (null / mask / bos) that paradigms feed as inputs.
        """
        m = self.modality
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= len(specs)):
            raise SeqgenError(f"modality index out of range: got {int(m.min())}..{int(m.max())}, "
                              f"the model has {len(specs)} domain(s) {[s.name for s in specs]}")
        for k, spec in enumerate(specs):
            sel = (m == k) & self.valid
            if not bool(sel.any()):
                continue
            if spec.vocab_size is not None:
                if self.ids is None:
                    raise SeqgenError(f"domain {spec.name!r} is discrete but the sequence has no ids")
                ids = self.ids[sel]
                hi = spec.table_size if allow_special else spec.vocab_size
                lo_v, hi_v = int(ids.min()), int(ids.max())
                if lo_v < 0 or hi_v >= hi:
                    raise SeqgenError(f"ids outside the vocabulary of domain {spec.name!r}: got values in "
                                      f"[{lo_v}, {hi_v}], expected 0 <= id < {hi}")
            elif self.values is None:
                raise SeqgenError(f"domain {spec.name!r} is continuous but the sequence has no values")
            elif self.values.shape[-1] != spec.value_dim:
                raise SeqgenError(f"domain {spec.name!r} expects values with C={spec.value_dim}; "
                                  f"got C={self.values.shape[-1]}")
        return self


@dataclass
class Batch:
    """One batch arranged by a paradigm: flat rows holding one example each (padded) or several
    (packed, ``doc`` tells them apart).

    inputs:           what the model reads, (B, L) tokens
    targets:          (B, L) ids the model predicts at each input position (0 where none)
    target_modality:  (B, L) which domain's head predicts each position (routing)
    loss_mask:        (B, L) bool, True where the prediction counts toward the loss
    mask:             the attention MaskSpec
    target_values:    (B, L, C) value targets for continuous domains, or None
    units:            (B, L) float raw units (bytes, pixels ...) each target stands for (0 for END), or None
    doc:              (B, L) long example index inside its row (packing; -1 on padding), or None
    target_pos:       (B, L, 3) coordinates of the token being predicted (random-order AR), or None
    null_cond:        (B,) bool, rows whose condition was dropped to the null condition (padded batches)
    weights:          (B, L) float weight of each target in the NLL *metric* (an evidence bound's
                      weighting: masked paradigms score n / k per masked token), or None (all 1); the
                      training loss ignores it
    """

    inputs: TokenSequence
    targets: Tensor
    target_modality: Tensor
    loss_mask: Tensor
    mask: "MaskSpec"
    target_values: Tensor | None = None
    units: Tensor | None = None
    doc: Tensor | None = None
    target_pos: Tensor | None = None
    null_cond: Tensor | None = None
    weights: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to(self, device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device)
        return Batch(inputs=self.inputs.to(device), targets=self.targets.to(device),
                     target_modality=self.target_modality.to(device), loss_mask=self.loss_mask.to(device),
                     mask=self.mask.to(device), target_values=mv(self.target_values), units=mv(self.units),
                     doc=mv(self.doc), target_pos=mv(self.target_pos), null_cond=mv(self.null_cond),
                     weights=mv(self.weights),
                     extras=self.extras)
