"""The next_scale paradigm (VAR): parent-scale inputs trained in place, scale-block-causal attention
(gradient leak test: no token sees a later scale), K forward passes for K scales, and cached
scale-by-scale decoding that agrees with a full forward pass over the same tokens."""
import math
import sys
from pathlib import Path

import pytest
import torch

from seqgen.examples import Piece
from seqgen.generate import Target, build_plan, prefill
from seqgen.model import SeqModel
from seqgen.paradigms.next_scale import NextScale, scale_parents
from seqgen.registry import BACKBONES, HEADS
from seqgen.types import DomainSpec, SeqgenError

sys.path.insert(0, str(Path(__file__).parent))
from test_masked import SpyModel, dependencies  # noqa: E402

SCALES = ((1, 1), (2, 2), (3, 3))
V = 6
LABEL = DomainSpec("label", vocab_size=5)
MS = DomainSpec("ms", vocab_size=V, pos_axes=2, scales=SCALES)
SPECS = [LABEL, MS]


def ms_positions() -> torch.Tensor:
    """(14, 3): every scale on the final 3x3 grid, axis 0 the scale index."""
    out = []
    for k, (h, w) in enumerate(SCALES):
        for i in range(h):
            for j in range(w):
                out.append([k, math.floor((i + 0.5) * 3 / h), math.floor((j + 0.5) * 3 / w)])
    return torch.tensor(out)


def items(labels):
    """A deterministic pyramid per label: scale 1 = label, each child = (parent + 1 + label) % V."""
    _, parent = scale_parents(SCALES)
    out = []
    for y in labels:
        ids = torch.zeros(len(parent), dtype=torch.long)
        ids[0] = y
        for t in range(1, len(parent)):
            ids[t] = (ids[parent[t]] + 1 + y) % V
        out.append(ids)
    return out


def example(y, ids):
    lab = Piece(0, torch.tensor([y]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), role="cond")
    return [lab, Piece(1, ids, ms_positions(), torch.ones(len(ids)), role="target")]


def model(dim=32):
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": dim, "layers": 2, "heads": 4})
    return SeqModel(SPECS, bb, {"ms": HEADS.build("categorical", {}, dim, MS)})


def test_scale_parents_follow_the_nearest_rule():
    scale_of, parent = scale_parents(((1, 1), (2, 2), (3, 3)))
    assert scale_of.tolist() == [0] + [1] * 4 + [2] * 9
    assert parent[:5].tolist() == [-1, 0, 0, 0, 0]
    # 3x3 cell (i, j) reads 2x2 cell (2i // 3, 2j // 3): rows 0,0,1 and columns 0,0,1
    assert parent[5:].tolist() == [1 + a * 2 + b for a in (0, 0, 1) for b in (0, 0, 1)]
    with pytest.raises(SeqgenError, match="coarse to fine"):
        DomainSpec("bad", vocab_size=3, scales=((2, 2), (1, 1)))


def test_prepare_feeds_parents_and_predicts_every_scale_in_place():
    ys = [1, 3]
    data = items(ys)
    b = NextScale().prepare([example(y, d) for y, d in zip(ys, data)], specs=SPECS, train=False)
    _, parent = scale_parents(SCALES)
    # [BEGIN_l y END_l BEGIN_ms s1 | 4 parents | 9 parents] (END dropped by the shift)
    seg = b.inputs.ids[:, 4:18]
    assert torch.equal(seg[:, 0], torch.tensor(ys))  # the 1x1 token is fed as itself ...
    assert b.targets[0, 3] == ys[0] and b.loss_mask[:, 3].all()  # ... after BEGIN predicted it
    for r, d in enumerate(data):
        assert torch.equal(seg[r, 1:], d[parent[1:]])  # inputs: the parent cell's token
        assert torch.equal(b.targets[r, 5:18], d[1:])  # targets: each position's own token
    assert torch.equal(b.loss_mask[0], torch.arange(18).ge(3) & torch.arange(18).ne(4))  # every token, once
    assert int(b.loss_mask.sum()) == 2 * 14
    with pytest.raises(SeqgenError, match="must have 14 tokens"):
        NextScale().prepare([example(1, data[0][:5])], specs=SPECS)


def test_no_token_sees_a_later_scale():
    """Gradient leak test over the scale-block-causal mask."""
    b = NextScale().prepare([example(2, items([2])[0])], specs=SPECS, train=False)
    dep = dependencies(model(), b)
    L = dep.shape[0]
    scale = torch.full((L,), -1)
    scale[4], scale[5:9], scale[9:18] = 0, 1, 2
    for q in range(L):
        for k in range(L):
            both = scale[q] >= 0 and scale[k] >= 0
            sees = bool(scale[k] <= scale[q]) if both else k <= q
            assert bool(dep[q, k]) == sees, (q, k)  # exactly: earlier tokens and its own scale, no later scale


def _generate(m, labels, guided=False, temperature=0.0):
    conds = [[example(y, items([y])[0])[0]] for y in labels]
    targets = [[Target(1, ms_positions())] for _ in labels]
    p = NextScale()
    plan = build_plan(conds, targets, SPECS, guided=guided)
    cache, h = prefill(m, plan, plan.prompt.length + 16, "cpu", p.prompt_mask(plan))
    p.fill(m, plan, cache, h, specs=SPECS, generator=torch.Generator().manual_seed(0), temperature=temperature,
           cfg_scale=2.0 if guided else 1.0)
    return plan.out_ids[:len(labels), :14]


def test_cached_scale_decoding_matches_a_full_forward_and_takes_one_pass_per_scale():
    m = model()
    for p_ in m.parameters():
        p_.data.mul_(4.0)  # a sharp random model: argmax decisions depend on everything it reads
    spy = SpyModel(m)
    gen = _generate(spy, [0, 1, 2, 3])
    assert len(spy.calls) == 3  # the prefill (gives the 1x1 scale) + one pass per further scale
    # greedy decoding picked, at every position, the argmax of the full (uncached) forward over the same tokens
    b = NextScale().prepare([example(y, g) for y, g in zip([0, 1, 2, 3], gen)], specs=SPECS, train=False)
    h = m(b.inputs, mask=b.mask)
    logits = m.heads["ms"].logits(h)[..., :V]
    pred = logits.argmax(-1)
    assert torch.equal(pred[:, 3], gen[:, 0])  # the 1x1 scale, from BEGIN
    assert torch.equal(pred[:, 5:18], gen[:, 1:])


def test_next_scale_learns_a_deterministic_pyramid_and_generates_it():
    torch.manual_seed(0)
    m = model()
    p = NextScale(NextScale.Config(cond_dropout=0.1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        ys = torch.randint(0, 5, (32,), generator=g).tolist()
        b = p.prepare([example(y, d) for y, d in zip(ys, items(ys))], specs=SPECS, generator=g)
        loss, _ = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ys = [0, 1, 2, 3, 4]
    for guided in (False, True):
        gen = _generate(m, ys, guided=guided, temperature=1.0)
        exact = sum(torch.equal(a, b) for a, b in zip(gen, items(ys)))
        assert exact >= 4, (guided, gen)  # an untrained model gets 1 token in 6 right: never a whole pyramid
