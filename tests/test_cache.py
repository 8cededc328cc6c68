"""Cached decoding equals a full forward pass: after a prefill, single-token and multi-token appends,
for several mask kinds, and end to end through the AR paradigm in raster and random order."""
import pytest
import torch

from seqgen.config import RunConfig
from seqgen.masks import block_causal, causal, prefix, same_document, sliding_window
from seqgen.paradigms.ar import AutoRegressive
from seqgen.registry import BACKBONES
from seqgen.task import build_model
from seqgen.types import DomainSpec, SeqgenError, TokenSequence

TOL = 1e-4
L = 12


def backbone(**kw):
    torch.manual_seed(0)
    cfg = {"dim": 48, "layers": 3, "heads": 4, "kv_heads": 2, **kw}
    return BACKBONES.build("transformer", cfg).eval()


def rand_pos(B, L, g):
    return torch.randint(0, 9, (B, L, 3), generator=g)


CASES = {
    "causal": (lambda: causal(), [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]),
    "prefix": (lambda: prefix(4), [(0, 4), (4, 5), (5, 8), (8, 12)]),
    "block_causal": (lambda: block_causal(block_size=3), [(0, 6), (6, 9), (9, 12)]),
    "same_document": (lambda: same_document(torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])) & causal(),
                      [(0, 3), (3, 4), (4, 9), (9, 12)]),
    "sliding_window": (lambda: sliding_window(4) & causal(), [(0, 5), (5, 6), (6, 8), (8, 12)]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", ["ref", "sdpa"])
def test_backbone_cache_equals_full_forward(name, impl):
    make_mask, chunks = CASES[name]
    bb = backbone(attn_impl=impl)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, L, 48, generator=g)
    pos = rand_pos(2, L, g)
    with torch.no_grad():
        ref = bb(x, pos=pos, mask=make_mask())
        cache = bb.init_cache(2, L)
        outs = [bb(x[:, a:b], pos=pos[:, a:b], mask=make_mask(), cache=cache) for a, b in chunks]
    assert cache.length == L
    assert (torch.cat(outs, 1) - ref).abs().max() <= TOL


def test_flex_cached_inference_matches():
    bb = backbone(attn_impl="flex")
    g = torch.Generator().manual_seed(2)
    x, pos = torch.randn(2, L, 48, generator=g), rand_pos(2, L, g)
    with torch.no_grad():
        ref = bb(x, pos=pos, mask=causal(), attn_impl="sdpa")
        cache = bb.init_cache(2, L)
        out = torch.cat([bb(x[:, a:b], pos=pos[:, a:b], mask=causal(), cache=cache) for a, b in [(0, 7), (7, 8), (8, 12)]], 1)
    assert (out - ref).abs().max() <= TOL


def test_cache_truncate_rolls_back():
    bb = backbone()
    g = torch.Generator().manual_seed(3)
    x, pos = torch.randn(1, L, 48, generator=g), rand_pos(1, L, g)
    with torch.no_grad():
        cache = bb.init_cache(1, L)
        bb(x[:, :6], pos=pos[:, :6], mask=causal(), cache=cache)
        first = bb(x[:, 6:8], pos=pos[:, 6:8], mask=causal(), cache=cache)
        cache.truncate(6)  # reject the two tokens (speculative decoding), then append them again
        again = bb(x[:, 6:8], pos=pos[:, 6:8], mask=causal(), cache=cache)
    assert torch.equal(first, again)
    with pytest.raises(SeqgenError, match="KV cache full"):
        bb(x[:, :5], pos=pos[:, :5], mask=causal(), cache=cache)


def ar_model(order):
    cfg = RunConfig.from_dict({"name": "t", "condition": "class", "data": {"name": "digits"},
                               "domain": {"name": "image"}, "backbone": {"name": "transformer", "dim": 48,
                                                                         "layers": 3, "heads": 4, "kv_heads": 2},
                               "paradigm": {"name": "ar", "order": order}})
    specs = [DomainSpec("image", vocab_size=17, pos_axes=2), DomainSpec("label", vocab_size=10)]
    paradigm = AutoRegressive(AutoRegressive.Config(order=order, anneal_start=1.0, anneal_end=1.0))
    torch.manual_seed(0)
    model = build_model(cfg, specs, paradigm, 16).eval()
    for p in model.parameters():  # untrained weights are near-uniform; make logits vary a lot
        p.data.mul_(3)
    return model, paradigm


