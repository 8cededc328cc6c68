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
    @dataclass
    class Config:
        tokenizer: str = "bytes"
        """bytes (vocabulary 256) or bpe (trained on the run's training text)"""
        vocab_size: int = 1024
        """BPE vocabulary size (ignored for bytes)"""
        context: int = 256
        """training window length in tokens"""

        @classmethod
        def tiny(cls) -> "TextDomain.Config":
            return cls(context=32)

    def __init__(self, config: "TextDomain.Config | None" = None, modality: int = 0):
        self.config = cfg = config or self.Config()
        self.modality = modality
        if cfg.tokenizer not in TOKENIZERS:
            raise SeqgenError(f"text: unknown tokenizer {cfg.tokenizer!r}; known: {', '.join(TOKENIZERS)}")
        if cfg.context < 2:
            raise SeqgenError(f"text: context must be >= 2 tokens, got {cfg.context}")
        self.tok = ByteTokenizer() if cfg.tokenizer == "bytes" else None
        self.spec = DomainSpec("text", vocab_size=256 if cfg.tokenizer == "bytes" else cfg.vocab_size, pos_axes=1)

    # ------------------------------------------------------------------ fitting (BPE)
    @property
    def needs_fit(self) -> bool:
        return self.tok is None

    def fit(self, train_text: str, run_dir: Path | None = None) -> None:
        """Train the BPE on the training split; saved as run_dir/tokenizer.json (loaded if present)."""
        if self.config.tokenizer != "bpe":
            return
        path = None if run_dir is None else Path(run_dir) / "tokenizer.json"
        if path is not None and path.exists():
            self.tok = BPETokenizer.load(path)
        else:
            log.info("training a byte-level BPE with %d tokens on %d characters", self.config.vocab_size,
                     len(train_text))
            self.tok = BPETokenizer.train(train_text, self.config.vocab_size)
            if path is not None:
                self.tok.save(path)
        if self.tok.vocab_size != self.spec.vocab_size:
            raise SeqgenError(f"text: the BPE has {self.tok.vocab_size} tokens but the config says "
                              f"vocab_size={self.spec.vocab_size} (too little text to learn that many merges?)")

    def load(self, run_dir: Path) -> None:
        if self.config.tokenizer == "bpe":
            path = Path(run_dir) / "tokenizer.json"
            if not path.exists():
                raise SeqgenError(f"text: {path} is missing; the run's BPE tokenizer is needed to read its tokens")
            self.tok = BPETokenizer.load(path)

    def _tokenizer(self):
        if self.tok is None:
            raise SeqgenError("text: the BPE tokenizer is not trained yet; call fit(train_text) or load(run_dir)")
        return self.tok

    # ------------------------------------------------------------------ encode / decode
    def encode_stream(self, text: str) -> Tensor:
        """A whole corpus -> (N,) long ids."""
        if not isinstance(text, str):
            raise SeqgenError(f"text: expected a str, got {type(text).__name__}")
        if not text:
            raise SeqgenError("text: cannot encode an empty text")
        ids = self._tokenizer().encode(text)
        return torch.tensor(np.asarray(ids, dtype=np.int64))

    def encode(self, texts) -> TokenSequence:
        """str or list of str of equal token length -> (B, L) tokens."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._tokenizer().encode(t) for t in texts]
        if not rows or not rows[0]:
            raise SeqgenError("text: nothing to encode (empty text)")
        if len({len(r) for r in rows}) != 1:
            raise SeqgenError(f"text: a batch needs texts of one token length; got {sorted({len(r) for r in rows})}")
        return TokenSequence.from_ids(torch.tensor(rows, dtype=torch.long), modality=self.modality)

    def decode(self, seq: TokenSequence) -> list[str]:
        order = seq.pos[..., 0].argsort(dim=1)
        ids = torch.gather(seq.ids, 1, order)
        return [self._tokenizer().decode(row.tolist()) for row in ids.cpu()]

    def decode_ids(self, ids) -> str:
        return self._tokenizer().decode(list(ids))

    def windows(self, stream: Tensor, starts: Tensor, length: int) -> TokenSequence:
        """Cut windows stream[s : s + length] -> (B, length) tokens at positions 0..length-1."""
        idx = starts.view(-1, 1) + torch.arange(length)
        return TokenSequence.from_ids(stream[idx], modality=self.modality)

    def layout(self, batch_size: int, length: int, device=None) -> TokenSequence:
        return TokenSequence(ids=torch.zeros(batch_size, length, dtype=torch.long, device=device), values=None,
                             pos=line_positions(length, batch_size, device=device),
                             modality=torch.full((batch_size, length), self.modality, dtype=torch.long, device=device),
                             valid=torch.ones(batch_size, length, dtype=torch.bool, device=device))

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n random lower-case strings of 12 characters (one token length for bytes)."""
        idx = torch.randint(0, 26, (n, 12), generator=generator)
        return ["".join(chr(97 + i) for i in row) for row in idx.tolist()]

    def write_samples(self, texts: list[str], path: str | Path, prompt: str = "") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sep = "\n\n" + "=" * 72 + "\n\n"
        path.write_text(sep.join(prompt + t for t in texts) + "\n", encoding="utf-8")
        return path

