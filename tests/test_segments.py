"""Examples as lists of segments: flattening with begin / end ids, packing, the null condition, captions
that end themselves, the scheduler over rows in different segments (cached == full forward), and
discrete and continuous targets in one sequence."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from seqgen.config import RunConfig
from seqgen.domains.image import ImageDomain
from seqgen.domains.label import LabelDomain
from seqgen.domains.text import TextDomain
from seqgen.examples import Piece, flatten, null_piece, pack_rows, encode_pieces
from seqgen.generate import DATA, Target, build_plan, outputs, prefill
from seqgen.masks import causal, within
from seqgen.model import SeqModel
from seqgen.paradigms.ar import AutoRegressive
from seqgen.registry import BACKBONES, HEADS, register_dataset, register_head
from seqgen.task import GenerativeTask
from seqgen.types import DomainSpec, SeqgenError, TokenSequence, line_positions

TEXT, IMAGE, LABEL = 0, 1, 2
MAXLEN = 8


def domains(max_length=MAXLEN):
    txt = TextDomain(TextDomain.Config(max_length=max_length))
    img = ImageDomain(ImageDomain.Config(height=2, width=3, levels=5))
    lab = LabelDomain(LabelDomain.Config(num_classes=10))
    return txt, img, lab, [txt.spec, img.spec, lab.spec]


def piece(adapter, modality, item, role):
    return encode_pieces(adapter, [item], modality, role)[0]


def rand_image(g):
    return torch.randint(0, 5, (2, 3), generator=g).float().numpy() / 4


def two_domain_model(specs, scale=3.0, end_bias=None, dim=32):
    """Random text + image model (heads for both), weights scaled so that logits vary a lot."""
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": dim, "layers": 2, "heads": 4, "kv_heads": 2})
    heads = {"text": HEADS.build("categorical", {"bias": end_bias is not None}, dim, specs[TEXT]),
             "image": HEADS.build("categorical", {}, dim, specs[IMAGE])}
    model = SeqModel(specs, bb, heads)
    for p in model.parameters():
        p.data.mul_(scale)
    if end_bias is not None:
        model.heads["text"].proj.bias.data.zero_()
        model.heads["text"].proj.bias.data[specs[TEXT].end_id] = end_bias
    return model.eval()


def as_seq(f) -> TokenSequence:
    return TokenSequence(ids=f.ids[None], values=None if f.values is None else f.values[None], pos=f.pos[None],
                         modality=f.modality[None], valid=torch.ones(1, f.length, dtype=torch.bool))


# ------------------------------------------------------------------------------ a. flatten
def flatten_reference(pieces, specs, order=None):
    """flatten written token by token: the specification the vectorized one must equal."""
    cols = {k: [] for k in ("ids", "pos", "modality", "target", "units", "piece", "cond", "values")}
    C = next((p.values.shape[-1] for p in pieces if p.values is not None), None)
    offset = 0
    for j, p in enumerate(pieces):
        idx = order[j] if order is not None and order[j] is not None else torch.arange(p.length)
        toks = [(int(p.ids[i]), [int(v) for v in p.pos[i]], float(p.units[i]),
                 None if p.values is None else p.values[i].tolist()) for i in idx.tolist()]
        if p.open:
            rows = [(t, [c + offset for c in q], p.role == "target", u, v) for t, q, u, v in toks]
            offset = max(max(r[1]) for r in rows) + 1 if rows else offset
        else:
            body = [(t, [c + offset + 1 for c in q], p.role == "target", u, v) for t, q, u, v in toks]
            top = max(max(r[1]) for r in body) if body else offset
            rows = ([(specs[p.modality].begin_id, [offset] * 3, False, 0.0, None)] + body
                    + [(specs[p.modality].end_id, [top + 1] * 3, p.role == "target" and p.variable, 0.0, None)])
            offset = top + 2
        for t, q, tgt, u, v in rows:
            for k, x in zip(cols, (t, q, p.modality, tgt, u, j, p.role == "cond", v if v is not None else [0.0] * (C or 0))):
                cols[k].append(x)
    return {"ids": torch.tensor(cols["ids"]), "pos": torch.tensor(cols["pos"]), "modality": torch.tensor(cols["modality"]),
            "target": torch.tensor(cols["target"]), "units": torch.tensor(cols["units"]),
            "piece": torch.tensor(cols["piece"]), "cond": torch.tensor(cols["cond"]),
            "values": torch.tensor(cols["values"]) if C else None}


def test_flatten_equals_the_token_by_token_reference():
    """Random examples (condition / target / open / variable / continuous pieces, permuted orders, empty
    pieces) flatten exactly as the token-by-token specification does"""
    g = torch.Generator().manual_seed(0)
    specs = [DomainSpec("a", vocab_size=7, pos_axes=2), DomainSpec("b", vocab_size=5), DomainSpec("c", vocab_size=None,
                                                                                                  value_dim=2)]
    for trial in range(60):
        pieces, order = [], []
        for j in range(int(torch.randint(1, 4, (1,), generator=g))):
            m = int(torch.randint(0, 3, (1,), generator=g))
            n = int(torch.randint(0 if trial % 5 else 1, 6, (1,), generator=g))
            ids = torch.randint(0, specs[m].vocab_size or 1, (n,), generator=g) if m < 2 else torch.full((n,), -1)
            pos = torch.randint(0, 4, (n, 3), generator=g)
            values = torch.randn(n, 2, generator=g) if m == 2 else None
            role = "cond" if bool(torch.rand(1, generator=g) < 0.4) else "target"
            opened = bool(torch.rand(1, generator=g) < 0.2)
            pieces.append(Piece(m, ids, pos, torch.rand(n, generator=g), role=role, values=values, open=opened,
                                variable=role == "target" and bool(torch.rand(1, generator=g) < 0.5)))
            order.append(torch.randperm(n, generator=g) if bool(torch.rand(1, generator=g) < 0.3) else None)
        f = flatten(pieces, specs, order)
        ref = flatten_reference(pieces, specs, order)
        for k, want in ref.items():
            got = getattr(f, k)
            if want is None:
                assert got is None, k
            else:
                assert got.dtype == (torch.float32 if k in ("units", "values") else want.dtype), (k, got.dtype)
                assert torch.equal(got, want.to(got.dtype).reshape(got.shape)), (trial, k, got, want)


def test_flatten_wraps_each_segment_in_begin_and_end():
    txt, img, lab, specs = domains()
    g = torch.Generator().manual_seed(0)
    im = rand_image(g)
    pix = img.encode([im])
    f = flatten([piece(lab, LABEL, 7, "cond"), piece(img, IMAGE, im, "target")], specs)
    L, I = lab.spec, img.spec
    assert f.ids.tolist() == [L.begin_id, 7, L.end_id, I.begin_id] + pix.ids[0].tolist() + [I.end_id]
    assert f.modality.tolist() == [LABEL] * 3 + [IMAGE] * 8
    assert f.piece.tolist() == [0] * 3 + [1] * 8
    # coordinates: [BEGIN_l 0 | y 1 | END_l 2], the image's BEGIN at 3 and its pixels past it on every axis
    assert f.pos[:3].tolist() == [[0] * 3, [1] * 3, [2] * 3]
    assert f.pos[3].tolist() == [3] * 3 and torch.equal(f.pos[4:10], pix.pos[0] + 4)
    assert int(f.pos[3:].min()) > int(f.pos[:3].max())
    assert f.pos[10].tolist() == [int(f.pos[4:10].max()) + 1] * 3
    # BEGIN never a target; the END of a fixed-length target is not a target either
    assert f.target.tolist() == [False] * 4 + [True] * 6 + [False]
    assert f.units.tolist() == [0, 1, 0, 0] + [1] * 6 + [0]

    # a variable-length (text) target: its END is a target, its BEGIN is not; a text condition's END is not
    f = flatten([piece(txt, TEXT, "hi", "cond"), piece(img, IMAGE, im, "cond"), piece(txt, TEXT, "hey", "target")],
                specs)
    T = txt.spec
    assert f.ids.tolist() == [T.begin_id, 104, 105, T.end_id, I.begin_id] + pix.ids[0].tolist() + [
        I.end_id, T.begin_id, 104, 101, 121, T.end_id]
    assert f.target.tolist() == [False] * 4 + [False] * 8 + [False, True, True, True, True]
    assert f.pos[-5:, 0].tolist() == [int(f.pos[:12].max()) + 1 + i for i in range(5)]

    # open pieces (stream windows) have no begin / end ids
    win = Piece(TEXT, torch.tensor([5, 6, 7]), line_positions(3)[0], torch.ones(3), open=True)
    f = flatten([piece(lab, LABEL, 2, "cond"), win], specs)
    assert f.ids.tolist() == [L.begin_id, 2, L.end_id, 5, 6, 7]
    assert f.pos[3:, 0].tolist() == [3, 4, 5] and f.target.tolist() == [False] * 3 + [True] * 3

    # prepare: BEGIN ids never scored, even when they are the next token
    b = AutoRegressive().prepare([[piece(txt, TEXT, "hi", "cond"), piece(txt, TEXT, "ab", "target"),
                                   piece(img, IMAGE, im, "target")]], specs=specs, train=False)
    begins = (b.targets == T.begin_id) & (b.target_modality == TEXT) | (b.targets == I.begin_id) & (
        b.target_modality == IMAGE)
    assert begins.sum() == 2 and not (b.loss_mask & begins).any()
    assert int(b.loss_mask.sum()) == 2 + 1 + 6  # "ab", its END, the pixels


# ------------------------------------------------------------------------------ b. packing
def mixed_examples(g):
    txt, img, lab, specs = domains()
    caps = ["a", "hello", "hi there", "xyz", "a longer caption here", "ok"]
    exs = []
    for i, c in enumerate(caps):
        im = rand_image(g)
        if i % 2 == 0:
            exs.append([piece(txt, TEXT, c, "cond"), piece(img, IMAGE, im, "target")])
        else:
            exs.append([piece(img, IMAGE, im, "cond"), piece(txt, TEXT, c, "target")])
    exs.append([piece(txt, TEXT, "solo", "target")])
    return exs, specs


def token_nll(model, specs, batch, mask=None):
    with torch.no_grad():
        h = model(batch.inputs, mask=batch.mask if mask is None else mask)
    nll = torch.zeros(batch.targets.shape)
    for k, s in enumerate(specs):
        sel = batch.loss_mask & (batch.target_modality == k)
        if s.name in model.heads and bool(sel.any()):
            nll[sel] = model.heads[s.name].nll(h[sel], batch.targets[sel])
    return nll


def test_packed_equals_unpacked():
    g = torch.Generator().manual_seed(0)
    exs, specs = mixed_examples(g)
    model = two_domain_model(specs)
    p = AutoRegressive()
    padded = p.prepare(exs, specs=specs, train=False)
    per_padded = token_nll(model, specs, padded).sum(1)
    N = 40
    packed = p.prepare(exs, specs=specs, train=False, pack=N)
    lengths = [int(padded.inputs.valid[i].sum()) for i in range(len(exs))]
    rows = pack_rows(lengths, N)
    assert packed.inputs.ids.shape == (len(rows), N) and len(rows) < len(exs)
    assert max(len(r) for r in rows) >= 2  # some row holds several examples

    def per_example(nll):
        out = torch.zeros(len(exs))
        for r, row in enumerate(rows):
            for d, i in enumerate(row):
                sel = packed.doc[r] == d
                assert int(sel.sum()) == lengths[i]
                assert int(packed.inputs.pos[r][sel].min()) == 0  # coordinates restart per example
                out[i] = nll[r][sel].sum()
        return out

    per_packed = per_example(token_nll(model, specs, packed))
    assert (per_padded > 1).all()
    torch.testing.assert_close(per_packed, per_padded, rtol=1e-5, atol=1e-5)
    lp, mp = model.loss(packed)
    lu, mu = model.loss(padded)
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-5)
    assert int(mp["text/count"]) == int(mu["text/count"]) and int(mp["image/count"]) == int(mu["image/count"])
    # without the same_document mask, later examples of a row read the earlier ones: their loss changes
    leaky = per_example(token_nll(model, specs, packed, mask=causal()))
    later = torch.tensor([i in row[1:] for row in rows for i in range(len(exs))]).view(len(rows), -1).any(0)
    assert (leaky - per_padded).abs()[later].min() > 1e-3
    torch.testing.assert_close(leaky[~later], per_padded[~later], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ c. the null condition
def test_null_condition_does_not_show_the_caption_length():
    txt, img, lab, specs = domains()
    g = torch.Generator().manual_seed(0)
    im = rand_image(g)
    caps = ["a", "a much longer caption than that"]
    exs = [[piece(txt, TEXT, c, "cond"), piece(img, IMAGE, im, "target")] for c in caps]
    p = AutoRegressive(AutoRegressive.Config(cond_dropout=0.5))
    real = p.prepare(exs, specs=specs, train=False)
    assert not torch.equal(real.inputs.ids[0], real.inputs.ids[1])
    b = p.prepare(exs, specs=specs, null=True)
    assert b.null_cond.all()
    T = txt.spec
    for name in ("ids", "pos", "modality", "valid"):
        assert torch.equal(getattr(b.inputs, name)[0], getattr(b.inputs, name)[1]), name
    assert torch.equal(b.targets[0], b.targets[1]) and torch.equal(b.loss_mask[0], b.loss_mask[1])
    assert b.inputs.ids[0, :4].tolist() == [T.begin_id, T.null_id, T.end_id, img.spec.begin_id]
    n = int(b.inputs.valid[0].sum())
    assert n == 3 + 1 + 6  # one NULL token in its begin / end, then the image (shifted by one)
    # condition dropout in training gives exactly the same null rows
    many = [exs[i % 2] for i in range(40)]
    d = p.prepare(many, specs=specs, generator=torch.Generator().manual_seed(1))
    assert 0 < int(d.null_cond.sum()) < 40
    for r in d.null_cond.nonzero().squeeze(1).tolist():
        assert torch.equal(d.inputs.ids[r, :n], b.inputs.ids[0, :n]) and not d.inputs.valid[r, n:].any()
        assert torch.equal(d.inputs.pos[r, :n], b.inputs.pos[0, :n])
    # generation: the null rows of a guided plan are one row whatever the caption was
    conds = [[e[0]] for e in exs]
    plan = build_plan(conds, [[Target(IMAGE, img.layout(1).pos[0])] for _ in exs], specs, guided=True)
    for name in ("ids", "pos", "modality", "valid"):
        assert torch.equal(getattr(plan.prompt, name)[2], getattr(plan.prompt, name)[3]), name
    assert torch.equal(plan.slot_pos[2], plan.slot_pos[3]) and not torch.equal(plan.slot_pos[0], plan.slot_pos[1])
    model = two_domain_model(specs)
    with torch.no_grad():
        h = model(plan.prompt, mask=causal())
    torch.testing.assert_close(h[2, -1], h[3, -1])
    assert (h[0, -1] - h[1, -1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------ d. captions end themselves
CAPTIONS = {0: "ab", 1: "abcde"}


@register_dataset("test_segments_captions")
class CaptionSource:
    """Labels 0 / 1 with a fixed caption each."""

    @dataclass
    class Config:
        n: int = 32

    def __init__(self, config=None):
        self.config = config or self.Config()

    def records(self, split: str) -> dict:
        y = np.arange(self.config.n if split == "train" else 8) % 2
        return {"label": y.astype(np.int64), "caption": [CAPTIONS[int(i)] for i in y]}


def caption_task(max_length=12):
    cfg = RunConfig.from_dict({
        "name": "captions", "seed": 0,
        "domains": {"label": {"adapter": "label", "num_classes": 2},
                    "caption": {"adapter": "text", "max_length": max_length}},
        "mixture": [{"name": "label_to_caption", "source": "test_segments_captions", "cond": ["label"],
                     "target": ["caption"]}],
        "backbone": {"name": "transformer", "dim": 32, "layers": 2, "heads": 4},
        "paradigm": {"name": "ar", "cond_dropout": 0.0},
        "train": {"batch_size": 16, "accelerator": "cpu", "precision": "32-true"},
    })
    return GenerativeTask(cfg)


def test_caption_stops_at_its_end_id():
    task = caption_task()
    model = task.model
    conds = [{"label": y} for y in (0, 1, 1, 0)]
    cap = task.modality["caption"]
    spec = task.specs[cap]
    rows = [task._pieces("label", [c["label"] for c in conds], "cond")[i:i + 1] for i in range(4)]
    lay = task.adapters["caption"].layout(1, 12).pos[0]

    def run(variable):
        model.eval()
        plan = build_plan(rows, [[Target(cap, lay, variable=variable)] for _ in rows], task.specs)
        cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
        task.paradigm.fill(model, plan, cache, h, specs=task.specs, temperature=0.0)
        return plan

    assert outputs(run(True), 0, 0).valid.all()  # untrained: the caption runs to its limit
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = task.train_sampler(16, seed=0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        loss, _ = model.loss(task.make_batch(sampler.next(), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    for temperature in (0.0, 0.5):  # greedy, and sampled (a trained, confident model)
        out = task.generate(entry="label_to_caption", conds=conds, temperature=temperature,
                            generator=torch.Generator().manual_seed(3))
        assert [r["caption"] for r in out] == [CAPTIONS[c["label"]] for c in conds]
        assert all(len(r["caption"].encode()) < 12 for r in out)  # shorter than max_length: END stopped them

    # the scheduler itself: valid ends at END, which sits in the slot right after the last token
    plan = run(True)
    for b, c in enumerate(conds):
        k = len(CAPTIONS[c["label"]])
        o = outputs(plan, b, 0)
        assert o.valid[0].tolist() == [True] * k + [False] * (12 - k)
        assert bytes(o.ids[0, :k].tolist()).decode() == CAPTIONS[c["label"]]
        assert int(plan.out_ids[b, k]) == spec.end_id and int(plan.slot_kind[b, k]) == DATA
    # with END not allowed (a fixed-length target) the scheduler runs to the length limit
    plan = run(False)
    for b, c in enumerate(conds):
        o = outputs(plan, b, 0)
        assert o.valid.all() and o.length == 12 and not (o.ids == spec.end_id).any()
        assert bytes(o.ids[0, :len(CAPTIONS[c["label"]])].tolist()).decode() == CAPTIONS[c["label"]]


# ------------------------------------------------------------------------------ e. mixed rows, cached == full
def mixed_rows(specs, txt, img):
    g = torch.Generator().manual_seed(0)
    conds = [[piece(txt, TEXT, "hi", "cond")],
             [piece(img, IMAGE, rand_image(g), "cond")],
             [piece(txt, TEXT, "hello there", "cond")],
             [piece(img, IMAGE, rand_image(g), "cond"), piece(txt, TEXT, "abc", "cond")]]

    def T():
        return Target(TEXT, txt.layout(1, MAXLEN).pos[0], variable=True)

    def I():
        return Target(IMAGE, img.layout(1).pos[0])
    targets = [[I()], [T()], [T(), I()], [T(), I()]]
    return conds, targets


def generated_pieces(plan, b, targets):
    out = []
    for j, t in enumerate(targets[b]):
        o = outputs(plan, b, j)
        v = o.valid[0]
        out.append(Piece(t.modality, o.ids[0][v], o.pos[0][v], torch.ones(int(v.sum())), role="target",
                         variable=t.variable))
    return out


def full_mask(f, cond_attention):
    """The training pattern written out: causal, or causal | bidirectional inside each condition piece."""
    return causal() | within(f.group[None]) if cond_attention == "bidirectional" else causal()


@pytest.mark.parametrize("cond_attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_rows_in_different_segments_cached_equals_full_forward(cfg_scale, cond_attention):
    txt, img, lab, specs = domains()
    conds, targets = mixed_rows(specs, txt, img)
    para = AutoRegressive(AutoRegressive.Config(cond_attention=cond_attention))
    # a bias on the text head's END output makes greedy captions end, at different steps per row
    for end_bias in (2.0, 3.0, 1.0, 4.0):
        model = two_domain_model(specs, end_bias=end_bias)
        plan = build_plan(conds, targets, specs, guided=cfg_scale != 1.0)
        assert plan.prompt.valid[:, 0].sum() < len(plan.prompt.valid)  # prompts of different lengths: left padding
        cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu",
                           para.prompt_mask(plan))
        para.fill(model, plan, cache, h, specs=specs, temperature=0.0, cfg_scale=cfg_scale)
        text_lengths = [int(outputs(plan, b, 0).valid.sum()) for b in (1, 2, 3)]
        if len(set(text_lengths)) > 1 and min(text_lengths) < MAXLEN:
            break  # captions end at different steps
    else:
        pytest.fail(f"no END bias made the captions end at different steps: {text_lengths}")
    checked = 0
    for b in range(len(conds)):
        gen = generated_pieces(plan, b, targets)
        f = flatten(conds[b] + gen, specs)
        with torch.no_grad():
            hc = model(as_seq(f), mask=full_mask(f, cond_attention))[0]
            if cfg_scale != 1.0:
                fu = flatten([null_piece(p.modality, specs[p.modality]) for p in conds[b]] + gen, specs)
                hu = model(as_seq(fu), mask=full_mask(fu, cond_attention))[0]
                shift = fu.length - f.length  # the null prompt has its own length
        for t in f.target.nonzero().squeeze(1).tolist():
            j = int(f.piece[t]) - len(conds[b])
            tg, spec = targets[b][j], specs[targets[b][j].modality]
            if int(f.ids[t]) == spec.end_id and len(gen[j].ids) == len(tg.pos):
                continue  # END forced at the length limit, not sampled
            head = model.head_for(tg.modality)
            with torch.no_grad():
                logits = head.logits(hc[t - 1])
                if cfg_scale != 1.0:
                    u = head.logits(hu[t - 1 + shift])
                    logits = u + cfg_scale * (logits - u)
            if not tg.variable:
                logits[spec.end_id] = float("-inf")  # END is allowed only where a segment may end
            assert int(logits.argmax()) == int(f.ids[t]), (b, t)
            checked += 1
    assert checked >= 20
    # variable-length targets that stopped early hold END at the slot after their last token
    for b in (1, 2, 3):
        n = text_lengths[b - 1]
        if n < MAXLEN:
            assert int(plan.out_ids[b, n]) == specs[TEXT].end_id and not plan.filled[b, n]
    # the same greedy samples whatever the batch: row 2 alone gives what it gave next to the others
    solo = build_plan(conds[2:3], targets[2:3], specs, guided=cfg_scale != 1.0)
    cache, h = prefill(model, solo, solo.prompt.length + int(solo.n_slots.max()) + 1, "cpu", para.prompt_mask(solo))
    para.fill(model, solo, cache, h, specs=specs, temperature=0.0, cfg_scale=cfg_scale)
    for j in range(2):
        a, b_ = outputs(plan, 2, j), outputs(solo, 0, j)
        assert torch.equal(a.valid, b_.valid) and torch.equal(a.ids[a.valid], b_.ids[b_.valid])


def test_bidirectional_conditions_see_each_other_and_nothing_later():
    """cond_attention=bidirectional: changing input token s changes the output at t exactly when t >= s
    or s and t lie in the same condition piece; target tokens never see a later token, so the loss
    (whose predictions come from outputs before each target) sees no future."""
    txt, img, lab, specs = domains()
    g = torch.Generator().manual_seed(1)
    ex = [piece(img, IMAGE, rand_image(g), "cond"), piece(txt, TEXT, "hey", "cond"),
          piece(img, IMAGE, rand_image(g), "target")]
    model = two_domain_model(specs)
    for mode in ("causal", "bidirectional"):
        para = AutoRegressive(AutoRegressive.Config(cond_attention=mode, cond_dropout=0.0))
        batch = para.prepare([ex], specs=specs, train=False)
        f = flatten(ex, specs)
        grp = f.group[:-1]
        assert (grp >= 0).sum() == 2 + 6 + 2 + 3  # both conditions with their begin / end ids
        with torch.no_grad():
            h0 = model(batch.inputs, mask=batch.mask)[0]
        L = batch.inputs.length
        seen = torch.zeros(L, L, dtype=torch.bool)  # seen[t, s]: output t moved when input s changed
        for s_ in range(L):
            ids = batch.inputs.ids.clone()
            ids[0, s_] = (ids[0, s_] + 1) % specs[int(batch.inputs.modality[0, s_])].vocab_size
            seq = TokenSequence(ids=ids, values=None, pos=batch.inputs.pos, modality=batch.inputs.modality,
                                valid=batch.inputs.valid)
            with torch.no_grad():
                h1 = model(seq, mask=batch.mask)[0]
            seen[:, s_] = (h1 - h0).abs().amax(-1) > 1e-6
        t, s_ = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
        expect = t >= s_
        if mode == "bidirectional":
            expect = expect | ((grp[t] == grp[s_]) & (grp[t] >= 0))
        assert torch.equal(seen, expect), mode
        # no prediction that counts in the loss comes from an output that saw its own target or later
        for q in batch.loss_mask[0].nonzero().squeeze(1).tolist():
            assert not seen[q, q + 1:].any()


# ------------------------------------------------------------------------------ f. continuous targets
class LinearGaussianHead(nn.Module):
    """Unit-variance Gaussian with a mean linear in h: NLL = |v - W h|^2 / 2 + C/2 log(2 pi).
    Registered only while a test uses it (``gaussian_head``): other tests walk every registered head
    over a discrete domain."""

    @dataclass
    class Config:
        @classmethod
        def tiny(cls) -> "LinearGaussianHead.Config":
            return cls()

    def __init__(self, config, dim: int, spec: DomainSpec):
        super().__init__()
        if spec.value_dim is None:
            raise SeqgenError("test_linear_gaussian needs a continuous domain")
        self.spec = spec
        self.proj = nn.Linear(dim, spec.value_dim)
        self.seen: list = []  # targets of every loss call (routing checks)

    def nll(self, h, values):
        return 0.5 * (values.float() - self.proj(h)).pow(2).sum(-1) + 0.5 * values.shape[-1] * math.log(2 * math.pi)

    def loss(self, h, targets, loss_mask=None):
        if loss_mask is not None:
            h, targets = h[loss_mask], targets[loss_mask]
        self.seen.append(targets.detach())
        n = self.nll(h, targets)
        loss = n.mean() if n.numel() else h.sum() * 0
        return loss, {"nll_sum": n.detach().sum(), "count": torch.tensor(n.numel())}

    def sample(self, h, *, generator=None, temperature=1.0, h_uncond=None, cfg_scale=1.0, **_):
        mu = self.proj(h)
        if h_uncond is not None and cfg_scale != 1.0:
            u = self.proj(h_uncond)
            mu = u + cfg_scale * (mu - u)
        if temperature == 0:
            return mu
        noise = torch.randn(mu.shape, generator=generator, device=generator.device if generator else None)
        return mu + temperature * noise.to(mu.device)


@pytest.fixture
def gaussian_head(monkeypatch):
    monkeypatch.setattr(HEADS, "_classes", dict(HEADS._classes))  # the registration is undone afterwards
    register_head("test_linear_gaussian")(LinearGaussianHead)
    assert HEADS.get("test_linear_gaussian") is LinearGaussianHead


VALUE = 1
TARGET_VALUES = {"a": (1.0, -1.0), "b": (-1.0, 1.0)}


def continuous_setup():
    txt = TextDomain(TextDomain.Config(max_length=4))
    vals = DomainSpec("vals", value_dim=2, pos_axes=1)
    specs = [txt.spec, vals]
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": 32, "layers": 2, "heads": 4})
    model = SeqModel(specs, bb, {"text": HEADS.build("categorical", {}, 32, txt.spec),
                                 "vals": HEADS.build("test_linear_gaussian", {}, 32, vals)})
    return txt, specs, model


def value_piece(v, role="target"):
    n = v.shape[0]
    return Piece(VALUE, torch.full((n,), -1), line_positions(n)[0], torch.full((n,), 2.0), role=role, values=v)


def toy_examples(txt, n, g, length=3):
    """[caption "a" or "b" | values near TARGET_VALUES[caption]], both targets."""
    exs = []
    for i in range(n):
        c = "ab"[int(torch.randint(0, 2, (1,), generator=g))]
        v = torch.tensor([TARGET_VALUES[c]] * length) + 0.1 * torch.randn(length, 2, generator=g)
        exs.append([piece(txt, TEXT, c, "target"), value_piece(v)])
    return exs


def test_discrete_and_continuous_targets_side_by_side(gaussian_head):
    txt, specs, model = continuous_setup()
    g = torch.Generator().manual_seed(0)
    p = AutoRegressive(AutoRegressive.Config(cond_dropout=0.0))
    exs = toy_examples(txt, 4, g)
    b = p.prepare(exs, specs=specs, train=False)
    # one sequence: [BEGIN_t c END_t BEGIN_v v0 v1 v2 END_v], value tokens carry id -1 and their values
    V = specs[VALUE]
    assert b.inputs.ids[0].tolist()[:5] == [txt.spec.begin_id, int(b.inputs.ids[0, 1]), txt.spec.end_id, V.begin_id, -1]
    assert b.inputs.values.shape == (4, 7, 2) and torch.equal(b.inputs.values[:, 4:6], torch.stack(
        [e[1].values[:2] for e in exs]))
    assert (b.inputs.values[:, :4] == 0).all()
    # routing: text targets (its byte and END) to the text head, values to the Gaussian head
    assert b.target_modality[0].tolist() == [TEXT, TEXT, VALUE, VALUE, VALUE, VALUE, VALUE]
    assert b.loss_mask[0].tolist() == [True, True, False, True, True, True, False]
    text_t = b.targets[b.loss_mask & (b.target_modality == TEXT)]
    assert set(text_t.tolist()) <= {97, 98, txt.spec.end_id} and (text_t == txt.spec.end_id).sum() == 4
    model.heads["vals"].seen.clear()
    loss, m = model.loss(b)
    seen = model.heads["vals"].seen[-1]
    assert seen.dtype == torch.float32 and seen.shape == (12, 2)
    torch.testing.assert_close(seen, torch.cat([e[1].values for e in exs]))
    assert int(m["text/count"]) == 8 and int(m["vals/count"]) == 12 and float(m["vals/units"]) == 24
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in [("text head", model.heads["text"].proj.weight),
                        ("value head", model.heads["vals"].proj.weight),
                        ("value embedding", model.value_embeds["vals"].weight),
                        ("text embedding", model.embeds["text"].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()

    # train: the values are a function of the caption
    heldout = p.prepare(toy_examples(txt, 64, torch.Generator().manual_seed(99)), specs=specs, train=False)
    sel = heldout.loss_mask & (heldout.target_modality == VALUE)
    tv = heldout.target_values[sel]
    mean_predictor = float((0.5 * (tv - tv.mean(0)).pow(2).sum(-1) + math.log(2 * math.pi)).mean())

    def value_nll():
        with torch.no_grad():
            _, mm = model.loss(heldout)
        return float(mm["vals/nll_sum"]) / int(mm["vals/count"])

    untrained = value_nll()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, _ = model.loss(p.prepare(toy_examples(txt, 16, g), specs=specs, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = value_nll()
    best = math.log(2 * math.pi) + 0.01  # noise 0.1 per channel
    assert trained < mean_predictor - 0.5 and trained < untrained - 0.5, (trained, mean_predictor, untrained)
    assert trained < best + 0.3

    # generation through the scheduler: values for the continuous target, after a caption
    model.eval()
    conds = [[piece(txt, TEXT, c, "cond")] for c in "abba"]
    targets = [[Target(VALUE, line_positions(3)[0])] for _ in conds]

    def gen(temperature, seed=0, cfg_scale=1.0):
        plan = build_plan(conds, targets, specs, guided=cfg_scale != 1.0)
        cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
        p.fill(model, plan, cache, h, specs=specs, temperature=temperature, cfg_scale=cfg_scale,
               generator=torch.Generator().manual_seed(seed))
        return plan

    plan = gen(0.0)
    assert plan.out_values is not None and plan.out_values.shape[-1] == 2
    for b, c in enumerate("abba"):
        o = outputs(plan, b, 0)
        assert o.valid.all() and (o.ids == -1).all() and o.values.shape == (1, 3, 2)
        assert (o.values[0] - torch.tensor(TARGET_VALUES[c])).abs().max() < 0.5, (c, o.values)
    noisy, again = gen(1.0, seed=5), gen(1.0, seed=5)
    assert torch.equal(noisy.out_values, again.out_values) and not torch.allclose(noisy.out_values, plan.out_values)
    guided = gen(0.0, cfg_scale=2.0)
    assert guided.rows == 8 and torch.isfinite(guided.out_values).all()
    assert torch.equal(guided.out_values[:4], guided.out_values[4:])  # one draw, written to both rows
    # a row may also generate the caption first and then its values (text and value slots in one plan)
    both = [Target(TEXT, txt.layout(1, 4).pos[0], variable=True), Target(VALUE, line_positions(3)[0])]
    plan = build_plan([[]], [both], specs)
    cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
    p.fill(model, plan, cache, h, specs=specs, temperature=0.0)
    cap, vals = outputs(plan, 0, 0), outputs(plan, 0, 1)
    text = bytes(cap.ids[0][cap.valid[0]].tolist()).decode()
    assert text in TARGET_VALUES and vals.valid.all()
    assert (vals.values[0] - torch.tensor(TARGET_VALUES[text])).abs().max() < 0.5

    # values as a condition: the prompt carries them (zeros at id tokens), and the model reads them
    v = torch.tensor([[0.5, -2.0], [1.5, 0.25]])
    caption = [Target(TEXT, txt.layout(1, 4).pos[0], variable=True)]
    plan = build_plan([[value_piece(v, "cond")], [value_piece(-v, "cond")]], [caption, caption], specs, guided=True)
    assert plan.prompt.values is not None and plan.prompt.values.shape == (4, 5, 2)
    assert torch.equal(plan.prompt.values[0, 1:3], v) and torch.equal(plan.prompt.values[1, 1:3], -v)
    assert (plan.prompt.values[0, [0, 3, 4]] == 0).all() and (plan.prompt.values[2:] == 0).all()  # null rows
    assert plan.prompt.ids[0].tolist() == [V.begin_id, -1, -1, V.end_id, txt.spec.begin_id]
    cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
    assert (h[0] - h[1]).abs().max() > 1e-4
    p.fill(model, plan, cache, h, specs=specs, temperature=0.0, cfg_scale=2.0)
    assert outputs(plan, 0, 0).valid.any()
