"""The ar paradigm: arrangement of segment examples, RAR permutations and annealing, condition dropout,
and generation through the scheduler (guidance, sliding windows, errors)."""
import pytest
import torch

from seqgen.domains.image import ImageDomain
from seqgen.domains.label import LabelDomain
from seqgen.domains.text import TextDomain
from seqgen.examples import Piece, encode_pieces
from seqgen.generate import Target, build_plan, outputs, prefill
from seqgen.masks import causal
from seqgen.model import SeqModel
from seqgen.paradigms.ar import AutoRegressive
from seqgen.registry import BACKBONES, HEADS
from seqgen.types import SeqgenError, TokenSequence

LABEL, IMAGE, TEXT = 0, 1, 2


def domains(levels=5, side=4, max_length=16, context=256):
    label = LabelDomain(LabelDomain.Config(num_classes=10))
    img = ImageDomain(ImageDomain.Config(height=side, width=side, levels=levels))
    txt = TextDomain(TextDomain.Config(max_length=max_length, context=context))
    return label, img, txt, [label.spec, img.spec, txt.spec]


def piece(adapter, modality, item, role):
    return encode_pieces(adapter, [item], modality, role)[0]


def images(n, levels=5, side=4, g=None):
    return list(torch.randint(0, levels, (n, side, side), generator=g).float().numpy() / (levels - 1))


def model_for(specs, heads, dim=32, target_pos=False, scale=1.0):
    torch.manual_seed(0)
    bb = BACKBONES.build("transformer", {"dim": dim, "layers": 2, "heads": 4})
    m = SeqModel(specs, bb, {specs[k].name: HEADS.build("categorical", {}, dim, specs[k]) for k in heads},
                 target_pos=target_pos)
    for p in m.parameters():
        p.data.mul_(scale)
    return m


def test_prepare_shifts_and_masks_the_condition():
    label, img, txt, specs = domains()
    x = images(4, g=torch.Generator().manual_seed(0))
    exs = [[piece(label, LABEL, y, "cond"), piece(img, IMAGE, im, "target")] for y, im in zip([1, 2, 3, 4], x)]
    b = AutoRegressive().prepare(exs, specs=specs, train=False)
    data = img.encode(x)
    # [BEGIN_l y END_l BEGIN_i p0 .. p15 END_i], shifted by one
    assert b.inputs.length == 3 + 1 + 16 + 1 - 1 and b.targets.shape == (4, 20)
    assert torch.equal(b.inputs.ids[:, 1], torch.tensor([1, 2, 3, 4]))
    assert (b.inputs.ids[:, 0] == label.spec.begin_id).all() and (b.inputs.ids[:, 3] == img.spec.begin_id).all()
    assert torch.equal(b.targets[:, 3:19], data.ids)  # every pixel is a target ...
    assert torch.equal(b.loss_mask, torch.arange(20).expand(4, 20).ge(3) & torch.arange(20).lt(19))  # ... and only those
    assert (b.target_modality[b.loss_mask] == IMAGE).all() and b.target_pos is None
    assert (b.targets[:, 19] == img.spec.end_id).all() and not b.loss_mask[:, 19].any()  # fixed length: END not scored
    # coordinates of the image start past the label's on every axis (M-RoPE rule)
    assert torch.equal(b.inputs.pos[:, 4], data.pos[:, 0] + 4)
    assert int(b.inputs.pos[:, :3].max()) < int(b.inputs.pos[:, 3:].min())
    assert torch.equal(b.units[b.loss_mask], torch.ones(64))  # one pixel per image token
    assert b.null_cond is not None and not b.null_cond.any()


def test_prepare_without_condition_predicts_every_token():
    label, img, txt, specs = domains()
    # a stream window (open piece): no begin / end, all but the first token predicted
    ids = torch.arange(10)
    win = Piece(TEXT, ids, torch.arange(10).view(10, 1).expand(10, 3), torch.ones(10), open=True)
    b = AutoRegressive().prepare([[win]], specs=specs)
    assert torch.equal(b.inputs.ids, ids[None, :-1]) and torch.equal(b.targets, ids[None, 1:])
    assert b.loss_mask.all() and b.null_cond is None
    # a closed variable-length target: every token is predicted (the first from BEGIN) and so is END
    cap = piece(txt, TEXT, "abc", "target")
    b = AutoRegressive().prepare([[cap]], specs=specs)
    assert b.inputs.ids[0].tolist() == [txt.spec.begin_id, 97, 98, 99]
    assert b.targets[0].tolist() == [97, 98, 99, txt.spec.end_id] and b.loss_mask.all()
    assert b.units[0].tolist() == [1, 1, 1, 0]  # END stands for no byte


