"""The masked paradigm (MaskGIT / MAR arrangement): in-place targets and a loss over masked positions
only, the cosine schedule, bidirectional attention inside the segment (gradient leak test), the
evidence bound's weights, Show-o's hybrid batch, and decoding that never re-masks a kept token."""
import math
import sys
from pathlib import Path

import pytest
import torch

from seqgen.config import RunConfig
from seqgen.examples import Piece
from seqgen.generate import Target, build_plan, prefill
from seqgen.paradigms.masked import Masked, mask_ratio
from seqgen.types import SeqgenError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_digits_config  # noqa: E402
from test_ar import IMAGE, LABEL, TEXT, domains, images, model_for, piece  # noqa: E402


def label_image_examples(n, seed=0):
    label, img, txt, specs = domains()
    x = images(n, g=torch.Generator().manual_seed(seed))
    exs = [[piece(label, LABEL, i % 10, "cond"), piece(img, IMAGE, im, "target")] for i, im in enumerate(x)]
    return exs, img, specs, x


def test_prepare_masks_in_place_and_scores_only_masked_positions():
    exs, img, specs, x = label_image_examples(8)
    b = Masked().prepare(exs, specs=specs, generator=torch.Generator().manual_seed(0))
    data = img.encode(x).ids
    # [BEGIN_l y END_l BEGIN_i p0 .. p15 END_i] minus the last token: the image sits at inputs 4..19
    seg = b.inputs.ids[:, 4:20]
    masked = seg == img.spec.mask_id
    assert masked.any(1).all() and not masked.all()  # every image has masked and kept tokens here
    assert torch.equal(b.loss_mask[:, 4:20], masked)  # the loss counts exactly the masked positions ...
    assert not b.loss_mask[:, :4].any()  # ... not the token before the segment, nor the condition
    assert torch.equal(b.targets[:, 4:20][masked], data[masked])  # in place: a position predicts its own token
    assert torch.equal(seg[~masked], data[~masked])  # kept tokens are the image's own
    assert (b.target_modality[b.loss_mask] == IMAGE).all()
    assert b.weights is None  # training: plain mean over masked tokens


def test_mask_ratio_follows_the_schedule():
    assert mask_ratio(0.0) == 1.0 and abs(mask_ratio(1.0)) < 1e-12 and mask_ratio(0.5, "linear") == 0.5
    exs, img, specs, _ = label_image_examples(400)
    for schedule, expect in (("cosine", 2 / math.pi), ("linear", 0.5)):
        b = Masked(Masked.Config(schedule=schedule)).prepare(exs, specs=specs, generator=torch.Generator().manual_seed(1))
        frac = (b.inputs.ids[:, 4:20] == img.spec.mask_id).float().mean().item()
        # E[ceil(gamma(u) n) / n] is a little above E[gamma(u)] (ceil adds < 1/n)
        assert expect - 0.03 < frac < expect + 1 / 16 + 0.03, (schedule, frac)


def dependencies(m, b) -> torch.Tensor:
    """(L, L) bool: output q of the first row depends on input k (gradient leak test over ``b.mask``)."""
    x = m.embed(b.inputs).detach().requires_grad_(True)
    h = m.backbone(x, pos=b.inputs.pos, mask=b.mask)
    L = x.shape[1]
    dep = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        g, = torch.autograd.grad(h[0, q].sum(), x, retain_graph=True)
        dep[q] = g[0].abs().sum(-1) > 0
    return dep


def test_attention_is_bidirectional_inside_the_segment_and_causal_before_it():
    """Gradient leak test: no position before the image depends on an image token; every image token
    depends on every other image token (both ways)."""
    exs, img, specs, _ = label_image_examples(2)
    b = Masked().prepare(exs, specs=specs, generator=torch.Generator().manual_seed(0))
    dep = dependencies(model_for(specs, [IMAGE]), b)
    image = torch.arange(4, 20)
    assert not dep[:4][:, 4:].any()  # the condition and BEGIN never see the image
    assert dep[image][:, image].all()  # both ways inside the image segment
    assert dep[image][:, :4].all()  # the image sees the condition


