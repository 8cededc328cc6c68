"""Colour emoji images with their human-written names, from the emoji-datasource npm packages.

Each record is one vendor's 64x64 PNG of one emoji, composited on white and downsampled to
``size`` x ``size`` RGB, with the emoji's name from the package metadata (``emoji.json``), lower-cased
("grinning face", "red apple", "vatican city flag").  The held-out split is a seeded set of whole emoji:
every vendor's image of a held-out emoji is held out, so a model is scored on emoji it never saw.

Licences.  Images and metadata come from two pinned npm packages built by iamcal/emoji-data:
    emoji-datasource-google@16.0.0   Noto Emoji v2.048 images, Apache License 2.0
                                     (https://github.com/googlefonts/noto-emoji); attribution:
                                     "Noto Emoji graphics by Google, Apache License 2.0".
    emoji-datasource-twitter@16.0.0  Twemoji v16.0.1 images (jdecked fork), CC BY 4.0; attribution required:
                                     "Twemoji graphics by Twitter, Inc and other contributors, licensed under
                                     CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)".
The packages' code and metadata (emoji.json) are MIT, Copyright (c) 2013 Cal Henderson.  Not used:
emoji-datasource-apple (the README: "Apple images, Copyright (c) Apple Inc., are not licensed for
commercial usage"), emoji-datasource-facebook ("Facebook images ... have no clear licensing"), and openmoji
(CC BY-SA 4.0, but the npm package ships only SVG files, which Pillow cannot rasterise).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .datasets import RawSplits, data_dir, npm_pack
from .registry import register_dataset
from .types import SeqgenError

log = logging.getLogger(__name__)

# vendor -> (npm package, pinned version, image licence)
VENDORS = {
    "google": ("emoji-datasource-google", "16.0.0", "Apache-2.0 (Noto Emoji)"),
    "twitter": ("emoji-datasource-twitter", "16.0.0", "CC-BY-4.0 (Twemoji)"),
}
REJECTED = {
    "apple": "Apple images are not licensed for commercial usage",
    "facebook": "Facebook images have no clear licensing",
    "openmoji": "the openmoji npm package ships only SVG images (no PNG)",
}
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}
SPLITS = ("train", "heldout")
COLUMNS = ("image", "name", "emoji", "vendor")
_FORMAT = 1  # bump when the decoding changes, so old on-disk caches are not reused


def _read_package(tgz: Path, vendor: str) -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json and the PNG bytes under package/img/<vendor>/64/, in one streamed pass over the .tgz."""
    prefix, meta, pngs = f"package/img/{vendor}/64/", None, {}
    try:
        with tarfile.open(tgz, "r|gz") as tf:
            for m in tf:
                if m.isfile() and m.name == "package/emoji.json":
                    meta = json.load(tf.extractfile(m))
                elif m.isfile() and m.name.startswith(prefix) and m.name.endswith(".png"):
                    pngs[m.name[len(prefix):]] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise SeqgenError(f"emoji: {tgz} is not a readable npm package ({e}); delete it and run "
                          "`seqgen data get emoji`") from None
    if meta is None or not pngs:
        raise SeqgenError(f"emoji: {tgz} has no package/emoji.json or no {prefix}*.png; delete it and refetch")
    return meta, pngs


