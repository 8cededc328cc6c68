"""A tokenizer run (``task: tokenizer``): train a patch tokenizer on a data set's images with the normal
trainer, measure it, and load a trained one for the image domain.

    seqgen train examples/configs/mnist_fsq.yaml --out runs/mnist_fsq   # TokenizerTask drives the trainer
    seqgen eval runs/mnist_fsq                                          # TokenizerTask.evaluate_run
    seqgen sample runs/mnist_fsq                                        # originals over reconstructions
    tk = load_tokenizer("runs/mnist_fsq")                               # what ImageDomain(tokenizer=...) uses
    codes = tk.encode(x)   # (N, 28, 28, 1) in [0, 1] -> (N, 7, 7) long
    x_hat = tk.decode(codes)

Held-out metrics: ``recon_mse`` (mean squared error per pixel and channel), ``recon_psnr``
(10 log10(1 / recon_mse), pixels in [0, 1]), ``mean_image_mse`` (the MSE of always predicting the
training split's mean image: a tokenizer must do much better), and

  discrete tokenizers (``vocab_size``: fsq, msfsq): ``codebook_usage`` (fraction of the vocabulary used at
      least once on the held-out split) and ``code_perplexity`` (exp of the entropy of the held-out code
      histogram: the effective number of codes in use);
  multi-scale tokenizers (``scales``: msfsq): ``prefix_mse_k`` / ``prefix_psnr_k`` for k = 1 .. K, the
      reconstruction error from the first k scales alone (coarse to fine; k = K is ``recon_mse``);
  continuous tokenizers (``latent_dim``, no vocabulary: ae): ``latent_mean`` and ``latent_std`` (over
      every value of the held-out tokens; about 0 and 1 for normalised latents) and ``latent_std_min`` /
      ``latent_std_max`` (the extremes of the per-channel standard deviations).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seqgen.checkpoint import latest_checkpoint, read_config, read_weights
from seqgen.data import ExampleSampler
from seqgen.registry import TOKENIZERS
from seqgen.types import SeqgenError

log = logging.getLogger(__name__)

CODES_DIR = "codes"  # where GenerativeTask caches a data set's codes, inside the tokenizer's run folder


@dataclass
class ImageBatch:
    """A training batch of a tokenizer run: images (N, H, W, C) floats in [0, 1]."""

    images: Tensor

    def to(self, device) -> "ImageBatch":
        return ImageBatch(self.images.to(device))


def as_nhwc(images) -> Tensor:
    """(N, H, W) or (N, H, W, C) array -> (N, H, W, C) float32 tensor."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise SeqgenError(f"tokenizer: expected images of shape (N, H, W) or (N, H, W, C); got {tuple(x.shape)}")
    return x


def code_statistics(indices: Tensor, vocab_size: int) -> dict[str, float]:
    """Codebook usage (fraction of codes seen) and perplexity (exp entropy) of a set of code indices."""
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).sum()) / vocab_size, "code_perplexity": float(entropy.exp())}


def psnr(mse: float) -> float:
    """10 log10(1 / mse) for pixels in [0, 1]."""
    return 10 * math.log10(1 / max(mse, 1e-12))


def is_continuous(tokenizer) -> bool:
    """A continuous tokenizer (latent vectors, no vocabulary: ae) rather than a discrete one (codes)."""
    return getattr(tokenizer, "vocab_size", None) is None and getattr(tokenizer, "latent_dim", None) is not None


def tokens_per_image(tokenizer) -> int:
    """Tokens one tokenizer-sized image becomes: the codes of every scale, or the cells of the grid."""
    if getattr(tokenizer, "scales", None):
        return sum(h * w for h, w in tokenizer.scales)
    h, w = tokenizer.grid
    return h * w


def latent_statistics(latents: Tensor) -> dict[str, float]:
    """Mean and standard deviation of continuous tokens (..., c): over all values, and the extremes of the
    per-channel standard deviations."""
    v = latents.reshape(-1, latents.shape[-1]).double()
    per_channel = v.std(0, unbiased=False)
    return {"latent_mean": float(v.mean()), "latent_std": float(v.std(unbiased=False)),
            "latent_std_min": float(per_channel.min()), "latent_std_max": float(per_channel.max())}


