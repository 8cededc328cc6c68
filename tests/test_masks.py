"""The mask language: algebra, compiled forms, and agreement of every attention implementation."""
import pytest
import torch

from seqgen.masks import (KeyValid, block_causal, block_mask_cache_info, causal, compile_mask, full, prefix,
                          same_document, sliding_window)
from seqgen.ops.attention import attention, available_impls, resolve_impl
from seqgen.types import SeqgenError

B, L = 2, 13


def segments():
    # two rows with different block layouts (non-decreasing ids)
    return torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
                         [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]])


def docs():
    return torch.tensor([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])


SPECS = {
    "causal": lambda: causal(),
    "full": lambda: full(),
    "prefix": lambda: prefix(5),
    "block_causal_size": lambda: block_causal(block_size=4),
    "block_causal_segment": lambda: block_causal(segments()),
    "same_document_causal": lambda: same_document(docs()) & causal(),
    "sliding_window_causal": lambda: sliding_window(3) & causal(),
    "prefix_or_window": lambda: prefix(2) | (sliding_window(4) & causal()),
    "padding": lambda: causal() & KeyValid(torch.tensor([[True] * L, [False] * 3 + [True] * (L - 3)])),
}


def dense(spec, q_len=L, kv_len=L, off=0):
    return spec.dense(B, q_len, kv_len, off)[:, 0]


def test_algebra_block_size_one_is_causal_and_block_size_L_is_full():
    assert torch.equal(dense(block_causal(block_size=1)), dense(causal()).expand(1, L, L))
    assert torch.equal(dense(block_causal(block_size=L)), dense(full()))
    seg1 = torch.arange(L).expand(B, L)
    assert torch.equal(dense(block_causal(seg1)), dense(causal()).expand(B, L, L))
    assert torch.equal(dense(block_causal(torch.zeros(B, L, dtype=torch.long))), dense(full()).expand(B, L, L))


def test_predicates():
    c = dense(causal())[0]
    assert torch.equal(c, torch.ones(L, L, dtype=torch.bool).tril())
    p = dense(prefix(5))[0]
    assert p[:5, :5].all() and torch.equal(p[5:], c[5:]) and not p[2, 7]
    sw = dense(sliding_window(3) & causal())[0]
    assert sw[6, 4] and sw[6, 6] and not sw[6, 3] and not sw[6, 7]
    sd = dense(same_document(docs()) & causal())
    assert not sd[0, 6, 4] and sd[0, 6, 5] and sd[1, 6, 4]
    bc = dense(block_causal(segments()))
    assert bc[0, 3, 4] and not bc[0, 2, 3] and bc[0, 4, 0]
    # composition is commutative where it should be
    assert torch.equal(dense(causal() & prefix(3)), dense(prefix(3) & causal()))


def test_block_causal_rejects_decreasing_segments_and_bad_args():
    with pytest.raises(SeqgenError, match="non-decreasing"):
        block_causal(torch.tensor([[0, 1, 0]]))
    with pytest.raises(SeqgenError, match="exactly one"):
        block_causal()
    with pytest.raises(SeqgenError):
        prefix(-1)
    with pytest.raises(SeqgenError):
        sliding_window(0)


def test_compiled_forms():
    assert compile_mask(causal(), batch_size=B, q_len=L, kv_len=L).is_causal
    assert compile_mask(full(), batch_size=B, q_len=L, kv_len=L).is_full
    # the newest single query of a causal cache step attends to everything
    assert compile_mask(causal(), batch_size=B, q_len=1, kv_len=L, q_offset=L - 1).is_full
    m = compile_mask(causal(), batch_size=B, q_len=3, kv_len=L, q_offset=L - 3)
    assert m.dense is not None and m.dense.shape == (1, 1, 3, L)
    m = compile_mask(block_causal(segments()), batch_size=B, q_len=L, kv_len=L)
    assert m.dense.shape == (B, 1, L, L)
    with pytest.raises(SeqgenError, match="keys"):
        compile_mask(causal(), batch_size=B, q_len=4, kv_len=3)


def test_flex_block_mask_is_cached_per_shape():
    before = block_mask_cache_info()["entries"]
    a = compile_mask(prefix(3), batch_size=B, q_len=L, kv_len=L, impl="flex").block_mask
    b = compile_mask(prefix(3), batch_size=B, q_len=L, kv_len=L, impl="flex").block_mask
    assert a is b
    assert block_mask_cache_info()["entries"] == before + 1
    c = compile_mask(prefix(4), batch_size=B, q_len=L, kv_len=L, impl="flex").block_mask
    assert c is not a


