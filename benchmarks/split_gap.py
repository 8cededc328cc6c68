"""Held-out against training likelihood of a trained run, per mixture entry and domain (how much of the
held-out cost is over-fitting): the same number of batches from each split.

    python benchmarks/split_gap.py runs/mnist_scenes --batches 4 --out benchmarks/results/mnist_scenes_split_gap.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqgen.task import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    task = load_run(args.run_dir)
    res = {"run": args.run_dir, "checkpoint": task.checkpoint.name, "batches": args.batches,
           "batch_size": args.batch_size}
    for split in ("train", "heldout"):
        r = task.evaluate_nll(batch_size=args.batch_size, max_batches=args.batches, split=split)
        res[split] = {k: v for k, v in r.items() if "/bits_per_" in k}
    print(f"{'entry/domain':40s} {'train':>8s} {'heldout':>8s}")
    for k in res["heldout"]:
        print(f"{k:40s} {res['train'][k]:8.4f} {res['heldout'][k]:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
