import numpy as np
import pytest

from seqgen.datasets import MNIST, DataUnavailableError
from seqgen.registry import DATASETS
from seqgen.scenes import (NUMBER_WORDS, TEMPLATES, MNISTScenes, choose_unseen_pairs, make_caption,
                           parse_caption)
from seqgen.types import SeqgenError


def small(**over) -> MNISTScenes:
    return MNISTScenes(MNISTScenes.Config(**{"train_scenes": 200, "heldout_scenes": 100, **over}))


@pytest.fixture(scope="module")
def scenes():
    try:
        MNIST().fetch()
    except DataUnavailableError as e:
        pytest.skip(f"MNIST is not available ({e}); run `seqgen data get mnist` first (CI does)")
    return small()


def subset(records: dict, mask: np.ndarray) -> dict:
    idx = np.flatnonzero(mask)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in records.items()}


# ------------------------------------------------------------------------------ captions (no data needed)
def test_caption_round_trip_every_template_and_pair():
    assert 5 <= len(TEMPLATES) <= 7
    right_first = [t for t in range(len(TEMPLATES)) if TEMPLATES[t].index("{r}") < TEMPLATES[t].index("{l}")]
    assert right_first, "some templates must name the right digit first"
    seen_texts = set()
    for t in range(len(TEMPLATES)):
        for a in range(10):
            for b in range(10):
                text = make_caption(a, b, t)
                assert parse_caption(text) == (a, b), text
                assert parse_caption("  " + text.upper() + ". ") == (a, b)
                seen_texts.add(text)
    assert len(seen_texts) == 100 * len(TEMPLATES)  # no two (pair, template) share a caption
    assert make_caption(7, 2, 0) == "a seven and a two" and make_caption(8, 2, 0) == "an eight and a two"
    words = make_caption(7, 2, right_first[0]).split()
    assert words.index("two") < words.index("seven")


@pytest.mark.parametrize("text", ["", "hello world", "a seven", "seven", "seven and", "a seven and a two and a one",
                                  "a seven and a ten", "seven or two", "the seven and the two", "seven two",
                                  "seven on the left", "a sevens and a two", None, 7])
def test_parse_caption_rejects(text):
    assert parse_caption(text) is None


def test_unseen_pairs_are_seeded():
    a, b = choose_unseen_pairs(10, 0), choose_unseen_pairs(10, 0)
    assert a == b and len(set(a)) == 10 and all(0 <= x < 10 and 0 <= y < 10 for x, y in a)
    assert choose_unseen_pairs(10, 1) != a
    with pytest.raises(SeqgenError):
        choose_unseen_pairs(100, 0)


def test_registered():
    ds = DATASETS.build("mnist_scenes", {"train_scenes": 10, "unseen_pairs": 3})
    assert isinstance(ds, MNISTScenes) and len(ds.unseen) == 3
    with pytest.raises(SeqgenError, match="options"):
        DATASETS.build("mnist_scenes", {"scenes": 10})


# ------------------------------------------------------------------------------ records (MNIST needed)
def test_records_shapes_dtypes_ranges(scenes):
    for split, n in (("train", 200), ("heldout", 100)):
        r = scenes.records(split)
        assert set(r) == {"image", "caption", "left", "right", "seen"}
        assert r["image"].shape == (n, 28, 56) and r["image"].dtype == np.float32
        assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0 and r["image"].max() > 0.5
        assert r["left"].shape == r["right"].shape == r["seen"].shape == (n,)
        assert r["left"].dtype == r["right"].dtype == np.int64 and r["seen"].dtype == bool
        assert len(r["caption"]) == n and all(isinstance(c, str) for c in r["caption"])
        assert [parse_caption(c) for c in r["caption"]] == list(zip(r["left"].tolist(), r["right"].tolist()))
        unseen = set(scenes.unseen)
        assert r["seen"].tolist() == [(a, b) not in unseen for a, b in zip(r["left"].tolist(), r["right"].tolist())]
    with pytest.raises(SeqgenError, match="train.*heldout"):
        scenes.records("test")


def test_records_deterministic(scenes):
    a, b = scenes.records("heldout"), small().records("heldout")
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert all(np.array_equal(a[k], b[k]) for k in ("left", "right", "seen"))
    assert scenes.records("train")["image"] is scenes.records("train")["image"]  # built once
    c = small(seed=1).records("heldout")
    assert not np.array_equal(a["image"], c["image"])


def test_unseen_pairs_only_held_out():
    ds = small(train_scenes=3000, heldout_scenes=2000)
    try:
        tr, te = ds.records("train"), ds.records("heldout")
    except DataUnavailableError as e:
        pytest.skip(f"MNIST is not available ({e})")
    unseen = set(ds.unseen)
    train_pairs = set(zip(tr["left"].tolist(), tr["right"].tolist()))
    assert len(unseen) == 10 and not train_pairs & unseen and len(train_pairs) == 90 and tr["seen"].all()
    held_pairs = set(zip(te["left"].tolist(), te["right"].tolist()))
    assert len(held_pairs) == 100
    assert 0.07 < 1 - te["seen"].mean() < 0.13


