"""A generative run: domains, a mixture of sources with recipes, a paradigm and a model; batches,
held-out NLL per source and domain, and samples.  The trainer, ``seqgen sample`` and ``seqgen eval``
all go through this one object, and it knows no domain by name: everything it does with data goes
through the adapter contract (``seqgen.interfaces.DomainAdapter``).

    task = GenerativeTask(RunConfig.load("examples/configs/digits_ar.yaml"))
    loss, metrics = task.model.loss(task.make_batch(task.train_sampler(64).next()))
    out = task.generate(entry="label_to_image", conds=[{"label": 3}] * 4, cfg_scale=2.0)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (BEST_DIR, CheckpointError, config_differences, latest_checkpoint, load_weights, read_config,
                         require_checkpoint)
from .config import RunConfig
from .data import ExampleSampler, MixtureSampler, WindowSampler
from .examples import Piece, encode_pieces, piece_of
from .generate import Target, build_plan, outputs, prefill
from .model import SeqModel
from .registry import DATASETS
from .types import Batch, SeqgenError, TokenSequence

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
SPLITS = ("train", "val", "heldout")


class Objective(nn.Module):
    """Wraps a model so the whole loss runs inside ``forward`` (DDP hooks and Fabric autocast see it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, denominators: dict[str, int] | None = None) -> tuple[Tensor, dict]:
        return self.model.loss(batch) if denominators is None else self.model.loss(batch, denominators)


# ---------------------------------------------------------------------------------------- records
def take(records: dict, idx) -> dict:
    """Rows ``idx`` of every column."""
    idx = np.asarray(idx, dtype=np.int64)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[int(i)] for i in idx]) for k, v in records.items()}


def num_records(records: dict) -> int:
    lens = {len(v) for v in records.values()}
    if len(lens) != 1:
        raise SeqgenError(f"a source's columns must have one length; got {sorted(lens)} for {sorted(records)}")
    return lens.pop()


def fingerprint(column) -> str:
    h = hashlib.sha1()
    if isinstance(column, np.ndarray):
        h.update(np.ascontiguousarray(column).tobytes())
    else:
        for item in column:
            h.update(np.ascontiguousarray(np.asarray(item)).tobytes() if not isinstance(item, str) else item.encode())
            h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Column:
    """One domain's encoded items of one split: padded tokens, their raw units, and lengths."""

    seq: TokenSequence  # (N, L) local coordinates, valid on real tokens
    units: Tensor  # (N, L)
    lengths: list[int] | None = field(default=None, init=False)  # per row, when every row's valid tokens come first

    def __post_init__(self) -> None:
        n = self.seq.valid.sum(1)
        prefix = torch.arange(self.seq.valid.shape[1]).unsqueeze(0) < n.unsqueeze(1)
        self.lengths = n.tolist() if bool((prefix == self.seq.valid).all()) else None

    def piece(self, i: int, modality: int, role: str, variable: bool) -> Piece:
        return piece_of(self.seq, self.units, i, modality, role, variable,
                        None if self.lengths is None else self.lengths[i])


@dataclass
class Entry:
    """A mixture entry at run time: its recipe and its encoded data per split."""

    index: int
    name: str
    source: Any
    source_key: str
    cond: list[str]
    target: list[str]
    fields: dict[str, str]
    weight: float
    stream: bool
    records: dict[str, dict] = field(default_factory=dict)  # split -> columns
    columns: dict[str, dict[str, Column]] = field(default_factory=dict)  # split -> domain -> Column
    streams: dict[str, Tensor] = field(default_factory=dict)  # split -> (N,) ids (stream entries)

    def field_of(self, domain: str) -> str:
        return self.fields.get(domain, domain)

    def size(self, split: str) -> int:
        if self.stream:
            return len(self.streams[split])
        return num_records(self.records[split])


