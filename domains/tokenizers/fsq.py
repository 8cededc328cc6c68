"""A learned image patch tokenizer: a small convolutional autoencoder with finite scalar quantization.

FSQ (Mentzer, Minnen, Agustsson, Tschannen, 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").
The encoder maps every ``patch x patch`` pixel patch to a d-dimensional vector, d = len(levels).  Each
dimension i is squashed into a bounded interval and rounded to one of ``levels[i]`` integers; the code of
a patch is the tuple of integers read as one mixed-radix number, so the implicit codebook has
prod(levels) entries (the paper's recommended [8, 5, 5, 5] -> 1000) and nothing needs learning, no
commitment loss, no codebook collapse.  Rounding passes gradients straight through (Bengio et al.,
2013; the paper's Sec. 3.1).

The bound below is a variant of the appendix code's ``tanh(z + shift) * (L - 1)(1 - eps)/2 - offset``:
that one needs offset / half_l < 1, which fails for L = 2, and it gives the two outermost integers
half-width bins; here the bounded interval spans L whole bins around the centre of the L integers.

    bound(z)_i = centre_i + half_l_i * tanh(z_i + shift_i)
        half_l_i = L_i (1 - eps) / 2
        centre_i = -1/2 if L_i is even else 0     (even L: the L integers -L/2 .. L/2 - 1)
        shift_i  = atanh(-centre_i / half_l_i)    (so bound(0) = 0)
    zhat_i  = round(bound(z)_i) / (L_i // 2)      in [-1, 1], the decoder's input
    code_i  = round(bound(z)_i) + L_i // 2        in 0 .. L_i - 1
    index   = sum_i code_i * prod_{j<i} L_j       in 0 .. prod(L) - 1

Encoder: 3x3 conv, then log2(patch) stages of [residual blocks, stride-2 3x3 conv] (width doubles each
stage), residual blocks at the code grid, a 1x1 projection to d.  The decoder mirrors it with nearest
upsampling and ends in a sigmoid, so reconstructions lie in [0, 1].  Loss: MSE (+ optional L1).
Images whose sides are not multiples of ``patch`` are zero-padded at the bottom / right and the
reconstruction is cropped back.

Shape letters: N images, H x W pixels, C channels, h x w code grid, d = len(levels), F feature width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.registry import register_tokenizer
from seqgen.types import SeqgenError


# ------------------------------------------------------------------------------------------ quantizer
class FSQ(nn.Module):
    """Finite scalar quantization of the last dimension; no parameters."""

    def __init__(self, levels: list[int] | tuple[int, ...], eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise SeqgenError(f"fsq: levels must be a non-empty list of integers >= 2 (e.g. [8, 5, 5, 5]); got {levels}")
        self.levels = levels
        self.codebook_size = math.prod(levels)
        self.eps = eps
        L = torch.tensor(levels, dtype=torch.float64)
        half_l = L * (1 - eps) / 2
        centre = torch.where(torch.tensor(levels) % 2 == 0, -0.5, 0.0).double()
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), 0)  # mixed-radix place values
        # derived from the config, so not saved with the weights
        self.register_buffer("half_l", half_l.float(), persistent=False)
        self.register_buffer("centre", centre.float(), persistent=False)
        self.register_buffer("shift", torch.atanh(-centre / half_l).float(), persistent=False)
        self.register_buffer("half_width", torch.tensor([v // 2 for v in levels], dtype=torch.long), persistent=False)
        self.register_buffer("levels_t", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def bound(self, z: Tensor) -> Tensor:
        """(..., d) -> (..., d), dimension i strictly inside (centre_i - L_i/2, centre_i + L_i/2), so rounding
        gives exactly the L_i integers -(L_i // 2) .. (L_i - 1) // 2."""
        return self.centre + self.half_l * torch.tanh(z + self.shift)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (..., d) float -> (zhat (..., d) on the grid in [-1, 1] with straight-through gradients,
        indices (...) long)."""
        if z.shape[-1] != self.dim:
            raise SeqgenError(f"fsq: expected vectors of {self.dim} dims (one per level); got shape {tuple(z.shape)}")
        zb = self.bound(z.float())
        rounded = zb + (torch.round(zb) - zb).detach()  # straight-through estimator
        codes = torch.round(zb.detach()).long() + self.half_width  # (..., d) in 0 .. L_i - 1
        return rounded / self.half_width, self.codes_to_indices(codes)

    # mixed-radix bookkeeping ------------------------------------------------------------
    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., d) per-dimension integers in 0 .. L_i - 1 -> (...) indices in 0 .. prod(L) - 1."""
        return (codes.long() * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) indices -> (..., d) per-dimension integers."""
        return (indices.long().unsqueeze(-1) // self.basis) % self.levels_t

    def indices_to_values(self, indices: Tensor) -> Tensor:
        """(...) indices -> (..., d) quantized vectors in [-1, 1] (what the decoder reads)."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise SeqgenError(f"fsq: code indices must lie in 0..{self.codebook_size - 1}; "
                              f"got {int(indices.min())}..{int(indices.max())}")
        codes = self.indices_to_codes(indices)
        return (codes - self.half_width).float() / self.half_width


