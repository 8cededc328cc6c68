"""Token-Shuffle on the ar paradigm: the token <-> position reshape is an exact inverse, the arrangement
puts the target on group boundaries and shifts by one group, no state sees a later group (gradient
leak test), cached group-by-group decoding agrees with a full forward pass, and a model learns."""
import sys
from pathlib import Path

import pytest
import torch

from seqgen.examples import Piece
from seqgen.generate import Target, build_plan, pad_prompt, prefill
from seqgen.model import SeqModel, TokenShuffle
from seqgen.paradigms.ar import AutoRegressive
from seqgen.registry import BACKBONES, HEADS
from seqgen.types import DomainSpec, SeqgenError

sys.path.insert(0, str(Path(__file__).parent))
from test_masked import SpyModel  # noqa: E402

V = 7
LABEL = DomainSpec("label", vocab_size=5)
IMG = DomainSpec("img", vocab_size=V, pos_axes=2)
SPECS = [LABEL, IMG]


def window_positions(side=4, s=2) -> torch.Tensor:
    """(side^2, 3) grid cells window after window, raster inside each window."""
    out = []
    for wr in range(side // s):
        for wc in range(side // s):
            for i in range(s):
                for j in range(s):
                    out.append([0, wr * s + i, wc * s + j])
    return torch.tensor(out)


def image_ids(y: int) -> torch.Tensor:
    """A deterministic 16-token image per label: token t = (y + t) % V."""
    return (y + torch.arange(16)) % V


def example(y, ids):
    lab = Piece(0, torch.tensor([y]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), role="cond")
    return [lab, Piece(1, ids, window_positions(), torch.ones(16), role="target")]


def model(dim=32):
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": dim, "layers": 2, "heads": 4})
    return SeqModel(SPECS, bb, {"img": HEADS.build("categorical", {}, dim, IMG)}, token_group=4)


def paradigm(**kw):
    return AutoRegressive(AutoRegressive.Config(token_shuffle=2, **kw))


def test_merge_and_split_are_exact_inverses():
    ts = TokenShuffle(8, 4)
    x = torch.randn(3, 12, 8)
    assert torch.equal(ts.split(ts.merge(x)), x)
    assert torch.equal(ts.merge(x)[:, 1, 2], x[:, 6])  # group 1 holds tokens 4..7
    ids = torch.arange(24).view(2, 12)
    assert torch.equal(ts.split(ts.merge(ids)), ids)
    with pytest.raises(SeqgenError, match="whole number"):
        ts.merge(torch.randn(1, 10, 8))


def test_arrangement_aligns_the_target_to_groups_and_shifts_by_one_group():
    b = paradigm().prepare([example(3, image_ids(3))], specs=SPECS, train=False)
    # [BEGIN_l 3 END_l BEGIN_i] is one group; the 16 image tokens are 4 groups; END dropped; shift by 4
    assert b.inputs.length == 16 and bool(b.inputs.valid.all())
    assert torch.equal(b.inputs.ids[0, :4], torch.tensor([LABEL.begin_id, 3, LABEL.end_id, IMG.begin_id]))
    assert torch.equal(b.targets[0], image_ids(3)) and bool(b.loss_mask.all())
    # a 2-token condition makes a 5-token prefix: three invalid tokens pad the front
    lab = Piece(0, torch.tensor([1, 2]), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), role="cond")
    b2 = paradigm().prepare([[lab, example(1, image_ids(1))[1]]], specs=SPECS, train=False)
    assert b2.inputs.length == 20 and b2.inputs.valid[0].tolist() == [False] * 3 + [True] * 17
    assert torch.equal(b2.targets[0, 4:], image_ids(1)) and not b2.loss_mask[0, :4].any()
    with pytest.raises(SeqgenError, match="window by window"):
        paradigm().prepare([[example(1, image_ids(1))[0], Piece(1, torch.zeros(6, dtype=torch.long),
                                                                  window_positions()[:6], torch.ones(6))]], specs=SPECS)
    with pytest.raises(SeqgenError, match="raster"):
        AutoRegressive(AutoRegressive.Config(token_shuffle=2, order="random"))


def test_no_state_sees_a_later_group():
    b = paradigm().prepare([example(2, image_ids(2))], specs=SPECS, train=False)
    m = model()
    x = m.embed(b.inputs).detach().requires_grad_(True)
    ts = m.shuffle
    h = ts.unshuffle(m.backbone(ts.shuffle(x, b.inputs.valid), pos=ts.merge(b.inputs.pos)[:, :, -1], mask=b.mask))
    L = x.shape[1]
    for q in range(L):
        g, = torch.autograd.grad(h[0, q].sum(), x, retain_graph=True)
        dep = g[0].abs().sum(-1) > 0
        assert torch.equal(dep, torch.arange(L) < (q // 4 + 1) * 4), q  # its own group and earlier ones


def _generate(m, labels, guided=False, temperature=0.0):
    p = paradigm()
    conds = [[example(y, image_ids(y))[0]] for y in labels]
    plan = build_plan(conds, [[Target(1, window_positions())] for _ in labels], SPECS, guided=guided)
    plan = p.prepare_plan(plan)
    assert plan.prompt.length % 4 == 0
    cache, h = prefill(m, plan, 64, "cpu", p.prompt_mask(plan), last=4)
    p.fill(m, plan, cache, h, specs=SPECS, generator=torch.Generator().manual_seed(0), temperature=temperature,
           cfg_scale=2.0 if guided else 1.0)
    return plan.out_ids[:len(labels), :16]


def test_cached_group_decoding_matches_a_full_forward_with_n_over_g_passes():
    m = model()
    for p_ in m.parameters():
        p_.data.mul_(4.0)
    spy = SpyModel(m)
    gen = _generate(spy, [0, 1, 2])
    assert len(spy.calls) == 4  # prefill + 3 further groups: 16 tokens in 4 passes
    b = paradigm().prepare([example(y, g) for y, g in zip([0, 1, 2], gen)], specs=SPECS, train=False)
    logits = m.heads["img"].logits(m(b.inputs, mask=b.mask))[..., :V]
    assert torch.equal(logits.argmax(-1), gen)


def test_pad_prompt_keeps_the_prompt_and_hides_the_padding():
    conds = [[example(1, image_ids(1))[0]]]
    plan = build_plan(conds, [[Target(1, window_positions())]], SPECS)
    P = plan.prompt.length
    plan = pad_prompt(plan, 3)
    assert plan.prompt.length % 3 == 0 and plan.prompt.length >= P
    assert not plan.prompt.valid[0, :plan.prompt.length - P].any() and plan.prompt.valid[0, -P:].all()


def test_token_shuffle_model_learns_and_generates():
    torch.manual_seed(0)
    m = model()
    p = paradigm(cond_dropout=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        ys = torch.randint(0, 5, (32,), generator=g).tolist()
        loss, _ = m.loss(p.prepare([example(y, image_ids(y)) for y in ys], specs=SPECS, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ys = [0, 1, 2, 3, 4]
    for guided in (False, True):
        gen = _generate(m, ys, guided=guided, temperature=1.0)
        assert sum(torch.equal(a, image_ids(y)) for a, y in zip(gen, ys)) >= 4, gen
