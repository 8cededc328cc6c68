"""Categorical head and the sampler: losses, knobs, the END output, restrictions, and determinism from
explicit generators."""
import pytest
import torch
import torch.nn.functional as F

from seqgen.heads.categorical import CategoricalHead
from seqgen.sampling import cfg_combine, cfg_scale_at, process_logits, sample_logits
from seqgen.types import DomainSpec, SeqgenError

V = 11


def head(V=V, D=8, **cfg):
    torch.manual_seed(0)
    return CategoricalHead(CategoricalHead.Config(**cfg), D, DomainSpec("x", vocab_size=V))


def test_outputs_are_the_vocabulary_then_end():
    h = head()
    spec = h.spec
    assert spec.head_size == V + 1 and spec.end_id == V
    logits = h.logits(torch.randn(3, 4, 8))
    assert logits.shape == (3, 4, V + 1)
    # END is an ordinary output: a head can learn it (a variable-length segment ends itself)
    h = head(bias=True)
    x = torch.randn(64, 8)
    t = torch.full((64,), spec.end_id)
    opt = torch.optim.SGD(h.parameters(), lr=1.0)
    before = float(h.loss(x, t)[0].detach())
    for _ in range(20):
        loss, _ = h.loss(x, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(h.loss(x, t)[0].detach()) < before / 4
    assert (h.sample(x, temperature=0.0) == spec.end_id).all()


def test_loss_is_masked_mean_cross_entropy():
    h = head()
    x = torch.randn(3, 5, 8)
    t = torch.randint(0, V + 1, (3, 5))  # END (= V) is a valid target
    t[0, 0] = V
    m = torch.rand(3, 5) > 0.4
    m[0, 0] = True
    loss, metrics = h.loss(x, t, m)
    ref = F.cross_entropy(h.logits(x[m]), t[m])
    torch.testing.assert_close(loss, ref)
    assert int(metrics["count"]) == int(m.sum())
    torch.testing.assert_close(metrics["nll_sum"], ref * m.sum())
    torch.testing.assert_close(h.nll(x[m], t[m]), F.cross_entropy(h.logits(x[m]), t[m], reduction="none"))


def test_label_smoothing_changes_training_loss_not_nll():
    plain, smooth = head(), head(label_smoothing=0.2)
    x, t = torch.randn(16, 8), torch.randint(0, V + 1, (16,))
    (a, ma), (b, mb) = plain.loss(x, t), smooth.loss(x, t)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(ma["nll_sum"], mb["nll_sum"])


def test_targets_outside_vocabulary_are_named():
    with pytest.raises(SeqgenError, match=r"outside the vocabulary of 'x'.*\[0, 12\].*< 12"):
        head().loss(torch.randn(4, 8), torch.tensor([0, 3, 12, 2]))
    with pytest.raises(SeqgenError, match="outside the vocabulary"):
        head().loss(torch.randn(2, 8), torch.tensor([-1, 3]))
    head().loss(torch.randn(2, 8), torch.tensor([V, 0]))  # END is inside


def test_allowed_restricts_outputs():
    h = head()
    x = torch.randn(200, 8)
    h.proj.weight.data[V] += 5 * x.mean(0) / x.mean(0).norm()  # make END a frequent choice
    free = h.sample(x, generator=torch.Generator().manual_seed(0))
    assert (free == V).any()  # without a restriction END is drawn
    allowed = torch.ones(200, V + 1, dtype=torch.bool)
    allowed[:, V] = False
    no_end = h.sample(x, generator=torch.Generator().manual_seed(0), allowed=allowed)
    assert not (no_end == V).any()
    greedy = h.sample(x, temperature=0.0, allowed=allowed)
    assert torch.equal(greedy, h.logits(x)[:, :V].argmax(-1))
    # per-row restriction: row r may only emit id r % 3
    only = torch.zeros(200, V + 1, dtype=torch.bool)
    only[torch.arange(200), torch.arange(200) % 3] = True
    s = h.sample(x, generator=torch.Generator().manual_seed(1), allowed=only, top_k=5)
    assert torch.equal(s, torch.arange(200) % 3)


def test_greedy_is_argmax_and_needs_no_randomness():
    logits = torch.randn(6, V + 1)
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))


def test_same_generator_seed_same_samples_and_different_seed_differs():
    logits = torch.randn(64, V + 1)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(5))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(5))
    c = sample_logits(logits, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    h = head()
    x = torch.randn(64, 8)
    assert torch.equal(h.sample(x, generator=torch.Generator().manual_seed(3)),
                       h.sample(x, generator=torch.Generator().manual_seed(3)))


def test_top_k_restricts_support():
    logits = torch.randn(4, V + 1)
    top = logits.topk(3, -1).indices
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        s = sample_logits(logits, generator=g, top_k=3)
        assert (s.unsqueeze(-1) == top).any(-1).all()
        seen |= set(s.tolist())
    assert len(seen) > 4  # and it still samples (not greedy)


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
    assert not torch.equal(guided, h.sample(hc, temperature=0.0)) or not torch.equal(
        guided, h.sample(hu, temperature=0.0))
    # guidance and a restriction together: the restriction applies to the guided logits
    allowed = torch.ones(5, V + 1, dtype=torch.bool)
    allowed[:, V] = False
    allowed[:, guided] = False
    g2 = h.sample(hc, h_uncond=hu, cfg_scale=4.0, temperature=0.0, allowed=allowed)
    ref = cfg_combine(h.logits(hc), h.logits(hu), 4.0).masked_fill(~allowed, float("-inf")).argmax(-1)
    assert torch.equal(g2, ref) and not (g2.unsqueeze(1) == guided.unsqueeze(0)).any()
    assert cfg_scale_at(3.0, 0, 10, "linear") == 1.0 and cfg_scale_at(3.0, 9, 10, "linear") == 3.0
    assert cfg_scale_at(3.0, 4, 10) == 3.0
    with pytest.raises(SeqgenError, match="schedule"):
        cfg_scale_at(3.0, 1, 10, "cosine")


def test_head_rejects_continuous_domain():
    with pytest.raises(SeqgenError, match="discrete"):
        CategoricalHead(CategoricalHead.Config(), 8, DomainSpec("v", value_dim=4))
    with pytest.raises(SeqgenError, match="continuous"):
        DomainSpec("v", value_dim=4).head_size


def test_inverse_cdf_draws_never_pick_zero_probability_ids():
    from seqgen.sampling import draw_categorical

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    ids = draw_categorical(probs.repeat(2000, 1), torch.Generator().manual_seed(0)).view(2000, 3)
    assert set(ids[:, 0].tolist()) == {1, 3} and (ids[:, 1] == 0).all() and (ids[:, 2] == 4).all()
    assert abs((ids[:, 0] == 1).float().mean().item() - 0.5) < 0.04