def test_evaluation_weights_give_an_evidence_bound_over_whole_images():
    exs, img, specs, _ = label_image_examples(64)
    p = Masked()
    b1 = p.prepare(exs, specs=specs, train=False)
    b2 = p.prepare(exs, specs=specs, train=False)
    assert torch.equal(b1.inputs.ids, b2.inputs.ids)  # a fixed seed: the figure is deterministic
    k = b1.loss_mask.sum(1).float()
    assert (k >= 1).all() and (k <= 16).all() and len(k.unique()) > 5  # k uniform in 1..n
    w = b1.weights[b1.loss_mask].view(-1)
    assert torch.allclose((b1.weights * b1.loss_mask).sum(1), torch.full((64,), 16.0))  # k tokens x n / k
    # weighted units of the masked tokens = the units of the whole image, per example
    assert torch.allclose((b1.units * b1.weights * b1.loss_mask).sum(1), torch.full((64,), 16.0))
    assert (w >= 1).all()


def test_show_o_hybrid_batch_trains_next_token_captions_and_masked_images_together():
    label, img, txt, specs = domains()
    x = images(2, g=torch.Generator().manual_seed(0))
    to_image = [piece(txt, TEXT, "a cat", "cond"), piece(img, IMAGE, x[0], "target")]
    to_text = [piece(img, IMAGE, x[1], "cond"), piece(txt, TEXT, "a dog", "target")]
    b = Masked(Masked.Config(domains=["image"])).prepare([to_image, to_text], specs=specs,
                                                        generator=torch.Generator().manual_seed(0))
    cap = txt.encode(["a dog"]).ids[0]
    # row 1: [BEGIN_i 16 pixels END_i BEGIN_t a _ d o g END_t]; targets shift by one, END scored
    assert torch.equal(b.targets[1, 18:18 + len(cap)], cap) and b.loss_mask[1, 18:18 + len(cap) + 1].all()
    assert (b.targets[1, 18 + len(cap)] == txt.spec.end_id) and not b.loss_mask[1, :18].any()
    # the image condition of row 1 is not masked; the image target of row 0 is, in place
    assert not (b.inputs.ids[1, 1:17] == img.spec.mask_id).any()
    first = 2 + len("a cat") + 1  # [BEGIN_t a _ c a t END_t BEGIN_i ...
    masked = b.inputs.ids[0, first:first + 16] == img.spec.mask_id
    assert masked.any() and torch.equal(b.loss_mask[0, first:first + 16], masked)
    with pytest.raises(SeqgenError, match="variable-length"):
        Masked(Masked.Config(domains=["text"])).prepare([to_text], specs=specs)