@pytest.mark.parametrize("order", ["raster", "random"])
def test_ar_cached_decoding_equals_full_forward(order):
    model, paradigm = ar_model(order)
    g = torch.Generator().manual_seed(4)
    B = 3
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    pos = torch.stack([torch.zeros(64, dtype=torch.long), r.reshape(-1), c.reshape(-1)], 1).expand(B, 64, 3)
    data = TokenSequence.from_ids(torch.randint(0, 17, (B, 64), generator=g), pos=pos.clone())
    label = TokenSequence.from_ids(torch.tensor([[1], [5], [9]]), modality=1)
    batch = paradigm.prepare(data, label, generator=g, progress=0.0)
    if order == "random":
        assert not torch.equal(batch.targets[:, :-1], data.ids[:, :-1])  # really permuted
        assert batch.target_pos is not None
    head = model.heads["image"]
    with torch.no_grad():
        full = head.logits(model(batch.inputs, mask=batch.mask, target_pos=batch.target_pos))
        cache = model.init_cache(B, batch.inputs.length)
        pieces = []
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 20), (20, 21), (21, 64)]:
            tp = None if batch.target_pos is None else batch.target_pos[:, a:b]
            h = model(batch.inputs.slice(a, b), mask=batch.mask, cache=cache, target_pos=tp)
            pieces.append(head.logits(h))
    diff = (torch.cat(pieces, 1) - full).abs().max()
    assert full.std() > 0.5 and diff <= TOL, diff


def test_generate_matches_teacher_forcing_at_temperature_zero():
    """Greedy generation through the cache picks, at every step, the argmax of a full forward pass."""
    model, paradigm = ar_model("raster")
    from seqgen.domains.image import ImageDomain

    dom = ImageDomain(ImageDomain.Config())
    label = TokenSequence.from_ids(torch.tensor([[2], [7]]), modality=1)
    out = paradigm.generate(model, label, dom.layout(2), temperature=0.0)
    batch = paradigm.prepare(out, label)
    with torch.no_grad():
        logits = model.heads["image"].logits(model(batch.inputs, mask=batch.mask))
    assert torch.equal(logits.argmax(-1), batch.targets)


def test_random_order_generation_follows_its_permutation():
    """Greedy random-order sampling: replaying the same permutation with teacher forcing gives the same tokens."""
    from seqgen.domains.image import ImageDomain
    from seqgen.paradigms.ar import random_orders

    model, paradigm = ar_model("random")
    dom = ImageDomain(ImageDomain.Config())
    label = TokenSequence.from_ids(torch.tensor([[4], [8]]), modality=1)
    out = paradigm.generate(model, label, dom.layout(2), temperature=0.0, order="random",
                            generator=torch.Generator().manual_seed(11))
    perm = random_orders(2, 64, torch.Generator().manual_seed(11))  # the first draw generate makes
    assert not torch.equal(perm[0], torch.arange(64))
    placed = TokenSequence.cat(label, out)
    full = placed.gather(torch.cat([torch.zeros(2, 1, dtype=torch.long), perm + 1], 1))  # label, then the order
    with torch.no_grad():
        h = model(full.slice(0, -1), mask=paradigm.prepare(out, label).mask, target_pos=full.pos[:, 1:])
        logits = model.heads["image"].logits(h)
    assert torch.equal(logits.argmax(-1), full.ids[:, 1:])
    raster = paradigm.generate(model, label, dom.layout(2), temperature=0.0, order="raster")
    assert not torch.equal(raster.ids, out.ids)  # the order matters to the model


def test_embedding_dropout_acts_only_in_training():
    cls = BACKBONES.get("transformer")
    torch.manual_seed(0)
    drop = cls(cls.Config(dim=32, layers=2, heads=4, emb_dropout=0.5))
    plain = cls(cls.Config(dim=32, layers=2, heads=4))
    plain.load_state_dict(drop.state_dict())
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6).view(1, 6, 1).expand(2, 6, 3)
    drop.eval(), plain.eval()
    assert torch.equal(drop(x, pos=pos, mask=causal()), plain(x, pos=pos, mask=causal()))
    drop.train(), plain.train()
    torch.manual_seed(1)
    a = drop(x, pos=pos, mask=causal())
    torch.manual_seed(2)
    b = drop(x, pos=pos, mask=causal())
    assert not torch.allclose(a, b)  # a different input mask each step
    assert torch.equal(plain(x, pos=pos, mask=causal()), plain(x, pos=pos, mask=causal()))
