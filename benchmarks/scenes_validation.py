"""Choose the MNIST-scenes config on a validation split, never on the held-out digits.

Every variant trains from ``examples/configs/mnist_scenes.yaml`` *as the file is when the script runs*
(the JSON keeps each variant's whole config) with its sources switched to validation
mode (``validation: 1000``: the "heldout" split is built from 1,000 *training* MNIST digits that the
training scenes then never use; the real held-out digits are not read), for the same CPU time, and is
scored by ``seqgen eval``'s metrics on those validation scenes.  Variants (edits of that file):

    base                      the config as it is
    bpe_d128                  captions as a byte-level BPE of 320 ids trained on the training captions (a
                              number word becomes one token); width 128, 4 heads
    bpe_d128_shift2_features  bpe_d128, image->text scenes augmented (each digit moved by up to 2 pixels,
                              ``shift: 2``), scene codes also embedded by their FSQ vectors (``code_features``)
    bpe_shift2_features       the same at the file's width

    python benchmarks/scenes_validation.py --time_limit 780 --samples 500 \
        --out benchmarks/results/mnist_scenes_validation.json [--variants base bpe_d128] [--collect]

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


def _scene(**kw):
    def edit(raw):
        raw["domains"]["scene"].update(kw)
    return edit


def _caption(**kw):
    def edit(raw):
        raw["domains"]["caption"].update(kw)
    return edit


def _backbone(**kw):
    def edit(raw):
        raw["backbone"].update(kw)
    return edit


VARIANTS = {
    "base": [],
    "bpe_d128": [_caption(tokenizer="bpe", vocab_size=320), _backbone(dim=128, heads=4)],
    "bpe_d128_shift2_features": [_caption(tokenizer="bpe", vocab_size=320), _backbone(dim=128, heads=4),
                                 _source("image_to_text", shift=2), _scene(code_features=True)],
    "bpe_shift2_features": [_caption(tokenizer="bpe", vocab_size=320), _source("image_to_text", shift=2),
                            _scene(code_features=True)],
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
    ap.add_argument("--time_limit", type=float, default=780.0)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--validation", type=int, default=1000, help="training MNIST digits used as validation digits")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: rebuild the JSON from the variants' finished run folders")
    ap.add_argument("--out", default="benchmarks/results/mnist_scenes_validation.json")
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
