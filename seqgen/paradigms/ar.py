"""Next-token prediction, in raster order or in random order (RAR).

Training (``prepare``).  The sequence is [prefix | data]: the prefix is the condition (a class token, a
text prompt) or a start token.  Inputs are full[:-1], targets full[1:], and the loss counts only
targets that are data tokens.

Random order (RAR, Yu et al., 2024, "Randomized Autoregressive Visual Generation").  With
probability r each example's data tokens are permuted; tokens keep their true N-D coordinates (RoPE
reads them), and every input token also carries the coordinates of the token it must predict
(``Batch.target_pos``, embedded by ``TargetPositionEmbedding``) so the model knows where the next
token goes.  r is annealed: 1 until ``anneal_start`` (a fraction of training), then linearly to 0 at
``anneal_end``, after which training is plain raster order.

Condition dropout.  With probability ``cond_dropout`` the condition is replaced by the null condition
(the domain's null id), so one model learns p(x | c) and p(x); sampling combines them with
classifier-free guidance: logits = u + s * (c - u).

Generation (``generate``).  Prefill the prompt into a KV cache, then one token per step, in raster or a
per-sample random order.  With guidance the conditional and null rows run as one doubled batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import causal
from ..registry import register_paradigm
from ..sampling import cfg_scale_at
from ..types import Batch, SeqgenError, TokenSequence

ORDERS = ("raster", "random")


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

        @classmethod
        def tiny(cls) -> "AutoRegressive.Config":
            return cls()

    def __init__(self, config: "AutoRegressive.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.order not in ORDERS:
            raise SeqgenError(f"ar: unknown order {cfg.order!r}; known: {', '.join(ORDERS)}")
        if not 0.0 <= cfg.anneal_start <= cfg.anneal_end <= 1.0:
            raise SeqgenError(f"ar: need 0 <= anneal_start <= anneal_end <= 1; got {cfg.anneal_start}, {cfg.anneal_end}")
        if not 0.0 <= cfg.cond_dropout < 1.0:
            raise SeqgenError(f"ar: cond_dropout must be in [0, 1); got {cfg.cond_dropout}")

    @property
    def needs_target_pos(self) -> bool:
        return self.config.order == "random"

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
    def prepare(self, data: TokenSequence, prefix: TokenSequence | None = None, *,
                null_prefix: TokenSequence | None = None, generator: torch.Generator | None = None,
                progress: float = 0.0) -> Batch:
        """Arrange one training batch.

        data:         (B, L) tokens to model
        prefix:       (B, P) condition or start token, never predicted (None: the first data token is
                      not predicted either, as for windows cut from a long text)
        null_prefix:  (B, P) the null condition that ``cond_dropout`` swaps in
        progress:     fraction of training done, for the RAR annealing schedule
        """
        B, L = data.batch_size, data.length
        device = data.device
        null = None
        r = self.permute_rate(progress)
        if r > 0:
            order = random_orders(B, L, generator, device)
            if r < 1:
                keep = _rand((B,), generator, device) >= r  # these rows stay in raster order
                order = torch.where(keep.unsqueeze(1), torch.arange(L, device=device).expand(B, L), order)
            data = data.gather(order)
        if prefix is not None and null_prefix is not None and self.config.cond_dropout > 0:
            if null_prefix.length != prefix.length:
                raise SeqgenError("null condition must have the same length as the condition")
            null = _rand((B,), generator, device) < self.config.cond_dropout
            prefix = prefix.replace(ids=torch.where(null.unsqueeze(1), null_prefix.ids, prefix.ids))
        P = 0 if prefix is None else prefix.length
        full = TokenSequence.cat(prefix, data) if prefix is not None else data
        if full.ids is None:
            raise SeqgenError("the ar paradigm with a categorical head needs discrete ids")
        inputs = full.slice(0, -1)
        idx = torch.arange(P + L - 1, device=device)
        loss_mask = (idx >= P - 1).unsqueeze(0) & full.valid[:, 1:]
        return Batch(inputs=inputs, targets=full.ids[:, 1:], target_modality=full.modality[:, 1:],
                     loss_mask=loss_mask, mask=causal(),
                     target_pos=full.pos[:, 1:] if self.needs_target_pos else None, null_cond=null)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, model, prompt: TokenSequence, layout: TokenSequence, *,
                 null_prompt: TokenSequence | None = None, generator: torch.Generator | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 cfg_scale: float = 1.0, cfg_schedule: str = "constant", order: str = "raster",
                 max_context: int | None = None, progress=None) -> TokenSequence:
        """Sample the tokens of ``layout`` one at a time after ``prompt``.

        prompt:  (B, P >= 1) condition, start token, or text to continue
        layout:  (B, n) what to generate: coordinates (local to the layout) and modality; ids ignored
        order:   raster (layout order) or random (a uniform permutation per row; the model must have
                 been trained with random orders)
        max_context: when the prompt plus the output outgrow it, keep the newest half and re-prefill
        progress: optional callable(step, total) for progress bars
        Returns the layout with sampled ids, in layout order.
        """
        if prompt is None or prompt.length < 1:
            raise SeqgenError("ar.generate needs a prompt of at least one token (a condition or start token)")
        if order not in ORDERS:
            raise SeqgenError(f"unknown sampling order {order!r}; known: {', '.join(ORDERS)}")
        if order == "random" and getattr(model, "target_pos", None) is None:
            raise SeqgenError("random-order sampling needs a model trained with order=random (target positions)")
        B, P, n = prompt.batch_size, prompt.length, layout.length
        if layout.batch_size != B:
            raise SeqgenError(f"layout batch size {layout.batch_size} != prompt batch size {B}")
        device = prompt.device
        guided = cfg_scale != 1.0
        if guided and null_prompt is None:
            raise SeqgenError("classifier-free guidance (cfg_scale != 1) needs a null prompt")
        placed = TokenSequence.cat(prompt, layout.replace(ids=torch.zeros_like(layout.modality)))
        out = placed.slice(P)  # the layout with global coordinates
        perm = (random_orders(B, n, generator, device) if order == "random"
                else torch.arange(n, device=device).expand(B, n))
        seq = out.gather(perm)  # generation order
        rows = prompt
        if guided:
            if null_prompt.length != P or null_prompt.batch_size != B:
                raise SeqgenError(f"null prompt must have the prompt's shape ({B}, {P}); "
                                  f"got ({null_prompt.batch_size}, {null_prompt.length})")
            rows = TokenSequence.batch_cat(prompt, null_prompt)
        reps = 2 if guided else 1
        seq_r = seq.repeat(reps)
        total = P + n
        ctx = total if max_context is None else min(total, max_context)
        if rows.length >= ctx:  # a prompt longer than the window: keep its newest half
            rows = rows.slice(rows.length - max(1, ctx // 2))
        cache = model.init_cache(B * reps, ctx)
        history = rows  # tokens fed so far (kept only for re-prefill when the window slides)
        tp = torch.cat([rows.pos[:, 1:], seq_r.pos[:, :1]], 1)
        h = model(rows, mask=causal(), cache=cache, target_pos=tp)[:, -1]
        ids = torch.zeros(B, n, dtype=torch.long, device=device)
        for t in range(n):
            head = model.head_for(model.predict_head_index(seq.modality[:, t]))
            s = cfg_scale_at(cfg_scale, t, n, cfg_schedule)
            if guided:
                tok = head.sample(h[:B], h_uncond=h[B:], cfg_scale=s, generator=generator,
                                  temperature=temperature, top_k=top_k, top_p=top_p)
            else:
                tok = head.sample(h, generator=generator, temperature=temperature, top_k=top_k, top_p=top_p)
            ids[:, t] = tok
            if progress is not None:
                progress(t + 1, n)
            if t == n - 1:
                break
            step = seq_r.slice(t, t + 1).replace(ids=tok.repeat(reps).unsqueeze(1))
            step_tp = seq_r.pos[:, t + 1:t + 2]
            if cache.length + 1 > ctx:  # slide the window: keep the newest half, prefill again
                keep = max(1, ctx // 2)
                history = TokenSequence.cat(history, step, shift_positions=False)
                recent = history.slice(history.length - keep)
                cache = model.init_cache(B * reps, ctx)
                tp_r = torch.cat([recent.pos[:, 1:], step_tp], 1)
                h = model(recent, mask=causal(), cache=cache, target_pos=tp_r)[:, -1]
                continue
            if max_context is not None:
                history = TokenSequence.cat(history, step, shift_positions=False)
            h = model(step, mask=causal(), cache=cache, target_pos=step_tp, padded=False)[:, -1]
        # back to layout order
        inv = perm.argsort(dim=1)
        return layout.replace(ids=torch.gather(ids, 1, inv))