def test_rar_anneal_schedule():
    p = AutoRegressive(AutoRegressive.Config(order="random", anneal_start=0.2, anneal_end=0.6))
    assert p.permute_rate(0.0) == 1.0 and p.permute_rate(0.19) == 1.0
    assert p.permute_rate(0.4) == pytest.approx(0.5)
    assert p.permute_rate(0.6) == 0.0 and p.permute_rate(1.0) == 0.0
    assert AutoRegressive().permute_rate(0.0) == 0.0
    always = AutoRegressive(AutoRegressive.Config(order="random", anneal_start=1.0, anneal_end=1.0))
    assert always.permute_rate(0.99) == 1.0


def test_random_order_permutes_tokens_with_their_coordinates():
    g = torch.Generator().manual_seed(0)
    label, img, txt, specs = domains()
    x = images(64, g=g)
    data = img.encode(x)
    exs = [[piece(label, LABEL, 3, "cond"), piece(img, IMAGE, im, "target")] for im in x]
    p = AutoRegressive(AutoRegressive.Config(order="random", anneal_start=0.5, anneal_end=0.5, cond_dropout=0.0))
    b = p.prepare(exs, specs=specs, generator=g, progress=0.0)
    raster = AutoRegressive(AutoRegressive.Config(cond_dropout=0.0)).prepare(exs, specs=specs, train=False)
    for r in range(64):
        # the image targets are a permutation of the row's pixels, each still at its own coordinates
        sel = b.loss_mask[r]
        tp = b.target_pos[r][sel] - 4  # undo the shift past [BEGIN_l y END_l] and BEGIN_i
        rebuilt = torch.zeros(4, 4, dtype=torch.long)
        rebuilt[tp[:, 1], tp[:, 2]] = b.targets[r][sel]
        assert torch.equal(rebuilt.view(-1), data.ids[r])
    assert torch.equal(b.target_pos[:, :-1], b.inputs.pos[:, 1:])
    permuted = (b.targets[:, 3:19] != data.ids).any(-1)
    assert permuted.float().mean() > 0.9
    late = p.prepare(exs, specs=specs, generator=g, progress=0.9)
    assert torch.equal(late.targets, raster.targets)  # annealed to raster
    # a variable-length segment is never permuted (its END must come last)
    cap = [[piece(txt, TEXT, "hello", "target")]]
    b = p.prepare(cap, specs=specs, generator=g, progress=0.0)
    assert b.targets[0].tolist() == list(b"hello") + [txt.spec.end_id]


def test_condition_dropout_rate_and_null_ids():
    g = torch.Generator().manual_seed(0)
    label, img, txt, specs = domains()
    n = 2000
    ys = torch.randint(0, 10, (n,), generator=g).tolist()
    tgt = Piece(IMAGE, torch.zeros(2, dtype=torch.long), img.positions()[:2], torch.ones(2))
    exs = [[piece(label, LABEL, y, "cond"), tgt] for y in ys]
    b = AutoRegressive(AutoRegressive.Config(cond_dropout=0.25)).prepare(exs, specs=specs, generator=g)
    nulls = b.inputs.ids[:, 1] == label.spec.null_id
    assert torch.equal(nulls, b.null_cond)
    assert abs(nulls.float().mean().item() - 0.25) < 0.03
    assert torch.equal(b.inputs.ids[~nulls, 1], torch.tensor(ys)[~nulls])
    ev = AutoRegressive(AutoRegressive.Config(cond_dropout=0.25)).prepare(exs, specs=specs, generator=g, train=False)
    assert not ev.null_cond.any()  # no dropout in evaluation
    allnull = AutoRegressive().prepare(exs[:5], specs=specs, null=True)
    assert allnull.null_cond.all() and (allnull.inputs.ids[:, 1] == label.spec.null_id).all()


def test_bad_config_and_generate_errors():
    with pytest.raises(SeqgenError, match="unknown order"):
        AutoRegressive(AutoRegressive.Config(order="zigzag"))
    with pytest.raises(SeqgenError, match="anneal"):
        AutoRegressive(AutoRegressive.Config(order="random", anneal_start=0.8, anneal_end=0.2))
    with pytest.raises(SeqgenError, match="cond_dropout"):
        AutoRegressive(AutoRegressive.Config(cond_dropout=1.0))
    with pytest.raises(SeqgenError, match="empty batch"):
        AutoRegressive().prepare([], specs=[])
    label, img, txt, specs = domains()
    with pytest.raises(SeqgenError, match="two tokens"):
        AutoRegressive().prepare([[Piece(TEXT, torch.tensor([1]), torch.zeros(1, 3, dtype=torch.long),
                                         torch.ones(1), open=True)]], specs=specs)
    with pytest.raises(SeqgenError, match="unknown sampling order"):
        AutoRegressive().generation_orders([[Target(IMAGE, img.positions())]], "zigzag")
    lay = img.layout(1).pos[0]
    with pytest.raises(SeqgenError, match="prompt"):  # an open target with nothing to continue
        build_plan([[]], [[Target(TEXT, txt.layout(1, 4).pos[0], open=True)]], specs)
    with pytest.raises(SeqgenError, match="nothing to generate"):
        build_plan([[piece(label, LABEL, 1, "cond")]], [[]], specs)
    with pytest.raises(SeqgenError, match="open"):
        build_plan([[]], [[Target(TEXT, lay, open=True), Target(IMAGE, lay)]], specs)
    with pytest.raises(SeqgenError, match="rows"):
        build_plan([[], []], [[Target(IMAGE, lay)]], specs)


