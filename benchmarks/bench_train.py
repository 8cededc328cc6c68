"""Training throughput of seqgen's Transformer beside Hugging Face transformers' Llama of the same shape.

Both models: pre-norm RMSNorm, SwiGLU MLP of the same hidden width, grouped-query attention, RoPE,
untied input/output embeddings, the same vocabulary, batch and sequence length; one step = forward,
cross-entropy, backward, AdamW.  bf16 autocast on GPU, float32 on CPU.  Reports tokens/s and model
FLOP utilisation (6 N tokens + attention, over the device's bf16 peak when one is given).

    python benchmarks/bench_train.py --device cuda --compile
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_json  # noqa: E402

from seqgen.masks import causal  # noqa: E402
from seqgen.model import SeqModel  # noqa: E402
from seqgen.registry import BACKBONES, HEADS  # noqa: E402
from seqgen.types import DomainSpec, TokenSequence  # noqa: E402


def seqgen_model(D, layers, heads, kv_heads, hidden, V):
    bb = BACKBONES.build("transformer", {"dim": D, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                                         "mlp_hidden": hidden})
    spec = DomainSpec("text", vocab_size=V)
    return SeqModel([spec], bb, {"text": HEADS.build("categorical", {}, D, spec)})


def hf_model(D, layers, heads, kv_heads, hidden, V):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak of the device, for MFU")
    ap.add_argument("--out", default="benchmarks/results/train.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shapes = ([(512, 8, 8, 8, 1408, 256, 32, 512), (1024, 16, 16, 4, 2816, 32000, 8, 1024)] if gpu
              else [(192, 4, 6, 6, 512, 256, 16, 128)])
    rows = []
    for D, layers, heads, kvh, hidden, V, B, L in shapes:
        ids = torch.randint(0, V, (B, L + 1), device=device)
        for name in ("seqgen", "hf_llama"):
            try:
                torch.manual_seed(0)
                model = (seqgen_model if name == "seqgen" else hf_model)(D, layers, heads, kvh, hidden, V).to(device)
            except ImportError:
                rows.append({"model": name, "shape": f"D{D} x{layers} L{L} B{B}", "tokens_per_s": "transformers not installed"})
                continue
            n_params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu or None)
            if name == "seqgen":
                seq = TokenSequence.from_ids(ids[:, :-1])

                def loss_fn(m=model, seq=seq):
                    return F.cross_entropy(m.heads["text"].logits(m(seq, mask=causal())).float().flatten(0, 1),
                                           ids[:, 1:].flatten())
            else:
                def loss_fn(m=model):
                    return F.cross_entropy(m(input_ids=ids[:, :-1]).logits.float().flatten(0, 1), ids[:, 1:].flatten())
            fn = torch.compile(loss_fn) if args.compile else loss_fn

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                    loss = fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                sec = timeit(step, device, warmup=3 if not args.compile else 5, iters=10)
            except Exception as e:  # one model failing to compile must not lose the other's numbers
                rows.append({"model": name, "shape": f"D{D} x{layers} L{L} B{B}", "tokens_per_s": f"failed: {type(e).__name__}"})
                continue
            tokens = B * L
            flops = 6 * n_params * tokens + 12 * layers * B * L * L * D // 2  # causal attention: half the scores
            row = {"model": name, "shape": f"D{D} x{layers} L{L} B{B}", "params_M": n_params / 1e6,
                   "step_ms": sec * 1e3, "tokens_per_s": tokens / sec, "TFLOPs": flops / sec / 1e12}
            if args.peak_tflops:
                row["MFU"] = flops / sec / 1e12 / args.peak_tflops
            if gpu:
                row["peak_mem_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
            rows.append(row)
    print(f"training step (forward + backward + AdamW), compile={args.compile}, on {device}")
    print_table(rows, ["model", "shape", "params_M", "step_ms", "tokens_per_s", "TFLOPs", "MFU", "peak_mem_GB"])
    write_json(args.out, "train", device, rows, {"compile": args.compile})


if __name__ == "__main__":
    main()
