"""Attention implementations side by side, for every mask kind of the mask language.

For each mask: ``ref`` (explicit softmax, the specification), ``sdpa`` (PyTorch fused kernels with a
dense mask, or is_causal), ``math`` (SDPA's composite backend: plain matmuls), and ``flex`` (FlexAttention with a cached BlockMask; compiled on GPU, which
skips fully masked blocks).  Reports forward and forward+backward time, the max difference to ``ref``,
and the effective TFLOP/s counted over the whole (unmasked) L x L score matrix.

    python benchmarks/bench_attention.py                 # CPU: small shapes
    python benchmarks/bench_attention.py --device cuda   # GPU: L=4096, d=64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_json  # noqa: E402

from seqgen.masks import block_causal, causal, compile_mask, prefix, same_document, sliding_window  # noqa: E402
from seqgen.ops.attention import attention  # noqa: E402


def masks(B: int, L: int, device):
    docs = (torch.arange(L, device=device) // (L // 4)).expand(B, L)
    return {
        "causal": causal(),
        "prefix(L/4)": prefix(L // 4),
        "block_causal(L/16)": block_causal(block_size=L // 16),
        "same_document(4 docs)&causal": same_document(docs) & causal(),
        "sliding_window(L/8)&causal": sliding_window(L // 8) & causal(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--L", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    L = args.L or (4096 if gpu else 512)
    B = args.batch or (4 if gpu else 2)
    H = args.heads or (16 if gpu else 4)
    d = args.head_dim
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    flops_fwd = 4 * B * H * L * L * d
    rows = []
    for name, spec in masks(B, L, device).items():
        ref_out = None
        for impl in ("ref", "sdpa", "math", "flex"):
            m = compile_mask(spec, batch_size=B, q_len=L, kv_len=L, impl=impl, device=device)
            with torch.no_grad():
                out = attention(q, k, v, m, impl=impl)
            if impl == "ref":
                ref_out = out.float()
            err = float((out.float() - ref_out).abs().max())
            fwd = timeit(lambda: attention(q, k, v, m, impl=impl), device, warmup=3, iters=10)
            row = {"mask": name, "impl": impl, "fwd_ms": fwd * 1e3, "fwd_TFLOPs": flops_fwd / fwd / 1e12,
                   "max_abs_err_vs_ref": err}
            if impl != "flex" or gpu:
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

                def step():
                    attention(qg, kg, vg, m, impl=impl).sum().backward()
                fb = timeit(step, device, warmup=2, iters=5)
                row["fwd_bwd_ms"] = fb * 1e3
                row["fwd_bwd_TFLOPs"] = 3.5 * flops_fwd / fb / 1e12
            else:
                row["fwd_bwd_ms"] = "n/a (no CPU backward)"
            rows.append(row)
    print(f"attention: B={B} H={H} L={L} d={d} {dtype} on {device}")
    print_table(rows, ["mask", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_TFLOPs", "fwd_bwd_TFLOPs", "max_abs_err_vs_ref"])
    write_json(args.out, "attention", device, rows, {"shape": {"B": B, "H": H, "L": L, "d": d, "dtype": str(dtype)}})


if __name__ == "__main__":
    main()
