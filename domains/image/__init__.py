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

SCANS = ("raster", "column", "diagonal", "tiles")
TILE_MEMO_MAX = 2_000_000  # distinct tiles whose codes an adapter remembers (about 100 bytes each for 4x4 codes)


def scan_order(height: int, width: int, scan: str, tile: tuple[int, int] | None = None) -> Tensor:
    """(H*W, 2) long (row, col) of each grid cell in sequence order.  ``tiles``: tile after tile (raster
    over the tiles of a tokenizer-tiled image, e.g. the left digit of a scene, then the right one),
    raster inside each tile."""
    r, c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    if scan == "tiles":
        if tile is None:
            raise SeqgenError("image: scan: tiles needs a tokenizer that tiles the image (tokenizer-sized tiles)")
        th, tw = tile
        tiles_w = width // tw
        key = (((r // th) * tiles_w + c // tw) * th + r % th) * tw + c % tw
        idx = key.argsort()
        return torch.stack([r[idx], c[idx]], dim=1)
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
    variable_length = False
    unit = "dim"
    sample_suffix = ".png"

    @dataclass
    class Config:
        height: int = 8
        width: int = 8
        channels: int = 1
        levels: int = 17
        """pixel tokens: intensities quantized to this many values"""
        pixel_tokens: str = "channels"
        """pixel tokens: channels (one token per channel value, vocabulary levels) or rgb (one token per
        pixel, vocabulary levels ** channels: three times shorter sequences for colour images)"""
        tokenizer: str = "pixels"
        """pixels, or the run directory of a trained patch tokenizer (task: tokenizer).  A tokenizer
        trained on smaller images tiles larger ones (28x28 codes side by side for a 28x56 scene)"""
        tokenizer_config: str = ""
        """a tokenizer run config (YAML): when the tokenizer run directory holds no trained tokenizer,
        ``seqgen train`` trains it there first"""
        code_features: bool = False
        """learned tokenizer: the model embeds each code also by its quantized vector (a learned linear
        map of the tokenizer's d values, added to the code's own row; ``token_features``)"""
        scan: str = "raster"
        """sequence order over the grid: raster, column, diagonal, or tiles (tile after tile of a tiling
        tokenizer, raster inside each: the left digit of a scene, then the right one)"""

        @classmethod
        def tiny(cls) -> "ImageDomain.Config":
            return cls(height=4, width=4, levels=5)

    def __init__(self, config: "ImageDomain.Config | None" = None):
        self.config = cfg = config or self.Config()
        if min(cfg.height, cfg.width, cfg.channels) < 1:
            raise SeqgenError(f"image: height, width and channels must be >= 1; got {cfg}")
        if cfg.pixel_tokens not in ("channels", "rgb"):
            raise SeqgenError(f"image: pixel_tokens must be channels or rgb, got {cfg.pixel_tokens!r}")
        if cfg.scan not in SCANS:
            raise SeqgenError(f"image: unknown scan {cfg.scan!r}; known: {', '.join(SCANS)}")
        self.tokenizer = None
        self.spec = None
        if cfg.tokenizer == "pixels":
            if cfg.levels < 2:
                raise SeqgenError(f"image: levels must be >= 2, got {cfg.levels}")
            self._set_grid((cfg.height, cfg.width), cfg.levels ** cfg.channels if self._joint else cfg.levels,
                           1 if self._joint else cfg.channels)
        elif _has_tokenizer(cfg.tokenizer) or not cfg.tokenizer_config:
            self._load_tokenizer()

    @property
    def _joint(self) -> bool:
        return self.config.tokenizer == "pixels" and self.config.pixel_tokens == "rgb" and self.config.channels > 1

    def _set_grid(self, grid: tuple[int, int], vocab: int, token_channels: int) -> None:
        self.grid, self.token_channels = grid, token_channels
        self.spec = DomainSpec("image", vocab_size=vocab, pos_axes=2)
        tile = self.tokenizer.grid if self.tokenizer is not None else None
        self._order = scan_order(*grid, self.config.scan, tile)  # (h*w, 2)

    def _load_tokenizer(self) -> None:
        from seqgen.domains.tokenizers import load_tokenizer

        cfg = self.config
        self.tokenizer = tk = load_tokenizer(cfg.tokenizer)
        self._tile_memo: dict[bytes, Tensor] = {}
        if tk.channels != cfg.channels or cfg.height % tk.height or cfg.width % tk.width:
            raise SeqgenError(f"image: tokenizer {cfg.tokenizer} was trained on {tk.height}x{tk.width}x{tk.channels} "
                              f"images; the domain is {cfg.height}x{cfg.width}x{cfg.channels} (it must be a grid "
                              "of tokenizer-sized tiles)")
        self.tiles = (cfg.height // tk.height, cfg.width // tk.width)
        self._set_grid((self.tiles[0] * tk.grid[0], self.tiles[1] * tk.grid[1]), tk.vocab_size, 1)

    def fit(self, train_items=None, run_dir: Path | None = None) -> None:
        """Find the tokenizer run, or train it first from ``tokenizer_config`` when it is missing."""
        cfg = self.config
        if cfg.tokenizer == "pixels" or self.tokenizer is not None:
            return
        if not _has_tokenizer(cfg.tokenizer):
            from seqgen.config import RunConfig
            from seqgen.train import train

            log.warning("image: no tokenizer in %s: training it from %s first", cfg.tokenizer, cfg.tokenizer_config)
            train(RunConfig.load(cfg.tokenizer_config), cfg.tokenizer, resume=True, progress_bar=False)
        self._load_tokenizer()

    def token_features(self) -> Tensor | None:
        """(V, d) quantized vector of every code of the tokenizer (``code_features``), else None."""
        if not self.config.code_features:
            return None
        self._require_spec()
        if self.tokenizer is None or not hasattr(self.tokenizer, "quantizer"):
            raise SeqgenError("image: code_features needs a learned tokenizer with a quantizer (FSQ); this domain "
                              f"uses {self.config.tokenizer!r}")
        return self.tokenizer.quantizer.indices_to_values(torch.arange(self.spec.vocab_size)).float()

    def encode_cache(self) -> tuple[Path, str] | None:
        """Codes of a learned tokenizer are cached in its run folder, keyed by everything that decides them."""
        if self.tokenizer is None:
            return None
        stamp = getattr(self.tokenizer, "checkpoint", "")
        return Path(self.config.tokenizer) / "codes", f"{stamp}_{self.config.scan}_{self.config.height}x{self.config.width}"

    # ------------------------------------------------------------------ layout
    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1] * self.token_channels

    @property
    def dims_per_token(self) -> float:
        """Raw dimensions (pixels x channels) each token stands for: 1 for per-channel pixel tokens."""
        cfg = self.config
        return cfg.height * cfg.width * cfg.channels / self.length

    def units(self, seq: TokenSequence) -> Tensor:
        return torch.full(seq.ids.shape, self.dims_per_token)

    def positions(self) -> Tensor:
        """(L, 3) coordinates in sequence order: (channel, row, col)."""
        C = self.token_channels
        rc = self._order.repeat_interleave(C, dim=0)
        ch = torch.arange(C).repeat(len(self._order))
        return torch.stack([ch, rc[:, 0], rc[:, 1]], dim=1)

    def layout(self, n: int, length: int | None = None) -> TokenSequence:
        pos = self.positions().unsqueeze(0).expand(n, -1, -1).clone()
        return TokenSequence.from_ids(torch.zeros(n, self.length, dtype=torch.long), pos=pos)

    # ------------------------------------------------------------------ encode / decode
    def _as_nhwc(self, images) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        cfg = self.config
        if x.ndim == 3 and cfg.channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1:] != (cfg.height, cfg.width, cfg.channels):
            raise SeqgenError(f"image: expected images of shape (N, {cfg.height}, {cfg.width}"
                              f"{'' if cfg.channels == 1 else f', {cfg.channels}'}); got {tuple(np.shape(images))}")
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise SeqgenError(f"image: values must be finite and in [0, 1]; got range [{x.min()}, {x.max()}]")
        return x

    def _require_spec(self) -> None:
        if self.spec is None:
            raise SeqgenError(f"image: the tokenizer {self.config.tokenizer} is not trained yet; call fit() "
                              "(seqgen train does, from image.tokenizer_config)")

    def encode_grid(self, images) -> Tensor:
        """Images -> (N, h, w, C') long token grid (C' = channels for pixels, 1 for codes or rgb)."""
        self._require_spec()
        x = self._as_nhwc(images)
        if self.tokenizer is None:
            q = torch.from_numpy(np.rint(x * (self.config.levels - 1))).long()
            if self._joint:
                base = self.config.levels ** torch.arange(self.config.channels)
                q = (q * base).sum(-1, keepdim=True)
            return q
        tk = self.tokenizer
        th, tw = self.tiles
        N = x.shape[0]
        # (N, th, tw, tile_h, tile_w, C): every tokenizer-sized tile, encoded once per distinct content
        tiles = x.reshape(N, th, tk.height, tw, tk.width, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
        codes = self._encode_tiles(np.ascontiguousarray(tiles).reshape(N * th * tw, tk.height, tk.width, x.shape[-1]))
        gh, gw = tk.grid
        codes = codes.view(N, th, tw, gh, gw).permute(0, 1, 3, 2, 4).reshape(N, th * gh, tw * gw)
        return codes.unsqueeze(-1)

    def _encode_tiles(self, tiles: np.ndarray) -> Tensor:
        """(n, h, w, C) tokenizer-sized tiles -> (n, gh, gw) codes.  A tile whose exact content was encoded
        before (in this call or an earlier one, with this tokenizer) reuses its codes: a data set that
        repeats tiles -- scenes drawn from a few thousand digits, or augmented copies of them -- encodes each
        distinct tile once.  Tiles are identified by a 128-bit BLAKE2b digest of their bytes."""
        import hashlib

        if not len(tiles):
            return torch.zeros(0, *self.tokenizer.grid, dtype=torch.long)
        memo = self._tile_memo
        if len(memo) + len(tiles) > TILE_MEMO_MAX:
            memo.clear()  # bounded memory: start again (the codes are the same either way)
        keys = [hashlib.blake2b(t.tobytes(), digest_size=16).digest() for t in tiles]
        missing: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in memo and k not in missing:
                missing[k] = i
        if missing:
            new = self.tokenizer.encode(torch.from_numpy(tiles[list(missing.values())]))
            memo.update(zip(missing, new))
        return torch.stack([memo[k] for k in keys])

    def encode(self, images) -> TokenSequence:
        """(N, H, W[, C]) floats in [0, 1] -> (N, L) tokens in scan order, local coordinates."""
        return self.grid_to_sequence(self.encode_grid(images))

    def grid_to_sequence(self, grid: Tensor) -> TokenSequence:
        N = grid.shape[0]
        r, c = self._order[:, 0], self._order[:, 1]
        ids = grid[:, r, c, :].reshape(N, len(r) * grid.shape[-1])  # (N, h*w*C') in scan order, channels innermost
        pos = self.positions().unsqueeze(0).expand(N, -1, -1).clone()
        return TokenSequence.from_ids(ids, pos=pos)

    def sequence_to_grid(self, seq: TokenSequence) -> Tensor:
        """Place tokens by their coordinates (any order) -> (N, h, w, C') long."""
        self._require_spec()
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

    def decode(self, seq: TokenSequence) -> list[np.ndarray]:
        """Tokens -> a list of (H, W) or (H, W, C) float images in [0, 1]."""
        grid = self.sequence_to_grid(seq)
        if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= self.spec.vocab_size):
            raise SeqgenError(f"image: token ids outside 0..{self.spec.vocab_size - 1}")
        cfg = self.config
        if self.tokenizer is None:
            if self._joint:
                base = cfg.levels ** torch.arange(cfg.channels)
                grid = (grid // base) % cfg.levels
            x = grid.float().numpy() / (cfg.levels - 1)
        else:
            tk, (th, tw) = self.tokenizer, self.tiles
            gh, gw = tk.grid
            codes = grid[..., 0]
            x = np.zeros((grid.shape[0], cfg.height, cfg.width, cfg.channels), np.float32)
            for i in range(th):
                for j in range(tw):
                    x[:, i * tk.height:(i + 1) * tk.height, j * tk.width:(j + 1) * tk.width] = tk.decode(
                        codes[:, i * gh:(i + 1) * gh, j * gw:(j + 1) * gw].contiguous()).numpy()
        x = x[..., 0] if cfg.channels == 1 else x
        return list(x)

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> list[np.ndarray]:
        cfg = self.config
        x = torch.rand(n, cfg.height, cfg.width, cfg.channels, generator=generator).numpy()
        return list(x[..., 0] if cfg.channels == 1 else x)

    # ------------------------------------------------------------------ files
    def read_file(self, path: str | Path) -> np.ndarray:
        """A PNG / JPEG a person gives -> one raw image (checked against the domain's size)."""
        from PIL import Image, UnidentifiedImageError

        cfg = self.config
        try:
            im = Image.open(path)
            im = im.convert("L" if cfg.channels == 1 else "RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise SeqgenError(f"image: cannot read {path}: {e}") from None
        if im.size != (cfg.width, cfg.height):
            raise SeqgenError(f"image: {path} is {im.size[0]}x{im.size[1]} (width x height); this model reads "
                              f"{cfg.width}x{cfg.height} images")
        return np.asarray(im, np.float32) / 255.0

    def write_samples(self, images, path: str | Path, nrow: int | None = None, **_) -> Path:
        """Save images as one PNG grid (each cell scaled up to at least 32 px)."""
        return save_image_grid(np.stack([np.asarray(x) for x in images]), path, nrow)


def _has_tokenizer(run_dir: str) -> bool:
    from seqgen.checkpoint import latest_checkpoint

    p = Path(run_dir)
    return p.is_dir() and latest_checkpoint(p) is not None


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
