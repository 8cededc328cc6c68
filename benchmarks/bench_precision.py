"""CPU training step of a run config (default: examples/configs/shakespeare_bytes.yaml) under 32-true and
bf16-mixed, with the fused (``sdpa``) and composite (``math``) attention, and what ``train.precision: auto``
picks here.

The model, batches, optimizer (AdamW on the trainer's parameter groups) and gradient clipping are the
config's; bf16-mixed is bf16 autocast around the forward with float32 weights, as Fabric runs it.  The
four variants are timed in interleaved rounds (median and best seconds per step), so that load from
other processes on a shared machine falls on all of them alike.  Also records the CPU flags that decide
native bf16 (avx2, avx512f, avx512_bf16, amx_bf16) and resolve_precision("auto", "cpu").

    python benchmarks/bench_precision.py                 # ~30 s on 2 cores
    SEQGEN_CPU_BF16=0 python benchmarks/bench_precision.py --out /tmp/p.json   # emulate a CPU without bf16
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from seqgen.config import RunConfig  # noqa: E402
from seqgen.precision import cpu_capability, cpu_flags, resolve_precision  # noqa: E402
from seqgen.task import Objective, build_task  # noqa: E402
from seqgen.train import param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/configs/shakespeare_bytes.yaml"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/precision_cpu.json")
    args = ap.parse_args()
    device = torch.device("cpu")
    t_start = time.time()
    auto, reason = resolve_precision("auto", "cpu")
    base = RunConfig.load(args.config).to_dict()
    tcfg = RunConfig.from_dict(base).train

    variants = {}
    for impl in ("sdpa", "math"):
        # through the public task API only (the trainer's path): same seed, so the same initial weights
        cfg = RunConfig.from_dict({**base, "backbone": {**base["backbone"], "attn_impl": impl}})
        torch.manual_seed(cfg.seed)
        task = build_task(cfg)
        for precision in ("32-true", "bf16-mixed"):
            model = copy.deepcopy(task.model)
            opt = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr)
            variants[(precision, impl)] = (Objective(model), model, opt)
    variants = {k: variants[k] for k in sorted(variants, key=lambda k: (k[0] != "32-true", k[1] != "sdpa"))}
    sampler = task.train_sampler(tcfg.batch_size, 0)
    g = torch.Generator().manual_seed(0)
    batches = [task.make_batch(sampler.next(), generator=g) for _ in range(4)]
    tokens = task.count_tokens(batches[0])

    def step(key, i):
        objective, model, opt = variants[key]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=key[0] == "bf16-mixed"):
            loss, _ = objective(batches[i % len(batches)])
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for key in variants:
        for i in range(args.warmup):
            step(key, i)
    times = {key: [] for key in variants}
    for r in range(args.rounds):
        for key in variants:
            for i in range(args.steps):
                t0 = time.perf_counter()
                step(key, i)
                times[key].append(time.perf_counter() - t0)

    fp32_best = statistics.median(times[("32-true", "sdpa")])
    rows = []
    for (precision, impl), ts in times.items():
        med = statistics.median(ts)
        rows.append({"precision": precision, "attn_impl": impl, "s_per_step": med, "best_s": min(ts),
                     "vs_32_sdpa": fp32_best / med, "tokens_per_s": tokens / med})
    flags = cpu_flags()
    cpu = {f: f in flags for f in FLAGS}
    print(f"torch {torch.__version__}, capability {cpu_capability()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}; CPU flags: "
          + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu.items()))
    print(f"{RunConfig.from_dict(base).name} model ({sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters), "
          f"batch {tcfg.batch_size}, {tokens} tokens a step")
    print_table(rows, ["precision", "attn_impl", "s_per_step", "best_s", "vs_32_sdpa", "tokens_per_s"])
    print(f'resolve_precision("auto", "cpu") -> {auto} ({reason})')
    write_json(args.out, "precision_cpu", device, rows, {
        "config": os.path.relpath(args.config, ROOT), "cpu_flags": cpu, "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
        "auto": {"precision": auto, "reason": reason, "SEQGEN_CPU_BF16": os.environ.get("SEQGEN_CPU_BF16")},
        "rounds": args.rounds, "steps_per_round": args.steps, "wall_s": time.time() - t_start})


if __name__ == "__main__":
    main()
