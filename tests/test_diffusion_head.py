"""The diffusion / flow-matching head (heads/diffusion.py): it learns a conditional 2-D distribution
(mean, covariance and mode weights of samples checked, and an untrained head must fail the same
check), classifier-free guidance, temperature, determinism, the loss's bookkeeping and its errors."""
import dataclasses
import functools

import pytest
import torch

from seqgen.heads.diffusion import DiffusionHead
from seqgen.interfaces import Head
from seqgen.registry import HEADS
from seqgen.types import DomainSpec, SeqgenError

SPEC = DomainSpec("v", value_dim=2)
D = 16
NULL = 2  # the "no condition" embedding index, trained on the pooled data (classifier-free guidance)

# condition 0: one Gaussian with a correlated covariance; condition 1: a 0.3 / 0.7 mixture of two
# tight Gaussians (the mode weights are checked too).  Every component is (mean, covariance, weight).
TARGETS = {
    0: [(torch.tensor([1.5, -1.0]), torch.tensor([[0.5, 0.3], [0.3, 0.4]]), 1.0)],
    1: [(torch.tensor([-2.0, 1.5]), 0.09 * torch.eye(2), 0.3),
        (torch.tensor([-0.5, -0.5]), torch.tensor([[0.15, -0.05], [-0.05, 0.1]]), 0.7)],
}


