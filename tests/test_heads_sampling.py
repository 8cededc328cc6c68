"""Categorical head and the sampler: losses, knobs, and determinism from explicit generators."""
import pytest
import torch
import torch.nn.functional as F

from seqgen.heads.categorical import CategoricalHead
from seqgen.sampling import cfg_combine, cfg_scale_at, process_logits, sample_logits
from seqgen.types import DomainSpec, SeqgenError


def head(V=11, D=8, **cfg):
    torch.manual_seed(0)
    return CategoricalHead(CategoricalHead.Config(**cfg), D, DomainSpec("x", vocab_size=V))


def test_loss_is_masked_mean_cross_entropy():
    h = head()
    x = torch.randn(3, 5, 8)
    t = torch.randint(0, 11, (3, 5))
    m = torch.rand(3, 5) > 0.4
    loss, metrics = h.loss(x, t, m)
    ref = F.cross_entropy(h.logits(x[m]), t[m])
    torch.testing.assert_close(loss, ref)
    assert int(metrics["count"]) == int(m.sum())
    torch.testing.assert_close(metrics["nll_sum"], ref * m.sum())


def test_targets_outside_vocabulary_are_named():
    with pytest.raises(SeqgenError, match=r"outside the vocabulary of 'x'.*\[0, 11\]"):
        head().loss(torch.randn(4, 8), torch.tensor([0, 3, 11, 2]))


def test_greedy_is_argmax_and_needs_no_randomness():
    logits = torch.randn(6, 11)
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))


def test_same_generator_seed_same_samples_and_different_seed_differs():
    logits = torch.randn(64, 11)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(5))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(5))
    c = sample_logits(logits, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_restricts_support():
    logits = torch.randn(4, 11)
    top = logits.topk(3, -1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = sample_logits(logits, generator=g, top_k=3)
        assert (s.unsqueeze(-1) == top).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(process_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(process_logits(logits, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(process_logits(logits, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # the top token always survives


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p1 = torch.softmax(process_logits(logits, 1.0), -1)
    p05 = torch.softmax(process_logits(logits, 0.5), -1)
    assert p05[0, 0] > p1[0, 0]
    with pytest.raises(SeqgenError):
        process_logits(logits, -1.0)


def test_sample_frequencies_follow_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    s = sample_logits(probs.log().expand(20000, 3), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(s, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_classifier_free_guidance():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(cfg_combine(c, u, 3.0), u + 3 * (c - u))
    h = head()
    hc, hu = torch.randn(5, 8), torch.randn(5, 8)
    guided = h.sample(hc, h_uncond=hu, cfg_scale=4.0, temperature=0.0)
    assert torch.equal(guided, cfg_combine(h.logits(hc), h.logits(hu), 4.0).argmax(-1))
    assert cfg_scale_at(3.0, 0, 10, "linear") == 1.0 and cfg_scale_at(3.0, 9, 10, "linear") == 3.0
    assert cfg_scale_at(3.0, 4, 10) == 3.0
    with pytest.raises(SeqgenError, match="schedule"):
        cfg_scale_at(3.0, 1, 10, "cosine")


def test_head_rejects_continuous_domain():
    with pytest.raises(SeqgenError, match="discrete"):
        CategoricalHead(CategoricalHead.Config(), 8, DomainSpec("v", value_dim=4))
