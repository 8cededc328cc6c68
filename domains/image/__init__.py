"""Images as token sequences.

Tokenizations:
  pixels     every pixel (and channel) intensity quantized to ``levels`` values; lossless for the 8x8
             digits at levels=17 (their intensities are k/16).  One token per dimension.
  learned    a patch tokenizer trained with ``seqgen train`` (task: tokenizer); set ``tokenizer`` to its
             run directory.  Encodings are cached on disk per data set.  Three kinds:
               fsq    discrete codes on one grid, one token per code;
               msfsq  discrete codes of a ladder of grids (next-scale prediction, VAR): the spec carries
                      the ``scales``, tokens come scale after scale, raster inside each;
               ae     continuous latent vectors (MAR): the spec has ``value_dim``, tokens carry id -1 and
                      their vector in ``values``.

Raw images are float arrays in [0, 1] of shape (N, H, W) or (N, H, W, C).  Token coordinates are
(channel, row, column) for pixels, (0, row, column) for single-grid tokens and (scale, row, column) for
multi-scale codes, where a code (i, j) of an h_k x w_k scale sits on the final h x w grid at row
floor((i + 0.5) h / h_k), column floor((j + 0.5) w / w_k).  ``scan`` chooses the sequence order of a
single grid (raster, column-wise or anti-diagonal, as in DAR; tiles; windows, as in Token-Shuffle);
coordinates always stay the true 2-D ones, so changing the scan is a one-line config change.

``scan: windows`` (Token-Shuffle: Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image
Generation with Autoregressive Models") groups the grid into ``window x window`` windows: the grid is
padded at the bottom / right to a multiple of ``window`` on each side, then tokens come window after
window (raster over the windows), raster inside each, so every ``window ** 2`` consecutive tokens form one
window (a model may merge them into one step).  Padding cells hold a fixed fill token: for pixel tokens
intensity 0 (id 0); for a learned discrete tokenizer the code it gives a black patch (the most frequent
code of an all-black tokenizer-sized image, ties to the smaller id); for a continuous one the per-channel
median of the latents of an all-black image.  Decoding crops the padding; ``units`` count the padded
tokens too (pixels / tokens).
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

SCANS = ("raster", "column", "diagonal", "tiles", "windows")
TILE_MEMO_MAX = 2_000_000  # distinct tiles whose codes an adapter remembers (about 100 bytes each for 4x4 codes)


def scan_order(height: int, width: int, scan: str, tile: tuple[int, int] | None = None, window: int = 2) -> Tensor:
    """(H*W, 2) long (row, col) of each grid cell in sequence order.  ``tiles``: tile after tile (raster
    over the tiles of a tokenizer-tiled image, e.g. the left digit of a scene, then the right one),
    raster inside each tile.  ``windows``: window after window (raster over the ``window x window``
    windows of a grid whose sides are multiples of ``window``), raster inside each window."""
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
    elif scan == "windows":
        s = window
        if s < 1 or height % s or width % s:
            raise SeqgenError(f"image: scan: windows needs a grid whose sides are multiples of the window {s}; "
                              f"got {height}x{width}")
        key = (((r // s) * (width // s) + c // s) * s + r % s) * s + c % s
    else:
        raise SeqgenError(f"image: unknown scan {scan!r}; known: {', '.join(SCANS)}")
    idx = key.argsort()
    return torch.stack([r[idx], c[idx]], dim=1)


def scale_positions(scales, grid: tuple[int, int]) -> Tensor:
    """(L, 3) long coordinates of multi-scale tokens, scale after scale, raster inside each: token (i, j) of
    scale k (h_k x w_k) at (k, floor((i + 0.5) h / h_k), floor((j + 0.5) w / w_k)) on the final h x w grid."""
    h, w = grid
    out = []
    for k, (hk, wk) in enumerate(scales):
        if hk > h or wk > w:
            raise SeqgenError(f"image: scale {k} ({hk}x{wk}) is finer than the final grid {h}x{w}")
        i, j = torch.meshgrid(torch.arange(hk), torch.arange(wk), indexing="ij")
        rows, cols = ((2 * i + 1) * h) // (2 * hk), ((2 * j + 1) * w) // (2 * wk)  # exact integer floors
        out.append(torch.stack([torch.full_like(rows, k), rows, cols], -1).reshape(-1, 3))
    return torch.cat(out)


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
        trained on smaller images tiles larger ones (28x28 codes side by side for a 28x56 scene); a
        multi-scale one (msfsq) must match the image size"""
        tokenizer_config: str = ""
        """a tokenizer run config (YAML): when the tokenizer run directory holds no trained tokenizer,
        ``seqgen train`` trains it there first"""
        code_features: bool = False
        """learned discrete tokenizer: the model embeds each code also by its quantized vector (a learned
        linear map of the tokenizer's d values, added to the code's own row; ``token_features``)"""
        scan: str = "raster"
        """sequence order over the grid: raster, column, diagonal, tiles (tile after tile of a tiling
        tokenizer, raster inside each: the left digit of a scene, then the right one) or windows
        (Token-Shuffle: window x window windows one after another, raster inside each; the grid padded
        to whole windows).  A multi-scale tokenizer takes raster only (scale after scale)"""
        window: int = 2
        """scan: windows: the side of a window (window ** 2 consecutive tokens form one window)"""

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
        if cfg.window < 1:
            raise SeqgenError(f"image: window must be >= 1, got {cfg.window}")
        self.tokenizer = None
        self.spec = None
        self.kind = "pixels"  # pixels | codes (one grid) | scales (multi-scale codes) | values (continuous)
        self._fill = None
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

    def _set_grid(self, grid: tuple[int, int], vocab: int | None, token_channels: int,
                  value_dim: int | None = None) -> None:
        """One token grid (h, w): ``padded`` is the grid the scan runs over (whole windows for windows)."""
        cfg = self.config
        self.grid, self.token_channels = grid, token_channels
        s = cfg.window if cfg.scan == "windows" else 1
        self.padded = (-(-grid[0] // s) * s, -(-grid[1] // s) * s)
        self.spec = DomainSpec("image", vocab_size=vocab, value_dim=value_dim, pos_axes=2)
        tile = self.tokenizer.grid if self.tokenizer is not None else None
        self._order = scan_order(*self.padded, cfg.scan, tile, cfg.window)  # (hp*wp, 2)
        self._pos = None

    def _set_scales(self, tk) -> None:
        """A multi-scale tokenizer: tokens scale after scale on the shared final grid."""
        cfg = self.config
        if cfg.scan != "raster":
            raise SeqgenError(f"image: a multi-scale tokenizer ({cfg.tokenizer}) orders its tokens scale after "
                              f"scale, raster inside each; scan must be raster, got {cfg.scan!r}")
        if self.tiles != (1, 1):
            raise SeqgenError(f"image: the multi-scale tokenizer {cfg.tokenizer} codes whole {tk.height}x{tk.width} "
                              f"images; it cannot tile a {cfg.height}x{cfg.width} domain (train one on images of "
                              "the domain's size)")
        self.grid = self.padded = tuple(tk.grid)
        self.token_channels = 1
        self.spec = DomainSpec("image", vocab_size=tk.vocab_size, pos_axes=2, scales=tuple(map(tuple, tk.scales)))
        self._pos = scale_positions(self.spec.scales, self.grid)  # (L, 3)
        h, w = self.grid
        slot = torch.full((len(self.spec.scales), h, w), -1, dtype=torch.long)
        slot[self._pos[:, 0], self._pos[:, 1], self._pos[:, 2]] = torch.arange(len(self._pos))
        if int((slot >= 0).sum()) != len(self._pos):
            raise SeqgenError(f"image: scales {self.spec.scales} put two tokens on one cell of the {h}x{w} grid")
        self._slot = slot  # (K, h, w): sequence index of the token at each coordinate, -1 where none
        self._order = None

    def _load_tokenizer(self) -> None:
        from seqgen.domains.tokenizers import is_continuous, load_tokenizer

        cfg = self.config
        self.tokenizer = tk = load_tokenizer(cfg.tokenizer)
        self._tile_memo: dict[bytes, Tensor] = {}
        if tk.channels != cfg.channels or cfg.height % tk.height or cfg.width % tk.width:
            raise SeqgenError(f"image: tokenizer {cfg.tokenizer} was trained on {tk.height}x{tk.width}x{tk.channels} "
                              f"images; the domain is {cfg.height}x{cfg.width}x{cfg.channels} (it must be a grid "
                              "of tokenizer-sized tiles)")
        self.tiles = (cfg.height // tk.height, cfg.width // tk.width)
        grid = (self.tiles[0] * tk.grid[0], self.tiles[1] * tk.grid[1])
        if is_continuous(tk):
            if cfg.code_features:
                raise SeqgenError(f"image: code_features needs a discrete tokenizer; {cfg.tokenizer} is continuous "
                                  f"({tk.latent_dim} floats per patch, no codes)")
            self.kind = "values"
            self._set_grid(grid, None, 1, value_dim=tk.latent_dim)
        elif getattr(tk, "scales", None):
            self.kind = "scales"
            self._set_scales(tk)
        else:
            self.kind = "codes"
            self._set_grid(grid, tk.vocab_size, 1)

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
        if self.kind == "values":
            raise SeqgenError(f"image: code_features needs a discrete tokenizer; {self.config.tokenizer} is "
                              "continuous (no codes)")
        if self.tokenizer is None or not hasattr(self.tokenizer, "quantizer"):
            raise SeqgenError("image: code_features needs a learned tokenizer with a quantizer (FSQ); this domain "
                              f"uses {self.config.tokenizer!r}")
        return self.tokenizer.quantizer.indices_to_values(torch.arange(self.spec.vocab_size)).float()

    def encode_cache(self) -> tuple[Path, str] | None:
        """Encodings of a learned tokenizer are cached in its run folder, keyed by everything that decides them."""
        if self.tokenizer is None:
            return None
        cfg = self.config
        stamp = getattr(self.tokenizer, "checkpoint", "")
        scan = f"windows{cfg.window}" if cfg.scan == "windows" else cfg.scan
        return Path(cfg.tokenizer) / "codes", f"{stamp}_{scan}_{cfg.height}x{cfg.width}"

    # ------------------------------------------------------------------ layout
    @property
    def length(self) -> int:
        if self.kind == "scales":
            return len(self._pos)
        return self.padded[0] * self.padded[1] * self.token_channels

    @property
    def dims_per_token(self) -> float:
        """Raw dimensions (pixels x channels) each token stands for: 1 for per-channel pixel tokens."""
        cfg = self.config
        return cfg.height * cfg.width * cfg.channels / self.length

    def units(self, seq: TokenSequence) -> Tensor:
        return torch.full(tuple(seq.pos.shape[:2]), self.dims_per_token)

    def positions(self) -> Tensor:
        """(L, 3) coordinates in sequence order: (channel, row, col), or (scale, row, col)."""
        if self._pos is not None:
            return self._pos.clone()
        C = self.token_channels
        rc = self._order.repeat_interleave(C, dim=0)
        ch = torch.arange(C).repeat(len(self._order))
        return torch.stack([ch, rc[:, 0], rc[:, 1]], dim=1)

    def layout(self, n: int, length: int | None = None) -> TokenSequence:
        self._require_spec()
        pos = self.positions().unsqueeze(0).expand(n, -1, -1).clone()
        if self.kind == "values":
            return _value_sequence(torch.zeros(n, self.length, self.spec.value_dim), pos)
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
        """Images -> the token grid: (N, h, w, C') long ids (C' = channels for pixels, 1 for codes or rgb),
        or for a continuous tokenizer (N, h, w, value_dim) float values.  Not for multi-scale tokenizers."""
        self._require_spec()
        if self.kind == "scales":
            raise SeqgenError("image: a multi-scale tokenizer has no single token grid; use encode")
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
        rest = tuple(codes.shape[3:])  # (value_dim,) for latents, () for codes
        codes = codes.view(N, th, tw, gh, gw, *rest).transpose(2, 3).reshape(N, th * gh, tw * gw, *rest)
        return codes if self.kind == "values" else codes.unsqueeze(-1)

    def _tile_shape(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tile's encoding by the tokenizer."""
        tk = self.tokenizer
        if self.kind == "scales":
            return (len(self._pos),), torch.long
        if self.kind == "values":
            return (*tk.grid, tk.latent_dim), torch.float32
        return tuple(tk.grid), torch.long

    def _encode_tiles(self, tiles: np.ndarray) -> Tensor:
        """(n, h, w, C) tokenizer-sized tiles -> their encodings (n, gh, gw) codes, (n, L) multi-scale codes or
        (n, gh, gw, c) latents.  A tile whose exact content was encoded before (in this call or an earlier
        one, with this tokenizer) reuses its encoding: a data set that repeats tiles -- scenes drawn from a
        few thousand digits, or augmented copies of them -- encodes each distinct tile once.  Tiles are
        identified by a 128-bit BLAKE2b digest of their bytes."""
        import hashlib

        if not len(tiles):
            shape, dtype = self._tile_shape()
            return torch.zeros(0, *shape, dtype=dtype)
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

    def fill_token(self) -> int | Tensor:
        """What the padding cells of scan: windows hold: an id (pixels: 0; a discrete tokenizer: the most
        frequent code of an all-black image, ties to the smaller id) or, for a continuous tokenizer, a
        (value_dim,) vector (the per-channel median latent of an all-black image).  Computed once."""
        self._require_spec()
        if self._fill is None:
            tk = self.tokenizer
            if tk is None:
                self._fill = 0
            else:
                black = tk.encode(torch.zeros(1, tk.height, tk.width, tk.channels))
                if self.kind == "values":
                    self._fill = black.reshape(-1, black.shape[-1]).float().median(dim=0).values
                else:
                    self._fill = int(torch.bincount(black.reshape(-1)).argmax())  # first maximum: smallest id
        return self._fill

    def _pad_grid(self, grid: Tensor) -> Tensor:
        """(N, h, w, C') -> (N, hp, wp, C'): the scan's padding cells (windows) hold the fill token."""
        h, w = self.grid
        hp, wp = self.padded
        if (hp, wp) == (h, w):
            return grid
        out = torch.empty(grid.shape[0], hp, wp, grid.shape[-1], dtype=grid.dtype)
        out[:] = self.fill_token() if self.kind != "values" else self.fill_token().to(grid.dtype)
        out[:, :h, :w] = grid
        return out

    def encode(self, images) -> TokenSequence:
        """(N, H, W[, C]) floats in [0, 1] -> (N, L) tokens in scan order, local coordinates."""
        self._require_spec()
        if self.kind == "scales":
            codes = self._encode_tiles(self._as_nhwc(images))  # (N, L): the tokenizer's order is the scan
            pos = self.positions().unsqueeze(0).expand(len(codes), -1, -1).clone()
            return TokenSequence.from_ids(codes, pos=pos)
        return self.grid_to_sequence(self.encode_grid(images))

    def grid_to_sequence(self, grid: Tensor) -> TokenSequence:
        """A token grid (encode_grid's) -> (N, L) tokens in scan order (padded to whole windows for windows)."""
        grid = self._pad_grid(grid)
        N = grid.shape[0]
        r, c = self._order[:, 0], self._order[:, 1]
        pos = self.positions().unsqueeze(0).expand(N, -1, -1).clone()
        if self.kind == "values":
            return _value_sequence(grid[:, r, c, :].float(), pos)  # (N, hp*wp, value_dim)
        ids = grid[:, r, c, :].reshape(N, len(r) * grid.shape[-1])  # (N, hp*wp*C') in scan order, channels innermost
        return TokenSequence.from_ids(ids, pos=pos)

    def _check_length(self, seq: TokenSequence) -> None:
        self._require_spec()
        if seq.length != self.length:
            raise SeqgenError(f"image: expected {self.length} tokens per image, got {seq.length}")

    def _cells(self, seq: TokenSequence) -> Tensor:
        """(N, L) index of each token's cell in the padded grid (row-major), read from its coordinates."""
        hp, wp = self.padded
        pos = seq.pos.cpu()
        r, c = pos[..., 1], pos[..., 2]
        if pos.numel() and (int(r.min()) < 0 or int(r.max()) >= hp or int(c.min()) < 0 or int(c.max()) >= wp):
            raise SeqgenError(f"image: token coordinates outside the {hp}x{wp} grid")
        return r * wp + c

    def sequence_to_grid(self, seq: TokenSequence) -> Tensor:
        """Place tokens by their coordinates (any order) -> (N, h, w, C') long (the padding cropped)."""
        self._check_length(seq)
        if self.kind in ("scales", "values"):
            raise SeqgenError(f"image: sequence_to_grid is for single-grid discrete tokens; this domain has "
                              f"{'multi-scale codes' if self.kind == 'scales' else 'continuous values'}")
        if seq.ids is None:
            raise SeqgenError("image: decode needs token ids")
        N = seq.batch_size
        hp, wp = self.padded
        C = self.token_channels
        flat = self._cells(seq) * C + seq.pos[..., 0].cpu()  # (N, L)
        grid = torch.zeros(N, hp * wp * C, dtype=torch.long)
        grid.scatter_(1, flat, seq.ids.cpu())
        return grid.view(N, hp, wp, C)[:, :self.grid[0], :self.grid[1]]

    def sequence_to_values(self, seq: TokenSequence) -> Tensor:
        """Continuous tokens placed by their coordinates (any order) -> (N, h, w, value_dim) float."""
        self._check_length(seq)
        if seq.values is None or seq.values.shape[-1] != self.spec.value_dim:
            raise SeqgenError(f"image: decode needs token values (N, L, {self.spec.value_dim})")
        N = seq.batch_size
        hp, wp = self.padded
        C = self.spec.value_dim
        flat = self._cells(seq)  # (N, L)
        out = torch.zeros(N, hp * wp, C)
        out.scatter_(1, flat.unsqueeze(-1).expand(-1, -1, C), seq.values.detach().cpu().float())
        return out.view(N, hp, wp, C)[:, :self.grid[0], :self.grid[1]]

    def sequence_to_scales(self, seq: TokenSequence) -> Tensor:
        """Multi-scale codes placed by their coordinates (any order) -> (N, L) in the tokenizer's order
        (scale after scale, raster inside each)."""
        self._check_length(seq)
        if seq.ids is None:
            raise SeqgenError("image: decode needs token ids")
        K, h, w = self._slot.shape
        pos = seq.pos.cpu()
        k, r, c = pos[..., 0], pos[..., 1], pos[..., 2]
        ok = (k >= 0) & (k < K) & (r >= 0) & (r < h) & (c >= 0) & (c < w)
        slot = torch.where(ok, self._slot[k.clamp(0, K - 1), r.clamp(0, h - 1), c.clamp(0, w - 1)], -1)
        L = self.length
        if slot.numel() and (not bool((slot >= 0).all())
                             or not torch.equal(slot.sort(1).values, torch.arange(L).expand_as(slot))):
            raise SeqgenError("image: multi-scale tokens must sit at the (scale, row, col) coordinates of the "
                              f"scales {self.spec.scales}, each once")
        codes = torch.zeros(seq.batch_size, L, dtype=torch.long)
        codes.scatter_(1, slot, seq.ids.cpu())
        return codes

    def decode(self, seq: TokenSequence) -> list[np.ndarray]:
        """Tokens -> a list of (H, W) or (H, W, C) float images in [0, 1]."""
        cfg = self.config
        self._require_spec()
        if self.kind == "scales":
            codes = self.sequence_to_scales(seq)
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.spec.vocab_size):
                raise SeqgenError(f"image: token ids outside 0..{self.spec.vocab_size - 1}")
            x = self.tokenizer.decode(codes).numpy() if len(codes) else \
                np.zeros((0, cfg.height, cfg.width, cfg.channels), np.float32)
            x = x[..., 0] if cfg.channels == 1 else x
            return list(x)
        if self.kind == "values":
            grid = self.sequence_to_values(seq)  # (N, h, w, c)
            if grid.numel() and not torch.isfinite(grid).all():
                raise SeqgenError("image: token values must be finite")
        else:
            grid = self.sequence_to_grid(seq)
            if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= self.spec.vocab_size):
                raise SeqgenError(f"image: token ids outside 0..{self.spec.vocab_size - 1}")
        if self.tokenizer is None:
            if self._joint:
                base = cfg.levels ** torch.arange(cfg.channels)
                grid = (grid // base) % cfg.levels
            x = grid.float().numpy() / (cfg.levels - 1)
        else:
            tk, (th, tw) = self.tokenizer, self.tiles
            gh, gw = tk.grid
            codes = grid if self.kind == "values" else grid[..., 0]
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


def _value_sequence(values: Tensor, pos: Tensor) -> TokenSequence:
    """Continuous tokens (N, L, c) -> a TokenSequence whose ids are -1 (value tokens)."""
    N, L = values.shape[:2]
    return TokenSequence(ids=torch.full((N, L), -1, dtype=torch.long), values=values, pos=pos,
                         modality=torch.zeros(N, L, dtype=torch.long), valid=torch.ones(N, L, dtype=torch.bool))


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
