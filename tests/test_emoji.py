"""The emoji data set: npm emoji-datasource-google / -twitter images with their names."""
from collections import defaultdict

import numpy as np
import pytest

from seqgen.datasets import DataUnavailableError
from seqgen.emoji import Emoji
from seqgen.registry import DATASETS
from seqgen.types import SeqgenError


@pytest.fixture(scope="module")
def emoji():
    ds = DATASETS.build("emoji", {})
    try:
        ds.fetch()
    except DataUnavailableError as e:
        pytest.skip(f"emoji packages unavailable: {e}")
    return ds


@pytest.fixture(scope="module")
def splits(emoji):
    return {s: emoji.records(s) for s in ("train", "heldout")}


def test_shapes_dtypes_ranges(splits):
    for split, r in splits.items():
        n = len(r["image"])
        assert n > 0, split
        assert r["image"].shape == (n, 16, 16, 3) and r["image"].dtype == np.float32
        assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0
        assert len(r["name"]) == len(r["emoji"]) == len(r["vendor"]) == n
        assert set(r["vendor"]) == {"google", "twitter"}
    n_train, n_held = (len(set(splits[s]["emoji"])) for s in ("train", "heldout"))
    assert abs(n_held / (n_train + n_held) - 0.1) < 0.01


def test_names(splits):
    for r in splits.values():
        assert all(isinstance(n, str) and n.strip() and n == n.lower() for n in r["name"])
    names = set(splits["train"]["name"]) | set(splits["heldout"]["name"])
    assert {"grinning face", "red apple"} <= names
    assert not any("skin tone" in n for n in names)  # skin_tones=False by default


def test_heldout_is_whole_emoji(splits):
    train, held = (set(splits[s]["emoji"]) for s in ("train", "heldout"))
    assert not train & held
    vendors = defaultdict(set)
    for s in ("train", "heldout"):
        for key, v in zip(splits[s]["emoji"], splits[s]["vendor"]):
            vendors[key].add((s, v))
    for key in held:  # every vendor image of a held-out emoji is in the held-out split
        assert all(s == "heldout" for s, _ in vendors[key]), key
    assert all(len(vendors[k]) == 2 for k in held)  # both image sets draw every emoji


def test_images_not_blank_nor_identical(splits):
    x = np.concatenate([splits["train"]["image"], splits["heldout"]["image"]])
    assert x.std(axis=(1, 2, 3)).mean() > 0.1  # emoji have colour and shape, not a white square
    assert (x.std(axis=(1, 2, 3)) > 0.01).mean() > 0.99
    assert len(np.unique(x.reshape(len(x), -1), axis=0)) > 0.9 * len(x)
    assert x.mean() < 0.95  # not all white background


def test_deterministic_and_disk_cache(emoji, splits):
    assert emoji.cache_path().exists()
    again = Emoji(Emoji.Config())  # a new instance reads the .npz on disk
    assert again.cache_path() == emoji.cache_path()
    fresh = Emoji(Emoji.Config())._build()  # decoded from the packages again
    for s in ("train", "heldout"):
        r = again.records(s)
        np.testing.assert_array_equal(r["image"], splits[s]["image"])
        np.testing.assert_array_equal(fresh[s]["image"].astype(np.float32) / np.float32(255), splits[s]["image"])
        for c in ("name", "emoji", "vendor"):
            assert r[c] == splits[s][c] == fresh[s][c]


def test_config_changes_key_and_split(emoji):
    other = Emoji(Emoji.Config(split_seed=1))
    assert other.cache_path() != emoji.cache_path()
    assert Emoji(Emoji.Config(size=8)).cache_path() != emoji.cache_path()


def test_load_gives_image_splits(emoji, splits):
    raw = emoji.load()
    assert raw.kind == "image" and raw.train.shape == splits["train"]["image"].shape
    assert raw.heldout.shape == splits["heldout"]["image"].shape


def test_bad_input(emoji):
    with pytest.raises(SeqgenError, match="accepted splits: train, heldout"):
        emoji.records("test")
    with pytest.raises(SeqgenError, match="not licensed"):
        Emoji(Emoji.Config(vendors=["apple"]))
    with pytest.raises(SeqgenError, match="unknown vendor"):
        Emoji(Emoji.Config(vendors=["nope"]))
    with pytest.raises(SeqgenError, match="heldout_fraction"):
        Emoji(Emoji.Config(heldout_fraction=1.5))
    with pytest.raises(SeqgenError, match="has no option"):
        DATASETS.build("emoji", {"sizes": 8})
