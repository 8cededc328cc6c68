"""Token features: an adapter's ``token_features`` give each vocabulary id a feature vector, and the model
embeds an id as its own row plus a learned linear map of its features."""
import pytest
import torch

from seqgen.model import SeqModel
from seqgen.registry import BACKBONES, HEADS
from seqgen.types import DomainSpec, SeqgenError, TokenSequence


def model(features=None, vocab=6):
    spec = DomainSpec("img", vocab_size=vocab, pos_axes=2)
    bb = BACKBONES.build("transformer", {"dim": 16, "layers": 1, "heads": 2})
    head = HEADS.build("categorical", {}, 16, spec)
    return SeqModel([spec], bb, {"img": head}, features=features)


def test_embedding_is_row_plus_linear_map_of_features():
    torch.manual_seed(0)
    f = torch.randn(6, 3)
    m = model({"img": f})
    ids = torch.tensor([[0, 5, 6, 9]])  # two codes, END (6) and BEGIN (9) -- special ids get the row only
    seq = TokenSequence.from_ids(ids, modality=0)
    e = m.embed(seq)
    rows = m.embeds["img"].weight[ids[0]]
    W = m.feature_embeds["img"].weight
    want = rows.clone()
    want[:2] += f[ids[0, :2]] @ W.T
    assert torch.allclose(e[0], want, atol=1e-6)
    # the map is learned: a loss on the embedding reaches W
    e.sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_features_are_saved_with_the_weights():
    f = torch.randn(6, 3)
    sd = model({"img": f}).state_dict()
    assert torch.equal(sd["features_img"], f)


@pytest.mark.parametrize("bad", [torch.randn(5, 3), torch.randn(6)])
def test_features_of_the_wrong_shape(bad):
    with pytest.raises(SeqgenError, match="must be"):
        model({"img": bad})


def test_image_code_features_need_a_learned_tokenizer():
    from seqgen.registry import DOMAINS

    img = DOMAINS.build("image", {"height": 4, "width": 4, "levels": 5, "code_features": True})
    with pytest.raises(SeqgenError, match="learned tokenizer"):
        img.token_features()
    assert DOMAINS.build("image", {"height": 4, "width": 4, "levels": 5}).token_features() is None
