"""Choose the MNIST-scenes config on a validation split, never on the held-out digits.

Every variant trains from ``examples/configs/mnist_scenes.yaml`` *as the file is when the script runs*
(the JSON keeps each variant's whole config) with its sources switched to validation
mode (``validation: 1000``: the "heldout" split is built from 1,000 *training* MNIST digits that the
training scenes then never use; the real held-out digits are not read), for the same CPU time, and is
scored by ``seqgen eval``'s metrics on those validation scenes.  Variants (edits of that file), round 3:

    base                      the config as it is (since round 2: attn_impl auto runs the composite SDPA
                              backend under CPU bf16 training, ~1.5x more steps in the same time)
    rope011                   ``backbone.rope_split: [0, 1, 1]``: no rotary frequencies for the channel axis
                              (constant inside a scene), so rows and columns get 8 each instead of 5 -- the
                              columns tell the left digit's codes from the right one's
    b100                      ``backbone.rope_base: 100``: rotary frequencies spread over the short range
                              these sequences (~45 tokens) use instead of 10,000 positions
    rope011_b100              both

    python benchmarks/scenes_validation.py --time_limit 700 --samples 500 \
        --out benchmarks/results/mnist_scenes_validation_round3.json [--variants base rope011] [--collect]

Round 2 (``benchmarks/results/mnist_scenes_validation_round2.json``, each variant's whole config inside) compared
the file then (caption loss weight 5) with bidirectional condition segments, caption weight 2 (``cap2``, the
winner, which became the file), both, and bidirectional at width 192.
Round 1 (``benchmarks/results/mnist_scenes_validation.json``) compared edits of the file as it was then
(plain byte captions, width 192): BPE captions and width 128 (``bpe_d128``), plus shift-2 augmentation
of image->text scenes and FSQ code features (``bpe_d128_shift2_features``, the winner, which became the
file) and the same at width 192; each variant's whole config is in that JSON.

Run it alone on the machine: each variant is timed training.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from seqgen.config import RunConfig
from seqgen.evaluate import evaluate_run
from seqgen.train import train

BASE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "mnist_scenes.yaml"


def _source(entry: str, **kw):
    def edit(raw):
        for m in raw["mixture"]:
            if entry in ("all", m["name"]):
                m["source"].update(kw)
    return edit


def _backbone(**kw):
    def edit(raw):
        raw["backbone"].update(kw)
    return edit


VARIANTS = {
    "base": [],
    "rope011": [_backbone(rope_split=[0.0, 1.0, 1.0])],
    "b100": [_backbone(rope_base=100.0)],
    "rope011_b100": [_backbone(rope_split=[0.0, 1.0, 1.0], rope_base=100.0)],
}


def variant_config(name: str, time_limit: float, validation: int) -> dict:
    raw = yaml.safe_load(BASE.read_text())
    for edit in [_source("all", validation=validation)] + VARIANTS[name]:
        edit(raw)
    raw["name"] = f"mnist_scenes_val_{name}"
    raw["train"]["time_limit"] = time_limit
    raw["train"]["val_fraction"] = 0.0
    return raw


def summary(res: dict) -> dict:
    t2i, i2t = res["text_to_image"], res["image_to_text"]
    return {
        "val_scene_bits_per_dim": t2i["scene"]["bits_per_dim"],
        "val_caption_bits_per_byte": i2t["caption"]["bits_per_byte"],
        "val_caption_bits_per_byte_null": i2t["caption"]["bits_per_byte_null_condition"],
        "val_t2i_accuracy_guided": t2i["guided"]["accuracy"],
        "val_t2i_accuracy_t1": t2i["temperature_1"]["accuracy"],
        "val_i2t_exact_t1": i2t["temperature_1"]["exact"],
        "val_i2t_exact_greedy": i2t.get("greedy", {}).get("exact"),
        "val_i2t_exact_unseen_greedy": i2t.get("greedy", {}).get("exact_unseen"),
    }


def record(run_dir: Path, wall: float | None = None) -> dict:
    """One variant's entry, from the files its run wrote (config.json, train_summary.json, eval.json)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    stats = json.loads((run_dir / "train_summary.json").read_text())
    res = json.loads((run_dir / "eval.json").read_text())
    out = {"steps": stats["steps"], "train_seconds": stats["train_seconds"], "time_limit": cfg["train"]["time_limit"],
           "cpu_precision": stats["precision"], **summary(res), "config": cfg}
    if wall is not None:
        out["train_wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--time_limit", type=float, default=700.0)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--validation", type=int, default=1000, help="training MNIST digits used as validation digits")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: rebuild the JSON from the variants' finished run folders")
    ap.add_argument("--out", default="benchmarks/results/mnist_scenes_validation_round3.json")
    args = ap.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.setdefault("variants", {})
    results["protocol"] = (f"validation scenes from {args.validation} training MNIST digits kept out of training "
                           "(the real held-out digits unused); each variant's time_limit is its training budget; "
                           f"{args.samples} samples per sample metric")
    for name in args.variants:
        run_dir = Path(args.runs) / f"mnist_scenes_val_{name}"
        if args.collect:
            if (run_dir / "eval.json").exists():
                wall = results["variants"].get(name, {}).get("train_wall_s")
                results["variants"][name] = record(run_dir, wall)
            continue
        raw = variant_config(name, args.time_limit, args.validation)
        t0 = time.time()
        train(RunConfig.from_dict(raw), run_dir, overwrite=True, progress_bar=False)
        wall = time.time() - t0
        res = evaluate_run(run_dir, samples=args.samples)
        (run_dir / "eval.json").write_text(json.dumps(res, indent=2))
        results["variants"][name] = record(run_dir, wall)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"{name}: {json.dumps(summary(res))}", flush=True)
    out_path.write_text(json.dumps(results, indent=2))
    keys = [k for k in next(iter(results["variants"].values())) if k.startswith("val_")]
    print(f"{'variant':26s} {'limit':>6s} {'steps':>6s} " + " ".join(f"{k[4:][:16]:>16s}" for k in keys))
    for name, r in results["variants"].items():
        print(f"{name:26s} {r.get('time_limit', 0):6.0f} {r['steps']:6d} " + " ".join(
            f"{r[k]:16.4f}" if isinstance(r[k], float) else f"{r[k]!s:>16s}" for k in keys))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
