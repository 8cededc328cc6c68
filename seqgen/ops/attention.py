"""Scaled dot-product attention behind one dispatcher.

Implementations (``attn_impl``):
    ref    explicit softmax(q k^T / sqrt(d) + mask) v in float32: the specification
    sdpa   torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPU)
    math   scaled_dot_product_attention restricted to PyTorch's composite MATH backend: plain matmuls,
           in the input dtype.  On a CPU with bf16 autocast and short sequences it trains ~25% faster
           than the fused CPU flash kernel, whose backward is slow there (benchmarks/bench_attention.py)
    flex   FlexAttention with a cached BlockMask (compiled on GPU; forward-only on CPU, a torch limit)
    flash_attn  the flash-attn package, when installed (causal or full masks only)
    auto   sdpa, except while training on a CPU under bf16 autocast: math there (the fused CPU flash
           kernel's bf16 backward is the slow part of a step: 1.3-1.5x slower steps for digits_ar,
           shakespeare_bytes and mnist_scenes on the AMX CPU of BENCHMARKS.md; under float32 sdpa is
           as fast or faster)

q: (B, H, Lq, d); k, v: (B, Hkv, Lk, d) with H a multiple of Hkv (grouped-query attention).
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import CompiledMask
from ..types import SeqgenError

log = logging.getLogger(__name__)

IMPLS = ("ref", "sdpa", "math", "flex", "flash_attn")


def resolve_impl(impl: str, device: torch.device | None = None) -> str:
    if impl == "auto":
        on_cpu = device is not None and torch.device(device).type == "cpu"
        if on_cpu and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") \
                and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return "math"
        return "sdpa"
    if impl not in IMPLS:
        raise SeqgenError(f"unknown attention implementation {impl!r}; known: auto, {', '.join(IMPLS)}")
    return impl


@lru_cache(maxsize=None)
def available_impls() -> dict[str, str]:
    """Which implementations run on this machine, with a short note each."""
    out = {"ref": "yes", "sdpa": "yes", "math": "yes"}
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
        out["flex"] = "yes (compiled on GPU)" if torch.cuda.is_available() else "forward only (no CPU backward in torch)"
    except Exception as e:  # pragma: no cover - old torch
        out["flex"] = f"no ({type(e).__name__})"
    if importlib.util.find_spec("flash_attn") is None:
        out["flash_attn"] = "no (pip install flash-attn)"
    else:
        out["flash_attn"] = "yes" if torch.cuda.is_available() else "installed, needs CUDA"
    return out


def _repeat_kv(k: Tensor, n_rep: int) -> Tensor:
    return k if n_rep == 1 else k.repeat_interleave(n_rep, dim=1)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: CompiledMask, scale: float | None = None) -> Tensor:
    """The specification: float32 softmax attention with an explicit dense mask."""
    B, H, Lq, d = q.shape
    n_rep = H // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scale = d ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    dense = mask.as_dense(B, q.device)
    if dense is not None:
        s = s.masked_fill(~dense, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


def attention_sdpa(q, k, v, mask: CompiledMask, scale=None) -> Tensor:
    H, Hkv = q.shape[1], k.shape[1]
    kwargs = {}
    if H != Hkv:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal, scale=scale,
                                          **kwargs)


def attention_math(q, k, v, mask: CompiledMask, scale=None) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return attention_sdpa(q, k, v, mask, scale)


_compiled_flex = None


def _flex_fn(device: torch.device):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # every distinct mask_mod is a new graph; the default limit of 8 recompiles would silently fall
        # back to the (slow) eager FlexAttention once a process has used a few mask kinds
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def attention_flex(q, k, v, mask: CompiledMask, scale=None) -> Tensor:
    if mask.block_mask is None and (mask.is_causal or mask.dense is not None):
        raise SeqgenError("flex attention needs the mask compiled with impl='flex'")
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise SeqgenError("FlexAttention has no backward pass on CPU in this torch; train on CPU with "
                          "attn_impl='sdpa' (or 'ref') and keep 'flex' for GPU or CPU inference")
    kwargs = {"enable_gqa": q.shape[1] != k.shape[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _flex_fn(q.device)(q, k, v, block_mask=mask.block_mask, scale=scale, **kwargs)


def attention_flash(q, k, v, mask: CompiledMask, scale=None) -> Tensor:
    from flash_attn import flash_attn_func  # lazy: optional dependency

    if not (mask.is_full or mask.is_causal):
        raise SeqgenError("flash_attn supports only causal or full masks; use attn_impl='sdpa' or 'flex'")
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=mask.is_causal)
    return out.transpose(1, 2)


_DISPATCH = {"ref": attention_ref, "sdpa": attention_sdpa, "math": attention_math, "flex": attention_flex,
             "flash_attn": attention_flash}


def attention(q: Tensor, k: Tensor, v: Tensor, mask: CompiledMask, impl: str = "sdpa",
              scale: float | None = None) -> Tensor:
    """Dispatch to one implementation.  Shapes: q (B, H, Lq, d), k/v (B, Hkv, Lk, d) -> (B, H, Lq, d)."""
    if q.shape[1] % k.shape[1]:
        raise SeqgenError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    return _DISPATCH[resolve_impl(impl, q.device)](q, k, v, mask, scale)
