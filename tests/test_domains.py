"""Domain adapters: lossless round trips, scan orders, BPE, labels, and clear errors."""
import numpy as np
import pytest
import torch

from seqgen.domains.image import ImageDomain, save_image_grid, scan_order
from seqgen.domains.label import LabelDomain
from seqgen.domains.text import TextDomain, _chunks
from seqgen.interfaces import DomainAdapter
from seqgen.types import SeqgenError


def digits():
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0


def test_pixel_tokens_are_lossless_for_8x8_digits_at_17_levels():
    x = digits()
    dom = ImageDomain(ImageDomain.Config(height=8, width=8, levels=17))
    seq = dom.encode(x)
    assert seq.ids.shape == (len(x), 64) and int(seq.ids.max()) == 16
    np.testing.assert_array_equal(dom.decode(seq), x.astype(np.float32))
    assert dom.dims_per_token == 1.0


@pytest.mark.parametrize("scan", ["raster", "column", "diagonal"])
def test_scans_keep_true_coordinates_and_round_trip(scan):
    x = np.random.default_rng(0).integers(0, 5, (3, 4, 6)) / 4
    dom = ImageDomain(ImageDomain.Config(height=4, width=6, levels=5, scan=scan))
    seq = dom.encode(x)
    np.testing.assert_array_equal(dom.decode(seq), x.astype(np.float32))
    # the token at sequence slot i holds the pixel at its coordinates
    r, c = seq.pos[0, :, 1], seq.pos[0, :, 2]
    np.testing.assert_array_equal(seq.ids[0].numpy(), np.rint(x[0][r.numpy(), c.numpy()] * 4))
    # decode places tokens by coordinates, so any token order decodes the same
    perm = torch.randperm(seq.length)
    np.testing.assert_array_equal(dom.decode(seq.gather(perm.expand(3, -1))), x.astype(np.float32))


def test_scan_orders():
    assert scan_order(2, 3, "raster").tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert scan_order(2, 3, "column").tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2]]
    assert scan_order(2, 3, "diagonal").tolist() == [[0, 0], [0, 1], [1, 0], [0, 2], [1, 1], [1, 2]]


def test_rgb_pixels_use_the_channel_axis():
    x = np.random.default_rng(1).integers(0, 3, (2, 3, 3, 3)) / 2
    dom = ImageDomain(ImageDomain.Config(height=3, width=3, channels=3, levels=3))
    seq = dom.encode(x)
    assert seq.length == 27 and seq.pos[0, :3, 0].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(dom.decode(seq), x.astype(np.float32))


def test_image_errors_name_the_problem():
    dom = ImageDomain(ImageDomain.Config(height=8, width=8))
    with pytest.raises(SeqgenError, match=r"expected images of shape \(N, 8, 8\)"):
        dom.encode(np.zeros((2, 7, 8)))
    with pytest.raises(SeqgenError, match=r"in \[0, 1\]"):
        dom.encode(np.full((2, 8, 8), 3.0))
    with pytest.raises(SeqgenError, match="unknown scan"):
        ImageDomain(ImageDomain.Config(scan="spiral"))


def test_byte_text_is_lossless_including_unicode():
    dom = TextDomain(TextDomain.Config())
    s = "To be, or not to be — that is the question.\n¿Qué? 日本語 ✓"
    ids = dom.encode_stream(s)
    assert int(ids.max()) < 256 and len(ids) == len(s.encode("utf-8"))
    assert dom.decode_ids(ids.tolist()) == s
    seq = dom.encode([s[:10], s[10:20]])
    assert dom.decode(seq) == [s[:10], s[10:20]]


def test_bpe_is_trained_on_the_corpus_and_lossless(tmp_path):
    corpus = ("the quick brown fox jumps over the lazy dog.\n\n" * 200) + "naïve café — ünïcode ✓\n"
    dom = TextDomain(TextDomain.Config(tokenizer="bpe", vocab_size=300))
    with pytest.raises(SeqgenError, match="not trained"):
        dom.encode_stream("x")
    dom.fit(corpus, tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    ids = dom.encode_stream(corpus)
    assert len(ids) < len(corpus.encode()) / 2  # merges learned
    assert dom.decode_ids(ids.tolist()) == corpus
    unseen = "Zebras quizzically vex 123 ☃"
    assert dom.decode_ids(dom.encode_stream(unseen).tolist()) == unseen
    again = TextDomain(TextDomain.Config(tokenizer="bpe", vocab_size=300))
    again.load(tmp_path)
    assert torch.equal(again.encode_stream(corpus), ids)


def test_text_chunks_cover_everything():
    text = ("para one\n\n\n" * 5000) + "tail"
    assert "".join(_chunks(text, size=1000)) == text


def test_label_domain():
    lab = LabelDomain(LabelDomain.Config(num_classes=10), modality=1)
    seq = lab.encode([3, 0, 9])
    assert seq.ids.tolist() == [[3], [0], [9]] and (seq.modality == 1).all()
    assert (lab.null(2).ids == 10).all()
    with pytest.raises(SeqgenError, match="labels outside 0..9"):
        lab.encode([10])


@pytest.mark.parametrize("adapter", [
    lambda: ImageDomain(ImageDomain.Config.tiny()),
    lambda: TextDomain(TextDomain.Config.tiny()),
    lambda: LabelDomain(LabelDomain.Config.tiny()),
])
def test_adapters_conform_and_round_trip_their_example_batch(adapter):
    a = adapter()
    assert isinstance(a, DomainAdapter)
    raw = a.example_batch(4, torch.Generator().manual_seed(0))
    seq = a.encode(raw)
    seq.validate([a.spec] if getattr(a, "modality", 0) == 0 else [a.spec, a.spec])
    back = a.decode(seq)
    if isinstance(a, ImageDomain):
        np.testing.assert_allclose(back, np.rint(raw * 4) / 4, atol=1e-6)
    elif isinstance(a, TextDomain):
        assert back == raw
    else:
        np.testing.assert_array_equal(back, raw)


def test_png_grid(tmp_path):
    p = save_image_grid(np.random.rand(6, 8, 8), tmp_path / "g.png", nrow=2)
    from PIL import Image

    im = Image.open(p)
    assert im.size[0] > im.size[1] > 32
