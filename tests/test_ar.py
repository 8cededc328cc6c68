"""The ar paradigm: arrangement, RAR permutations and annealing, condition dropout, generation."""
import pytest
import torch

from seqgen.domains.image import ImageDomain
from seqgen.domains.label import LabelDomain
from seqgen.paradigms.ar import AutoRegressive
from seqgen.types import SeqgenError, TokenSequence


def image_data(B=4, g=None):
    dom = ImageDomain(ImageDomain.Config(height=4, width=4, levels=5))
    x = torch.randint(0, 5, (B, 4, 4), generator=g).float().numpy() / 4
    return dom, dom.encode(x)


def test_prepare_shifts_and_masks_the_prefix():
    dom, data = image_data()
    label = LabelDomain(modality=1)
    cond = label.encode([1, 2, 3, 4])
    b = AutoRegressive().prepare(data, cond)
    assert b.inputs.length == 16 and b.targets.shape == (4, 16)
    assert torch.equal(b.targets, data.ids)  # every data token is a target, none of the prefix
    assert b.loss_mask.all()
    assert torch.equal(b.inputs.ids[:, 0], torch.tensor([1, 2, 3, 4]))
    assert (b.target_modality == 0).all() and b.target_pos is None
    # coordinates shift past the one-token prefix on every axis (M-RoPE rule)
    assert torch.equal(b.inputs.pos[:, 1], data.pos[:, 0] + 1)


def test_prepare_without_prefix_predicts_all_but_the_first_token():
    ids = torch.arange(10).view(1, 10)
    b = AutoRegressive().prepare(TokenSequence.from_ids(ids))
    assert torch.equal(b.inputs.ids, ids[:, :-1]) and torch.equal(b.targets, ids[:, 1:])
    assert b.loss_mask.all()


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
    dom, data = image_data(B=64, g=g)
    bos = TokenSequence.from_ids(torch.full((64, 1), dom.spec.bos_id))
    p = AutoRegressive(AutoRegressive.Config(order="random", anneal_start=0.5, anneal_end=0.5))
    b = p.prepare(data, bos, generator=g, progress=0.0)
    full_pos = TokenSequence.cat(bos, data).pos
    for r in range(64):
        # the targets are a permutation of the row's tokens, each still at its own coordinates
        tp = b.target_pos[r] - 1  # undo the prefix shift
        rebuilt = torch.zeros(4, 4, dtype=torch.long)
        rebuilt[tp[:, 1], tp[:, 2]] = b.targets[r]
        assert torch.equal(rebuilt.view(-1), data.ids[r])
    assert torch.equal(b.target_pos[:, :-1], b.inputs.pos[:, 1:])
    permuted = (b.target_pos[:, 1:] != full_pos[:, 2:]).any(-1).any(-1)
    assert permuted.float().mean() > 0.9
    late = p.prepare(data, bos, generator=g, progress=0.9)
    assert torch.equal(late.targets, data.ids)  # annealed to raster


def test_condition_dropout_rate_and_null_ids():
    g = torch.Generator().manual_seed(0)
    label = LabelDomain(modality=1)
    n = 4000
    data = TokenSequence.from_ids(torch.zeros(n, 3, dtype=torch.long))
    cond = label.encode(torch.randint(0, 10, (n,), generator=g))
    b = AutoRegressive(AutoRegressive.Config(cond_dropout=0.25)).prepare(
        data, cond, null_prefix=label.null(n), generator=g)
    nulls = b.inputs.ids[:, 0] == label.spec.null_id
    assert torch.equal(nulls, b.null_cond)
    assert abs(nulls.float().mean().item() - 0.25) < 0.03
    assert torch.equal(b.inputs.ids[~nulls, 0], cond.ids[~nulls, 0])


