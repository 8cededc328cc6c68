"""Cached decoding equals a full forward pass: after a prefill, single-token and multi-token appends,
for several mask kinds, and end to end through the AR paradigm and the generation scheduler in raster
and random order.  (Mixed multi-domain sequences: tests/test_segments.py.)"""
import pytest
import torch

from seqgen.examples import Piece, flatten
from seqgen.generate import Target, build_plan, outputs, prefill
from seqgen.masks import block_causal, causal, prefix, same_document, sliding_window
from seqgen.model import SeqModel
from seqgen.paradigms.ar import AutoRegressive
from seqgen.registry import BACKBONES, HEADS
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
    """A [label | image] model with random weights scaled up, so that logits vary a lot."""
    specs = [DomainSpec("label", vocab_size=10), DomainSpec("image", vocab_size=17, pos_axes=2)]
    paradigm = AutoRegressive(AutoRegressive.Config(order=order, anneal_start=1.0, anneal_end=1.0, cond_dropout=0.0))
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": 48, "layers": 3, "heads": 4, "kv_heads": 2})
    model = SeqModel(specs, bb, {"image": HEADS.build("categorical", {}, 48, specs[1])},
                     target_pos=paradigm.needs_target_pos, max_target_pos=16).eval()
    for p in model.parameters():  # untrained weights are near-uniform; make logits vary a lot
        p.data.mul_(3)
    return model, paradigm, specs


def image_pos():
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    return torch.stack([torch.zeros(64, dtype=torch.long), r.reshape(-1), c.reshape(-1)], 1)


def label_piece(y):
    return Piece(0, torch.tensor([y]), torch.zeros(1, 3, dtype=torch.long), torch.ones(1), role="cond")


def image_piece(ids):
    return Piece(1, ids, image_pos(), torch.ones(64), role="target")


@pytest.mark.parametrize("order", ["raster", "random"])
def test_ar_cached_decoding_equals_full_forward(order):
    model, paradigm, specs = ar_model(order)
    g = torch.Generator().manual_seed(4)
    B = 3
    data = torch.randint(0, 17, (B, 64), generator=g)
    exs = [[label_piece(y), image_piece(data[i])] for i, y in enumerate([1, 5, 9])]
    batch = paradigm.prepare(exs, specs=specs, generator=g, progress=0.0)
    if order == "random":
        assert not torch.equal(batch.targets[:, 3:66], data[:, :63])  # really permuted
        assert batch.target_pos is not None
    else:
        assert torch.equal(batch.targets[:, 3:67], data)
    head = model.heads["image"]
    L = batch.inputs.length
    with torch.no_grad():
        full = head.logits(model(batch.inputs, mask=batch.mask, target_pos=batch.target_pos))
        cache = model.init_cache(B, L)
        pieces = []
        for a, b in [(0, 10), (10, 11), (11, 12), (12, 20), (20, 21), (21, L)]:
            tp = None if batch.target_pos is None else batch.target_pos[:, a:b]
            h = model(batch.inputs.slice(a, b), mask=batch.mask, cache=cache, target_pos=tp)
            pieces.append(head.logits(h))
    diff = (torch.cat(pieces, 1) - full).abs().max()
    assert full.std() > 0.5 and diff <= TOL, diff


def generate(model, paradigm, specs, labels, **kw):
    order = kw.pop("order", "raster")
    generator = kw.pop("generator", None)
    targets = [[Target(1, image_pos())] for _ in labels]
    orders = paradigm.generation_orders(targets, order, generator)
    plan = build_plan([[label_piece(y)] for y in labels], targets, specs, orders=orders)
    cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
    paradigm.fill(model, plan, cache, h, specs=specs, generator=generator, temperature=0.0, **kw)
    return plan, orders, torch.cat([outputs(plan, b, 0).ids for b in range(len(labels))])


def test_generate_matches_teacher_forcing_at_temperature_zero():
    """Greedy generation through the cache picks, at every step, the argmax of a full forward pass."""
    model, paradigm, specs = ar_model("raster")
    plan, _, out = generate(model, paradigm, specs, [2, 7])
    assert plan.filled[:, :64].all() and int(out.max()) < 17
    batch = paradigm.prepare([[label_piece(y), image_piece(out[i])] for i, y in enumerate([2, 7])], specs=specs,
                             train=False)
    with torch.no_grad():
        logits = model.heads["image"].logits(model(batch.inputs, mask=batch.mask))
    sel = batch.loss_mask
    assert int(sel.sum()) == 128
    assert torch.equal(logits[..., :17].argmax(-1)[sel], batch.targets[sel])  # END is not allowed in an image
    assert not torch.equal(out[0], out[1])  # the label matters


def test_random_order_generation_follows_its_permutation():
    """Greedy random-order sampling: replaying the same permutation with teacher forcing gives the same tokens."""
    model, paradigm, specs = ar_model("random")
    plan, orders, out = generate(model, paradigm, specs, [4, 8], order="random",
                                 generator=torch.Generator().manual_seed(11))
    perm = [orders[b][0] for b in range(2)]
    assert not torch.equal(perm[0], torch.arange(64)) and not torch.equal(perm[0], perm[1])
    for b, y in enumerate([4, 8]):
        f = flatten([label_piece(y), image_piece(out[b])], specs, order=[None, perm[b]])
        assert torch.equal(f.ids[4:68], out[b][perm[b]])  # tokens in the generation order ...
        seq = TokenSequence(ids=f.ids[None, :-1], values=None, pos=f.pos[None, :-1], modality=f.modality[None, :-1],
                            valid=torch.ones(1, f.length - 1, dtype=torch.bool))
        with torch.no_grad():  # ... each predicted knowing where it goes (its true coordinates)
            h = model(seq, mask=causal(), target_pos=f.pos[None, 1:])
            logits = model.heads["image"].logits(h)[0, 3:67, :17]
        assert torch.equal(logits.argmax(-1), f.ids[4:68])
    _, _, raster = generate(model, paradigm, specs, [4, 8], order="raster")
    assert not torch.equal(raster, out)  # the order matters to the model
    with pytest.raises(SeqgenError, match="unknown sampling order"):
        paradigm.generation_orders(plan.targets, "spiral")


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