# ---------------------------------------------------------------------------------------- the task
class GenerativeTask:
    """Everything a generative run needs; built from a RunConfig (and the run folder for fitted state)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None):
        if cfg.task != "generative":
            raise SeqgenError(f"GenerativeTask needs task: generative, got {cfg.task!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.keys = list(cfg.domains)
        self.adapters = {k: cfg.build_domain(k) for k in self.keys}
        self.has_val = cfg.train.val_fraction > 0
        self.entries = self._load_entries()
        self._fit_adapters()
        self.specs = [dataclasses.replace(self.adapters[k].spec, name=k) for k in self.keys]
        self.modality = {k: i for i, k in enumerate(self.keys)}
        for e in self.entries:
            self._encode_entry(e)
        self.paradigm = cfg.build("paradigm")
        self.model = self._build_model()

    # ------------------------------------------------------------------ set-up
    def _load_entries(self) -> list[Entry]:
        sources: dict[str, Any] = {}
        entries = []
        for i, m in enumerate(self.cfg.mixture):
            key = json.dumps(m["source"], sort_keys=True)
            if key not in sources:
                sources[key] = DATASETS.build(m["source"]["name"], m["source"])
            src = sources[key]
            if not hasattr(src, "records"):
                raise SeqgenError(f"data set {m['source']['name']!r} has no records(split): it cannot feed a mixture")
            e = Entry(i, m["name"], src, key, list(m["cond"]), list(m["target"]), dict(m["fields"]), m["weight"],
                      m["stream"])
            train, heldout = src.records("train"), src.records("heldout")
            for k in e.cond + e.target:
                for split, recs in (("train", train), ("heldout", heldout)):
                    if e.field_of(k) not in recs:
                        raise SeqgenError(f"mixture entry {e.name!r}: domain {k!r} reads field {e.field_of(k)!r}, but "
                                          f"{m['source']['name']!r} records have {sorted(recs)} (map it with fields:)")
            e.records["heldout"] = heldout
            if e.stream or not self.has_val:
                e.records["train"] = train
            else:  # a seeded subset of the training records (the same for every entry of this source)
                n = num_records(train)
                k = int(round(n * self.cfg.train.val_fraction))
                if not 0 < k < n:
                    raise SeqgenError(f"train.val_fraction={self.cfg.train.val_fraction} of {n} training records "
                                      f"of {e.name!r} leaves an empty split")
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + 4242))
                e.records["val"] = take(train, perm[:k].sort().values.numpy())
                e.records["train"] = take(train, perm[k:].sort().values.numpy())
            entries.append(e)
        return entries

    def _fit_adapters(self) -> None:
        """Adapters that learn from data (a BPE, a tokenizer run) see their domain's training items."""
        for k, a in self.adapters.items():
            if not hasattr(a, "fit"):
                continue
            items, arrays = [], []  # list columns (their items), array columns (N, ...) whole
            read = set()  # a (source, field) column read by several entries is seen once
            for e in self.entries:
                if k in e.cond + e.target and (e.source_key, e.field_of(k)) not in read:
                    read.add((e.source_key, e.field_of(k)))
                    col = e.records["train"][e.field_of(k)]
                    if isinstance(col, np.ndarray):
                        arrays.append(col)
                    else:
                        items.extend(col)
            if arrays and not items:
                items = np.concatenate(arrays)
            else:
                items += [x for arr in arrays for x in arr]
            a.fit(items, self.run_dir)
            if getattr(a, "spec", None) is None:
                raise SeqgenError(f"domain {k!r}: the adapter has no spec after fit()")

    def _encode_entry(self, e: Entry) -> None:
        splits = [s for s in SPLITS if s in e.records]
        if e.stream:
            (k,) = e.target
            a = self.adapters[k]
            if not hasattr(a, "encode_stream") or not hasattr(a, "context"):
                raise SeqgenError(f"mixture entry {e.name!r}: stream: true needs a domain adapter with encode_stream() "
                                  f"and a context length; {type(a).__name__} has neither")
            for s in ("train", "heldout"):
                e.streams[s] = a.encode_stream(list(e.records[s][e.field_of(k)]))
            if self.has_val:  # the end of the training stream
                ids = e.streams["train"]
                cut = int(round(len(ids) * (1 - self.cfg.train.val_fraction)))
                if len(ids) - cut < 2 or cut < 2:
                    raise SeqgenError(f"train.val_fraction={self.cfg.train.val_fraction} leaves {len(ids) - cut} "
                                      f"validation and {cut} training tokens in {e.name!r}")
                e.streams["train"], e.streams["val"] = ids[:cut], ids[cut:]
            for s, ids in e.streams.items():
                self._validate(TokenSequence.from_ids(ids.view(1, -1), modality=self.modality[k]), e.name)
            return
        for s in splits:
            e.columns[s] = {k: self._encode_column(k, e.records[s][e.field_of(k)], f"{e.name}/{s}")
                            for k in e.cond + e.target}

    def _encode_column(self, key: str, column, what: str) -> Column:
        a = self.adapters[key]
        where = a.encode_cache() if hasattr(a, "encode_cache") else None
        path = None
        if where is not None:
            folder, stamp = where
            path = Path(folder) / f"{fingerprint(column)}_{hashlib.sha1(stamp.encode()).hexdigest()[:12]}.safetensors"
            if path.exists():
                from safetensors.torch import load_file

                t = load_file(str(path))
                seq = TokenSequence(ids=t["ids"], values=t.get("values"), pos=t["pos"],
                                    modality=torch.full_like(t["ids"], self.modality[key]), valid=t["valid"].bool())
                return Column(seq, t["units"])
        chunks = [a.encode(column[i:i + 512]) for i in range(0, len(column), 512)]
        L = max(c.length for c in chunks)
        seq = _stack_padded(chunks, L)
        seq = seq.replace(modality=torch.full_like(seq.modality, self.modality[key]))
        self._validate(seq, what)
        units = a.units(seq).float() * seq.valid
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            t = {"ids": seq.ids.contiguous(), "pos": seq.pos.contiguous(), "valid": seq.valid.to(torch.uint8),
                 "units": units.contiguous()}
            if seq.values is not None:
                t["values"] = seq.values.contiguous()
            save_file(t, str(tmp))
            tmp.replace(path)
            log.info("cached the encoded %s (%s) in %s", what, key, path)
        return Column(seq, units)

    def _validate(self, seq: TokenSequence, what: str) -> None:
        try:
            seq.validate(self.specs)
        except SeqgenError as e:
            raise SeqgenError(f"{what}: the adapter produced bad tokens: {e}") from None

    def _build_model(self) -> SeqModel:
        cfg = self.cfg
        backbone = cfg.build("backbone")
        heads = {k: cfg.build_head(k, backbone.dim, self.specs[self.modality[k]]) for k in cfg.heads}
        features = {k: f for k, a in self.adapters.items()
                    if hasattr(a, "token_features") and (f := a.token_features()) is not None}
        return SeqModel(self.specs, backbone, heads, target_pos=getattr(self.paradigm, "needs_target_pos", False),
                        token_group=getattr(self.paradigm, "token_group", 1),
                        max_target_pos=cfg.model.max_target_pos, loss_weights=cfg.loss_weights, features=features)

    def entry(self, name: str | None = None) -> Entry:
        if not name:
            return self.entries[0]
        for e in self.entries:
            if e.name == name:
                return e
        raise SeqgenError(f"no mixture entry {name!r}; entries: {', '.join(e.name for e in self.entries)}")

    def adapter_of(self, key: str):
        return self.adapters[key]

    # ------------------------------------------------------------------ examples
    def context_of(self, e: Entry) -> int:
        return int(self.adapters[e.target[0]].context)

    def example(self, e: Entry, split: str, i: int) -> list[Piece]:
        """Encoded pieces of example i of an entry (a window starting at i for streams)."""
        if e.stream:
            (k,) = e.target
            W = self.context_of(e) + 1
            ids = e.streams[split][i:i + W]
            seq = TokenSequence.from_ids(ids.view(1, -1))
            units = self.adapters[k].units(seq)[0].float()
            return [Piece(self.modality[k], ids, seq.pos[0], units, role="target", open=True)]
        cols = e.columns[split]
        pieces = [cols[k].piece(i, self.modality[k], "cond", False) for k in e.cond]
        pieces += [cols[k].piece(i, self.modality[k], "target", bool(self.adapters[k].variable_length))
                   for k in e.target]
        return pieces

    def train_sampler(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> MixtureSampler:
        samplers = []
        for e in self.entries:
            if e.stream:
                samplers.append(WindowSampler(len(e.streams["train"]), self.context_of(e) + 1, batch_size, seed, rank,
                                              stream=e.index))
            else:
                samplers.append(ExampleSampler(e.size("train"), batch_size, seed, rank, world, stream=e.index))
        return MixtureSampler(samplers, [e.weight for e in self.entries], batch_size, seed, rank)

    def make_batch(self, draw: list[tuple[int, int]], generator: torch.Generator | None = None, progress: float = 0.0,
                   split: str = "train", train: bool = True, null: bool = False) -> Batch:
        """(entry, index) pairs from a sampler -> a Batch arranged by the paradigm."""
        examples = [self.example(self.entries[e], split, int(i)) for e, i in draw]
        return self.paradigm.prepare(examples, specs=self.specs, generator=generator, progress=progress, train=train,
                                     null=null, pack=self.cfg.train.pack if train else 0)

    @staticmethod
    def count_tokens(batch: Batch) -> int:
        """Predicted tokens in a batch (the trainer's throughput counter)."""
        return int(batch.loss_mask.sum())

    # ------------------------------------------------------------------ held-out likelihood
    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise SeqgenError(f"unknown split {split!r}: train, val or heldout")
        if split == "val" and not self.has_val:
            raise SeqgenError("this run has no validation split (train.val_fraction is 0)")

    def entry_batches(self, e: Entry, batch_size: int, split: str = "heldout", stride: int = 0, null: bool = False,
                      max_batches: int = 0) -> Iterator[Batch]:
        """Deterministic batches covering one entry's split (sliding windows for streams)."""
        self._check_split(split)
        count = 0
        if e.stream:
            it = self.stream_windows(e, batch_size, stride, split)
        else:
            n = e.size(split)
            it = (self.make_batch([(e.index, i) for i in range(s, min(n, s + batch_size))], split=split, train=False,
                                  null=null) for s in range(0, n, batch_size))
        for b in it:
            yield b
            count += 1
            if max_batches and count >= max_batches:
                return

    def stream_windows(self, e: Entry, batch_size: int, stride: int, split: str) -> Iterator[Batch]:
        """Sliding windows of the context length, ``stride`` apart (0: half the context), in order; each
        window scores only the targets no earlier window scored, so every token but the first counts once."""
        ids = e.streams[split]
        N, W = len(ids), self.context_of(e) + 1
        if N < 2:
            raise SeqgenError(f"the {split} stream of {e.name!r} is shorter than two tokens")
        W = min(W, N)
        S = stride or max(1, (W - 1) // 2)
        if S > W - 1:
            raise SeqgenError(f"stride {S} is longer than the context ({W - 1}): tokens between windows would go unscored")
        starts = list(range(0, N - W + 1, S))
        if starts[-1] + W < N:
            starts.append(N - W)
        scored_until = 0  # absolute index of the last scored target
        k = e.target[0]
        for i in range(0, len(starts), batch_size):
            st = starts[i:i + batch_size]
            examples = []
            for s in st:
                w = ids[s:s + W]
                seq = TokenSequence.from_ids(w.view(1, -1))
                examples.append([Piece(self.modality[k], w, seq.pos[0], self.adapters[k].units(seq)[0].float(),
                                       open=True)])
            batch = self.paradigm.prepare(examples, specs=self.specs, train=False)
            target_abs = torch.tensor(st).view(-1, 1) + torch.arange(1, W)
            keep = torch.zeros_like(batch.loss_mask)
            for r in range(len(st)):
                keep[r] = target_abs[r] > scored_until
                scored_until = max(scored_until, int(target_abs[r, -1]))
            batch.loss_mask = batch.loss_mask & keep
            yield batch

    @torch.no_grad()
    def evaluate_nll(self, model: nn.Module | None = None, batch_size: int = 256, max_batches: int = 0,
                     stride: int = 0, device=None, split: str = "heldout", null: bool = False,
                     entries: list[str] | None = None) -> dict[str, Any]:
        """NLL of every entry's split, per target domain: nats per token and bits per raw unit (bits per
        byte for text, per dimension for images).  ``null`` replaces conditions by the null condition.

        Keys: ``{split}_nll`` and ``{split}_tokens`` over everything; ``ENTRY/DOMAIN/bits_per_UNIT``; and,
        when the run scores one domain of one entry, plain ``bits_per_UNIT`` too.  A head whose loss is
        not a likelihood (``defines_nll = False``: a diffusion / flow head) reports ``ENTRY/DOMAIN/loss``
        (its training loss per token) and no bits; ``{split}_nll`` then averages the likelihoods of the
        other heads, or, where no head defines one, is that mean loss (what keep_best compares)."""
        model = model or self.model
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: dict[str, Any] = {}
        nll_all, tok_all, pairs = 0.0, 0, []
        loss_all, loss_tok = 0.0, 0.0
        likelihood = {k: getattr(self.model.heads[k], "defines_nll", True) for k in self.model.heads}
        try:
            for e in self.entries:
                if entries is not None and e.name not in entries:
                    continue
                if null and not e.cond:
                    continue
                sums = {k: [0.0, 0, 0.0] for k in e.target}
                for batch in self.entry_batches(e, batch_size, split, stride, null, max_batches):
                    _, m = model.loss(batch.to(device))
                    for k in e.target:
                        if f"{k}/nll_sum" in m:
                            sums[k][0] += float(m[f"{k}/nll_sum"])
                            sums[k][1] += float(m[f"{k}/count"])  # weighted (an evidence bound): a float
                            sums[k][2] += float(m[f"{k}/units"])
                for k, (nll, count, units) in sums.items():
                    if not likelihood.get(k, True):
                        out[f"{e.name}/{k}/loss"] = nll / max(count, 1)
                        loss_all += nll
                        loss_tok += count
                        continue
                    unit = self.adapters[k].unit
                    out[f"{e.name}/{k}/nll"] = nll / max(count, 1)
                    out[f"{e.name}/{k}/bits_per_{unit}"] = nll / LN2 / max(units, 1e-9)
                    nll_all += nll
                    tok_all += count
                    pairs.append(f"bits_per_{unit}")
        finally:
            model.train(was_training)
        out[f"{split}_nll"] = nll_all / max(tok_all, 1) if tok_all or not loss_tok else loss_all / loss_tok
        out[f"{split}_tokens"] = int(round(tok_all + loss_tok))
        if len(pairs) == 1:
            out[pairs[0]] = next(v for k, v in out.items() if k.endswith("/" + pairs[0]))
        return out

    def heldout_metrics(self, model=None, batch_size: int = 256, max_batches: int = 0, device=None,
                        split: str = "heldout") -> dict:
        """What the trainer logs at each evaluation (the same for every task kind)."""
        return self.evaluate_nll(model, batch_size=batch_size, max_batches=max_batches, stride=self.cfg.eval.stride,
                                 device=device, split=split)

    def stream_entry(self) -> Entry:
        for e in self.entries:
            if e.stream:
                return e
        raise SeqgenError("dynamic evaluation scores a stream (a mixture entry with stream: true); this run has none")

    def evaluate_dynamic(self, model: nn.Module | None = None, lr: float = 1e-4, segment: int = 128,
                         optimizer: str = "sgd", split: str = "heldout", device=None,
                         autocast: bool = False, windows: list | None = None) -> dict[str, float]:
        """Dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural Sequence Models"): the
        stream is scored in order, ``segment`` tokens at a time (each with the rest of the context window
        before it), and after scoring a segment the model takes one gradient step on that segment's
        loss, so it adapts to text it has already been scored on -- never to text it has not.  Dropout
        is off.  The model's weights are restored afterwards.

        optimizer: sgd (plain steps) or adam (steps normalised per weight).
        windows: a list that receives each window's (NLL sum, scored tokens), in order.
        """
        e = self.stream_entry()
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
        self._check_split(split)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        was_training = model.training
        model.eval()
        nll, tokens, dims = 0.0, 0, 0.0
        name = e.target[0]
        try:
            for batch in self.stream_windows(e, 1, segment, split):
                with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, m = model.loss(batch.to(device))
                nll += float(m[f"{name}/nll_sum"])
                tokens += int(m[f"{name}/count"])
                dims += float(m[f"{name}/units"])
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
        unit = self.adapters[name].unit
        return {f"{split}_nll": nll / max(tokens, 1), f"{split}_tokens": tokens,
                f"bits_per_{unit}": nll / LN2 / max(dims, 1e-9)}

    # ------------------------------------------------------------------ sampling
    def _pieces(self, key: str, items: list, role: str) -> list[Piece]:
        try:
            return encode_pieces(self.adapters[key], items, self.modality[key], role, self.specs)
        except SeqgenError as e:
            raise SeqgenError(f"the {key} condition: the adapter produced bad tokens: {e}") from None

    @torch.no_grad()
    def generate(self, model: nn.Module | None = None, *, entry: str | None = None, conds: list[dict] | None = None,
                 n: int | None = None, prompt: Any = None, length: int | None = None, generator=None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 cfg_scale: float = 1.0, cfg_schedule: str = "constant", order: str = "raster",
                 batch_size: int = 500, progress: Callable[[int, int], Any] | None = None,
                 steps: int | None = None) -> list[dict]:
        """Generate the target segments of a mixture entry.

        conds:   one dict {domain: raw item} per sample, holding every condition domain of the entry
        prompt:  streams: what the samples continue (raw item of the target domain)
        length:  streams: tokens to generate; variable-length targets: the limit (default the
                 adapter's ``max_length``)
        steps:   masked / next-scale paradigms: decoding steps per segment (None: the paradigm's default)
        Returns one dict {target domain: raw item} per sample.
        """
        model = model or self.model
        e = self.entry(entry)
        device = next(model.parameters()).device
        if conds is None:
            if e.cond:
                raise SeqgenError(f"entry {e.name!r} is conditioned on {e.cond}: give conds=[{{...}}] (one per sample)")
            conds = [{} for _ in range(n or 1)]
        for c in conds:
            missing = set(e.cond) - set(c)
            if missing or set(c) - set(e.cond):
                raise SeqgenError(f"entry {e.name!r} takes conditions {e.cond}; got {sorted(c)}")
        if cfg_scale != 1.0 and not e.cond:
            raise SeqgenError(f"classifier-free guidance needs a condition; entry {e.name!r} has none")
        if generator is None:
            generator = torch.Generator(device=device) if device.type != "cpu" else torch.Generator()
            generator.manual_seed(0)
        was_training = model.training
        model.eval()
        results: list[dict] = []
        total = len(conds)
        try:
            for s in range(0, total, batch_size):
                chunk = conds[s:s + batch_size]
                B = len(chunk)
                rows = [[] for _ in range(B)]
                for k in e.cond:
                    for r, p in enumerate(self._pieces(k, [c[k] for c in chunk], "cond")):
                        rows[r].append(p)
                targets = [self._targets(e, prompt, length) for _ in range(B)]
                orders = self.paradigm.generation_orders(targets, order, generator)
                if order == "random" and getattr(model, "target_pos", None) is None:
                    raise SeqgenError("random-order sampling needs a model trained with order=random (target positions)")
                plan = build_plan(rows, targets, self.specs, guided=cfg_scale != 1.0, orders=orders)
                if hasattr(self.paradigm, "prepare_plan"):
                    plan = self.paradigm.prepare_plan(plan)
                max_context = self.context_of(e) if e.stream else None
                cache_len = plan.prompt.length + int(plan.n_slots.max()) + 1
                if max_context is not None:
                    if plan.prompt.length >= max_context:  # a prompt longer than the window: keep its newest half
                        keep = max(1, max_context // 2)
                        plan.prompt = plan.prompt.slice(plan.prompt.length - keep)
                        plan.prompt_target_pos = plan.prompt_target_pos[:, -keep:]
                        plan.prompt_group = plan.prompt_group[:, -keep:]
                    cache_len = min(cache_len, max_context)
                mask = self.paradigm.prompt_mask(plan) if hasattr(self.paradigm, "prompt_mask") else None
                cache, h = prefill(model, plan, cache_len, device, mask, last=getattr(self.paradigm, "token_group", 1))
                cb = None if progress is None else (lambda t, T, _s=s: progress(_s + t * B // max(T, 1), total))
                self.paradigm.fill(model, plan, cache, h, specs=self.specs, generator=generator, temperature=temperature,
                                   top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                   max_context=max_context, progress=cb, **({} if steps is None else {"steps": steps}))
                for j, k in enumerate(e.target):
                    seqs = [outputs(plan, b, j) for b in range(B)]
                    items = self.adapters[k].decode(_stack_padded(seqs, max(q.length for q in seqs)))
                    for b in range(B):
                        if j == 0:
                            results.append({})
                        results[s + b][k] = items[b]
        finally:
            model.train(was_training)
        return results

    def _targets(self, e: Entry, prompt: Any, length: int | None) -> list[Target]:
        out = []
        for k in e.target:
            a = self.adapters[k]
            m = self.modality[k]
            if e.stream:
                if prompt is None or prompt == "":
                    raise SeqgenError("sampling a stream needs a non-empty prompt to continue (e.g. a newline)")
                ids = a.encode_stream([prompt])
                seq = TokenSequence.from_ids(ids.view(1, -1))
                pre = Piece(m, ids, seq.pos[0], a.units(seq)[0].float(), open=True)
                L = int(length or 256)
                out.append(Target(m, a.layout(1, L).pos[0], open=True, prefix=pre))
            else:
                variable = bool(a.variable_length)
                lay = a.layout(1, length if variable else None)
                out.append(Target(m, lay.pos[0], variable=variable))
        return out

    def write_samples(self, entry: str | None, results: list[dict], path: str | Path, conds: list[dict] | None = None,
                      nrow: int | None = None, prompt: Any = None) -> list[Path]:
        """Write every target domain's samples with its adapter (one file per target domain)."""
        e = self.entry(entry)
        path = Path(path)
        written = []
        for j, k in enumerate(e.target):
            a = self.adapters[k]
            p = path if len(e.target) == 1 else path.with_name(f"{path.stem}_{k}{path.suffix}")
            if p.suffix == "":
                p = p.with_suffix(a.sample_suffix)
            kw: dict = {"nrow": nrow}
            if prompt is not None:
                kw["prompt"] = prompt
            if conds is not None and e.cond:
                kw["conditions"] = ["; ".join(f"{c}: {_short(x[c])}" for c in e.cond) for x in conds]
            written.append(a.write_samples([r[k] for r in results], p, **kw))
        return written


def _short(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"<{type(x).__name__}{tuple(np.shape(x))}>"


def _stack_padded(parts: list[TokenSequence], L: int) -> TokenSequence:
    """Stack (n_i, L_i) sequences along the batch, right-padding each to L (valid False)."""
    def pad(t, fill=0):
        if t is None:
            return None
        extra = L - t.shape[1]
        if extra == 0:
            return t
        return torch.cat([t, torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype)], 1)
    padded = []
    for p in parts:
        pos = pad(p.pos)
        if p.length < L and p.length > 0:
            pos[:, p.length:] = p.pos[:, -1:]
        padded.append(TokenSequence(ids=pad(p.ids), values=pad(p.values), pos=pos, modality=pad(p.modality),
                                    valid=pad(p.valid, False), segment=None))
    return TokenSequence.batch_cat(*padded)


def build_task(cfg: RunConfig, run_dir: str | Path | None = None):
    """The task object of a run, found by its ``task:`` name in the registry."""
    from .registry import TASK_KINDS

    return TASK_KINDS.get(cfg.task)(cfg, run_dir)


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


def build_model(cfg: RunConfig, run_dir: str | Path | None = None) -> SeqModel:
    """The model of a generative config (builds the task: data, adapters and all)."""
    return GenerativeTask(cfg, run_dir).model