def test_bad_config_and_generate_errors():
    with pytest.raises(SeqgenError, match="unknown order"):
        AutoRegressive(AutoRegressive.Config(order="zigzag"))
    with pytest.raises(SeqgenError, match="anneal"):
        AutoRegressive(AutoRegressive.Config(order="random", anneal_start=0.8, anneal_end=0.2))
    with pytest.raises(SeqgenError, match="cond_dropout"):
        AutoRegressive(AutoRegressive.Config(cond_dropout=1.0))
    dom, data = image_data()
    with pytest.raises(SeqgenError, match="prompt"):
        AutoRegressive().generate(None, data.slice(0, 0), dom.layout(4))


def test_text_prefix_conditions_an_image_model_with_guidance():
    """A text prompt as the condition: two domains, each position embedded by its own table, the loss routed
    to the image head, guidance against a null prompt of the same length, cached decoding intact."""
    from seqgen.domains.text import TextDomain
    from seqgen.model import SeqModel
    from seqgen.registry import BACKBONES, HEADS

    torch.manual_seed(0)
    img = ImageDomain(ImageDomain.Config(height=4, width=4, levels=5), modality=0)
    txt = TextDomain(TextDomain.Config(), modality=1)
    bb = BACKBONES.build("transformer", {"dim": 32, "layers": 2, "heads": 4})
    model = SeqModel([img.spec, txt.spec], bb, {"image": HEADS.build("categorical", {}, 32, img.spec)})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (2, 4, 4), generator=g).float().numpy() / 4
    prompt = txt.encode(["a dark seven", "a lit three!"])  # (2, 12) byte tokens
    null = prompt.replace(ids=torch.full_like(prompt.ids, txt.spec.null_id))
    p = AutoRegressive(AutoRegressive.Config(cond_dropout=0.5))
    b = p.prepare(img.encode(x), prompt, null_prefix=null, generator=g)
    assert b.inputs.length == 12 + 16 - 1 and int(b.loss_mask.sum()) == 2 * 16
    assert (b.target_modality[b.loss_mask] == 0).all()
    b.inputs.validate([img.spec, txt.spec], allow_special=True)
    loss, metrics = model.loss(b)
    loss.backward()
    assert model.embeds["text"].weight.grad.abs().sum() > 0  # the prompt is read through the text table
    assert int(metrics["image/count"]) == 32
    model.eval()
    out = p.generate(model, prompt, img.layout(2), null_prompt=null, cfg_scale=3.0, temperature=0.0)
    again = p.generate(model, prompt, img.layout(2), null_prompt=null, cfg_scale=3.0, temperature=0.0)
    assert torch.equal(out.ids, again.ids) and int(out.ids.max()) < 5
    assert img.decode(out).shape == (2, 4, 4)
    with pytest.raises(SeqgenError, match="null prompt"):
        p.generate(model, prompt, img.layout(2), cfg_scale=3.0)


def test_text_generation_slides_its_window_past_the_context():
    """Prompt and output longer than the model's context: the window slides instead of overflowing the
    cache; the first token is what the model predicts from the newest half-window of the prompt."""
    from seqgen.domains.text import TextDomain
    from seqgen.model import SeqModel
    from seqgen.registry import BACKBONES, HEADS

    torch.manual_seed(0)
    txt = TextDomain(TextDomain.Config(context=16))
    bb = BACKBONES.build("transformer", {"dim": 32, "layers": 2, "heads": 4})
    model = SeqModel([txt.spec], bb, {"text": HEADS.build("categorical", {}, 32, txt.spec)}).eval()
    prompt = txt.encode("the quick brown fox jumps over the lazy dog")  # 43 tokens > 16
    out = AutoRegressive().generate(model, prompt, txt.layout(1, 40), temperature=0.0, max_context=16)
    assert out.ids.shape == (1, 40) and int(out.ids.max()) < 256
    again = AutoRegressive().generate(model, prompt, txt.layout(1, 40), temperature=0.0, max_context=16)
    assert torch.equal(out.ids, again.ids)
    from seqgen.masks import causal

    with torch.no_grad():
        h = model(prompt.slice(prompt.length - 8), mask=causal())[:, -1]
    assert int(model.heads["text"].logits(h).argmax(-1)) == int(out.ids[0, 0])