def moments(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the target of condition c (a mixture's moments, in closed form)."""
    mean = sum(w * m for m, _, w in TARGETS[c])
    second = sum(w * (S + torch.outer(m, m)) for m, S, w in TARGETS[c])
    return mean, second - torch.outer(mean, mean)


def draw(c: torch.Tensor) -> torch.Tensor:
    """(N,) conditions -> (N, 2) samples of their targets (global RNG)."""
    out = torch.empty(len(c), 2)
    for k, comps in TARGETS.items():
        rows = (c == k).nonzero().squeeze(1)
        pick = torch.multinomial(torch.tensor([w for *_, w in comps]), len(rows), replacement=True)
        for j, (m, S, _) in enumerate(comps):
            r = rows[pick == j]
            out[r] = m + torch.randn(len(r), 2) @ torch.linalg.cholesky(S).T
    return out


def failures(samples: torch.Tensor, c: int) -> list[str]:
    """What is wrong with 2000 samples of condition c.  Tolerances: the sampling error of the mean is
    ~0.015 and of a covariance entry ~0.02 at n = 2000; a trained head lands within ~0.07 (measured
    0.01-0.07 for both objectives and 3 seeds), so 0.15 / 0.2 leave room for other CPUs and torch versions, while an
    untrained head (samples ~ N(0, I) or worse) misses the means by >= 1."""
    mean, cov = moments(c)
    bad = []
    if not torch.isfinite(samples).all():
        return ["non-finite samples"]
    if (samples.mean(0) - mean).abs().max() > 0.15:
        bad.append(f"mean {samples.mean(0).tolist()} != {mean.tolist()}")
    if (torch.cov(samples.T) - cov).abs().max() > 0.2:
        bad.append(f"covariance {torch.cov(samples.T).tolist()} != {cov.tolist()}")
    if c == 1:  # the modes lie 2.1 apart with std <= 0.4, so the nearest centre names the mode
        near_first = ((samples - TARGETS[1][0][0]).norm(dim=1) < (samples - TARGETS[1][1][0]).norm(dim=1))
        if abs(near_first.float().mean() - 0.3) > 0.07:  # sampling error ~0.01; measured <= 0.03
            bad.append(f"mode weight {near_first.float().mean():.3f} != 0.3")
    return bad


def make(objective: str, conditioning: str = "adaln", seed: int = 0):
    torch.manual_seed(seed)
    cfg = DiffusionHead.Config(objective=objective, width=64, depth=2, time_embed_dim=32, conditioning=conditioning)
    return DiffusionHead(cfg, D, SPEC), torch.nn.Embedding(3, D)


@functools.lru_cache(maxsize=None)
def trained(objective: str, steps: int = 400):
    """A head and condition embeddings trained for ``steps`` Adam steps (batch 128, learning rate decayed
    linearly to 0, condition dropped to NULL with probability 0.2); cached, so the tests of one objective
    share one training run (~3 s on one thread)."""
    torch.set_num_threads(1)
    head, emb = make(objective)
    opt = torch.optim.Adam([*head.parameters(), *emb.parameters()], lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        c = torch.randint(0, 2, (128,))
        loss, _ = head.loss(emb(torch.where(torch.rand(128) < 0.2, NULL, c)), draw(c))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval(), emb.requires_grad_(False)


def cond(emb, c: int, n: int = 2000) -> torch.Tensor:
    return emb(torch.full((n,), c))


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_learns_a_conditional_distribution_and_an_untrained_head_does_not(objective):
    head, emb = trained(objective)
    g = torch.Generator().manual_seed(1)
    for c in (0, 1):
        assert failures(head.sample(cond(emb, c), generator=g), c) == [], (objective, c)
    untrained, emb0 = make(objective, seed=1)
    for c in (0, 1):
        assert failures(untrained.sample(cond(emb0, c), generator=g), c), (objective, c)
    # the trained head checked against the wrong condition's target fails too: it uses h
    assert failures(head.sample(cond(emb, 0), generator=g), 1)
    if objective == "ddpm":  # deterministic DDIM (eta 0) from the same network samples the same targets
        head.config.eta = 0.0
        try:
            assert failures(head.sample(cond(emb, 0), generator=g), 0) == []
        finally:
            head.config.eta = 1.0


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_guidance(objective):
    head, emb = trained(objective)
    h, hu = cond(emb, 0), cond(emb, NULL)
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = head.sample(h, generator=seed())
    assert torch.equal(head.sample(h, h_uncond=hu, cfg_scale=1.0, generator=seed()), plain)
    mean_u = head.sample(hu, generator=seed()).mean(0)
    direction = moments(0)[0] - mean_u
    direction = direction / direction.norm()
    away = lambda s: float((s.mean(0) - mean_u) @ direction)  # noqa: E731
    guided = {s: head.sample(h, h_uncond=hu, cfg_scale=s, generator=seed()) for s in (0.0, 3.0, 5.0)}
    assert torch.allclose(guided[0.0], head.sample(hu, generator=seed()), atol=1e-5)  # s = 0: unconditional
    # condition 0's mean lies ~1.4 from the unconditional one; guidance pushes further out, though only
    # by ~0.2-0.5 (measured, s = 3 / 5): near condition 0 the pooled density is half of its own, so the
    # two scores differ mostly at high noise.  The sample means' standard error is ~0.015.
    assert away(guided[3.0]) > away(plain) + 0.1, (away(plain), away(guided[3.0]))
    assert away(guided[5.0]) > away(guided[3.0]), (away(guided[3.0]), away(guided[5.0]))
    assert torch.isfinite(guided[5.0]).all()


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_temperature_scales_the_noise_and_zero_is_deterministic(objective):
    head, emb = trained(objective)
    h = cond(emb, 0)
    g = torch.Generator().manual_seed(4)
    full = torch.cov(head.sample(h, generator=g).T).trace()
    half = torch.cov(head.sample(h, generator=g, temperature=0.5).T).trace()
    # a flow between Gaussians is affine, so noise scaled by 0.5 scales the covariance by 0.25; ancestral
    # ddpm with every draw scaled gives about the same (measured 0.26 for both); unscaled noise gives ~1
    assert 0.15 < half / full < 0.4, float(half / full)
    zero = head.sample(h[:5], temperature=0.0)
    assert torch.equal(zero, head.sample(h[:5], temperature=0.0, generator=torch.Generator().manual_seed(9)))
    assert (zero - zero[0]).abs().max() == 0
    assert (zero[0] - moments(0)[0]).abs().max() < 0.2  # the prior's mean flows to the target's mean


def scrambled(objective: str) -> DiffusionHead:
    """A tiny head on 3-wide tokens with random (not zero-initialised) weights, so every part of the net matters."""
    torch.manual_seed(0)
    head = DiffusionHead(dataclasses.replace(DiffusionHead.Config.tiny(), objective=objective), D,
                         DomainSpec("v", value_dim=3))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_same_seed_same_samples_different_seeds_differ(objective):
    head = scrambled(objective)
    h, hu = torch.randn(2, 3, D), torch.randn(2, 3, D)
    s = lambda seed, **kw: head.sample(h, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert s(0).shape == (2, 3, 3) and s(0).dtype == torch.float32
    state = torch.get_rng_state()
    assert torch.equal(s(0), s(0))
    assert torch.equal(s(0, h_uncond=hu, cfg_scale=2.0), s(0, h_uncond=hu, cfg_scale=2.0))
    assert torch.equal(torch.get_rng_state(), state)  # a given generator is the only source of randomness
    assert not torch.allclose(s(0), s(1))
    assert not torch.allclose(s(0), s(0, h_uncond=hu, cfg_scale=2.0))
    assert not torch.allclose(s(0), s(0, steps=3))
    assert head.sample(h).shape == (2, 3, 3)  # no generator: the global one
    assert head.sample(h[:0]).shape == (0, 3, 3)


def test_errors_name_the_problem():
    with pytest.raises(SeqgenError, match="needs a continuous domain.*categorical"):
        DiffusionHead(DiffusionHead.Config(), D, DomainSpec("x", vocab_size=7))
    with pytest.raises(SeqgenError, match="unknown objective 'edm'; known: flow, ddpm"):
        HEADS.build("diffusion", {"objective": "edm"}, D, SPEC)
    with pytest.raises(SeqgenError, match="unknown conditioning 'film'; known: adaln, concat"):
        HEADS.build("diffusion", {"conditioning": "film"}, D, SPEC)
    with pytest.raises(SeqgenError, match="unknown schedule"):
        HEADS.build("diffusion", {"objective": "ddpm", "schedule": "sqrt"}, D, SPEC)
    with pytest.raises(SeqgenError, match="has no option"):
        HEADS.build("diffusion", {"steps": 3}, D, SPEC)
    head = HEADS.build("diffusion", DiffusionHead.Config.tiny(), D, SPEC)
    h = torch.randn(4, D)
    with pytest.raises(SeqgenError, match=r"float value targets \(\.\.\., 2\); got torch.float32 \(4, 3\)"):
        head.loss(h, torch.randn(4, 3))
    with pytest.raises(SeqgenError, match="float value targets"):
        head.loss(h, torch.randint(0, 7, (4,)))
    for knob, value in (("top_k", 5), ("top_p", 0.9), ("allowed", torch.ones(4, 8, dtype=torch.bool))):
        with pytest.raises(SeqgenError, match=f"{knob} applies to discrete heads only"):
            head.sample(h, **{knob: value})
    with pytest.raises(SeqgenError, match="with_logprob is not available.*no log-probability"):
        head.sample(h, with_logprob=True)
    with pytest.raises(SeqgenError, match="temperature must be >= 0"):
        head.sample(h, temperature=-1)
    with pytest.raises(SeqgenError, match="steps must be >= 1"):
        head.sample(h, steps=-1)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_runs_under_bf16_autocast_with_bf16_hidden_states(objective):
    head = scrambled(objective)
    h = torch.randn(5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m = head.loss(h.bfloat16(), torch.randn(5, 3))
        loss.backward()
        out = head.sample(h.bfloat16(), h_uncond=h.flip(0).bfloat16(), cfg_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and out.dtype == torch.float32
    # outside autocast, bf16 hidden states meet float32 weights: the head casts them
    ref = head.sample(h, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(head.sample(h.bfloat16(), generator=torch.Generator().manual_seed(0)), ref, atol=0.1)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_loss_mask_empty_input_and_the_per_token_mean(objective):
    head = scrambled(objective)
    assert isinstance(head, Head) and head.defines_nll is False
    h, x = torch.randn(2, 3, D), torch.randn(2, 3, 3)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    torch.manual_seed(5)
    loss, m = head.loss(h, x, loss_mask=mask)
    torch.manual_seed(5)
    same, _ = head.loss(h[mask], x[mask])
    assert int(m["count"]) == 4 and torch.equal(loss, same)
    assert torch.allclose(m["nll_sum"], loss.detach() * 4) and not m["nll_sum"].requires_grad
    loss, m = head.loss(torch.randn(0, D, requires_grad=True), torch.randn(0, 3))
    assert loss.item() == 0 and int(m["count"]) == 0 and m["nll_sum"].item() == 0
    loss.backward()  # a zero that keeps the graph
    # batch_mul averages its draws per token, it never multiplies nll_sum.  An untrained head's net outputs
    # 0, so for zero targets the per-token loss is E|eps|^2 = 1 (flow: v = eps) or E[abar_t^2] (ddpm: the
    # target eps minus the skip sqrt(1 - abar_t) x_t is abar_t eps) whatever batch_mul is
    for mul in (1, 8):
        fresh = DiffusionHead(DiffusionHead.Config(objective=objective, batch_mul=mul, width=8, depth=1), D,
                              DomainSpec("v", value_dim=3))
        want = 1.0 if objective == "flow" else float(fresh.abar.pow(2).mean())
        _, m = fresh.loss(torch.randn(3000, D), torch.zeros(3000, 3))
        assert int(m["count"]) == 3000 and abs(float(m["nll_sum"]) / 3000 / want - 1) < 0.1, (mul, m, want)


@pytest.mark.parametrize("conditioning", ["adaln", "concat"])
@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_both_conditioning_modes_train(conditioning, objective):
    torch.set_num_threads(1)
    head, emb = make(objective, conditioning)
    head.config.batch_mul = 16  # low-variance loss estimates

    def heldout(swap: bool = False) -> float:
        torch.manual_seed(7)
        c = torch.randint(0, 2, (512,))
        return float(head.loss(emb(1 - c if swap else c), draw(c))[0].detach())

    before = heldout()
    opt = torch.optim.Adam([*head.parameters(), *emb.parameters()], lr=3e-3)
    for _ in range(100):
        c = torch.randint(0, 2, (128,))
        loss, _ = head.loss(emb(c), draw(c))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, swapped = heldout(), heldout(swap=True)
    # measured: flow 2.8 -> 1.2, ddpm 0.58 -> 0.35 (its skip already predicts part of eps at step 0)
    assert after < (0.6 if objective == "flow" else 0.75) * before, (before, after)
    assert swapped > 2 * after, (after, swapped)  # the net reads h: the other condition's h is far worse (4-6x)
