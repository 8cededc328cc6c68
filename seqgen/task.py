"""A generative run: data set -> domain adapter -> tokens; paradigm + model; batches, held-out NLL
and samples.  The trainer, ``seqgen sample`` and ``seqgen eval`` all go through this one object.

    task = GenerativeTask(RunConfig.load("examples/configs/digits_ar.yaml"))
    loss, metrics = task.model.loss(task.make_batch(task.train_sampler(64).next()))
    images, labels = task.generate(n=20, cfg_scale=2.0)
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (BEST_DIR, CheckpointError, config_differences, latest_checkpoint, load_weights, read_config,
                         require_checkpoint)
from .config import RunConfig
from .data import ExampleSampler, WindowSampler
from .datasets import RawSplits
from .model import SeqModel
from .types import Batch, SeqgenError, TokenSequence

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


def build_model(cfg: RunConfig, specs, paradigm, max_target_pos: int) -> SeqModel:
    backbone = cfg.build("backbone")
    head = cfg.build("head", backbone.dim, specs[0])
    return SeqModel(specs, backbone, {specs[0].name: head}, target_pos=paradigm.needs_target_pos,
                    max_target_pos=cfg.model.max_target_pos or max_target_pos)


class Objective(nn.Module):
    """Wraps a model so the whole loss runs inside ``forward`` (DDP hooks and Fabric autocast see it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[Tensor, dict]:
        return self.model.loss(batch)


class GenerativeTask:
    """Everything a generative run needs; built from a RunConfig (and the run folder for fitted state)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, splits: RawSplits | None = None):
        if cfg.task != "generative":
            raise SeqgenError(f"GenerativeTask needs task: generative, got {cfg.task!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.splits = splits if splits is not None else cfg.build("data").load()
        self.domain = cfg.build("domain", modality=0)
        data_kind = {"image": "image", "text": "text"}.get(cfg.component("domain")[0])
        if data_kind is not None and data_kind != self.splits.kind:
            raise SeqgenError(f"domain {cfg.component('domain')[0]!r} cannot read the {self.splits.kind} data set "
                              f"{cfg.component('data')[0]!r}")
        self._carve_validation(cfg.train.val_fraction, cfg.seed)
        if hasattr(self.domain, "fit"):
            self.domain.fit(self.train_text if self.splits.kind == "text" else self.splits.train, self.run_dir)
        self.label = None
        if cfg.condition == "class":
            if self.splits.num_classes is None:
                raise SeqgenError(f"condition: class needs a labelled data set; {cfg.component('data')[0]!r} has no labels")
            from .domains.label import LabelDomain

            self.label = LabelDomain(LabelDomain.Config(num_classes=self.splits.num_classes), modality=1)
        self.specs = [self.domain.spec] + ([self.label.spec] if self.label is not None else [])
        self.paradigm = cfg.build("paradigm")
        self.is_text = self.splits.kind == "text"
        self._encode_data()
        self.model = build_model(cfg, self.specs, self.paradigm, self._max_coordinate() + 1)

    # ------------------------------------------------------------------ data
    def _carve_validation(self, fraction: float, seed: int) -> None:
        """Set aside a validation split from the training split (never from the held-out one): the end of
        the training text, or a seeded random subset of the training images.  ``self.splits`` keeps
        the data set as loaded (compressor baselines and the digit classifier see all of it)."""
        self.has_val = fraction > 0
        n = len(self.splits.train)
        if self.splits.kind == "text":
            cut = int(round(n * (1 - fraction)))
            self.train_text, self.val_text = self.splits.train[:cut], self.splits.train[cut:]
            if self.has_val and (len(self.val_text) < 2 or not self.train_text):
                raise SeqgenError(f"train.val_fraction={fraction} leaves {len(self.val_text)} validation and "
                                  f"{len(self.train_text)} training characters; pick a fraction that leaves both")
            return
        self.val_index = self.train_index = None
        if not self.has_val:
            return
        k = int(round(n * fraction))
        if not 0 < k < n:
            raise SeqgenError(f"train.val_fraction={fraction} of {n} training examples leaves an empty split")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 4242))
        self.val_index, self.train_index = perm[:k].sort().values, perm[k:].sort().values

    def _encode_data(self) -> None:
        if self.is_text:
            self.context = self.domain.config.context
            self.train_ids = self.domain.encode_stream(self.train_text)
            self.val_ids = self.domain.encode_stream(self.val_text) if self.has_val else None
            self.heldout_ids = self.domain.encode_stream(self.splits.heldout)
            self.token_bytes = self._token_bytes()
            return
        self.positions = self.domain.positions()  # (L, 3)
        self.train_ids = self._encode_images("train", self.splits.train)  # the cache holds the whole training split
        self.heldout_ids = self._encode_images("heldout", self.splits.heldout)
        self.train_labels = None if self.splits.train_labels is None else torch.as_tensor(self.splits.train_labels)
        self.heldout_labels = None if self.splits.heldout_labels is None else torch.as_tensor(self.splits.heldout_labels)
        self.val_ids = self.val_labels = None
        if self.has_val:
            self.train_ids, self.val_ids = self.train_ids[self.train_index], self.train_ids[self.val_index]
            if self.train_labels is not None:
                self.train_labels, self.val_labels = self.train_labels[self.train_index], self.train_labels[self.val_index]

    def split_ids(self, split: str) -> Tensor:
        if split not in ("train", "val", "heldout"):
            raise SeqgenError(f"unknown split {split!r}: train, val or heldout")
        if split == "val" and not self.has_val:
            raise SeqgenError("this run has no validation split (train.val_fraction is 0)")
        return getattr(self, f"{split}_ids")

    def _encode_images(self, split: str, images) -> Tensor:
        tk = getattr(self.domain, "tokenizer", None)
        if tk is None:
            return self.domain.encode(images).ids
        from safetensors.torch import load_file, save_file

        cache = Path(self.domain.config.tokenizer) / "codes" / f"{self.splits.fingerprint()}_{split}.safetensors"
        if cache.exists():
            return load_file(str(cache))["ids"]
        log.info("encoding the %s split with the tokenizer in %s (cached in %s)", split, self.domain.config.tokenizer, cache)
        ids = torch.cat([self.domain.encode(images[i:i + 512]).ids for i in range(0, len(images), 512)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"ids": ids.contiguous()}, str(tmp))
        tmp.replace(cache)
        return ids

    def _token_bytes(self) -> Tensor:
        """UTF-8 bytes each text token stands for (bits per byte = total bits / total bytes)."""
        tok = self.domain.tok
        if self.domain.config.tokenizer == "bytes":
            return torch.ones(256, dtype=torch.long)
        # byte-level BPE: every character of a token's string stands for exactly one byte
        return torch.tensor([len(tok.tok.id_to_token(i)) for i in range(tok.vocab_size)], dtype=torch.long)

    def _max_coordinate(self) -> int:
        if self.is_text:
            return self.context + 1
        return int(self.positions.max()) + 2  # + the one-token prefix

    def train_sampler(self, batch_size: int, seed: int = 0, rank: int = 0):
        if self.is_text:
            return WindowSampler(len(self.train_ids), self.context + 1, batch_size, seed, rank)
        return ExampleSampler(len(self.train_ids), batch_size, seed, rank)

    def prefix(self, labels: Tensor | None, batch_size: int) -> tuple[TokenSequence | None, TokenSequence | None]:
        """(condition, null condition) for image rows; a start token when unconditional."""
        if self.is_text:
            return None, None
        if self.label is not None:
            return self.label.encode(labels), self.label.null(batch_size)
        bos = torch.full((batch_size, 1), self.domain.spec.bos_id, dtype=torch.long)
        return TokenSequence.from_ids(bos, modality=0), None

    def examples(self, ids: Tensor) -> TokenSequence:
        B = ids.shape[0]
        return TokenSequence.from_ids(ids, pos=self.positions.unsqueeze(0).expand(B, -1, -1).clone(), modality=0)

    def make_batch(self, draw: Tensor, generator: torch.Generator | None = None, progress: float = 0.0,
                   split: str = "train", cond_dropout: bool = True) -> Batch:
        """Indices (images) or window starts (text) from a sampler -> a Batch arranged by the paradigm."""
        ids = self.split_ids(split)
        if self.is_text:
            seq = self.domain.windows(ids, draw, self.context + 1)
            return self.paradigm.prepare(seq, None, generator=generator, progress=progress)
        labels = None
        if self.label is not None:
            labels = getattr(self, f"{split}_labels")[draw]
        cond, null = self.prefix(labels, len(draw))
        return self.paradigm.prepare(self.examples(ids[draw]), cond, null_prefix=null if cond_dropout else None,
                                     generator=generator, progress=progress)

    # ------------------------------------------------------------------ held-out likelihood
    def heldout_batches(self, batch_size: int, max_batches: int = 0, stride: int = 0,
                        split: str = "heldout") -> Iterator[tuple[Batch, Tensor]]:
        """Deterministic batches covering the held-out (or validation) split; yields (batch, dims) where
        dims is the number of raw dimensions (bytes / pixels) the batch's scored tokens stand for."""
        count = 0
        ids = self.split_ids(split)
        if self.is_text:
            for batch, d in self._text_windows(ids, batch_size, stride, split):
                yield batch, d
                count += 1
                if max_batches and count >= max_batches:
                    return
            return
        n = len(ids)
        per_token = self.domain.dims_per_token
        for i in range(0, n, batch_size):
            draw = torch.arange(i, min(n, i + batch_size))
            batch = self.make_batch(draw, progress=1.0, split=split, cond_dropout=False)
            yield batch, torch.tensor(batch.loss_mask.sum().item() * per_token)
            count += 1
            if max_batches and count >= max_batches:
                return

    def _text_windows(self, ids: Tensor, batch_size: int, stride: int, split: str) -> Iterator[tuple[Batch, Tensor]]:
        """Sliding windows of the context length, ``stride`` apart (0: half the context), in order; each
        window scores only the targets no earlier window scored, so every token but the first counts once."""
        N, W = len(ids), self.context + 1
        if N < 2:
            raise SeqgenError(f"the {split} text is shorter than two tokens")
        W = min(W, N)
        S = stride or max(1, (W - 1) // 2)
        if S > W - 1:
            raise SeqgenError(f"stride {S} is longer than the context ({W - 1}): tokens between windows would go unscored")
        starts = list(range(0, N - W + 1, S))
        if starts[-1] + W < N:
            starts.append(N - W)
        scored_until = 0  # absolute index of the last scored target
        for i in range(0, len(starts), batch_size):
            st = torch.tensor(starts[i:i + batch_size])
            batch = self.paradigm.prepare(self.domain.windows(ids, st, W), None)
            target_abs = st.view(-1, 1) + torch.arange(1, W)  # (B, W-1)
            keep = torch.zeros_like(batch.loss_mask)
            for r in range(len(st)):
                keep[r] = target_abs[r] > scored_until
                scored_until = max(scored_until, int(target_abs[r, -1]))
            batch.loss_mask = batch.loss_mask & keep
            yield batch, self.token_bytes[batch.targets[batch.loss_mask]].sum()

    def evaluate_dynamic(self, model: nn.Module | None = None, lr: float = 1e-4, segment: int = 128,
                         optimizer: str = "sgd", split: str = "heldout", device=None,
                         autocast: bool = False, windows: list | None = None) -> dict[str, float]:
        """Dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural Sequence Models"): the
        text is scored in order, ``segment`` tokens at a time (each with the rest of the context window
        before it), and after scoring a segment the model takes one gradient step on that segment's
        loss, so it adapts to text it has already been scored on -- never to text it has not.  Dropout
        is off.  The model's weights are restored afterwards.  Text only.

        optimizer: sgd (plain steps, lr scaled by nothing) or adam (steps normalised per weight).
        windows: a list that receives each window's (NLL sum, scored tokens), in order.
        """
        if not self.is_text:
            raise SeqgenError("dynamic evaluation scores a text stream; this run models images")
        if lr < 0:
            raise SeqgenError(f"dynamic evaluation: lr must be >= 0, got {lr}")
        model = model or self.model
        device = device or next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr)
        elif optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
        else:
            raise SeqgenError(f"dynamic evaluation: optimizer must be sgd or adam, got {optimizer!r}")
        ids = self.split_ids(split)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        was_training = model.training
        model.eval()
        nll, tokens, dims = 0.0, 0, 0.0
        name = self.specs[0].name
        try:
            for batch, d in self._text_windows(ids, 1, segment, split):
                with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, m = model.loss(batch.to(device))
                nll += float(m[f"{name}/nll_sum"])
                tokens += int(m[f"{name}/count"])
                dims += float(d)
                if windows is not None:
                    windows.append((float(m[f"{name}/nll_sum"]), int(m[f"{name}/count"])))
                if lr > 0:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            model.load_state_dict(saved)
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return {f"{split}_nll": nll / max(tokens, 1), f"{split}_tokens": tokens,
                "bits_per_byte": nll / LN2 / max(dims, 1e-9)}

    @torch.no_grad()
    def evaluate_nll(self, model: nn.Module | None = None, batch_size: int = 256, max_batches: int = 0,
                     stride: int = 0, device=None, split: str = "heldout") -> dict[str, float]:
        """NLL on the held-out (or validation) split: nats per token, and bits per byte (text) or bits
        per dimension (images).  Keys: ``{split}_nll``, ``{split}_tokens`` and bits_per_byte / bits_per_dim."""
        model = model or self.model
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        nll, tokens, dims = 0.0, 0, 0.0
        try:
            for batch, d in self.heldout_batches(batch_size, max_batches, stride, split):
                _, m = model.loss(batch.to(device))
                name = self.specs[0].name
                nll += float(m[f"{name}/nll_sum"])
                tokens += int(m[f"{name}/count"])
                dims += float(d)
        finally:
            model.train(was_training)
        out = {f"{split}_nll": nll / max(tokens, 1), f"{split}_tokens": tokens}
        out["bits_per_byte" if self.is_text else "bits_per_dim"] = nll / LN2 / max(dims, 1e-9)
        return out

    def heldout_metrics(self, model=None, batch_size: int = 256, max_batches: int = 0, device=None,
                        split: str = "heldout") -> dict:
        """What the trainer logs at each evaluation (the same for every task kind)."""
        return self.evaluate_nll(model, batch_size=batch_size, max_batches=max_batches,
                                 stride=self.cfg.eval.stride, device=device, split=split)

    @staticmethod
    def count_tokens(batch: Batch) -> int:
        """Predicted tokens in a batch (the trainer's throughput counter)."""
        return int(batch.loss_mask.sum())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, model: nn.Module | None = None, n: int = 16, *, labels=None, generator=None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 cfg_scale: float = 1.0, cfg_schedule: str = "constant", order: str = "raster",
                 length: int = 256, prompt: str = "\n", batch_size: int = 500,
                 progress: Callable[[int, int], Any] | None = None):
        """Draw samples.  Images: (images (n, H, W[, C]) in [0, 1], labels or None).  Text: list of str.

        Class-conditional images default to n // classes samples of every class, in class order.
        """
        model = model or self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        if generator is None:
            generator = torch.Generator(device=device) if device.type != "cpu" else torch.Generator()
            generator.manual_seed(0)
        knobs = dict(generator=generator, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                     cfg_schedule=cfg_schedule, order=order)
        try:
            if self.is_text:
                return self._generate_text(model, n, length, prompt, batch_size, device, knobs, progress)
            return self._generate_images(model, n, labels, batch_size, device, knobs, progress)
        finally:
            model.train(was_training)

    def _generate_images(self, model, n, labels, batch_size, device, knobs, progress):
        if self.label is not None:
            C = self.label.config.num_classes
            if labels is None:
                per = max(1, n // C)
                labels = torch.arange(C).repeat_interleave(per)
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
            n = len(labels)
        elif labels is not None:
            raise SeqgenError("this model is unconditional; it takes no labels")
        if knobs["cfg_scale"] != 1.0 and self.label is None:
            raise SeqgenError("classifier-free guidance needs a class-conditional model (condition: class)")
        out = []
        done = 0
        total_steps = n * self.domain.length
        for i in range(0, n, batch_size):
            B = min(batch_size, n - i)
            cond, null = self.prefix(None if labels is None else labels[i:i + B], B)
            cb = None if progress is None else (lambda t, T, _done=done: progress(_done + t * B, total_steps))
            seq = self.paradigm.generate(model, cond.to(device), self.domain.layout(B, device),
                                         null_prompt=None if null is None else null.to(device), progress=cb, **knobs)
            out.append(self.domain.decode(seq))
            done += B * self.domain.length
        return np.concatenate(out), (None if labels is None else labels.numpy())

    def _generate_text(self, model, n, length, prompt, batch_size, device, knobs, progress):
        if knobs["cfg_scale"] != 1.0:
            raise SeqgenError("classifier-free guidance needs a conditional model; text models here are unconditional")
        if not prompt:
            raise SeqgenError("text sampling needs a non-empty prompt to continue (e.g. a newline)")
        p_ids = self.domain.encode_stream(prompt)
        out = []
        for i in range(0, n, batch_size):
            B = min(batch_size, n - i)
            pr = TokenSequence.from_ids(p_ids.unsqueeze(0).expand(B, -1).clone(), modality=0).to(device)
            cb = None if progress is None else (lambda t, T, _i=i: progress(_i * length + t * B, n * length))
            seq = self.paradigm.generate(model, pr, self.domain.layout(B, length, device), max_context=self.context,
                                         progress=cb, **knobs)
            out += self.domain.decode(seq)
        return out

    def write_samples(self, samples, path: str | Path, prompt: str = "\n") -> Path:
        if self.is_text:
            return self.domain.write_samples(samples, path, prompt=prompt)
        images, labels = samples
        nrow = self.label.config.num_classes if labels is not None else None
        return self.domain.write_samples(images, path, nrow=nrow)


def build_task(cfg: RunConfig, run_dir: str | Path | None = None):
    if cfg.task == "tokenizer":
        from .domains.tokenizers import TokenizerTask

        return TokenizerTask(cfg, run_dir)
    return GenerativeTask(cfg, run_dir)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", ema: bool = True, best: bool = True):
    """Rebuild a run from its folder alone: its config, and the weights it kept as best on validation
    (train.keep_best) or else those of the newest checkpoint (EMA weights unless ``ema=False``)."""
    ckpt = require_checkpoint(Path(run_dir))
    cfg = RunConfig.from_dict(read_config(ckpt))
    kept = latest_checkpoint(Path(run_dir), BEST_DIR) if best and cfg.train.keep_best else None
    if kept is not None:
        diff = config_differences(read_config(kept), cfg.to_dict())
        if diff:
            raise CheckpointError(f"{kept} was written for a different config than {ckpt}: " + "; ".join(diff[:6]))
    task = build_task(cfg, run_dir)
    if kept is not None:
        ckpt, weights = kept, kept / "model.safetensors"  # already the EMA weights when EMA was on
    else:
        weights = ckpt / "ema.safetensors" if ema and (ckpt / "ema.safetensors").exists() else ckpt / "model.safetensors"
    load_weights(task.model, weights)
    task.model.to(device)
    task.model.eval()
    task.checkpoint = ckpt
    return task
