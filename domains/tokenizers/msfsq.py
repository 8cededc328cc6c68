"""A residual multi-scale image tokenizer for next-scale prediction.

VAR (Tian, Jiang, Yuan, Peng, Wang, 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", Sec. 3.2 and Algorithms 1-2): one encoder gives a latent map f (N, d, h, w); a
ladder of token maps r_1 .. r_K of growing side s_1 < ... < s_K = h quantizes it coarse to fine, each
scale coding what the coarser ones left over:

    r = f
    for k in 1..K:
        q_k = quantize(gain_k * area_downsample(r, s_k)) / gain_k      (s_k x s_k codes)
        u_k = upsample(q_k, h x w)                                      (bicubic, as VAR)
        r   = r - u_k
    f_hat = sum_k u_k  ->  decoder  ->  image

so decoding only the first k scales gives a coarse image that sharpens as k grows.  The conv encoder and
decoder are those of the FSQ tokenizer (``fsq.py``); the encoder's output passes through tanh, so f lies
in (-1, 1) like FSQ's quantized values.

Quantizer.  VAR learns one codebook shared by all scales (residual VQ).  Here every scale quantizes on the
FSQ lattice (Mentzer et al., 2023): dimension i is clamped to the L_i integers -(L_i // 2) .. (L_i - 1) // 2
(after multiplying by L_i // 2) and rounded, so a code is the tuple of integers read as one mixed-radix
number -- one vocabulary of prod(levels) codes, no codebook to learn or collapse, the same index bookkeeping
as ``FSQ`` (``codes_to_indices``, ``indices_to_values``).  A hard clamp replaces FSQ's tanh bound because a
residual quantizer must be close to the identity inside its range; what the clamp cuts off is left in the
residual and coded by the next scale.  Rounding passes gradients straight through (Bengio et al., 2013),
which makes f_hat's gradient with respect to f the identity (the last scale is the full grid).

Per-scale gain.  Residuals shrink down the ladder (after the coarse scales only detail and rounding error
are left), so a fixed lattice would round most fine-scale residuals to 0.  Each scale therefore multiplies
its residual by ``gain_k = spread / rms_k`` before rounding (and divides after), with rms_k the
per-dimension root-mean-square of that scale's downsampled residual, measured on the training batches
(a running average, like BatchNorm's statistics; fixed in eval mode, saved with the weights).  A
straight-through estimator gives a learned gain no gradient, hence the measurement.  ``gain: fixed``
uses gain 1 at every scale instead (measured on MNIST, see examples/configs/mnist_msfsq.yaml).

Shape letters: N images, H x W pixels, C channels, h x w final grid, K scales, d = len(levels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.registry import register_tokenizer
from seqgen.types import SeqgenError

from .fsq import PatchImages, FSQ, ENCODE_SLICE, Decoder, Encoder


def scale_grids(sides: list[int], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Scale sides (the last = the grid's longer side) -> the (h_k, w_k) token grid of every scale.  For a
    square grid scale k is s_k x s_k; a non-square grid shrinks both sides in proportion."""
    h, w = grid
    S = max(h, w)
    sides = [int(s) for s in sides]
    if not sides or min(sides) < 1 or any(b <= a for a, b in zip(sides, sides[1:])):
        raise SeqgenError(f"msfsq: scales must be increasing positive integers (e.g. [1, 2, 3, 4, 5, 7]); got {sides}")
    if sides[-1] != S:
        raise SeqgenError(f"msfsq: the last scale must equal the code grid's side {S} (images "
                          f"{h}x{w} patches); got scales {sides}")
    return [(max(1, round(s * h / S)), max(1, round(s * w / S))) for s in sides]