def qkv(q_len=L, kv_len=L, H=4, Hkv=2, d=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, q_len, d, generator=g, requires_grad=grad)
    k = torch.randn(B, Hkv, kv_len, d, generator=g, requires_grad=grad)
    v = torch.randn(B, Hkv, kv_len, d, generator=g, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("q_len,off", [(L, 0), (4, L - 4)])
def test_ref_sdpa_flex_forward_agree(name, q_len, off):
    spec = SPECS[name]()
    q, k, v = qkv(q_len=q_len)
    outs = {}
    for impl in ("ref", "sdpa", "math", "flex"):
        m = compile_mask(spec, batch_size=B, q_len=q_len, kv_len=L, q_offset=off, impl=impl)
        with torch.no_grad():
            outs[impl] = attention(q, k, v, m, impl=impl)
    for impl in ("sdpa", "math", "flex"):
        torch.testing.assert_close(outs[impl], outs["ref"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_ref_sdpa_math_gradients_agree(name):
    spec = SPECS[name]()
    grads = {}
    for impl in ("ref", "sdpa", "math"):
        q, k, v = qkv(grad=True)
        m = compile_mask(spec, batch_size=B, q_len=L, kv_len=L, impl=impl)
        out = attention(q, k, v, m, impl=impl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[impl] = (q.grad, k.grad, v.grad)
    for impl in ("sdpa", "math"):
        for a, b in zip(grads["ref"], grads[impl]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_attention_gradient_leak(name):
    """No query's output depends on a key or value its mask hides (for every implementation with a backward)."""
    spec = SPECS[name]()
    allowed = dense(spec).expand(B, L, L)
    for impl in ("ref", "sdpa", "math"):
        for i in range(L):
            q, k, v = qkv(grad=True)
            m = compile_mask(spec, batch_size=B, q_len=L, kv_len=L, impl=impl)
            attention(q, k, v, m, impl=impl)[:, :, i].sum().backward()
            dep = (k.grad.abs().sum((1, 3)) + v.grad.abs().sum((1, 3))) > 0  # (B, L) keys that influence query i
            assert not (dep & ~allowed[:, i]).any(), f"{impl}: query {i} depends on hidden keys"
            assert (dep == allowed[:, i]).all(), f"{impl}: query {i} ignores keys it may see"


def test_flex_has_a_clear_error_for_cpu_training():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    q, k, v = qkv(grad=True)
    m = compile_mask(causal(), batch_size=B, q_len=L, kv_len=L, impl="flex")
    with pytest.raises(SeqgenError, match="no backward pass on CPU"):
        attention(q, k, v, m, impl="flex")


def test_unknown_impl_and_listing():
    with pytest.raises(SeqgenError, match="known: auto, ref, sdpa, math, flex"):
        q, k, v = qkv()
        attention(q, k, v, compile_mask(causal(), batch_size=B, q_len=L, kv_len=L), impl="nope")
    impls = available_impls()
    assert impls["ref"] == "yes" and impls["sdpa"] == "yes" and "flex" in impls


def test_auto_picks_math_only_for_cpu_bf16_training():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_impl("auto", cpu) == "math"
        with torch.no_grad():  # sampling and evaluation keep the fused kernel
            assert resolve_impl("auto", cpu) == "sdpa"
        assert resolve_impl("sdpa", cpu) == "sdpa"  # an explicit choice is kept
    with torch.autocast("cpu", dtype=torch.float16):
        assert resolve_impl("auto", cpu) == "sdpa"
    assert resolve_impl("auto", torch.device("meta")) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SPECS))
def test_flex_sdpa_ref_forward_and_gradients_agree_on_gpu(name):
    spec = SPECS[name]().to("cuda")
    res = {}
    for impl in ("ref", "sdpa", "flex"):
        q, k, v = (t.cuda().detach().requires_grad_() for t in qkv(d=64))
        m = compile_mask(spec, batch_size=B, q_len=L, kv_len=L, impl=impl, device="cuda")
        out = attention(q, k, v, m, impl=impl)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        res[impl] = (out.detach(), q.grad, k.grad, v.grad)
    for impl in ("sdpa", "flex"):
        for a, b in zip(res[impl], res["ref"]):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)