class TokenizerTask:
    """What the trainer, ``seqgen eval`` and ``seqgen sample`` need from a tokenizer run."""

    def __init__(self, cfg, run_dir: str | Path | None = None, splits=None):
        if cfg.task != "tokenizer":
            raise SeqgenError(f"TokenizerTask needs task: tokenizer, got {cfg.task!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if cfg.train.val_fraction > 0:
            raise SeqgenError("train.val_fraction and train.keep_best are for generative runs; a tokenizer run "
                              "is scored on the held-out split")
        self.has_val = False
        self.splits = splits if splits is not None else cfg.build("data").load()
        if self.splits.kind != "image":
            raise SeqgenError(f"a tokenizer run needs an image data set; {cfg.component('data')[0]!r} holds "
                              f"{self.splits.kind}")
        self.train_images = as_nhwc(self.splits.train)  # (N, H, W, C)
        self.heldout_images = as_nhwc(self.splits.heldout)
        _, H, W, C = self.train_images.shape
        if tuple(self.heldout_images.shape[1:]) != (H, W, C):
            raise SeqgenError(f"tokenizer: held-out images are {tuple(self.heldout_images.shape[1:])}, "
                              f"training images {(H, W, C)}")
        self.model: nn.Module = cfg.build("tokenizer", height=H, width=W, channels=C)
        self.checkpoint: Path | None = None  # set by seqgen.task.load_run

    # ------------------------------------------------------------------ training
    def train_sampler(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> ExampleSampler:
        return ExampleSampler(len(self.train_images), batch_size, seed, rank, world)

    def make_batch(self, draw: Tensor, generator: torch.Generator | None = None, progress: float = 0.0,
                   split: str = "train") -> ImageBatch:
        """Image indices from the sampler -> a batch (the tokenizer needs no random arrangement)."""
        images = self.train_images if split == "train" else self.heldout_images
        return ImageBatch(images[draw])

    def count_tokens(self, batch: ImageBatch) -> int:
        """Tokens in a batch (codes of every scale, or latent vectors): the trainer's throughput counter."""
        return batch.images.shape[0] * tokens_per_image(self.model)

    # ------------------------------------------------------------------ held-out metrics
    @torch.no_grad()
    def heldout_metrics(self, model: nn.Module | None = None, batch_size: int = 256, max_batches: int = 0,
                        device=None, split: str = "heldout") -> dict[str, float]:
        if split != "heldout":
            raise SeqgenError(f"a tokenizer run has only a held-out split, not {split!r}")
        model = model or self.model
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        continuous = is_continuous(model)
        K = len(getattr(model, "scales", None) or []) if hasattr(model, "decode_scales") else 0
        sq, n_dims, tokens, prefix_sq = 0.0, 0, [], [0.0] * K
        try:
            for b, i in enumerate(range(0, len(self.heldout_images), batch_size)):
                if max_batches and b >= max_batches:
                    break
                x = self.heldout_images[i:i + batch_size].to(device)
                recon, tok = model(x)
                sq += float((recon.float() - x).pow(2).sum())
                n_dims += x.numel()
                tokens.append(tok.detach().float().cpu() if continuous else tok.cpu())
                if K:
                    scales = model.split(tok)
                    for k in range(K - 1):  # the last prefix is the whole reconstruction
                        prefix_sq[k] += float((model.decode_scales(scales[:k + 1]).float() - x).pow(2).sum())
                    prefix_sq[K - 1] = sq
        finally:
            model.train(was_training)
        mse = sq / max(n_dims, 1)
        seen = torch.cat(tokens)
        mean_image = self.train_images.mean(0)
        baseline = float((self.heldout_images[:len(seen)] - mean_image).pow(2).mean())
        out = {"recon_mse": mse, "recon_psnr": psnr(mse), "mean_image_mse": baseline}
        for k in range(K):
            out[f"prefix_mse_{k + 1}"] = prefix_sq[k] / max(n_dims, 1)
            out[f"prefix_psnr_{k + 1}"] = psnr(out[f"prefix_mse_{k + 1}"])
        if continuous:
            out.update(latent_statistics(seen))
        else:
            out.update(code_statistics(seen, model.vocab_size))
        return out

    def evaluate_run(self, device=None) -> dict:
        """``seqgen eval`` for a tokenizer run: held-out reconstruction and code statistics."""
        device = torch.device(device or "cpu")
        m = self.model.to(device)
        t0 = time.time()
        res = {"run": str(self.run_dir) if self.run_dir is not None else "",
               "name": self.cfg.name, "checkpoint": self.checkpoint.name if self.checkpoint is not None else "",
               "parameters": sum(p.numel() for p in m.parameters()),
               "vocab_size": getattr(m, "vocab_size", None), "grid": list(m.grid),
               "heldout_images": len(self.heldout_images)}
        if is_continuous(m):
            res["latent_dim"] = m.latent_dim
        if getattr(m, "scales", None):
            res["scales"] = [list(hw) for hw in m.scales]
        res["tokens_per_image"] = tokens_per_image(m)
        res.update(self.heldout_metrics(m, device=device))
        res["seconds"] = time.time() - t0
        return res

    @torch.no_grad()
    def write_reconstructions(self, path: str | Path, n: int = 32, device=None) -> Path:
        """A PNG grid: ``n`` evenly spaced held-out images in the top rows, their reconstructions below."""
        from seqgen.domains.image import save_image_grid

        if n < 1:
            raise SeqgenError(f"write_reconstructions: n must be >= 1, got {n}")
        m = self.model.to(torch.device(device or "cpu")).eval()
        N = len(self.heldout_images)
        n = min(n, N)
        x = self.heldout_images[torch.linspace(0, N - 1, n).round().long()]  # spread out: splits may be sorted by class
        recon = m.decode(m.encode(x.to(m.geometry.device))).cpu()
        cols = min(n, 16)
        rows = math.ceil(n / cols)
        blank = torch.full((rows * cols - n, *x.shape[1:]), 0.5)  # fill the last row of each half
        grid = torch.cat([x, blank, recon, blank]).numpy()
        if grid.shape[-1] == 1:
            grid = grid[..., 0]
        return save_image_grid(grid, path, nrow=2 * rows)


# ------------------------------------------------------------------------------------------ loading
def _not_a_tokenizer(run_dir: Path, why: str) -> SeqgenError:
    return SeqgenError(f"tokenizer {str(run_dir)!r} {why}; set the image domain's tokenizer (domains.KEY.tokenizer) "
                       "to 'pixels' or to the run folder of a trained tokenizer "
                       "(seqgen train <config with task: tokenizer> --out DIR)")


def load_tokenizer(run_dir: str | Path) -> nn.Module:
    """Rebuild a trained tokenizer from its run folder alone: eval mode, on the CPU, no gradients.

    Reads the newest checkpoint's config.json and weights (EMA weights when the run kept them, as
    ``load_run`` does).  The returned module has ``height, width, channels, grid`` and ``encode`` /
    ``decode``; a discrete tokenizer has ``vocab_size`` (a multi-scale one also ``scales``), a continuous
    one ``latent_dim`` and ``vocab_size`` None.  Codes cached from an older checkpoint (``RUN_DIR/codes``)
    are removed.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise _not_a_tokenizer(run_dir, "is not a folder")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise _not_a_tokenizer(run_dir, "has no checkpoint (checkpoints/step_*/)")
    config = read_config(ckpt)
    if config.get("task") != "tokenizer":
        raise _not_a_tokenizer(run_dir, f"holds a task: {config.get('task')!r} run, not a tokenizer run")
    options = dict(config.get("tokenizer") or {})
    name = options.pop("name", "fsq")
    cls = TOKENIZERS.get(name)
    weights = ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").exists() else ckpt / "model.safetensors"
    try:
        tk = cls.from_state(TOKENIZERS.make_config(name, options), read_weights(weights))
    except RuntimeError as e:  # load_state_dict: names or shapes do not match the config
        raise SeqgenError(f"tokenizer checkpoint {weights} does not match its config: {e}") from None
    tk.eval().requires_grad_(False)
    tk.run_dir, tk.checkpoint = run_dir, ckpt.name
    _invalidate_stale_codes(run_dir, f"{ckpt.name}/{weights.name}")
    return tk


def _invalidate_stale_codes(run_dir: Path, stamp: str) -> None:
    """Codes are cached per data set under RUN_DIR/codes; they belong to one checkpoint's weights."""
    codes = run_dir / CODES_DIR
    marker = codes / "checkpoint.txt"
    if marker.exists() and marker.read_text().strip() == stamp:
        return
    if codes.exists():
        log.info("tokenizer %s changed since its codes were cached; clearing %s", run_dir, codes)
        shutil.rmtree(codes, ignore_errors=True)
    codes.mkdir(parents=True, exist_ok=True)
    tmp = codes / f".checkpoint.txt.tmp{os.getpid()}"
    tmp.write_text(stamp + "\n")
    os.replace(tmp, marker)
