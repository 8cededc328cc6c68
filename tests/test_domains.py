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
    seq = dom.encode(x)  # a (N, 8, 8) column of a source, or a list of (8, 8) items: the same tokens
    assert seq.ids.shape == (len(x), 64) and int(seq.ids.max()) == 16 and seq.valid.all()
    assert torch.equal(dom.encode(list(x[:5])).ids, seq.ids[:5])
    back = dom.decode(seq)
    assert isinstance(back, list) and len(back) == len(x) and back[0].shape == (8, 8)
    np.testing.assert_array_equal(np.stack(back), x.astype(np.float32))
    assert dom.dims_per_token == 1.0 and torch.equal(dom.units(seq), torch.ones(len(x), 64))
    lay = dom.layout(2)
    assert lay.ids.shape == (2, 64) and torch.equal(lay.pos, seq.pos[:2])


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
    again.fit([], tmp_path)  # a reloaded run: fit loads the saved tokenizer instead of training
    assert torch.equal(again.encode_stream(corpus), ids)
    seq = again.encode(["the lazy fox", "ünïcode ✓"])
    assert again.decode(seq) == ["the lazy fox", "ünïcode ✓"]
    # bits per byte: every BPE token stands for the UTF-8 bytes of its string
    assert float((again.units(seq) * seq.valid).sum()) == len("the lazy fox".encode()) + len("ünïcode ✓".encode())
    with pytest.raises(SeqgenError, match="vocab_size=400"):  # the saved BPE disagrees with the config
        TextDomain(TextDomain.Config(tokenizer="bpe", vocab_size=400)).fit([], tmp_path)


def test_text_items_are_variable_length_segments():
    dom = TextDomain(TextDomain.Config.tiny())
    assert dom.variable_length and dom.unit == "byte" and dom.spec.vocab_size == 256
    seq = dom.encode(["ab", "abcd"])
    assert seq.ids.shape == (2, 4)
    assert seq.valid.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert seq.pos[1, :, 0].tolist() == [0, 1, 2, 3] and (seq.pos[..., 0] == seq.pos[..., 2]).all()
    assert dom.decode(seq) == ["ab", "abcd"]
    # tokens in any order decode by their coordinates
    assert dom.decode(seq.gather(torch.tensor([[1, 0, 2, 3], [3, 1, 2, 0]]))) == ["ab", "abcd"]
    lay = dom.layout(3, 5)
    assert lay.ids.shape == (3, 5) and lay.pos[0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert dom.layout(1).length == dom.config.max_length  # no limit given: the domain's max_length
    with pytest.raises(SeqgenError, match="empty text"):
        dom.encode(["ok", ""])
    with pytest.raises(SeqgenError, match="expected str"):
        dom.encode([b"bytes"])


def test_text_chunks_cover_everything():
    text = ("para one\n\n\n" * 5000) + "tail"
    assert "".join(_chunks(text, size=1000)) == text


def test_label_domain():
    lab = LabelDomain(LabelDomain.Config(num_classes=10, names=[f"c{i}" for i in range(10)]))
    seq = lab.encode([3, 0, 9])
    assert seq.ids.tolist() == [[3], [0], [9]] and seq.pos[:, 0].tolist() == [[0, 0, 0]] * 3
    assert lab.decode(seq) == [3, 0, 9]
    # special ids follow the vocabulary: END, NULL, MASK, BEGIN; heads predict the classes plus END
    s = lab.spec
    assert (s.end_id, s.null_id, s.mask_id, s.begin_id, s.table_size, s.head_size) == (10, 11, 12, 13, 14, 11)
    assert lab.from_prompt("7") == 7 and lab.from_prompt("c4") == 4
    assert lab.default_prompts(20) == ([c for c in range(10) for _ in range(2)], 10)
    with pytest.raises(SeqgenError, match="labels outside 0..9"):
        lab.encode([10])
    with pytest.raises(SeqgenError, match="class 12 outside 0..9"):
        lab.from_prompt("12")
    with pytest.raises(SeqgenError, match="not a class id"):
        lab.from_prompt("seven")


@pytest.mark.parametrize("adapter", [
    lambda: ImageDomain(ImageDomain.Config.tiny()),
    lambda: TextDomain(TextDomain.Config.tiny()),
    lambda: LabelDomain(LabelDomain.Config.tiny()),
])
def test_adapters_conform_and_round_trip_their_example_batch(adapter):
    a = adapter()
    assert isinstance(a, DomainAdapter)
    raw = a.example_batch(4, torch.Generator().manual_seed(0))
    assert isinstance(raw, list) and len(raw) == 4
    seq = a.encode(raw)
    assert seq.batch_size == 4 and (seq.modality == 0).all()  # the runtime assigns modality indices
    seq.validate([a.spec])
    back = a.decode(seq)
    assert isinstance(back, list) and len(back) == 4
    if isinstance(a, ImageDomain):
        np.testing.assert_allclose(np.stack(back), np.rint(np.stack(raw) * 4) / 4, atol=1e-6)
    elif isinstance(a, TextDomain):
        assert back == raw
    else:
        np.testing.assert_array_equal(back, raw)


def test_image_read_file_round_trips_a_png(tmp_path):
    from PIL import Image

    x = (np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
    Image.fromarray(x).save(tmp_path / "x.png")
    dom = ImageDomain(ImageDomain.Config(height=6, width=8, levels=256))
    got = dom.read_file(tmp_path / "x.png")
    np.testing.assert_allclose(got, x / 255.0, atol=1e-6)
    assert torch.equal(dom.encode([got]).ids[0], torch.from_numpy(x.astype(np.int64)).view(-1))


def test_png_grid(tmp_path):
    p = save_image_grid(np.random.rand(6, 8, 8), tmp_path / "g.png", nrow=2)
    from PIL import Image

    im = Image.open(p)
    assert im.size[0] > im.size[1] > 32