class SpyModel(torch.nn.Module):
    """Records the ids of every masked-segment forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, seq, **kw):
        self.calls.append(seq.ids.clone())
        return self.model(seq, **kw)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def _decode(paradigm, model, specs, guided=False, steps=None, B=3):
    label, img = specs[LABEL], specs[IMAGE]
    conds = [[Piece(LABEL, torch.tensor([b]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1), role="cond")]
             for b in range(B)]
    lay = domains()[1].layout(1)
    targets = [[Target(IMAGE, lay.pos[0])] for _ in range(B)]
    plan = build_plan(conds, targets, specs, guided=guided)
    cache, h = prefill(model, plan, plan.prompt.length + 17, "cpu", paradigm.prompt_mask(plan))
    g = torch.Generator().manual_seed(0)
    paradigm.fill(model, plan, cache, h, specs=specs, generator=g, cfg_scale=2.0 if guided else 1.0, steps=steps)
    return plan


@pytest.mark.parametrize("selection,guided", [("confidence", False), ("confidence", True), ("random", False)])
def test_decoding_never_remasks_a_kept_token(selection, guided):
    _, img, _, specs = domains()
    spy = SpyModel(model_for(specs, [IMAGE], scale=3.0))
    plan = _decode(Masked(Masked.Config(selection=selection, steps=5)), spy, specs, guided=guided)
    calls = spy.calls[1:]  # the first call is the prefill
    assert len(calls) == 5  # one forward pass per step
    prev = None
    for ids in calls:
        kept = ids != img.spec.mask_id
        if prev is not None:
            assert (kept | ~prev[0]).all()  # once kept, always kept
            assert torch.equal(ids[prev[0]], prev[1][prev[0]])  # and never changed
        if guided:
            assert torch.equal(ids[:3], ids[3:])  # null rows carry the same tokens
        prev = (kept, ids)
    counts = [int((c[0] != img.spec.mask_id).sum()) for c in calls]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] < 16
    # cosine: floor(16 * cos(pi/2 * t/5)) tokens stay masked after step t
    assert counts == [16 - math.floor(16 * math.cos(math.pi / 2 * t / 5)) for t in range(5)]
    data = plan.out_ids[:, :16]
    assert plan.filled[:, :16].all() and (data < img.spec.vocab_size).all()


def test_confidence_selection_keeps_the_most_confident_tokens():
    """With no Gumbel noise a step keeps exactly the positions whose drawn token is most probable."""
    _, img, _, specs = domains()
    model = model_for(specs, [IMAGE])
    head = model.heads["image"]
    real = head.sample

    def sample(h, **kw):  # confidence = position index: the last positions win
        ids, _ = real(h, **kw)
        return ids, torch.arange(h.shape[0], dtype=torch.float).remainder(16)
    head.sample = sample
    spy = SpyModel(model)
    _decode(Masked(Masked.Config(steps=4, choice_temperature=0.0)), spy, specs)
    kept = spy.calls[2][0] != img.spec.mask_id  # after the first step
    n = int(kept.sum())
    assert n == 16 - math.floor(16 * math.cos(math.pi / 8)) and kept[16 - n:].all() and not kept[:16 - n].any()


def test_masked_model_learns_digits_below_the_uniform_bound(tmp_path):
    """A tiny MaskGIT trained 150 steps on 8x8 digits: its evidence bound (bits / dim) must beat the
    uniform model's log2(17) = 4.09 by a wide margin, and sampling works with and without guidance."""
    from seqgen.task import load_run
    from seqgen.train import train

    cfg = tiny_digits_config(paradigm={"name": "masked", "steps": 4}, train={"steps": 150, "ckpt_every": 150})
    s = train(RunConfig.from_dict(cfg), tmp_path / "run", progress_bar=False)
    assert s["bits_per_dim"] < 3.0, s
    task = load_run(tmp_path / "run")
    for scale in (1.0, 2.0):
        out = task.generate(entry="label_to_image", conds=[{"label": i} for i in range(4)], cfg_scale=scale, steps=3)
        assert len(out) == 4 and out[0]["image"].shape == (8, 8)
    with pytest.raises(SeqgenError, match="sampling order"):
        task.generate(entry="label_to_image", conds=[{"label": 1}], order="random")


def test_next_token_decoding_of_n_tokens_takes_n_passes():
    """The forward-pass count the paradigm comparison reports: the prefill predicts the first token and
    each later token costs one pass; the forced END of a fixed-length segment costs none."""
    from seqgen.paradigms.ar import AutoRegressive

    _, img, _, specs = domains()
    spy = SpyModel(model_for(specs, [IMAGE]))
    plan = _decode(AutoRegressive(), spy, specs)
    assert len(spy.calls) == 16 and plan.filled[:, :16].all()


def test_listed_domains_are_read_both_ways_as_conditions_too():
    """Show-o's omni-attention: a scene conditioning a caption attends within itself both ways, as it does
    when it is generated; a text condition stays causal; the prefill uses the same pattern."""
    label, img, txt, specs = domains()
    x = images(1, g=torch.Generator().manual_seed(0))
    to_text = [piece(img, IMAGE, x[0], "cond"), piece(txt, TEXT, "a dog", "target")]
    p = Masked(Masked.Config(domains=["image"], cond_dropout=0.0))
    b = p.prepare([to_text], specs=specs, generator=torch.Generator().manual_seed(0))
    m = model_for(specs, [TEXT])
    xe = m.embed(b.inputs).detach().requires_grad_(True)
    h = m.backbone(xe, pos=b.inputs.pos, mask=b.mask)
    g, = torch.autograd.grad(h[0, 1].sum(), xe)  # the first pixel of the condition
    assert (g[0, 1:18].abs().sum(-1) > 0).all() and not (g[0, 18:].abs().sum(-1) > 0).any()
    # the prefill of a caption from that scene: the same pattern
    plan = build_plan([[to_text[0]]], [[Target(TEXT, txt.layout(1, 5).pos[0], variable=True)]], specs)
    dense = p.prompt_mask(plan).dense(1, plan.prompt.length, plan.prompt.length, 0, "cpu")[0, 0]
    assert dense[1, 17] and dense[1:18, 1:18].all() and not dense[17, 18]
    text_cond = Masked(Masked.Config(domains=["image"])).prompt_mask(
        build_plan([[piece(txt, TEXT, "a cat", "cond")]], [[Target(IMAGE, img.layout(1).pos[0])]], specs))
    assert type(text_cond).__name__ == "Causal"