@register_tokenizer("msfsq")
class MultiScaleFSQTokenizer(PatchImages, nn.Module):
    """Images (N, H, W, C) in [0, 1] <-> codes of K scales, (N, L) with L = sum_k h_k * w_k: scale after
    scale, coarse to fine, raster order inside a scale; every code in 0 .. prod(levels) - 1."""

    kind = "msfsq"

    @dataclass
    class Config:
        patch: int = 4
        """pixels per side of the square patch one final-scale code stands for (a power of 2)"""
        levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
        """FSQ levels per code dimension; one vocabulary of their product shared by all scales"""
        scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 7])
        """side of every scale's token grid, coarse to fine; the last equals the code grid's side"""
        width: int = 32
        """conv channels at full resolution, doubled at each stride-2 stage"""
        blocks: int = 1
        """residual blocks per resolution (encoder and decoder each)"""
        gain: str = "rms"
        """per-scale input gain of the quantizer: rms (spread / measured RMS of the scale's residual) or
        fixed (1 at every scale)"""
        spread: float = 0.5
        """gain: rms: the residual's RMS maps to this fraction of the lattice's half-range"""
        upsample: str = "bicubic"
        """how a scale's codes are spread over the final grid: bicubic (VAR) or bilinear"""
        stats_momentum: float = 0.01
        """weight of the newest training batch in the running RMS of each scale's residual"""
        l1_weight: float = 0.0
        """weight of an L1 term added to the MSE reconstruction loss"""
        prefix_weight: float = 0.0
        """weight of a second MSE term: every training image is also decoded from the first k of its
        scales, k drawn uniformly from 1 .. K - 1, so coarse prefixes decode to coarse images"""

        @classmethod
        def tiny(cls) -> "MultiScaleFSQTokenizer.Config":
            return cls(patch=2, levels=[5, 5, 5], scales=[1, 2, 4], width=16, blocks=1)

    def __init__(self, config: "MultiScaleFSQTokenizer.Config | None" = None, height: int = 0, width: int = 0,
                 channels: int = 1):
        super().__init__()
        self.config = cfg = config or self.Config()
        p = cfg.patch
        if p < 1 or p & (p - 1):
            raise SeqgenError(f"msfsq: patch must be a power of 2 (1, 2, 4, 8, ...); got {p}")
        if cfg.width < 1 or cfg.blocks < 0:
            raise SeqgenError(f"msfsq: width must be >= 1 and blocks >= 0; got width {cfg.width}, blocks {cfg.blocks}")
        if min(height, width, channels) < 1:
            raise SeqgenError(f"msfsq: image geometry must be positive (height, width, channels); "
                              f"got {height}x{width}x{channels}")
        if cfg.gain not in ("rms", "fixed"):
            raise SeqgenError(f"msfsq: gain must be rms or fixed; got {cfg.gain!r}")
        if cfg.upsample not in ("bicubic", "bilinear"):
            raise SeqgenError(f"msfsq: upsample must be bicubic or bilinear; got {cfg.upsample!r}")
        if not 0 < cfg.stats_momentum <= 1 or cfg.spread <= 0:
            raise SeqgenError(f"msfsq: stats_momentum must be in (0, 1] and spread > 0; got {cfg.stats_momentum}, "
                              f"{cfg.spread}")
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.grid = (math.ceil(height / p), math.ceil(width / p))  # (h, w) of the finest scale
        self.scales = scale_grids(cfg.scales, self.grid)  # [(h_k, w_k)], coarse to fine
        self.scale_lengths = [a * b for a, b in self.scales]
        self.length = sum(self.scale_lengths)  # L codes per image
        self.quantizer = FSQ(cfg.levels)
        self.vocab_size = self.quantizer.codebook_size
        d = self.quantizer.dim
        stages = p.bit_length() - 1
        self.encoder = Encoder(channels, cfg.width, stages, cfg.blocks, d)
        self.decoder = Decoder(channels, cfg.width, stages, cfg.blocks, d)
        hw = self.quantizer.half_width.float()
        # the lattice per dimension, in units of L // 2: integers -(L // 2) .. (L - 1) // 2
        self.register_buffer("lo", -hw, persistent=False)
        self.register_buffer("hi", (self.quantizer.levels_t - 1 - self.quantizer.half_width).float(), persistent=False)
        # saved with the weights: the image geometry and the measured residual RMS of every scale
        self.register_buffer("geometry", torch.tensor([height, width, channels], dtype=torch.long))
        self.register_buffer("residual_rms", torch.ones(len(self.scales), d))
        self.register_buffer("stats_steps", torch.zeros((), dtype=torch.long))

    def _latent(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> f (N, d, h, w) in (-1, 1)."""
        return torch.tanh(self.encoder(self._pad(x)).float())

    def gains(self) -> Tensor:
        """(K, d) input gain of every scale's quantizer."""
        if self.config.gain == "fixed":
            return torch.ones_like(self.residual_rms)
        return self.config.spread / self.residual_rms.clamp_min(1e-4)

    def _up(self, q: Tensor) -> Tensor:
        """(N, d, h_k, w_k) -> (N, d, h, w)."""
        if tuple(q.shape[-2:]) == self.grid:
            return q
        return F.interpolate(q, size=self.grid, mode=self.config.upsample, align_corners=False)

    def _down(self, r: Tensor, size: tuple[int, int]) -> Tensor:
        return r if tuple(r.shape[-2:]) == size else F.interpolate(r, size=size, mode="area")

    def _quantize(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """v (..., d) in lattice units of 1 / (L // 2) -> (value on the lattice with straight-through
        gradients, index (...) long)."""
        hw = self.quantizer.half_width
        ints = torch.round(torch.minimum(torch.maximum(v.detach() * hw, self.lo), self.hi))
        q = v + (ints / hw - v).detach()
        return q, self.quantizer.codes_to_indices(ints.long() + hw)

    def _residual_quantize(self, f: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """f (N, d, h, w) -> (f_hat (N, d, h, w), codes [(N, h_k, w_k)], partial sums [sum_{j<=k} u_j])."""
        r, f_hat, codes, partial = f, torch.zeros_like(f), [], []
        gains = self.gains()  # (K, d)
        update = self.training and self.config.gain == "rms"
        if update:
            m = max(self.config.stats_momentum, 1.0 / float(self.stats_steps + 1))  # a plain mean at first
        for k, size in enumerate(self.scales):
            rk = self._down(r, size)  # (N, d, h_k, w_k)
            if update:
                with torch.no_grad():
                    rms = rk.detach().pow(2).mean(dim=(0, 2, 3)).sqrt()
                    self.residual_rms[k].lerp_(rms, m)
            g = gains[k].view(1, -1, 1, 1)
            q, idx = self._quantize((rk * g).permute(0, 2, 3, 1))  # (N, h_k, w_k, d), (N, h_k, w_k)
            u = self._up(q.permute(0, 3, 1, 2) / g)
            r = r - u
            f_hat = f_hat + u
            codes.append(idx)
            partial.append(f_hat)
        if update:
            self.stats_steps += 1
        return f_hat, codes, partial

    def _decode_latent(self, f_hat: Tensor) -> Tensor:
        """(N, d, h, w) -> (N, H, W, C) in [0, 1]."""
        logits = self.decoder(f_hat.to(self.geometry.device))
        x = torch.sigmoid(logits.float())[:, :, :self.height, :self.width]
        return x.permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, H, W, C) in [0, 1] -> (reconstruction (N, H, W, C), codes (N, L))."""
        f = self._latent(self._check_images(images))
        f_hat, codes, _ = self._residual_quantize(f)
        return self._decode_latent(f_hat), torch.cat([c.flatten(1) for c in codes], 1)

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.images.float()
        f = self._latent(self._check_images(x))
        f_hat, _, partial = self._residual_quantize(f)
        recon = self._decode_latent(f_hat)
        err = recon - x
        mse = err.pow(2).mean()
        l1 = err.abs().mean()
        loss = mse + self.config.l1_weight * l1 if self.config.l1_weight else mse
        metrics = {"mse": mse.detach(), "l1": l1.detach()}
        K = len(self.scales)
        if self.config.prefix_weight and K > 1:
            k = torch.randint(0, K - 1, (len(x),), device=f.device)  # prefix of k + 1 scales, 1 .. K - 1
            coarse = torch.stack(partial[:-1])[k, torch.arange(len(x), device=f.device)]  # (N, d, h, w)
            prefix_mse = (self._decode_latent(coarse) - x).pow(2).mean()
            loss = loss + self.config.prefix_weight * prefix_mse
            metrics["prefix_mse"] = prefix_mse.detach()
        return loss, metrics

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode_scales(self, images: Tensor) -> list[Tensor]:
        """(N, H, W, C) floats in [0, 1] -> K code maps [(N, h_k, w_k) long], coarse to fine."""
        x = self._check_images(images)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise SeqgenError(f"msfsq: image values must be finite and in [0, 1]; got range [{float(x.min())}, {float(x.max())}]")
        x = x.to(self.geometry.device, torch.float32)
        was = self.training
        self.eval()  # no statistics update
        try:
            parts = [self._residual_quantize(self._latent(x[i:i + ENCODE_SLICE]))[1]
                     for i in range(0, max(len(x), 1), ENCODE_SLICE)]
        finally:
            self.train(was)
        return [torch.cat([p[k] for p in parts]).to(images.device) for k in range(len(self.scales))]

    @torch.no_grad()
    def decode_scales(self, codes: list[Tensor]) -> Tensor:
        """The first k <= K code maps [(N, h_j, w_j)] -> (N, H, W, C) in [0, 1]: the sum of their upsampled
        values, decoded (fewer scales: a coarser image)."""
        if not isinstance(codes, (list, tuple)) or not 1 <= len(codes) <= len(self.scales):
            raise SeqgenError(f"msfsq: decode_scales needs a list of 1..{len(self.scales)} code maps, coarse to fine")
        N = codes[0].shape[0] if torch.is_tensor(codes[0]) else -1
        gains = self.gains()
        f_hat = None
        for k, c in enumerate(codes):
            if not torch.is_tensor(c) or c.is_floating_point() or c.dtype == torch.bool:
                raise SeqgenError(f"msfsq: codes must be integer tensors; scale {k} is {type(c).__name__} "
                                  f"{getattr(c, 'dtype', '')}")
            if tuple(c.shape) != (N, *self.scales[k]):
                raise SeqgenError(f"msfsq: scale {k} codes must have shape (N, {self.scales[k][0]}, "
                                  f"{self.scales[k][1]}) with one N; got {tuple(c.shape)}")
            v = self.quantizer.indices_to_values(c.to(self.geometry.device))  # (N, h_k, w_k, d); checks the range
            u = self._up(v.permute(0, 3, 1, 2) / gains[k].view(1, -1, 1, 1))
            f_hat = u if f_hat is None else f_hat + u
        return self._decode_latent(f_hat).to(codes[0].device)

    def split(self, codes: Tensor) -> list[Tensor]:
        """(N, L) -> [(N, h_k, w_k)]."""
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise SeqgenError(f"msfsq: codes must be an integer tensor of shape (N, {self.length})")
        if codes.dim() != 2 or codes.shape[1] != self.length:
            raise SeqgenError(f"msfsq: expected codes of shape (N, {self.length}) (scales {self.scales}); "
                              f"got {tuple(codes.shape)}")
        return [c.reshape(-1, *hw) for c, hw in zip(codes.split(self.scale_lengths, 1), self.scales)]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(N, H, W, C) floats in [0, 1] -> (N, L) long: all scales, coarse to fine, raster inside each."""
        return torch.cat([c.flatten(1) for c in self.encode_scales(images)], 1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(N, L) integer codes -> (N, H, W, C) floats in [0, 1]."""
        return self.decode_scales(self.split(codes))
