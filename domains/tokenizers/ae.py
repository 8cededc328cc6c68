"""A continuous image tokenizer: a small KL-regularised autoencoder with a few latent channels per patch.

The continuous tokens of MAR (Li, Tian, Li, Deng, He, 2024, "Autoregressive Image Generation without
Vector Quantization"): every ``patch x patch`` pixel patch becomes a vector of ``latent_dim`` floats that
a diffusion head models directly, no codebook.  The conv encoder and decoder are those of the FSQ tokenizer
(``fsq.py``); the encoder gives a diagonal Gaussian posterior per patch (mean and log-variance, the KL
autoencoder of latent diffusion: Rombach et al., 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3 and App. G), trained on samples of it with

    loss = MSE(decode(mu + sigma * eps), x)  +  kl_weight * mean KL(N(mu, sigma^2) || N(0, 1))

The sampling noise makes the decoder tolerate small errors in its input and the KL keeps the latent
compact and centred: both make the latent a better target for a diffusion head.

Tokens are the posterior *mean*, normalised per channel, (mu - mean_c) / std_c, so they have roughly zero
mean and unit variance (a diffusion head's noise schedule assumes data of that scale; latent diffusion
rescales its latents the same way).  mean_c and std_c are measured on the training split: running
averages of each training batch's posterior means, kept as buffers (``latent_mean``, ``latent_std``) that
are saved with the weights and fixed in eval mode, so encoding is deterministic.  The decoder itself
works on raw latents; normalisation is an affine map on either side of it.

Shape letters: N images, H x W pixels, C image channels, h x w latent grid, c = latent_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.registry import register_tokenizer
from seqgen.types import SeqgenError

from .fsq import PatchImages, ENCODE_SLICE, Decoder, Encoder


@register_tokenizer("ae")
class AETokenizer(PatchImages, nn.Module):
    """Images (N, H, W, C) in [0, 1] <-> normalised latents (N, h, w, latent_dim) floats."""

    kind = "ae"

    vocab_size = None  # continuous: no vocabulary

    @dataclass
    class Config:
        patch: int = 4
        """pixels per side of the square patch one latent vector stands for (a power of 2)"""
        latent_dim: int = 4
        """floats per patch (the continuous token's channels)"""
        width: int = 32
        """conv channels at full resolution, doubled at each stride-2 stage"""
        blocks: int = 1
        """residual blocks per resolution (encoder and decoder each)"""
        kl_weight: float = 1e-4
        """weight of the mean KL divergence per latent value (relative to the per-pixel MSE); 0 trains a
        plain autoencoder on the posterior mean (no sampling noise)"""
        stats_momentum: float = 0.01
        """weight of the newest training batch in the running per-channel mean / std of the latents"""
        l1_weight: float = 0.0
        """weight of an L1 term added to the MSE reconstruction loss"""

        @classmethod
        def tiny(cls) -> "AETokenizer.Config":
            return cls(patch=2, latent_dim=3, width=16, blocks=1)

    def __init__(self, config: "AETokenizer.Config | None" = None, height: int = 0, width: int = 0,
                 channels: int = 1):
        super().__init__()
        self.config = cfg = config or self.Config()
        p = cfg.patch
        if p < 1 or p & (p - 1):
            raise SeqgenError(f"ae: patch must be a power of 2 (1, 2, 4, 8, ...); got {p}")
        if cfg.width < 1 or cfg.blocks < 0 or cfg.latent_dim < 1:
            raise SeqgenError(f"ae: width and latent_dim must be >= 1 and blocks >= 0; got width {cfg.width}, "
                              f"latent_dim {cfg.latent_dim}, blocks {cfg.blocks}")
        if cfg.kl_weight < 0 or not 0 < cfg.stats_momentum <= 1:
            raise SeqgenError(f"ae: kl_weight must be >= 0 and stats_momentum in (0, 1]; got {cfg.kl_weight}, "
                              f"{cfg.stats_momentum}")
        if min(height, width, channels) < 1:
            raise SeqgenError(f"ae: image geometry must be positive (height, width, channels); "
                              f"got {height}x{width}x{channels}")
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.grid = (math.ceil(height / p), math.ceil(width / p))
        self.latent_dim = c = cfg.latent_dim
        stages = p.bit_length() - 1
        self.encoder = Encoder(channels, cfg.width, stages, cfg.blocks, 2 * c)  # mean and log-variance
        self.decoder = Decoder(channels, cfg.width, stages, cfg.blocks, c)
        self.register_buffer("geometry", torch.tensor([height, width, channels], dtype=torch.long))
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.register_buffer("stats_steps", torch.zeros((), dtype=torch.long))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> mean, log-variance (N, c, h, w) of the raw (unnormalised) latent."""
        mu, logvar = self.encoder(self._pad(x)).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def normalise(self, mu: Tensor) -> Tensor:
        """Raw latents (N, c, h, w) -> tokens (N, h, w, c)."""
        return ((mu - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)).permute(0, 2, 3, 1)

    def denormalise(self, z: Tensor) -> Tensor:
        """Tokens (N, h, w, c) -> raw latents (N, c, h, w)."""
        return z.permute(0, 3, 1, 2) * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def _decode_raw(self, z: Tensor) -> Tensor:
        logits = self.decoder(z.to(self.geometry.device))
        x = torch.sigmoid(logits.float())[:, :, :self.height, :self.width]
        return x.permute(0, 2, 3, 1)

    @torch.no_grad()
    def _update_stats(self, mu: Tensor) -> None:
        m = max(self.config.stats_momentum, 1.0 / float(self.stats_steps + 1))  # a plain mean at first
        mean = mu.mean(dim=(0, 2, 3))
        std = mu.var(dim=(0, 2, 3), unbiased=False).sqrt().clamp_min(1e-6)
        self.latent_mean.lerp_(mean, m)
        self.latent_std.lerp_(std, m)
        self.stats_steps += 1

    # ------------------------------------------------------------------ training
    def _run(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images -> (reconstruction (N, H, W, C), mu, logvar (N, c, h, w)).  In training mode the decoder
        reads a sample of the posterior and the latent statistics are updated; in eval mode its mean."""
        mu, logvar = self.posterior(self._check_images(images))
        z = mu
        if self.training:
            self._update_stats(mu.detach())
            if self.config.kl_weight > 0:
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self._decode_raw(z), mu, logvar

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images -> (reconstruction (N, H, W, C), normalised posterior means (N, h, w, c))."""
        recon, mu, _ = self._run(images)
        return recon, self.normalise(mu.detach())

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.images
        recon, mu, logvar = self._run(x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # per latent value
        err = recon - x.float()
        mse = err.pow(2).mean()
        l1 = err.abs().mean()
        loss = mse
        if self.config.l1_weight:
            loss = loss + self.config.l1_weight * l1
        if self.config.kl_weight:
            loss = loss + self.config.kl_weight * kl
        return loss, {"mse": mse.detach(), "l1": l1.detach(), "kl": kl.detach()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(N, H, W, C) floats in [0, 1] -> (N, h, w, latent_dim) normalised posterior means (deterministic),
        on the input's device."""
        x = self._check_images(images)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise SeqgenError(f"ae: image values must be finite and in [0, 1]; got range [{float(x.min())}, {float(x.max())}]")
        x = x.to(self.geometry.device, torch.float32)
        mu = torch.cat([self.posterior(x[i:i + ENCODE_SLICE])[0] for i in range(0, len(x), ENCODE_SLICE)]) \
            if len(x) else self.posterior(x)[0]
        return self.normalise(mu).to(images.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(N, h, w, latent_dim) normalised latents -> (N, H, W, C) floats in [0, 1], on the latents' device."""
        want = (*self.grid, self.latent_dim)
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise SeqgenError(f"ae: latents must be a float tensor of shape (N, {want[0]}, {want[1]}, {want[2]})")
        if latents.dim() != 4 or tuple(latents.shape[1:]) != want:
            raise SeqgenError(f"ae: expected latents of shape (N, {want[0]}, {want[1]}, {want[2]}); "
                              f"got {tuple(latents.shape)}")
        if latents.numel() and not torch.isfinite(latents).all():
            raise SeqgenError("ae: latents must be finite")
        z = self.denormalise(latents.to(self.geometry.device, torch.float32))
        return self._decode_raw(z).to(latents.device)