def _decode(png: bytes, size: int) -> np.ndarray:
    """RGBA PNG -> alpha composited on white -> LANCZOS resize -> (size, size, 3) uint8."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, im).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, np.uint8)


@register_dataset("emoji")
class Emoji:
    """Colour emoji images (npm emoji-datasource-google / -twitter) with their names; held out: whole emoji (every vendor's image of them)."""

    @dataclass
    class Config:
        vendors: list[str] = field(default_factory=lambda: ["google", "twitter"])
        """image sets: google (Noto, Apache-2.0) and/or twitter (Twemoji, CC BY 4.0)"""
        size: int = 16
        """images are resized to size x size (LANCZOS), RGB, alpha composited on white"""
        heldout_fraction: float = 0.1
        """fraction of distinct emoji held out (all vendors' images of a held-out emoji are held out)"""
        split_seed: int = 0
        skin_tones: bool = False
        """include skin-tone variants (named e.g. "thumbs up sign: dark skin tone"); they share their base
        emoji's key, so they are held out with it"""

    def __init__(self, config: "Emoji.Config | None" = None):
        self.config = cfg = config or self.Config()
        if isinstance(cfg.vendors, str):
            cfg.vendors = [cfg.vendors]
        for v in cfg.vendors:
            if v in REJECTED:
                raise SeqgenError(f"emoji: vendor {v!r} is not offered: {REJECTED[v]}; known: {', '.join(VENDORS)}")
            if v not in VENDORS:
                raise SeqgenError(f"emoji: unknown vendor {v!r}; known: {', '.join(VENDORS)}")
        if not cfg.vendors or len(set(cfg.vendors)) != len(cfg.vendors):
            raise SeqgenError(f"emoji: vendors must be a non-empty list without repeats, got {cfg.vendors}")
        if not isinstance(cfg.size, int) or cfg.size < 1:
            raise SeqgenError(f"emoji: size must be a positive integer, got {cfg.size!r}")
        if not 0 < cfg.heldout_fraction < 1:
            raise SeqgenError(f"emoji: heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}")
        self._splits: dict[str, dict] | None = None

    # ------------------------------------------------------------ fetching and caching
    def packages(self) -> list[str]:
        return [f"{VENDORS[v][0]}@{VENDORS[v][1]}" for v in self.config.vendors]

    def fetch(self) -> Path:
        return self._fetch_all()[self.config.vendors[0]].parent

    def _fetch_all(self) -> dict[str, Path]:
        return {v: npm_pack(spec, data_dir() / "pkgs") for v, spec in zip(self.config.vendors, self.packages())}

    def cache_path(self) -> Path:
        key = json.dumps({"config": asdict(self.config), "packages": self.packages(), "format": _FORMAT},
                         sort_keys=True)
        return data_dir() / "emoji" / f"emoji-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"

    def _load_splits(self) -> dict[str, dict]:
        if self._splits is None:
            path = self.cache_path()
            if path.exists():
                try:
                    with np.load(path, allow_pickle=False) as z:
                        self._splits = {s: {"image": z[f"{s}_image"].astype(np.float32) / np.float32(255),
                                            **{c: z[f"{s}_{c}"].tolist() for c in COLUMNS[1:]}} for s in SPLITS}
                    return self._splits
                except (OSError, KeyError, ValueError) as e:
                    log.warning("emoji: ignoring unreadable cache %s (%s)", path, e)
            raw = self._build()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **{f"{s}_{c}": np.asarray(raw[s][c]) for s in SPLITS for c in COLUMNS})
            os.replace(tmp, path)
            self._splits = {s: {"image": raw[s]["image"].astype(np.float32) / np.float32(255),
                                **{c: list(raw[s][c]) for c in COLUMNS[1:]}} for s in SPLITS}
        return self._splits

    def _build(self) -> dict[str, dict]:
        """Decode every wanted image from the packages: {split: {column: uint8 images / lists}}."""
        cfg = self.config
        read = {v: _read_package(p, v) for v, p in self._fetch_all().items()}
        meta = sorted(read[cfg.vendors[0]][0], key=lambda e: (e.get("sort_order", 0), e["unified"]))
        images = {v: read[v][1] for v in cfg.vendors}
        items = []  # (emoji key, name, vendor, image file)
        for e in meta:
            if not cfg.skin_tones and e["unified"] in SKIN_TONES:
                continue  # the bare skin-tone swatches
            name = (e.get("name") or e.get("short_name", "").replace("_", " ")).strip().lower()
            variants = [(e, name)]
            if cfg.skin_tones:
                for tones, var in sorted((e.get("skin_variations") or {}).items()):
                    tone = ", ".join(dict.fromkeys(SKIN_TONES.get(t, t.lower()) for t in tones.split("-")))
                    variants.append((var, f"{name}: {tone}"))
            for v in cfg.vendors:
                items += [(e["unified"], n, v, var["image"]) for var, n in variants if var.get(f"has_img_{v}")]
        missing = [it for it in items if it[3] not in images[it[2]]]
        if missing:
            log.warning("emoji: %d images listed in emoji.json are missing from the packages; skipped", len(missing))
            items = [it for it in items if it[3] in images[it[2]]]
        keys = sorted({it[0] for it in items})
        n_held = max(1, int(round(len(keys) * cfg.heldout_fraction)))
        if not 0 < n_held < len(keys):
            raise SeqgenError(f"emoji: cannot hold out {n_held} of {len(keys)} emoji; change heldout_fraction")
        perm = np.random.default_rng(cfg.split_seed).permutation(len(keys))
        held = {keys[i] for i in perm[:n_held]}
        out = {}
        for s in SPLITS:
            part = [it for it in items if (it[0] in held) == (s == "heldout")]
            out[s] = {"image": np.stack([_decode(images[v][f], cfg.size) for _, _, v, f in part]),
                      "name": [it[1] for it in part], "emoji": [it[0] for it in part],
                      "vendor": [it[2] for it in part]}
        return out

    # ------------------------------------------------------------ access
    def records(self, split: str) -> dict:
        """Columns of equal length N: image (N, size, size, 3) float32 in [0, 1]; name, emoji
        (unified code points of the base emoji: the held-out key) and vendor, lists of str."""
        if split not in SPLITS:
            raise SeqgenError(f"emoji: unknown split {split!r}; accepted splits: {', '.join(SPLITS)}")
        return dict(self._load_splits()[split])

    def load(self) -> RawSplits:
        """The images alone (no class labels), for unconditional image models."""
        tr, te = self.records("train"), self.records("heldout")
        return RawSplits("image", tr["image"], te["image"],
                         info={"name": "emoji", "source": ", ".join(f"npm {p}" for p in self.packages()),
                               "licence": "; ".join(f"{v}: {VENDORS[v][2]}" for v in self.config.vendors),
                               "train_names": tr["name"], "heldout_names": te["name"]})
