"""Continuous tokens through the runtime with the diffusion head: causal decoding with a flow head
(NextStep's arrangement) equals decoding without the cache, and masked decoding of continuous tokens
(MAR's arrangement: random order, several tokens per step) never re-masks and trains in place."""
import sys
from pathlib import Path

import torch

from seqgen.examples import Piece
from seqgen.generate import Target, build_plan, prefill
from seqgen.model import SeqModel
from seqgen.paradigms.ar import AutoRegressive
from seqgen.paradigms.masked import Masked
from seqgen.registry import BACKBONES, HEADS
from seqgen.types import DomainSpec, TokenSequence, line_positions

sys.path.insert(0, str(Path(__file__).parent))
from test_masked import SpyModel  # noqa: E402

LABEL = DomainSpec("label", vocab_size=5)
VAL = DomainSpec("val", value_dim=2, pos_axes=1)
SPECS = [LABEL, VAL]
N = 6


def model(dim=32, objective="flow"):
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": dim, "layers": 2, "heads": 4})
    head = HEADS.build("diffusion", {"objective": objective, "width": 32, "depth": 2, "time_embed_dim": 32,
                                     "sample_steps": 6}, dim, VAL)
    m = SeqModel(SPECS, bb, {"val": head})
    for p in m.parameters():  # random but not negligible outputs: decisions depend on what the model reads
        p.data.add_(torch.randn_like(p) * 0.05)
    return m


def cond(y):
    return Piece(0, torch.tensor([y]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), role="cond")


def target_piece(values):
    n = len(values)
    return Piece(1, torch.full((n,), -1), line_positions(n)[0], torch.ones(n), role="target", values=values)


def decode(m, paradigm, labels, guided=False, temperature=0.0, steps=None):
    plan = build_plan([[cond(y)] for y in labels], [[Target(1, line_positions(N)[0])] for _ in labels], SPECS,
                      guided=guided)
    cache, h = prefill(m, plan, plan.prompt.length + N + 2, "cpu", paradigm.prompt_mask(plan))
    kw = {} if steps is None else {"steps": steps}
    paradigm.fill(m, plan, cache, h, specs=SPECS, generator=torch.Generator().manual_seed(0), temperature=temperature,
                  cfg_scale=2.0 if guided else 1.0, **kw)
    data = plan.slot_kind[:len(labels)] == 0
    return plan.out_values[:len(labels)][data].view(len(labels), N, 2)


def test_causal_flow_head_decoding_with_the_cache_equals_decoding_without_it():
    m = model().eval()
    head = m.heads["val"]
    for guided in (False, True):
        labels = [0, 3]
        out = decode(m, AutoRegressive(), labels, guided=guided)
        assert out.abs().sum() > 0
        # without a cache: the whole sequence so far, forward from scratch, for every token
        for t in range(N):
            seqs = []
            for null in ([False, True] if guided else [False]):
                rows = [[cond(y) if not null else Piece(0, torch.tensor([LABEL.null_id]),
                                                         torch.zeros(1, 3, dtype=torch.long), torch.zeros(1),
                                                         role="cond", null=True),
                         target_piece(torch.cat([out[b, :t], torch.zeros(1, 2)]))] for b, y in enumerate(labels)]
                batch = AutoRegressive().prepare(rows, specs=SPECS, train=False)
                h = m(batch.inputs, mask=batch.mask)
                seqs.append(h[:, 3 + t])  # [BEGIN_l y END_l BEGIN_v v0 ..]: the state that predicts token t
            h_u = seqs[1] if guided else None
            want = head.sample(seqs[0], temperature=0.0, h_uncond=h_u, cfg_scale=2.0 if guided else 1.0)
            assert torch.allclose(out[:, t], want, atol=1e-5), (guided, t)


def test_masked_continuous_decoding_reveals_in_random_order_and_never_remasks():
    m = model()
    spy = SpyModel(m)
    p = Masked(Masked.Config(steps=3, selection="confidence"))  # continuous tokens: random order regardless
    out = decode(spy, p, [1, 2, 4], temperature=1.0)
    calls = spy.calls[1:]
    assert len(calls) == 3
    masked = [(c == VAL.mask_id) for c in calls]
    assert masked[0].all() and not masked[-1].all()
    for a, b in zip(masked, masked[1:]):
        assert (b <= a).all() and (b.sum(1) < a.sum(1)).all()  # only ever unmasked, some every step
    kept_last = calls[-1] == -1
    assert torch.isfinite(out).all() and kept_last.any()


def test_masked_continuous_training_scores_masked_values_in_place():
    vals = torch.randn(N, 2)
    b = Masked().prepare([[cond(1), target_piece(vals)]], specs=SPECS, generator=torch.Generator().manual_seed(3))
    seg = slice(4, 4 + N)
    masked = b.inputs.ids[0, seg] == VAL.mask_id
    assert masked.any() and torch.equal(b.loss_mask[0, seg], masked)
    assert torch.equal(b.target_values[0, seg][masked], vals[masked])  # each masked position: its own values
    assert (b.inputs.values[0, seg][masked] == 0).all()  # the input shows nothing of them
    assert torch.equal(b.inputs.values[0, seg][~masked], vals[~masked])
    m = model()
    loss, metrics = m.loss(b)
    assert loss.requires_grad and int(metrics["val/count"]) == int(masked.sum())
    ev = Masked().prepare([[cond(1), target_piece(vals)]], specs=SPECS, train=False)
    _, metrics = m.loss(ev)  # the evidence-bound weights do not apply to a denoising loss
    assert int(metrics["val/count"]) == int(ev.loss_mask.sum())


def test_a_null_condition_in_place_of_the_only_continuous_segment_needs_no_values():
    """image -> caption with the image dropped (guidance, or the NLL without the condition): the batch holds
    no value token at all, and the model reads it without values."""
    TXT = DomainSpec("txt", vocab_size=7)
    specs = [VAL, TXT]
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": 16, "layers": 1, "heads": 2})
    flow = HEADS.build("diffusion", {"width": 16, "depth": 1, "time_embed_dim": 16}, 16, VAL)
    m = SeqModel(specs, bb, {"txt": HEADS.build("categorical", {}, 16, TXT), "val": flow})  # both directions' heads
    img = Piece(0, torch.full((4,), -1), line_positions(4)[0], torch.ones(4), role="cond", values=torch.randn(4, 2))
    cap = Piece(1, torch.tensor([1, 2, 3]), line_positions(3)[0], torch.ones(3), role="target", variable=True)
    with_image = AutoRegressive().prepare([[img, cap]], specs=specs, train=False)
    null = AutoRegressive().prepare([[img, cap]], specs=specs, train=False, null=True)
    assert with_image.inputs.values is not None and null.inputs.values is None
    loss_null, _ = m.loss(null)
    loss_img, _ = m.loss(with_image)
    assert torch.isfinite(loss_null) and torch.isfinite(loss_img)
