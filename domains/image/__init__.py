"""Images as token sequences.

Two tokenizations:
  pixels     every pixel (and channel) intensity quantized to ``levels`` values; lossless for the 8x8
             digits at levels=17 (their intensities are k/16).  One token per dimension.
  learned    a patch tokenizer (FSQ autoencoder) trained with ``seqgen train`` (task: tokenizer); set
             ``tokenizer`` to its run directory.  Codes are cached on disk per data set.

Raw images are float arrays in [0, 1] of shape (N, H, W) or (N, H, W, C).  Token coordinates are
(channel, row, column) for pixels and (0, row, column) for patch codes.  ``scan`` chooses the
sequence order (raster, column-wise or anti-diagonal, as in DAR); coordinates always stay the true
2-D ones, so changing the scan is a one-line config change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seqgen.registry import register_domain
from seqgen.types import DomainSpec, SeqgenError, TokenSequence

log = logging.getLogger(__name__)

SCANS = ("raster", "column", "diagonal")


def scan_order(height: int, width: int, scan: str) -> Tensor:
    """(H*W, 2) long (row, col) of each grid cell in sequence order."""
    r, c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    if scan == "raster":
        key = r * width + c
    elif scan == "column":
        key = c * height + r
    elif scan == "diagonal":
        key = (r + c) * (height + width) + r
    else:
        raise SeqgenError(f"image: unknown scan {scan!r}; known: {', '.join(SCANS)}")
    idx = key.argsort()
    return torch.stack([r[idx], c[idx]], dim=1)


@register_domain("image")
class ImageDomain:
    @dataclass
    class Config:
        height: int = 8
        width: int = 8
        channels: int = 1
        levels: int = 17
        """pixel tokens: intensities quantized to this many values (vocabulary size)"""
        tokenizer: str = "pixels"
        """pixels, or the run directory of a trained patch tokenizer (task: tokenizer)"""
        scan: str = "raster"
        """sequence order over the grid: raster, column or diagonal"""

        @classmethod
        def tiny(cls) -> "ImageDomain.Config":
            return cls(height=4, width=4, levels=5)

    def __init__(self, config: "ImageDomain.Config | None" = None, modality: int = 0):
        self.config = cfg = config or self.Config()
        self.modality = modality
        if min(cfg.height, cfg.width, cfg.channels) < 1:
            raise SeqgenError(f"image: height, width and channels must be >= 1; got {cfg}")
        self.tokenizer = None
        if cfg.tokenizer == "pixels":
            if cfg.levels < 2:
                raise SeqgenError(f"image: levels must be >= 2, got {cfg.levels}")
            self.grid = (cfg.height, cfg.width)
            self.token_channels = cfg.channels
            vocab = cfg.levels
        else:
            from seqgen.domains.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer)
            tk = self.tokenizer
            if (tk.height, tk.width, tk.channels) != (cfg.height, cfg.width, cfg.channels):
                raise SeqgenError(f"image: tokenizer {cfg.tokenizer} was trained on {tk.height}x{tk.width}x{tk.channels} "
                                  f"images, the domain is {cfg.height}x{cfg.width}x{cfg.channels}")
            self.grid = tk.grid
            self.token_channels = 1
            vocab = tk.vocab_size
        self.spec = DomainSpec("image", vocab_size=vocab, pos_axes=2)
        self._order = scan_order(*self.grid, cfg.scan)  # (h*w, 2)

    # ------------------------------------------------------------------ layout
    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1] * self.token_channels

    @property
    def dims_per_token(self) -> float:
        """Raw dimensions (pixels x channels) each token stands for: 1 for pixel tokens."""
        cfg = self.config
        return cfg.height * cfg.width * cfg.channels / self.length

    def positions(self) -> Tensor:
        """(L, 3) coordinates in sequence order: (channel, row, col)."""
        C = self.token_channels
        rc = self._order.repeat_interleave(C, dim=0)
        ch = torch.arange(C).repeat(len(self._order))
        return torch.stack([ch, rc[:, 0], rc[:, 1]], dim=1)

    def layout(self, batch_size: int, device=None) -> TokenSequence:
        pos = self.positions().to(device).unsqueeze(0).expand(batch_size, -1, -1).clone()
        return TokenSequence.from_ids(torch.zeros(batch_size, self.length, dtype=torch.long, device=device),
                                      pos=pos, modality=self.modality)

    # ------------------------------------------------------------------ encode / decode
    def _as_nhwc(self, images) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        cfg = self.config
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != (cfg.height, cfg.width, cfg.channels):
            raise SeqgenError(f"image: expected images of shape (N, {cfg.height}, {cfg.width}"
                              f"{'' if cfg.channels == 1 else f', {cfg.channels}'}); got {tuple(np.shape(images))}")
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise SeqgenError(f"image: values must be finite and in [0, 1]; got range [{x.min()}, {x.max()}]")
        return x

    def encode_grid(self, images) -> Tensor:
        """Images -> (N, h, w, C') long token grid (C' = channels for pixels, 1 for codes)."""
        x = self._as_nhwc(images)
        if self.tokenizer is None:
            return torch.from_numpy(np.rint(x * (self.config.levels - 1))).long()
        return self.tokenizer.encode(torch.from_numpy(x)).unsqueeze(-1)

    def encode(self, images) -> TokenSequence:
        """(N, H, W[, C]) floats in [0, 1] -> (N, L) tokens in scan order."""
        grid = self.encode_grid(images)
        return self.grid_to_sequence(grid)

    def grid_to_sequence(self, grid: Tensor) -> TokenSequence:
        N = grid.shape[0]
        r, c = self._order[:, 0], self._order[:, 1]
        ids = grid[:, r, c, :].reshape(N, -1)  # (N, h*w*C') in scan order, channels innermost
        pos = self.positions().unsqueeze(0).expand(N, -1, -1).clone()
        return TokenSequence.from_ids(ids, pos=pos, modality=self.modality)

    def sequence_to_grid(self, seq: TokenSequence) -> Tensor:
        """Place tokens by their coordinates (any order) -> (N, h, w, C') long."""
        if seq.ids is None:
            raise SeqgenError("image: decode needs token ids")
        N, L = seq.ids.shape
        if L != self.length:
            raise SeqgenError(f"image: expected {self.length} tokens per image, got {L}")
        h, w = self.grid
        C = self.token_channels
        pos = seq.pos.cpu()
        flat = (pos[..., 1] * w + pos[..., 2]) * C + pos[..., 0]  # (N, L)
        grid = torch.zeros(N, h * w * C, dtype=torch.long)
        grid.scatter_(1, flat, seq.ids.cpu())
        return grid.view(N, h, w, C)

    def decode(self, seq: TokenSequence) -> np.ndarray:
        """Tokens -> (N, H, W) or (N, H, W, C) floats in [0, 1]."""
        grid = self.sequence_to_grid(seq)
        if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= self.spec.vocab_size):
            raise SeqgenError(f"image: token ids outside 0..{self.spec.vocab_size - 1}")
        if self.tokenizer is None:
            x = grid.float().numpy() / (self.config.levels - 1)
        else:
            x = self.tokenizer.decode(grid[..., 0]).numpy()
        return x[..., 0] if self.config.channels == 1 else x

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> np.ndarray:
        cfg = self.config
        x = torch.rand(n, cfg.height, cfg.width, cfg.channels, generator=generator).numpy()
        return x[..., 0] if cfg.channels == 1 else x

    # ------------------------------------------------------------------ files
    def write_samples(self, images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
        """Save images as one PNG grid (each cell scaled up to at least 32 px)."""
        return save_image_grid(images, path, nrow)


def save_image_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    from PIL import Image

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    N, H, W, C = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(N)))
    ncol = int(np.ceil(N / nrow))
    scale = max(1, int(np.ceil(32 / max(H, W))))
    Hs, Ws = H * scale, W * scale
    canvas = np.ones(((Hs + pad) * nrow + pad, (Ws + pad) * ncol + pad, C), np.float32) * 0.5
    for i in range(N):
        r, c = divmod(i, ncol)
        cell = np.kron(x[i], np.ones((scale, scale, 1), np.float32))
        canvas[pad + r * (Hs + pad): pad + r * (Hs + pad) + Hs, pad + c * (Ws + pad): pad + c * (Ws + pad) + Ws] = cell
    arr = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)
    return path