def test_heldout_scenes_use_heldout_digits(scenes):
    d = scenes.digits()
    r = scenes.records("heldout")
    tr = scenes.records("train")
    for i in range(8):
        for half, label in ((r["image"][i, :, :28], r["left"][i]), (r["image"][i, :, 28:], r["right"][i])):
            hit = np.flatnonzero((d.heldout == half).all(axis=(1, 2)))
            assert len(hit) and (d.heldout_labels[hit] == label).all()
            assert not (d.train == half).all(axis=(1, 2)).any()
        half = tr["image"][i, :, 28:]
        assert (d.train == half).all(axis=(1, 2)).any() and not (d.heldout == half).all(axis=(1, 2)).any()


# ------------------------------------------------------------------------------ scoring
def test_score_images(scenes):
    r = scenes.records("heldout")
    ref = scenes.score("image", r, r["image"])
    assert ref == scenes.reference_scores() == scenes.reference_scores("image")
    assert ref["accuracy"] > 0.8 and ref["samples"] == 100
    assert ref["accuracy_left"] > 0.85 and ref["accuracy_right"] > 0.85
    assert "accuracy_seen" in ref and "accuracy_unseen" in ref
    d = subset(r, r["left"] != r["right"])
    swapped = np.concatenate([d["image"][:, :, 28:], d["image"][:, :, :28]], axis=2)
    assert scenes.score("image", d, swapped)["accuracy"] < 0.2
    only_seen = subset(r, r["seen"])
    s = scenes.score("image", only_seen, list(only_seen["image"]))
    assert "accuracy_unseen" not in s and s["accuracy_seen"] == s["accuracy"]
    with pytest.raises(SeqgenError):
        scenes.score("image", r, r["image"][:10])
    with pytest.raises(SeqgenError):
        scenes.score("image", r, r["image"][:, :, :28])
    with pytest.raises(SeqgenError, match="field"):
        scenes.score("label", r, r["caption"])


def test_score_captions(scenes):
    r = scenes.records("heldout")
    s = scenes.score("caption", r, r["caption"])
    assert s["exact"] == s["exact_seen"] == s["exact_unseen"] == s["parsed"] == 1.0 and s["samples"] == 100
    assert scenes.reference_scores("caption") == s
    shuffled = [r["caption"][i] for i in np.random.default_rng(0).permutation(100)]
    s = scenes.score("caption", r, shuffled)
    assert s["exact"] < 0.2 and s["parsed"] == 1.0
    s = scenes.score("caption", r, ["nonsense"] * 50 + r["caption"][50:])
    assert s["parsed"] == 0.5 and s["exact"] == 0.5
    assert NUMBER_WORDS[r["left"][0]] in r["caption"][0]


# ------------------------------------------------------------------------------ augmentation and validation
def test_shift_digits_moves_each_digit_and_keeps_its_ink():
    from seqgen.scenes import shift_digits

    rng = np.random.default_rng(0)
    x = np.zeros((200, 9, 9), np.float32)
    x[:, 4, 4] = 1.0
    y = shift_digits(x, 2, rng)
    where = np.argwhere(y == 1.0)  # (n, 3): image, row, col
    assert len(where) == 200 and (y.sum(axis=(1, 2)) == 1).all()  # a centred dot never leaves the frame
    offsets = where[:, 1:] - 4
    assert np.abs(offsets).max() == 2 and len({tuple(o) for o in offsets}) == 25  # every offset in -2..2 occurs
    assert (shift_digits(x, 0, rng) == x).all()
    with pytest.raises(SeqgenError, match="smaller than the digit"):
        shift_digits(x, 9, rng)


def test_shift_applies_to_training_scenes_only(scenes):
    shifted = small(shift=2)
    a, b = scenes.records("train"), shifted.records("train")
    assert (a["left"] == b["left"]).all() and a["caption"] == b["caption"]
    assert (a["image"] != b["image"]).any(axis=(1, 2)).mean() > 0.5  # most scenes moved
    ink_a, ink_b = a["image"].sum(axis=(1, 2)), b["image"].sum(axis=(1, 2))
    lost = (ink_a - ink_b) / ink_a  # ink is kept, but for digits that touch the frame
    assert (lost > -1e-5).all() and np.median(lost) < 1e-5 and lost.max() < 0.05
    assert (scenes.records("heldout")["image"] == shifted.records("heldout")["image"]).all()


def test_validation_scenes_use_training_digits_kept_out_of_training(scenes):
    v = small(validation=500)
    d = v.digits()
    held, train = v.records("heldout"), v.records("train")
    halves = lambda im: np.concatenate([im[:, :, :28], im[:, :, 28:]])  # noqa: E731
    flat = lambda a: {x.tobytes() for x in a}  # noqa: E731
    val_digits, train_digits = flat(halves(held["image"])), flat(halves(train["image"]))
    assert not val_digits & train_digits  # no digit in both
    assert val_digits <= flat(d.train) and not val_digits & flat(d.heldout)  # never the real held-out digits
    with pytest.raises(SeqgenError, match="leaves no training digits"):
        small(validation=len(d.train)).records("train")