# ------------------------------------------------------------------------------------------ conv net
def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 8), ch)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))))))  (pre-activation residual block, He et al., 2016)."""

    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _widths(width: int, stages: int) -> list[int]:
    return [width * 2 ** i for i in range(stages + 1)]  # full resolution .. code grid


class Encoder(nn.Module):
    """(N, C, H, W) -> (N, d, H / 2^stages, W / 2^stages)."""

    def __init__(self, channels: int, width: int, stages: int, blocks: int, dim: int):
        super().__init__()
        ws = _widths(width, stages)
        layers: list[nn.Module] = [nn.Conv2d(channels, ws[0], 3, padding=1)]
        for i in range(stages):
            layers += [ResBlock(ws[i]) for _ in range(blocks)]
            layers.append(nn.Conv2d(ws[i], ws[i + 1], 3, stride=2, padding=1))  # halves H and W
        layers += [ResBlock(ws[-1]) for _ in range(blocks)]
        layers += [_norm(ws[-1]), nn.SiLU(), nn.Conv2d(ws[-1], dim, 1)]  # projection to the FSQ dims
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(N, d, h, w) -> (N, C, h * 2^stages, w * 2^stages) logits."""

    def __init__(self, channels: int, width: int, stages: int, blocks: int, dim: int):
        super().__init__()
        ws = _widths(width, stages)
        layers: list[nn.Module] = [nn.Conv2d(dim, ws[-1], 3, padding=1)]  # projection back from the FSQ dims
        layers += [ResBlock(ws[-1]) for _ in range(blocks)]
        for i in reversed(range(stages)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ws[i + 1], ws[i], 3, padding=1)]
            layers += [ResBlock(ws[i]) for _ in range(blocks)]
        layers += [_norm(ws[0]), nn.SiLU(), nn.Conv2d(ws[0], channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# ------------------------------------------------------------------------------------------ tokenizer
ENCODE_SLICE = 128
"""images per encoder call inside ``FSQTokenizer.encode``"""

class PatchImages:
    """What every patch tokenizer (fsq, msfsq, ae) shares: a checkpoint that says which images it reads
    (the ``geometry`` buffer, H, W, C), the check of input images, and zero-padding to whole patches.
    A subclass sets ``kind`` (its registry name, for messages) and has ``height, width, channels, grid``
    and ``config.patch``."""

    kind = "tokenizer"

    @classmethod
    def from_state(cls, config, state: dict[str, Tensor]):
        """Rebuild from a saved state dict (the geometry comes from its ``geometry`` tensor)."""
        if "geometry" not in state or state["geometry"].numel() != 3:
            raise SeqgenError(f"{cls.kind}: the checkpoint has no image geometry; it was not written by an "
                              f"{cls.kind} tokenizer run")
        H, W, C = (int(v) for v in state["geometry"])
        model = cls(config, height=H, width=W, channels=C)
        model.load_state_dict(state)
        return model

    def _check_images(self, x: Tensor) -> Tensor:
        """(N, H, W, C) or, for one channel, (N, H, W) floats in [0, 1] -> (N, C, H, W)."""
        if not torch.is_tensor(x):
            raise SeqgenError(f"{self.kind}: images must be a float tensor; got {type(x).__name__}")
        if x.dim() == 3 and self.channels == 1:
            x = x.unsqueeze(-1)
        want = (self.height, self.width, self.channels)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise SeqgenError(f"{self.kind}: expected images of shape (N, {want[0]}, {want[1]}, {want[2]}); got "
                              f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise SeqgenError(f"{self.kind}: images must be floats in [0, 1]; got dtype {x.dtype}")
        return x.permute(0, 3, 1, 2)

    def _pad(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, h * patch, w * patch), zero-padded at the bottom / right."""
        p = self.config.patch
        return F.pad(x, (0, self.grid[1] * p - self.width, 0, self.grid[0] * p - self.height))


@register_tokenizer("fsq")
class FSQTokenizer(PatchImages, nn.Module):
    """Images (N, H, W, C) in [0, 1] <-> codes (N, h, w) in 0 .. prod(levels) - 1.

    Built by ``TokenizerTask`` with the training images' geometry, which is also stored as the
    ``geometry`` buffer so ``load_tokenizer`` rebuilds the model from the checkpoint alone.
    """

    kind = "fsq"

    @dataclass
    class Config:
        patch: int = 4
        """pixels per side of the square patch one code stands for (a power of 2: 1, 2, 4, 8, ...)"""
        levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
        """FSQ levels per code dimension; the vocabulary is their product ([8, 5, 5, 5] -> 1000)"""
        width: int = 32
        """conv channels at full resolution, doubled at each stride-2 stage"""
        blocks: int = 1
        """residual blocks per resolution (encoder and decoder each)"""
        l1_weight: float = 0.0
        """weight of an L1 term added to the MSE reconstruction loss"""

        @classmethod
        def tiny(cls) -> "FSQTokenizer.Config":
            return cls(patch=2, levels=[5, 5, 5], width=16, blocks=1)

    def __init__(self, config: "FSQTokenizer.Config | None" = None, height: int = 0, width: int = 0,
                 channels: int = 1):
        super().__init__()
        self.config = cfg = config or self.Config()
        p = cfg.patch
        if p < 1 or p & (p - 1):
            raise SeqgenError(f"fsq: patch must be a power of 2 (1, 2, 4, 8, ...); got {p}")
        if cfg.width < 1 or cfg.blocks < 0:
            raise SeqgenError(f"fsq: width must be >= 1 and blocks >= 0; got width {cfg.width}, blocks {cfg.blocks}")
        if min(height, width, channels) < 1:
            raise SeqgenError(f"fsq: image geometry must be positive (height, width, channels); "
                              f"got {height}x{width}x{channels}")
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.grid = (math.ceil(height / p), math.ceil(width / p))  # (h, w)
        self.quantizer = FSQ(cfg.levels)
        self.vocab_size = self.quantizer.codebook_size
        stages = p.bit_length() - 1
        d = self.quantizer.dim
        self.encoder = Encoder(channels, cfg.width, stages, cfg.blocks, d)
        self.decoder = Decoder(channels, cfg.width, stages, cfg.blocks, d)
        # saved with the weights: a checkpoint alone says what images the tokenizer reads
        self.register_buffer("geometry", torch.tensor([height, width, channels], dtype=torch.long))

    def _decode_values(self, zhat: Tensor) -> Tensor:
        """(N, h, w, d) quantized vectors -> (N, H, W, C) in [0, 1]."""
        logits = self.decoder(zhat.permute(0, 3, 1, 2).to(self.geometry.device))  # (N, C, h*p, w*p)
        x = torch.sigmoid(logits.float())[:, :, :self.height, :self.width]
        return x.permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, H, W, C) in [0, 1] -> (reconstruction (N, H, W, C), code indices (N, h, w))."""
        x = self._pad(self._check_images(images))  # (N, C, h*p, w*p)
        z = self.encoder(x).permute(0, 2, 3, 1)  # (N, h, w, d)
        zhat, idx = self.quantizer(z)  # (N, h, w, d), (N, h, w)
        return self._decode_values(zhat), idx

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch.images  # (N, H, W, C)
        recon, _ = self(x)
        err = recon - x.float()
        mse = err.pow(2).mean()
        l1 = err.abs().mean()
        loss = mse + self.config.l1_weight * l1 if self.config.l1_weight else mse
        return loss, {"mse": mse.detach(), "l1": l1.detach()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(N, H, W, C) floats in [0, 1] -> (N, h, w) long codes, on the input's device."""
        x = self._check_images(images)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise SeqgenError(f"fsq: image values must be finite and in [0, 1]; got range [{float(x.min())}, {float(x.max())}]")
        x = self._pad(x.to(self.geometry.device, torch.float32))
        # in slices: the full-resolution activations of a slice stay in the CPU's cache (on a 2-core CPU
        # 0.3 ms per 32x32 image in slices of 128 against 0.5-0.7 ms in one batch of 512)
        z = torch.cat([self.encoder(x[i:i + ENCODE_SLICE]) for i in range(0, len(x), ENCODE_SLICE)]) \
            if len(x) else self.encoder(x)
        return self.quantizer(z.permute(0, 2, 3, 1))[1].to(images.device)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(N, h, w) integer codes -> (N, H, W, C) floats in [0, 1], on the codes' device."""
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise SeqgenError(f"fsq: codes must be an integer tensor of shape (N, {self.grid[0]}, {self.grid[1]})")
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise SeqgenError(f"fsq: expected codes of shape (N, {self.grid[0]}, {self.grid[1]}); got {tuple(codes.shape)}")
        zhat = self.quantizer.indices_to_values(codes.to(self.geometry.device))  # (N, h, w, d); checks the range
        return self._decode_values(zhat).to(codes.device)
