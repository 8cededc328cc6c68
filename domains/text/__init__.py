"""Text as token sequences: raw UTF-8 bytes (lossless, vocabulary 256) or a byte-level BPE trained
offline on the run's own training split with Hugging Face ``tokenizers`` (also lossless).

Long texts are one stream of ids; training cuts random windows of ``context`` tokens from it.
Positions are 1-D, (i, i, i), which makes N-D RoPE exactly ordinary RoPE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seqgen.registry import register_domain
from seqgen.types import DomainSpec, SeqgenError, TokenSequence, line_positions

log = logging.getLogger(__name__)

TOKENIZERS = ("bytes", "bpe")


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (Sennrich et al., 2016; GPT-2's byte-level variant): every string round-trips."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise SeqgenError("the BPE tokenizer needs Hugging Face tokenizers: pip install 'seqgen[data]'") from None
        if vocab_size < 257:
            raise SeqgenError(f"text: a byte-level BPE needs vocab_size > 256, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        chunk = 1 << 16
        tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:
            raise SeqgenError(f"text: cannot read the BPE tokenizer {path}: {e}") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        self.tok.save(str(tmp))
        tmp.replace(path)

    def encode(self, text: str) -> list[int]:
        # Encode in paragraph-sized chunks (cut after blank lines): far less memory for megabytes of
        # text, and deterministic, so training and evaluation see the same tokens.
        return [i for enc in self.tok.encode_batch(_chunks(text)) for i in enc.ids]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split at paragraph boundaries (blank lines) so BPE merges never cross a chunk edge."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.find("\n\n", end)
            end = len(text) if cut < 0 else cut + 2
            # keep runs of newlines together: extend over any following newline characters
            while end < len(text) and text[end] == "\n":
                end += 1
        out.append(text[start:end])
        start = end
    return out


@register_domain("text")
class TextDomain:
    """Text: a caption or name (a variable-length segment that ends itself), or a long stream cut into
    windows of ``context`` tokens (``stream: true`` in the run's mixture)."""

    variable_length = True
    unit = "byte"
    sample_suffix = ".txt"

    @dataclass
    class Config:
        tokenizer: str = "bytes"
        """bytes (vocabulary 256) or bpe (trained on the run's training text)"""
        vocab_size: int = 1024
        """BPE vocabulary size (ignored for bytes)"""
        context: int = 256
        """stream windows: training window length in tokens"""
        max_length: int = 128
        """longest item generated as a target segment (it ends earlier at its END id)"""

        @classmethod
        def tiny(cls) -> "TextDomain.Config":
            return cls(context=32, max_length=32)

    def __init__(self, config: "TextDomain.Config | None" = None):
        self.config = cfg = config or self.Config()
        if cfg.tokenizer not in TOKENIZERS:
            raise SeqgenError(f"text: unknown tokenizer {cfg.tokenizer!r}; known: {', '.join(TOKENIZERS)}")
        if cfg.context < 2:
            raise SeqgenError(f"text: context must be >= 2 tokens, got {cfg.context}")
        if cfg.max_length < 1:
            raise SeqgenError(f"text: max_length must be >= 1, got {cfg.max_length}")
        self.tok = ByteTokenizer() if cfg.tokenizer == "bytes" else None
        self.spec = DomainSpec("text", vocab_size=256 if cfg.tokenizer == "bytes" else cfg.vocab_size, pos_axes=1)
        self._token_bytes: Tensor | None = None

    @property
    def context(self) -> int:
        """Stream windows: tokens of context a window gives the model."""
        return self.config.context

    # ------------------------------------------------------------------ fitting (BPE)
    def fit(self, train_items, run_dir: Path | None = None) -> None:
        """Train the BPE on the training texts; saved as run_dir/tokenizer.json (loaded if present)."""
        if self.config.tokenizer != "bpe":
            return
        path = None if run_dir is None else Path(run_dir) / "tokenizer.json"
        if path is not None and path.exists():
            self.tok = BPETokenizer.load(path)
        else:
            text = "\n\n".join(self._check_texts(train_items))
            log.info("training a byte-level BPE with %d tokens on %d characters", self.config.vocab_size, len(text))
            self.tok = BPETokenizer.train(text, self.config.vocab_size)
            if path is not None:
                self.tok.save(path)
        if self.tok.vocab_size != self.spec.vocab_size:
            raise SeqgenError(f"text: the BPE has {self.tok.vocab_size} tokens but the config says "
                              f"vocab_size={self.spec.vocab_size} (too little text to learn that many merges?)")
        self._token_bytes = None

    def _tokenizer(self):
        if self.tok is None:
            raise SeqgenError("text: the BPE tokenizer is not trained yet; call fit(train_texts, run_dir)")
        return self.tok

    @staticmethod
    def _check_texts(items) -> list[str]:
        items = [items] if isinstance(items, str) else list(items)
        for t in items:
            if not isinstance(t, str):
                raise SeqgenError(f"text: expected str items, got {type(t).__name__}")
        return items

    # ------------------------------------------------------------------ encode / decode
    def encode_stream(self, items) -> Tensor:
        """Texts -> one (N,) long id stream (each text encoded on its own, then concatenated)."""
        items = self._check_texts(items)
        if not any(items):
            raise SeqgenError("text: cannot encode an empty text")
        ids = [i for t in items for i in self._tokenizer().encode(t)]
        return torch.tensor(np.asarray(ids, dtype=np.int64))

    def encode(self, items) -> TokenSequence:
        """Texts -> (N, L) tokens, L the longest; ``valid`` False after the end of shorter texts."""
        items = self._check_texts(items)
        rows = [self._tokenizer().encode(t) for t in items]
        if not rows:
            raise SeqgenError("text: nothing to encode (no texts)")
        if any(len(r) == 0 for r in rows):
            raise SeqgenError("text: cannot encode an empty text")
        L = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        valid = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, :len(r)] = True
        return TokenSequence.from_ids(ids, valid=valid)

    def decode(self, seq: TokenSequence) -> list[str]:
        if seq.ids is None:
            raise SeqgenError("text: decode needs token ids")
        order = seq.pos[..., 0].argsort(dim=1)
        ids = torch.gather(seq.ids, 1, order).cpu()
        valid = torch.gather(seq.valid, 1, order).cpu()
        return [self._tokenizer().decode(row[v].tolist()) for row, v in zip(ids, valid)]

    def decode_ids(self, ids) -> str:
        return self._tokenizer().decode(list(ids))

    def layout(self, n: int, length: int | None = None) -> TokenSequence:
        L = self.config.max_length if length is None else int(length)
        return TokenSequence.from_ids(torch.zeros(n, L, dtype=torch.long), pos=line_positions(L, n))

    def units(self, seq: TokenSequence) -> Tensor:
        """UTF-8 bytes each token stands for (bits per byte = total bits / total bytes)."""
        if self._token_bytes is None:
            tok = self._tokenizer()
            if self.config.tokenizer == "bytes":
                self._token_bytes = torch.ones(256)
            else:  # byte-level BPE: every character of a token's string stands for exactly one byte
                self._token_bytes = torch.tensor([float(len(tok.tok.id_to_token(i))) for i in range(tok.vocab_size)])
        return self._token_bytes[seq.ids.clamp(0, len(self._token_bytes) - 1).cpu()]

    # ------------------------------------------------------------------ people
    def from_prompt(self, text: str) -> str:
        if not isinstance(text, str) or not text:
            raise SeqgenError("text: a prompt must be a non-empty string")
        return text

    def baselines(self, train_items, heldout_items) -> dict[str, float]:
        """General-purpose compressors on the same held-out text, in bits per byte."""
        from seqgen.evaluate import compressor_bits_per_byte

        return compressor_bits_per_byte("\n\n".join(train_items), "\n\n".join(heldout_items))

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n random lower-case strings of 4 to 12 characters."""
        lens = torch.randint(4, 13, (n,), generator=generator).tolist()
        idx = torch.randint(0, 26, (n, 12), generator=generator)
        return ["".join(chr(97 + i) for i in row[:k]) for row, k in zip(idx.tolist(), lens)]

    def write_samples(self, texts: list[str], path: str | Path, prompt: str = "", conditions=None, **_) -> Path:
        """One text per block; a condition, when given, is written above its sample."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sep = "\n\n" + "=" * 72 + "\n\n"
        blocks = [(f"[{conditions[i]}]\n" if conditions is not None else "") + prompt + t for i, t in enumerate(texts)]
        path.write_text(sep.join(blocks) + "\n", encoding="utf-8")
        return path