def test_text_condition_conditions_an_image_model_with_guidance():
    """A caption as the condition: two domains, each position embedded by its own table, the loss routed
    to the image head, guidance against the null condition (one NULL token, whatever the caption's
    length), cached decoding intact."""
    label, img, txt, specs = domains()
    model = model_for(specs, [IMAGE])
    g = torch.Generator().manual_seed(0)
    x = images(2, g=g)
    caps = ["a dark seven", "three"]
    exs = [[piece(txt, TEXT, c, "cond"), piece(img, IMAGE, im, "target")] for c, im in zip(caps, x)]
    p = AutoRegressive(AutoRegressive.Config(cond_dropout=0.0))
    b = p.prepare(exs, specs=specs, generator=g)
    assert int(b.loss_mask.sum()) == 2 * 16 and (b.target_modality[b.loss_mask] == IMAGE).all()
    b.inputs.validate(specs, allow_special=True)
    loss, metrics = model.loss(b)
    loss.backward()
    assert model.embeds["text"].weight.grad.abs().sum() > 0  # the caption is read through the text table
    assert int(metrics["image/count"]) == 32 and "text/count" not in metrics
    model.eval()

    def gen(scale):
        conds = [[e[0]] for e in exs]
        targets = [[Target(IMAGE, img.layout(1).pos[0])] for _ in exs]
        plan = build_plan(conds, targets, specs, guided=scale != 1.0)
        cache, h = prefill(model, plan, plan.prompt.length + int(plan.n_slots.max()) + 1, "cpu")
        p.fill(model, plan, cache, h, specs=specs, temperature=0.0, cfg_scale=scale)
        return plan, torch.cat([outputs(plan, r, 0).ids for r in range(2)])

    plan, out = gen(3.0)
    _, again = gen(3.0)
    _, plain = gen(1.0)
    assert torch.equal(out, again) and int(out.max()) < 5
    assert not torch.equal(out, plain)  # guidance changes the samples
    assert plan.rows == 4
    null_ids = plan.prompt.ids[2:][plan.prompt.valid[2:]].view(2, -1)
    assert null_ids[0].tolist() == [txt.spec.begin_id, txt.spec.null_id, txt.spec.end_id, img.spec.begin_id]
    assert torch.equal(null_ids[0], null_ids[1])
    assert len(img.decode(TokenSequence.from_ids(out, pos=img.layout(2).pos))) == 2


def test_text_generation_slides_its_window_past_the_context():
    """Prompt and output longer than the model's context: the window slides instead of overflowing the
    cache; the first token is what the model predicts from the newest half-window of the prompt."""
    label, img, txt, specs = domains(context=16)
    model = model_for(specs, [TEXT]).eval()
    ids = txt.encode_stream(["the quick brown fox jumps over the lazy dog"])  # 43 tokens > 16
    pre = Piece(TEXT, ids, torch.arange(len(ids)).view(-1, 1).expand(-1, 3).clone(), torch.ones(len(ids)), open=True)

    def gen():
        plan = build_plan([[]], [[Target(TEXT, txt.layout(1, 40).pos[0], open=True, prefix=pre)]], specs)
        assert plan.prompt.length == 43
        keep = 16 // 2  # what GenerativeTask.generate keeps of a prompt longer than the window
        plan.prompt = plan.prompt.slice(plan.prompt.length - keep)
        plan.prompt_target_pos = plan.prompt_target_pos[:, -keep:]
        cache, h = prefill(model, plan, 16, "cpu")
        AutoRegressive().fill(model, plan, cache, h, specs=specs, temperature=0.0, max_context=16)
        return outputs(plan, 0, 0)

    out = gen()
    assert out.ids.shape == (1, 40) and out.valid.all() and int(out.ids.max()) < 256
    assert torch.equal(out.ids, gen().ids)
    with torch.no_grad():
        h = model(TokenSequence.from_ids(ids[-8:].view(1, -1), pos=pre.pos[-8:].unsqueeze(0), modality=TEXT),
                  mask=causal())[:, -1]
    assert int(model.heads["text"].logits(h)[:, :256].argmax(-1)) == int(out.ids[0, 0])
    assert out.pos[0, 0, 0] == 0  # outputs are in the target's local coordinates
